"""Checks of the folders a command reads or writes.

A saved folder is checked before a library reads it: every JSON file parses and every safetensors file is
whole, else one error names the damaged file (diffusers and transformers would raise deep inside their
loaders, often without the path). An output folder that holds something is refused unless told to replace.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import MissingInput, OutputExists, UnreadableFile


def check_saved_folder(folder: str | Path, what: str, marker: str, hint: str) -> Path:
    """`folder` must hold `marker` (e.g. model_index.json) and only readable JSON and safetensors files."""
    folder = Path(folder)
    if not (folder / marker).is_file():
        raise MissingInput(f"{folder} is not {what} (no {marker}); {hint}")
    for path in sorted(folder.rglob("*.json")):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            hint = f"the {what} is damaged; save or copy it again"
            raise UnreadableFile(path, f"not valid JSON ({error})", hint) from None
    for path in sorted(folder.rglob("*.safetensors")):
        check_safetensors(path, f"the {what} is damaged; save or copy it again")
    return folder


def check_safetensors(path: Path, hint: str) -> None:
    """Open the file's header: safetensors checks that the header is whole and the data covers every tensor."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as error:  # SafetensorError (truncated, empty) or OSError
        raise UnreadableFile(path, f"unreadable safetensors file ({error})", hint) from None


def refuse_nonempty(folder: str | Path, overwrite: bool) -> Path:
    """An output folder must be new or empty, unless `overwrite` (checked before the work, not after)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputExists(f"{folder} is a file; choose a folder for --out")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise OutputExists(f"{folder} is not empty; choose another --out or pass --overwrite")
    return folder


def new_file_mode() -> int:
    """The mode `open()` gives a new file here: 0o666 less the process's umask (read by setting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def share_safetensors(path: str | Path) -> None:
    """Give a written safetensors file (or every one under a folder) the mode any other file written here gets.

    safetensors 0.8 writes through a temporary file that is created 0600 and renamed into place, so the weights of
    a saved pipeline, prior or checkpoint would be readable by their owner alone, beside a config.json that
    everyone may read (safetensors#782, not fixed in a release): a colleague on a shared machine, or a container
    running as another user, could then not load the model.
    """
    path = Path(path)
    if os.name != "posix":
        return
    mode = new_file_mode()
    for file in [path] if path.is_file() else path.rglob("*.safetensors"):
        if file.stat().st_mode & 0o777 != mode:
            file.chmod(mode)


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, the written file then given the umask's mode (see `share_safetensors`)."""
    from safetensors.torch import save_file  # imports torch: only when weights are written

    save_file(tensors, str(path), metadata=metadata)
    share_safetensors(path)
