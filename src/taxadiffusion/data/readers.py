"""One reader per published metadata format; each returns a `RecordSet`.

Readers never open images (that is `data check`'s job) so that listing a million-image dataset is
fast. Rows that cannot become a record are counted in `RecordSet.skipped` by reason, never dropped
silently.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath

from ..errors import InputError, MissingInput, UnreadableFile
from ..taxonomy import BIOSCAN_RANKS, FISHNET_RANKS, INAT21_RANKS, STANDARD_RANKS, Rank, parse_ranks
from .records import RecordSet

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

# Values that mean "not labelled" in the published metadata files.
_MISSING = frozenset({"", "nan", "none", "null", "na", "n/a", "not_classified", "unknown"})


def _clean(value: object) -> str | None:
    text = "" if value is None else " ".join(str(value).split())
    return None if text.lower() in _MISSING else text


def _epithet(species: str | None, genus: str | None) -> tuple[str | None, str | None]:
    """Split a species column into (genus, epithet).

    Published tables write the binomial (`"Amphiprion clarkii"`); the species rank is conditioned on
    the epithet only. A one-word value is taken as the epithet itself.
    """
    if not species:
        return genus, None
    words = species.split()
    if len(words) == 1:
        return genus, words[0]
    return genus or words[0], " ".join(words[1:])


def _split_from_name(path: Path) -> str | None:
    stem = path.stem.lower()
    for split in ("train", "val", "test"):
        if stem == split or stem.startswith(split + "_") or stem.startswith(split + "-"):
            return split
    if stem.startswith("validation"):
        return "val"
    return None


def _require_file(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{what} not found: {path}")
    return path


def _read_table(path: Path) -> Iterator[dict[str, str]]:
    """Rows of a CSV/TSV (delimiter from the suffix) or of a JSON-lines file."""
    try:
        yield from _table_rows(path)
    except UnicodeDecodeError as error:
        raise UnreadableFile(path, f"not UTF-8 text (byte {error.start})", "save it as UTF-8") from None


def _table_rows(path: Path) -> Iterator[dict[str, str]]:
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as error:
                        raise InputError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        return
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    with path.open(encoding="utf-8-sig", newline="") as handle:
        yield from csv.DictReader(handle, delimiter=delimiter)


def _columns_by_rank(columns: Iterable[str]) -> dict[Rank, str]:
    """Map standard ranks to the table's column names (case-insensitive; `species` allowed)."""
    found: dict[Rank, str] = {}
    for column in columns:
        try:
            rank = Rank.parse(column)
        except ValueError:
            continue
        # Prefer an exact `specific_epithet` column over a `species` column.
        if rank not in found or column.strip().lower() == rank.value:
            found[rank] = column
    return found


def _split_binomial(values: dict[Rank, str | None], fill_genus: bool) -> dict[Rank, str | None]:
    """A binomial in the species column becomes its epithet (what the species rank conditions on); its
    genus fills the genus column when the table has one, or always with `fill_genus`."""
    if values.get(Rank.SPECIFIC_EPITHET):
        genus, values[Rank.SPECIFIC_EPITHET] = _epithet(values[Rank.SPECIFIC_EPITHET], values.get(Rank.GENUS))
        if fill_genus or Rank.GENUS in values:
            values[Rank.GENUS] = genus
    return values


def _class_to_species(row: dict, columns: tuple[str, str, str, str], species: str) -> dict[Rank, str | None]:
    """The five FishNet/BIOSCAN ranks from a row: class, order, family and genus columns plus a species
    column holding the binomial (its genus fills a missing genus column)."""
    genus, epithet = _epithet(_clean(row.get(species)), _clean(row.get(columns[3])))
    values = {rank: _clean(row.get(column)) for rank, column in zip(FISHNET_RANKS[:3], columns[:3], strict=True)}
    return {**values, Rank.GENUS: genus, Rank.SPECIFIC_EPITHET: epithet}


SCIENTIFIC_NAME_COLUMNS = ("scientific_name", "scientificname", "binomial", "taxon", "name")


def _scientific_name(row: dict) -> str | None:
    column = next((c for c in row if c and c.strip().lower() in SCIENTIFIC_NAME_COLUMNS), None)
    return _clean(row.get(column)) if column else None


class _Completion:
    """`--resolve-taxonomy`: rows that name a species or genus get their missing ranks from the
    iNaturalist taxonomy (lineage.py). Every distinct name is resolved once, in one join."""

    def __init__(self, rows: list[tuple[dict[Rank, str | None], str | None]]):
        from ..resolver import LineageResolver, query_name

        self.names = [
            None if all(values.get(r) for r in STANDARD_RANKS) else query_name(values, scientific)
            for values, scientific in rows
        ]
        unique = sorted({n for n in self.names if n})
        self.resolutions = dict(zip(unique, LineageResolver().resolve_many(unique), strict=True))

    def values(self, index: int, values: dict[Rank, str | None]) -> tuple[dict[Rank, str | None], str | None]:
        """The completed values, and a skip reason when the row stays incomplete."""
        from ..resolver import complete

        name = self.names[index]
        if name is None:
            return {r: values.get(r) for r in STANDARD_RANKS}, None
        resolution = self.resolutions[name]
        completed = complete(values, resolution)
        if completed is not None:
            return completed, None
        if values.get(Rank.KINGDOM):  # the row's own ranks still make a lineage: keep them
            return {r: values.get(r) for r in STANDARD_RANKS}, None
        return values, f"name {resolution.status} in the iNaturalist taxonomy"

    def problems(self) -> list[str]:
        """Messages for the names that did not resolve (with close matches), for the user."""
        return [r.message() for r in self.resolutions.values() if r.status != "resolved"]


# -- iNaturalist 2021 ----------------------------------------------------------------------------


def read_inat21(path: str | Path, root: str | Path | None = None) -> RecordSet:
    """iNat21 `train.json`/`val.json` (COCO style); image paths are `root / file_name`.

    `root` defaults to the JSON file's folder, where the release unpacks `train/` and `val/`.
    """
    path = _require_file(Path(path), "iNat21 JSON")
    root = Path(root) if root is not None else path.parent
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise UnreadableFile(path, f"not UTF-8 text (byte {error.start})", "save it as UTF-8") from None
    except json.JSONDecodeError as error:
        raise UnreadableFile(path, f"not valid JSON ({error})", "an iNat21 file is COCO-style JSON") from None
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise InputError(f"{path} is not an iNat21 file: no {key!r} list")
    # Each category's names are read once: the release has 2.7 M images of 10,000 categories.
    values_of = {c["id"]: {rank: _clean(c.get(rank.value)) for rank in INAT21_RANKS} for c in data["categories"]}
    label_of = {a["image_id"]: a.get("category_id") for a in data["annotations"]}
    out = RecordSet(INAT21_RANKS, source=str(path))
    split = _split_from_name(path)
    for image in data["images"]:
        values = values_of.get(label_of.get(image["id"]))
        if values is None:
            out.skip("no annotation" if image["id"] not in label_of else "unknown category")
            continue
        out.add(root / image["file_name"], values, split)
    return out


# -- FishNet ---------------------------------------------------------------------------------------


def read_fishnet_boxes(path: str | Path) -> dict[str, tuple[int, int, int, int]]:
    """FishNet's bounding boxes: a JSON object {image id: {"x", "y", "w", "h"}} in pixels, the image id being
    the image's file name without its extension."""
    path = _require_file(Path(path), "FishNet bounding-box JSON")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UnreadableFile(path, f"not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise UnreadableFile(path, "expected a JSON object {image id: {x, y, w, h}}")
    boxes = {}
    for key, box in data.items():
        try:
            x, y, w, h = (int(box[k]) for k in ("x", "y", "w", "h"))
        except (KeyError, TypeError, ValueError):
            raise UnreadableFile(path, f"box {key!r} is not {{x, y, w, h}} in pixels: {box!r}") from None
        if w > 0 and h > 0 and x >= 0 and y >= 0:
            boxes[str(key)] = (x, y, w, h)
    return boxes


def read_fishnet(path: str | Path, root: str | Path | None = None, boxes: str | Path | None = None) -> RecordSet:
    """FishNet `anns/{train,test}.csv`; the image is `root / Folder / basename(image)`.

    `species` is empty for most iNat-sourced rows (labelled to genus); FishBase rows give the image as
    a URL whose file name is the stored file. Class names are kept as given (the release mixes
    `Actinopterygii` and `Actinopteri`). With `boxes` (the release's bounding-box JSON) each record carries its
    fish's box where there is one, which the `fishnet` crop policy crops to first, as published.
    """
    path = _require_file(Path(path), "FishNet CSV")
    root = Path(root) if root is not None else path.parent
    table = read_fishnet_boxes(boxes) if boxes is not None else {}
    out = RecordSet(FISHNET_RANKS, source=str(path))
    split = _split_from_name(path)
    boxed = 0
    for row in _read_table(path):
        folder, image = _clean(row.get("Folder")), _clean(row.get("image"))
        if not folder or not image:
            out.skip("no image path")
            continue
        values = _class_to_species(row, ("Class", "Order", "Family", "Genus"), "species")
        name = PurePosixPath(image).name
        box = table.get(PurePosixPath(name).stem)
        if out.add(root / folder / name, values, split, box=box) and box is not None:
            boxed += 1
    if boxes is not None:
        out.notes.append(f"{boxed} of {len(out.records)} images have a bounding box ({boxes})")
    return out


# -- BIOSCAN-1M --------------------------------------------------------------------------------------


def read_bioscan(path: str | Path, root: str | Path | None = None) -> RecordSet:
    """BIOSCAN-1M metadata TSV; the image is `root / part<chunk_number> / image_file`.

    `not_classified` marks an unknown rank; the `split` column is kept as given.
    """
    path = _require_file(Path(path), "BIOSCAN-1M metadata")
    root = Path(root) if root is not None else path.parent
    out = RecordSet(BIOSCAN_RANKS, source=str(path))
    for row in _read_table(path):
        image = _clean(row.get("image_file"))
        if not image:
            out.skip("no image path")
            continue
        chunk = _clean(row.get("chunk_number"))
        folder = root / f"part{chunk}" if chunk else root
        values = _class_to_species(row, ("class", "order", "family", "genus"), "species")
        out.add(folder / image, values, _clean(row.get("split")))
    return out


# -- folder per taxon + taxonomy table ----------------------------------------------------------------


def _image_files(folder: Path) -> tuple[list[Path], int]:
    images, others = [], 0
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        if file.suffix.lower() in IMAGE_SUFFIXES:
            images.append(file)
        elif not file.name.startswith("."):
            others += 1
    return images, others


def read_folder(
    path: str | Path, root: str | Path | None = None, table: str | Path | None = None, resolve: bool = False
) -> RecordSet:
    """One folder of images per taxon plus a table mapping each folder to its ranks.

    The table (default `PATH/taxonomy.csv`) has a `folder` column and one column per rank. Image folders
    are looked up under `root` (default: `PATH`, or the one sub-folder of `PATH` that holds them, as in
    `fish4knowledge/fish_image/<folder>`). `resolve`: complete missing ranks from a species/genus name
    (genus + epithet columns, a `scientific_name` column, or the folder name itself) via iNaturalist.
    """
    path = Path(path)
    if not path.is_dir():
        raise MissingInput(f"folder dataset not found: {path}")
    table_path = _require_file(Path(table) if table else path / "taxonomy.csv", "taxonomy table")
    rows = list(_read_table(table_path))
    if not rows:
        raise InputError(f"taxonomy table {table_path} has no rows")
    columns = list(rows[0])
    folder_column = next((c for c in columns if c.strip().lower() in ("folder", "dir", "directory")), None)
    if folder_column is None:
        raise InputError(f"taxonomy table {table_path} needs a 'folder' column; it has {', '.join(columns)}")
    rank_columns = _columns_by_rank(columns)
    if not rank_columns and not resolve:
        raise InputError(
            f"taxonomy table {table_path} has no rank columns ({', '.join(STANDARD_RANKS)}); "
            "pass --resolve-taxonomy to look species names up in the iNaturalist taxonomy"
        )
    ranks = STANDARD_RANKS if resolve else tuple(r for r in STANDARD_RANKS if r in rank_columns)
    lineage_of = {row[folder_column].strip(): row for row in rows if row.get(folder_column, "").strip()}
    values_of = {}
    for folder, row in lineage_of.items():
        values = {rank: _clean(row.get(column)) for rank, column in rank_columns.items()}
        values_of[folder] = _split_binomial(values, fill_genus=resolve)
    unresolved: dict[str, str] = {}
    notes: list[str] = []
    if resolve:
        folders = sorted(values_of)
        completion = _Completion(
            [(values_of[f], _scientific_name(lineage_of[f]) or f.replace("_", " ")) for f in folders]
        )
        notes = completion.problems()
        for index, folder in enumerate(folders):
            values_of[folder], reason = completion.values(index, values_of[folder])
            if reason:
                unresolved[folder] = reason

    if root is None:  # the folder, or one of its subfolders, that holds the most of the table's folders
        # A subfolder named in the table is a taxon's folder, not a root: leaving those out keeps this one pass
        # over the table per candidate, where trying each of 16,000 class folders took 256 M stats (hours).
        candidates = [path, *sorted(p for p in path.iterdir() if p.is_dir() and p.name not in lineage_of)]
        root = max(candidates, key=lambda base: sum((base / f).is_dir() for f in lineage_of))
    root = Path(root)

    out = RecordSet(ranks, source=str(path), notes=notes)
    for folder, row in sorted(lineage_of.items()):
        directory = root / folder
        if not directory.is_dir():
            out.skip("folder missing")
            continue
        images, others = _image_files(directory)
        if others:
            out.skip("not an image file", others)
        if folder in unresolved:
            out.skip(unresolved[folder], len(images))
            continue
        split = _clean(row.get("split"))
        for image in images:
            out.add(image, values_of[folder], split)
    for directory in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in lineage_of):
        unlisted = len(_image_files(directory)[0])
        if unlisted:
            out.skip("folder not in taxonomy table", unlisted)
    return out


# -- generic CSV / metadata.jsonl -------------------------------------------------------------------


FILE_COLUMNS = ("file_name", "file", "filename", "image", "image_path", "path", "filepath")


def read_table(
    path: str | Path, root: str | Path | None = None, ranks: Iterable[str] | None = None, resolve: bool = False
) -> RecordSet:
    """A CSV/TSV or `metadata.jsonl` with a file column and one column per rank.

    This is the Hugging Face imagefolder convention: `file_name` relative to the table's folder. Rank
    columns are named after the ranks (`species` may hold the binomial); an optional `split` column.
    `resolve`: complete missing ranks from the species/genus name via the iNaturalist taxonomy.
    """
    path = _require_file(Path(path), "metadata table")
    root = Path(root) if root is not None else path.parent
    rows = _read_table(path)
    first = next(rows, None)
    if first is None:
        raise InputError(f"metadata table {path} has no rows")
    columns = list(first)
    file_column = next((c for c in columns if c.strip().lower() in FILE_COLUMNS), None)
    if file_column is None:
        raise InputError(f"{path} needs a file column (one of {', '.join(FILE_COLUMNS)}); it has {', '.join(columns)}")
    rank_columns = _columns_by_rank(columns)
    if resolve:
        chosen = STANDARD_RANKS
    else:
        chosen = parse_ranks(ranks) if ranks else tuple(r for r in STANDARD_RANKS if r in rank_columns)
    missing = [] if resolve else [r.value for r in chosen if r not in rank_columns]
    if missing or not chosen:
        raise InputError(
            f"{path} has no column for rank(s) {', '.join(missing) or 'any'}; columns: {', '.join(columns)}"
        )
    split_column = next((c for c in columns if c.strip().lower() == "split"), None)

    out = RecordSet(chosen, source=str(path))
    kept: list[tuple[str, dict[Rank, str | None], str | None, str | None]] = []
    for row in _chain(first, rows):
        file = _clean(row.get(file_column))
        if not file:
            out.skip("no image path")
            continue
        values = _split_binomial(
            {rank: _clean(row.get(rank_columns[rank])) for rank in chosen if rank in rank_columns}, fill_genus=resolve
        )
        split = _clean(row.get(split_column)) if split_column else None
        if not resolve:
            out.add(root / file, values, split)
        else:
            kept.append((file, values, split, _scientific_name(row)))
    if resolve:
        completion = _Completion([(values, scientific) for _, values, _, scientific in kept])
        out.notes += completion.problems()
        for index, (file, values, split, _) in enumerate(kept):
            values, reason = completion.values(index, values)
            if reason:
                out.skip(reason)
            else:
                out.add(root / file, values, split)
    return out


def _chain(first: dict, rest: Iterator[dict]) -> Iterator[dict]:
    yield first
    yield from rest


READERS: dict[str, Callable[..., RecordSet]] = {
    "inat21": read_inat21,
    "fishnet": read_fishnet,
    "bioscan": read_bioscan,
    "folder": read_folder,
    "csv": read_table,
}


RESOLVABLE = ("folder", "csv")  # formats whose rows may name only a species or genus


def read_records(
    fmt: str, path: str | Path, root: str | Path | None = None, resolve: bool = False, boxes: str | Path | None = None
) -> RecordSet:
    """Read a dataset in one of the formats of `READERS`; `resolve` completes lineages (folder, csv); `boxes` is
    FishNet's bounding-box JSON (fishnet)."""
    try:
        reader = READERS[fmt]
    except KeyError:
        raise InputError(f"unknown format {fmt!r}; choose one of {', '.join(READERS)}") from None
    options = {}
    if resolve:
        if fmt not in RESOLVABLE:
            raise InputError(f"--resolve-taxonomy works with the {' and '.join(RESOLVABLE)} formats, not {fmt}")
        options["resolve"] = True
    if boxes is not None:
        if fmt != "fishnet":
            raise InputError(f"bounding boxes are read for the fishnet format only, not {fmt}")
        options["boxes"] = boxes
    return reader(path, root=root, **options)
