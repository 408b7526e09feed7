"""The torch Dataset over records: prepared pixels plus per-rank taxon ids."""

from __future__ import annotations

import os
import random
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import UnreadableFile
from ..taxonomy import NONE_ID, Lineage, Taxonomy
from .images import CropPolicy, crop_to_box, load_image, prepare_image
from .records import Record


class UnusableTrainingImage(UnreadableFile, RuntimeError):
    """A training image that fails to load while training (the pre-flight check screens them first)."""


class PathTable(Sequence[str]):
    """File paths held in two numpy arrays (the UTF-8 bytes of all paths, and where each ends); items are str.

    DataLoader workers are forked processes, and a worker that touches a Python object of its parent writes
    its reference count, which copies the object's memory page: over an epoch every worker would end up with
    its own copy of a list of records (PyTorch issue 13246; over 1 GB per worker at iNat21's 2.7 M images).
    Two arrays have no per-item objects to touch. Items are str, not Path: pathlib interns each part of a
    path, and a worker's interned file name would be the parent's (the records' Paths), written once more.
    No library in our stack offers this; it is a few lines.
    """

    def __init__(self, paths: Iterable[str | Path]):
        # Appended one by one: a list of millions of temporary bytes objects would leave the parent's heap
        # full of freed slots among live objects, and workers that allocate into them copy those pages.
        data, ends = bytearray(), array("q", [0])
        for path in paths:
            data += os.fsencode(path)
            ends.append(len(data))
        self._bytes = np.frombuffer(data, dtype=np.uint8)
        self._offsets = np.frombuffer(ends, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"path {index} of {len(self)}")
        index %= len(self)
        start, end = self._offsets[index], self._offsets[index + 1]
        return os.fsdecode(self._bytes[start:end].tobytes())


class ImageDataset(Dataset):
    """Items are `{"pixel_values": (3, size, size) float in [-1, 1], "taxon_ids": (R,) long, "index": int}`.

    `taxon_ids[r]` is the record's id at rank r, or `NONE_ID` where it is labelled only to a coarser
    rank. Random crops (and, with `random_flip`, horizontal flips with p = 0.5, as diffusers' text-to-image
    scripts' `--random_flip`) are drawn from generators seeded by (seed, epoch, index), so an epoch is
    reproducible whatever the worker layout; call `set_epoch` between epochs. The records are kept as
    arrays (`paths`, `taxon_ids`), which forked workers share instead of copying.
    """

    def __init__(
        self,
        records: Sequence[Record],
        taxonomy: Taxonomy,
        size: int,
        policy: CropPolicy | str = CropPolicy.RANDOM_CROP,
        random_crop: bool = True,
        seed: int = 0,
        random_flip: bool = False,
    ):
        self.paths = PathTable(record.image for record in records)
        self.taxonomy = taxonomy
        self.size = size
        self.policy = CropPolicy.parse(policy)
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0
        self.taxon_ids = _taxon_id_table([record.lineage for record in records], taxonomy)
        # (x, y, w, h) per record, -1 where there is none; an array, which forked workers share
        boxes = [record.box or (-1, -1, -1, -1) for record in records]
        self.boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4) if any(r.box for r in records) else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def open(self, index: int) -> Image.Image:
        """The record's image as RGB (cropped to its bounding box where it has one), or an error that names the
        file and the command that lists them all."""
        path = self.paths[index]
        box = None if self.boxes is None or self.boxes[index, 2] < 0 else tuple(int(v) for v in self.boxes[index])
        try:
            return crop_to_box(load_image(path), box)
        except UnreadableFile as error:
            raise UnusableTrainingImage(
                path,
                f"{error.args[0].removeprefix(f'{path}: ')} (training image)",
                "run `taxadiffusion data check` on this dataset to list every unusable image",
            ) from None

    def crop_rng(self, index: int) -> random.Random | None:
        """The generator of an item's random crop in this epoch (None: centre crops)."""
        return random.Random(hash((self.seed, self.epoch, index))) if self.random_crop else None

    def load(self, index: int) -> np.ndarray:
        """The prepared image (size, size, 3) uint8."""
        image = prepare_image(self.open(index), self.size, self.policy, self.crop_rng(index))
        # Its own generator (salt 1), so that turning flips on leaves every crop as it was.
        if self.random_flip and random.Random(hash((self.seed, self.epoch, index, 1))).random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.array(image)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": pixel_tensor(self.load(index)), "taxon_ids": self.taxon_ids[index], "index": index}


def pixel_tensor(image: np.ndarray) -> torch.Tensor:
    """An (H, W, 3) uint8 array as the (3, H, W) float tensor in [-1, 1] that models take."""
    return torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1.0


def _taxon_id_table(lineages: Sequence[Lineage], taxonomy: Taxonomy) -> torch.Tensor:
    """(N, R) per-rank taxon ids, `NONE_ID` below each lineage's depth; looked up once per distinct lineage."""
    width = len(taxonomy.ranks)
    rows: dict[Lineage, tuple[int, ...]] = {}
    for lineage in lineages:
        if lineage not in rows:
            ids = taxonomy.ids(lineage)
            rows[lineage] = ids + (NONE_ID,) * (width - len(ids))
    table = np.array([rows[lineage] for lineage in lineages], dtype=np.int64).reshape(len(lineages), width)
    return torch.from_numpy(table)
