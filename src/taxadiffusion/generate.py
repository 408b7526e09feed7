"""Synthetic training sets (`taxadiffusion generate`): images of many taxa, written as an image dataset that the
project's `csv` reader and Hugging Face `datasets` ("imagefolder") both load.

Layout of the output folder:

    images/<taxon>/<tag>-<index>.png    one image; <tag> names the model, sampling settings and seed
    metadata.csv                        file_name (relative), the lineage, the sampling settings, each seed
    generation.json                     what the <tag>s stand for

Each image's seed is a function of the run's seed, the taxon's names and the image's index, never of the batch. The
plan is sampled in fixed blocks of `--batch-size` items, so a rerun, a resumed run or another number of processes
gives the same images bit for bit; another batch size gives the same images up to float rounding (about one 8-bit
level on a few pixels in a thousand: convolution kernels choose their algorithm by batch size). An image is written
under a temporary name and renamed, so a killed run leaves no half-written file; the same command continues from
the images on disk. `metadata.csv` is rewritten (atomically) from the images on disk, at intervals and at the end,
so each of its rows names a complete image. Across processes (`accelerate launch`) each process draws the items of
its own blocks (block k goes to process k mod N) and the main process writes the metadata."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

import numpy as np
import torch

from .atomic import append_durably, atomic_file, temporary, write_text_atomic
from .errors import InputError, OutputExists
from .filtering import COLUMNS as FILTER_COLUMNS
from .filtering import SUMMARY as FILTER_SUMMARY
from .filtering import ImageFilter, filtered_block, journal_block, read_journals, retry_seed, summarize
from .names import lineage_folder
from .sampling import SamplingSettings
from .taxonomy import AmbiguousTaxonError, Lineage, Rank, Taxonomy, UnknownTaxonError

METADATA_FILE = "metadata.csv"
GENERATION_FILE = "generation.json"
MAX_IMAGES = 10_000_000


@dataclass(frozen=True)
class Item:
    """One image to generate: its taxon's lineage, its index within the taxon, its seed; `prompt`, where the image
    is conditioned on another lineage than its taxon's (a model that knows only species draws a genus through its
    species in turn, `evaluate` does so for the flat and full baselines)."""

    lineage: Lineage
    index: int
    seed: int
    prompt: Lineage | None = None

    @property
    def condition(self) -> Lineage:
        """What the pipeline is given for this image."""
        return self.prompt or self.lineage


@dataclass
class GenerationPlan:
    """The images of a run, in a fixed order; `counts` per taxon, for the plan and the summary."""

    items: list[Item]
    source: str  # what decided the counts ("--per-taxon 10 at species", "--fill-to 30 counting DATA", ...)

    @property
    def taxa(self) -> int:
        return len({item.lineage.names for item in self.items})

    def describe(self) -> str:
        counts = Counter(item.lineage.names for item in self.items)
        low, high = (min(counts.values()), max(counts.values())) if counts else (0, 0)
        return f"{len(self.items):,} images of {len(counts):,} taxa ({low}..{high} per taxon; {self.source})"


# -- the plan ---------------------------------------------------------------------------------------


def taxon_seed(seed: int, lineage: Lineage, index: int) -> int:
    """The seed of image `index` of a taxon: from the run's seed, the taxon's names and the index alone."""
    digest = hashlib.blake2b("\x1f".join(lineage.names).encode(), digest_size=8).digest()
    words = np.frombuffer(digest, dtype=np.uint32).tolist()
    return int(np.random.SeedSequence([seed, *words, index]).generate_state(1)[0])


def plan_items(counts: Sequence[tuple[Lineage, int]], seed: int, prompt: Callable | None = None) -> list[Item]:
    """Images 0..n-1 of each (lineage, n), in that order; `prompt(lineage, index)` gives the lineage an image is
    conditioned on when it is not its taxon's own."""
    return [
        Item(lineage, i, taxon_seed(seed, lineage, i), prompt(lineage, i) if prompt else None)
        for lineage, n in counts
        for i in range(n)
    ]


def _check_total(total: int) -> None:
    if total > MAX_IMAGES:
        raise InputError(f"the plan holds {total:,} images, more than {MAX_IMAGES:,}; generate in parts")


def plan_per_taxon(taxonomy: Taxonomy, n: int, rank: Rank | str | None = None, seed: int = 0) -> GenerationPlan:
    """`n` images of every taxon at `rank` (default the finest)."""
    if n < 1:
        raise InputError(f"--per-taxon must be >= 1, got {n}")
    rank = Rank.parse(rank) if rank else taxonomy.ranks[-1]
    taxa = [taxonomy.lineage(t) for t in taxonomy.taxa(rank)]
    _check_total(n * len(taxa))
    return GenerationPlan(plan_items([(lineage, n) for lineage in taxa], seed), f"--per-taxon {n} at {rank}")


def plan_fill_to(
    taxonomy: Taxonomy, target: int, real: Sequence[Lineage], seed: int = 0, source: str = "the dataset"
) -> GenerationPlan:
    """Top every species of the model's taxonomy up to `target` images, counting the real ones (`real`: the
    lineages of a dataset's images); species with `target` or more real images get none."""
    if target < 1:
        raise InputError(f"--fill-to must be >= 1, got {target}")
    species_rank = taxonomy.ranks[-1]
    have = Counter(lineage.names for lineage in real if lineage.depth == len(taxonomy.ranks))
    counts = [(taxonomy.lineage(t), max(0, target - have[t.path])) for t in taxonomy.taxa(species_rank)]
    _check_total(sum(n for _, n in counts))
    return GenerationPlan(plan_items([c for c in counts if c[1]], seed), f"--fill-to {target} counting {source}")


def parse_taxa_line(line: str) -> tuple[str, ...]:
    """A line of a --taxa file: one name at any rank, or a lineage from the top rank down with its names
    separated by '>' or ';' ("Actinopterygii > Perciformes > Pomacentridae")."""
    if not line.strip():
        return ()
    for separator in (">", ";"):
        if separator in line:
            return tuple(part.strip() for part in line.split(separator) if part.strip())
    return (line.strip(),)


def plan_taxa(
    taxonomy: Taxonomy, lines: Sequence[str], n: int, seed: int = 0, source: str = "--taxa"
) -> GenerationPlan:
    """`n` images of each taxon named in `lines`. Every unknown or ambiguous name is reported at once, with
    suggestions and a count, before anything is generated."""
    if n < 1:
        raise InputError(f"--per-taxon must be >= 1, got {n}")
    lineages, problems = [], []
    for line in lines:
        parts = parse_taxa_line(line)
        if not parts:
            continue
        try:
            taxon = taxonomy.by_path(parts) if len(parts) > 1 else taxonomy.resolve(parts[0])
        except (UnknownTaxonError, AmbiguousTaxonError) as error:
            problems.append(str(error))
            continue
        lineage = taxonomy.lineage(taxon)
        if lineage not in lineages:
            lineages.append(lineage)
    if problems:
        listed = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise InputError(f"{len(problems)} of {len(lines)} names in {source} are not in the model:\n  {listed}")
    if not lineages:
        raise InputError(f"{source} names no taxon")
    _check_total(n * len(lineages))
    return GenerationPlan(plan_items([(lineage, n) for lineage in lineages], seed), f"{source}, {n} per taxon")


# -- the output folder ------------------------------------------------------------------------------


def generation_tag(key: dict) -> str:
    """A short name for what decides the pixels (model, sampling settings, seed): part of every file name, so
    images of other settings added to the same folder never clash."""
    return hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=4).hexdigest()


def image_path(lineage: Lineage, tag: str, index: int) -> str:
    """The image's path relative to the output folder."""
    return f"images/{lineage_folder(lineage.names)}/{tag}-{index:05d}.png"


def claim_output(out: Path, key: dict, add: bool) -> str:
    """Record this run's settings in `generation.json`; a folder holding images of other settings is refused
    unless `add` (then both kinds stay, told apart by their tags). A non-empty folder that is not a generated
    dataset is refused."""
    tag = generation_tag(key)
    record_file = out / GENERATION_FILE
    known: dict = {}
    if record_file.is_file():
        try:
            known = json.loads(record_file.read_text(encoding="utf-8"))["tags"]
        except (OSError, ValueError, KeyError, TypeError):
            raise InputError(f"{record_file} is damaged; move it away to start a new dataset in {out}") from None
    elif out.is_dir() and any(out.iterdir()):
        raise OutputExists(f"{out} is not empty and holds no {GENERATION_FILE}: choose another --out")
    others = [t for t in known if t != tag]
    if others and not add:
        changed = sorted(k for k in key if any(known[t].get(k) != key[k] for t in others))
        raise OutputExists(
            f"{out} holds images generated with other {', '.join(changed) or 'settings'}; pass --add to add these "
            "to them (each row of metadata.csv names its settings), or choose another --out"
        )
    known[tag] = key
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(record_file, json.dumps({"tags": known}, indent=1) + "\n")
    return tag


def metadata_columns(ranks: Sequence[Rank], filtered: bool = False) -> list[str]:
    columns = ["file_name", *(r.value for r in ranks), "scientific_name", "index", "seed", "tag", *SETTING_COLUMNS]
    return columns + list(FILTER_COLUMNS) if filtered else columns


# Every sampling setting, named as the pipeline's sampling.json names it (a setting added there is a column here).
SETTING_COLUMNS = tuple(f.name for f in dataclasses.fields(SamplingSettings))


def metadata_row(taxonomy: Taxonomy, item: Item, tag: str, key: dict, decided: dict | None = None) -> dict:
    """One image's row: its file, the exact names of its lineage, the seed that drew it and the settings that made
    it; for a filtered run (`decided`: the filter's journal, filtering.py) also the classifier's score, the
    attempt that was kept and the rank checked."""
    settings = {name: json.dumps(key[name]) if name == "window" else key[name] for name in SETTING_COLUMNS}
    entry = (decided or {}).get((item.lineage.names, item.index), {})
    row = {
        "file_name": image_path(item.lineage, tag, item.index),
        **dict(zip((r.value for r in taxonomy.ranks), item.lineage.names, strict=False)),
        "scientific_name": item.lineage.scientific_name,
        "index": item.index,
        "seed": retry_seed(item.seed, entry.get("attempt") or 0),
        "tag": tag,
        **settings,
    }
    if decided is not None:
        row |= {"score": entry.get("score"), "attempt": entry.get("attempt"), "rank_checked": entry.get("rank")}
    return row


def append_metadata(
    out: Path, taxonomy: Taxonomy, items: Sequence[Item], tag: str, key: dict, decided: dict | None = None
) -> bool:
    """Append the rows of images just written to `metadata.csv` (flushed to disk): linear in the images, where a
    rewrite per batch would be quadratic. A line torn by a kill is cut off first. Returns False (nothing
    appended) when the table's header is another's; the rewrite at the end (`write_metadata`) sorts, drops
    duplicates and settles every case."""
    table = out / METADATA_FILE
    columns = metadata_columns(taxonomy.ranks, decided is not None)
    fresh = not table.is_file() or table.stat().st_size == 0
    if not fresh:
        with open(table, "rb+") as handle:
            header = handle.readline().decode("utf-8", errors="replace").rstrip("\r\n")
            if header != ",".join(columns):
                return False
            size = handle.seek(0, os.SEEK_END)
            start = handle.seek(max(0, size - 65536))
            tail = handle.read()
            if not tail.endswith(b"\n"):  # a torn last line: cut back to the last whole one
                handle.truncate(start + tail.rfind(b"\n") + 1)
    buffer = StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    if fresh:
        writer.writeheader()
    writer.writerows(metadata_row(taxonomy, item, tag, key, decided) for item in items)
    append_durably(table, buffer.getvalue())
    return True


def write_metadata(
    out: Path, taxonomy: Taxonomy, plan: GenerationPlan, tag: str, key: dict, decided: dict | None = None
) -> int:
    """Rewrite `metadata.csv` from the images on disk: the rows of this run's images that exist, and the rows of
    other runs (other tags) kept from the previous table where their image exists. Returns the row count."""
    columns = metadata_columns(taxonomy.ranks, decided is not None)
    rows: dict[str, dict] = {}
    table = out / METADATA_FILE
    if table.is_file():
        with open(table, encoding="utf-8", newline="") as handle:
            for row in csv.DictReader(handle):
                if row.get("tag") != tag and (out / row.get("file_name", "")).is_file():
                    rows[row["file_name"]] = row
    for item in plan.items:
        name = image_path(item.lineage, tag, item.index)
        if (out / name).is_file():
            rows[name] = metadata_row(taxonomy, item, tag, key, decided)
    buffer = StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for name in sorted(rows):
        writer.writerow(rows[name])
    write_text_atomic(table, buffer.getvalue())
    return len(rows)


def generated_files(folder: Path, ranks: tuple[Rank, ...]) -> tuple[dict[tuple[str, ...], list[Path]], int]:
    """A `generate` folder's images by lineage names (its `ranks` columns), in the order of its metadata.csv, and
    the number of rows whose image is gone (moved or deleted after generation: counted, never scored)."""
    found: dict[tuple[str, ...], list[Path]] = {}
    missing = 0
    with open(folder / METADATA_FILE, newline="", encoding="utf-8") as file:
        for row in csv.DictReader(file):
            path = folder / row["file_name"]
            if not path.is_file():
                missing += 1
                continue
            names = tuple(row[rank.value] for rank in ranks if row.get(rank.value))
            found.setdefault(names, []).append(path)
    return found, missing


# -- generating -------------------------------------------------------------------------------------


@dataclass
class GenerationResult:
    written: int  # images this call made
    existing: int  # images of the plan already on disk (a resumed run)
    rows: int  # rows of metadata.csv (all tags)
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def generate(
    pipe,
    plan: GenerationPlan,
    out: str | Path,
    key: dict,
    *,
    batch_size: int = 16,
    shard: tuple[int, int] = (0, 1),
    write_table: bool = True,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,  # after each batch: the plan items this run has decided
    image_filter: ImageFilter | None = None,
    taxonomy: Taxonomy | None = None,
    label: str = "generating",
) -> GenerationResult:
    """Make the plan's images that are not on disk yet, `batch_size` at a time, with the pipeline's sampling
    settings (`key`: `generation_key` of the pipeline; the folder claimed with `claim_output` first).
    `shard` = (process index, number of processes): the plan is cut into blocks of `batch_size` items, and this
    process makes blocks k with k mod N = index; a block with any image missing is sampled whole.
    `write_table`: this process appends each batch's rows to metadata.csv and rewrites it sorted at the end; with
    several processes none does, and the main one calls `write_metadata` once all have finished.
    `image_filter`: keep only the images a classifier places in their taxon, redrawing rejected ones
    (filtering.py); an image rejected at every attempt is counted, not made. `taxonomy`: the ranks that
    metadata.csv names (default the pipeline's; `evaluate` gives the dataset's for a one-text model). `label`: the
    progress bar's (`evaluate` names the rank)."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    out = Path(out)
    taxonomy = taxonomy or pipe.taxonomy
    index, processes = shard
    tag = generation_tag(key)
    # Fixed blocks of `batch_size` plan items, block k made by process k mod N: an image's pixels depend on its
    # seed and its block alone, not on kills, reruns or the number of processes. (Across batch sizes they agree
    # to float rounding only: the convolution kernels choose their algorithm by batch size.)
    blocks = [plan.items[k : k + batch_size] for k in range(0, len(plan.items), batch_size)][index::processes]
    mine = [item for block in blocks for item in block]
    for item in mine:  # a killed run's partial file (never counted as an image) of this shard
        target = out / image_path(item.lineage, tag, item.index)
        temporary(target).unlink(missing_ok=True)

    decided = read_journals(out, tag) if image_filter is not None else None

    def given_up(item: Item) -> bool:  # a filtered image rejected at every attempt: decided, never on disk
        entry = (decided or {}).get((item.lineage.names, item.index))
        return entry is not None and not entry["kept"]

    def missing(block: list[Item]) -> list[Item]:
        return [
            item
            for item in block
            if not (out / image_path(item.lineage, tag, item.index)).is_file() and not given_up(item)
        ]

    existing = len(mine) - sum(len(missing(block)) for block in blocks)
    start, written, finished = time.perf_counter(), 0, 0
    bar = tqdm(total=len(mine), initial=existing, desc=label, unit="img", disable=not progress)
    for block in blocks:
        todo = missing(block)
        if not todo:
            continue
        images = draw_block(pipe, block, image_filter)  # the whole block, always
        made = [item for item in todo if images[item] is not None]
        for item in made:
            target = out / image_path(item.lineage, tag, item.index)
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(target) as tmp:
                images[item].save(tmp, format="PNG")
        if image_filter is not None:  # after the images: a decision on record is one whose image is on disk
            decided.update(journal_block(out, tag, index, images.outcome, image_filter.rank))
        written, finished = written + len(made), finished + len(todo)
        bar.update(len(todo))
        if write_table:  # a killed run's table lists what it made
            append_metadata(out, taxonomy, made, tag, key, decided)
        if on_batch is not None:  # the items decided so far (a filter may keep none of a batch)
            on_batch(finished)
    bar.close()
    seconds = time.perf_counter() - start
    rows = write_metadata(out, taxonomy, plan, tag, key, decided) if write_table else 0
    if write_table and image_filter is not None:
        write_text_atomic(out / FILTER_SUMMARY, json.dumps(summarize(read_journals(out, tag)), indent=1) + "\n")
    return GenerationResult(written, existing, rows, seconds)


class DrawnBlock(dict):
    """A block's images by item (None: rejected at every attempt), with the filter's outcome when there is one."""

    outcome: dict


def draw_block(pipe, block: list[Item], image_filter: ImageFilter | None) -> DrawnBlock:
    """Sample a block whole from its items' seeds; with a filter, redraw its rejected items (filtering.py)."""
    drawn = DrawnBlock()
    if image_filter is None:
        generators = [torch.Generator().manual_seed(item.seed) for item in block]
        drawn.update(zip(block, pipe([item.condition for item in block], generator=generators).images, strict=True))
        return drawn
    drawn.outcome = filtered_block(pipe, block, image_filter)
    drawn.update({item: image for item, (image, _, _) in drawn.outcome.items()})
    return drawn


def estimate(seconds_per_image: float, images: int) -> str:
    """A duration as a person reads it."""
    total = seconds_per_image * images
    if total < 60:
        return f"{total:.0f} s"
    return f"{total / 3600:.1f} h" if total >= 3600 else f"{math.ceil(total / 60)} min"


def plan_request(
    taxonomy: Taxonomy,
    *,
    per_taxon: int | None = None,
    fill_to: int | None = None,
    data: tuple[str, str] | None = None,
    root: str | Path | None = None,
    taxa: str | Path | None = None,
    rank: str | None = None,
    seed: int = 0,
) -> GenerationPlan:
    """The plan a `generate` command asks for: `fill_to` tops every species up to N images counting the real ones
    of `data`; `taxa` names taxa one per line (`per_taxon` each, default 10); else `per_taxon` of every taxon at
    `rank`."""
    if fill_to is not None:
        if not data:
            raise InputError("--fill-to counts the real images of a dataset: give --data FORMAT PATH")
        from .data.readers import read_records
        from .data.records import flatten_to_species

        real = read_records(data[0], data[1], root=root)
        if tuple(taxonomy.ranks) == (Rank.SPECIFIC_EPITHET,) and len(real.ranks) > 1:
            real = flatten_to_species(real)  # a flat model names its species by their binomial alone
        if tuple(real.ranks) != tuple(taxonomy.ranks):
            raise InputError(f"--data has ranks {', '.join(real.ranks)}; the model {', '.join(taxonomy.ranks)}")
        return plan_fill_to(taxonomy, fill_to, [record.lineage for record in real], seed, source=data[1])
    if taxa is not None:
        from .resolver import read_names_file

        return plan_taxa(taxonomy, read_names_file(taxa), per_taxon or 10, seed, source=str(taxa))
    if per_taxon is None:
        raise InputError("say what to generate: --per-taxon N, --fill-to N --data FORMAT PATH, or --taxa FILE")
    return plan_per_taxon(taxonomy, per_taxon, rank, seed)


def generate_sharded(
    pipe, plan: GenerationPlan, out: Path, key: dict, batch_size: int, image_filter: ImageFilter | None = None
) -> tuple[GenerationResult, int]:
    """`generate` in every process of an `accelerate launch` (or alone): each makes its blocks of the plan, the
    main process prints the estimated time after the first batch and writes `metadata.csv` once all are done.
    Returns this process's result and the rows `metadata.csv` lists."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    state = PartialState()
    single = state.num_processes == 1
    begun, said = time.perf_counter(), []

    def on_batch(done: int) -> None:  # the plan's estimated time, from the first batch
        if not said and state.is_main_process:
            said.append(True)
            per_image = (time.perf_counter() - begun) / done
            tqdm.write(f"estimated: {estimate(per_image, len(plan.items) // state.num_processes)} in all")

    result = generate(
        pipe,
        plan,
        out,
        key,
        batch_size=batch_size,
        shard=(state.process_index, state.num_processes),
        write_table=single,
        progress=state.is_main_process,
        on_batch=on_batch,
        image_filter=image_filter,
    )
    state.wait_for_everyone()
    rows = result.rows
    if state.is_main_process and not single:
        decided = read_journals(out, generation_tag(key)) if image_filter is not None else None
        rows = write_metadata(out, pipe.taxonomy, plan, generation_tag(key), key, decided)
        if decided is not None:
            write_text_atomic(out / FILTER_SUMMARY, json.dumps(summarize(decided), indent=1) + "\n")
    return result, rows


def done_line(result: GenerationResult, rows: int, out: Path) -> str:
    """What `generate` says at its end: images made, found, listed, and what a filter kept."""
    made = f"{result.written:,} images made ({result.images_per_second:.2f} images/s)" if result.written else None
    filtered = (out / FILTER_SUMMARY).is_file()
    found = "places already decided (kept or given up)" if filtered else "already there"  # a filter gives up some
    line = f"done: {made or 'no image left to make'}, {result.existing:,} {found}; "
    line += f"{out / METADATA_FILE} lists {rows:,} images"
    if filtered:
        summary = json.loads((out / FILTER_SUMMARY).read_text(encoding="utf-8"))
        acceptance = "" if summary["acceptance"] is None else f" (acceptance {summary['acceptance']:.1%})"
        line += (
            f"; the filter kept {summary['kept']:,}, rejected {summary['rejected']:,} draws{acceptance}, "
            f"gave up on {summary['given_up']:,} (per taxon: {out / FILTER_SUMMARY})"
        )
    return line
