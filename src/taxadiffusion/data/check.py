"""`data check`: open every image of a record set and report what is wrong."""

from __future__ import annotations

import json
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import write_text_atomic
from ..errors import InputError
from ..shards import (
    ONE_PROCESS,
    SCREEN_CHUNK,
    Share,
    iter_json_chunks,
    paths_key,
    read_manifest,
    run_chunks,
    write_manifest,
)
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
    bar = {"total": len(paths), "desc": "checking images", "unit": "img", "disable": not progress}
    for result in tqdm(checked(paths, workers), **bar):
        report.add(result)
    return report


def checked(paths: Iterable[Path], workers: int) -> Iterator[ImageCheck]:
    """Each image's check, in order, decoded by `workers` threads (PIL releases the GIL while decoding)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        yield from bounded_map(pool, check_image, paths, window=64 * max(1, workers))


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


SCREEN_MANIFEST = "manifest.json"


def screen_records(
    records: RecordSet, skip_bad: bool, workers: int, cache: Path, share: Share = ONE_PROCESS, progress: bool = True
) -> RecordSet:
    """Decode every training image once before training starts. Unusable images are refused, each named
    (or, with `skip_bad`, dropped and counted as skipped rows), so no bad file can stop a run mid-epoch.

    The work is split across processes in chunks (`shards.py`) under `cache/screen-<key>/`, keyed by the image
    paths; its manifest lets a later start of the same images skip the screen without opening or stat-ing a file.
    A file changed in place after its screen is not seen: delete the folder to screen again."""
    paths = [r.image for r in records]
    key = paths_key(paths, SCREEN_CHUNK)
    folder = Path(cache) / f"screen-{key}"
    manifest = read_manifest(folder / SCREEN_MANIFEST, key)
    if manifest is None:
        unusable = _screen_chunks(paths, workers, folder, share, progress)
        manifest = {"key": key, "images": len(paths), "unusable": unusable}
        if share.is_main:
            write_manifest(folder / SCREEN_MANIFEST, manifest)
    bad = [ImageCheck(Path(path), problem) for path, problem in manifest["unusable"]]
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


def _screen_chunks(paths: list[Path], workers: int, folder: Path, share: Share, progress: bool) -> list[list[str]]:
    """This process's chunks of the screen, then everyone's unusable images as [path, problem] pairs."""

    def work(index: int, items: range, advance) -> None:
        unusable = []
        for result in checked((paths[i] for i in items), workers):
            if result.problem:
                unusable.append([str(result.path), result.problem])
            advance(1)
        write_text_atomic(folder / chunk_name(index), json.dumps({"unusable": unusable}) + "\n")

    files = run_chunks(folder, len(paths), SCREEN_CHUNK, share, chunk_name, work, "screening images", progress)
    return [pair for chunk in iter_json_chunks(files) for pair in chunk["unusable"]]


def chunk_name(index: int) -> str:
    return f"chunk-{index:06d}.json"
