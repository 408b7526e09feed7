"""Keeping only the generated images a classifier places in their taxon (`generate --filter`).

Synthetic images help a long-tailed classifier when the ones far from their taxon are left out. SaSPA (NeurIPS
2024) and DiffuLT (2024) filter with a classifier trained on real images. Here an image is kept when the taxonomic
classifier's top prediction at the checked rank is its taxon there, with at least `threshold` probability.

A rejected image is drawn again from a new seed, up to `retries` times. The retries are a function of the plan
alone: a block's first draw is the whole block, and each retry draws that attempt's rejected items, in plan order.
So the kept images are the same whatever kills and reruns happen, and whatever the number of processes.
Each block's outcome is appended to `filter-<tag>-<process>.jsonl`; a rerun reads it back and skips what is
decided. Runs of other settings added to the same folder (`--add`) keep journals of their own.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .atomic import append_durably
from .errors import InputError, TaxaDiffusionError
from .taxonomy import Lineage, Rank

JOURNAL = "filter-{tag}-{index}.jsonl"  # per run (its generation tag) and process
SUMMARY = "filter_summary.json"
COLUMNS = ("score", "attempt", "rank_checked")  # the metadata.csv columns of a filtered run


def retry_seed(seed: int, attempt: int) -> int:
    """The seed of an image's `attempt`-th redraw (attempt 0 is its plan seed)."""
    return seed if attempt == 0 else int(np.random.SeedSequence([seed, attempt]).generate_state(1)[0])


@dataclass
class ImageFilter:
    classifier: object  # a TaxonClassifier (eval/classifier.py), trained on real images
    rank: Rank
    threshold: float = 0.5
    retries: int = 3

    def __post_init__(self) -> None:
        self.rank = Rank.parse(self.rank)
        if self.rank not in self.classifier.taxonomy.ranks:
            known = ", ".join(r.value for r in self.classifier.taxonomy.ranks)
            raise InputError(f"--filter-rank {self.rank}: the classifier knows {known}")
        if not 0.0 <= self.threshold <= 1.0:
            raise InputError(f"--filter-threshold must be in [0, 1], got {self.threshold}")
        if self.retries < 0:
            raise InputError(f"--filter-retries must be >= 0, got {self.retries}")

    @classmethod
    def load(cls, folder: str | Path, rank: str | None, threshold: float, retries: int) -> ImageFilter:
        """The classifier saved in `folder`; `rank` None: its finest rank."""
        from .eval.classifier import TaxonClassifier
        from .saved_files import check_saved_folder

        hint = "train one with `taxadiffusion classifier train`"
        check_saved_folder(folder, "a taxonomic classifier", "config.json", hint)
        classifier = TaxonClassifier.from_pretrained(folder).eval()
        return cls(classifier, rank or classifier.taxonomy.ranks[-1], threshold, retries)

    def describe(self) -> dict:
        """What decides which images are kept (part of the generation key, so the file tags tell runs apart)."""
        weights = torch.cat([p.detach().flatten().float() for p in self.classifier.parameters()])
        digest = hashlib.sha256(weights.numpy().tobytes()).hexdigest()[:16]
        return {"classifier": digest, "rank": self.rank.value, "threshold": self.threshold, "retries": self.retries}

    @torch.no_grad()
    def scores(self, images: Sequence, lineages: Sequence[Lineage]) -> list[tuple[bool, float | None]]:
        """(kept, probability of the image's own taxon at the checked rank) per image; an image whose lineage
        does not reach the rank, or whose taxon the classifier does not know, is kept unscored."""
        from .eval.classifier import to_unit

        taxonomy, level = self.classifier.taxonomy, self.classifier.taxonomy.ranks.index(self.rank)
        batch = to_unit(np.stack([np.asarray(image.convert("RGB")) for image in images]))
        device = next(self.classifier.parameters()).device
        probabilities = torch.softmax(self.classifier(batch.to(device))[level], dim=-1).cpu()
        out = []
        for row, lineage in zip(probabilities, lineages, strict=True):
            truth = _taxon_id(taxonomy, lineage, level)
            if truth is None:
                out.append((True, None))
                continue
            score = float(row[truth])
            out.append((int(row.argmax()) == truth and score >= self.threshold, score))
        return out


def _taxon_id(taxonomy, lineage: Lineage, level: int) -> int | None:
    """The id at `level` of the classifier's taxon that `lineage` names, or None where it names none (other
    ranks, or a taxon the classifier never saw). A one-rank lineage (a flat model's species, named by its
    binomial) is found by its scientific name."""
    try:
        if lineage.ranks == taxonomy.ranks:
            return taxonomy.ids(lineage)[level]
        if len(lineage.ranks) == 1:
            found = taxonomy.find(lineage.scientific_name, lineage.ranks[0])
            if len(found) == 1:
                return taxonomy.ids(taxonomy.lineage(found[0]))[level]
    except (TaxaDiffusionError, IndexError):
        pass
    return None


def filtered_block(pipe, block: Sequence, image_filter: ImageFilter) -> dict:
    """Draw a block and redraw its rejected items (see the module's doc). Returns {item: (image or None, score,
    attempt)}: None where every attempt was rejected (the last attempt's score)."""
    outcome, pending = {}, list(block)
    for attempt in range(image_filter.retries + 1):
        generators = [torch.Generator().manual_seed(retry_seed(item.seed, attempt)) for item in pending]
        images = pipe([item.condition for item in pending], generator=generators).images
        rejected = []
        for item, image, (kept, score) in zip(
            pending, images, image_filter.scores(images, [i.lineage for i in pending]), strict=True
        ):
            outcome[item] = (image if kept else None, score, attempt)
            if not kept:
                rejected.append(item)
        pending = rejected
        if not pending:
            break
    return outcome


def journal_block(out: Path, tag: str, index: int, outcome: dict, rank: Rank) -> dict:
    """Append a block's decisions to this process's journal (flushed to disk): what a rerun skips, and what
    metadata.csv and the summary read. Returns them as `read_journals` does."""
    entries = {
        (item.lineage.names, item.index): {
            "names": list(item.lineage.names),
            "index": item.index,
            "kept": image is not None,
            "score": score,
            "attempt": attempt,
            "rank": rank.value,
        }
        for item, (image, score, attempt) in outcome.items()
    }
    append_durably(out / JOURNAL.format(tag=tag, index=index), "".join(json.dumps(e) + "\n" for e in entries.values()))
    return entries


def read_journals(out: Path, tag: str) -> dict[tuple[tuple[str, ...], int], dict]:
    """Every process's decisions of the run `tag`, by (lineage names, index); a line torn by a kill is ignored
    (its block is drawn again, to the same result)."""
    decided = {}
    for path in sorted(out.glob(JOURNAL.format(tag=tag, index="*"))):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            decided[(tuple(entry["names"]), entry["index"])] = entry
    return decided


def summarize(decided: dict) -> dict:
    """Acceptance per taxon: images kept, redraws (rejections) and images whose every attempt was rejected."""
    taxa: dict[str, Counter] = {}
    for (names, _), entry in sorted(decided.items()):
        counts = taxa.setdefault(" > ".join(names), Counter())
        counts["kept" if entry["kept"] else "given_up"] += 1
        counts["rejected"] += entry["attempt"] + (0 if entry["kept"] else 1)
    drawn = sum(c["kept"] + c["rejected"] for c in taxa.values())
    kept = sum(c["kept"] for c in taxa.values())
    return {
        "acceptance": kept / drawn if drawn else None,
        "kept": kept,
        "rejected": sum(c["rejected"] for c in taxa.values()),
        "given_up": sum(c["given_up"] for c in taxa.values()),
        "taxa": {name: dict(counts) for name, counts in taxa.items()},
    }
