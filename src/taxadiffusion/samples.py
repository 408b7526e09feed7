"""Images of one taxon written to a folder (the `sample` command): PNGs plus a grid."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import InputError, OutputExists
from .names import name_slug
from .taxonomy import Lineage

MAX_SAMPLES = 10_000  # one call; a training set's worth is `generate`'s work


def check_counts(n: int, batch_size: int) -> None:
    """Checked before the model loads."""
    if not 1 <= n <= MAX_SAMPLES:
        raise InputError(f"--n must be between 1 and {MAX_SAMPLES:,}, got {n}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")


def write_samples(
    pipe, lineage: Lineage, n: int, out: str | Path, seed: int = 0, batch_size: int = 16, overwrite: bool = False
) -> list[Path]:
    """`n` images of `lineage` (the pipeline's sampling settings) as `<name>_NNN.png` and `<name>_grid.png`;
    existing images of the taxon are refused without `overwrite`. Returns the image paths, grid last."""
    from .grid import image_grid

    check_counts(n, batch_size)
    out = Path(out)
    stem = name_slug(lineage.scientific_name)
    targets = [out / f"{stem}_{i:03d}.png" for i in range(n)] + [out / f"{stem}_grid.png"]
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise OutputExists(f"{existing[0]} exists; choose another --out or pass --overwrite")
    generator = torch.Generator().manual_seed(seed)
    images = []
    for start in range(0, n, batch_size):
        images += pipe(lineage, num_images_per_prompt=min(batch_size, n - start), generator=generator).images
    out.mkdir(parents=True, exist_ok=True)
    for image, target in zip(images, targets, strict=False):
        image.save(target)
    image_grid(images).save(targets[-1])
    return targets
