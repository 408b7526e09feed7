"""Guidance rules as pure functions over noise predictions.

Paper (TaxaDiffusion, "taxonomic classifier-free guidance"): the unconditional branch of CFG is
replaced by the level-0 conditioning, so sampling contrasts the fine lineage c_k with the coarsest
rank c_0:

    eps = (1 + w) * eps(x_t, c_k) - w * eps(x_t, c_0)

With the diffusers convention `guidance_scale = s = 1 + w` (published s = 9.0, w = 8) this is
`eps_0 + s * (eps_k - eps_0)`, the same algebra as vanilla CFG with c_0 as the negative.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .checks import check_window
from .choices import Choice

if TYPE_CHECKING:  # the rules are arithmetic on whatever tensors they get; `--help` must not import torch
    import torch


class Guidance(Choice):
    TAXONOMIC = "taxonomic"  # negative branch = the level-0 (coarsest rank) conditioning
    VANILLA = "vanilla"  # negative branch = every rank "None" (classic CFG)
    NONE = "none"  # one conditional pass


def cfg(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): eps_u + s * (eps_c - eps_u)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def taxonomic_cfg(eps_fine: torch.Tensor, eps_coarse: torch.Tensor, w: float) -> torch.Tensor:
    """Taxonomic CFG: (1 + w) * eps(c_k) - w * eps(c_0); w = 0 gives the conditional prediction.

    Evaluated as eps(c_0) + (1 + w) * (eps(c_k) - eps(c_0)), the same algebra in the operation order of
    diffusers' CFG, so that results match a StableDiffusionPipeline given c_0 as the negative bit for bit.
    """
    return cfg(eps_fine, eps_coarse, 1.0 + w)


def in_window(step: int, num_steps: int, window: tuple[float, float] = (0.0, 1.0)) -> bool:
    """Whether sampling step `step` (0-based, of `num_steps`) lies in the guidance window.

    The window is given as fractions (r0, r1) of the sampling schedule: (0, 1) guides every step, (0, 0.5)
    the first (noisiest) half. As published (`i >= r0 * N and i <= r1 * N`) both ends are included, so with
    N = 20 the window (0, 0.5) guides steps 0..10.
    """
    start, end = check_window("window", window)
    return start * num_steps <= step <= end * num_steps
