"""Work split into fixed chunks across processes, each chunk one file on disk: the image screen and the latent cache.

The images are cut into fixed chunks in record order (`chunk` images each). Process r of w takes the chunks i with
i % w == r, and each finished chunk lands on disk as one file, written aside and then renamed. So:
- the files are the same whatever the number of processes: a chunk never depends on w;
- a killed preparation goes on from its finished chunks;
- processes wait for each other's chunks by watching the folder, not at a collective barrier, so a preparation of
  any length cannot trip the process group's timeout (at iNat21's 2.7 M images the latent cache is about 22 h on
  one GPU, and a barrier gives up after `train.process_group_timeout`);
- the last step writes a manifest, and a later start reads it instead of opening or stat-ing every file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_text_atomic

SCREEN_CHUNK = 8192  # images per screen chunk: one small JSON file each
LATENT_CHUNK = 2048  # images per latent shard: about 360 MB of fp32 latent parameters at SD's 512 px


@dataclass(frozen=True)
class Share:
    """This process's place among all of them."""

    rank: int = 0
    world: int = 1

    def chunks(self, count: int, chunk: int) -> list[int]:
        """The chunks of `count` items this process works on."""
        return self.mine(range(chunk_count(count, chunk)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> Share:
        """The place a launcher (torchrun, `accelerate launch`) gives this process in RANK and WORLD_SIZE; one
        process without them. Read from the environment, not from a process group: work split this way needs no
        collective, so no timeout of one applies."""
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))

    def mine(self, items: Sequence) -> list:
        """Every world-th item, from this process's rank on."""
        return list(items[self.rank :: self.world])


ONE_PROCESS = Share()


def chunk_count(count: int, chunk: int) -> int:
    return -(-count // chunk)


def chunk_range(index: int, count: int, chunk: int) -> range:
    return range(index * chunk, min(count, (index + 1) * chunk))


def paths_key(paths: Sequence[str | Path], *extra) -> str:
    """A hash of the image paths in order (and of what else decides the result): hashing in memory, about 1 s at
    iNat21's 2.7 M paths, where stat-ing each file costs 4.5-45 min on a network file system."""
    digest = hashlib.blake2b(digest_size=8)
    for path in paths:
        digest.update(str(path).encode() + b"\0")
    digest.update(repr(extra).encode())
    return digest.hexdigest()


def wait_for(paths: Sequence[Path], what: str, progress: bool, poll: float = 5.0) -> None:
    """Wait until every file exists (written by other processes). No collective is involved, so no timeout of the
    process group applies; if a process dies, the launcher (torchrun, accelerate) stops the others."""
    from tqdm.auto import tqdm

    missing = [p for p in paths if not p.exists()]
    if not missing:
        return
    done = len(paths) - len(missing)
    with tqdm(total=len(paths), initial=done, desc=f"waiting for {what}", disable=not progress) as bar:
        pause = 0.05  # doubling up to `poll` seconds: quick for a short wait, light on the file system for a long one
        while missing:
            time.sleep(pause)
            pause = min(poll, 2 * pause)
            still = [p for p in missing if not p.exists()]
            bar.update(len(missing) - len(still))
            missing = still


def run_chunks(
    folder: Path,
    count: int,
    chunk: int,
    share: Share,
    name: Callable[[int], str],
    work: Callable[[int, range, Callable[[int], object]], None],
    what: str,
    progress: bool,
) -> list[Path]:
    """Do this process's chunks not on disk yet, then wait for the others'. `work(i, items, advance)` writes
    `folder/name(i)` and calls `advance(n)` as it gets through items. Returns every chunk's file, in order."""
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / name(i) for i in range(chunk_count(count, chunk))]
    mine = share.chunks(count, chunk)
    todo = [i for i in mine if not files[i].exists()]
    total, done = (sum(len(chunk_range(i, count, chunk)) for i in chunks) for chunks in (mine, set(mine) - set(todo)))
    label = f"{what} (process {share.rank} of {share.world})" if share.world > 1 else what
    with tqdm(total=total, initial=done, desc=label, unit="img", disable=not progress) as bar:
        for index in todo:
            work(index, chunk_range(index, count, chunk), bar.update)
    wait_for(files, what, progress and share.is_main)
    return files


def read_manifest(path: Path, key: str) -> dict | None:
    """The manifest if it was written for this key (else None: prepare again)."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("key") == key else None


def write_manifest(path: Path, manifest: dict) -> None:
    write_text_atomic(path, json.dumps(manifest) + "\n")


def iter_json_chunks(files: Sequence[Path]) -> Iterator[dict]:
    for path in files:
        yield json.loads(path.read_text(encoding="utf-8"))
