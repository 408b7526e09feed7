"""Checkpoints: written atomically (temporary folder, fsync, rename), the last K kept.

A checkpoint holds only what training changes (LoRA or UNet weights that train, the taxonomy encoder),
the optimizer and LR scheduler, every process's RNG state and the position in the data. accelerate's
`save_state` would also write the frozen base UNet each time (gigabytes for SD 1.5), hence this module.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..atomic import TMP_PREFIX, fsync_file
from ..atomic import fsync_folder as fsync_entries
from ..errors import UnreadableFile
from ..saved_files import save_safetensors

PREFIX = "step-"
# TMP_PREFIX (being written) is the atomic writers' one name for work in progress
DELETED_PREFIX = ".del-"  # being pruned: renamed first, so a kill mid-delete leaves no listed half-checkpoint
STATE = "state.json"
WEIGHTS = "weights.safetensors"
OPTIM = "optim.pt"


class CorruptCheckpoint(UnreadableFile):
    """A checkpoint file that cannot be read back (truncated, empty, or not what it should be)."""


@dataclass
class TrainingState:
    stage: int = 0
    step: int = 0  # optimizer steps done in this stage
    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of this process consumed in `epoch`
    stage_complete: bool = False
    fingerprint: str = ""  # Config.fingerprint() of the run that wrote it
    taxonomy: str = ""  # hash of the training taxonomy
    # wall seconds of training up to this checkpoint, summed over every process that ran or resumed the run (the
    # work after a process's last checkpoint is lost with it, and so is its time): a resumed run's true cost
    train_seconds: float = 0.0

    def finished(self, stage: int) -> bool:
        """Whether stage `stage` is done in this state: an earlier one, or this one marked complete."""
        return stage < self.stage or (stage == self.stage and self.stage_complete)

    def running(self, stage: int) -> bool:
        return stage == self.stage and not self.stage_complete


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(root: Path, global_step: int) -> Path:
    return root / f"{PREFIX}{global_step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a half-written temporary folder is never listed)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / STATE).is_file())


def write_checkpoint(
    root: Path,
    state: TrainingState,
    weights: dict[str, torch.Tensor] | None,
    optimizer,
    lr_scheduler,
    process_index: int,
    is_main: bool,
    barrier,
    keep: int,
    files: dict[str, str] | None = None,
    ema=None,
) -> Path:
    """Every process writes its RNG state; the main process writes the rest (and `files`, e.g. the resolved
    config and taxonomy, and the EMA of the trained weights when there is one) and publishes the folder by
    rename."""
    final = checkpoint_dir(root, state.global_step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if is_main:
        sweep(root)  # leftovers of a run killed mid-write or mid-prune; ours, never a user's
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng-{process_index}.pt")
    if is_main:
        save_safetensors({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / WEIGHTS)
        optim = {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict()}
        if ema is not None:
            optim["ema"] = ema.state_dict()
        torch.save(optim, tmp / OPTIM)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / STATE).write_text(json.dumps(asdict(state), indent=1) + "\n")
    barrier()
    if is_main:
        fsync_folder(tmp)  # the files reach the disk before the rename that publishes them
        if final.exists():
            remove(final)
        tmp.rename(final)
        fsync_folder(root, files=False)
        for old in list_checkpoints(root)[:-keep]:
            remove(old)
    barrier()
    return final


def remove(checkpoint: Path) -> None:
    """Delete a checkpoint: rename it out of the listing first, then delete the renamed folder."""
    doomed = checkpoint.with_name(f"{DELETED_PREFIX}{checkpoint.name}")
    if doomed.exists():
        shutil.rmtree(doomed)
    checkpoint.rename(doomed)
    shutil.rmtree(doomed)


def sweep(root: Path) -> None:
    """Delete what killed writes and prunes left behind (never a listed checkpoint)."""
    if not root.is_dir():
        return
    for leftover in root.iterdir():
        if leftover.is_dir() and leftover.name.startswith((TMP_PREFIX, DELETED_PREFIX)):
            shutil.rmtree(leftover, ignore_errors=True)


def fsync_folder(folder: Path, files: bool = True) -> None:
    """Flush a folder's files (unless `files` is false) and its entry list to disk."""
    if files:
        for path in folder.iterdir():
            if path.is_file():
                fsync_file(path)
    fsync_entries(folder)


def read_state(path: Path) -> TrainingState:
    try:
        return TrainingState(**json.loads((path / STATE).read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as error:
        raise CorruptCheckpoint(path / STATE, f"unreadable training state ({error})") from None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path / WEIGHTS)
    except Exception as error:  # safetensors raises its own error type, or OSError, for truncated files
        raise CorruptCheckpoint(path / WEIGHTS, f"unreadable weights ({error})") from None


def read_optim(path: Path) -> dict:
    return _torch_load(path / OPTIM)


def read_rng(path: Path, process_index: int) -> dict | None:
    file = path / f"rng-{process_index}.pt"
    return _torch_load(file) if file.is_file() else None


# What an optimizer or RNG file may hold besides tensors, dicts, lists and numbers: numpy's RNG state is an
# array. Nothing else is unpickled, so a run folder received from elsewhere cannot run code on resume.
SAFE_GLOBALS = (getattr(np, "_core", getattr(np, "core", None)).multiarray._reconstruct, np.ndarray, np.dtype)


def _torch_load(file: Path):
    try:
        with torch.serialization.safe_globals([*SAFE_GLOBALS, type(np.dtype(np.uint32))]):
            return torch.load(file, weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error) or "weights_only" in str(error).lower():
            raise CorruptCheckpoint(
                file, "it holds Python objects other than tensors and numbers, which are never unpickled here"
            ) from None
        raise CorruptCheckpoint(file, f"unreadable ({type(error).__name__}: {error})") from None
    except Exception as error:  # a truncated file raises EOFError or RuntimeError
        raise CorruptCheckpoint(file, f"unreadable ({type(error).__name__}: {error})") from None


@dataclass
class Checkpoint:
    """One checkpoint read back whole, so that a damaged file shows before any of it is used."""

    path: Path
    state: TrainingState
    weights: dict[str, torch.Tensor]
    optim: dict
    rng: dict | None


def read_checkpoint(path: Path, process_index: int) -> Checkpoint:
    return Checkpoint(path, read_state(path), read_weights(path), read_optim(path), read_rng(path, process_index))
