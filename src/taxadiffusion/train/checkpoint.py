"""Checkpoints: written atomically (temporary folder + rename), the last K kept.

A checkpoint holds only what training changes (LoRA or UNet weights that train, the taxonomy encoder),
the optimizer and LR scheduler, every process's RNG state and the position in the data. accelerate's
`save_state` would also write the frozen base UNet each time (gigabytes for SD 1.5), hence this module.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"
STATE = "state.json"
WEIGHTS = "weights.safetensors"


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
) -> Path:
    """Every process writes its RNG state; the main process writes the rest (and `files`, e.g. the resolved
    config and taxonomy) and publishes the folder by rename."""
    final = checkpoint_dir(root, state.global_step)
    tmp = root / f".tmp-{final.name}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a run killed mid-write; ours, never a user's
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng-{process_index}.pt")
    if is_main:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / WEIGHTS)
        torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict()}, tmp / "optim.pt")
        for name, text in (files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / STATE).write_text(json.dumps(asdict(state), indent=1) + "\n")
    barrier()
    if is_main:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    barrier()
    return final


def read_state(path: Path) -> TrainingState:
    return TrainingState(**json.loads((path / STATE).read_text()))


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / WEIGHTS)


def read_optim(path: Path) -> dict:
    return torch.load(path / "optim.pt", weights_only=False)


def read_rng(path: Path, process_index: int) -> dict | None:
    file = path / f"rng-{process_index}.pt"
    return torch.load(file, weights_only=False) if file.is_file() else None
