"""`data check`: open every image of a record set and report what is wrong."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import write_text_atomic
from ..errors import InputError
from .images import ImageCheck, check_image
from .records import RecordSet

UNUSABLE = ("missing", "unreadable", "truncated", "oversized")


@dataclass
class CheckReport:
    checked: int = 0
    problems: Counter[str] = field(default_factory=Counter)  # unusable images by kind
    odd_modes: Counter[str] = field(default_factory=Counter)  # usable, converted to RGB on load
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5
    unusable_images: list[ImageCheck] = field(default_factory=list)  # every one, for the pre-flight screen

    def add(self, result: ImageCheck) -> None:
        self.checked += 1
        if result.problem:
            self.unusable_images.append(result)
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

    def describe(self) -> str:
        """The report as `data check` prints it."""
        result = self.to_dict()
        lines = [f"checked {self.checked} images, {self.unusable} unusable"]
        lines += [f"  {kind}: {n}" for kind, n in result["problems"].items()]
        lines += [f"  mode {mode} (usable, converted to RGB): {n}" for mode, n in result["odd_modes"].items()]
        lines += [f"  first {kind}: " + ", ".join(paths) for kind, paths in self.examples.items()]
        return "\n".join(lines)

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
        results = bounded_map(pool, check_image, paths, window=64 * max(1, workers))
        for result in tqdm(results, total=len(paths), desc="checking images", unit="img", disable=not progress):
            report.add(result)
    return report


def bounded_map(pool: ThreadPoolExecutor, function, items: Iterable, window: int) -> Iterator:
    """`pool.map` in order, with at most `window` tasks pending: `Executor.map` submits every item at once, which
    at iNat21's 2.7 M images holds 4.9 GiB of futures before the first result."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(function, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def files_key(paths: Iterable[Path]) -> str:
    """A hash of every file's path, size and modification time (a missing file counts as missing): what a screen
    of the same files, unchanged since, would find again."""
    digest = hashlib.blake2b(digest_size=16)
    for path in paths:
        try:
            stat = os.stat(path)
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()


def screen_records(
    records: RecordSet, skip_bad: bool, workers: int, progress: bool = True, cache: Path | None = None
) -> RecordSet:
    """Decode every training image once before training starts. Unusable images are refused, each named
    (or, with `skip_bad`, dropped and counted as skipped rows), so no bad file can stop a run mid-epoch.

    With `cache` (a JSON file), the result is kept with a hash of every file's size and modification time, and a
    resumed run whose files are unchanged reuses it instead of decoding them all again (hours at iNat21's size)."""
    paths = [r.image for r in records]
    key = files_key(paths) if cache is not None else None
    bad = None
    if cache is not None and cache.is_file():
        try:
            saved = json.loads(cache.read_text(encoding="utf-8"))
            if saved.get("key") == key:
                bad = [ImageCheck(Path(path), problem) for path, problem in saved["unusable"]]
        except (OSError, ValueError, KeyError, TypeError):
            bad = None  # a damaged cache: screen again
    if bad is None:
        bad = check_images(paths, workers, progress).unusable_images
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            unusable = [[str(b.path), b.problem] for b in bad]
            write_text_atomic(cache, json.dumps({"key": key, "unusable": unusable}) + "\n")
    if not bad:
        return records
    if not skip_bad:
        listed = "; ".join(f"{b.path} ({b.problem})" for b in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise InputError(
            f"{len(bad)} unusable training image(s): {listed}{more}. Fix or remove them, or set "
            "data.skip_bad_images=true to train without them (`taxadiffusion data check` lists them all)"
        )
    unusable = {b.path for b in bad}
    kept = [r for r in records if r.image not in unusable]
    kept = RecordSet(records.ranks, kept, records.skipped.copy(), records.source, list(records.notes))
    for result in bad:
        kept.skip(f"unusable image ({result.problem})")
    kept.notes.append("unusable images skipped: " + ", ".join(str(b.path) for b in bad[:20]))
    return kept
