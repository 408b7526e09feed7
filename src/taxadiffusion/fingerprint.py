"""What decides a component's outputs, as a key: its own config and a digest of its weights. Keys name caches
(the latent cache, an evaluation's scores) and generated images, so they must read the same in every process and
every run: diffusers' bookkeeping keys are left out of them (see `own_config`)."""

from __future__ import annotations

import hashlib
import inspect
import json

import torch
from diffusers import SchedulerMixin

from .devices import STORAGE_DTYPES


def own_config(component) -> dict:
    """A component's config as far as it decides the outputs. A scheduler's holds only its own parameters:
    `from_config` also keeps the keys of the scheduler it was made from, so the same scheduler would read
    differently after another sequence of `--scheduler` choices. diffusers' bookkeeping keys (`_class_name`,
    `_diffusers_version`, `_name_or_path`, `_use_default_values`) are left out: they decide no pixel, and
    `_use_default_values` lists a set, in an order that changes from one process to the next."""
    config = {k: v for k, v in dict(getattr(component, "config", None) or {}).items() if not k.startswith("_")}
    if isinstance(component, SchedulerMixin):
        own = inspect.signature(type(component).__init__).parameters
        config = {k: v for k, v in config.items() if k in own}
    return config


def weights_digest(pipeline) -> str:
    """A hash of a pipeline's weights and configs (every component), whether loaded from disk or in memory."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(pipeline.components):
        component = pipeline.components[name]
        if component is None:
            continue
        digest.update(json.dumps([name, type(component).__name__, own_config(component)], default=str).encode())
        if isinstance(component, torch.nn.Module):
            for key, value in sorted(component.state_dict().items()):
                digest.update(key.encode())
                flat = value.detach().cpu().contiguous().reshape(-1)
                digest.update(str(value.dtype).encode() + memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def generation_key(pipeline, seed: int) -> dict:
    """What decides the pixels of a generated image: the model (its weights as loaded: the digest tells an fp32
    pipeline from its bf16 copy), its sampling settings and the seed; and, for a reader, a half precision by name
    (absent for fp32, so the keys of images made before `--precision` existed still match)."""
    key = {"model": weights_digest(pipeline), **pipeline.sampling.to_dict(), "seed": seed}
    precision = {getattr(torch, dtype): name for name, dtype in STORAGE_DTYPES.items()}.get(pipeline.unet.dtype)
    return key | ({"precision": precision} if precision not in (None, "fp32") else {})
