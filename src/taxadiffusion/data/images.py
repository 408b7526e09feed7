"""Image loading (PIL only), the published crop/resize policies, and image health checks.

The published data preparation: iNat random square crop (centre crop for validation) + resize; FishNet crop to
the bounding box, then a random square crop or a squash; BIOSCAN pad to square (white) + resize.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..choices import Choice
from ..errors import UnreadableFile

WHITE = (255, 255, 255)
# Modes `load_image` converts without loss of meaning; anything else is reported as odd.
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})


class CropPolicy(Choice):
    RANDOM_CROP = "random_crop"  # a random square of side min(w, h), then resize (centre crop when not random)
    SQUASH = "squash"  # resize to a square, ignoring the aspect ratio
    PAD = "pad"  # pad the short side with white to a square, then resize
    # Published FishNet preparation: per sample a random square crop with p = 0.5, else squash; a centre crop
    # when not random (upstream's validation). The box crop before it is the record's (`crop_to_box`).
    FISHNET = "fishnet"


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited over white."""
    if image.mode in SIXTEEN_BIT_MODES:
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        if image.mode == "F":
            top = max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def load_image(path: str | Path) -> Image.Image:
    """Open an image as 8-bit RGB with its EXIF orientation applied; a file that cannot be decoded raises
    `UnreadableFile` naming it."""
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except Image.DecompressionBombError as error:
        raise UnreadableFile(path, f"image too large to decode safely ({error})") from None
    except FileNotFoundError:
        raise UnreadableFile(path, "image file is missing") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UnreadableFile(path, f"cannot decode the image ({error})") from None


def square_window(width: int, height: int, side: int, rng: random.Random | None = None) -> tuple[int, int]:
    """(left, top) of a `side` x `side` window inside width x height: uniform with `rng`, else centred."""
    left = rng.randint(0, width - side) if rng else (width - side) // 2
    top = rng.randint(0, height - side) if rng else (height - side) // 2
    return left, top


def prepare_image(
    image: Image.Image, size: int, policy: CropPolicy | str, rng: random.Random | None = None
) -> Image.Image:
    """Square `size` x `size` RGB image by one crop policy; `rng` None means deterministic (centre)."""
    policy = CropPolicy.parse(policy)
    width, height = image.size
    if policy is CropPolicy.FISHNET:
        policy = CropPolicy.RANDOM_CROP if rng is None or rng.random() < 0.5 else CropPolicy.SQUASH
    if policy is CropPolicy.RANDOM_CROP:
        side = min(width, height)
        left, top = square_window(width, height, side, rng)
        image = image.crop((left, top, left + side, top + side))
    elif policy is CropPolicy.PAD:
        side = max(width, height)
        canvas = Image.new("RGB", (side, side), WHITE)
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        image = canvas
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return image


def crop_to_box(image: Image.Image, box: tuple[int, int, int, int] | None) -> Image.Image:
    """The part of the image inside an (x, y, w, h) box (clipped to the image); the whole image without one
    or where the box lies outside it."""
    if box is None:
        return image
    x, y, w, h = box
    left, top = min(max(x, 0), image.width), min(max(y, 0), image.height)
    right, bottom = min(x + w, image.width), min(y + h, image.height)
    return image.crop((left, top, right, bottom)) if right > left and bottom > top else image


def resize_short_side(image: Image.Image, size: int, multiple: int = 1) -> Image.Image:
    """Resize so the short side is `size` and the long side keeps the aspect ratio, rounded to `multiple`.

    A square crop of side `size` of the result is, up to resampling, `RANDOM_CROP`'s output for some crop
    position, so cropping can happen later (the latent cache crops latents, `multiple` being the VAE's factor).
    """
    width, height = image.size
    scale = size / min(width, height)
    long_side = max(size, round(max(width, height) * scale / multiple) * multiple)
    target = (long_side, size) if width >= height else (size, long_side)
    return image if image.size == target else image.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)


@dataclass(frozen=True)
class ImageCheck:
    """The health of one image file; `problem` is None for a usable file."""

    path: Path
    problem: str | None = None  # missing | unreadable | truncated | oversized
    mode: str | None = None
    size: tuple[int, int] | None = None

    @property
    def odd_mode(self) -> str | None:
        """A mode other than 8-bit RGB (usable, converted on load, but worth knowing)."""
        if self.problem or self.mode in (None, "RGB"):
            return None
        return "16-bit" if self.mode in SIXTEEN_BIT_MODES else self.mode


def check_image(path: str | Path) -> ImageCheck:
    """Open and fully decode one image, classifying what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        return ImageCheck(path, "missing")
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as image:
            mode, size = image.mode, image.size
            try:
                image.load()
            except (OSError, SyntaxError, ValueError) as error:
                problem = (
                    "truncated" if "truncat" in str(error).lower() or "broken" in str(error).lower() else "unreadable"
                )
                return ImageCheck(path, problem, mode, size)
    except Image.DecompressionBombError:  # a header claiming more pixels than Pillow's safety limit
        return ImageCheck(path, "oversized")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return ImageCheck(path, "unreadable")
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    return ImageCheck(path, None, mode, size)
