"""The paper's Table 1 and strategy ablation in miniature, on real birds (CUB-100-LT) and fish (Fish4Knowledge),
every row of a dataset adapted from one pretrained prior (`DATASETS`: benchmarks/priors/<prior>.safetensors, made
by configs/prior_<prior>.yaml).

    python benchmarks/table1.py --dataset cub          # run again to resume; --dataset f4k for the fish
    python benchmarks/table1.py --dataset cub --quick  # every step in a few minutes (a few-step prior and runs)
    python benchmarks/table1.py --dataset cub --rows taxadiffusion --variant lora-r16 \
        --set model.lora_rank=16 model.lora_alpha=16 --ranks specific_epithet   # an investigation

Rows (the paper's in brackets): `zero-shot` (SD: the prior prompted with "a photo of <binomial>", no adaptation),
`flat` (SD + LoRA: LoRA r4 on the prior, the species caption through its text path), `full` (SD + full: the
whole UNet on the species caption), `taxadiffusion` (the published recipe, configs/adapt_birds_fish.yaml:
progressive, `unet_stages: first`, taxonomic CFG), `all` and `random` (the strategy ablation, same recipe) and
`taxadiffusion-vanilla` (the taxadiffusion model sampled with vanilla CFG). Every trained row has the same steps
in all. A fixed, stratified 20% of each species (seed 0; the species with 4 images keep 3 for training) is held
out; the prior was trained on the rest only (`data.holdout: 0.2`), and so is every row and the classifier.

Each row is evaluated per rank (order, family, genus, species: FID, KID, LPIPS, accuracy of the taxonomic
classifier; rare against common taxa by training images: at most 10 in CUB-100-LT, under 50 in F4K), 10 images
per taxon. The species-rank images of the zero-shot, flat, full and taxadiffusion rows are copied to
benchmarks/results/quality_<dataset>/generated/<row>/ with an index.csv (path, scientific_name). Results:
benchmarks/results/quality_<dataset>.md (a `## Reading` section already there is kept). Every row's metrics and
training time are kept in quality_<dataset>/metrics.json and the classifier in quality_<dataset>/classifier/: the
tables are rebuilt from them, so rows measured on different machines form one table with one judge.

An investigation (`--variant NAME`) changes one thing of a row: its training (`--set KEY=VALUE`, trained in
runs/<row>~NAME) or its sampling (`--scale`, `--window`, reusing the row's model, or with `--model VARIANT` the
model an earlier investigation trained). It is evaluated at `--ranks` only, kept in
the record under "investigations" and tabled in the md's investigations section beside the rows it changes,
never in Table 1 itself. Its name is its key: a run that changes a row otherwise than the record's <row>~NAME
stops before it trains.

The record names the prior that Table 1's rows were adapted from, and a Table 1 run on another prior (the
dataset's in `DATASETS` changed) stops before it trains: `--archive NAME` first moves the rows to the
investigations as <row>~NAME, each with its prior and the command that measures it again. `--tables` writes the
md again from the record alone, e.g. after bringing in a record that a run on another machine extended.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from taxadiffusion.atomic import write_text_atomic
from taxadiffusion.config import Config
from taxadiffusion.eval.protocol import EvalInputs, EvalSettings, evaluate
from taxadiffusion.eval.report import SHORT, write_keeping_section, write_report
from taxadiffusion.generate import generated_files
from taxadiffusion.guidance import Guidance
from taxadiffusion.sampling import SamplingSettings
from taxadiffusion.taxonomy import PAPER_RANKS

from common import (
    RARE,
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


class Dataset(NamedTuple):
    fmt: str
    path: str  # under the benchmark data root (--data-root or $TAXADIFFUSION_DATA)
    label: str
    # Table 1's prior: benchmarks/priors/<prior>.safetensors, made by configs/prior_<prior>.yaml. The record
    # names the prior its rows were adapted from; rows of another prior are archived first (--archive).
    prior: str


DATASETS = {
    "cub": Dataset("csv", "cub100_lt/metadata.csv", "CUB-100-LT", "birds525"),
    "f4k": Dataset("folder", "fish4knowledge", "Fish4Knowledge", "birds_fish"),
}


def prior_pack(dataset: str) -> Path:
    return REPO / "benchmarks" / "priors" / f"{DATASETS[dataset].prior}.safetensors"


def prior_config(pack: str | Path) -> Path:
    """The config that made a packed prior: configs/prior_<its name>.yaml (test_prior.py checks the pack's recipe)."""
    return REPO / "configs" / f"prior_{Path(pack).stem}.yaml"


RECIPE = REPO / "configs" / "adapt_birds_fish.yaml"
CAPTION = "a photo of {scientific_name}"  # the species caption of zero-shot, flat and full
EVERY_STEP = SamplingSettings().window  # the default guidance window: every sampling step guided

# (row, strategy or None for zero-shot, overrides, guidance at evaluation)
ROWS = (
    ("zero-shot", None, [], Guidance.VANILLA),
    ("flat", "flat", ["text.template=a photo of {name}"], Guidance.VANILLA),
    ("full", "full", ["text.template=a photo of {name}", "model.finetune=full"], Guidance.VANILLA),
    ("taxadiffusion", "progressive", [], Guidance.TAXONOMIC),
    ("all", "all", [], Guidance.TAXONOMIC),
    ("random", "random", [], Guidance.TAXONOMIC),
    ("taxadiffusion-vanilla", "progressive", [], Guidance.VANILLA),
)
EXPORTED = ("zero-shot", "flat", "full", "taxadiffusion")
RANKS = tuple(rank.value for rank in PAPER_RANKS)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=DATASETS, default="cub")
    parser.add_argument(
        "--data-root", type=Path, help="the folder holding the benchmark datasets (default: $TAXADIFFUSION_DATA)"
    )
    parser.add_argument("--quick", action="store_true", help="a few steps and images: checks every step only")
    parser.add_argument(
        "--prior",
        type=Path,
        help="the packed prior (pretrain --pack; default: the dataset's Table 1 prior); another is an investigation "
        "(--variant)",
    )
    parser.add_argument("--out", type=Path, help="work folder (default benchmarks/runs/table1-<dataset>[-quick])")
    parser.add_argument(
        "--rows",
        nargs="+",
        choices=[row for row, *_ in ROWS],
        default=[row for row, *_ in ROWS],
        help="the rows to train and evaluate, in this order (default all); the results list every row evaluated "
        "so far, so that two processes on different rows share one work folder",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the results go")
    parser.add_argument("--per-taxon", type=int, default=10)
    parser.add_argument("--scale", type=float, default=3.0, help="guidance scale at evaluation")
    parser.add_argument(
        "--window",
        nargs=2,
        type=float,
        default=EVERY_STEP,
        metavar=("R0", "R1"),
        help="guidance window at evaluation: the fractions of the sampling schedule guided (default 0 1: every step)",
    )
    parser.add_argument(
        "--variant",
        metavar="NAME",
        help="an investigation of the rows: trained with --set, sampled at --scale, evaluated at --ranks, and "
        "kept apart from Table 1 (the md's investigations section)",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="with --variant: config changes of the rows' training, e.g. model.lora_rank=16 (none: the rows' "
        "own models are sampled)",
    )
    parser.add_argument("--ranks", nargs="+", choices=RANKS, default=list(RANKS), help="with --variant: the ranks")
    parser.add_argument(
        "--model",
        metavar="VARIANT",
        help="with --variant and no --set: sample the model that the investigation VARIANT trained (its --set) "
        "instead of the row's own, so that a sampling change is measured on it without training it again",
    )
    parser.add_argument(
        "--archive",
        metavar="NAME",
        help="move Table 1's rows to the investigations as <row>~NAME, with the prior they were adapted from, so "
        "that Table 1 can be measured on another prior (the dataset's in DATASETS); rewrites the record only",
    )
    parser.add_argument(
        "--tables",
        action="store_true",
        help="write the md, report and plots again from the record alone (e.g. after bringing in a record that "
        "another machine extended); trains and evaluates nothing",
    )
    args = parser.parse_args(argv)
    args.window = tuple(args.window)
    args.prior = args.prior or prior_pack(args.dataset)
    args.other_prior = args.prior.resolve() != prior_pack(args.dataset).resolve()
    changed = args.set or len(args.ranks) < len(RANKS) or args.model or args.window != EVERY_STEP or args.other_prior
    if not args.variant and changed:
        parser.error(
            "--set, --ranks, --model, --window and --prior change a row: name the investigation with --variant NAME"
        )
    if (args.archive or args.tables) and (args.variant or changed):
        parser.error("--archive and --tables only rewrite the record or its tables: no --variant, no row changes")
    if args.model and args.other_prior:
        parser.error("--model samples a model trained earlier: its prior is that investigation's --prior")
    if args.model and args.set:
        parser.error("--model samples a model trained earlier: its training changes are that investigation's --set")
    if args.variant and not args.variant.replace("-", "").replace(".", "").isalnum():
        parser.error(f"--variant {args.variant!r}: letters, digits, '-' and '.' only (it names folders)")
    return args


# -- steps ------------------------------------------------------------------------------------------


def prior_folder(args, out: Path) -> Path:
    """The prior's base folder: the committed file unpacked, or with --quick a few-step prior trained here
    (unless --prior names another file)."""
    from taxadiffusion.prior import unpack_prior

    if not args.quick or args.other_prior:
        if not args.prior.is_file():
            raise SystemExit(
                f"{args.prior} not found: make it with `taxadiffusion pretrain --config {prior_config(args.prior)} "
                f"--output runs/prior-birds-fish --pack {args.prior}` (or pass --prior)"
            )
        # another prior (an investigation) beside the committed one's folder, which the rows' configs name
        return unpack_prior(args.prior, out / ("prior" if not args.other_prior else f"prior-{args.prior.stem}"))
    from taxadiffusion.train.trainer import Trainer

    folder = out / "prior"
    if not (folder / "prior.json").is_file():
        recipe = prior_config(prior_pack(args.dataset))
        Trainer(Config.load(recipe, ["train.steps=4", "train.checkpoint_every=4"]), folder).run()
    return folder


def export_species_images(evaluation: Path, target: Path, heldout: Path) -> None:
    """The species-rank images of an evaluation as PNGs under `target` with index.csv (path, scientific_name)."""
    from taxadiffusion.data.readers import read_table

    taxonomy = read_table(heldout).taxonomy()
    images, _ = generated_files(evaluation / "images" / "specific_epithet", taxonomy.ranks)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    rows = []
    for taxon in taxonomy.taxa(taxonomy.ranks[-1]):
        lineage = taxonomy.lineage(taxon)
        for number, image in enumerate(images.get(taxon.path, [])):
            name = f"{lineage.scientific_name.replace(' ', '_')}_{number:02d}.png"
            shutil.copy(image, target / name)
            rows.append((name, lineage.scientific_name))
    with (target / "index.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "scientific_name"])
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    warn_if_package_elsewhere()
    args = parse_args(argv)
    name = f"quality_{args.dataset}" + ("_quick" if args.quick else "")
    out = args.out or REPO / "benchmarks" / "runs" / f"table1-{args.dataset}{'-quick' if args.quick else ''}"
    results = (out if args.quick else args.results) / name
    if args.archive:
        with locked_record(results) as record:
            archived = archive_rows(record, args.archive, args.dataset)
        archive_sheets(results, archived, args.archive)
        print(f"archived {', '.join(archived) or 'no row'} as <row>~{args.archive} in {results / RECORD}")
        print("Table 1's tables are written again with its first row on the dataset's prior")
        return 0
    if args.tables:
        return write_tables(args, results, name)
    dataset = DATASETS[args.dataset]
    fmt_label = dataset.label
    steps = Config.load(RECIPE).train.steps
    if args.quick:
        steps, args.per_taxon = [2] * len(steps), 1
    trained_rows = {row.removesuffix("-vanilla") for row in args.rows} - {"zero-shot"}
    print(
        f"plan: split {fmt_label} (80% train), the prior, a classifier, {len(trained_rows)} trained rows of "
        f"{sum(steps)} steps each, {len(args.rows)} evaluations (order .. species, {args.per_taxon} images per "
        "taxon)"
    )
    train_csv, heldout = write_split(dataset.fmt, dataset_path(dataset.path, args.data_root), out / "data")
    refuse_another_prior(read_record(results), args)
    if args.model:  # a model trained earlier is sampled with (and recorded as adapted from) its own prior
        earlier = investigation_prior(results, args.model)
        if earlier is not None:
            args.prior, args.other_prior = REPO / earlier, True
    if args.variant:
        refuse_another_investigation(read_record(results), args, results)
    prior = prior_folder(args, out)
    classifier = committed_classifier(train_csv, out, results, 60 if args.quick else 1500)
    recipe = [f"model.base={prior}", f"data.path={train_csv}", f"train.steps={steps}"]
    if args.quick:
        recipe.append("train.checkpoint_every=2")

    from taxadiffusion.data.readers import read_table

    training = read_table(train_csv).taxonomy()
    rows = {row: (strategy, overrides, guidance) for row, strategy, overrides, guidance in ROWS}
    for row in args.rows:
        strategy, _, guidance = rows[row]
        # train (a -vanilla row samples its base row's model)
        base = row.removesuffix("-vanilla")
        trained = base + (f"~{args.variant}" if args.set or args.other_prior else "")
        if args.model:  # an earlier investigation's model, with the training changes it was made with
            trained = f"{base}~{args.model}"
        changes = training_changes(args, row, results)
        model = prior
        if strategy is not None:
            overrides = rows[base][1]
            config = Config.load(RECIPE, [*recipe, f"train.strategy={strategy}", *overrides, *changes])
            model, timing, found = train_or_find(config, out / "runs" / trained)
            minutes = f"{timing['seconds'] / 60:.1f} min"
            print(f"{trained}: " + (f"found finished (trained in {minutes})" if found else f"trained in {minutes}"))
            # an investigation's own key: a scale variant samples the row's model but must not retime the row
            timed = f"{base}~{args.variant}" if args.variant else trained
            if not args.model:  # a model trained for another investigation is timed there
                entries = {"train_seconds": {timed: timing["seconds"]}}
                if "threads" in timing:  # a train_seconds.json written before threads were recorded has none
                    entries["train_threads"] = {timed: timing["threads"]}
                keep_record(results, entries)

        # evaluate
        evaluated = row + (f"~{args.variant}" if args.variant else "")
        target = out / "eval" / evaluated
        if not (target / "metrics.json").is_file():
            print(f"evaluating {evaluated} ({guidance} guidance)")
            settings = EvalSettings(
                ranks=("specific_epithet",) if args.quick else tuple(args.ranks),
                per_taxon=args.per_taxon,
                max_real_per_taxon=4 if args.quick else 50,
                sampling=SamplingSettings(
                    guidance=guidance, scale=args.scale, window=args.window, steps=4 if args.quick else 25
                ),
                rare_threshold=RARE[args.dataset],
                classifier=str(classifier),
            )
            one_text = strategy in (None, "flat", "full")  # their rare and common taxa: by training counts
            inputs = EvalInputs(
                ("csv", str(heldout)),
                model,
                sampling_changes=settings.sampling.to_dict(),
                zero_shot=CAPTION if strategy is None else None,
                taxonomy=training if one_text else None,
            )
            evaluate(inputs, target, settings, progress=False)
        metrics = json.loads((target / "metrics.json").read_text())
        if args.variant:  # an investigation: kept apart from Table 1's rows
            change = investigation_change(args, row, changes)
            keep_record(results, {"investigations": {evaluated: {**metrics, "investigation": change}}})
            continue
        keep_record(results, {row: metrics, "prior": relative(args.prior)})
        for grid in (target / "grids").glob("*.png"):
            save_sheet(grid, results / sheet_name(row, grid.stem))
        if row in EXPORTED:
            export_species_images(target, results / "generated" / row, heldout)

    return write_tables(args, results, name)


def write_tables(args, results: Path, name: str) -> int:
    """The md, report and plots from the record alone: every row whose metrics are kept (this run's and earlier
    machines'), in the table's order, and the investigations. Written under the record's lock: a table written
    from a record that another row has since extended would otherwise replace that row's newer table."""
    with record_lock(results):
        return _write_tables(args, results, name)


def _write_tables(args, results: Path, name: str) -> int:
    record = read_record(results)
    runs = {row: record[row] for row, *_ in ROWS if row in record}
    timings = {row: record["train_seconds"][row] for row, *_ in ROWS if row in record.get("train_seconds", {})}
    timings.update({row: t for row, t in record.get("train_seconds", {}).items() if "~" in row})
    investigations = record.get("investigations", {})
    rare = RARE[args.dataset]
    if not runs:  # the tables set investigations beside Table 1's rows
        print(f"no Table 1 row evaluated yet: the investigations are kept in {results / RECORD}, the tables wait")
        return 0
    table = args
    if args.variant:  # the table's own command: an investigation's is listed with it
        table = argparse.Namespace(**{**vars(args), "variant": None, "scale": 3.0, "window": EVERY_STEP})
    label = DATASETS[args.dataset].label
    classifier = results / "classifier"  # the committed judge (committed_classifier)
    if not (classifier / "heldout_accuracy.json").is_file():
        raise SystemExit(
            f"{classifier} holds no classifier: the record's accuracy columns were scored by one not kept with it, "
            "so its tables are written by the runs that made them (a row run again trains and keeps one)"
        )
    target = write_results(
        results, runs, investigations, timings, classifier, label, command(table), name, rare, record.get("prior")
    )
    print(f"results: {target}")
    return 0


# Every row's metrics.json and training time, kept beside the results: the work folder is a machine's own and
# goes with it, and the tables are rebuilt from this record, so rows measured on different machines (a long
# benchmark spans several) stay in one table.
RECORD = "metrics.json"
# the record's entries that gather rows rather than being one
MERGED = ("train_seconds", "train_threads", "investigations")


def read_record(results: Path) -> dict:
    """The results' record (empty before its first row)."""
    path = results / RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


@contextlib.contextmanager
def record_lock(results: Path) -> Iterator[None]:
    """Two processes on different rows share the results' record and the tables written from it: each reads,
    changes and writes them under this lock, so that neither's write is lost to the other's."""
    results.mkdir(parents=True, exist_ok=True)
    with (results / f"{RECORD}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def locked_record(results: Path) -> Iterator[dict]:
    """The results' record to change in place, written back when the block ends."""
    with record_lock(results):
        record = read_record(results)
        yield record
        write_text_atomic(results / RECORD, json.dumps(record, indent=1) + "\n")


def keep_record(results: Path, entries: dict) -> None:
    """Merge `entries` (row -> metrics, "prior" -> the rows' prior, or "train_seconds" -> {row: seconds}) into the
    results' record."""
    with locked_record(results) as record:
        for key, value in entries.items():
            record[key] = {**record.get(key, {}), **value} if key in MERGED else value


def table_rows(record: dict) -> list[str]:
    return [row for row, *_ in ROWS if row in record]


def refuse_another_prior(record: dict, args) -> None:
    """Table 1's rows all come from one prior: a Table 1 run on another than the record's rows' stops before it
    trains (an investigation names its own prior and is kept apart)."""
    kept = record.get("prior")
    if args.variant or not table_rows(record) or kept == relative(args.prior):
        return
    example = f"prior-{Path(kept).stem}" if kept else "previous"
    raise SystemExit(
        f"Table 1's rows in the record were adapted from {kept or 'a prior it does not name'}, and this run's prior "
        f"is {relative(args.prior)}: keep them as investigations first with `--archive NAME` (e.g. --archive "
        f"{example})"
    )


def investigation_change(args, row: str, changes: list[str]) -> dict:
    """What the investigation `args.variant` changes of `row`, as the record keeps it beside its metrics (`changes`:
    its training's --set, or with --model the --set of the investigation that trained the model)."""
    change = {"row": row, "set": changes, "scale": args.scale, "command": command(args, [row])}
    change |= {"prior": relative(args.prior)} if args.other_prior else {}
    change |= {"window": list(args.window)} if args.window != EVERY_STEP else {}
    change |= {"model": f"{row.removesuffix('-vanilla')}~{args.model}"} if args.model else {}
    return change


def refuse_another_investigation(record: dict, args, results: Path) -> None:
    """An investigation's name is its key in the record (and its folders under --out): a run of `--variant NAME`
    that changes a row otherwise than the record's <row>~NAME did (another prior, --set, --model, scale, window or
    ranks) would replace that result with its own. It stops before it trains and names both; the same command
    again resumes or finds its own result."""
    for row in args.rows:
        name = f"{row}~{args.variant}"
        kept = record.get("investigations", {}).get(name)
        if kept is None:
            continue
        this = investigation_change(args, row, training_changes(args, row, results))
        before = kept["investigation"]
        same = {k: v for k, v in before.items() if k != "command"} == {k: v for k, v in this.items() if k != "command"}
        ranks = ["specific_epithet"] if args.quick else args.ranks  # --quick evaluates the species only
        if same and set(kept["settings"]["ranks"]) == set(ranks):
            continue
        raise SystemExit(
            f"--variant {args.variant}: {results / RECORD} already holds {name}, measured by `{before['command']}`; "
            f"this run is `{this['command']}` and would replace it: name this investigation otherwise"
        )


def archive_rows(record: dict, name: str, dataset: str) -> list[str]:
    """Move Table 1's rows into the record's investigations as <row>~`name`, each with the prior it was adapted
    from and the command that measures it again, so that Table 1 can be measured on another prior without losing
    them. The investigations run beside those rows, against the same prior, are given it explicitly too."""
    rows = table_rows(record)
    if not rows:
        return []
    if "prior" not in record:  # a record written before the prior was recorded
        raise SystemExit(f'the record names no prior for its rows {rows}: add "prior": "<its .safetensors>"')
    prior = record.pop("prior")
    investigations = record.get("investigations", {})
    for variant, run in investigations.items():  # run against the record's prior, which they did not name
        what = run["investigation"]
        if "prior" not in what:
            model = what.get("model", "").partition("~")[2] or None
            changes = [] if model else what["set"]  # --model brings its investigation's --set along
            what["prior"] = prior
            what["command"] = rerun_command(run, what["row"], variant.split("~", 1)[1], prior, changes, model, dataset)
    archived = {}
    for row in rows:
        run = record.pop(row)
        settings = run["settings"]
        again = rerun_command(run, row, name, prior, [], None, dataset)
        what = {"row": row, "set": [], "scale": settings["scale"], "command": again, "prior": prior}
        what |= {"window": settings["window"]} if tuple(settings["window"]) != EVERY_STEP else {}
        archived[f"{row}~{name}"] = {**run, "investigation": what}
        for key in ("train_seconds", "train_threads"):
            if row in record.get(key, {}):
                record[key][f"{row}~{name}"] = record[key].pop(row)
    record["investigations"] = archived | investigations  # listed first: the rows the others were compared with
    return rows


def sheet_name(row: str, rank: str) -> str:
    """The file name of a row's sample sheet at `rank` in the results folder (a glob pattern with "*")."""
    return f"samples_{row}_{rank}.jpg"


def archive_sheets(results: Path, rows: list[str], name: str) -> None:
    """Rename the sample sheets of archived rows to samples_<row>~`name`_<rank>.jpg: the md lists a sheet beside the
    run it shows, and the next Table 1 row of that name writes its own. (generated/<row>/ is overwritten by that row's
    export; until then the md does not list it.)"""
    for row in rows:
        for sheet in results.glob(sheet_name(row, "*")):
            rank = sheet.stem.removeprefix(f"samples_{row}_")
            sheet.rename(sheet.with_name(sheet_name(f"{row}~{name}", rank)))


def rerun_command(
    run: dict, row: str, variant: str, prior: str, changes: list[str], model: str | None, dataset: str
) -> str:
    """The command that measures a record's run again as the investigation `variant` from `prior`, with the
    evaluation settings its metrics were made with."""
    settings = run["settings"]
    again = argparse.Namespace(
        dataset=dataset, quick=False, per_taxon=settings["per_taxon"], scale=settings["scale"],
        window=tuple(settings["window"]), variant=variant, prior=REPO / prior, other_prior=True, model=model,
        set=changes, ranks=settings["ranks"],
    )  # fmt: skip
    return command(again, [row])


def training_changes(args, row: str, results: Path) -> list[str]:
    """The training changes of `row`'s model in this run: --set, or with --model the --set of the investigation
    that trained that model (<row>~<variant>), from the results' record."""
    if not args.model:
        return args.set
    trained = f"{row.removesuffix('-vanilla')}~{args.model}"
    investigation = read_record(results).get("investigations", {}).get(trained)
    if investigation is None:
        raise SystemExit(f"--model: no investigation {trained!r} in {results / RECORD}: run it first (--variant)")
    return investigation["investigation"]["set"]


def investigation_prior(results: Path, variant: str) -> str | None:
    """The --prior that the investigation `variant` was trained from, as its record names it (None: the
    committed prior)."""
    trained = {k: v for k, v in read_record(results).get("investigations", {}).items() if k.endswith(f"~{variant}")}
    if not trained:
        raise SystemExit(f"--model: no investigation {variant!r} in {results / RECORD}: run it first (--variant)")
    return next(iter(trained.values()))["investigation"].get("prior")


def committed_classifier(train_csv: Path, out: Path, results: Path, steps: int) -> Path:
    """The taxonomic classifier of the accuracy columns, trained once and kept with the results: retrained on
    another machine it differs (its held-out accuracy by an image or two in 150), so each row's accuracy would
    be measured by a different judge."""
    kept = results / "classifier"
    if (kept / "heldout_accuracy.json").is_file():
        return kept
    trained = train_classifier(train_csv, out / "classifier", steps)
    shutil.copytree(trained, kept, dirs_exist_ok=True)
    return kept


def relative(path: Path) -> str:
    """A path as the repository's commands name it."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def command(args, rows: list[str] | None = None) -> str:
    """The command that makes these results, without the options that say only where things go or which
    process makes which row (an investigation names its `rows`)."""
    parts = ["python benchmarks/table1.py", f"--dataset {args.dataset}"]
    if rows:
        parts.append(f"--rows {' '.join(rows)}")
    if args.quick:
        parts.append("--quick")
    if args.per_taxon != 10 and not args.quick:  # --quick sets 1
        parts.append(f"--per-taxon {args.per_taxon}")
    if args.scale != 3.0:
        parts.append(f"--scale {args.scale:g}")
    if args.window != EVERY_STEP:
        parts.append(f"--window {args.window[0]:g} {args.window[1]:g}")
    if args.variant:
        parts.append(f"--variant {args.variant}")
        parts += [f"--prior {relative(args.prior)}"] if args.other_prior and not args.model else []
        parts += [f"--set {' '.join(args.set)}"] if args.set else []
        parts += [f"--model {args.model}"] if args.model else []
        parts += [f"--ranks {' '.join(args.ranks)}"] if len(args.ranks) < len(RANKS) else []
    return " ".join(parts)


def investigation_lines(runs: dict, investigations: dict, timings: dict, rare: int) -> list[str]:
    """The investigations, each beside the Table 1 rows it changes, at the ranks they were evaluated at: one
    table per set of ranks."""
    if not investigations:
        return []
    lines = [
        "## Investigations, one change at a time",
        "",
        "Each is a Table 1 row with one change, evaluated as Table 1 is (at the ranks shown), beside the rows "
        "it is compared with:",
        "",
    ]
    for name, run in investigations.items():
        what = run["investigation"]
        change = "with " + ", ".join(f"`{c}`" for c in what["set"]) if what["set"] else "trained as the row is"
        if "prior" in what:
            change = f"{change} from" if what["row"] != "zero-shot" else "of"
            change += f" the prior `{what['prior']}`"
        change += f" (the model of `{what['model']}`, not trained again)" if "model" in what else ""
        window = what.get("window")
        sampled = f"scale {what['scale']:g}" + (f", guidance window {window[0]:g}-{window[1]:g}" if window else "")
        trained = f"; trained in {timings[name] / 60:.1f} min" if name in timings else ""  # --model: never timed
        lines.append(f"- `{name}`: {what['row']} {change}, sampled at {sampled}{trained}. `{what['command']}`")
    lines.append("")
    by_ranks: dict[tuple[str, ...], dict] = {}
    for name, run in investigations.items():
        by_ranks.setdefault(tuple(r for r in RANKS if r in run["ranks"]), {})[name] = run
    for ranks, group in by_ranks.items():
        changed = {run["investigation"]["row"] for run in group.values()}
        compared = {
            row: {**run, "ranks": {r: run["ranks"][r] for r in ranks if r in run["ranks"]}}
            for row, run in runs.items()
            if row in {"flat", "full", *changed}
        }
        if len(by_ranks) > 1:
            lines += [f"At {', '.join(SHORT.get(r, r) for r in ranks)}:", ""]
        lines += run_tables({**compared, **group}, f"at most {rare - 1} training images")
    return lines


def write_results(
    assets: Path,
    runs: dict,
    investigations: dict,
    timings,
    classifier: Path,
    label: str,
    command,
    name,
    rare: int,
    prior: str | None,
) -> Path:
    write_report(assets, runs, title=f"{label}: the paper's rows from one prior")
    accuracy = json.loads((classifier / "heldout_accuracy.json").read_text())
    # only the table's rows: an archived row's export and sheets stay until the row is measured again, unlisted
    exported = [row for row in EXPORTED if row in runs and (assets / "generated" / row).is_dir()]
    sheets = [assets / sheet_name(row, "specific_epithet") for row in runs]
    sheets = [p for p in sheets if p.is_file()]
    archived_sheets = sorted(assets.glob(sheet_name("*~*", "specific_epithet")))
    transcribed = {run["transcribed"]: [] for run in runs.values() if "transcribed" in run}
    for row, run in runs.items():
        if "transcribed" in run:
            transcribed[run["transcribed"]].append(row)
    lines = [
        f"# {label}: the paper's Table 1 and strategy ablation from one prior",
        "",
        # the machine, not the threads of whichever process wrote this last: runs differ, the record has each's
        f"Command: `{command}` (resumable). Machine: {os.cpu_count()} CPU cores, torch {torch.__version__}; runs "
        f"often shared them (the threads of each run trained since this is recorded: `train_threads` in "
        f"`{assets.name}/{RECORD}`).",
        (f"Prior: `{prior}` (`{relative(prior_config(prior))}`)" if prior else "Prior: not recorded")
        + f"; adaptation: `{RECIPE.relative_to(REPO)}`, the same steps for every trained row; a fixed, stratified "
        "20% held out of every species (never trained on, prior included).",
        f"Every row's metrics and training time: `{assets.name}/{RECORD}`; the classifier of the Acc columns: "
        f"`{assets.name}/classifier/`.",
        *[f"Rows {', '.join(rows)}: {why}." for why, rows in transcribed.items()],
        "",
        *result_tables(
            runs, {r: t for r, t in timings.items() if "~" not in r}, accuracy, f"at most {rare - 1} training images"
        ),
        *investigation_lines(runs, investigations, timings, rare),
        "## Samples",
        "",
        *[f"![{p.stem}]({assets.name}/{p.name})" for p in sheets],
        "",
        *(
            ["Archived rows' sheets: " + ", ".join(f"[{p.stem}]({assets.name}/{p.name})" for p in archived_sheets), ""]
            if archived_sheets
            else []
        ),
        f"The species-rank images of {', '.join(exported)} are in `{assets.name}/generated/<row>/` with an "
        "`index.csv` (path, scientific_name), to score with another classifier or reference set.",
        "",
    ]
    target = assets.parent / f"{name}.md"
    write_keeping_section(target, "\n".join(lines))
    return target


if __name__ == "__main__":
    sys.exit(main())
