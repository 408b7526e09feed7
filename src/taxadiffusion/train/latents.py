"""VAE latents cached on disk, so a training step of a latent model never runs the VAE encoder.

Each image is encoded once and its latent distribution (mean and log-variance) stored; a training step
samples from it, as encoding would. Random square crops survive the cache: under `random_crop` an image is
encoded whole, its short side resized to the training resolution (`resize_short_side`), and each item is a
square window of that latent, drawn like `ImageDataset` draws its pixel crop (a generator seeded by seed,
epoch and index) but at the VAE's granularity (8 px for SD). The `squash` and `pad` policies are
deterministic, so their cached latent is exactly the one a step would encode.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset

from ..atomic import atomic_file
from ..codec import spatial_factor
from ..data.dataset import ImageDataset, pixel_tensor
from ..data.images import CropPolicy, prepare_image, resize_short_side, square_window
from ..fingerprint import own_config
from ..saved_files import save_safetensors
from ..shards import LATENT_CHUNK, ONE_PROCESS, Share, run_chunks, wait_for

INDEX = "index.safetensors"
# Part of the cache key, so that a cache of another layout is never misread. v3: shard i holds images i*chunk onwards.
FORMAT = "whole-image latents v3"


class LatentDataset(Dataset):
    """Items are `{"latent_params": (2C, s, s), "taxon_ids": (R,), "index": int}` with s the latent side.

    The cache is a folder of shards (flat float32 buffers, each image's (2C, h, w) distribution at an offset
    that `index.safetensors` records), read lazily through memory maps: a dataset of any size costs page
    cache, not process memory. An item is an s x s window of the image's latent, placed by the `source`
    image dataset's crop generator (random per seed, epoch and index, or centred).
    """

    def __init__(self, folder: Path, source: ImageDataset, side: int):
        index = load_file(Path(folder) / INDEX)
        self.folder = Path(folder)
        # numpy arrays, not Python lists: at iNat21's 2.7 M images lists took 384 MiB, and every DataLoader worker
        # touched (so copied) their objects' reference counts; arrays are 40 bytes an image, shared as they are
        self.shard, self.offset, self.shapes = (index[k].numpy() for k in ("shard", "offset", "shapes"))
        self.source = source
        self.side = side
        self._open: dict[int, object] = {}  # shard -> safe_open handle, per process

    def __getstate__(self) -> dict:  # handles stay in the process that opened them (DataLoader workers)
        return {**self.__dict__, "_open": {}}

    def set_epoch(self, epoch: int) -> None:  # the same interface as ImageDataset
        self.source.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.shapes)

    def latent(self, index: int) -> torch.Tensor:
        """The image's whole (2C, h, w) latent distribution."""
        shard = int(self.shard[index])
        if shard not in self._open:
            self._open[shard] = safe_open(self.folder / f"shard-{shard:05d}.safetensors", framework="pt")
        shape = tuple(int(side) for side in self.shapes[index])
        start = int(self.offset[index])
        return self._open[shard].get_slice("params")[start : start + math.prod(shape)].view(shape)

    def __getitem__(self, index: int) -> dict:
        params = self.latent(index)
        _, height, width = params.shape
        left, top = square_window(width, height, self.side, self.source.crop_rng(index))
        window = params[:, top : top + self.side, left : left + self.side]
        return {"latent_params": window.contiguous(), "taxon_ids": self.source.taxon_ids[index], "index": index}


def cache_key(dataset: ImageDataset, vae, chunk: int = LATENT_CHUNK) -> str:
    # The VAE's own config: diffusers' `_use_default_values` lists a set, in another order in each process, so
    # the processes of one launch would each look for another cache folder and wait for each other forever.
    parts = (list(dataset.paths), dataset.size, dataset.policy.value, own_config(vae), FORMAT, chunk)
    if vae.dtype != torch.float32:  # a VAE kept in low precision encodes other latents (fp32 keys unchanged)
        parts += (str(vae.dtype),)
    payload = repr(parts)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def encoder_input(dataset: ImageDataset, index: int, factor: int) -> torch.Tensor:
    """The (3, H, W) pixels in [-1, 1] that the cache encodes for one record: the whole image with its short
    side at the resolution under `random_crop`, else the policy's (deterministic) square."""
    image = dataset.open(index)
    if dataset.policy is CropPolicy.RANDOM_CROP:
        image = resize_short_side(image, dataset.size, factor)
    else:
        image = prepare_image(image, dataset.size, dataset.policy)
    return pixel_tensor(np.array(image))


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


class PixelItems(Dataset):
    """(index, pixels) of some records, as the cache encodes them: a DataLoader's workers decode and resize."""

    def __init__(self, dataset: ImageDataset, items: range, factor: int):
        self.dataset, self.items, self.factor = dataset, items, factor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor]:
        index = self.items[position]
        return index, encoder_input(self.dataset, index, self.factor)


def encode_shard(dataset: ImageDataset, vae, items: range, batch_size: int, workers: int, advance) -> dict:
    """One shard: the latent distributions of `items` as one flat buffer, with each image's offset and shape.

    Images share a shape only by aspect ratio, so they are batched by shape; all pending groups are encoded
    (partial or not) whenever `4 * batch_size` images wait, which bounds the pixels held. The grouping depends
    on the shard's images alone, so a shard is the same bytes whichever process encodes it."""
    device = next(vae.parameters()).device
    loader = DataLoader(
        PixelItems(dataset, items, spatial_factor(vae)), batch_size=None, num_workers=workers, persistent_workers=False
    )
    pending: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = defaultdict(list)
    encoded: dict[int, torch.Tensor] = {}

    def encode(group: list[tuple[int, torch.Tensor]]) -> None:
        pixels = torch.stack([p for _, p in group]).to(device, vae.dtype)
        params = vae.encode(pixels).latent_dist.parameters.float().cpu()
        encoded.update(zip([i for i, _ in group], params, strict=True))
        advance(len(group))
        group.clear()

    for index, pixels in loader:
        group = pending[tuple(pixels.shape[1:])]
        group.append((index, pixels))
        if len(group) == batch_size:
            encode(group)
        if sum(map(len, pending.values())) >= 4 * batch_size:
            for waiting in pending.values():
                if waiting:
                    encode(waiting)
    for waiting in pending.values():
        if waiting:
            encode(waiting)
    order = sorted(encoded)
    sizes = torch.tensor([encoded[i].numel() for i in order])
    return {
        "params": torch.cat([encoded[i].reshape(-1) for i in order]),
        "index": torch.tensor(order),
        "offset": torch.cumsum(sizes, 0) - sizes,
        "shape": torch.tensor([list(encoded[i].shape) for i in order]),
    }


def write_index(folder: Path, shards: list[Path], count: int) -> None:
    """`index.safetensors`: where each image's latent lies (its presence marks a complete cache)."""
    where = torch.full((count, 2), -1, dtype=torch.long)  # (shard, offset)
    shapes = torch.zeros(count, 3, dtype=torch.long)
    for shard, path in enumerate(shards):
        with safe_open(path, framework="pt") as stored:
            index = stored.get_tensor("index")
            where[index, 0], where[index, 1] = shard, stored.get_tensor("offset")
            shapes[index] = stored.get_tensor("shape")
    if (where[:, 0] < 0).any():
        raise RuntimeError(f"latent cache in {folder}: {int((where[:, 0] < 0).sum())} images missing")
    index = {"shard": where[:, 0].contiguous(), "offset": where[:, 1].contiguous(), "shapes": shapes}
    with atomic_file(folder / INDEX) as tmp:
        save_safetensors(index, tmp)


@torch.no_grad()
def build_latent_dataset(
    dataset: ImageDataset,
    vae,
    cache_dir: Path,
    share: Share = ONE_PROCESS,
    batch_size: int = 16,
    workers: int = 0,
    progress: bool = True,
    chunk: int | None = None,
) -> LatentDataset:
    """Encode every image once into `cache_dir/latents-<key>/` (or find it there), split across processes in
    shards of `chunk` images (`shards.py`: a killed build goes on from its finished shards), and wrap the result."""
    chunk = chunk or LATENT_CHUNK
    folder = Path(cache_dir) / f"latents-{cache_key(dataset, vae, chunk)}"
    if not (folder / INDEX).is_file():

        def work(index: int, items: range, advance) -> None:
            shard = encode_shard(dataset, vae, items, batch_size, workers, advance)
            with atomic_file(folder / shard_name(index)) as tmp:
                save_safetensors(shard, tmp)

        shards = run_chunks(folder, len(dataset), chunk, share, shard_name, work, "caching VAE latents", progress)
        if share.is_main:
            write_index(folder, shards, len(dataset))
        wait_for([folder / INDEX], "the latent index", False)
    return LatentDataset(folder, dataset, side=dataset.size // spatial_factor(vae))


def sample_latents(params: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """A draw from the cached latent distribution, scaled as the UNet expects."""
    return DiagonalGaussianDistribution(params).sample() * scaling_factor
