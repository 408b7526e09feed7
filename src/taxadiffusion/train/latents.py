"""VAE latents cached on disk, so a training step of a latent model never runs the VAE encoder.

Each image is encoded once (centre crop, no random crop: a cached latent has one crop) and its latent
distribution (mean and log-variance) stored; a training step samples from it, as encoding would.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from ..data.dataset import ImageDataset


class LatentDataset(Dataset):
    """Items are `{"latent_params": (2C, h, w), "taxon_ids": (R,), "index": int}`."""

    def __init__(self, params: torch.Tensor, taxon_ids: torch.Tensor):
        self.params = params
        self.taxon_ids = taxon_ids

    def set_epoch(self, epoch: int) -> None:  # the same interface as ImageDataset
        pass

    def __len__(self) -> int:
        return len(self.params)

    def __getitem__(self, index: int) -> dict:
        return {"latent_params": self.params[index], "taxon_ids": self.taxon_ids[index], "index": index}


def cache_key(dataset: ImageDataset, vae) -> str:
    payload = repr(([str(r.image) for r in dataset.records], dataset.size, dataset.policy.value, vae.config))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@torch.no_grad()
def build_latent_dataset(dataset: ImageDataset, vae, cache_dir: Path, batch_size: int = 16, progress: bool = True):
    """Encode every image once (or read `cache_dir/latents-<key>.safetensors`) and wrap the result."""
    from tqdm.auto import tqdm

    path = Path(cache_dir) / f"latents-{cache_key(dataset, vae)}.safetensors"
    if path.is_file():
        params = load_file(path)["params"]
    else:
        fixed = ImageDataset(dataset.records, dataset.taxonomy, dataset.size, dataset.policy, random_crop=False)
        chunks = []
        device = next(vae.parameters()).device
        for batch in tqdm(DataLoader(fixed, batch_size=batch_size), desc="caching VAE latents", disable=not progress):
            chunks.append(vae.encode(batch["pixel_values"].to(device, vae.dtype)).latent_dist.parameters.float().cpu())
        params = torch.cat(chunks)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"params": params.contiguous()}, tmp)
        tmp.replace(path)
    return LatentDataset(params, dataset.taxon_ids)


def sample_latents(params: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """A draw from the cached latent distribution, scaled as the UNet expects."""
    return DiagonalGaussianDistribution(params).sample() * scaling_factor
