"""Speed and memory: our training step against the published one, and our sampling against diffusers'.

    python benchmarks/speed.py                # CPU: a small latent model, several repetitions
    python benchmarks/speed.py --device cuda  # on a GPU (adds the SD-1.5-sized UNet rows with --sd15)

One small Stable-Diffusion-format model (CLIP text encoder with 77 tokens, VAE with an 8x downsampling,
UNet with LoRA) is written to a temporary folder and used by every measurement:

1. A training step of ours (`Trainer._loss` on cached text features and frozen-rank tables; with and without
   the VAE-latent cache) against the published step, re-created faithfully: the text encoder runs for every
   rank of every sample at every step, the VAE encodes every batch, every rank encoder up to the stage runs,
   then the UNet forward and backward. Measured at the first stage (one rank) and the last (all ranks).
2. Sampling images/s of `TaxaDiffusionPipeline` against diffusers' `StableDiffusionPipeline` with the same
   UNet, VAE, scheduler (PNDM), steps and batch, both with two guidance branches.
3. Peak memory of each (max RSS of a fresh process on CPU; `max_memory_allocated` on CUDA).

Each measurement runs in its own process; results (median and spread of the repetitions) go to
benchmarks/results/speed.md and speed.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from taxadiffusion.eval.report import write_keeping_section

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO / "tests"))  # the tiny CLIP tokenizer writer

# A latent model scaled down from SD 1.5 with its proportions roughly kept: the text encoder a few times
# smaller than the UNet, a VAE with an 8x downsampling, 77-token prompts.
TEXT = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4)
UNET = dict(block_out_channels=(128, 256, 256), layers_per_block=1, attention_head_dim=8)
VAE = dict(block_out_channels=(32, 64, 128, 128))
RESOLUTION = 128  # latents 16 x 16 x 4


def write_model(root: Path) -> dict[str, int]:
    """The small SD-format folder (unet, vae, text_encoder, tokenizer, scheduler); returns parameter counts."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tiny_models import write_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = write_clip_tokenizer(root / "tokenizer", max_length=77)
    vocab = len(tokenizer)
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab,
            max_position_embeddings=77,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
            **TEXT,
        )
    )
    text.save_pretrained(root / "text_encoder")
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT["hidden_size"],
        **UNET,
    )
    unet.save_pretrained(root / "unet")
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=RESOLUTION,
        **VAE,
    )
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


def trainer_for(root: Path, cache_latents: bool):
    """A trainer over the prepared data; the benchmark draws its own batches (any size) from its dataset."""
    from taxadiffusion.config import Config
    from taxadiffusion.train.trainer import Trainer

    config = Config.from_dict(
        {
            "model": {"base": str(root / "sd"), "resolution": RESOLUTION, "encoder_heads": 4},
            "text": {"encoder": "base", "max_length": 77},
            "data": {"format": "folder", "path": str(root / "data"), "crop": "squash"},
            "train": {"batch_size": 4, "cache_latents": cache_latents, "steps": 1},
        }
    )
    return Trainer(config, root / ("run-cached" if cache_latents else "run"), progress=False)


def median_spread(seconds: list[float]) -> dict:
    q = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else [seconds[0]] * 3
    return {"median": statistics.median(seconds), "p25": q[0], "p75": q[2], "n": len(seconds)}


def peak_memory(device: str) -> float:
    """MiB: CUDA's peak allocation, or this process's max RSS."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- 1. training steps ---------------------------------------------------------------------------------


def train_step_job(root: str, kind: str, stage_index: str, batch: int, reps: int, device: str) -> dict:
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
        return trainer._loss(model, on_device, stage, tables)

    step_loss = published if kind == "published" else ours
    seconds = []
    for i, batch_data in enumerate(batches):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = step_loss(batch_data)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= 2:  # two warm-up steps
            seconds.append(time.perf_counter() - start)
    return {"seconds": median_spread(seconds), "peak_mib": peak_memory(device), "ranks": stage.depth}


# -- 2. sampling ----------------------------------------------------------------------------------------


def sampling_job(root: str, kind: str, batch: int, steps: int, reps: int, device: str) -> dict:
    from diffusers import StableDiffusionPipeline

    trainer = trainer_for(Path(root), False)
    if kind == "ours":
        pipe = trainer.pipeline().to(device)
        lineage = trainer.taxonomy.lineage(trainer.taxonomy.leaves()[0])

        def run(generator):
            return pipe([lineage] * batch, num_inference_steps=steps, guidance_scale=9.0, generator=generator)

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
                guidance_scale=9.0,
                generator=generator,
                height=RESOLUTION,
                width=RESOLUTION,
            )

    seconds = []
    with torch.no_grad():
        for i in range(reps + 1):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            run(torch.Generator().manual_seed(i))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i >= 1:
                seconds.append(time.perf_counter() - start)
    stats = median_spread(seconds)
    return {"seconds": stats, "images_per_s": batch / stats["median"], "peak_mib": peak_memory(device)}


# -- driver ---------------------------------------------------------------------------------------------


def in_process(fn, *args) -> dict:
    """Run one measurement in a fresh process, so that its peak memory is its own."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def prepare(root: Path) -> dict[str, int]:
    """The model folder, the data (the synthetic taxonomy, ~8 images per species) and both runs'
    caches, built once before any timing."""
    from taxadiffusion.data.synthetic import SyntheticConfig, SyntheticTaxonomy

    sizes = write_model(root / "sd")
    synthetic = SyntheticConfig(max_images=12, min_images=6, resolution=RESOLUTION)
    SyntheticTaxonomy(synthetic).write_folder(root / "data", progress=False)
    for cached in (False, True):
        trainer_for(root, cached)
    return sizes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8, help="training batch")
    parser.add_argument("--reps", type=int, default=8, help="timed repetitions (after warm-up)")
    parser.add_argument("--sample-batch", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    results = {"machine": machine(args.device), "settings": vars(args) | {"out": str(args.out)}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print("preparing the model and data ...")
        results["parameters"] = prepare(root)
        results["train"] = {}
        for stage in ("first", "last"):
            for kind in ("published", "ours", "ours+latents"):
                print(f"training step: {kind}, {stage} stage")
                result = in_process(train_step_job, str(root), kind, stage, args.batch, args.reps, args.device)
                results["train"][f"{kind}/{stage}"] = result
        results["sample"] = {}
        for kind in ("diffusers", "ours"):
            print(f"sampling: {kind}")
            results["sample"][kind] = in_process(
                sampling_job, str(root), kind, args.sample_batch, args.sample_steps, max(3, args.reps // 2), args.device
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps(results, indent=1) + "\n")
    text = report(results, argv or sys.argv[1:])
    write_keeping_section(args.out / "speed.md", text)
    print(text)
    return 0


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"


def speedup(reference: dict, ours: dict) -> float:
    return reference["seconds"]["median"] / ours["seconds"]["median"]


def report(results: dict, argv: list[str]) -> str:
    train, sample, sizes = results["train"], results["sample"], results["parameters"]

    def ms(entry):
        s = entry["seconds"]
        return f"{1000 * s['median']:.0f} ms ({1000 * s['p25']:.0f}–{1000 * s['p75']:.0f})"

    lines = [
        "# Speed and memory",
        "",
        f"Command: `{' '.join(['python benchmarks/speed.py', *argv])}`.",
        f"Machine: {results['machine']}.",
        f"Model: a small SD-format latent model at {RESOLUTION} px: CLIP text encoder "
        f"{TEXT['num_hidden_layers']} x {TEXT['hidden_size']} ({sizes['text_encoder'] / 1e6:.1f} M parameters), "
        f"UNet {UNET['block_out_channels']} ({sizes['unet'] / 1e6:.1f} M, LoRA r4), VAE encoder "
        f"{VAE['block_out_channels']} ({sizes['vae_encoder'] / 1e6:.1f} M, 8x downsampling); 7 ranks (the "
        "synthetic taxonomy), 77-token texts, training batch "
        f"{results['settings']['batch']}, sampling batch {results['settings']['sample_batch']} with "
        f"{results['settings']['sample_steps']} PNDM steps. Median of the repetitions, interquartile range "
        "in brackets.",
        "",
        "## Training step",
        "",
        "| stage | published | ours | ours + latent cache | speed-up (ours) | speed-up (+ cache) "
        "| peak MiB published / ours / + cache |",
        "|---|---|---|---|---|---|---|",
    ]
    for stage in ("first", "last"):
        p, o, c = (train[f"{k}/{stage}"] for k in ("published", "ours", "ours+latents"))
        lines.append(
            f"| {stage} ({p['ranks']} rank{'s' if p['ranks'] > 1 else ''}) | {ms(p)} | {ms(o)} | {ms(c)} | "
            f"{speedup(p, o):.2f}x | {speedup(p, c):.2f}x | "
            f"{p['peak_mib']:.0f} / {o['peak_mib']:.0f} / {c['peak_mib']:.0f} |"
        )
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
        f"Ours / diffusers: {o['images_per_s'] / d['images_per_s']:.3f}x images/s.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
