"""Sampling speed against quality: images/s, species accuracy and KID for samplers, step counts and guidance
windows on one trained model, beside diffusers' `StableDiffusionPipeline`.

    make demo   # or any trained run with its oracle/taxonomic classifier
    python benchmarks/sampling.py --model runs/demo/pipeline --data folder runs/demo/data \
        --classifier runs/demo/classifier --scale 3

Every setting generates the same images (the same seeds, the same taxa) and is scored by the evaluation protocol
at the species rank: top-1 accuracy of the classifier (the rate at which samples are recognised as the species
they were conditioned on) and KID with its subset standard deviation. Speed is images/s of a fixed batch,
all settings and diffusers' pipeline timed in one process, interleaved over rounds, with the same UNet and the
same conditioning (diffusers receives c_k and the negative as prompt embeddings; PNDM with CFG on every step, at
the published 25 steps, the reference of the speed-ups, and at its own default of 50). The fastest setting whose
species accuracy is at most 1 point below the published setting's and whose KID is at most the published setting's
KID standard deviation above it is the `fast` preset (`--fast`).
Results: benchmarks/results/<name>.md and <name>.json (`--name`, default sampling: the demo model's; one name per
model). Resumable: each setting's evaluation is kept, under --work/<name>.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from taxadiffusion.data.readers import read_records
from taxadiffusion.eval.fid import InceptionFeatures
from taxadiffusion.eval.protocol import EvalSettings, Evaluation
from taxadiffusion.eval.report import markdown_table, write_keeping_section
from taxadiffusion.names import name_slug
from taxadiffusion.pipeline import TaxaDiffusionPipeline
from taxadiffusion.sampling import FAST, SamplingSettings

from common import REPO, RESULTS

# The settings compared, as changes of the model's own (published: PNDM 25, guidance on every step).
SETTINGS: dict[str, dict] = {
    "published: PNDM 25": {},
    "DDIM 25": {"scheduler": "ddim", "steps": 25},
    "DDIM 15": {"scheduler": "ddim", "steps": 15},
    "DPM-Solver++ 20": {"scheduler": "dpm", "steps": 20},
    "DPM-Solver++ 15": {"scheduler": "dpm", "steps": 15},
    "DPM-Solver++ 10": {"scheduler": "dpm", "steps": 10},
    "DPM-Solver++ 8": {"scheduler": "dpm", "steps": 8},
    "PNDM 25, guidance in the first 60%": {"window": (0.0, 0.6)},
    "DPM-Solver++ 10, guidance in the first 60%": {"scheduler": "dpm", "steps": 10, "window": (0.0, 0.6)},
    # trailing spacing: the first step at the last training timestep (see `Spacing`)
    "DPM-Solver++ 15, trailing": {"scheduler": "dpm", "steps": 15, "spacing": "trailing"},
    "DPM-Solver++ 10, trailing": {"scheduler": "dpm", "steps": 10, "spacing": "trailing"},
    "DPM-Solver++ 8, trailing": {"scheduler": "dpm", "steps": 8, "spacing": "trailing"},
    "DDIM 15, trailing": {"scheduler": "ddim", "steps": 15, "spacing": "trailing"},
}


def kept_folder(work: Path, name: str) -> Path:
    """Where a setting's evaluation is kept: named after the setting, so that adding or reordering settings
    never pairs one setting's kept images with another's name."""
    return work / name_slug(name)


def fast_row() -> str | None:
    """The measured setting that the `fast` preset is."""
    return next((name for name, changes in SETTINGS.items() if changes == FAST), None)


# diffusers' StableDiffusionPipeline, timed beside ours: at the published 25 steps (the reference of the speed-ups)
# and at its own default of 50.
PUBLISHED_STEPS = SamplingSettings().steps
DIFFUSERS = {"diffusers, PNDM 25": PUBLISHED_STEPS, "diffusers default, PNDM 50": None}


def time_ours(pipe, lineages, changes: dict, generators) -> float:
    """Seconds for one batch with the pipeline at `changes`."""
    pipe.configure_sampling(**changes)
    start = time.perf_counter()
    pipe(lineages, generator=generators(), output_type="latent")
    return time.perf_counter() - start


def diffusers_pipeline(pipe):
    """diffusers' StableDiffusionPipeline around the same UNet and the same PNDM schedule."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    sd = StableDiffusionPipeline(
        vae=None,
        text_encoder=None,
        tokenizer=None,
        unet=pipe.unet,
        scheduler=PNDMScheduler.from_config(pipe.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd.set_progress_bar_config(disable=True)
    return sd


def time_diffusers(sd, pipe, lineages, generators, scale: float, steps: int | None) -> float:
    """Seconds for one batch of diffusers' sampling with PNDM and CFG at `scale` on every step, at `steps` (None:
    its default, 50), given our c_k and c_0 as prompt embeddings (diffusers' own text encoding is not what is
    compared)."""
    from taxadiffusion.guidance import Guidance

    condition, negative = pipe.encode(lineages, Guidance.TAXONOMIC, 1)
    side = pipe.unet.config.sample_size
    start = time.perf_counter()
    sd(
        prompt_embeds=condition,
        negative_prompt_embeds=negative,
        guidance_scale=scale,
        height=side * sd.vae_scale_factor,
        width=side * sd.vae_scale_factor,
        generator=generators(),
        output_type="latent",
        **({} if steps is None else {"num_inference_steps": steps}),
    )
    return time.perf_counter() - start


def measure_speed(model: Path, scale: float, batch: int, rounds: int) -> dict[str, dict]:
    pipe = TaxaDiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    pipe.configure_sampling(scale=scale)
    saved = pipe.sampling
    species = pipe.taxonomy.leaves()
    lineages = [pipe.taxonomy.lineage(species[i % len(species)]) for i in range(batch)]

    def generators():
        return [torch.Generator().manual_seed(i) for i in range(batch)]

    sd = diffusers_pipeline(pipe)
    seconds: dict[str, list[float]] = {name: [] for name in [*DIFFUSERS, *SETTINGS]}
    with torch.no_grad():
        time_ours(pipe, lineages, {}, generators)  # warm-up, both pipelines
        time_diffusers(sd, pipe, lineages, generators, scale, PUBLISHED_STEPS)
        for _ in range(rounds):
            for name, steps in DIFFUSERS.items():
                seconds[name].append(time_diffusers(sd, pipe, lineages, generators, scale, steps))
            for name, changes in SETTINGS.items():
                pipe.sampling = saved
                seconds[name].append(time_ours(pipe, lineages, {"scale": scale, **changes}, generators))
    return {
        name: {"seconds": values, "images_per_s": batch / statistics.median(values)} for name, values in seconds.items()
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--data", nargs=2, metavar=("FORMAT", "PATH"))
    parser.add_argument("--classifier", type=Path)
    parser.add_argument("--scale", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--per-taxon", type=int, default=10)
    parser.add_argument("--max-real", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16, help="the timed batch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "sampling-benchmark", help="kept work, per --name")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="sampling", help="the results' file stem in --out (one per model)")
    parser.add_argument(
        "--regenerate", action="store_true", help="replace kept images made by another model or other settings"
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        metavar="NAME",
        help="score only these settings (names as in the table); the others' quality is kept from --out's results",
    )
    parser.add_argument("--speed-only", action="store_true", help="keep --out's quality results, time again")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only rewrite the report from a results file")
    args = parser.parse_args(argv)
    if args.render:
        args.out.mkdir(parents=True, exist_ok=True)
        write_keeping_section(args.out / f"{args.name}.md", report(json.loads(args.render.read_text())))
        return 0
    if args.speed_only:  # the quality of an earlier run kept, the speed measured again
        results = json.loads((args.out / f"{args.name}.json").read_text())
        results["speed"] = measure_speed(args.model, results["scale"], args.batch, args.rounds)
        results["commands"] = with_command(results, argv or sys.argv[1:])
        return write(results, args.out, args.name)
    if not (args.model and args.data and args.classifier):
        parser.error("--model, --data and --classifier are required (or --render JSON)")

    pipe = TaxaDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    saved = pipe.sampling
    scale = args.scale if args.scale is not None else saved.scale
    real = read_records(args.data[0], args.data[1])
    features = InceptionFeatures()  # shared: each real image is featurised once for every setting
    chosen = args.settings or list(SETTINGS)
    unknown = sorted(set(chosen) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown setting(s) {unknown}; the settings: {list(SETTINGS)}")
    earlier = args.out / f"{args.name}.json"
    before = json.loads(earlier.read_text()) if args.settings and earlier.is_file() else {}
    quality = before.get("quality", {})
    for i, name in enumerate(chosen):
        changes = SETTINGS[name]
        print(f"[{i + 1}/{len(chosen)}] quality: {name}")
        settings = EvalSettings(
            ranks=("specific_epithet",),
            per_taxon=args.per_taxon,
            max_real_per_taxon=args.max_real,
            classifier=str(args.classifier),
            rare_threshold=0,
            sampling=saved.replace(scale=scale, **changes),
        )
        kept = kept_folder(args.work / args.name, name)
        evaluation = Evaluation(real, kept, settings, pipeline=pipe, regenerate=args.regenerate)
        metrics = evaluation.run(False, features)
        scores = metrics["ranks"]["specific_epithet"]["all"]
        quality[name] = {
            "accuracy": 100 * scores["accuracy"]["specific_epithet"],
            "kid": scores["kid"],
            "kid_std": scores["kid_std"],
            "images": scores["n_fake"],
        }
    print("speed ...")
    speed = measure_speed(args.model, scale, args.batch, args.rounds)
    quality = {name: quality[name] for name in SETTINGS if name in quality}  # the table's order
    commands = with_command(before, argv or sys.argv[1:])
    results = {"commands": commands, "scale": scale, "quality": quality, "speed": speed}
    return write(results, args.out, args.name)


def commands_of(results: dict) -> list[list[str]]:
    """Every invocation that made a part of `results` (rows scored with --settings, speed timed again with
    --speed-only), oldest first. Older files recorded the last invocation alone, as `argv`."""
    return results.get("commands") or ([results["argv"]] if "argv" in results else [])


def with_command(results: dict, argv: list[str]) -> list[list[str]]:
    return [c for c in commands_of(results) if c != argv] + [argv]


def write(results: dict, out: Path, name: str) -> int:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    text = report(results)
    write_keeping_section(out / f"{name}.md", text)
    print(text)
    return 0


def equal_quality(row: dict, reference: dict) -> bool:
    """Species accuracy at most 1 point below the reference's and KID at most its standard deviation above (a
    setting that does better is of equal quality too)."""
    return row["accuracy"] >= reference["accuracy"] - 1.0 and row["kid"] <= reference["kid"] + reference["kid_std"]


def report(results: dict) -> str:
    quality, speed = results["quality"], results["speed"]
    reference = quality["published: PNDM 25"]
    base = speed["diffusers, PNDM 25"]["images_per_s"]
    rows = [["setting", "images/s", "x diffusers at 25 steps", "species accuracy (%)", "KID (std)", "equal quality"]]
    for name in DIFFUSERS:
        rate = speed[name]["images_per_s"]
        rows.append([f"{name} (StableDiffusionPipeline, CFG)", f"{rate:.2f}", f"{rate / base:.2f}x", "-", "-", "-"])
    for name, q in quality.items():
        if name not in SETTINGS:  # a row of an earlier version of this benchmark
            continue
        rate = speed[name]["images_per_s"]
        same = "reference" if q is reference else ("yes" if equal_quality(q, reference) else "no")
        rows.append(
            [
                name,
                f"{rate:.2f}",
                f"{rate / base:.2f}x",
                f"{q['accuracy']:.1f}",
                f"{q['kid']:.4f} ({q['kid_std']:.4f})",
                same,
            ]
        )
    fast_name = fast_row()
    fast = quality[fast_name]
    lines = [
        "# Sampling: speed at equal quality",
        "",
        "Commands (in order; a later one rescored the rows it names or timed again): "
        + "; ".join(f"`python benchmarks/sampling.py {' '.join(c)}`" for c in commands_of(results))
        + f". Guidance scale {results['scale']:g}.",
        "",
        "Each setting generates the same taxa from the same seeds; quality at the species rank (the classifier's "
        "top-1 accuracy on the generated images, KID with its standard deviation over 20 subsets). Speed: images/s "
        "of one batch, every row timed in one process, interleaved over rounds (median). Equal quality: species "
        "accuracy at most 1 point below the published setting's and KID at most its standard deviation above. "
        "Both guidance "
        "branches run as one batched UNet call (as diffusers' pipeline does); outside a guidance window one "
        "branch runs.",
        "",
        markdown_table(rows),
        "",
        f"The `fast` preset ({', '.join(f'{k} {v}' for k, v in FAST.items())}; `--fast` on `sample`, `evaluate`, "
        f"`generate`; the row '{fast_name}'): {speed[fast_name]['images_per_s'] / base:.2f}x the images/s of "
        "diffusers' pipeline at the published 25 steps, "
        f"{speed[fast_name]['images_per_s'] / speed['diffusers default, PNDM 50']['images_per_s']:.2f}x at its "
        "default 50; species "
        f"accuracy {fast['accuracy']:.1f}% against {reference['accuracy']:.1f}%, KID {fast['kid']:.4f} against "
        f"{reference['kid']:.4f} ({'equal quality' if equal_quality(fast, reference) else 'NOT equal quality'}).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
