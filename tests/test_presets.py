"""The full-scale presets: published settings, a weight-free dry run, and one step per stage end to end
with the base model swapped for a tiny Stable-Diffusion-format folder and the data for a tiny fixture."""

import json
from pathlib import Path

import pytest
import yaml

from format_fixtures import write_bioscan, write_fishnet, write_inat21
from taxadiffusion.cli import main
from taxadiffusion.config import Config
from taxadiffusion.errors import ConfigError
from taxadiffusion.train.plan import plan_run

REPO = Path(__file__).resolve().parents[1]
PRESETS = {
    "sd15_inat21": ("inat21", 7),
    "sd15_fishnet": ("fishnet", 5),
    "sd15_bioscan": ("bioscan", 5),
}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory, fishnet_csv) -> dict[str, list[str]]:
    """`--set` overrides pointing each preset at a tiny fixture of its dataset's format."""
    root = tmp_path_factory.mktemp("formats")
    inat = write_inat21(root / "inat21")
    fishnet = write_fishnet(root / "fishnet", fishnet_csv)
    bioscan = write_bioscan(root / "bioscan")
    return {
        "sd15_inat21": [f"data.path={inat}"],
        "sd15_fishnet": [f"data.path={fishnet}", f"data.root={fishnet.parents[1] / 'images'}"],
        "sd15_bioscan": [f"data.path={bioscan}", f"data.root={bioscan.parent / 'images'}"],
    }


@pytest.mark.parametrize("name", PRESETS)
def test_preset_holds_the_published_settings(name):
    config = Config.load(REPO / "configs" / f"{name}.yaml")
    assert config.model.base == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert config.model.resolution == 512
    assert (config.model.finetune, config.model.lora_rank, config.model.lora_alpha) == ("lora", 4, 4.0)
    assert config.model.lora_targets == ("to_q", "to_k", "to_v", "to_out.0")
    assert (config.model.encoder_layers, config.model.encoder_heads, config.model.encoder_feedforward) == (2, 8, 2048)
    assert (config.text.encoder, config.text.max_length, config.text.template) == ("base", 77, "{rank}: {name}")
    train = config.train
    assert (train.strategy, train.unet_stages, train.learning_rate, train.batch_size) == (
        "progressive",
        "first",
        1e-4,
        32,
    )
    assert (train.adam_beta1, train.adam_beta2, train.weight_decay, train.max_grad_norm) == (0.9, 0.999, 1e-2, 1.0)
    assert train.encoder_learning_rate is None and train.snr_gamma is None and train.mixed_precision == "no"
    sample = config.sample
    assert (sample.scheduler, sample.steps, sample.guidance, sample.scale) == ("pndm", 25, "taxonomic", 9.0)
    assert (sample.window, sample.negative) == ((0.0, 1.0), "text")  # the published nulls
    fmt = PRESETS[name][0]
    assert config.data.format == fmt and train.epochs == 20  # max_train_epoch: 20, per stage
    assert config.data.crop == {"inat21": "random_crop", "fishnet": "fishnet", "bioscan": "pad"}[fmt]
    assert config.text.species == ("epithet" if fmt == "inat21" else "binomial")
    dropout = 0.0 if fmt == "inat21" else 1 / 21
    assert train.condition_dropout == pytest.approx(dropout, abs=1e-5)


def _forbid_loading(monkeypatch):
    """Make every way of reading weights or decoding an image fail loudly."""
    import PIL.Image
    import safetensors.torch
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError(f"a dry run loaded {args[:1]}")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(PIL.Image, "open", refuse)


@pytest.mark.parametrize("name", PRESETS)
def test_dry_run_loads_no_weights_and_no_images(name, fixtures, tiny_sd, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    overrides = [f"model.base={tiny_sd}", "text.max_length=16", *fixtures[name]]
    _forbid_loading(monkeypatch)
    args = ["train", "--config", str(REPO / "configs" / f"{name}.yaml"), "--output", str(out), "--dry-run"]
    assert main(args + [x for o in overrides for x in ("--set", o)]) == 0
    printed = capsys.readouterr().out
    assert not out.exists()  # a dry run writes nothing
    resolved = yaml.safe_load(printed.split("# plan")[0])
    assert resolved["model"]["base"] == str(tiny_sd) and resolved["data"]["format"] == PRESETS[name][0]
    stage_lines = [line for line in printed.splitlines() if line.startswith("stage ")]
    assert len(stage_lines) == PRESETS[name][1]
    assert "trains UNet (lora), encoder 0" in stage_lines[0]
    assert all("trains encoder" in line and "trains UNet" not in line for line in stage_lines[1:])  # one encoder each
    assert all(line.endswith("; the LoRA fused into the frozen UNet") for line in stage_lines[1:])  # fp32 base


def test_dry_run_counts_match_the_built_model(fixtures, tiny_sd, tmp_path):
    """The weight-free plan states the same trainable parameters per stage, and the same text-feature tables,
    as the real trainer."""
    from taxadiffusion.train.trainer import Trainer

    overrides = [f"model.base={tiny_sd}", "text.max_length=16", "train.batch_size=2", *fixtures["sd15_fishnet"]]
    # The latent cache (encoding every image at 512 px) changes no parameter count, and is the slow part.
    config = Config.load(REPO / "configs" / "sd15_fishnet.yaml", [*overrides, "train.cache_latents=false"])
    planned = plan_run(config, tmp_path / "data").describe()
    built = Trainer(config, tmp_path / "run", progress=False).describe()
    assert [line for line in planned.splitlines() if line.startswith(("stage ", "text: "))] == [
        line for line in built.splitlines() if line.startswith(("stage ", "text: "))
    ]


def _sd15_config_folder(root: Path) -> Path:
    """Stable Diffusion 1.5's config files (no weights): enough for a dry run at full size."""
    unet = {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    }
    vae = {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512], "latent_channels": 4}
    text = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": 768}
    for sub, config in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        (root / sub).mkdir(parents=True)
        (root / sub / "config.json").write_text(json.dumps(config))
    return root


def test_dry_run_at_full_size_states_the_published_model(fixtures, tmp_path, capsys):
    """With SD 1.5's config files alone: 859.5 M UNet parameters, the LoRA's ~0.8 M, 64x64x4 latents."""
    base = _sd15_config_folder(tmp_path / "sd15")
    args = ["train", "--config", str(REPO / "configs" / "sd15_fishnet.yaml"), "--output", str(tmp_path / "run")]
    overrides = [f"model.base={base}", *fixtures["sd15_fishnet"]]
    assert main([*args, "--dry-run", *(x for o in overrides for x in ("--set", o))]) == 0
    printed = capsys.readouterr().out
    assert "UNet denoises 4x64x64" in printed and "UNet 859.5 M parameters" in printed
    stage0 = next(line for line in printed.splitlines() if line.startswith("stage 0"))
    lora = 797_184  # peft r=4 on to_q/to_k/to_v/to_out.0 of SD 1.5's UNet
    encoder = int(
        next(line for line in printed.splitlines() if line.startswith("stage 1"))
        .split("(")[1]
        .split()[0]
        .replace(",", "")
    )
    assert f"({lora + encoder:,} parameters" in stage0
    # memory per process at the published batch 32 in fp32: SD 1.5's activations (about 51 GB, counted on the meta
    # device) dominate, so 80 GB cards and larger
    memory = next(line for line in printed.splitlines() if line.startswith("memory per process"))
    activations = float(memory.split("about ")[1].split(" GB of activations")[0])
    assert 45 < activations < 56 and "at batch 32" in memory and "fits GPUs of 80 GB and more" in memory


@pytest.mark.parametrize("name", PRESETS)
def test_preset_trains_one_step_per_stage(name, fixtures, tiny_sd, tmp_path):
    out = tmp_path / "run"
    overrides = [
        f"model.base={tiny_sd}",
        "model.resolution=32",
        "text.max_length=16",
        "train.epochs=null",  # the presets' 20 epochs per stage give way to one step
        "train.steps=1",
        "train.batch_size=2",
        "data.num_workers=0",
        "sample.steps=2",
        "sample.grid_taxa=1",
        "sample.grid_images=1",
        *fixtures[name],
    ]
    args = ["train", "--config", str(REPO / "configs" / f"{name}.yaml"), "--output", str(out)]
    assert main(args + [x for o in overrides for x in ("--set", o)]) == 0
    ranks = PRESETS[name][1]
    assert len(list((out / "samples").glob("stage-*.png"))) == ranks
    assert (out / "pipeline" / "pytorch_lora_weights.safetensors").is_file()
    saved = Config.load(out / "config.yaml")
    assert saved.model.base == str(tiny_sd) and saved.model.lora_rank == 4
    state = json.loads((sorted((out / "checkpoints").iterdir())[-1] / "state.json").read_text())
    assert state["stage"] == ranks - 1 and state["global_step"] == ranks


def test_cluster_recipe_files_are_valid():
    """The accelerate configs load with accelerate's own reader; the SLURM script calls `accelerate launch`."""
    import subprocess

    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"single_gpu": (1, "NO"), "multi_gpu": (4, "MULTI_GPU"), "multi_node": (8, "MULTI_GPU")}
    for name, (processes, kind) in expected.items():
        config = load_config_from_file(str(REPO / "configs" / "accelerate" / f"{name}.yaml"))
        assert (config.num_processes, config.distributed_type.value) == (processes, kind)
    script = REPO / "configs" / "slurm" / "train.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "accelerate launch" in text and "configs/accelerate/multi_node.yaml" in text and "--requeue" in text
    for referenced in ("configs/accelerate/multi_node.yaml", "configs/slurm/train.sbatch"):
        assert referenced in (REPO / "docs" / "cluster.md").read_text()


def chained_base(path: Path) -> list[str]:
    """A prior trained in legs names the previous leg's pack as its base. A pack the tree does not keep must be
    remade by its own committed config (configs/prior_<name>.yaml); the config loads with that leg's base in its
    place (the loader refuses a missing file, naming it). Returns the override, or none when the base is there."""
    base = (yaml.safe_load(path.read_text(encoding="utf-8")).get("model") or {}).get("base", "")
    if not base.startswith("benchmarks/priors/") or (REPO / base).is_file():
        return []
    maker = REPO / "configs" / f"prior_{Path(base).stem}.yaml"
    assert maker.is_file(), f"{path.name}: model.base {base} is neither in the tree nor made by a committed config"
    with pytest.raises(ConfigError, match="no such file"):
        Config.load(path)
    return chained_base(maker) or [f"model.base={yaml.safe_load(maker.read_text(encoding='utf-8'))['model']['base']}"]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda path: path.stem)
def test_every_committed_config_loads(path, monkeypatch):
    """Every config under configs/ passes the config's own checks (a typo in a benchmark's prior or recipe fails
    here, not hours into a run); a prior's captions stop at the order, so it never reads a finer name. The
    benchmark configs name their data under ${TAXADIFFUSION_DATA}, never a path outside the repository."""
    monkeypatch.setenv("TAXADIFFUSION_DATA", "/datasets")
    text = path.read_text(encoding="utf-8")
    assert "../" not in text and "DESIGN" not in text
    config = Config.load(path, chained_base(path))
    if config.data.path and "TAXADIFFUSION_DATA" in text:
        assert config.data.path.startswith("/datasets/")
    if path.stem.startswith("prior_"):
        assert config.train.strategy == "prior" and config.caption.rank == "order"


def test_a_data_path_reads_the_environment_and_names_an_unset_variable(monkeypatch):
    monkeypatch.setenv("TAXADIFFUSION_DATA", "/datasets")
    data = {"format": "folder", "path": "${TAXADIFFUSION_DATA}/fish4knowledge", "root": "$TAXADIFFUSION_DATA/img"}
    config = Config.from_dict({"data": data})
    assert (config.data.path, config.data.root) == ("/datasets/fish4knowledge", "/datasets/img")
    monkeypatch.delenv("TAXADIFFUSION_DATA")
    with pytest.raises(ConfigError, match=r"data\.path .* TAXADIFFUSION_DATA is not set: export TAXADIFFUSION_DATA="):
        Config.from_dict({"data": data})
