"""The torch Dataset over records: prepared pixels plus per-rank taxon ids."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..taxonomy import Taxonomy
from .images import CropPolicy, load_image, prepare_image
from .records import Record

UNLABELLED = -1  # taxon id of a rank finer than the record's label


class ImageDataset(Dataset):
    """Items are `{"pixel_values": (3, size, size) float in [-1, 1], "taxon_ids": (R,) long, "index": int}`.

    `taxon_ids[r]` is the record's id at rank r, or `UNLABELLED` where it is labelled only to a coarser
    rank. Random crops are drawn from a generator seeded by (seed, epoch, index), so an epoch is
    reproducible whatever the worker layout; call `set_epoch` between epochs.
    """

    def __init__(
        self,
        records: Sequence[Record],
        taxonomy: Taxonomy,
        size: int,
        policy: CropPolicy | str = CropPolicy.RANDOM_CROP,
        random_crop: bool = True,
        seed: int = 0,
    ):
        self.records = list(records)
        self.taxonomy = taxonomy
        self.size = size
        self.policy = CropPolicy.parse(policy)
        self.random_crop = random_crop
        self.seed = seed
        self.epoch = 0
        self.taxon_ids = torch.full((len(self.records), len(taxonomy.ranks)), UNLABELLED, dtype=torch.long)
        for row, record in enumerate(self.records):
            ids = taxonomy.ids(record.lineage)
            self.taxon_ids[row, : len(ids)] = torch.tensor(ids)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def open(self, index: int) -> Image.Image:
        """The record's image as RGB, or an error that names the file and the command that lists them all."""
        record = self.records[index]
        try:
            return load_image(record.image)
        except (OSError, ValueError) as error:
            raise RuntimeError(
                f"cannot load training image {record.image}: {error}. "
                "Run `taxadiffusion data check` on this dataset to list every unusable image."
            ) from error

    def crop_rng(self, index: int) -> random.Random | None:
        """The generator of an item's random crop in this epoch (None: centre crops)."""
        return random.Random(hash((self.seed, self.epoch, index))) if self.random_crop else None

    def load(self, index: int) -> np.ndarray:
        """The prepared image (size, size, 3) uint8."""
        return np.array(prepare_image(self.open(index), self.size, self.policy, self.crop_rng(index)))

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": pixel_tensor(self.load(index)), "taxon_ids": self.taxon_ids[index], "index": index}


def pixel_tensor(image: np.ndarray) -> torch.Tensor:
    """An (H, W, 3) uint8 array as the (3, H, W) float tensor in [-1, 1] that models take."""
    return torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1.0
