"""Training end to end on tiny components: stages, resume, refusals, clipping, two processes."""

import gc
import json
import os
import re
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from taxadiffusion.config import Config, ConfigError
from taxadiffusion.model import ModelConfig
from taxadiffusion.taxonomy import FISHNET_RANKS
from taxadiffusion.train.stages import plan_stages
from taxadiffusion.train.trainer import RunConflict, Trainer, clip_gradients, train
from tiny_models import TINY_MODEL, write_two_rank_dataset


@pytest.fixture(scope="module")
def two_rank_data(tmp_path_factory):
    """A folder dataset with two ranks (genus, species): 4 species of synthetic fish, 16 px."""
    return write_two_rank_dataset(tmp_path_factory.mktemp("two-rank"))


def _config(data_root, text_encoder, **train):
    settings = {"steps": [2, 2], "batch_size": 4, "checkpoint_every": 1, "log_every": 1, "learning_rate": 1e-3}
    settings.update(train)
    return Config.from_dict(
        {
            "model": TINY_MODEL,
            "text": {"encoder": str(text_encoder)},
            "data": {"format": "folder", "path": str(data_root), "crop": "squash"},
            "train": settings,
            "sample": {"steps": 2, "grid_taxa": 2, "grid_images": 2},
        }
    )


def test_plan_for_each_strategy():
    model = ModelConfig()
    config = Config.from_dict({"train": {"steps": [5, 1, 1, 1, 1]}})
    stages = plan_stages(config.train, model, FISHNET_RANKS)
    assert [(s.unet, s.encoder_levels, s.depth, s.steps) for s in stages] == [
        ("lora", (0,), 1, 5),
        (None, (1,), 2, 1),
        (None, (2,), 3, 1),
        (None, (3,), 4, 1),
        (None, (4,), 5, 1),
    ]
    for strategy, depth, unet in (
        ("all", 5, "lora"),
        ("random", None, "lora"),
        ("flat", 1, "lora"),
        ("full", 1, "full"),
    ):
        config.train.strategy = strategy
        (stage,) = plan_stages(config.train, model, FISHNET_RANKS)
        assert (stage.depth, stage.unet, stage.steps) == (depth, unet, 9)  # same budget as progressive
    config.train.strategy = "progressive"
    config.train.steps = [1, 2]
    with pytest.raises(ConfigError, match="2 stages but the dataset has 5 ranks"):
        plan_stages(config.train, model, FISHNET_RANKS)


def test_config_validation_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batch_size: 8\n")
    config = Config.load(path, ["train.learning_rate=2e-4", "sample.window=[0.0, 0.5]"])
    assert config.train.batch_size == 8 and config.train.learning_rate == 2e-4
    assert config.sample.window == (0.0, 0.5)
    with pytest.raises(ConfigError, match=r"did you mean train\.learning_rate"):
        Config.from_dict({"train": {"learning_rat": 1}})
    with pytest.raises(ConfigError, match=r"train\.batch_size must be an integer"):
        Config.from_dict({"train": {"batch_size": "big"}})
    with pytest.raises(ConfigError, match="strategy"):
        Config.from_dict({"train": {"strategy": "greedy"}})
    saved = tmp_path / "saved.yaml"
    config.save(saved)
    assert Config.load(saved) == config and Config.load(saved).fingerprint() == config.fingerprint()


def test_two_stages_end_to_end(two_rank_data, tiny_sd, tmp_path):
    from taxadiffusion.pipeline import TaxaDiffusionPipeline

    out = tmp_path / "run"
    pipeline = train(_config(two_rank_data, tiny_sd), out, progress=False)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["stage-0-genus.png", "stage-1-specific_epithet.png"]
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert (out / "config.yaml").is_file() and (out / "taxonomy.json").is_file()
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert len(checkpoints) == 2  # keep_checkpoints
    assert Config.load(checkpoints[-1] / "config.yaml") == Config.load(out / "config.yaml")  # saved with each
    pipe = TaxaDiffusionPipeline.from_pretrained(pipeline)
    pipe.set_progress_bar_config(disable=True)
    species = pipe.taxonomy.leaves()[0]
    image = pipe(pipe.taxonomy.lineage(species), num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3)


def _weights(pipeline_dir):
    unet = load_file(pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")
    encoder = load_file(pipeline_dir / "taxonomy_encoder" / "diffusion_pytorch_model.safetensors")
    return {**{f"unet.{k}": v for k, v in unet.items()}, **{f"enc.{k}": v for k, v in encoder.items()}}


@pytest.fixture
def restore_determinism(monkeypatch):
    """`train.deterministic` switches torch's kernels process-wide; the tests after see them as before."""
    before = torch.are_deterministic_algorithms_enabled()
    # set, then delete: monkeypatch then restores the variable as it was, set or not, after the trainer set it
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", os.environ.get("CUBLAS_WORKSPACE_CONFIG", ""))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    yield
    torch.use_deterministic_algorithms(before)


def test_resume_after_a_kill_is_bitwise_identical(two_rank_data, tiny_sd, tmp_path, restore_determinism):
    # Deterministic kernels make this hold on a GPU too (checked on an H100; without them cuDNN's and the
    # attention backward's kernels differ between any two runs); on the CPU they change nothing.
    config = _config(
        two_rank_data,
        tiny_sd,
        steps=[3, 3],
        checkpoint_every=2,
        condition_dropout=0.2,
        coarse_dropout=0.3,
        deterministic=True,
    )
    whole = _weights(train(config, tmp_path / "whole", progress=False))

    def kill(state, batch):
        if state.global_step == 4:  # stage 1, step 1; the last checkpoint is the end of stage 0
            raise KeyboardInterrupt

    def kill_again(state, batch):
        if state.global_step == 6:  # stage 1, step 3, after resuming from the checkpoint at step 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "killed", on_step=kill, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "killed", on_step=kill_again, progress=False)
    resumed = _weights(train(config, tmp_path / "killed", progress=False))
    assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert "deterministic kernels" in (tmp_path / "killed" / "plan.txt").read_text()
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_resumed_run_may_change_the_running_stages_length(
    two_rank_data, tiny_sd, tmp_path, restore_determinism, capsys
):
    """train.steps may change on resume (stop a prior early, extend a stage), never for a finished stage."""
    settings = {"checkpoint_every": 1, "condition_dropout": 0.2, "deterministic": True}
    longer = _config(two_rank_data, tiny_sd, steps=[3, 2], **settings)
    whole = _weights(train(longer, tmp_path / "whole", progress=False))

    def kill(state, batch):
        if state.global_step == 1:  # stage 0, step 1
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_config(two_rank_data, tiny_sd, steps=[2, 2], **settings), tmp_path / "run", on_step=kill, progress=False)
    extended = _weights(train(longer, tmp_path / "run", progress=False))  # stage 0 runs 3 steps, not 2
    assert all(torch.equal(whole[k], extended[k]) for k in whole)
    assert "3 steps" in (tmp_path / "run" / "plan.txt").read_text()

    # The finished run: a stage that a later one trained on keeps its length; the last one may train longer,
    # from its checkpoint before the averaged weights, and ends as a run given that length from the start.
    with pytest.raises(RunConflict, match=r"stage 0-genus finished at 3 steps, and this config gives it 2"):
        Trainer(_config(two_rank_data, tiny_sd, steps=[2, 2], **settings), tmp_path / "run", progress=False)
    with pytest.raises(RunConflict, match=r"stage 1-specific_epithet finished at 2 steps"):
        Trainer(_config(two_rank_data, tiny_sd, steps=[3, 1], **settings), tmp_path / "run", progress=False)
    ema = {**settings, "ema_decay": 0.9}
    longest = _weights(train(_config(two_rank_data, tiny_sd, steps=[3, 4], **ema), tmp_path / "4", progress=False))
    train(_config(two_rank_data, tiny_sd, steps=[3, 2], **ema), tmp_path / "2", progress=False)
    grown = _weights(train(_config(two_rank_data, tiny_sd, steps=[3, 4], **ema), tmp_path / "2", progress=False))
    out = capsys.readouterr().out
    assert "stage 1-specific_epithet finished at 2 steps and now trains to 4" in out
    assert "resuming from " in out and "step-00000004 (stage 1, step 1)" in out  # the checkpoint inside the stage
    assert all(torch.equal(longest[k], grown[k]) for k in longest)
    for inside in ckpt_dir(tmp_path / "2")[:-1]:  # only the final checkpoint (averaged weights) left: refused
        inside.rename(inside.with_name("moved"))
    with pytest.raises(RunConflict, match=r"train longer only from a checkpoint inside it .* keeps none"):
        Trainer(_config(two_rank_data, tiny_sd, steps=[3, 6], **ema), tmp_path / "2", progress=False)

    # A running stage shortened below the checkpoint's step ends where it is.
    def kill_later(state, batch):
        if state.global_step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(longer, tmp_path / "short", on_step=kill_later, progress=False)
    trainer = Trainer(_config(two_rank_data, tiny_sd, steps=[1, 2], **settings), tmp_path / "short", progress=False)
    assert "stage 0-genus now ends at 1 steps; it ran 2, and ends there" in capsys.readouterr().out
    trainer.run()
    assert trainer.state.global_step == 4 and trainer.state.stage_complete


def test_refuses_other_config_and_user_folders(two_rank_data, tiny_sd, tmp_path):
    config = _config(two_rank_data, tiny_sd, steps=[1, 1])
    train(config, tmp_path / "run", progress=False)
    other = _config(two_rank_data, tiny_sd, steps=[1, 1], learning_rate=5e-4)
    with pytest.raises(RunConflict, match=r"different config \(train.learning_rate"):
        Trainer(other, tmp_path / "run", progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(RunConflict, match="not a taxadiffusion run"):
        Trainer(config, tmp_path / "mine", progress=False)
    with pytest.raises(RunConflict, match="not a taxadiffusion run") as refused:
        Trainer(other, tmp_path / "mine", overwrite=True, progress=False)  # not a run: no flag deletes it
    assert "--overwrite" not in str(refused.value)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["thesis.tex"]
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_checkpoint_of_other_taxonomy_is_refused(two_rank_data, tiny_sd, tmp_path):
    config = _config(two_rank_data, tiny_sd, steps=[1, 1])
    train(config, tmp_path / "run", progress=False)
    state_file = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1] / "state.json"
    state = json.loads(state_file.read_text())
    state["taxonomy"] = "0" * 16
    state_file.write_text(json.dumps(state))
    with pytest.raises(RunConflict, match="different training taxonomy"):
        Trainer(config, tmp_path / "run", progress=False)


def test_trainer_drops_the_records_once_built(two_rank_data, tiny_sd, tmp_path, monkeypatch):
    """The RecordSet (1.6 GB per process at iNat21's scale) is not kept: the dataset's arrays suffice."""
    from taxadiffusion.train import trainer as trainer_module

    built, real = [], trainer_module.run_records

    def run_records(*args, **kwargs):
        records, ranks = real(*args, **kwargs)
        built.append((weakref.ref(records), len(records)))
        return records, ranks

    monkeypatch.setattr(trainer_module, "run_records", run_records)
    trainer = Trainer(_config(two_rank_data, tiny_sd, steps=[1, 1]), tmp_path / "run", progress=False)
    gc.collect()
    (records, images), *others = built
    assert not others and records() is None and len(trainer.dataset) == images


def test_gradient_clipping_really_clips(two_rank_data, tiny_sd, tmp_path):
    trainer = Trainer(_config(two_rank_data, tiny_sd, steps=[1, 1]), tmp_path / "run", progress=False)
    stage = trainer.stages[0]
    params = trainer.model.configure_trainable(stage.unet, stage.encoder_levels)  # the trainer's own path
    for p in params:
        p.grad = torch.full_like(p, 1e6)
    before = clip_gradients(trainer.accelerator, params, 1.0)
    after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])).item()
    assert before > 1e6 and after == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(TypeError, match="as a list"):
        clip_gradients(trainer.accelerator, (p for p in params), 1.0)


def test_nan_loss_stops_with_a_message(two_rank_data, tiny_sd, tmp_path):
    from taxadiffusion.train.trainer import TrainingDiverged

    trainer = Trainer(
        _config(two_rank_data, tiny_sd, steps=[2, 1], learning_rate=1e38), tmp_path / "run", progress=False
    )
    trainer.loss = lambda *args: torch.tensor(float("nan"), requires_grad=True)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at stage 0-genus, step 1; last good checkpoint"):
        trainer.run()


SCRIPT = """
import json, os, sys
from taxadiffusion.config import Config
from taxadiffusion.train.trainer import Trainer

config = Config.from_dict(json.loads(sys.argv[1]))
seen = []
trainer = Trainer(config, sys.argv[2], progress=False, on_step=lambda s, b: seen.append(b["index"].tolist()))
trainer.run()
rank = trainer.accelerator.process_index
with open(os.path.join(sys.argv[2], f"seen-{rank}.json"), "w") as f:
    json.dump({"seen": seen, "world": trainer.accelerator.num_processes}, f)
"""


def test_two_cpu_processes_see_different_samples(two_rank_data, tiny_sd, tmp_path):
    config = _config(two_rank_data, tiny_sd, steps=[2, 1], batch_size=2)
    script = tmp_path / "run_train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    # torchrun-style launch of 2 processes; ACCELERATE_USE_CPU makes accelerate use gloo on the CPU. GPUs are
    # hidden: with one visible, accelerate still gives each process's barrier its local GPU, and rank 1 has none.
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--num_cpu_threads_per_process",
        "1",
        "--main_process_port",
        "29517",
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [*launcher, str(script), json.dumps(config.to_dict()), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = [json.loads((tmp_path / "run" / f"seen-{r}.json").read_text()) for r in range(2)]
    assert all(s["world"] == 2 for s in seen)
    for step in range(3):
        first, second = set(seen[0]["seen"][step]), set(seen[1]["seen"][step])
        assert first and second and not first & second  # each process got its own shard


def test_latent_model_with_lora_and_cached_latents(two_rank_data, tiny_sd, tmp_path, monkeypatch):
    """The published setting on a tiny SD folder: LoRA UNet, the base model's CLIP, VAE latents cached once."""
    from diffusers import AutoencoderKL

    calls = []
    original = AutoencoderKL.encode

    def counted(self, x, *args, **kwargs):
        calls.append(len(x))
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counted)
    config = Config.from_dict(
        {
            "model": {"base": str(tiny_sd), "resolution": 16, "finetune": "lora", "encoder_heads": 4},
            "text": {"encoder": "base"},
            "data": {"format": "folder", "path": str(two_rank_data), "crop": "squash"},
            "train": {"steps": [2, 2], "batch_size": 4, "cache_latents": True, "log_every": 1},
            "sample": {"steps": 2, "grid_taxa": 2, "grid_images": 1},
        }
    )
    trainer = Trainer(config, tmp_path / "run", progress=False)
    assert sum(calls) == len(trainer.dataset)  # every image encoded exactly once, before training
    pipeline = trainer.run()
    assert sum(calls) == len(trainer.dataset)  # and never during the steps
    assert (pipeline / "pytorch_lora_weights.safetensors").is_file()
    assert list((tmp_path / "run" / "cache").glob("latents-*/index.safetensors"))
    plan = (tmp_path / "run" / "plan.txt").read_text()
    assert "trains UNet (lora), encoder 0" in plan and "stage 1 [1-specific_epithet]" in plan
    assert re.search(r"1 process\(es\) on (cpu \(\d+ threads\)|cuda:\d \(.+\)) x 1 accumulation", plan)
    # squash crops are square, so the plan's size estimate is the shards' payload exactly
    payload = sum(
        4 * safe_open(path, framework="pt").get_slice("params").get_shape()[0]
        for path in (tmp_path / "run" / "cache").glob("latents-*/shard-*.safetensors")
    )
    assert payload == len(trainer.dataset) * 4 * 2 * 4 * 8 * 8  # fp32 mean and log-variance, 4 x 8 x 8 latents
    assert f"latent cache on (at least {payload / 2**20:,.1f} MB on disk)" in plan
    tables = trainer.text_embeddings
    text_bytes = sum(tables.table(i).nbytes for i in range(len(tables.ranks)))
    assert f"({text_bytes / 2**20:,.1f} MB in fp32, on the training device" in plan
    # the memory it can count: fp32 weights (base, LoRA, encoders), AdamW state of the largest stage, text tables
    device = float(re.search(r"memory per process: ([\d.,]+) MB on the device", plan)[1])
    weights = 4 * sum(p.numel() for p in trainer.model.parameters())
    trains = [trainer.model.configure_trainable(stage.unet, stage.encoder_levels) for stage in trainer.stages]
    adam = 12 * max(sum(p.numel() for p in parameters) for parameters in trains)
    assert device == pytest.approx((weights + adam + text_bytes) / 2**20, abs=0.06)


PREPARE = """
import os, sys, time
import taxadiffusion.data.check as check
import taxadiffusion.train.latents as latents
from taxadiffusion.cli import main

check.SCREEN_CHUNK, latents.LATENT_CHUNK = 4, 4  # several chunks for each of the two processes
if os.environ.get("RANK") == "1":  # one process screens slowly: longer than the process group's timeout
    screen = check.check_image
    check.check_image = lambda path: time.sleep(float(sys.argv[1])) or screen(path)
sys.exit(main(sys.argv[2:]))
"""


def _launch(script: Path, *args: str, processes: int, port: int) -> subprocess.CompletedProcess:
    """A torchrun-style launch of `processes` CPU processes (gloo), as the two-process training test does."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    if processes > 1:
        launcher += ["--multi_gpu", "--main_process_port", str(port)]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launcher += ["--num_cpu_threads_per_process", "1", str(script), *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(launcher, capture_output=True, text=True, timeout=600, env=env)


def test_prepare_splits_across_processes_outlasts_the_barrier_timeout_and_equals_one_process(
    two_rank_data, tiny_sd, tmp_path
):
    """`taxadiffusion prepare` on two gloo processes whose process group gives up after 10 s, one of them screening
    for about 24 s: nobody waits at a barrier meanwhile, and the caches are the files one process writes."""
    config = {
        "model": {"base": str(tiny_sd), "resolution": 16, "finetune": "lora", "encoder_heads": 4},
        "text": {"encoder": "base"},
        "data": {"format": "folder", "path": str(two_rank_data), "crop": "squash"},
        "train": {"steps": [2, 2], "batch_size": 2, "cache_latents": True, "process_group_timeout": 10},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    script = tmp_path / "prepare.py"
    script.write_text(textwrap.dedent(PREPARE))
    runs = {}
    for processes, port in ((2, 29519), (1, 0)):
        run = tmp_path / f"run-{processes}"
        command = ["prepare", "--config", str(tmp_path / "config.yaml"), "--output", str(run)]
        result = _launch(script, "2" if processes == 2 else "0", *command, processes=processes, port=port)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[processes] = run / "cache"
    assert "stage 1 [1-specific_epithet]" in result.stdout  # the plan is printed
    (two_screen,), (two_latents,) = (list(runs[2].glob(pattern)) for pattern in ("screen-*", "latents-*"))
    assert len(list(two_screen.glob("chunk-*.json"))) > 2 and len(list(two_latents.glob("shard-*"))) > 2
    for folder in (two_screen, two_latents):
        names = sorted(p.name for p in folder.iterdir())
        assert names == sorted(p.name for p in (runs[1] / folder.name).iterdir())
        assert all((folder / n).read_bytes() == (runs[1] / folder.name / n).read_bytes() for n in names)


@pytest.mark.parametrize("strategy", ["random", "flat"])
def test_ablation_strategies_run(two_rank_data, tiny_sd, tmp_path, strategy):
    from taxadiffusion.pipeline import TaxaDiffusionPipeline

    config = _config(two_rank_data, tiny_sd, steps=[1, 1], strategy=strategy, encoder_learning_rate=1e-4)
    trainer = Trainer(config, tmp_path / "run", progress=False)
    pipeline = trainer.run()
    pipe = TaxaDiffusionPipeline.from_pretrained(pipeline)
    if strategy == "flat":  # one rank: the scientific name
        assert [r.value for r in pipe.taxonomy.ranks] == ["specific_epithet"]
        assert all(" " in t.name for t in pipe.taxonomy.taxa("specific_epithet"))
    else:
        assert len(pipe.taxonomy.ranks) == 2
    plan = trainer.describe()
    if strategy == "random":
        assert "random depth per batch" in plan
    else:  # flat conditions on its one rank, the scientific name
        assert f"stage 0 [flat]: 2 steps at lr {config.train.learning_rate:g}, depth 1;" in plan
        assert "random depth" not in plan


def test_encoder_learning_rate_is_its_own_group(two_rank_data, tiny_sd, tmp_path):
    config = _config(two_rank_data, tiny_sd, steps=[1, 1], encoder_learning_rate=1e-5)
    trainer = Trainer(config, tmp_path / "run", progress=False)
    seen = []
    original = torch.optim.AdamW

    class Recording(original):
        def __init__(self, groups, **kwargs):
            seen.append([(len(g["params"]), g["lr"]) for g in groups])
            super().__init__(groups, **kwargs)

    torch.optim.AdamW = Recording
    try:
        trainer.run()
    finally:
        torch.optim.AdamW = original
    unet_params = len(list(trainer.model.unet.parameters()))
    assert seen[0][0] == (unet_params, 1e-3) and seen[0][1][1] == 1e-5  # stage 0: UNet + encoder 0
    encoder_1 = len(list(trainer.model.taxonomy_encoder.encoders[1].parameters()))
    assert seen[1] == [(encoder_1, 1e-5)]  # stage 1 (published): encoder 1 only


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_min_snr_loss_weights_each_sample(kind):
    """Min-SNR-gamma (Hang et al. 2023): per-sample MSE weighted by min(SNR, gamma) / SNR for epsilon,
    / (SNR + 1) for v-prediction, and min(SNR, gamma) for the sample itself."""
    from diffusers import DDPMScheduler

    from taxadiffusion.train.trainer import min_snr_loss

    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=kind)
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(4, 3, 8, 8, generator=generator), torch.randn(4, 3, 8, 8, generator=generator)
    timesteps = torch.tensor([0, 10, 500, 999])
    alpha = scheduler.alphas_cumprod[timesteps]
    snr = alpha / (1 - alpha)
    weight = torch.clamp(snr, max=5.0) / {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}[kind]
    per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    expected = (per_sample * weight).mean()
    torch.testing.assert_close(min_snr_loss(prediction, target, timesteps, scheduler, 5.0), expected)
    assert weight[0] != weight[-1]  # the weighting does something at these timesteps


def test_checkpoints_keep_the_last_k(tmp_path):
    from taxadiffusion.train import checkpoint as ckpt

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    root = tmp_path / "checkpoints"
    for step in range(1, 6):
        state = ckpt.TrainingState(stage=step // 3, step=step, global_step=step)
        weights = {"w": torch.full((2,), float(step))}
        ckpt.write_checkpoint(root, state, weights, optimizer, scheduler, 0, True, lambda: None, keep=2)
    kept = ckpt.list_checkpoints(root)
    assert [p.name for p in kept] == ["step-00000004", "step-00000005"]
    assert sorted(p.name for p in root.iterdir()) == [p.name for p in kept]  # nothing else left behind
    latest = ckpt.read_checkpoint(kept[-1], 0)
    assert latest.state.global_step == 5 and torch.equal(latest.weights["w"], torch.full((2,), 5.0))


def test_ema_resumes_bit_for_bit_and_is_what_the_pipeline_holds(two_rank_data, tiny_sd, tmp_path):
    config = _config(two_rank_data, tiny_sd, steps=[3, 3], checkpoint_every=2, ema_decay=0.9)
    whole = _weights(train(config, tmp_path / "whole", progress=False))

    def kill(state, batch):
        if state.global_step == 6:  # stage 1, step 3: resumes from its checkpoint at step 2, EMA included
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "killed", on_step=kill, progress=False)
    saved = torch.load(ckpt_dir(tmp_path / "killed")[-1] / "optim.pt", weights_only=False)
    assert saved["ema"]["shadow_params"] and saved["ema"]["optimization_step"] == 2
    resumed = _weights(train(config, tmp_path / "killed", progress=False))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    plain = _weights(
        train(_config(two_rank_data, tiny_sd, steps=[3, 3], checkpoint_every=2), tmp_path / "p", progress=False)
    )
    assert any(not torch.equal(whole[k], plain[k]) for k in whole)  # the pipeline holds the averaged weights


def ckpt_dir(run):
    from taxadiffusion.train.checkpoint import list_checkpoints

    return list_checkpoints(run / "checkpoints")


def test_a_resumed_runs_training_time_counts_every_process(two_rank_data, tiny_sd, tmp_path):
    """A run's training time (`state.train_seconds`, kept in its checkpoints) sums every process that ran it up
    to its last checkpoint: a benchmark resumed after a kill reports its whole cost, not its last process's."""
    import time

    from taxadiffusion.train.checkpoint import read_state

    config = _config(two_rank_data, tiny_sd, steps=[2, 2], checkpoint_every=1)

    def slow_then_kill(state, batch):
        if state.global_step == 3:  # stage 1, step 1: its checkpoint is not written, the kill loses it
            raise KeyboardInterrupt
        time.sleep(0.5)  # steps 1 and 2, both checkpointed

    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "run", on_step=slow_then_kill, progress=False)
    first = read_state(ckpt_dir(tmp_path / "run")[-1]).train_seconds
    assert first >= 1.0
    start = time.perf_counter()
    trainer = Trainer(config, tmp_path / "run", progress=False)
    trainer.run()
    second = time.perf_counter() - start
    assert trainer.state.train_seconds >= first + 0.9 * second  # both processes' time, the second's whole
    assert read_state(ckpt_dir(tmp_path / "run")[-1]).train_seconds > first
