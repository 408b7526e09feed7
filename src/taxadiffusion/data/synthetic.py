"""A procedurally generated taxonomy of synthetic fish-like "species": the embedded default and test oracle.

Every rank owns one visible trait, so relatives share looks and close species differ subtly:

| rank             | trait                                                   |
|------------------|---------------------------------------------------------|
| kingdom          | background lightness                                    |
| phylum           | background hue                                          |
| class            | body shape (ellipse, diamond, rounded box, teardrop)    |
| order            | body elongation and tail shape                          |
| family           | body colour                                             |
| genus            | pattern type (bars, stripes, spots, diagonals)          |
| specific_epithet | pattern density and fin accent colour (the subtle one)  |

Siblings always get distinct values of their rank's trait, so any two species differ in the trait of
the rank where their lineages part. Each image varies in pose (facing, rotation), position, scale,
brightness and noise. Images are rendered on demand at any resolution, deterministically from a seed:
training image `i` of a species is always the same picture; `sample` draws unlimited fresh ones.
"""

from __future__ import annotations

import colorsys
import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import write_text_atomic
from ..errors import InputError, OutputExists
from ..taxonomy import STANDARD_RANKS, Lineage, Rank, Taxonomy
from .records import RecordSet

# Discrete trait palettes, one per rank (index = rank level).
BACKGROUND_VALUES = (0.78, 0.45, 0.62)
BACKGROUND_HUES = (0.58, 0.47, 0.12, 0.25, 0.75)
BODY_SHAPES = ("ellipse", "diamond", "box", "teardrop")
ELONGATIONS = (1.7, 2.3, 2.9)
TAILS = ("fan", "fork", "round")
BODY_HUES = tuple(i / 12 for i in range(12))
PATTERNS = ("bars", "stripes", "spots", "diagonal")
DENSITIES = (2, 3, 4)
ACCENTS = ((0.97, 0.97, 0.97), (0.08, 0.08, 0.08), (0.98, 0.82, 0.10))

PALETTE_SIZES = (
    len(BACKGROUND_VALUES),
    len(BACKGROUND_HUES),
    len(BODY_SHAPES),
    len(ELONGATIONS) * len(TAILS),
    len(BODY_HUES),
    len(PATTERNS),
    len(DENSITIES) * len(ACCENTS),
)

# The traits in plain words, for a prior's captions (`caption.template` "{appearance}"): what a web caption says
# of a photo, so that a prior can be steered to a look without ever reading a name finer than its caption rank.
SHAPE_WORDS = {"ellipse": "oval", "diamond": "diamond-shaped", "box": "boxy", "teardrop": "teardrop-shaped"}
ELONGATION_WORDS = dict(zip(ELONGATIONS, ("short", "long", "very long"), strict=True))
TAIL_WORDS = {"fan": "a fan tail", "fork": "a forked tail", "round": "a round tail"}
HUE_WORDS = ("red", "orange", "yellow", "lime", "green", "mint", "cyan", "azure", "blue", "violet", "magenta", "pink")
PATTERN_WORDS = {"bars": "bars", "stripes": "stripes", "spots": "spots", "diagonal": "diagonal stripes"}
DENSITY_WORDS = dict(zip(DENSITIES, ("sparse", "regular", "dense"), strict=True))
ACCENT_WORDS = dict(zip(ACCENTS, ("white", "black", "yellow"), strict=True))

_SYLLABLES = (
    "ca",
    "lo",
    "mi",
    "ra",
    "ne",
    "tho",
    "pha",
    "li",
    "do",
    "ru",
    "sa",
    "ve",
    "ko",
    "ti",
    "me",
    "zo",
    "bra",
    "cte",
    "phy",
    "lu",
    "gno",
    "xi",
    "dra",
    "pte",
    "ro",
    "si",
    "chi",
    "na",
    "go",
    "le",
    "the",
    "mo",
)
_SUFFIXES = {
    Rank.KINGDOM: "alia",
    Rank.PHYLUM: "ata",
    Rank.CLASS: "opsida",
    Rank.ORDER: "iformes",
    Rank.FAMILY: "idae",
    Rank.GENUS: ("us", "a", "ops", "ichthys", "on"),
    Rank.SPECIFIC_EPITHET: ("ensis", "atus", "ii", "oides", "ica", "ulus", "aris"),
}


@dataclass(frozen=True)
class SyntheticConfig:
    """Shape of the synthetic taxonomy. `branching[k]` = (min, max) children of a rank-(k-1) taxon."""

    seed: int = 0
    branching: tuple[tuple[int, int], ...] = ((1, 1), (2, 2), (2, 2), (2, 2), (1, 2), (2, 2), (2, 2))
    max_images: int = 160
    min_images: int = 4
    resolution: int = 32

    def __post_init__(self) -> None:
        branching = tuple(tuple(int(v) for v in pair) for pair in self.branching)
        object.__setattr__(self, "branching", branching)
        if len(branching) != len(STANDARD_RANKS):
            raise InputError(
                f"branching needs one (min, max) pair per rank ({len(STANDARD_RANKS)}), got {len(branching)}"
            )
        for rank, (low, high), size in zip(STANDARD_RANKS, branching, PALETTE_SIZES, strict=True):
            if not 1 <= low <= high <= size:
                raise InputError(
                    f"branching for {rank} must satisfy 1 <= min <= max <= {size} "
                    f"(siblings need distinct traits), got ({low}, {high})"
                )
        if not 1 <= self.min_images <= self.max_images:
            raise InputError(f"need 1 <= min_images <= max_images, got {self.min_images}, {self.max_images}")
        if self.resolution < 8:
            raise InputError(f"resolution must be at least 8 px, got {self.resolution}")


@dataclass(frozen=True)
class Traits:
    """The visible traits of one species (one field group per rank)."""

    background_value: float
    background_hue: float
    shape: str
    elongation: float
    tail: str
    body_hue: float
    pattern: str
    density: int
    accent: tuple[float, float, float]


@dataclass(frozen=True)
class SyntheticSpecies:
    index: int
    lineage: Lineage
    traits: Traits
    n_images: int
    trait_index: tuple[int, ...] = field(repr=False)  # palette index per rank

    @property
    def folder(self) -> str:
        return f"{self.index:03d}_{self.lineage.names[-2]}_{self.lineage.names[-1]}"


class SyntheticTaxonomy:
    """A seeded tree over the 7 standard ranks whose species can be drawn as images."""

    ranks = STANDARD_RANKS

    def __init__(self, config: SyntheticConfig | None = None):
        self.config = config or SyntheticConfig()
        rng = np.random.default_rng([self.config.seed, 0])
        used_names: set[str] = set()
        paths: list[tuple[tuple[str, ...], tuple[int, ...]]] = [((), ())]
        for level, rank in enumerate(STANDARD_RANKS):
            low, high = self.config.branching[level]
            grown = []
            for names, traits in paths:
                n_children = int(rng.integers(low, high + 1))
                choices = rng.choice(PALETTE_SIZES[level], size=n_children, replace=False)
                for choice in sorted(int(c) for c in choices):
                    name = _new_name(rank, rng, used_names)
                    grown.append(((*names, name), (*traits, choice)))
            paths = grown
        counts = _long_tail(len(paths), self.config.max_images, self.config.min_images, rng)
        self.species = [
            SyntheticSpecies(i, Lineage(STANDARD_RANKS, names), _traits(index), counts[i], index)
            for i, (names, index) in enumerate(paths)
        ]
        self._by_names = {s.lineage.names: s for s in self.species}
        self.taxonomy = Taxonomy.from_lineages(
            (s.lineage for s in self.species for _ in range(s.n_images)), STANDARD_RANKS
        )

    # -- lookup ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.species)

    def species_of(self, lineage: Lineage | tuple[str, ...]) -> SyntheticSpecies:
        names = lineage.names if isinstance(lineage, Lineage) else tuple(lineage)
        try:
            return self._by_names[names]
        except KeyError:
            raise InputError(f"{' > '.join(names)} is not a species of this synthetic taxonomy") from None

    def descendants(self, path: tuple[str, ...]) -> list[SyntheticSpecies]:
        """Species under a taxon given by its path (any depth)."""
        found = [s for s in self.species if s.lineage.names[: len(path)] == tuple(path)]
        if not found:
            raise InputError(f"{' > '.join(path)} is not a taxon of this synthetic taxonomy")
        return found

    # -- images ------------------------------------------------------------------------------------

    def render(self, species: SyntheticSpecies, rng: np.random.Generator, size: int | None = None) -> np.ndarray:
        """One image (H, W, 3) uint8 of `species` with pose and colour drawn from `rng`."""
        return render(species.traits, rng, size or self.config.resolution)

    def training_image(self, species: SyntheticSpecies, i: int, size: int | None = None) -> np.ndarray:
        """The `i`-th training image of a species: the same picture for the same seed, always."""
        return self.render(species, np.random.default_rng([self.config.seed, 1, species.index, i]), size)

    def sample(
        self, path: tuple[str, ...], n: int, generator: np.random.Generator, size: int | None = None
    ) -> np.ndarray:
        """`n` fresh images (n, H, W, 3) of the taxon at `path`, species drawn uniformly under it."""
        pool = self.descendants(path)
        picks = generator.integers(0, len(pool), size=n)
        return np.stack([self.render(pool[int(p)], generator, size) for p in picks])

    # -- export ------------------------------------------------------------------------------------

    def summary(self) -> dict:
        counts = [s.n_images for s in self.species]
        return {
            "species": len(self.species),
            "images": int(sum(counts)),
            "taxa": {r.value: self.taxonomy.num_taxa(r) for r in STANDARD_RANKS},
            "images_per_species": {"max": max(counts), "median": int(np.median(counts)), "min": min(counts)},
            "rare_species_under_10_images": sum(c < 10 for c in counts),
            "resolution": self.config.resolution,
            "seed": self.config.seed,
        }

    def describe(self, folder: str | Path | None = None) -> str:
        """The summary as `data synth` prints it."""
        summary = self.summary()
        per = summary["images_per_species"]
        lines = [
            f"synthetic taxonomy (seed {summary['seed']}, {summary['resolution']} px)",
            f"  species: {summary['species']}, training images: {summary['images']}",
            "  taxa per rank: " + ", ".join(f"{r} {n}" for r, n in summary["taxa"].items()),
            f"  images per species: max {per['max']}, median {per['median']}, min {per['min']}",
            f"  rare species (< 10 images): {summary['rare_species_under_10_images']}",
        ]
        if folder:
            lines.append(f"  written to {folder} (read it with: taxadiffusion data inspect --format folder {folder})")
        return "\n".join(lines)

    def records(self, out: str | Path) -> RecordSet:
        """The records `write_folder(out)` produces, without rendering an image (for planning a run)."""
        out = Path(out)
        records = RecordSet(STANDARD_RANKS, source=str(out))
        for s in self.species:
            for i in range(s.n_images):
                records.add(
                    out / "images" / s.folder / f"{i:04d}.png", dict(zip(STANDARD_RANKS, s.lineage.names, strict=True))
                )
        return records

    def write_folder(self, out: str | Path, overwrite: bool = False, progress: bool = True) -> Path:
        """Write the training images as a folder dataset (`images/<folder>/*.png` + `taxonomy.csv`).

        A folder already holding this exact dataset is reused; any other non-empty folder is refused
        unless `overwrite` (then only files this method writes are replaced).
        """
        from PIL import Image
        from tqdm.auto import tqdm

        out = Path(out)
        marker = out / "synthetic.json"
        stamp = {"generator": "taxadiffusion.synthetic", "config": asdict(self.config)}
        if marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(stamp)):
            return out
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise OutputExists(
                f"{out} exists and is not this synthetic dataset; choose another folder or pass --overwrite"
            )
        images = out / "images"
        images.mkdir(parents=True, exist_ok=True)
        with (out / "taxonomy.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["folder", *(r.value for r in STANDARD_RANKS)])
            for s in self.species:
                writer.writerow([s.folder, *s.lineage.names])
        total = sum(s.n_images for s in self.species)
        with tqdm(total=total, desc="rendering synthetic images", unit="img", disable=not progress) as bar:
            for s in self.species:
                folder = images / s.folder
                folder.mkdir(exist_ok=True)
                for i in range(s.n_images):
                    Image.fromarray(self.training_image(s, i)).save(folder / f"{i:04d}.png")
                    bar.update()
        write_text_atomic(marker, json.dumps(stamp, indent=1) + "\n")
        return out


# -- generation helpers ------------------------------------------------------------------------------


def _new_name(rank: Rank, rng: np.random.Generator, used: set[str]) -> str:
    while True:
        stem = "".join(_SYLLABLES[int(i)] for i in rng.integers(0, len(_SYLLABLES), size=2))
        suffixes = _SUFFIXES[rank]
        suffix = suffixes if isinstance(suffixes, str) else suffixes[int(rng.integers(0, len(suffixes)))]
        name = stem.rstrip("aeiou") + suffix
        name = name.lower() if rank is Rank.SPECIFIC_EPITHET else name.capitalize()
        if name not in used:
            used.add(name)
            return name


def _long_tail(n: int, most: int, fewest: int, rng: np.random.Generator) -> list[int]:
    """Image counts falling geometrically from `most` to `fewest`, shuffled over the species."""
    ratios = np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(1)
    counts = np.round(most * (fewest / most) ** ratios).astype(int)
    return [int(c) for c in rng.permutation(counts)]


def appearance(traits: Traits) -> str:
    """The visible traits below the background in words, e.g. "a long oval fish with a forked tail, blue with
    dense spots and yellow fins": distinct traits give distinct words."""
    return (
        f"a {ELONGATION_WORDS[traits.elongation]} {SHAPE_WORDS[traits.shape]} fish with {TAIL_WORDS[traits.tail]}, "
        f"{HUE_WORDS[round(traits.body_hue * len(HUE_WORDS)) % len(HUE_WORDS)]} with "
        f"{DENSITY_WORDS[traits.density]} {PATTERN_WORDS[traits.pattern]} and {ACCENT_WORDS[traits.accent]} fins"
    )


def _traits(index: tuple[int, ...]) -> Traits:
    order, species = index[3], index[6]
    return Traits(
        background_value=BACKGROUND_VALUES[index[0]],
        background_hue=BACKGROUND_HUES[index[1]],
        shape=BODY_SHAPES[index[2]],
        elongation=ELONGATIONS[order // len(TAILS)],
        tail=TAILS[order % len(TAILS)],
        body_hue=BODY_HUES[index[4]],
        pattern=PATTERNS[index[5]],
        density=DENSITIES[species // len(ACCENTS)],
        accent=ACCENTS[species % len(ACCENTS)],
    )


# -- rendering ----------------------------------------------------------------------------------------


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v))


def render(traits: Traits, rng: np.random.Generator, size: int, supersample: int = 2) -> np.ndarray:
    """Draw one fish with `traits` (H, W, 3) uint8; pose, position, scale and colour come from `rng`.

    Coordinates are normalised to [-1, 1], so the same picture can be drawn at any resolution; the
    image is supersampled and box-filtered for anti-aliasing.
    """
    n = size * supersample
    axis = (np.arange(n) + 0.5) / n * 2.0 - 1.0
    x, y = np.meshgrid(axis, -axis)  # y up

    # Per-image variation.
    facing = 1.0 if rng.random() < 0.5 else -1.0
    angle = rng.uniform(-0.3, 0.3)
    scale = rng.uniform(0.8, 1.1)
    cx, cy = rng.uniform(-0.15, 0.15, size=2)
    brightness = rng.uniform(0.88, 1.12)
    light_angle = rng.uniform(0, 2 * math.pi)

    # Background: kingdom lightness, phylum hue, a soft light gradient.
    gradient = 0.12 * (math.cos(light_angle) * x + math.sin(light_angle) * y)
    background = _hsv(traits.background_hue, 0.35, traits.background_value)
    image = background[None, None, :] * (1.0 + gradient[..., None])

    # Body frame: head towards +u.
    cos, sin = math.cos(angle), math.sin(angle)
    dx, dy = (x - cx) / scale, (y - cy) / scale
    u = facing * (cos * dx + sin * dy)
    v = -sin * dx + cos * dy
    a = 0.52
    b = a / traits.elongation * 1.6
    un, vn = u / a, v / b

    # Body shape (class).
    if traits.shape == "ellipse":
        body = un**2 + vn**2 <= 1.0
    elif traits.shape == "diamond":
        body = np.abs(un) + np.abs(vn) * 0.8 <= 1.0
    elif traits.shape == "box":
        body = un**4 + vn**4 <= 1.0
    else:  # teardrop: fat head, thin rear
        body = un**2 + (vn / (0.55 + 0.45 * np.clip((un + 1) / 2, 0, 1))) ** 2 <= 1.0

    # Tail (order).
    t = 0.30
    behind = (-a - u) / t  # 0 at the body's rear, 1 at the tail's end
    spread = 0.85 * b + 0.08
    if traits.tail == "fan":
        tail = (behind >= -0.15) & (behind <= 1.0) & (np.abs(v) <= (behind + 0.15) * spread)
    elif traits.tail == "fork":
        tail = (behind >= -0.15) & (behind <= 1.0) & (np.abs(v) <= (behind + 0.15) * spread)
        tail &= np.abs(v) >= (behind - 0.45) * spread * 1.6
    else:
        tail = ((u + a + 0.45 * t) ** 2 + v**2 <= (0.55 * t) ** 2 + (0.3 * b) ** 2) & (u <= -a + 0.1)
    dorsal = (np.abs(un + 0.1) <= 0.35 * (1 - (vn - 1.0) / 0.8)) & (vn >= 0.75) & (vn <= 1.55)
    fins = (tail | dorsal) & ~body

    # Body colour (family) with pattern (genus) whose density is species-specific.
    body_rgb = _hsv(traits.body_hue, 0.85, 0.92)
    pattern_rgb = _hsv(traits.body_hue + 0.04, 0.9, 0.35)
    k = traits.density
    if traits.pattern == "bars":
        marked = np.sin(math.pi * k * (un + 1) / 2 * 2) > 0.35
    elif traits.pattern == "stripes":
        marked = np.sin(math.pi * k * (vn + 1) / 2 * 2) > 0.35
    elif traits.pattern == "spots":
        marked = np.cos(math.pi * k * un) * np.cos(math.pi * k * vn * 0.9) > 0.55
    else:
        marked = np.sin(math.pi * k * (un + vn) / 2 * 2) > 0.35
    eye = (un - 0.62) ** 2 + ((vn - 0.25) * b / a) ** 2 <= 0.012

    image[fins] = np.asarray(traits.accent)
    image[body] = body_rgb
    image[body & marked] = pattern_rgb
    image[body & eye] = (0.02, 0.02, 0.02)

    image = image * brightness + rng.normal(0.0, 0.02, size=image.shape)
    image = image.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
