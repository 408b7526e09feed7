"""Typed run configuration: dataclasses that validate themselves, load from YAML, take `--set` overrides,
and are saved with every checkpoint."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .data.images import CropPolicy
from .data.readers import RESOLVABLE
from .data.synthetic import SyntheticConfig
from .model import ModelConfig

FORMATS = ("synthetic", "inat21", "fishnet", "bioscan", "folder", "csv")
STRATEGIES = ("progressive", "all", "random", "flat", "full")


class ConfigError(ValueError):
    """A bad configuration value, with the key that holds it."""


@dataclass
class DataConfig:
    format: str = "synthetic"  # synthetic (the embedded default) or a reader of data/readers.py
    path: str | None = None  # metadata file or dataset folder (not for synthetic)
    root: str | None = None  # image root, when not next to the metadata
    split: str | None = None  # keep only records of this split (e.g. "train")
    resolve_taxonomy: bool = False  # folder/csv: complete missing ranks from species names (iNaturalist)
    crop: str = "random_crop"  # random_crop | squash | pad (DESIGN.md: iNat crop, BIOSCAN pad)
    num_workers: int = 0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"data.format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.format != "synthetic" and not self.path:
            raise ConfigError(f"data.path is required for data.format={self.format}")
        CropPolicy.parse(self.crop)
        if self.resolve_taxonomy and self.format not in RESOLVABLE:
            raise ConfigError(
                f"data.resolve_taxonomy works with the {' and '.join(RESOLVABLE)} formats, not {self.format}"
            )


@dataclass
class TextConfig:
    encoder: str = "minilm"  # "minilm" (offline default), "base" (the SD folder's CLIP), or a folder / hub id
    max_length: int | None = None  # tokens per text; default min(tokenizer limit, 77)
    template: str = "{rank}: {name}"  # paper: "<rank>: <name>", the species rank holding the epithet

    def __post_init__(self) -> None:
        if "{name}" not in self.template:
            raise ConfigError(f"text.template must contain {{name}}, got {self.template!r}")


@dataclass
class TrainConfig:
    strategy: str = "progressive"  # progressive | all | random | flat | full (the paper's ablations)
    steps: list[int] | int = 500  # optimizer steps per stage (a list: one per stage); one-stage strategies use the sum
    unet_stages: str = "first"  # which progressive stages train the UNet: "first" (published) or "all"
    learning_rate: float = 1e-4
    stage_learning_rates: list[float] | None = None  # per stage; overrides learning_rate
    encoder_learning_rate: float | None = None  # the taxonomy encoders' rate when the UNet trains at another
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    snr_gamma: float | None = None  # Min-SNR-gamma loss weighting (Hang et al. 2023); None: plain MSE (published)
    batch_size: int = 32  # per process
    gradient_accumulation: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16
    condition_dropout: float = 1 / 21  # per rank, at most one rank per sample (published FishNet/BIOSCAN)
    cascade_dropout: bool = False
    coarse_dropout: float = 0.0  # per sample, condition on rank 0 alone (keeps taxonomic CFG's c_0 trained)
    gradient_checkpointing: bool = False
    # Deterministic kernels (process-wide): on a GPU, a resumed run then equals an uninterrupted one bit for bit,
    # as it always does on the CPU. Slower on GPUs.
    deterministic: bool = False
    # Encode each image with the VAE once, not every step (random crops kept: train/latents.py). None: on for
    # latent models; pixel-space models have no VAE. Resolved to a bool when the config is built.
    cache_latents: bool | None = None
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"train.strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        steps = self.steps if isinstance(self.steps, list) else [self.steps]
        if not steps or any(not isinstance(s, int) or s < 0 for s in steps):
            raise ConfigError(f"train.steps must be a non-negative int or a list of them, got {self.steps!r}")
        if self.unet_stages not in ("first", "all"):
            raise ConfigError(f"train.unet_stages must be 'first' or 'all', got {self.unet_stages!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"train.mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        for name in ("batch_size", "gradient_accumulation", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"train.learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.condition_dropout < 1.0:
            raise ConfigError(f"train.condition_dropout must be in [0, 1), got {self.condition_dropout}")
        if not 0.0 <= self.coarse_dropout < 1.0:
            raise ConfigError(f"train.coarse_dropout must be in [0, 1), got {self.coarse_dropout}")


@dataclass
class SampleConfig:
    """Sampling for the per-stage grids, the final pipeline's scheduler and evaluation."""

    scheduler: str = "pndm"  # pndm (published), ddim, dpm
    steps: int = 25
    guidance: str = "taxonomic"
    scale: float = 9.0  # s = 1 + w (published 9.0)
    window: tuple[float, float] = (0.0, 1.0)
    grid_taxa: int = 4  # species shown in each stage's grid
    grid_images: int = 4  # images per row

    def __post_init__(self) -> None:
        self.window = tuple(self.window)
        if self.scheduler not in ("pndm", "ddim", "dpm"):
            raise ConfigError(f"sample.scheduler must be pndm, ddim or dpm, got {self.scheduler!r}")
        if self.guidance not in ("taxonomic", "vanilla", "none"):
            raise ConfigError(f"sample.guidance must be taxonomic, vanilla or none, got {self.guidance!r}")


# Keys that change nothing a checkpoint holds; they may differ when a run resumes.
RUNTIME_KEYS = frozenset(
    {"data.num_workers", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every"}
) | {f"sample.{f.name}" for f in dataclasses.fields(SampleConfig)}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        if self.train.cache_latents is None:
            self.train.cache_latents = self.model.is_latent
        elif self.train.cache_latents and not self.model.is_latent:
            raise ConfigError("train.cache_latents needs a latent model (a Stable Diffusion base in model.base)")

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict) -> Config:
        return _build(cls, data or {}, "")

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
        """A YAML preset with `key.sub=value` overrides applied (values parsed as YAML)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config not found: {path}")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return cls.from_dict(apply_overrides(data, overrides))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")

    # -- identity -----------------------------------------------------------------------------------

    def flat(self) -> dict[str, object]:
        return _flatten(self.to_dict())

    def fingerprint(self) -> str:
        """A hash of everything that shapes the trained weights (not logging, checkpointing or sampling)."""
        kept = {k: v for k, v in self.flat().items() if k not in RUNTIME_KEYS}
        return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, other: Config) -> list[str]:
        mine, theirs = self.flat(), other.flat()
        return [
            f"{k}: {theirs.get(k)!r} -> {mine.get(k)!r}"
            for k in sorted(set(mine) | set(theirs))
            if k not in RUNTIME_KEYS and mine.get(k) != theirs.get(k)
        ]


def apply_overrides(data: dict, overrides) -> dict:
    """Apply `a.b.c=value` strings to a nested dict (a copy)."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.learning_rate=2e-4)")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def _flatten(data: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _build(cls, data: dict, prefix: str):
    """Build a dataclass from a dict, refusing unknown keys and values of the wrong kind."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            value = _build(hint, value, f"{prefix}{key}.")
        else:
            value = _check_scalar(f"{prefix}{key}", hint, value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {error}") from None


def _check_scalar(key: str, hint, value):
    simple = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None and type(None) in typing.get_args(hint):
        return None
    if len(args) == 1 and args[0] in simple:  # Optional[scalar]
        hint = args[0]
    if hint in simple:
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if hint is float and isinstance(value, str):  # YAML 1.1 reads `2e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"{key} must be {simple[hint]}, got {value!r}")
    if typing.get_origin(hint) is tuple and isinstance(value, list):
        return tuple(value)
    return value
