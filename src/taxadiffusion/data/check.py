"""`data check`: open every image of a record set and report what is wrong."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .images import ImageCheck, check_image

UNUSABLE = ("missing", "unreadable", "truncated")


@dataclass
class CheckReport:
    checked: int = 0
    problems: Counter[str] = field(default_factory=Counter)  # unusable images by kind
    odd_modes: Counter[str] = field(default_factory=Counter)  # usable, converted to RGB on load
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def add(self, result: ImageCheck) -> None:
        self.checked += 1
        kind = result.problem or (f"mode {result.odd_mode}" if result.odd_mode else None)
        if kind is None:
            return
        (self.problems if result.problem else self.odd_modes)[result.problem or result.odd_mode] += 1
        examples = self.examples.setdefault(kind, [])
        if len(examples) < self.max_examples:
            examples.append(str(result.path))

    @property
    def unusable(self) -> int:
        return sum(self.problems.values())

    def to_dict(self) -> dict:
        return {
            "checked": self.checked,
            "unusable": self.unusable,
            "problems": {k: self.problems.get(k, 0) for k in UNUSABLE},
            "odd_modes": dict(sorted(self.odd_modes.items())),
            "examples": self.examples,
        }


def check_images(paths: Iterable[Path], workers: int = 4, progress: bool = True) -> CheckReport:
    """Decode every image (threads: PIL releases the GIL while decoding)."""
    from tqdm.auto import tqdm

    paths = list(paths)
    report = CheckReport()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(check_image, paths)
        for result in tqdm(results, total=len(paths), desc="checking images", unit="img", disable=not progress):
            report.add(result)
    return report
