"""Quality on real fish photos (Fish4Knowledge): the paper's training strategies and guidance, per rank.

    python benchmarks/quality.py            # the full benchmark on 2 CPU cores; run again to resume
    python benchmarks/quality.py --quick    # a smoke check of every step in a few minutes
    python benchmarks/quality.py --investigate --sweep 1.5 6   # and the runs that look for why (below)

Same model, data and total steps for every run: `flat` (the species name as one text: the SD + LoRA-style
baseline), `all`, `random` and `progressive` (configs/f4k.yaml). Each is evaluated with the evaluation
protocol (FID/KID with the TF-Inception weights, LPIPS, per-rank accuracy from a classifier trained on
the training split, rare vs common taxa) on a fixed, stratified 20% of the folder that no run trains on:
with taxonomic guidance, and the progressive run also with vanilla CFG. `flat` knows species names only,
so an image of a higher taxon is an image of one of its species (round robin), with vanilla CFG (its
taxonomic guidance would contrast the species with itself).

Writes benchmarks/results/quality_f4k_scratch.md (tables, plots, sample sheets, command); a `## Reading` section
already in that file is kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from taxadiffusion.config import Config
from taxadiffusion.data.readers import read_table
from taxadiffusion.eval.protocol import EvalSettings, Evaluation
from taxadiffusion.eval.report import (
    load_runs,
    write_keeping_section,
    write_report,
)
from taxadiffusion.guidance import Guidance
from taxadiffusion.sampling import SamplingSettings
from taxadiffusion.taxonomy import PAPER_RANKS

from common import (
    REPO,
    RESULTS,
    dataset_path,
    result_tables,
    run_tables,
    save_sheet,
    train_classifier,
    train_or_find,
    warn_if_package_elsewhere,
    write_split,
)

PRESET = REPO / "configs" / "f4k.yaml"
SECONDS_PER_STEP = 0.85  # measured on the reference machine (2 cores), for the first ETA only

# (evaluation name, trained run, guidance)
EVALUATIONS = (
    ("flat", "flat", Guidance.VANILLA),
    ("all", "all", Guidance.TAXONOMIC),
    ("random", "random", Guidance.TAXONOMIC),
    ("progressive", "progressive", Guidance.TAXONOMIC),
    ("progressive-vanilla", "progressive", Guidance.VANILLA),
)
STRATEGIES = ("flat", "all", "random", "progressive")

# `--investigate`: progressive runs that each change one suspected cause of its gap to `flat`, at the same
# total steps, then the best of them and `flat` both at twice the steps (is the gap one of training budget?);
# evaluated like the main rows. (name, what changes, overrides on the preset)
FINE_STEPS = "train.steps=[100,5,5,90,150,200,250]"  # kingdom..class hold one taxon each in F4K
DOUBLE_STEPS = "train.steps=[200,10,10,180,300,400,500]"  # one-stage strategies train the sum: 1600
PROGRESSIVE = "train.strategy=progressive"
VARIANTS = (
    ("progressive-fine", "steps weighted to order .. species", [PROGRESSIVE, FINE_STEPS]),
    (
        "progressive-fine-c0",
        "fine steps, and rank 0 alone on 10% of samples (keeps the taxonomic negative c_0 trained)",
        [PROGRESSIVE, FINE_STEPS, "train.coarse_dropout=0.1"],
    ),
    (
        "progressive-fine-c0-nodrop",
        "as `progressive-fine-c0`, without condition dropout (taxonomic CFG never samples a dropped rank's "
        "`None` text; at stage k dropout puts it in (k+1)/21 of samples)",
        [PROGRESSIVE, FINE_STEPS, "train.coarse_dropout=0.1", "train.condition_dropout=0"],
    ),
    (
        "progressive-fine-c0-decay",
        "as above, and the UNet's rate halved from the genus stage on (less erosion of earlier ranks)",
        [
            PROGRESSIVE,
            FINE_STEPS,
            "train.coarse_dropout=0.1",
            "train.stage_learning_rates=[1e-3,1e-3,1e-3,1e-3,1e-3,5e-4,5e-4]",
        ],
    ),
    (
        "progressive-fine-c0-x2",
        "fine steps and c_0 replay at twice the steps (1600)",
        [PROGRESSIVE, DOUBLE_STEPS, "train.coarse_dropout=0.1"],
    ),
    (
        "flat-x2",
        "`flat` at twice the steps (1600, vanilla CFG): the equal-budget baseline of the row above",
        ["train.strategy=flat", DOUBLE_STEPS],
    ),
)
SWEPT = ("flat", "progressive", "progressive-fine-c0")  # each with its strategy's guidance (`guidance_of`)
WINDOWS = ((0.0, 0.5), (0.5, 1.0))  # `--investigate`: guidance only in the noisier / the cleaner half


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps and images: checks the pipeline only")
    parser.add_argument("--out", type=Path, help="work folder (default benchmarks/runs/quality[-quick])")
    parser.add_argument("--data", type=Path, help="the Fish4Knowledge folder (default: fish4knowledge/ under the root)")
    parser.add_argument(
        "--data-root", type=Path, help="the folder holding the benchmark datasets (default: $TAXADIFFUSION_DATA)"
    )
    parser.add_argument("--scale", type=float, default=3.0, help="guidance scale at evaluation")
    parser.add_argument("--per-taxon", type=int, default=10, help="generated images per taxon")
    parser.add_argument("--holdout", type=float, default=0.2, help="fraction of each class held out")
    parser.add_argument(
        "--sweep",
        type=float,
        nargs="*",
        default=(),
        metavar="SCALE",
        help="also evaluate flat and progressive (and a variant) at these guidance scales (species rank only)",
    )
    parser.add_argument(
        "--investigate",
        action="store_true",
        help="also train and evaluate the progressive variants and guidance windows that look for its gap to flat",
    )
    args = parser.parse_args(argv)
    args.data = args.data or dataset_path("fish4knowledge", args.data_root)
    return args


# -- data ---------------------------------------------------------------------------------------------


# -- steps of the benchmark ------------------------------------------------------------------------------


def train_run(train_csv: Path, out: Path, overrides: list[str], steps: int) -> tuple[Path, float]:
    """One run of the preset (`steps` in all); returns the pipeline and its training time in seconds."""
    config = Config.load(PRESET, ["data.format=csv", f"data.path={train_csv}", *overrides])
    pipeline, timing, _ = train_or_find(config, out, steps=steps)
    return pipeline, timing["seconds"]


def settings(
    args, classifier: Path, guidance: str, quick: bool, scale: float | None = None, window=(0.0, 1.0), species=False
) -> EvalSettings:
    return EvalSettings(
        ranks=("specific_epithet",) if quick or species else tuple(rank.value for rank in PAPER_RANKS),
        per_taxon=args.per_taxon,
        max_real_per_taxon=8 if quick else 50,
        resolution=32,
        sampling=SamplingSettings(guidance=guidance, scale=args.scale if scale is None else scale, window=window),
        rare_threshold=50,
        classifier=str(classifier),
        lpips_net="vgg",
    )


def evaluate_model(pipeline_dir: Path, heldout: Path, out: Path, s: EvalSettings, features) -> None:
    from taxadiffusion.pipeline import TaxaDiffusionPipeline

    if (out / "metrics.json").is_file():
        return
    pipe = TaxaDiffusionPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    Evaluation(read_table(heldout), out, s, pipeline=pipe).run(features=features)


def evaluate_flat(pipeline_dir: Path, train_csv: Path, heldout: Path, out: Path, s: EvalSettings, features) -> None:
    """The species-only model at every rank: a taxon above species is drawn through its species in turn."""
    from taxadiffusion.pipeline import TaxaDiffusionPipeline

    if (out / "metrics.json").is_file():
        return
    pipe = TaxaDiffusionPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    full = read_table(train_csv).taxonomy()
    Evaluation(
        read_table(heldout), out, s, pipeline=pipe, taxonomy=full, one_text=lambda lineage: lineage.scientific_name
    ).run(features=features)


# -- report -------------------------------------------------------------------------------------------


def section(title: str, evals: list[Path], lead: list[str] = (), split: bool = False) -> list[str]:
    """A titled table of evaluations, and optionally their rare/common split (nothing when there are none)."""
    if not evals:
        return []
    return [f"## {title}", "", *lead, *run_tables(load_runs(evals), "< 50 training images" if split else None)]


def write_results(
    out: Path,
    evals: list[Path],
    extra: dict[str, list[Path]],
    timings: dict,
    classifier: Path,
    quick: bool,
    argv: list[str],
) -> Path:
    runs = load_runs(evals)
    scale = json.loads((evals[0] / "metrics.json").read_text())["settings"]["scale"]
    name = "quality_f4k_scratch_quick" if quick else "quality_f4k_scratch"
    assets = (out if quick else RESULTS) / name
    write_report(assets, runs, title="Fish4Knowledge: training strategies and guidance")
    for path in evals:
        for grid in (path / "grids").glob("*.png"):
            save_sheet(grid, assets / f"samples_{path.name}_{grid.stem}.jpg")
    target = (out if quick else RESULTS) / f"{name}.md"
    plots = [p for p in sorted(assets.glob("*.png")) if not p.name.startswith("samples_")]
    accuracy = json.loads((classifier / "heldout_accuracy.json").read_text())
    device = f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}"
    lines = [
        "# Quality benchmark: Fish4Knowledge, training strategies and guidance",
        "",
        f"Command: `{' '.join(['python benchmarks/quality.py', *argv])}` (resumable).",
        f"Machine: {device}. Model and budget: `configs/f4k.yaml` (tiny pixel-space UNet, 32 px), the same total",
        "steps for every strategy; evaluation on a fixed, stratified 20% of the folder that no run trained on.",
        "",
        *result_tables(runs, timings, accuracy, "< 50 training images"),
        *section(
            "Guidance scale sweep (species rank; flat with vanilla CFG, the others with taxonomic)", extra["sweep"]
        ),
        *section(
            "Investigation: progressive variants and the twice-the-steps baseline (800 steps unless marked x2; "
            f"taxonomic CFG, flat vanilla, at scale {scale:g})",
            extra["variants"],
            [f"- `{name}`: {what}" for name, what, _ in VARIANTS] + [""],
            split=True,
        ),
        *section("Investigation: guidance window (progressive, species rank)", extra["windows"]),
        "## Plots and samples",
        "",
        *[f"![{p.stem}]({assets.name}/{p.name})" for p in plots],
        "",
        *[f"![{p.stem}]({assets.name}/{p.name})" for p in sorted(assets.glob("samples_*_specific_epithet.jpg"))],
        "",
    ]
    write_keeping_section(target, "\n".join(lines))
    return target


def main(argv: list[str] | None = None) -> int:
    warn_if_package_elsewhere()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    quick = args.quick
    if quick:
        args.per_taxon = min(args.per_taxon, 2)
    out = args.out or REPO / "benchmarks" / "runs" / ("quality-quick" if quick else "quality")
    steps = [4] * 7 if quick else Config.load(PRESET).train.steps
    runs = {strategy: [f"train.strategy={strategy}", f"train.steps={steps}"] for strategy in STRATEGIES}
    if args.investigate:
        runs |= {name: changes for name, _, changes in VARIANTS}
    if quick:
        runs = {name: [*changes, f"train.steps={steps}"] for name, changes in runs.items()}
    configs = {name: Config.load(PRESET, overrides) for name, overrides in runs.items()}
    budget = {name: sum(config.train.steps) for name, config in configs.items()}
    flat = {name for name, config in configs.items() if config.train.strategy == "flat"}
    print(
        f"plan: split {args.data} ({1 - args.holdout:.0%} train), classifier, then {len(runs)} runs "
        f"({', '.join(f'{name} {n} steps' for name, n in budget.items())}), evaluations; first ETA "
        f"{sum(budget.values()) * SECONDS_PER_STEP / 60:.0f} min of training (25 min at most per 800-step run)"
    )
    train_csv, heldout = write_split("folder", args.data, out / "data", args.holdout)
    classifier = train_classifier(train_csv, out / "classifier", 60 if quick else 1500)
    pipelines, timings = {}, {}
    for i, (name, overrides) in enumerate(runs.items()):
        pipelines[name], timings[name] = train_run(train_csv, out / "runs" / name, overrides, budget[name])
        rate = timings[name] / budget[name]
        left = sum(list(budget.values())[i + 1 :])
        print(
            f"{name}: {timings[name] / 60:.1f} min ({rate:.2f} s/step); training left: about {left * rate / 60:.0f} min"
        )
    from taxadiffusion.eval.fid import InceptionFeatures

    features = InceptionFeatures()  # shared: each real image is featurised once for every evaluation

    def guidance_of(run: str) -> str:  # `flat` has no lineage to contrast: vanilla CFG, as in the main rows
        return Guidance.VANILLA if run in flat else Guidance.TAXONOMIC

    def evaluate(run: str, target: Path, s: EvalSettings) -> Path:
        sampling = s.sampling
        print(f"evaluating {target.name} ({sampling.guidance} guidance, scale {sampling.scale}, {', '.join(s.ranks)})")
        if run in flat:
            evaluate_flat(pipelines[run], train_csv, heldout, target, s, features)
        else:
            evaluate_model(pipelines[run], heldout, target, s, features)
        return target

    evals = [
        evaluate(run, out / "eval" / name, settings(args, classifier, guidance, quick))
        for name, run, guidance in EVALUATIONS
    ]
    swept = SWEPT if args.investigate else SWEPT[:2]
    extra = {
        "sweep": [
            evaluate(
                run,
                out / "sweep" / f"{run}-s{scale:g}",
                settings(args, classifier, guidance_of(run), quick, scale, species=True),
            )
            for scale in args.sweep
            for run in swept
        ],
        "variants": [
            evaluate(name, out / "eval" / name, settings(args, classifier, guidance_of(name), quick))
            for name, _, _ in (VARIANTS if args.investigate else ())
        ],
        "windows": [
            evaluate(
                "progressive",
                out / "window" / f"progressive-w{start:g}-{end:g}",
                settings(args, classifier, Guidance.TAXONOMIC, quick, window=(start, end), species=True),
            )
            for start, end in (WINDOWS if args.investigate else ())
        ],
    }
    print(f"results: {write_results(out, evals, extra, timings, classifier, quick, argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
