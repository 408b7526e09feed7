"""Synthetic training sets for the long tail: does filling it with generated images help a classifier?

    python benchmarks/augment.py --dataset cub          # after `benchmarks/table1.py --dataset cub` (its models)
    python benchmarks/augment.py --dataset f4k
    python benchmarks/augment.py --dataset cub --quick  # every step in a few minutes, on the --quick Table 1 run

It reads the work folder of benchmarks/table1.py: the same split (a fixed, stratified 20% of every species held
out), the taxadiffusion and flat models trained on the other 80%. Each model generates `N` images of every
species with `taxadiffusion generate --per-taxon N` (N: the median training count of the common species, split
from the rare ones as Table 1 splits them), with Table 1's guidance (scale 3; taxonomic for taxadiffusion, vanilla
for flat) and the fast preset (`--fast`: DPM-Solver++ 8 steps, trailing spacing), which is of the published
setting's quality on Table 1's fish model (benchmarks/results/sampling_f4k.md) at a third of its cost: a user
filling a tail samples thousands of images. `--published` samples as Table 1 evaluates (PNDM 25). The arms, each
the taxonomic classifier of benchmarks/quality.py (same size, steps and augmentation), trained with several seeds
(a second process of the same command, started once the images are made, shares the classifiers):

- `real`: the real training images;
- `real + taxadiffusion`, `real + flat`: the tail filled to N, i.e. each species with n < N real images gets the
  first N - n generated ones (what `taxadiffusion generate --fill-to N --data csv train.csv` makes: an image's
  seed derives from its taxon and index, so those are the same images);
- `taxadiffusion only`, `flat only`: the N generated images per species alone, the classification accuracy
  score (CAS) of Ravuri & Vinyals (2019).
- with `--cap R`, also `real + taxadiffusion (cap Rx)`, `real + flat (cap Rx)`: the same fill, but a species gets
  at most R times as many generated images as it has real ones (how much generated data the tail can take).
- with `--recipes`, the published recipes that turned synthetic images into gains, each one change to the fill
  `real + <model>` (`RECIPES`): `filtered` (the fill made by `generate --fill-to N --filter`, keeping the images
  that the committed Table 1 classifier, trained on the real training part, places in their species with
  probability 0.5 or more, up to 3 redraws each: SaSPA, DiffuLT), `weight 0.5` (their loss weight: DiffuLT),
  `drawn 0.5` (each batch position a generated image with probability 0.5: DA-Fusion) and `pretrained` (500
  steps on the generated images, then the 1,500 steps on the real ones alone); `classifier train`'s options.

Every arm is scored on the real held-out images: accuracy per rank over all of them, and species accuracy over
the images of rare species (Table 1's split: at most 10 training images in CUB-100-LT, under 50 in F4K) and of
common ones. Results: benchmarks/results/augment.md (a `## Reading` section already there is kept) and
augment_<dataset>.json.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import io
import json
import shutil
import statistics
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch

from taxadiffusion.atomic import write_text_atomic
from taxadiffusion.data.readers import read_records, read_table
from taxadiffusion.eval.classifier import (
    ClassifierTraining,
    accuracy_by_rank,
    fit_with_generated,
    predict_pool,
    record_pool,
)
from taxadiffusion.eval.report import markdown_table, write_keeping_section
from taxadiffusion.eval.settings import GeneratedRecipe
from taxadiffusion.filtering import SUMMARY as FILTER_SUMMARY

from common import RARE, REPO, RESULTS

LABELS = {"cub": "CUB-100-LT", "f4k": "Fish4Knowledge"}

MODELS = {"taxadiffusion": "taxonomic", "flat": "vanilla"}  # model row of Table 1 -> its guidance
ARMS = ("real", "real + taxadiffusion", "real + flat", "taxadiffusion only", "flat only")
# --recipes: each one change to the fill `real + <model>` (None: the filtered fill, trained as the plain one)
RECIPES = {
    "filtered": None,
    "weight 0.5": GeneratedRecipe(generated_weight=0.5),
    "drawn 0.5": GeneratedRecipe(generated_probability=0.5),
    "pretrained": GeneratedRecipe(pretrain_steps=500, generated_probability=0.0),  # then the real images alone
}
FILTER = ["--filter-rank", "specific_epithet", "--filter-threshold", "0.5", "--filter-retries", "3"]


class Arm(NamedTuple):
    """What one classifier trains on: real records (weight 1), generated records, and how the two are mixed."""

    real: list
    generated: tuple | list = ()
    recipe: GeneratedRecipe = GeneratedRecipe()
    source: Path | None = None  # the `generate` folder of the generated images


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=LABELS, default="cub")
    parser.add_argument("--quick", action="store_true", help="a few images and steps: checks every step only")
    parser.add_argument("--table1", type=Path, help="benchmarks/table1.py's work folder (default: its own default)")
    parser.add_argument("--out", type=Path, help="work folder (default benchmarks/runs/augment-<dataset>[-quick])")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the results go")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="classifier seeds per arm")
    parser.add_argument(
        "--cap",
        type=float,
        metavar="R",
        help="add arms whose fill gives a species at most R times as many generated images as real ones",
    )
    parser.add_argument("--recipes", action="store_true", help="add the filter, weight, draw and pretraining arms")
    parser.add_argument("--published", action="store_true", help="sample with PNDM 25 as Table 1 (default: --fast)")
    return parser.parse_args(argv)


# -- steps ------------------------------------------------------------------------------------------


def species_key(lineage) -> tuple[str, ...]:
    return lineage.names


def fill_target(counts: Counter, rare: int) -> int:
    """The common species' median training count (`counts`: training images per species): what the tail is
    filled to."""
    common = [n for n in counts.values() if n >= rare] or list(counts.values())
    return int(statistics.median(common))


def generate_images(
    model: Path, out: Path, count: list[str], guidance: str, quick: bool, published: bool, extra: list[str] = ()
) -> Path:
    """`taxadiffusion generate` (resumable: run again, it continues) with Table 1's guidance; `count`: its
    --per-taxon or --fill-to options, `extra`: more (a filter)."""
    command = [sys.executable, "-m", "taxadiffusion", "generate", "--model", str(model), "--out", str(out)]
    command += [*count, "--guidance", guidance, "--scale", "3.0", *extra]
    command += ["--scheduler", "pndm", "--steps", "25"] if published else ["--fast"]
    if quick:
        command += ["--steps", "4"]
    subprocess.run(command, check=True)
    return out / "metadata.csv"


def fill_records(generated, counts: Counter, target: int, cap: float | None = None) -> list:
    """Of each species' generated images, the first `target - n` by index (n: its real training images); with
    `cap`, at most `cap * n` of them (a species never holds more than cap times as many generated as real)."""
    chosen = []
    for record, index in generated:
        n = counts[species_key(record.lineage)]
        if index < target - n and (cap is None or index < cap * n):
            chosen.append(record)
    return chosen


def capped_arm(model: str, cap: float) -> str:
    return f"real + {model} (cap {cap:g}x)"


def recipe_arm(model: str, recipe: str) -> str:
    return f"real + {model}, {recipe}"


def arms_of(cap: float | None, recipes: bool = False) -> tuple[str, ...]:
    """The arms, with the capped fill of each model when `--cap` is given and the recipes' with `--recipes`."""
    capped = tuple(capped_arm(m, cap) for m in MODELS) if cap else ()
    return ARMS + capped + (tuple(recipe_arm(m, r) for m in MODELS for r in RECIPES) if recipes else ())


def acceptance(folder: Path) -> str:
    """A filtered generation's acceptance, from its summary: kept of drawn, and the images given up."""
    summary = json.loads((folder / FILTER_SUMMARY).read_text())
    return (
        f"{summary['kept']} kept of {summary['kept'] + summary['rejected']} drawn "
        f"({100 * summary['acceptance']:.1f}%), {summary['given_up']} given up after every redraw"
    )


def read_generated(metadata: Path, train_records) -> list:
    """The generated dataset's records, each with the full lineage of its species in the real training set (a
    flat model knows the species' name alone) and its index within its taxon (metadata.csv's `index`)."""
    lineages = {r.lineage.scientific_name: r.lineage for r in train_records}
    with metadata.open(newline="", encoding="utf-8") as handle:
        rows = {row["file_name"]: row for row in csv.DictReader(handle)}
    if not rows:  # a filter that kept nothing
        return []
    records = read_records("csv", metadata).records
    found = []
    for record in records:
        row = rows[record.image.relative_to(metadata.parent).as_posix()]
        found.append((replace(record, lineage=lineages[row["scientific_name"]]), int(row["index"])))
    return found


def score(model, held_images, held_ids, rare_mask, ranks) -> dict[str, float]:
    """Accuracy per rank over the held-out images labelled at that rank (an image whose lineage stops above a
    rank, such as Fish4Knowledge's Labridae of unknown genus, is not a miss there), and species accuracy over the
    rare and common species' images."""
    predicted = predict_pool(model, held_images)
    out = dict(zip((rank.value for rank in ranks), accuracy_by_rank(predicted, held_ids), strict=True))
    for name, mask in (("rare species", rare_mask), ("common species", ~rare_mask)):
        out[name] = accuracy_by_rank(predicted[mask], held_ids[mask])[-1]
    return out


def arm_pools(arm: Arm, taxonomy, resolution: int) -> tuple[tuple, tuple]:
    """An arm's real and generated images, decoded once for all its seeds."""
    real = record_pool(arm.real, taxonomy, resolution)
    return real, record_pool(arm.generated, taxonomy, resolution) if arm.generated else (real[0][:0], real[1][:0])


def train_arm(pools: tuple, recipe: GeneratedRecipe, taxonomy, held, steps: int, seed: int) -> dict[str, float]:
    """One arm's classifier (`classifier train`'s recipe on its real and generated images), scored on `held`."""
    model = fit_with_generated(taxonomy, *pools, ClassifierTraining(steps=steps, progress=False), recipe, seed=seed)
    # its own threads: processes of one command may differ, and the results are written by whichever ends last
    return {**score(model, *held, taxonomy.ranks), "threads": torch.get_num_threads()}


def size(arm: Arm) -> int:
    return len(arm.real) + len(arm.generated)


def best_arm(results: dict, arms: tuple[str, ...]) -> str:
    """The arm with generated images and real ones whose mean rare-species accuracy is highest."""
    candidates = [arm for arm in arms if arm.startswith("real + ")]
    return max(candidates, key=lambda arm: statistics.fmean(s["rare species"] for s in results[arm]))


def export_rare(arm: Arm, counts: Counter, rare: int, target: Path, name: str) -> None:
    """Copy `arm`'s generated images of the rare species (fewer than `rare` training images) with their rows of
    the source `metadata.csv` into `target`, as a `generate` folder that other classifiers can read."""
    chosen = {
        record.image.relative_to(arm.source).as_posix()
        for record in arm.generated
        if counts[species_key(record.lineage)] < rare
    }
    with (arm.source / "metadata.csv").open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header, rows = reader.fieldnames, [row for row in reader if row["file_name"] in chosen]
    if target.exists():
        shutil.rmtree(target)  # the benchmark's own export, replaced by this run's
    for row in rows:
        (target / row["file_name"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(arm.source / row["file_name"], target / row["file_name"])
    table = io.StringIO()
    writer = csv.DictWriter(table, header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(target / "metadata.csv", table.getvalue())
    print(f"{name}: {len(rows)} generated images of the rare species copied to {target}")


def filter_classifier(args, table1: Path) -> Path:
    """The classifier `--recipes` filters with: Table 1's committed one, trained on the same real training part."""
    name = f"quality_{args.dataset}{'_quick' if args.quick else ''}"
    folder = (table1 if args.quick else RESULTS) / name / "classifier"
    if not (folder / "config.json").is_file():
        raise SystemExit(f"--recipes filters with Table 1's classifier, which {folder} does not hold: run table1.py")
    return folder


def score_file(scores: Path, arm: str, seed: int) -> Path:
    return scores / f"{arm.replace(' ', '').replace('+', '_').replace(',', '_')}-seed{seed}.json"


@contextmanager
def claim(done: Path):
    """Whether this process holds `done`'s lock (non-blocking): processes of the same command split the
    classifiers between them. flock is released by the kernel when its holder dies, so a killed run leaves no
    stale claim."""
    with (done.parent / f".{done.name}.lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    suffix = "-quick" if args.quick else ""
    table1 = args.table1 or REPO / "benchmarks" / "runs" / f"table1-{args.dataset}{suffix}"
    out = args.out or REPO / "benchmarks" / "runs" / f"augment-{args.dataset}{suffix}"
    out.mkdir(parents=True, exist_ok=True)
    train_csv, heldout_csv = table1 / "data" / "train.csv", table1 / "data" / "heldout.csv"
    pipelines = {name: table1 / "runs" / name / "pipeline" for name in MODELS}
    missing = [str(p) for p in (train_csv, heldout_csv, *pipelines.values()) if not p.exists()]
    if missing:
        raise SystemExit(
            f"run `python benchmarks/table1.py --dataset {args.dataset}{' --quick' if args.quick else ''}` first "
            f"(missing: {', '.join(missing)})"
        )
    steps = 30 if args.quick else 1500  # benchmarks/quality.py's classifier

    # data: the real split, and each model's N images per species
    train_records = read_records("csv", train_csv).records
    taxonomy = read_table(train_csv).taxonomy()
    rare = RARE[args.dataset]
    counts = Counter(species_key(r.lineage) for r in train_records)
    species = Counter({key: n for key, n in counts.items() if len(key) == len(taxonomy.ranks)})  # not coarser labels
    target = 5 if args.quick else fill_target(species, rare)  # quick: fills the 3- and 4-image species
    print(f"{len(train_records)} training images, {len(species)} species; the tail is filled to {target}")
    generated, filtered, accepted, folders = {}, {}, {}, {}
    for name, guidance in MODELS.items():
        folder = folders[name] = out / ("generated-published" if args.published else "generated") / name
        count = ["--per-taxon", str(target)]
        metadata = generate_images(pipelines[name], folder, count, guidance, args.quick, args.published)
        generated[name] = read_generated(metadata, train_records)
        if args.recipes:  # the fill alone, each image kept by the real-image classifier or redrawn
            folder = folders[f"{name}, filtered"] = folder.with_name(f"{folder.name}-filtered")
            count = ["--fill-to", str(target), "--data", "csv", str(train_csv)]
            extra = ["--filter", str(filter_classifier(args, table1)), *FILTER]
            metadata = generate_images(pipelines[name], folder, count, guidance, args.quick, args.published, extra)
            filtered[name], accepted[name] = [r for r, _ in read_generated(metadata, train_records)], acceptance(folder)
    resolution = ClassifierTraining().resolution
    held_records = read_records("csv", heldout_csv).records
    held_images, held_ids = record_pool(held_records, taxonomy, resolution)
    rare_mask = torch.tensor([counts[species_key(r.lineage)] < rare for r in held_records])
    held = (held_images, held_ids, rare_mask)
    plans = {
        "real": Arm(train_records),
        **{
            f"real + {m}": Arm(train_records, fill_records(generated[m], counts, target), source=folders[m])
            for m in MODELS
        },
        **{f"{m} only": Arm([r for r, _ in generated[m]]) for m in MODELS},
    }
    if args.cap:
        plans |= {
            capped_arm(m, args.cap): Arm(
                train_records, fill_records(generated[m], counts, target, args.cap), source=folders[m]
            )
            for m in MODELS
        }
    for m in filtered:
        fill = plans[f"real + {m}"].generated
        for recipe, mixing in RECIPES.items():
            if mixing is None:
                plans[recipe_arm(m, recipe)] = Arm(train_records, filtered[m], source=folders[f"{m}, filtered"])
            else:  # pretraining: a third of the training steps (500 of 1,500)
                mixing = replace(mixing, pretrain_steps=min(mixing.pretrain_steps, steps // 3))
                plans[recipe_arm(m, recipe)] = Arm(train_records, fill, mixing, folders[m])
    arms = arms_of(args.cap, args.recipes)

    # train and score every arm and seed (resumable: one JSON file per finished arm and seed; a second process
    # of the same command, started once the images are made, takes the classifiers the first has not locked)
    scores = out / ("scores-published" if args.published else "scores")
    scores.mkdir(parents=True, exist_ok=True)
    pooled: dict[str, tuple] = {}
    for arm in arms:
        for seed in args.seeds:
            done = score_file(scores, arm, seed)
            with claim(done) as mine:
                if mine and not done.is_file():
                    if arm not in pooled:
                        pooled = {arm: arm_pools(plans[arm], taxonomy, resolution)}  # one arm's images at a time
                    print(f"{arm}, seed {seed}: {size(plans[arm])} training images")
                    scored = train_arm(pooled[arm], plans[arm].recipe, taxonomy, held, steps, seed)
                    write_text_atomic(done, json.dumps(scored) + "\n")
    waiting = [
        f"{arm} (seed {seed})" for arm in arms for seed in args.seeds if not score_file(scores, arm, seed).is_file()
    ]
    if waiting:
        print(f"scored by another process: {', '.join(waiting)}; the last process to finish writes the results")
        return 0
    results = {arm: [json.loads(score_file(scores, arm, seed).read_text()) for seed in args.seeds] for arm in arms}

    sizes = {arm: size(plans[arm]) for arm in arms}
    name = f"augment_{args.dataset}{'_quick' if args.quick else ''}"
    target_dir = out if args.quick else args.results
    record = {"fill_to": target, "seeds": args.seeds, "images": sizes, "scores": results}
    record |= {"filter_acceptance": accepted} if accepted else {}
    write_text_atomic(target_dir / f"{name}.json", json.dumps(record, indent=1) + "\n")
    best = best_arm(results, arms) if args.recipes else None
    if best is not None:  # the rare species' generated images of the best recipe, to be scored by others
        export_rare(plans[best], counts, rare, target_dir / f"{name}_rare", best)
    path = write_results(target_dir, args, results, sizes, target, taxonomy, len(held_records), accepted, best)
    print(f"results: {path}")
    return 0


# -- the results file ---------------------------------------------------------------------------------


def trained_threads(results: dict) -> str:
    """The CPU threads the classifiers trained on, as their score files record them (older ones do not)."""
    threads = sorted({s["threads"] for scores in results.values() for s in scores if "threads" in s})
    unrecorded = sum("threads" not in s for scores in results.values() for s in scores)
    said = f"classifiers trained on {' or '.join(map(str, threads))} CPU thread(s)" if threads else ""
    missing = f"{unrecorded} classifier(s) with their threads not recorded" if unrecorded else ""
    return "; ".join(filter(None, (said, missing)))


def mean_spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * spread:.1f}"


def write_results(
    target_dir: Path, args, results, sizes, target: int, taxonomy, held: int, accepted: dict[str, str], best
) -> Path:
    columns = [r.value for r in taxonomy.ranks if taxonomy.num_taxa(r) > 1] + ["rare species", "common species"]
    rows = [["arm", "training images", *(c.replace("specific_epithet", "species (all)") for c in columns)]]
    arms = arms_of(args.cap, args.recipes)
    for arm in arms:
        rows.append([arm, str(sizes[arm]), *(mean_spread([s[c] for s in results[arm]]) for c in columns)])
    real = results["real"]
    deltas = [["arm", "rare species", "common species"]]
    for arm in (a for a in arms if a.startswith("real + ")):  # every arm with the real images
        deltas.append(
            [arm]
            + [
                f"{100 * (statistics.fmean(s[c] for s in results[arm]) - statistics.fmean(s[c] for s in real)):+.1f}"
                for c in ("rare species", "common species")
            ]
        )
    label = LABELS[args.dataset]
    rare_folder = f"augment_{args.dataset}{'_quick' if args.quick else ''}_rare"  # export_rare's
    text = "\n".join(
        [
            f"## {label}",
            "",
            f"Command: `python benchmarks/augment.py --dataset {args.dataset}{' --quick' if args.quick else ''}"
            f"{f' --cap {args.cap:g}' if args.cap else ''}{' --recipes' if args.recipes else ''}"
            f"{' --published' if args.published else ''}` (resumable). "
            "Generated with "
            f"{'PNDM 25 steps' if args.published else 'the fast preset (DPM-Solver++ 8, trailing)'}, scale 3"
            f"{'; `--recipes` as the script documents them' if args.recipes else ''}. "
            f"Tail filled to {target} images per species; {held} real held-out images; accuracy in % "
            f"(mean ± standard deviation over seeds {', '.join(map(str, args.seeds))}); {trained_threads(results)}.",
            "",
            markdown_table(rows),
            "",
            "Change against `real` (points):",
            "",
            markdown_table(deltas),
            "",
            *(f"Filtered fill of {m}: {text}." for m, text in accepted.items()),
            *([""] if accepted else []),
            *(
                [
                    f"Highest rare-species accuracy: `{best}`. Its generated images of the rare species, with their "
                    f"rows of `metadata.csv`: [{rare_folder}/]({rare_folder}/).",
                    "",
                ]
                if best
                else []
            ),
        ]
    )
    path = target_dir / f"augment{'_quick' if args.quick else ''}.md"
    sections = _sections(path)
    sections[label] = text
    header = [
        "# Synthetic training sets for the long tail",
        "",
        "`benchmarks/augment.py`: the taxonomic classifier trained on real images, on real images with the tail "
        "filled by a model, and on generated images only (CAS), scored on real held-out images.",
        "",
    ]
    write_keeping_section(path, "\n".join(header + [sections[k] for k in LABELS.values() if k in sections]))
    return path


def _sections(path: Path) -> dict[str, str]:
    """The per-dataset sections the results file already holds (the other dataset's are kept)."""
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8").split("## Reading")[0]
    found = {}
    for label in LABELS.values():
        start = text.find(f"## {label}\n")
        if start >= 0:
            ends = [text.find(f"## {o}\n", start + 1) for o in LABELS.values() if o != label]
            end = min([e for e in ends if e > start] or [len(text)])
            found[label] = text[start:end].rstrip() + "\n"
    return found


if __name__ == "__main__":
    sys.exit(main())
