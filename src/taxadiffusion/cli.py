"""The `taxadiffusion` command. Thin: parse arguments, call the library, print results."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__

FORMATS = ("inat21", "fishnet", "bioscan", "folder", "csv")


class CommandError(Exception):
    """A failure whose message tells the user what to do; printed without a traceback."""


# -- data ------------------------------------------------------------------------------------------


def _read(args: argparse.Namespace):
    from .data.readers import read_records

    return read_records(args.format, args.path, root=args.root)


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


# -- parser ----------------------------------------------------------------------------------------


def _add_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="metadata file (JSON/CSV/TSV/JSONL) or dataset folder")
    parser.add_argument("--format", required=True, choices=FORMATS, help="metadata format")
    parser.add_argument("--root", type=Path, help="image root (default: next to the metadata)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (CommandError, FileNotFoundError, NotADirectoryError, FileExistsError, ValueError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"taxadiffusion: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
