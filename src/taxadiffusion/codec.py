"""What turns pixels into the space the UNet denoises, and back: a VAE, the lossless patch codec, or nothing.

The patch codec (`SpaceToDepth`) stands where Stable Diffusion's VAE stands, so that pixel-space models with
patches train and sample through the same code as latent models.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class SpaceToDepth(ModelMixin, ConfigMixin):
    """A lossless pixel-space "autoencoder": each `factor` x `factor` block of pixels becomes channels.

    It stands where a VAE stands (encode/decode, `scaling_factor` 1), so pixel models with patches use
    the same training and sampling code as latent models. No library offers this as a diffusers
    component; it is two calls to torch's pixel (un)shuffle.
    """

    @register_to_config
    def __init__(self, factor: int = 2, channels: int = 3, scaling_factor: float = 1.0):
        super().__init__()
        # A persistent scalar gives the module a device and dtype, and diffusers a weights file to save and load.
        self.register_buffer("anchor", torch.zeros(()))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(pixels, self.config.factor)

    def decode(self, latents: torch.Tensor, return_dict: bool = False, generator=None) -> tuple[torch.Tensor]:
        return (F.pixel_shuffle(latents, self.config.factor),)


def base_codec(base: str) -> str:
    """The codec of a base folder or hub id: "vae" unless its `vae/config.json` names another (a prior)."""
    config_file = Path(base) / "vae" / "config.json"
    if not config_file.is_file():
        # a prior in pixel space has no codec; else a hub id, or a folder checked elsewhere
        return "pixels" if (Path(base) / "prior.json").is_file() else "vae"
    try:
        name = json.loads(config_file.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "vae"  # the loader names the damaged file
    return "patches" if name == SpaceToDepth.__name__ else "vae"


def spatial_factor(vae: nn.Module | None) -> int:
    """How many pixels one latent cell spans."""
    if vae is None:
        return 1
    if isinstance(vae, SpaceToDepth):
        return vae.config.factor
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_images(vae: nn.Module | None, pixels: torch.Tensor, generator: torch.Generator | None = None):
    """Pixels in [-1, 1] -> the space the UNet denoises (VAE latents x scaling factor, patches, or pixels)."""
    if vae is None:
        return pixels
    if isinstance(vae, SpaceToDepth):
        return vae.encode(pixels)
    latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample(generator)
    return latents * vae.config.scaling_factor
