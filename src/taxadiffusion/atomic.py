"""Files and folders that are written whole or not at all.

Every writer of something that must never be read half-written (a metadata table, a manifest, a checkpoint, a
pipeline folder, an image another process may count) writes it under a temporary name in the same folder, makes
it durable, then renames it into place. A rename within one file system is atomic, so a reader sees the old
version or the new one, never a mix; a kill leaves only a `.tmp-` name, which the next run sweeps.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_PREFIX = ".tmp-"  # the one name of work in progress: sweepers and readers skip it


def temporary(path: Path) -> Path:
    """The work-in-progress name of `path`: `.tmp-<name>` beside it (same folder, so the rename is atomic)."""
    return path.with_name(f"{TMP_PREFIX}{path.name}")


def is_temporary(path: Path) -> bool:
    return path.name.startswith(TMP_PREFIX)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_folder(path: Path) -> None:
    """Make a rename (or a new entry) in `path` durable; a no-op where folders cannot be opened (Windows)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def _rolled_back(tmp: Path) -> Iterator[None]:
    """On any error, an interrupt included, remove the work in progress and let the error go on."""
    try:
        yield
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield the temporary path to write `path` through (with any writer that takes a path: PIL, safetensors,
    torch.save, csv). On success the file is fsynced and renamed over `path`, and the folder fsynced; on any
    error, an interrupt included, the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    tmp = temporary(path)
    with _rolled_back(tmp):
        yield tmp
        fsync_file(tmp)
        tmp.replace(path)
    fsync_folder(path.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    """A text file (UTF-8, newlines as given), written whole or not at all."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)


def append_durably(path: str | Path, text: str) -> None:
    """Append to a journal-like file (a table, a log of decisions) and flush it to disk: a kill loses at most the
    line being written, which its readers cut off or skip."""
    with open(path, "a", encoding="utf-8", newline="") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


@contextmanager
def atomic_folder(path: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder to fill in place of `path` (a leftover of a killed write is removed first).
    On success its files are fsynced and it is renamed to `path`, replacing a folder there when `replace` (callers
    pass only folders of their own run); on error it is removed and `path` is left as it was."""
    path = Path(path)
    tmp = temporary(path)
    _remove(tmp)
    tmp.mkdir(parents=True)
    with _rolled_back(tmp):
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                fsync_file(file)
        if path.exists():
            if not replace:
                raise FileExistsError(f"{path} exists")
            _remove(path)
        tmp.rename(path)
    fsync_folder(path.parent)
