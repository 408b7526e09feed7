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
from torch.utils.data import Dataset

from ..atomic import atomic_file
from ..codec import spatial_factor
from ..data.dataset import ImageDataset, pixel_tensor
from ..data.images import CropPolicy, prepare_image, resize_short_side, square_window
from ..saved_files import save_safetensors

FORMAT = "whole-image latents v2"  # part of the cache key: a cache of another layout is never misread


class LatentDataset(Dataset):
    """Items are `{"latent_params": (2C, s, s), "taxon_ids": (R,), "index": int}` with s the latent side.

    The cache is a folder of shards (flat float32 buffers, each image's (2C, h, w) distribution at an offset
    that `index.safetensors` records), read lazily through memory maps: a dataset of any size costs page
    cache, not process memory. An item is an s x s window of the image's latent, placed by the `source`
    image dataset's crop generator (random per seed, epoch and index, or centred).
    """

    def __init__(self, folder: Path, source: ImageDataset, side: int):
        index = load_file(Path(folder) / "index.safetensors")
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


def cache_key(dataset: ImageDataset, vae) -> str:
    parts = (list(dataset.paths), dataset.size, dataset.policy.value, vae.config, FORMAT)
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


class ShardWriter:
    """Appends flat tensors to `shard-NNNNN.safetensors` files of about `shard_bytes` each (safetensors
    cannot append, so a shard is held in memory until full) and records where each one went.

    Each shard also holds which images it has (`index`, `offset`, `shape`) and appears only once complete
    (written aside, then renamed), so an interrupted build resumes: the shards on disk count as `done`.
    """

    def __init__(self, folder: Path, count: int, shard_bytes: int):
        self.folder, self.shard_bytes = folder, shard_bytes
        self.where = torch.full((count, 2), -1, dtype=torch.long)  # (shard, offset)
        self.shapes = torch.zeros(count, 3, dtype=torch.long)
        self.shards = 0
        for path in sorted(folder.glob("shard-*.safetensors")):
            shard = int(path.stem.split("-")[1])
            with safe_open(path, framework="pt") as stored:
                index = stored.get_tensor("index")
                self.where[index, 0] = shard
                self.where[index, 1] = stored.get_tensor("offset")
                self.shapes[index] = stored.get_tensor("shape")
            self.shards = max(self.shards, shard + 1)
        self.done = set((self.where[:, 0] >= 0).nonzero().flatten().tolist())
        self.buffer: list[tuple[int, torch.Tensor]] = []
        self.size = 0

    def add(self, index: int, params: torch.Tensor) -> None:
        self.buffer.append((index, params))
        self.size += params.numel()
        if self.size * 4 >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        index = torch.tensor([i for i, _ in self.buffer])
        sizes = torch.tensor([p.numel() for _, p in self.buffer])
        stored = {
            "params": torch.cat([p.reshape(-1) for _, p in self.buffer]),
            "index": index,
            "offset": torch.cumsum(sizes, 0) - sizes,
            "shape": torch.tensor([list(p.shape) for _, p in self.buffer]),
        }
        path = self.folder / f"shard-{self.shards:05d}.safetensors"
        with atomic_file(path) as tmp:
            save_safetensors(stored, tmp)
        self.where[index, 0], self.where[index, 1], self.shapes[index] = self.shards, stored["offset"], stored["shape"]
        self.done.update(index.tolist())
        self.buffer, self.size, self.shards = [], 0, self.shards + 1

    def close(self) -> None:
        """Write the last shard, then the index (its presence marks a complete cache)."""
        self.flush()
        if len(self.done) != len(self.where):
            raise RuntimeError(f"latent cache in {self.folder}: {len(self.where) - len(self.done)} images missing")
        index = {"shard": self.where[:, 0].contiguous(), "offset": self.where[:, 1].contiguous(), "shapes": self.shapes}
        with atomic_file(self.folder / "index.safetensors") as tmp:
            save_safetensors(index, tmp)


@torch.no_grad()
def build_latent_dataset(
    dataset: ImageDataset,
    vae,
    cache_dir: Path,
    batch_size: int = 16,
    progress: bool = True,
    shard_bytes: int = 2**30,
) -> LatentDataset:
    """Encode every image once into `cache_dir/latents-<key>/` (or find it there; an interrupted build
    goes on from its last complete shard) and wrap the result."""
    from tqdm.auto import tqdm

    factor = spatial_factor(vae)
    folder = Path(cache_dir) / f"latents-{cache_key(dataset, vae)}"
    if not (folder / "index.safetensors").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        writer = ShardWriter(folder, len(dataset), shard_bytes)
        device = next(vae.parameters()).device
        # Images share a shape only by aspect ratio, so they are batched by shape; all pending groups are
        # encoded (partial or not) whenever `4 * batch_size` images wait, which bounds the pixels held.
        pending: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = defaultdict(list)

        def encode(group: list[tuple[int, torch.Tensor]]) -> None:
            pixels = torch.stack([p for _, p in group]).to(device, vae.dtype)
            params = vae.encode(pixels).latent_dist.parameters.float().cpu()
            for (index, _), one in zip(group, params, strict=True):
                writer.add(index, one)
            group.clear()

        def encode_pending() -> None:
            for group in pending.values():
                if group:
                    encode(group)
            pending.clear()

        todo = [i for i in range(len(dataset)) if i not in writer.done]
        bar = tqdm(todo, desc="caching VAE latents", initial=len(writer.done), total=len(dataset), disable=not progress)
        for index in bar:
            pixels = encoder_input(dataset, index, factor)
            group = pending[tuple(pixels.shape[1:])]
            group.append((index, pixels))
            if len(group) == batch_size:
                encode(group)
            if sum(map(len, pending.values())) >= 4 * batch_size:
                encode_pending()
        encode_pending()
        writer.close()
    return LatentDataset(folder, dataset, side=dataset.size // factor)


def sample_latents(params: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """A draw from the cached latent distribution, scaled as the UNet expects."""
    return DiagonalGaussianDistribution(params).sample() * scaling_factor
