"""Taxonomic ranks, lineages and the taxonomy tree built from labelled records.

Pure Python (no torch), so that data tools and the CLI start fast.

A *lineage* names a taxon at every rank from the coarsest down to some depth; missing ranks are
allowed only as a tail (a record labelled to genus has no epithet). A *taxon* is keyed by its full
path, so the same genus name under two families is two taxa (homonyms are kept apart).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from .atomic import write_text_atomic
from .errors import InputError, TaxaDiffusionError


class Rank(StrEnum):
    """The seven standard ranks, coarse to fine."""

    KINGDOM = "kingdom"
    PHYLUM = "phylum"
    CLASS = "class"
    ORDER = "order"
    FAMILY = "family"
    GENUS = "genus"
    SPECIFIC_EPITHET = "specific_epithet"

    @classmethod
    def parse(cls, name: str | Rank) -> Rank:
        """Rank from its name; `species` is accepted for `specific_epithet`."""
        if isinstance(name, Rank):
            return name
        key = name.strip().lower().replace("-", "_").replace(" ", "_")
        if key in ("species", "epithet", "specificepithet"):
            key = "specific_epithet"
        try:
            return cls(key)
        except ValueError:
            valid = ", ".join(r.value for r in cls)
            raise InputError(f"unknown rank {name!r}; valid ranks: {valid} (or 'species')") from None


STANDARD_RANKS: tuple[Rank, ...] = tuple(Rank)
# Rank sets of the paper's datasets: iNat21 names all seven, FishNet and BIOSCAN-1M start at the class.
INAT21_RANKS: tuple[Rank, ...] = STANDARD_RANKS
FISHNET_RANKS: tuple[Rank, ...] = STANDARD_RANKS[2:]
BIOSCAN_RANKS: tuple[Rank, ...] = STANDARD_RANKS[2:]
# The ranks the paper evaluates at (Table 1: FID by order, family, genus and species).
PAPER_RANKS: tuple[Rank, ...] = (Rank.ORDER, Rank.FAMILY, Rank.GENUS, Rank.SPECIFIC_EPITHET)


def parse_ranks(ranks: Iterable[str | Rank]) -> tuple[Rank, ...]:
    """Validate an ordered subset of the standard ranks (coarse to fine, no repeats)."""
    parsed = tuple(Rank.parse(r) for r in ranks)
    if not parsed:
        raise InputError("a taxonomy needs at least one rank")
    order = [STANDARD_RANKS.index(r) for r in parsed]
    if order != sorted(set(order)):
        raise InputError(
            f"ranks must be distinct and ordered coarse to fine ({', '.join(STANDARD_RANKS)}), got {', '.join(parsed)}"
        )
    return parsed


def condition_text(rank: Rank | str, name: str | None) -> str:
    """The conditioning string of one rank, `"<rank>: <name>"` (paper: one text per rank).

    The species rank carries the epithet only (`"specific_epithet: abdominalis"`); a dropped or
    unknown rank reads `"<rank>: None"`, as in the published condition dropout.
    """
    return f"{Rank.parse(rank).value}: {name if name else 'None'}"


# The taxon id of the `"<rank>: None"` text: a rank dropped by condition dropout, or one finer than a record's
# label. Every per-rank table keeps that text in its last row (`none_rows` maps the id there).
NONE_ID = -1


class LineageError(InputError):
    """A lineage that cannot be used; `reason` is a short, countable key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Lineage:
    """Names from the coarsest rank down to `depth` ranks; finer ranks are unknown.

    `ranks` is the dataset's ordered rank list; `names` has one non-empty name per labelled rank.
    """

    ranks: tuple[Rank, ...]
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.names) > len(self.ranks):
            raise LineageError("too many names", f"{len(self.names)} names for {len(self.ranks)} ranks")
        for rank, name in zip(self.ranks, self.names, strict=False):  # names may stop early
            if not isinstance(name, str) or not name.strip() or name != name.strip():
                raise LineageError("empty name", f"empty or unstripped name {name!r} at rank {rank}")

    @classmethod
    def from_mapping(cls, ranks: Sequence[Rank], values: dict[Rank, str | None]) -> Lineage:
        """Build from {rank: name-or-empty}; a gap above a known rank raises `LineageError`."""
        names: list[str] = []
        missing: Rank | None = None
        for rank in ranks:
            value = (values.get(rank) or "").strip()
            if not value:
                missing = missing or rank
                continue
            if missing is not None:
                raise LineageError(
                    f"missing {missing}",
                    f"rank {missing} is missing but the finer rank {rank} is given ({value!r})",
                )
            names.append(value)
        return cls(tuple(ranks), tuple(names))

    @property
    def depth(self) -> int:
        """Number of labelled ranks."""
        return len(self.names)

    @property
    def finest_rank(self) -> Rank:
        if not self.names:
            raise LineageError("empty lineage", "an empty lineage has no finest rank")
        return self.ranks[self.depth - 1]

    def name(self, rank: Rank | str) -> str | None:
        index = self.ranks.index(Rank.parse(rank))
        return self.names[index] if index < self.depth else None

    def truncate(self, depth: int) -> Lineage:
        """The ancestor lineage with the first `depth` ranks."""
        if not 0 <= depth <= self.depth:
            raise InputError(f"cannot truncate a lineage of depth {self.depth} to {depth}")
        return Lineage(self.ranks, self.names[:depth])

    def down_to(self, rank: Rank | str) -> Lineage:
        """The lineage to condition on down to `rank` (the pipeline's, the CLI's and the app's `condition_rank`):
        cut at that rank. A lineage that stops above `rank` has no name there, and raises (a genus cannot be
        conditioned down to the species rank)."""
        rank = Rank.parse(rank)
        if rank not in self.ranks:
            raise InputError(f"rank {rank} is not one of this taxonomy's ranks ({', '.join(self.ranks)})")
        depth = self.ranks.index(rank) + 1
        if depth > self.depth:
            raise InputError(f"{self.scientific_name} is a {self.finest_rank}: it has no {rank}")
        return self.truncate(depth)

    def texts(self) -> list[str]:
        """One conditioning text per dataset rank; unknown ranks read `"<rank>: None"`."""
        return [condition_text(rank, self.name(rank)) for rank in self.ranks]

    @property
    def scientific_name(self) -> str:
        """`Genus epithet` at species depth, else the finest name."""
        species = self.depth >= 2 and self.finest_rank is Rank.SPECIFIC_EPITHET
        if species and self.ranks[self.depth - 2] is Rank.GENUS:
            return f"{self.names[-2]} {self.names[-1]}"
        return self.names[-1] if self.names else ""

    def __str__(self) -> str:
        return " > ".join(self.names)


@dataclass(frozen=True)
class Taxon:
    """One node of the tree: `id` is stable within its rank (taxa sorted by path)."""

    rank: Rank
    level: int
    id: int
    path: tuple[str, ...]
    parent: int | None
    count: int

    @property
    def name(self) -> str:
        return self.path[-1]

    def __str__(self) -> str:
        return f"{self.rank}: {' > '.join(self.path)}"


class UnknownTaxonError(TaxaDiffusionError, KeyError):
    """A name that matches no taxon; the message lists close matches."""

    def __init__(self, name: str, rank: Rank | None, suggestions: list[str]):
        where = f" at rank {rank}" if rank else ""
        hint = f"; did you mean {', '.join(repr(s) for s in suggestions)}?" if suggestions else ""
        super().__init__(f"unknown taxon {name!r}{where}{hint}")
        self.name = name
        self.suggestions = suggestions


class AmbiguousTaxonError(TaxaDiffusionError, KeyError):
    """A name shared by several taxa (homonyms, or one name at several ranks)."""

    def __init__(self, name: str, matches: list[Taxon]):
        listed = "; ".join(str(t) for t in matches)
        super().__init__(f"{name!r} names {len(matches)} taxa ({listed}); give --rank or the full lineage")
        self.matches = matches


class Taxonomy:
    """The tree of every taxon seen in a collection of lineages, with image counts.

    Ids are integers per rank, assigned in sorted path order, so they depend only on the set of taxa.
    """

    FORMAT_VERSION = 1

    def __init__(self, ranks: Sequence[Rank | str], counts: dict[tuple[str, ...], int]):
        self.ranks = parse_ranks(ranks)
        for path in counts:
            if not 0 < len(path) <= len(self.ranks):
                raise InputError(f"path {path!r} does not fit ranks {self.ranks}")
            for depth in range(1, len(path)):
                if path[:depth] not in counts:
                    raise InputError(f"path {path!r} has no ancestor {path[:depth]!r}")
        self._levels: list[list[Taxon]] = []
        self._by_path: dict[tuple[str, ...], Taxon] = {}
        for level, rank in enumerate(self.ranks):
            paths = sorted(p for p in counts if len(p) == level + 1)
            taxa = []
            for index, path in enumerate(paths):
                parent = self._by_path[path[:-1]].id if level else None
                taxon = Taxon(rank, level, index, path, parent, counts[path])
                taxa.append(taxon)
                self._by_path[path] = taxon
            self._levels.append(taxa)
        self._children: dict[tuple[str, ...], list[Taxon]] = {}
        for taxon in self._by_path.values():
            self._children.setdefault(taxon.path[:-1], []).append(taxon)
        self._by_name: dict[str, list[Taxon]] = {}
        for taxon in self._by_path.values():
            self._by_name.setdefault(taxon.name.lower(), []).append(taxon)
            if taxon.rank is Rank.SPECIFIC_EPITHET and taxon.level and self.ranks[taxon.level - 1] is Rank.GENUS:
                binomial = f"{taxon.path[-2]} {taxon.name}".lower()
                self._by_name.setdefault(binomial, []).append(taxon)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_lineages(cls, lineages: Iterable[Lineage], ranks: Sequence[Rank | str] | None = None) -> Taxonomy:
        """Count one image per lineage at its taxon and every ancestor."""
        counts: dict[tuple[str, ...], int] = {}
        seen_ranks = tuple(parse_ranks(ranks)) if ranks is not None else None
        for lineage in lineages:
            if seen_ranks is None:
                seen_ranks = lineage.ranks
            elif lineage.ranks != seen_ranks:
                raise InputError(f"lineage ranks {lineage.ranks} differ from taxonomy ranks {seen_ranks}")
            for depth in range(1, lineage.depth + 1):
                path = lineage.names[:depth]
                counts[path] = counts.get(path, 0) + 1
        if seen_ranks is None:
            raise InputError("cannot build a taxonomy from no lineages and no ranks")
        return cls(seen_ranks, counts)

    # -- queries --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._by_path)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Taxonomy) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        sizes = ", ".join(f"{r}={len(t)}" for r, t in zip(self.ranks, self._levels, strict=True))
        return f"Taxonomy({sizes})"

    def level(self, rank: Rank | str) -> int:
        rank = Rank.parse(rank)
        if rank not in self.ranks:
            raise InputError(f"rank {rank} is not in this taxonomy ({', '.join(self.ranks)})")
        return self.ranks.index(rank)

    def num_taxa(self, rank: Rank | str) -> int:
        return len(self._levels[self.level(rank)])

    def taxa(self, rank: Rank | str) -> list[Taxon]:
        return list(self._levels[self.level(rank)])

    def taxon(self, rank: Rank | str, taxon_id: int) -> Taxon:
        return self._levels[self.level(rank)][taxon_id]

    def by_path(self, path: Sequence[str]) -> Taxon:
        try:
            return self._by_path[tuple(path)]
        except KeyError:
            rank = self.ranks[len(path) - 1] if 0 < len(path) <= len(self.ranks) else None
            raise UnknownTaxonError(" > ".join(path), rank, self.suggest(path[-1] if path else "")) from None

    def parent(self, taxon: Taxon) -> Taxon | None:
        return self._by_path[taxon.path[:-1]] if taxon.level else None

    def children(self, taxon: Taxon | None = None) -> list[Taxon]:
        """Children of `taxon`, or the roots when `taxon` is None."""
        return list(self._children.get(taxon.path if taxon else (), []))

    def lineage(self, taxon: Taxon) -> Lineage:
        return Lineage(self.ranks, taxon.path)

    def ids(self, lineage: Lineage) -> tuple[int, ...]:
        """Per-rank ids of a lineage's labelled ranks."""
        if lineage.ranks != self.ranks:
            raise InputError(f"lineage ranks {lineage.ranks} differ from taxonomy ranks {self.ranks}")
        return tuple(self.by_path(lineage.names[: d + 1]).id for d in range(lineage.depth))

    def leaves(self) -> list[Taxon]:
        """Taxa without children: the finest labels (species, or coarser where unlabelled)."""
        return [t for t in self._by_path.values() if t.path not in self._children]

    # -- lookup by name -------------------------------------------------------------------------

    def find(self, name: str, rank: Rank | str | None = None) -> list[Taxon]:
        """Every taxon called `name` (case-insensitive; `Genus epithet` finds a species)."""
        matches = self._by_name.get(" ".join(name.split()).lower(), [])
        if rank is not None:
            level = self.level(rank)
            matches = [t for t in matches if t.level == level]
        return sorted(matches, key=lambda t: (t.level, t.path))

    def resolve(self, name: str, rank: Rank | str | None = None) -> Taxon:
        """The one taxon called `name`; raises with close names or the homonyms listed."""
        matches = self.find(name, rank)
        if not matches:
            raise UnknownTaxonError(name, Rank.parse(rank) if rank else None, self.suggest(name, rank))
        if len(matches) > 1:
            raise AmbiguousTaxonError(name, matches)
        return matches[0]

    def suggest(self, name: str, rank: Rank | str | None = None, n: int = 5) -> list[str]:
        """Known names closest to `name` (difflib ratio), for error messages; species are also matched by their
        binomial ("Genus epithet"), so a misspelled binomial finds its species."""
        levels = [self.level(rank)] if rank is not None else range(len(self.ranks))
        pool: set[str] = set()
        for level in levels:
            pool |= {t.name for t in self._levels[level]}
            if self.ranks[level] is Rank.SPECIFIC_EPITHET and level and self.ranks[level - 1] is Rank.GENUS:
                pool |= {f"{t.path[-2]} {t.name}" for t in self._levels[level]}
        by_lower: dict[str, str] = {}
        for candidate in sorted(pool):
            by_lower.setdefault(candidate.lower(), candidate)
        close = difflib.get_close_matches(name.lower(), list(by_lower), n=n, cutoff=0.6)
        return [by_lower[c] for c in close]

    # -- persistence ----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": "taxadiffusion.taxonomy",
            "version": self.FORMAT_VERSION,
            "ranks": [r.value for r in self.ranks],
            "taxa": [{"path": list(t.path), "count": t.count} for level in self._levels for t in level],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Taxonomy:
        if data.get("format") != "taxadiffusion.taxonomy":
            raise InputError("not a taxadiffusion taxonomy file (missing 'format': 'taxadiffusion.taxonomy')")
        if data.get("version") != cls.FORMAT_VERSION:
            raise InputError(f"taxonomy format version {data.get('version')} is not supported")
        return cls(data["ranks"], {tuple(t["path"]): int(t["count"]) for t in data["taxa"]})

    def save(self, path: str | Path) -> None:
        write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Taxonomy:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
