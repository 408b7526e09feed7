"""Image grids for sample sheets (PIL only)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw

BACKGROUND = (255, 255, 255)


def image_grid(
    images: Sequence[Image.Image],
    columns: int | None = None,
    labels: Sequence[str] | None = None,
    pad: int = 2,
    min_tile: int = 64,
) -> Image.Image:
    """Tile equally sized images row by row; optional `labels` name each row on its left.

    Tiles smaller than `min_tile` are enlarged by an integer factor (nearest neighbour, no blur), so
    32 px samples stay readable.
    """
    if not images:
        raise ValueError("no images to tile")
    factor = max(1, -(-min_tile // max(images[0].size)))
    if factor > 1:
        images = [im.resize((im.width * factor, im.height * factor), Image.Resampling.NEAREST) for im in images]
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    label_width = 0
    if labels:
        label_width = 6 * max(len(label) for label in labels) + 2 * pad
    sheet = Image.new("RGB", (label_width + columns * (width + pad) + pad, rows * (height + pad) + pad), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        sheet.paste(image.convert("RGB"), (label_width + pad + column * (width + pad), pad + row * (height + pad)))
    for row, label in enumerate(labels or []):
        draw.text((pad, pad + row * (height + pad) + max(0, height // 2 - 5)), label, fill=(0, 0, 0))
    return sheet
