"""Speed and memory: our training step against the published one, and our sampling against diffusers'.

    python benchmarks/speed.py                                     # CPU: the small model, fp32
    python benchmarks/speed.py --device cuda --sd15 --precision bf16  # GPU: SD 1.5-sized at 512 px
    python benchmarks/speed.py --part switches --device cuda --sd15 --precision bf16 --batch 32 --rounds 1
    python benchmarks/speed.py --part evaluation --device cuda --sd15 [--precision bf16]

One Stable-Diffusion-format model with random weights (CLIP text encoder with 77 tokens, VAE with an 8x
downsampling, UNet with LoRA) is written to a temporary folder and used by every measurement. The default is
small enough for 2 CPU cores but keeps SD 1.5's shares of the work (see `SMALL`); `--sd15` is SD 1.5's
architecture at 512 px.

`--part steps` (the default):
1. A training step of ours (`Trainer.loss` on cached text features and frozen-rank tables; with and without
   the VAE-latent cache) against the published step, re-created faithfully: the text encoder runs for every
   rank of every sample at every step, the VAE encodes every batch, every rank encoder up to the stage runs,
   then the UNet forward and backward. Measured at the first stage (one rank) and the last (all ranks).
2. Sampling images/s of `TaxaDiffusionPipeline` against diffusers' `StableDiffusionPipeline` with the same
   UNet, VAE, scheduler (PNDM), steps and batch, both with two guidance branches.
3. Peak memory of each (max RSS of a fresh process on CPU; `max_memory_allocated` on CUDA).
4. FLOPs per training sample of every part, for both models (no timing): the speed-up that removing the
   published step's redundant work can give at best.
5. AdamW's step with the default and the fused kernel (`train.fused_optimizer`) over what a LoRA stage trains
   and over the whole UNet (a prior's pretraining, the `full` strategy). `--part optimizer` measures this part
   alone and adds it to an earlier run's results.

`--part switches`: the trainer's own step (`Trainer.update`) with each switch that makes it faster alone (the
frozen base in low precision, a compiled UNet, fused AdamW), none and all three, with its model FLOP
utilisation and the first step's time (compilation). `--part evaluation`: `Evaluation.run` on `--eval-taxa`
species as `evaluate` runs it, generation timed apart from scoring, and what iNaturalist 2021's takes at that rate.

Each measurement runs in its own process; results (median and spread of the repetitions) go to
benchmarks/results/speed[_switches|_evaluation][_sd15][_bf16].md and .json (`_sd15` with `--sd15`, `_bf16` with
`--precision bf16`); a run cut short leaves what it measured in a `.partial.json`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from taxadiffusion.eval.report import write_keeping_section
from taxadiffusion.sampling import SamplingSettings

from common import RESULTS

PUBLISHED = SamplingSettings()  # PNDM, 25 steps, taxonomic guidance at s = 9.0


@dataclass(frozen=True)
class ModelSpec:
    """An SD-format latent model's sizes (diffusers / transformers config keywords); random weights."""

    name: str
    resolution: int
    text: dict
    unet: dict
    vae: dict
    encoder_heads: int

    @property
    def vae_config(self) -> dict:
        blocks = len(self.vae["block_out_channels"])
        return dict(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks,
            sample_size=self.resolution,
            **self.vae,
        )


# SD 1.5's architecture (the CLIP ViT-L/14 text tower, the SD UNet and VAE) at 512 px: `--sd15`, for GPUs.
SD15 = ModelSpec(
    "SD 1.5-sized",
    512,
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    unet=dict(
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ),
    vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2),
    encoder_heads=8,
)
# Small enough for 2 CPU cores, with SD 1.5's shares of the work kept: per training sample, the text encoder
# over 7 ranks costs a few % of the UNet's forward and backward and the VAE encoder over half of it (the
# report counts both models' FLOPs). Sizes alone mislead: a 16 x 16 latent makes a UNet cheap for its
# parameters while 7 x 77 text tokens cost the same at any resolution.
SMALL = ModelSpec(
    "small",
    128,
    text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2),
    unet=dict(
        block_out_channels=(128, 256, 256),
        layers_per_block=1,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ),
    vae=dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2),
    encoder_heads=4,
)
SPECS = {"small": SMALL, "sd15": SD15}
RANKS = 7  # the synthetic taxonomy's
TOKENS = 77


def build_modules(spec: ModelSpec, vocab: int = 49408):
    """(text encoder, UNet, VAE) of a spec, randomly initialised on the current default device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab,
            max_position_embeddings=TOKENS,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
            **spec.text,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=spec.resolution // 8,
        in_channels=4,
        out_channels=4,
        cross_attention_dim=spec.text["hidden_size"],
        **spec.unet,
    )
    return text, unet, AutoencoderKL(**spec.vae_config)


def write_model(root: Path, spec: ModelSpec) -> dict[str, int]:
    """The SD-format folder (unet, vae, text_encoder, tokenizer, scheduler); returns parameter counts."""
    from diffusers import PNDMScheduler

    from taxadiffusion.testing import write_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = write_clip_tokenizer(root / "tokenizer", max_length=TOKENS)
    text, unet, vae = build_modules(spec, len(tokenizer))
    text.save_pretrained(root / "text_encoder")
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    PNDMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True
    ).save_pretrained(root / "scheduler")
    components = {
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
    }
    (root / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False, **components})
    )
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return {"text_encoder": count(text), "unet": count(unet), "vae_encoder": count(vae.encoder)}


def flops_per_sample(spec: ModelSpec) -> dict[str, float]:
    """GFLOPs of each part of a training step for one sample, counted by torch's FlopCounterMode on the
    meta device (shapes only: no weights, no time). The UNet's backward is the one LoRA training needs
    (gradients of the activations; the LoRA weights' own gradients are negligible)."""
    from torch.utils.flop_counter import FlopCounterMode

    from taxadiffusion.conditioning import TaxonomyEncoder

    def count(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e9

    width = spec.text["hidden_size"]
    with torch.device("meta"):
        text, unet, vae = build_modules(spec)
        encoder = TaxonomyEncoder(1, width, num_heads=spec.encoder_heads).encoders[0]  # one rank's transformer
        side = spec.resolution // 8
        noisy, condition = torch.randn(1, 4, side, side), torch.randn(1, TOKENS, width, requires_grad=True)
        unet.requires_grad_(False)
        with torch.no_grad():
            parts = {
                "text encoder, all ranks": count(lambda: text(torch.zeros(RANKS, TOKENS, dtype=torch.long))),
                "VAE encoder": count(lambda: vae.encode(torch.randn(1, 3, spec.resolution, spec.resolution))),
                "rank encoder, forward": count(lambda: encoder(torch.randn(1, TOKENS, width))),
            }
        parts["rank encoder, forward + backward"] = count(
            lambda: encoder(torch.randn(1, TOKENS, width)).sum().backward()
        )
        parts["UNet, forward + backward"] = count(
            lambda: unet(noisy, torch.tensor([500]), encoder_hidden_states=condition).sample.sum().backward()
        )
    return parts


def spec_of(root: Path) -> ModelSpec:
    return SPECS[(root / "spec.txt").read_text().strip()]


def trainer_for(root: Path, cache_latents: bool, folder: str | None = None, **train):
    """A trainer over the prepared data; the benchmark draws its own batches (any size) from its dataset.
    `train`: `train.*` settings over the benchmark's; `folder`: its run folder (caches of its own)."""
    from taxadiffusion.config import Config
    from taxadiffusion.train.trainer import Trainer

    spec = spec_of(root)
    config = Config.from_dict(
        {
            "model": {"base": str(root / "sd"), "resolution": spec.resolution, "encoder_heads": spec.encoder_heads},
            "text": {"encoder": "base", "max_length": 77},
            "data": {"format": "folder", "path": str(root / "data"), "crop": "squash"},
            "train": {"batch_size": 4, "cache_latents": cache_latents, "steps": 1, **train},
        }
    )
    folder = folder or ("run-cached" if cache_latents else "run")
    return Trainer(config, root / folder, progress=False)


def median_spread(seconds: list[float]) -> dict:
    q = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else [seconds[0]] * 3
    return {"median": statistics.median(seconds), "p25": q[0], "p75": q[2], "n": len(seconds)}


def autocast(device: str, precision: str):
    """The same mixed precision for ours and the reference (weights stay fp32)."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


def peak_memory(device: str) -> float:
    """MiB: CUDA's peak allocation, or this process's max RSS."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(step, device: str, repeats: int, warmup: int) -> list[float]:
    """Seconds of each call of `step(i)` after the first `warmup`; on CUDA synchronized on both sides, so a
    time covers the kernels the call queued, not only their launch."""
    seconds = []
    for i in range(warmup + repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(i)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    return seconds


# -- 1. training steps ---------------------------------------------------------------------------------


def train_step_job(
    root: str, kind: str, stage_index: str, batch: int, reps: int, device: str, precision: str = "no"
) -> dict:
    """Time one kind of training step ("ours", "ours+latents" or "published") at one stage."""
    from taxadiffusion.conditioning import FrozenRankTables, drop_ranks
    from taxadiffusion.text import rank_texts

    torch.manual_seed(0)
    trainer = trainer_for(Path(root), kind == "ours+latents")
    stage = trainer.stages[0 if stage_index == "first" else -1]
    model, vae = trainer.model.to(device), trainer.vae.to(device) if trainer.vae is not None else None
    params = model.configure_trainable(stage.unet, stage.encoder_levels)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    loader = torch.utils.data.DataLoader(trainer.dataset, batch_size=batch, shuffle=True, drop_last=True)
    batches = [next(iter(loader)) for _ in range(reps + 2)]
    first = min(stage.encoder_levels)
    tables = None
    if first > 0 and kind != "published":
        text = [trainer.text_embeddings.table(i) for i in range(first)]
        tables = FrozenRankTables(model.taxonomy_encoder, text, first)

    if kind == "published":
        from transformers import AutoTokenizer, CLIPTextModel

        base = trainer.config.model.base
        tokenizer = AutoTokenizer.from_pretrained(base, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder").to(device).eval()
        texts = rank_texts(trainer.taxonomy, trainer.config.text.template)
        scheduler = trainer.noise_scheduler

    def published(batch_data) -> torch.Tensor:
        """The published step: texts encoded per rank per sample, VAE encode, every encoder to the stage."""
        ids = drop_ranks(batch_data["taxon_ids"], trainer.config.train.condition_dropout)
        depth = stage.depth
        prompts = [texts[level][int(i)] for row in ids for level, i in enumerate(row)]
        with torch.no_grad():
            tokens = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            hidden = text_encoder(tokens.input_ids.to(device)).last_hidden_state
            features = hidden.reshape(ids.shape[0], ids.shape[1], *hidden.shape[1:])
            latents = vae.encode(batch_data["pixel_values"].to(device)).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = scheduler.add_noise(latents, noise, t)
        condition = model.taxonomy_encoder(features, depth)
        prediction = model.unet(noisy, t, encoder_hidden_states=condition).sample
        return torch.nn.functional.mse_loss(prediction, noise)

    def ours(batch_data) -> torch.Tensor:
        on_device = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch_data.items()}
        return trainer.loss(model, on_device, stage, tables)

    step_loss = published if kind == "published" else ours

    def step(i: int) -> None:
        with autocast(device, precision):
            loss = step_loss(batches[i])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed(step, device, len(batches) - 2, warmup=2)
    return {"times": seconds, "peak_mib": peak_memory(device), "ranks": stage.depth}


# -- 2. sampling ----------------------------------------------------------------------------------------


def sampling_job(root: str, kind: str, batch: int, steps: int, reps: int, device: str, precision: str = "no") -> dict:
    from diffusers import StableDiffusionPipeline

    trainer = trainer_for(Path(root), False)
    if kind == "ours":
        pipe = trainer.pipeline().to(device)
        lineage = trainer.taxonomy.lineage(trainer.taxonomy.leaves()[0])

        def run(generator):
            return pipe(
                [lineage] * batch, num_inference_steps=steps, guidance_scale=PUBLISHED.scale, generator=generator
            )

    else:
        base = trainer.config.model.base
        pipe = StableDiffusionPipeline.from_pretrained(
            base, unet=trainer.model.unet, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        ).to(device)
        pipe.set_progress_bar_config(disable=True)
        prompt = "specific_epithet: " + trainer.taxonomy.leaves()[0].name

        def run(generator):
            return pipe(
                [prompt] * batch,
                num_inference_steps=steps,
                guidance_scale=PUBLISHED.scale,
                generator=generator,
                height=spec_of(Path(root)).resolution,
                width=spec_of(Path(root)).resolution,
            )

    def step(i: int) -> None:
        with autocast(device, precision):
            run(torch.Generator().manual_seed(i))

    with torch.no_grad():
        seconds = timed(step, device, reps, warmup=1)
    return {"times": seconds, "batch": batch, "peak_mib": peak_memory(device)}


# -- 3. the optimizer step ---------------------------------------------------------------------------------

OPTIMIZED = {"lora": "LoRA + rank encoder (a LoRA stage)", "full": "whole UNet (a prior, strategy full)"}


def optimizer_job(root: str, trains: str, fused: bool, reps: int, device: str) -> dict:
    """Time AdamW's step, built as the trainer builds it, over what `trains` names, with random gradients."""
    from taxadiffusion.config import Config
    from taxadiffusion.train.trainer import build_optimizer

    torch.manual_seed(0)
    trainer = trainer_for(Path(root), True)
    stage = trainer.stages[0]
    model = trainer.model.to(device)
    params = model.configure_trainable(trains, stage.encoder_levels)  # "lora" or "full"
    encoder = {id(p) for p in model.taxonomy_encoder.parameters()}
    train = Config.from_dict({"train": {"fused_optimizer": fused}}).train
    optimizer, _ = build_optimizer(params, encoder, stage, train)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    seconds = timed(lambda i: optimizer.step(), device, reps, warmup=2)
    fused_on = bool(optimizer.defaults.get("fused"))
    size = sum(p.numel() for p in params)
    return {"times": seconds, "peak_mib": peak_memory(device), "parameters": size, "fused": fused_on}


def measure_optimizer(root: Path, rounds: int, reps: int, device: str) -> dict:
    """Both kernels over both parameter sets, interleaved over rounds of fresh processes."""
    runs = defaultdict(list)
    for round_ in range(rounds):
        for trains in OPTIMIZED:
            for kernel in ("default", "fused"):
                print(f"round {round_ + 1}/{rounds}, optimizer step: {kernel}, {trains}")
                job = (str(root), trains, kernel == "fused", reps, device)
                runs[f"{kernel}/{trains}"].append(in_process(optimizer_job, *job))
    return {key: merged(values) for key, values in runs.items()}


# -- 4. the training step's switches ----------------------------------------------------------------------

# The switches that make the same training step faster, each alone, none, and all three (`train.*` settings;
# the defaults are the frozen base in low precision and fused AdamW on, compile off). "none" is the step under
# autocast over fp32 weights with torch's default AdamW kernel, eager.
SWITCHES_OFF = {"frozen_in_low_precision": False, "compile": False, "fused_optimizer": False}
SWITCHES = {
    "none": {},
    "frozen base in low precision": {"frozen_in_low_precision": True},
    "compiled UNet": {"compile": True},
    "fused AdamW": {"fused_optimizer": True},
    "all three": {"frozen_in_low_precision": True, "compile": True, "fused_optimizer": True},
}


def switch_step_job(
    root: str, switch: str, stage_index: str, batch: int, reps: int, device: str, precision: str = "no"
) -> dict:
    """Time `Trainer.update` (the step training runs: accumulate, loss, backward, clipping, AdamW) on the latent
    cache, with one set of switches. The first step is timed apart: a compiled UNet compiles there."""
    torch.manual_seed(0)
    settings = SWITCHES_OFF | SWITCHES[switch] | {"mixed_precision": precision, "batch_size": batch}
    trainer = trainer_for(Path(root), True, "run-" + switch.replace(" ", "-"), **settings)
    if trainer.accelerator.device.type != torch.device(device).type:
        raise RuntimeError(f"accelerate trains on {trainer.accelerator.device}, not on --device {device}")
    stage = trainer.stages[0 if stage_index == "first" else -1]
    parts = trainer.prepare_stage(stage)
    batches = []
    while len(batches) < reps + 2:  # the synthetic set may hold fewer batches than the steps timed
        batches += list(itertools.islice(parts.loader, reps + 2 - len(batches)))

    def step(i: int) -> None:
        trainer.update(parts, batches[i], stage, i + 1)

    first = timed(step, device, 1, warmup=0)[0]
    seconds = timed(lambda i: step(i + 1), device, reps, warmup=1)
    optimizer = getattr(parts.optimizer, "optimizer", parts.optimizer)  # accelerate's wrapper holds torch's
    base = next(p for p in trainer.model.unet.parameters() if not p.requires_grad)
    return {
        "times": seconds,
        "first_step": first,
        "peak_mib": peak_memory(device),
        "ranks": stage.depth,
        "unet_base_dtype": str(base.dtype).removeprefix("torch."),
        "compiled": trainer.model.unet._compiled_call_impl is not None,
        "fused": bool(optimizer.defaults.get("fused")),
    }


def measure_switches(root: Path, args, snapshot) -> dict:
    """Every set of switches at each stage asked, interleaved over rounds of fresh processes."""
    runs = defaultdict(list)
    for round_ in range(args.rounds):
        for stage in args.stages:
            for switch in SWITCHES:
                print(f"round {round_ + 1}/{args.rounds}, training step, {stage} stage: {switch}")
                job = (str(root), switch, stage, args.batch, args.reps, args.device, args.precision)
                runs[f"{switch}/{stage}"].append(in_process(switch_step_job, *job))
                snapshot({"switches": dict(runs)})
    return merged_switches(runs)


def merged_switches(runs: dict[str, list[dict]]) -> dict:
    """Each configuration's processes as one (`merged`), with the slowest first step."""
    return {key: merged(values) | {"first_step": max(r["first_step"] for r in values)} for key, values in runs.items()}


def switches_report(results: dict, spec: ModelSpec, argv: list[str]) -> str:
    """The training step with each switch alone, none and all: time, speed-up, MFU, peak memory, first step."""
    settings, switches = results["settings"], results["switches"]
    peak = results.get("peak_tflops")
    step_flops = flop_bounds(results["flops"]["sd15" if settings["sd15"] else "small"])["ours (latent cache)"]
    precision = "bf16 autocast" if settings["precision"] == "bf16" else "fp32"
    wanted = [f"{switch}/{stage}" for stage in settings["stages"] for switch in SWITCHES]
    rows, missing = [], [key for key in wanted if key not in switches]
    for stage in settings["stages"]:
        none = switches.get(f"none/{stage}")
        for switch in SWITCHES:
            entry = switches.get(f"{switch}/{stage}")
            if entry is None or none is None:
                continue
            rows.append(
                f"| {stage} ({entry['ranks']} rank{'s' if entry['ranks'] > 1 else ''}) | {switch} | "
                f"{1000 * entry['seconds']['median']:.0f} ms ({1000 * entry['seconds']['p25']:.0f}–"
                f"{1000 * entry['seconds']['p75']:.0f}) | {speedup(none, entry)} | "
                f"{utilisation(step_flops, settings['batch'], entry, peak)} | {entry['peak_mib']:.0f} | "
                f"{entry['first_step']:.1f} s | {entry['unet_base_dtype']}, "
                f"{'compiled' if entry['compiled'] else 'eager'}, {'fused' if entry['fused'] else 'default'} AdamW |"
            )
    cut = [f"Not measured (the run was cut short): {', '.join(missing)}.", ""] if missing else []
    return "\n".join(
        [
            "# The training step's switches",
            "",
            f"Command: `{' '.join(['python benchmarks/speed.py', *argv])}`.",
            f"Machine: {results['machine']}; {precision}.",
            f"Model: {spec.name} SD-format latent model at {spec.resolution} px, the UNet with LoRA r4; the "
            f"trainer's own step (`Trainer.update`: loss on the latent cache, backward, gradient clipping, AdamW) at "
            f"batch {settings['batch']}. Median of all repetitions ({settings['rounds']} fresh processes per "
            f"configuration, interleaved, {settings['reps']} timed steps each after 2 untimed), interquartile range "
            "in brackets.",
            "",
            "Switches (`train.*`): `frozen_in_low_precision` keeps the weights that never train (the UNet's base, "
            "the VAE) in the autocast precision instead of fp32 (no effect without mixed precision); `compile` "
            "compiles the UNet; `fused_optimizer` uses AdamW's fused kernel. `none` turns all three off. Speed-up: "
            "against `none`, in brackets the range within one round. MFU: achieved TFLOP/s (the step's "
            f"{step_flops:.0f} GFLOPs per sample, `speed.md`'s count) and its share of the device's dense peak"
            + (f" ({peak:g} TFLOP/s)." if peak else "; this device's peak is not known, so none is given.")
            + " First step: the slowest first step of a fresh process. A compiled UNet compiles there: from nothing "
            "in the first process to compile its graph, from torch's on-disk compile cache in the others (as a "
            "restarted run does). The last column reads what the step ran with.",
            "",
            "| stage | switches | step | speed-up | TFLOP/s (MFU) | peak MiB | first step | ran with |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            *cut,
        ]
    )


# -- 5. evaluation ------------------------------------------------------------------------------------------


def evaluation_job(root: str, taxa: int, device: str, precision: str = "no") -> dict:
    """`Evaluation.run` at the species rank on `taxa` species, 10 images each (the paper's protocol: FID Inception,
    KID and LPIPS-VGG at the model's resolution, a taxonomic classifier), on the device, as `evaluate` runs: the
    pipeline in fp32, or in bf16 as `evaluate --precision bf16` loads it.
    Timed twice: from nothing (generation, scoring, metrics), then with the images kept and the scores deleted
    (scoring and metrics): the difference is the generation."""
    import shutil

    from taxadiffusion.data.readers import read_folder
    from taxadiffusion.data.records import RecordSet
    from taxadiffusion.eval.classifier import TaxonClassifier
    from taxadiffusion.eval.protocol import Evaluation
    from taxadiffusion.eval.settings import EvalSettings

    trainer = trainer_for(Path(root), True)
    species = trainer.taxonomy.ranks[-1]
    chosen = {t.path for t in trainer.taxonomy.taxa(species)[:taxa]}
    every = read_folder(Path(root) / "data")
    records = RecordSet(every.ranks, [r for r in every if r.lineage.names in chosen])
    classifier = Path(root) / "classifier"
    TaxonClassifier(trainer.taxonomy.to_dict()).save_pretrained(classifier)  # random weights: a speed measurement
    settings = EvalSettings(ranks=(species,), classifier=str(classifier))
    pipe = trainer.pipeline().to(device)
    if precision == "bf16":  # the weights `evaluate --precision bf16` loads
        pipe.to(torch.bfloat16)
    out = Path(root) / "evaluation"
    shutil.rmtree(out, ignore_errors=True)
    seconds = {}
    for phase in ("everything", "scoring"):
        if phase == "scoring":
            shutil.rmtree(out / "scores")
        evaluation = Evaluation(records, out, settings, pipeline=pipe, device=device)
        seconds[phase] = timed(lambda i, run=evaluation.run: run(progress=False), device, 1, warmup=0)[0]
    images = sum(1 for _ in (out / "images").rglob("*.png"))
    real = sum(min(len(v), settings.max_real_per_taxon) for k, v in evaluation.real_by_path.items() if k in chosen)
    return {"seconds": seconds, "images": images, "real": real, "taxa": len(chosen), "peak_mib": peak_memory(device)}


# iNaturalist 2021's evaluation under the paper's protocol: 10 images per taxon at the order, family, genus and
# species (273 + 1,103 + 4,884 + 10,000 taxa).
INAT21_EVALUATION_IMAGES = 162_600


def evaluation_report(results: dict, spec: ModelSpec, argv: list[str]) -> str:
    e = results["evaluation"]
    everything, scoring = e["seconds"]["everything"], e["seconds"]["scoring"]
    generation = everything - scoring
    rate = e["images"] / everything
    bf16 = results["settings"]["precision"] == "bf16"
    return "\n".join(
        [
            "# The evaluation's speed",
            "",
            f"Command: `{' '.join(['python benchmarks/speed.py', *argv])}`.",
            f"Machine: {results['machine']}; "
            + ("the pipeline in bf16 (`evaluate --precision bf16`)." if bf16 else "fp32 (`evaluate`'s default)."),
            f"Model: {spec.name} SD-format latent model at {spec.resolution} px (TaxaDiffusionPipeline, PNDM "
            f"{PUBLISHED.steps} steps, two guidance branches, sampling batch 32). `Evaluation.run` at the species rank "
            f"on {e['taxa']} species, 10 generated images each ({e['images']} images, {e['real']} real): FID "
            f"Inception, KID and LPIPS-VGG at {spec.resolution} px (the authors' protocol resizes to 512 px), a "
            "taxonomic classifier (random weights). "
            "Timed once from nothing, then again with the images kept and the scores deleted; generation is the "
            "difference.",
            "",
            "| stage | seconds | generated images/s |",
            "|---|---|---|",
            f"| generation | {generation:.1f} | {e['images'] / generation:.2f} |",
            f"| scoring and metrics | {scoring:.1f} | {e['images'] / scoring:.2f} |",
            f"| the whole evaluation | {everything:.1f} | {rate:.2f} |",
            "",
            (
                f"At this rate iNaturalist 2021's evaluation ({INAT21_EVALUATION_IMAGES:,} images: 10 per taxon at the "
                f"order, family, genus and species) takes {INAT21_EVALUATION_IMAGES / rate / 3600:.1f} h on one such "
                "device; `accelerate launch` shares it across processes."
                if spec.name == SD15.name
                else "A small model: the stages' shares of the time, not a plan for a real one (`--sd15` on a GPU)."
            )
            + f" Peak memory {e['peak_mib']:.0f} MiB.",
            "",
        ]
    )


# -- driver ---------------------------------------------------------------------------------------------


def merged(rounds: list[dict]) -> dict:
    """One configuration's rounds (fresh processes) as one: every timed repetition, the highest peak."""
    times = [t for r in rounds for t in r["times"]]
    result = {**rounds[0], "times": times, "seconds": median_spread(times)}
    result["round_medians"] = [statistics.median(r["times"]) for r in rounds]
    result["peak_mib"] = max(r["peak_mib"] for r in rounds)
    if "batch" in result:
        result["images_per_s"] = result["batch"] / result["seconds"]["median"]
    return result


def in_process(fn, *args) -> dict:
    """Run one measurement in a fresh process, so that its peak memory is its own."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def prepare(root: Path, spec: str) -> dict[str, int]:
    """The model folder, the data (the synthetic taxonomy, ~8 images per species) and both runs'
    caches, built once before any timing."""
    from taxadiffusion.data.synthetic import SyntheticConfig, SyntheticTaxonomy

    (root / "spec.txt").write_text(spec)
    sizes = write_model(root / "sd", SPECS[spec])
    # Drawn at 128 px at most and resized by the data pipeline: timings do not depend on the pictures, and
    # drawing ~400 images at 512 px takes minutes.
    synthetic = SyntheticConfig(max_images=12, min_images=6, resolution=min(SPECS[spec].resolution, 128))
    SyntheticTaxonomy(synthetic).write_folder(root / "data", progress=False)
    for cached in (False, True):
        trainer_for(root, cached)
    return sizes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--part",
        choices=("steps", "optimizer", "switches", "evaluation"),
        default="steps",
        help="steps: our training step against the published one, sampling and the optimizer step (speed*.md); "
        "optimizer: the optimizer step alone, into --out's earlier steps results; switches: the trainer's step with "
        "each speed switch (speed_switches*.md); evaluation: `evaluate`'s images/s (speed_evaluation*.md)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8, help="training batch")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per process (after warm-up)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="fresh processes per configuration, interleaved (drifts between runs)"
    )
    parser.add_argument("--sample-batch", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=PUBLISHED.steps)
    parser.add_argument(
        "--precision",
        choices=("no", "bf16"),
        default="no",
        help="bf16 autocast (GPU timings); --part evaluation: the pipeline in bf16 (`evaluate --precision bf16`)",
    )
    parser.add_argument("--sd15", action="store_true", help="an SD 1.5-sized model at 512 px (for a GPU)")
    parser.add_argument(
        "--stages",
        type=lambda text: tuple(text.split(",")),
        default=("first", "last"),
        help="--part switches: the stages timed, comma-separated (first: the LoRA trains; last: every rank)",
    )
    parser.add_argument("--eval-taxa", type=int, default=16, help="--part evaluation: species evaluated")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--render", type=Path, metavar="JSON", help="only rewrite the report from a results file")
    parser.add_argument("--only-optimizer", action="store_true", help=argparse.SUPPRESS)  # older: --part optimizer
    args = parser.parse_args(argv)
    if args.only_optimizer:
        args.part = "optimizer"
    if args.render:  # the model, part and file name are the results' own, not this command's
        results = json.loads(args.render.read_text())
        if args.render.name.endswith(".partial.json") and "switches" in results:  # each process's raw result
            results["switches"] = merged_switches(results["switches"])
        settings = results["settings"]
        spec, part = "sd15" if settings["sd15"] else "small", settings.get("part", "steps")
        text = REPORTS[part](results, SPECS[spec], results["argv"])
        write_keeping_section(args.out / f"{report_name(spec, settings['precision'], part)}.md", text)
        return 0
    unknown = set(args.stages) - {"first", "last"}
    if unknown:
        parser.error(f"--stages: {', '.join(sorted(unknown))} is not first or last")
    spec = "sd15" if args.sd15 else "small"
    part = "steps" if args.part == "optimizer" else args.part
    name = report_name(spec, args.precision, part)
    if args.part == "optimizer":  # the rest of an earlier run's results kept
        results = json.loads((args.out / f"{name}.json").read_text())
        with tempfile.TemporaryDirectory() as tmp:
            prepare(Path(tmp), spec)
            results["optimizer"] = measure_optimizer(Path(tmp), args.rounds, args.reps, args.device)
        results["optimizer_argv"] = argv or sys.argv[1:]
        return write(results, args.out, name, spec, part)

    results = {"machine": machine(args.device), "settings": vars(args) | {"out": str(args.out)}}
    args.out.mkdir(parents=True, exist_ok=True)
    results["argv"] = argv or sys.argv[1:]

    def snapshot(measured: dict) -> None:
        """Every finished process's raw result so far, for a run cut short (a time-limited GPU lease)."""
        (args.out / f"{name}.partial.json").write_text(json.dumps(results | measured, indent=1) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print("preparing the model and data ...")
        results["parameters"] = prepare(root, spec)
        if part != "evaluation":  # the steps' FLOPs, for their utilisation (an evaluation reports images/s)
            results["flops"] = {key: flops_per_sample(SPECS[key]) for key in ("small", "sd15")}
            results["peak_tflops"] = peak_tflops(results["machine"], args.precision)
        if part == "switches":
            results["switches"] = measure_switches(root, args, snapshot)
        elif part == "evaluation":
            print(f"evaluating {args.eval_taxa} species ...")
            job = (str(root), args.eval_taxa, args.device, args.precision)
            results["evaluation"] = in_process(evaluation_job, *job)
        else:
            results |= measure_steps(root, args, snapshot)
    (args.out / f"{name}.partial.json").unlink(missing_ok=True)
    return write(results, args.out, name, spec, part)


def measure_steps(root: Path, args, snapshot) -> dict:
    """Our training step against the published one at both stages, both sampling pipelines and the optimizer step.
    Rounds interleave the configurations, so that a slow spell of the machine falls on all of them."""
    train, sample = defaultdict(list), defaultdict(list)
    job = (args.batch, args.reps, args.device, args.precision)
    for round_ in range(args.rounds):
        for stage in ("first", "last"):
            for kind in ("published", "ours", "ours+latents"):
                print(f"round {round_ + 1}/{args.rounds}, training step: {kind}, {stage} stage")
                train[f"{kind}/{stage}"].append(in_process(train_step_job, str(root), kind, stage, *job))
                snapshot({"train": dict(train), "sample": dict(sample)})
        for kind in ("diffusers", "ours"):
            print(f"round {round_ + 1}/{args.rounds}, sampling: {kind}")
            sample[kind].append(
                in_process(
                    sampling_job,
                    str(root),
                    kind,
                    args.sample_batch,
                    args.sample_steps,
                    max(3, args.reps // 2),
                    args.device,
                    args.precision,
                )
            )
            snapshot({"train": dict(train), "sample": dict(sample)})
    return {
        "train": {key: merged(rounds) for key, rounds in train.items()},
        "sample": {key: merged(rounds) for key, rounds in sample.items()},
        "optimizer": measure_optimizer(root, args.rounds, args.reps, args.device),
    }


def write(results: dict, out: Path, name: str, spec: str, part: str) -> int:
    (out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    text = REPORTS[part](results, SPECS[spec], results["argv"])
    write_keeping_section(out / f"{name}.md", text)
    print(text)
    return 0


def report_name(spec: str, precision: str, part: str = "steps") -> str:
    """speed[_switches|_evaluation][_sd15][_bf16]"""
    return (
        "speed"
        + ("" if part == "steps" else f"_{part}")
        + ("_sd15" if spec == "sd15" else "")
        + ("_bf16" if precision == "bf16" else "")
    )


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"


# Dense peak TFLOP/s of the GPUs this benchmark has run on, per precision (the vendors' data sheets). For fp32
# the TF32 tensor-core rate: PyTorch runs fp32 convolutions (most of a UNet's FLOPs) in TF32 by default
# (`torch.backends.cudnn.allow_tf32`). Model FLOP utilisation (MFU) = the FLOPs a step must compute / its time /
# this peak; a device not listed has none.
PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "no": 495.0},
    "H200": {"bf16": 989.0, "no": 495.0},
    "A100": {"bf16": 312.0, "no": 156.0},
}


def peak_tflops(machine_name: str, precision: str) -> float | None:
    """The dense peak of the GPU a results file names (`machine`) for the precision; None for CPUs and GPUs not
    in the table."""
    return next((peaks[precision] for gpu, peaks in PEAK_TFLOPS.items() if gpu in machine_name), None)


def utilisation(gflops_per_sample: float, batch: int, entry: dict, peak: float | None) -> str:
    """Achieved TFLOP/s of a timed step, and its share of the peak (MFU) where the peak is known."""
    achieved = gflops_per_sample * batch / entry["seconds"]["median"] / 1e3
    return f"{achieved:.2f}" + (f" ({100 * achieved / peak:.1f}%)" if peak else " (peak n/a)")


def speedup(reference: dict, ours: dict) -> str:
    """The ratio of the medians, and in brackets the range of the ratios within one round (configurations
    of a round run back to back, so a round's ratio is the least exposed to the machine's drifts)."""
    paired = [r / o for r, o in zip(reference["round_medians"], ours["round_medians"], strict=True)]
    overall = reference["seconds"]["median"] / ours["seconds"]["median"]
    return f"{overall:.2f}x ({min(paired):.2f}–{max(paired):.2f})"


def flop_bounds(parts: dict[str, float]) -> dict[str, float]:
    """GFLOPs of each step per sample and stage, from `flops_per_sample`: what a step must compute."""
    text, vae, encoder, encoder_forward, unet = (
        parts[k]
        for k in (
            "text encoder, all ranks",
            "VAE encoder",
            "rank encoder, forward + backward",
            "rank encoder, forward",
            "UNet, forward + backward",
        )
    )
    ours = encoder + unet  # the trained rank's encoder and the UNet; frozen ranks are looked up
    return {
        "published, first stage": text + vae + encoder + unet,
        "published, last stage": text + vae + (RANKS - 1) * encoder_forward + encoder + unet,
        "ours (latent cache)": ours,
        "ours, VAE every step": ours + vae,
    }


def report(results: dict, spec: ModelSpec, argv: list[str]) -> str:
    train, sample, sizes = results["train"], results["sample"], results["parameters"]

    def ms(entry):
        s = entry["seconds"]
        return f"{1000 * s['median']:.0f} ms ({1000 * s['p25']:.0f}–{1000 * s['p75']:.0f})"

    precision = "bf16 autocast" if results["settings"]["precision"] == "bf16" else "fp32"
    lines = [
        "# Speed and memory",
        "",
        f"Command: `{' '.join(['python benchmarks/speed.py', *argv])}`.",
        f"Machine: {results['machine']}; {precision}.",
        f"Model: {spec.name} SD-format latent model at {spec.resolution} px: CLIP text encoder "
        f"{spec.text['num_hidden_layers']} x {spec.text['hidden_size']} ({sizes['text_encoder'] / 1e6:.1f} M "
        f"parameters), UNet {spec.unet['block_out_channels']} ({sizes['unet'] / 1e6:.1f} M, LoRA r4), VAE encoder "
        f"{spec.vae['block_out_channels']} ({sizes['vae_encoder'] / 1e6:.1f} M, 8x downsampling); {RANKS} ranks "
        f"(the synthetic taxonomy), {TOKENS}-token texts, training batch "
        f"{results['settings']['batch']}, sampling batch {results['settings']['sample_batch']} with "
        f"{results['settings']['sample_steps']} PNDM steps. Median of all repetitions "
        f"({results['settings']['rounds']} fresh processes per configuration, interleaved, "
        f"{results['settings']['reps']} timed steps each after 2 warm-up), interquartile range in brackets.",
        "",
        "## Training step",
        "",
        "The latent cache is on by default for latent models (`train.cache_latents`); the next column turns it "
        "off. Speed-ups: the ratio of the medians, in brackets the lowest and highest ratio within one round.",
        "",
        "| stage | published | ours (default: latent cache) | ours, VAE every step | speed-up (default) "
        "| speed-up (VAE every step) | peak MiB published / ours / VAE every step |",
        "|---|---|---|---|---|---|---|",
    ]
    flops = results["flops"]
    bounds = {name: flop_bounds(parts) for name, parts in flops.items()}
    names = {"small": f"{SMALL.name}, {SMALL.resolution} px", "sd15": f"{SD15.name}, {SD15.resolution} px"}
    step_flops = bounds["sd15" if results["settings"]["sd15"] else "small"]
    peak = results.get("peak_tflops") or peak_tflops(results["machine"], results["settings"]["precision"])
    batch = results["settings"]["batch"]
    utilisation_rows = []
    for stage in ("first", "last"):
        p, c, o = (train[f"{k}/{stage}"] for k in ("published", "ours+latents", "ours"))
        lines.append(
            f"| {stage} ({p['ranks']} rank{'s' if p['ranks'] > 1 else ''}) | {ms(p)} | {ms(c)} | {ms(o)} | "
            f"{speedup(p, c)} | {speedup(p, o)} | "
            f"{p['peak_mib']:.0f} / {c['peak_mib']:.0f} / {o['peak_mib']:.0f} |"
        )
        work = (f"published, {stage} stage", "ours (latent cache)", "ours, VAE every step")
        cells = [utilisation(step_flops[w], batch, entry, peak) for w, entry in zip(work, (p, c, o), strict=True)]
        utilisation_rows.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Achieved TFLOP/s of each step (the FLOPs it must compute, from the table below, over its median time) and",
        "in brackets the model FLOP utilisation (MFU): its share of the device's dense peak for the precision"
        + (f" ({peak:g} TFLOP/s)." if peak else "; this device's peak is not known (CPU), so none is given."),
        "",
        "| stage | published | ours (default: latent cache) | ours, VAE every step |",
        "|---|---|---|---|",
        *utilisation_rows,
    ]
    lines += [
        "",
        "## Where the work is",
        "",
        "GFLOPs per training sample, counted by `torch.utils.flop_counter` on the meta device (shapes only), for "
        "this benchmark's small model and for SD 1.5 at 512 px. A step that removes every redundant part still "
        "runs the UNet's forward and backward, so published / ours in FLOPs bounds the speed-up at equal "
        "precision and efficiency.",
        "",
        "| part | " + " | ".join(names.values()) + " |",
        "|---|" + "---|" * len(names),
        *[f"| {part} | " + " | ".join(f"{flops[n][part]:.2f}" for n in names) + " |" for part in flops["small"]],
        *[
            f"| step: {step} | " + " | ".join(f"{bounds[n][step]:.2f}" for n in names) + " |"
            for step in bounds["small"]
        ],
        *[
            f"| bound, {stage} stage, {label} | "
            + " | ".join(f"{bounds[n][f'published, {stage} stage'] / bounds[n][ours]:.2f}x" for n in names)
            + " |"
            for stage in ("first", "last")
            for label, ours in (("latent cache", "ours (latent cache)"), ("VAE every step", "ours, VAE every step"))
        ],
    ]
    d, o = sample["diffusers"], sample["ours"]
    lines += [
        "",
        "## Sampling (PNDM, two guidance branches)",
        "",
        "| pipeline | time per batch | images/s | peak MiB |",
        "|---|---|---|---|",
        f"| diffusers StableDiffusionPipeline | {ms(d)} | {d['images_per_s']:.2f} | {d['peak_mib']:.0f} |",
        f"| TaxaDiffusionPipeline | {ms(o)} | {o['images_per_s']:.2f} | {o['peak_mib']:.0f} |",
        "",
        f"Ours / diffusers: {speedup(d, o)} images/s (in brackets: the range over rounds).",
        "",
    ]
    if "optimizer" in results:
        lines += optimizer_section(results["optimizer"], results.get("optimizer_argv"), ms)
    return "\n".join(lines)


def optimizer_section(optimizer: dict, argv: list[str] | None, ms) -> list[str]:
    """AdamW's step, default against fused kernel (`train.fused_optimizer`)."""
    rows = []
    for trains, label in OPTIMIZED.items():
        default, fused = optimizer[f"default/{trains}"], optimizer[f"fused/{trains}"]
        rows.append(
            f"| {label} | {default['parameters'] / 1e6:.2f} M | {ms(default)} | {ms(fused)} | "
            f"{speedup(default, fused)} |"
        )
    command = f" (measured by `python benchmarks/speed.py {' '.join(argv)}`)" if argv else ""
    return [
        "## Optimizer step (AdamW)",
        "",
        f"One AdamW step over the parameters a stage trains, with random gradients{command}: torch's default "
        "kernel against the fused one (`train.fused_optimizer`, on by default), which takes the same steps up to "
        "rounding.",
        "",
        "| trains | parameters | default | fused | speed-up |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]


REPORTS = {"steps": report, "switches": switches_report, "evaluation": evaluation_report}  # by --part


if __name__ == "__main__":
    sys.exit(main())
