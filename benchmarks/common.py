"""What every benchmark shares: the repository's folders and where the benchmark datasets lie.

The datasets are not in the repository (docs/benchmarks.md says what each one is and how its folder is laid
out). A benchmark finds them in the folder given by its `--data-root` argument or, without it, by the
`TAXADIFFUSION_DATA` environment variable.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from taxadiffusion.atomic import write_text_atomic
from taxadiffusion.config import Config
from taxadiffusion.eval.report import main_table, markdown_table, split_table

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PRIORS = REPO / "benchmarks" / "priors"
DATA_VARIABLE = "TAXADIFFUSION_DATA"
# "Rare": fewer training images than this. CUB-100-LT's tail is 3-10 images (50 of its 100 species); in F4K's
# training part one species has at most 10, so there rare is under 50 (8 of 23).
RARE = {"cub": 11, "f4k": 50}


def data_root(explicit: Path | None = None) -> Path:
    """The folder that holds the benchmark datasets: `explicit`, else $TAXADIFFUSION_DATA; exits with a
    message naming both when neither is given or the folder is missing."""
    root = explicit or (Path(os.environ[DATA_VARIABLE]) if os.environ.get(DATA_VARIABLE) else None)
    if root is None:
        sys.exit(
            f"error: where are the benchmark datasets? Pass --data-root FOLDER or set {DATA_VARIABLE}=FOLDER "
            "(the folder holding fish4knowledge/, cub100_lt/ and birds525/; see docs/benchmarks.md)"
        )
    if not root.is_dir():
        sys.exit(f"error: the benchmark data folder {root} does not exist (from --data-root or {DATA_VARIABLE})")
    return root


def dataset_path(relative: str, explicit_root: Path | None = None) -> Path:
    """One dataset's file or folder under the data root, with a message naming it when it is missing."""
    path = data_root(explicit_root) / relative
    if not path.exists():
        sys.exit(f"error: {path} not found: the data root must hold {relative} (see docs/benchmarks.md)")
    return path


def save_sheet(grid: Path, target: Path) -> Path:
    """A sample sheet for the results folder: the evaluation's PNG grid as a JPEG (quality 90), which a browser
    shows at a fifth of the size. Sheets are for looking at; the metrics are computed from the lossless images."""
    from PIL import Image

    with Image.open(grid) as image:
        image.convert("RGB").save(target, "JPEG", quality=90, optimize=True)
    return target


# -- steps the quality benchmarks share ------------------------------------------------------------


def warn_if_package_elsewhere() -> None:
    """A copy of the tree (a snapshot for a long run) that borrows another tree's editable venv imports that
    tree's package, not its own: its results would not be what the copy holds, and an edit there can crash it.
    Say so (PYTHONPATH=<copy>/src puts the copy first)."""
    import taxadiffusion

    loaded, here = Path(taxadiffusion.__file__).resolve().parent, REPO / "src" / "taxadiffusion"
    if here.is_dir() and loaded != here.resolve():
        print(
            f"warning: this benchmark is in {REPO} but imports taxadiffusion from {loaded}; "
            f"run it with PYTHONPATH={REPO / 'src'} to measure this tree's code",
            file=sys.stderr,
        )


def write_split(fmt: str, data: Path, out: Path, fraction: float = 0.2) -> tuple[Path, Path]:
    """A fixed, stratified split (seed 0) of a dataset into train.csv and heldout.csv (absolute image paths): the
    held-out part that every benchmark evaluates on and no run, prior included, trains on."""
    from taxadiffusion.data.readers import read_records
    from taxadiffusion.data.records import split_records

    paths = out / "train.csv", out / "heldout.csv"
    if all(p.is_file() for p in paths):
        return paths
    records = read_records(fmt, data)
    train, held = split_records(records.records, fraction, seed=0)
    out.mkdir(parents=True, exist_ok=True)
    for path, rows in zip(paths, (train, held), strict=True):
        write_table(path, rows, records.ranks)
    print(f"split {data}: {len(train)} training and {len(held)} held-out images")
    return paths


def write_table(path: Path, records: list, ranks: tuple) -> None:
    """Records as a `csv`-reader table: file_name and one column per rank (written whole or not at all)."""
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", *(r.value for r in ranks)])
        for record in records:
            names = list(record.lineage.names) + [""] * (len(ranks) - record.lineage.depth)
            writer.writerow([str(record.image), *names])
    tmp.replace(path)


def train_classifier(train_csv: Path, out: Path, steps: int) -> Path:
    from taxadiffusion.data.readers import read_records
    from taxadiffusion.eval.classifier import ClassifierTraining, train_on_records

    if not (out / "heldout_accuracy.json").is_file():
        shutil.rmtree(out, ignore_errors=True)  # our own folder, never finished
        run = train_on_records(read_records("csv", train_csv), training=ClassifierTraining(steps=steps))
        run.save(out)
        print(f"classifier saved to {out}; {run.describe()}")
    return out


def train_or_find(config: Config, out: Path, **record) -> tuple[Path, dict, bool]:
    """Train (or resume, or find finished) one run into `out`. Returns its pipeline, how it was trained
    ({"seconds", "threads", **record}: its training time summed over every process that ran or resumed it, the
    last one's torch threads) and whether it was found finished. Both benchmarks train their runs through this."""
    from taxadiffusion.train.trainer import Trainer

    done = out / "train_seconds.json"
    if (out / "pipeline" / "model_index.json").is_file() and done.is_file():
        return out / "pipeline", json.loads(done.read_text()), True
    trainer = Trainer(config, out)
    print(trainer.describe())
    pipeline = trainer.run()
    timing = {"seconds": trainer.state.train_seconds, "threads": torch.get_num_threads(), **record}
    write_text_atomic(done, json.dumps(timing) + "\n")  # the finished-run marker: whole or absent after a kill
    return pipeline, timing, False


def run_tables(runs: dict, rare: str | None) -> list[str]:
    """The runs' table per rank and, given what `rare` means, their rare/common split (shared with table1.py)."""
    lines = [markdown_table(main_table(runs)), ""]
    return lines + ([f"Rare ({rare}) vs common taxa:", "", markdown_table(split_table(runs)), ""] if rare else [])


def result_tables(runs: dict, timings: dict, accuracy: dict, rare: str) -> list[str]:
    """Training times, the classifier's ceiling, and the all-taxa and rare/common tables (shared with table1.py)."""
    return [
        "Training time per run: "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items())
        + ". Classifier held-out accuracy (real images, ceiling of the accuracy columns): "
        + ", ".join(f"{r} {a:.1%}" for r, a in accuracy["accuracy"].items() if a is not None)
        + ".",
        "",
        "## All taxa (FID/KID/LPIPS lower is better; Acc = generated images classified as the conditioned taxon)",
        "",
        markdown_table(main_table(runs)),
        "",
        f"## Rare ({rare}) vs common taxa",
        "",
        markdown_table(split_table(runs)),
        "",
    ]
