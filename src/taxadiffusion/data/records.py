"""The record type every reader returns: an image path, its lineage and its split."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..taxonomy import Lineage, LineageError, Rank, Taxonomy


@dataclass(frozen=True)
class Record:
    image: Path
    lineage: Lineage
    split: str | None = None
    box: tuple[int, int, int, int] | None = None  # (x, y, w, h) in pixels: the subject's bounding box (FishNet)


@dataclass
class RecordSet:
    """Records read from one source, with the rows that were skipped counted by reason."""

    ranks: tuple[Rank, ...]
    records: list[Record] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    source: str = ""
    notes: list[str] = field(default_factory=list)  # messages for the user (e.g. names that did not resolve)
    # Rows of one taxon share one Lineage (or one skip reason): millions of rows (iNat21: 2.7 M) name only
    # thousands of distinct lineages, so this saves the validation per row and most of the records' memory.
    _lineages: dict[tuple, Lineage | str] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def add(
        self,
        image: str | Path,
        values: dict[Rank, str | None],
        split: str | None = None,
        box: tuple[int, int, int, int] | None = None,
    ) -> bool:
        """Add a record from {rank: name}; a row with a gap in its lineage is counted, not kept."""
        key = tuple(values.get(rank) for rank in self.ranks)
        lineage = self._lineages.get(key)
        if lineage is None:
            lineage = self._lineages[key] = self._lineage(values)
        if isinstance(lineage, str):
            self.skip(lineage)
            return False
        self.records.append(Record(image if isinstance(image, Path) else Path(image), lineage, split, box))
        return True

    def _lineage(self, values: dict[Rank, str | None]) -> Lineage | str:
        """The row's lineage, or why it cannot be kept."""
        try:
            lineage = Lineage.from_mapping(self.ranks, values)
        except LineageError as error:
            return error.reason
        return lineage if lineage.depth else "no rank labelled"

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n

    def split(self, name: str) -> RecordSet:
        """The records of one split (`train`, `val`, ...)."""
        kept = [r for r in self.records if r.split == name]
        return RecordSet(self.ranks, kept, Counter(), f"{self.source}[{name}]")

    def taxonomy(self) -> Taxonomy:
        return Taxonomy.from_lineages((r.lineage for r in self.records), self.ranks)

    def summary(self) -> dict:
        """{"records", "taxa": {rank: n}, "labelled_to": {rank: n}, "skipped": {reason: n}}.

        `labelled_to[rank]` counts records labelled down to at least that rank.
        """
        taxa = [set() for _ in self.ranks]
        labelled = [0] * len(self.ranks)
        for record in self.records:
            names = record.lineage.names
            for depth in range(len(names)):
                taxa[depth].add(names[: depth + 1])
                labelled[depth] += 1
        summary = {
            "records": len(self.records),
            "taxa": {r.value: len(t) for r, t in zip(self.ranks, taxa, strict=True)},
            "labelled_to": {r.value: n for r, n in zip(self.ranks, labelled, strict=True)},
            "skipped": dict(sorted(self.skipped.items())),
        }
        if self.notes:
            summary["notes"] = list(self.notes)
        awkward = self.unwritable_names()
        if awkward:
            summary["unwritable_names"] = awkward
        return summary

    def unwritable_names(self, shown: int = 5) -> dict:
        """Taxon names that cannot be file names as they are (control characters, path separators, over 255
        bytes, ...): {"count", "reasons": {reason: n}, "examples": [[name, reason], ...]}, or {} when there are
        none. Training reads them as they are; the folders made from them get a safe name (names.py)."""
        from ..names import unwritable

        found = {}
        for record in self.records:
            for name in record.lineage.names:
                if name not in found:
                    found[name] = unwritable(name)
        bad = {name: reason for name, reason in found.items() if reason}
        if not bad:
            return {}
        reasons = dict(sorted(Counter(bad.values()).items()))
        return {"count": len(bad), "reasons": reasons, "examples": [[n, r] for n, r in list(bad.items())[:shown]]}


def flatten_to_species(records: RecordSet) -> RecordSet:
    """One rank holding the scientific name (the flat SD + LoRA baseline); records above species are counted."""
    flat = RecordSet((Rank.SPECIFIC_EPITHET,), source=records.source, skipped=records.skipped.copy())
    for record in records:
        if record.lineage.depth < len(record.lineage.ranks):
            flat.skip("not labelled to species (flat baseline)")
            continue
        flat.add(record.image, {Rank.SPECIFIC_EPITHET: record.lineage.scientific_name}, record.split, record.box)
    return flat


def describe_summary(summary: dict, title: str) -> str:
    """A `RecordSet.summary()` as a table a person reads: taxa and records labelled per rank, skipped rows."""
    width = max((len(r) for r in summary["taxa"]), default=0)
    lines = [title, f"  records: {summary['records']}", f"  {'rank':<{width}}  {'taxa':>8}  {'labelled to':>12}"]
    lines += [f"  {r:<{width}}  {n:>8}  {summary['labelled_to'][r]:>12}" for r, n in summary["taxa"].items()]
    lines.append("  skipped:" + ("" if summary["skipped"] else " none"))
    lines += [f"    {reason}: {n}" for reason, n in summary["skipped"].items()]
    lines += [f"  note: {note}" for note in summary.get("notes", [])]
    lines += describe_unwritable(summary.get("unwritable_names", {}))
    return "\n".join(lines)


def describe_unwritable(found: dict) -> list[str]:
    """`RecordSet.unwritable_names()` in lines a person reads (none when there are none)."""
    if not found:
        return []
    reasons = ", ".join(f"{reason}: {n}" for reason, n in found["reasons"].items())
    lines = [f"  names that cannot be file names as they are: {found['count']} ({reasons}); they train as they are,"]
    lines.append("  and the folders made from them get a readable name plus a short hash, e.g.")
    lines += [f"    {name!r} ({reason})" for name, reason in found["examples"]]
    return lines


def split_records(records: Sequence[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out `fraction` of each leaf taxon's records (at least one where a taxon has two or more).

    Stratified so that rare taxa keep training images and still appear in the held-out set.
    """
    import random

    if not 0.0 < fraction < 1.0:
        raise InputError(f"held-out fraction must be in (0, 1), got {fraction}")
    by_taxon: dict[tuple[str, ...], list[Record]] = {}
    for record in records:
        by_taxon.setdefault(record.lineage.names, []).append(record)
    rng = random.Random(seed)
    kept: list[Record] = []
    held: list[Record] = []
    for names in sorted(by_taxon):
        group = sorted(by_taxon[names], key=lambda r: str(r.image))
        rng.shuffle(group)
        n_held = min(len(group) - 1, max(1, round(fraction * len(group)))) if len(group) > 1 else 0
        held.extend(group[:n_held])
        kept.extend(group[n_held:])
    return kept, held
