"""Which device a command samples or evaluates on: the one asked for, checked to exist here, or the best one."""

from __future__ import annotations

import os

from .errors import InputError

DEVICE_HELP = "cpu, cuda, cuda:1 or mps (default: a CUDA GPU if one is visible, else Apple's MPS, else the CPU)"
# Precisions as settings and options name them, and the torch dtype each one is (`--precision`,
# `train.text_features_dtype`). A pipeline's weights and sampling in half precision, as diffusers' `torch_dtype`:
# half the memory and the tensor cores' rate on GPUs. Other pixels than fp32's, so other images: their key names
# the weights as loaded.
STORAGE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # torch dtype names
PRECISIONS = tuple(STORAGE_DTYPES)
PRECISION_HELP = (
    "the pipeline's weights and sampling: fp32 (default), bf16 or fp16 (half the memory, faster on GPUs; "
    "other pixels than fp32's, so a folder of images keeps one precision)"
)


def choose_device(name: str | None) -> str:
    """The asked device, checked before anything loads; without one, the best available."""
    import torch

    if not name:
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # one of several processes on this machine: its own GPU
        name = f"cuda:{int(os.environ['LOCAL_RANK']) % max(1, torch.cuda.device_count())}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r} is not a device; use cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise InputError(
                f"--device {name}: torch {torch.__version__} sees no CUDA GPU here (a CPU-only build, no driver, "
                "or CUDA_VISIBLE_DEVICES hides them); use --device cpu"
            )
        if (device.index or 0) >= count:
            raise InputError(f"--device {name}: only {count} CUDA GPU(s) here (cuda:0 .. cuda:{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {name}: MPS is not available here; use --device cpu")
    return name


def sampling_dtype(precision: str | None):
    """The torch dtype a command loads its pipeline in (`--precision`; None: fp32), given to `from_pretrained` as
    its `dtype`: each component loads in it (a later `.to(dtype)` gives the same weights, and diffusers warns)."""
    import torch

    return getattr(torch, STORAGE_DTYPES[precision or "fp32"])
