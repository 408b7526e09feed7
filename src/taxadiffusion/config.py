"""Typed run configuration: dataclasses that validate themselves, load from YAML, take `--set` overrides,
and are saved with every checkpoint."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .atomic import write_text_atomic
from .checks import check_choice, check_integer, check_range
from .choices import Choice
from .data.images import CropPolicy
from .data.readers import READERS, RESOLVABLE
from .data.synthetic import SyntheticConfig
from .errors import ConfigError, InputError, MissingInput, UnreadableFile
from .model import ModelConfig
from .sampling import SamplingSettings
from .taxonomy import STANDARD_RANKS, Rank
from .text import SpeciesText

FORMATS = ("synthetic", *READERS)  # the embedded default, then every reader
DataFormat = Choice("DataFormat", {name.upper(): name for name in FORMATS})


class Strategy(Choice):
    PROGRESSIVE = "progressive"  # published: one rank per stage, coarse to fine
    ALL = "all"  # every rank in every step (ablation)
    RANDOM = "random"  # a random depth per sample (ablation)
    FLAT = "flat"  # one text per species (the paper's SD + LoRA)
    FULL = "full"  # one text per species, the whole UNet trained (SD + full fine-tuning)
    PRIOR = "prior"  # `taxadiffusion pretrain`


STRATEGIES = tuple(s.value for s in Strategy)


class UnetStages(Choice):
    FIRST = "first"  # published: the UNet (LoRA) trains in stage 0 only
    ALL = "all"


class MixedPrecision(Choice):
    NO = "no"  # published: fp32
    FP16 = "fp16"
    BF16 = "bf16"


class TextFeatures(Choice):
    AUTO = "auto"  # on the device, unless they would take over an eighth of a GPU's memory: then CPU memory
    DEVICE = "device"
    CPU = "cpu"


class StorageDtype(Choice):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


_VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def expand_variables(key: str, value: str | None) -> str | None:
    """`${NAME}` and `$NAME` in a path replaced by the environment's value, so that a shared config can say
    `${TAXADIFFUSION_DATA}/fish4knowledge` and each machine keeps its data where it likes."""
    if not value or "$" not in value:
        return value
    unset = [name for name in _VARIABLE.findall(value) if name not in os.environ]
    if unset:
        raise ConfigError(f"{key} is {value!r}, but {', '.join(unset)} is not set: export {unset[0]}=FOLDER first")
    return os.path.expandvars(value)


@dataclass
class DataConfig:
    format: str = "synthetic"  # synthetic (the embedded default) or a reader of data/readers.py
    path: str | None = None  # metadata file or dataset folder (not for synthetic)
    root: str | None = None  # image root, when not next to the metadata
    split: str | None = None  # keep only records of this split (e.g. "train")
    resolve_taxonomy: bool = False  # folder/csv: complete missing ranks from species names (iNaturalist)
    crop: str = "random_crop"  # random_crop | squash | pad | fishnet (published: iNat, FishNet, BIOSCAN)
    boxes: str | None = None  # fishnet: the bounding-box JSON {image id: {x, y, w, h}}; images crop to their box
    random_flip: bool = False  # horizontal flips with p = 0.5 (not in the published recipe; priors use it)
    # A prior's corpus entry: this dataset's own captions (default: the prior's `caption`), e.g. other species
    # named by their binomial beside the evaluated ones named down to the order.
    caption: CaptionConfig | None = None
    # Leave out a fixed, stratified fraction of each species (split_records with holdout_seed): the part a
    # benchmark evaluates on, so that a prior or a run trained on this config never sees it.
    holdout: float | None = None
    holdout_seed: int = 0
    num_workers: int = 0
    # Every training image is decoded once before step 1; unusable ones stop the run with their names listed,
    # or, with this on, are left out and counted (the plan lists them).
    skip_bad_images: bool = False
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        for key in ("path", "root", "boxes"):
            setattr(self, key, expand_variables(f"data.{key}", getattr(self, key)))
        check_choice("data.format", self.format, DataFormat)
        if self.format != "synthetic" and not self.path:
            raise ConfigError(f"data.path is required for data.format={self.format}")
        check_choice("data.crop", self.crop, CropPolicy)
        check_range("data.num_workers", self.num_workers, 0)
        check_range("data.holdout", self.holdout, 0.0, 1.0, optional=True, open_low=True, open_high=True)
        if self.boxes and self.format != "fishnet":
            raise ConfigError(
                f"data.boxes is FishNet's bounding-box JSON: it needs data.format: fishnet, not {self.format}"
            )
        if self.resolve_taxonomy and self.format not in RESOLVABLE:
            raise ConfigError(
                f"data.resolve_taxonomy works with the {' and '.join(RESOLVABLE)} formats, not {self.format}"
            )


@dataclass
class TextConfig:
    encoder: str = "minilm"  # "minilm" (offline default), "base" (the SD folder's CLIP), or a folder / hub id
    max_length: int | None = None  # tokens per text; default min(tokenizer limit, 77), on a prior its own (or fewer)
    template: str = "{rank}: {name}"  # paper: "<rank>: <name>"
    # The species rank's name: "epithet" ("specific_epithet: reticulatus", iNat21's published loader) or
    # "binomial" ("specific_epithet: Dascyllus reticulatus", the published FishNet and BIOSCAN loaders, which
    # put the dataset's `species` column there).
    species: str = "epithet"

    def __post_init__(self) -> None:
        if "{name}" not in self.template:
            raise ConfigError(f"text.template must contain {{name}}, got {self.template!r}")
        check_range("text.max_length", self.max_length, 1, 4096, optional=True)
        check_choice("text.species", self.species, SpeciesText)


APPEARANCE = "appearance"  # the caption placeholder of the synthetic taxonomy's traits in words


@dataclass
class CaptionConfig:
    """A prior's captions (`taxadiffusion pretrain`): a template over ranks no finer than `rank`, so that the prior
    learns the domain and its coarse groups but no family, genus or species name, as Stable Diffusion knows "a
    songbird" but not a rare warbler. Placeholders are rank names, e.g. "a photo of {class}, {order}", and for
    the synthetic taxonomy `{appearance}`: its traits in words ("a long oval fish with a forked tail, blue with
    dense spots and yellow fins"), as web captions describe a photo without naming the species."""

    rank: str = "order"
    template: str = "a photo of {class}, {order}"

    def __post_init__(self) -> None:
        import string

        try:
            finest = Rank.parse(self.rank)
            fields = [f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None]
        except (InputError, ValueError) as error:
            raise ConfigError(f"caption: {error}") from None
        if not [f for f in fields if f != APPEARANCE]:
            raise ConfigError(f"caption.template must name at least one rank, e.g. {{order}}; got {self.template!r}")
        self._ranks = []
        for name in fields:
            if name == APPEARANCE:
                continue
            try:
                rank = Rank.parse(name)
            except InputError:
                raise ConfigError(f"caption.template: {{{name}}} is not a rank") from None
            if STANDARD_RANKS.index(rank) > STANDARD_RANKS.index(finest):
                raise ConfigError(f"caption.template names {rank}, finer than caption.rank ({finest})")
            self._ranks.append(rank)

    @property
    def ranks(self) -> list[Rank]:
        """The ranks the template names, in its order (parsed once, when the config is built)."""
        return self._ranks

    @property
    def describes(self) -> bool:
        """Whether the template describes each image's look (`{appearance}`, synthetic data only)."""
        return f"{{{APPEARANCE}}}" in self.template

    def caption(self, lineage, appearance: str | None = None) -> str | None:
        """The caption of a lineage (and its look, where the template describes it), or None where it is not
        labelled down to every rank the template names."""
        names = {rank.value: lineage.name(rank) if rank in lineage.ranks else None for rank in self.ranks}
        if any(not name for name in names.values()):
            return None
        return self.template.format(**names, **({APPEARANCE: appearance} if self.describes else {}))


@dataclass
class TrainConfig:
    strategy: str = "progressive"  # progressive | all | random | flat | full (the paper's ablations)
    steps: list[int] | int = 500  # optimizer steps per stage (a list: one per stage); one-stage strategies use the sum
    # Training length in epochs per stage (a number or a list) instead of steps: each stage runs
    # ceil(epochs x training images / images per step) steps, images per step being batch_size x processes x
    # gradient_accumulation. Published: 20 per stage (`max_train_epoch: 20`, 16 GPUs x 32 per step).
    epochs: list[float] | float | None = None
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
    # Exponential moving average of the weights a stage trains (diffusers' EMAModel), e.g. 0.999; None: off
    # (published). At each stage's end the averaged weights replace the trained ones, so the saved pipeline and
    # every later stage use them.
    ema_decay: float | None = None
    gradient_checkpointing: bool = False
    # Under mixed precision, weights that never train (a LoRA run's UNet base, the VAE) are kept in that precision
    # instead of being autocast from fp32 every step, as diffusers' LoRA scripts do with `weight_dtype`; what
    # trains stays fp32, and the saved pipeline re-reads the base's own weights.
    frozen_in_low_precision: bool = True
    compile: bool = False  # torch.compile the UNet (in place: state-dict keys unchanged)
    channels_last: bool = False  # the UNet's weights and inputs in channels-last memory layout
    # AdamW's fused kernel where torch has one (CUDA, CPU, MPS): the same steps to rounding, 3-4x faster
    # (benchmarks/results/speed.md); the default kernel elsewhere or when false.
    fused_optimizer: bool = True
    # The text-feature tables (and the frozen ranks' tables): kept on the training device or in CPU memory (each
    # batch's rows copied over), stored in fp32, fp16 or bf16 (the model computes in fp32 either way). iNat21
    # with CLIP holds 3.6 GiB of text features per process. `auto` keeps them on the device unless they would take
    # over an eighth of a GPU's memory (the plan says where they went).
    text_features: str = "auto"  # auto | device | cpu
    text_features_dtype: str = "fp32"  # fp32 | fp16 | bf16
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
    # Seconds a process waits for the others at a barrier. The main process builds the image screen and the
    # caches first while the others wait; PyTorch's default (gloo 30 min, NCCL 10 min) aborts a first launch at
    # iNat21's scale. Generous on purpose: a true hang is rare, a long first preparation is not.
    process_group_timeout: int = 6 * 3600

    def __post_init__(self) -> None:
        check_choice("train.strategy", self.strategy, Strategy)
        steps = self.steps if isinstance(self.steps, list) else [self.steps]
        if not steps or any(not isinstance(s, int) or s < 0 for s in steps):
            raise ConfigError(f"train.steps must be a non-negative int or a list of them, got {self.steps!r}")
        if self.epochs is not None:
            epochs = self.epochs if isinstance(self.epochs, list) else [self.epochs]
            if not epochs:
                raise ConfigError("train.epochs must be a number or a non-empty list of them")
            for i, value in enumerate(epochs):
                check_range(f"train.epochs[{i}]" if isinstance(self.epochs, list) else "train.epochs", value, 0)
        check_choice("train.unet_stages", self.unet_stages, UnetStages)
        check_choice("train.mixed_precision", self.mixed_precision, MixedPrecision)
        for name in ("batch_size", "gradient_accumulation", "checkpoint_every", "keep_checkpoints", "log_every"):
            check_integer(f"train.{name}", getattr(self, name), 1)
        check_choice("train.text_features", self.text_features, TextFeatures)
        check_choice("train.text_features_dtype", self.text_features_dtype, StorageDtype)
        check_range("train.learning_rate", self.learning_rate, 0, open_low=True)
        for i, rate in enumerate(self.stage_learning_rates or []):
            check_range(f"train.stage_learning_rates[{i}]", rate, 0, open_low=True)
        check_range("train.encoder_learning_rate", self.encoder_learning_rate, 0, open_low=True, optional=True)
        check_range("train.adam_beta1", self.adam_beta1, 0, 1, open_high=True)
        check_range("train.adam_beta2", self.adam_beta2, 0, 1, open_high=True)
        check_range("train.weight_decay", self.weight_decay, 0)
        check_range("train.max_grad_norm", self.max_grad_norm, 0, open_low=True)
        check_range("train.snr_gamma", self.snr_gamma, 0, open_low=True, optional=True)
        check_range("train.seed", self.seed, 0)
        check_integer("train.process_group_timeout", self.process_group_timeout, 1)
        check_range("train.ema_decay", self.ema_decay, 0, 1, open_low=True, open_high=True, optional=True)
        check_range("train.condition_dropout", self.condition_dropout, 0, 1, open_high=True)
        check_range("train.coarse_dropout", self.coarse_dropout, 0, 1, open_high=True)


@dataclass
class SampleConfig(SamplingSettings):
    """Sampling for the per-stage grids, and the settings the final pipeline is saved with."""

    key_prefix = "sample."

    grid_taxa: int = 4  # species shown in each stage's grid
    grid_images: int = 4  # images per row

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("grid_taxa", "grid_images"):
            check_range(f"sample.{name}", getattr(self, name), 1)


# Keys that change nothing a checkpoint holds; they may differ when a run resumes.
RUNTIME_KEYS = frozenset(
    {
        "data.num_workers",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.log_every",
        # how the same computation runs, not what it computes: a run may resume on another machine with them
        "train.compile",
        "train.channels_last",
        "train.fused_optimizer",
        "train.text_features",
        "train.process_group_timeout",
    }
) | {f"sample.{f.name}" for f in dataclasses.fields(SampleConfig)}

# How long a run trains. A run resumes with them changed (nanoGPT's max_iters: stop a prior early, or extend
# it, finished or not) as long as no stage that a later stage trained on changes length; the trainer checks
# that against the checkpoint.
LENGTH_KEYS = frozenset({"train.steps", "train.epochs"})
NOT_IDENTITY = RUNTIME_KEYS | LENGTH_KEYS  # what neither the fingerprint nor a config's differences count


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)  # a prior's captions (strategy prior)
    corpus: list[DataConfig] = field(default_factory=list)  # a prior's datasets besides `data` (strategy prior)

    def __post_init__(self) -> None:
        has_vae = self.model.codec == "vae"
        if self.train.cache_latents is None:
            self.train.cache_latents = has_vae
        elif self.train.cache_latents and not has_vae:
            raise ConfigError("train.cache_latents needs a latent model (a Stable Diffusion base in model.base)")
        if self.train.cache_latents and self.data.crop == "fishnet":
            raise ConfigError(
                "data.crop: fishnet draws a crop or a squash per sample, which the latent cache cannot hold: "
                "set train.cache_latents: false"
            )
        if self.train.cache_latents and self.data.random_flip:
            raise ConfigError("data.random_flip needs the images decoded at every step: set train.cache_latents: false")
        if self.train.strategy == "prior" and "{rank}" in self.text.template:
            raise ConfigError('a prior reads its captions whole: set text.template: "{name}"')
        if self.data.caption is not None:
            raise ConfigError("data.caption: the main dataset's captions are `caption`; give corpus entries their own")
        if self.corpus and self.train.strategy != "prior":
            raise ConfigError("corpus lists a prior's datasets: it needs train.strategy: prior (pretrain)")
        for i, data in enumerate(self.corpus):  # one dataset of images: data's preparation applies to all
            for key in ("crop", "random_flip"):
                if getattr(data, key) != getattr(self.data, key):
                    raise ConfigError(
                        f"corpus[{i}].{key} is {getattr(data, key)!r} but data.{key} is {getattr(self.data, key)!r}: "
                        "a prior prepares every corpus image as data does, so set them alike"
                    )

    @property
    def frozen_precision(self) -> str | None:
        """The precision the never-trained weights are kept in ("bf16", "fp16"; None: fp32 as loaded): under
        mixed precision, for a LoRA run on a pretrained base, whose UNet base and VAE never train."""
        train, model = self.train, self.model
        if train.mixed_precision == "no" or not train.frozen_in_low_precision or not model.is_latent:
            return None
        if model.finetune != "lora" or train.strategy in ("full", "prior"):
            return None
        return train.mixed_precision

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict) -> Config:
        return _build(cls, data or {}, "")

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
        """A YAML preset with `key.sub=value` overrides applied (values parsed as YAML)."""
        path = Path(path)
        if not path.is_file():
            raise MissingInput(f"config not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise UnreadableFile(path, "not UTF-8 text", "a config is a YAML file") from None
        except yaml.YAMLError as error:
            where = getattr(error, "problem_mark", None)
            line = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            problem = getattr(error, "problem", None) or "not valid YAML"
            raise UnreadableFile(path, f"not valid YAML{line} ({problem})", "fix the file's syntax") from None
        try:
            return cls.from_dict(apply_overrides(data, overrides))
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def save(self, path: str | Path) -> None:
        write_text_atomic(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))

    # -- identity -----------------------------------------------------------------------------------

    def flat(self) -> dict[str, object]:
        return _flatten(self.to_dict())

    def fingerprint(self) -> str:
        """A hash of everything that shapes the trained weights (not logging, checkpointing or sampling, nor
        how long the stages run: see LENGTH_KEYS)."""
        kept = {k: v for k, v in self.flat().items() if k not in NOT_IDENTITY}
        return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, other: Config) -> list[str]:
        mine, theirs = self.flat(), other.flat()
        return [
            f"{k}: {theirs.get(k)!r} -> {mine.get(k)!r}"
            for k in sorted(set(mine) | set(theirs))
            if k not in NOT_IDENTITY and mine.get(k) != theirs.get(k)
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
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML") from None
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
        hint = _optional_dataclass(hints[key]) if value is not None else hints[key]
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
        if dataclasses.is_dataclass(hint):
            value = _build(hint, value, f"{prefix}{key}.")
        elif item is not None and dataclasses.is_dataclass(item):
            if not isinstance(value, list):
                raise ConfigError(f"{prefix}{key} must be a list, got {value!r}")
            value = [_build(item, entry, f"{prefix}{key}[{i}].") for i, entry in enumerate(value)]
        else:
            value = _check_scalar(f"{prefix}{key}", hint, value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {error}") from None


def _optional_dataclass(hint):
    """`SomeConfig | None` -> SomeConfig (a value was given); any other hint as it is."""
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if type(None) in typing.get_args(hint) and len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return args[0]
    return hint


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
