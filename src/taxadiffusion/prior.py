"""A prior made by `taxadiffusion pretrain`: a base folder that `model.base` loads where it loads Stable
Diffusion (`unet/`, `scheduler/`, `vae/` holding the codec) plus `prior.json`, which names the text encoder
it was trained with, its resolution, codec and captions.

TaxaDiffusion adapts a pretrained text-to-image model: after stage 0 the UNet is frozen and the rank encoders
steer it, which works only when its cross-attention already answers many texts of the domain (as Stable
Diffusion's does); docs/fidelity.md, "Why a prior". The UNet reads
the text encoder's features through its own projection (diffusers' `encoder_hid_dim`, as SD's UNet reads
CLIP's), so the rank encoders of the adaptation output text-width features, as published.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .atomic import atomic_folder, temporary
from .errors import InputError, UnreadableFile
from .saved_files import save_safetensors, share_safetensors

PRIOR_FILE = "prior.json"
UNPACKED_FILE = "unpacked_from.json"  # the packed file a base folder was unpacked from
FORMAT = "taxadiffusion.prior"


@dataclass
class PriorInfo:
    text_encoder: str  # what `text.encoder` named when it was trained (e.g. "minilm", a folder, a hub id)
    max_length: int | None
    resolution: int
    codec: str  # patches | vae
    caption_rank: str
    caption_template: str
    captions: dict[str, int] = field(default_factory=dict)  # caption -> training images

    def save(self, folder: str | Path) -> None:
        data = {"format": FORMAT, **asdict(self)}
        (Path(folder) / PRIOR_FILE).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")

    def check_fits(self, config) -> None:
        """A config adapting this prior must use its text encoder and resolution (the UNet's cross-attention
        learned this encoder's features at this size)."""
        base = config.model.base
        if config.text.encoder not in ("base", self.text_encoder):
            raise InputError(
                f"model.base {base} is a prior trained with text encoder {self.text_encoder!r}, but text.encoder is "
                f"{config.text.encoder!r}; set text.encoder: base (or {self.text_encoder})"
            )
        if config.model.resolution != self.resolution:
            raise InputError(
                f"model.base {base} is a prior trained at {self.resolution} px, but model.resolution is "
                f"{config.model.resolution}; set model.resolution: {self.resolution}"
            )
        # Fewer tokens are allowed: cross-attention reads any number of them, and the padding the rank texts
        # would carry up to the prior's caption length costs the rank encoders time in proportion. More are allowed
        # only to a prior pretrained further (`strategy: prior`): its whole UNet trains on the longer captions.
        longer = None not in (config.text.max_length, self.max_length) and config.text.max_length > self.max_length
        if longer and config.train.strategy != "prior":
            raise InputError(
                f"model.base {base} is a prior trained with text.max_length {self.max_length}, not "
                f"{config.text.max_length}; set text.max_length to at most {self.max_length} (or leave it unset)"
            )


def read_prior(base: str | Path) -> PriorInfo | None:
    """The prior's description, or None for a base that is not a prior (Stable Diffusion)."""
    path = Path(base) / PRIOR_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UnreadableFile(path, f"not valid JSON ({error})", "pretrain the prior again") from None
    if data.pop("format", None) != FORMAT:
        raise UnreadableFile(path, f"not a prior description (no format {FORMAT!r})", "pretrain the prior again")
    try:
        return PriorInfo(**data)
    except TypeError as error:
        raise UnreadableFile(path, f"unexpected fields ({error})", "pretrain the prior again") from None


BASE_PARTS = ("unet", "scheduler", "vae", PRIOR_FILE)  # what a base folder holds


def save_base_folder(folder: Path, unet, noise_scheduler, codec, info: PriorInfo) -> Path:
    """Write a prior's parts into `folder` (the run's own folder, so that `model.base` names the run): each is
    written aside, then renamed into place."""
    import shutil

    tmp = temporary(folder / "base")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed save; the run's own
    unet.save_pretrained(tmp / "unet")
    noise_scheduler.save_pretrained(tmp / "scheduler")
    if codec is not None:
        codec.save_pretrained(tmp / "vae")
    info.save(tmp)
    share_safetensors(tmp)
    for part in BASE_PARTS:
        target = folder / part
        if target.is_dir():
            shutil.rmtree(target)
        if (tmp / part).exists():
            (tmp / part).replace(target)
    tmp.rmdir()
    return folder


# -- a prior shipped in the package: one safetensors file ----------------------------------------------------

PACKAGED = "packaged:"  # `model.base: packaged:demo` names src/taxadiffusion/priors/demo.safetensors
PACKED_FILES = {  # metadata key -> the file of the base folder it holds
    "unet_config": "unet/config.json",
    "scheduler_config": "scheduler/scheduler_config.json",
    "codec_config": "vae/config.json",
    "prior": PRIOR_FILE,
}


PACK_SUFFIX = ".safetensors"


def packaged_file(name: str) -> Path:
    return Path(__file__).parent / "priors" / f"{name}{PACK_SUFFIX}"


PACK_PRECISIONS = ("fp32", "fp16")


def prior_recipe(config_file: str | Path, overrides: list[str]) -> str:
    """What made a prior, as a person reruns it: its config file as written, then each command-line `--set`
    after it as a comment (a prior pretrained with `--set train.steps=2500` must not claim the file's steps)."""
    text = Path(config_file).read_text(encoding="utf-8")
    if overrides and not text.endswith("\n"):
        text += "\n"
    return text + "".join(f"# pretrained with --set {item}\n" for item in overrides)


def pack_prior(base: str | Path, out: str | Path, recipe: str, precision: str = "fp32") -> Path:
    """A base folder as one safetensors file: the UNet's weights, with every config (and `recipe`, the config
    that pretrained it) as metadata. The codec has no weights of its own (a patch codec). `precision` fp16
    stores the weights at half the size, as Stable Diffusion's fp16 variant does (a prior is adapted from
    the rounded weights, upcast on unpacking)."""
    import torch
    from safetensors.torch import load_file

    if precision not in PACK_PRECISIONS:
        raise InputError(f"pack precision {precision!r}: one of {', '.join(PACK_PRECISIONS)}")
    base = Path(base)
    metadata = {key: (base / file).read_text(encoding="utf-8") for key, file in PACKED_FILES.items()}
    metadata["recipe"] = recipe
    weights = load_file(base / "unet" / "diffusion_pytorch_model.safetensors")
    if precision == "fp16":
        weights = {key: w.to(torch.float16) if w.is_floating_point() else w for key, w in weights.items()}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(weights, out, metadata=metadata)
    return Path(out)


def _read_packed(file: str | Path) -> tuple[dict, dict]:
    """A packed prior's metadata and UNet weights, upcast to the fp32 a base folder's UNet holds (an fp16 pack
    included, whatever precision the adaptation then runs at)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata()
        weights = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open has no iteration)
    return metadata, {key: value.float() if value.is_floating_point() else value for key, value in weights.items()}


def _unpacked_from(file: Path, folder: Path, digest: str) -> bool:
    """Whether the complete base folder `folder` holds the prior packed in `file`. A folder unpacked before the
    record existed is compared weight by weight once, and recorded when it matches."""
    import torch
    from safetensors.torch import load_file

    record = folder / UNPACKED_FILE
    if record.is_file():
        return json.loads(record.read_text(encoding="utf-8")).get("sha256") == digest
    _, packed = _read_packed(file)
    unpacked = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    same = packed.keys() == unpacked.keys() and all(torch.equal(packed[k], unpacked[k]) for k in packed)
    if same:
        _record_unpacked(folder, file, digest)
    return same


def _record_unpacked(folder: Path, file: Path, digest: str) -> None:
    (folder / UNPACKED_FILE).write_text(json.dumps({"file": file.name, "sha256": digest}) + "\n", encoding="utf-8")


def unpack_prior(file: str | Path, folder: str | Path) -> Path:
    """Write the base folder a packed prior holds, once: a complete folder unpacked from the same file (by its
    SHA-256) is reused, and one unpacked from another file is refused, since what was adapted from it would
    otherwise be paired with other weights without a word."""
    import hashlib

    from safetensors.torch import save_file

    from .codec import SpaceToDepth

    file, folder = Path(file), Path(folder)
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    if (folder / PRIOR_FILE).is_file():
        if not _unpacked_from(file, folder, digest):
            raise InputError(
                f"{folder} holds a prior unpacked from another file than {file}; remove that folder (and whatever "
                "was adapted from it) or unpack into another one"
            )
        return folder
    if folder.exists() and any(folder.iterdir()):  # not a prior's folder (unpacking renames a complete one in)
        raise InputError(f"{folder} is not empty and holds no prior: unpack {file.name} into another folder")
    metadata, weights = _read_packed(file)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(folder) as tmp:  # `folder` is absent or empty (checked above)
        for key, relative in PACKED_FILES.items():
            (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
            (tmp / relative).write_text(metadata[key], encoding="utf-8")
        save_file(weights, str(tmp / "unet" / "diffusion_pytorch_model.safetensors"))
        codec = json.loads(metadata["codec_config"])
        SpaceToDepth(codec["factor"], codec["channels"], codec["scaling_factor"]).save_pretrained(tmp / "vae")
        _record_unpacked(tmp, file, digest)
        share_safetensors(tmp)
    return folder


def resolve_base(base: str) -> str:
    """A base as a local folder or hub id. A packed prior, `packaged:NAME` or the path of a file that `pretrain
    --pack` wrote (`model.base: benchmarks/priors/birds_fish.safetensors`), is unpacked into the user's cache
    first, once: a file is adapted or pretrained further from where it lies, as a Stable Diffusion folder is."""
    import hashlib
    import os

    if base.startswith(PACKAGED):
        name = base.removeprefix(PACKAGED)
        file = packaged_file(name)
        if not file.is_file():
            shipped = sorted(p.stem for p in file.parent.glob(f"*{PACK_SUFFIX}"))
            raise InputError(f"no packaged prior {name!r}; the package ships: {', '.join(shipped) or 'none'}")
    elif base.endswith(PACK_SUFFIX):
        file = Path(base).expanduser()
        name = file.stem
        if not file.is_file():
            raise InputError(f"model.base {base}: no such file (a prior packed by `taxadiffusion pretrain --pack`)")
        if not _is_packed_prior(file):
            raise InputError(
                f"model.base {base} is a safetensors file but not a packed prior (it lacks the metadata "
                f"{', '.join(PACKED_FILES)} that `taxadiffusion pretrain --pack` writes); give a base folder instead"
            )
    else:
        return base
    digest = hashlib.sha256(file.read_bytes()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "taxadiffusion" / "priors"
    folder = cache / f"{name}-{digest}"  # named by the file's digest: a complete one is this file's, unhashed again
    return str(folder if (folder / PRIOR_FILE).is_file() else unpack_prior(file, folder))


def _is_packed_prior(file: Path) -> bool:
    """Whether a safetensors file holds a packed prior's metadata (read from its header, not its weights)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError):
        return False
    return all(key in metadata for key in PACKED_FILES)
