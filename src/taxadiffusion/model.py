"""Building the denoiser: a Stable Diffusion UNet (latent space) or a tiny pixel-space UNet, plus LoRA.

The noise schedule for training is the base model's own scheduler config (SD 1.5: `scaled_linear`);
the published code trained with `linear` betas while sampling with `scaled_linear`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn

from .checks import check_choice, check_integer, check_range
from .choices import Choice
from .codec import SpaceToDepth, base_codec
from .conditioning import TaxonomyEncoder
from .errors import ConfigError, InputError, MissingInput

TINY = "tiny"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class PredictionType(Choice):
    EPSILON = "epsilon"  # as SD 1.5
    V_PREDICTION = "v_prediction"
    SAMPLE = "sample"


class Finetune(Choice):
    LORA = "lora"  # published: LoRA on the frozen base
    FULL = "full"  # the SD + full fine-tuning baseline


@dataclass
class TinyUNetConfig:
    """A small pixel-space UNet for CPU runs; cross-attention only at the coarser levels.

    `patch_size` p > 1 folds p x p pixel blocks into channels (a lossless space-to-depth codec), so a
    32 px model runs at 16 x 16: about 3x faster on CPU for the same width.
    """

    patch_size: int = 1
    block_out_channels: tuple[int, ...] = (64, 128, 128)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    attention_head_dim: int = 8
    cross_attention_dim: int = 128
    norm_num_groups: int = 32
    beta_schedule: str = "squaredcos_cap_v2"
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"  # epsilon (as SD 1.5), v_prediction or sample
    # Read text features of the text encoder's own width through a projection inside the UNet (diffusers'
    # `encoder_hid_dim`), as SD's UNet reads CLIP's: a prior built so is steered by text-width features.
    text_projection: bool = False

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        self.down_block_types = tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)
        key = "model.tiny."
        check_choice(f"{key}prediction_type", self.prediction_type, PredictionType)
        for name in ("patch_size", "layers_per_block", "attention_head_dim", "cross_attention_dim", "norm_num_groups"):
            check_integer(f"{key}{name}", getattr(self, name), 1)
        check_integer(f"{key}num_train_timesteps", self.num_train_timesteps, 2)
        if not self.block_out_channels:
            raise ConfigError(f"{key}block_out_channels needs at least one level")
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(f"{key}block_out_channels, down_block_types and up_block_types need equal lengths")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ConfigError(f"{key}block_out_channels: every width must be divisible by {key}norm_num_groups")


@dataclass
class ModelConfig:
    """What to build. `base` is "tiny" (pixel space, no VAE) or a Stable Diffusion folder / hub id."""

    base: str = TINY
    resolution: int = 32
    finetune: str = "lora"  # "lora" (published) or "full" (the SD + full fine-tuning baseline)
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    encoder_layers: int = 2
    encoder_heads: int = 8
    # The rank encoders' feed-forward width. Published: `nn.TransformerEncoderLayer(d_model=768, nhead=8)`, so
    # PyTorch's default 2048 (55.1 M parameters for 5 ranks at CLIP's 768). The tiny presets set 4 x MiniLM's
    # 384 = 1536, the width they were measured with.
    encoder_feedforward: int = 2048
    encoder_dropout: float = 0.1
    tiny: TinyUNetConfig = field(default_factory=TinyUNetConfig)

    def __post_init__(self) -> None:
        if isinstance(self.tiny, dict):
            self.tiny = TinyUNetConfig(**self.tiny)
        self.lora_targets = tuple(self.lora_targets)
        check_choice("model.finetune", self.finetune, Finetune)
        check_integer("model.lora_rank", self.lora_rank, 1)
        check_integer("model.resolution", self.resolution, 8)
        if self.resolution % 8:
            raise ConfigError(f"model.resolution must be a positive multiple of 8, got {self.resolution}")
        check_range("model.lora_alpha", self.lora_alpha, 0, open_low=True)
        for name in ("encoder_feedforward", "encoder_layers", "encoder_heads"):
            check_integer(f"model.{name}", getattr(self, name), 1)
        check_range("model.encoder_dropout", self.encoder_dropout, 0, 1, open_high=True)
        if not self.is_latent:
            factor = self.tiny.patch_size * 2 ** (len(self.tiny.block_out_channels) - 1)
            if self.resolution % factor:
                raise ConfigError(
                    f"model.resolution {self.resolution} must be a multiple of {factor} for this tiny UNet "
                    f"(model.tiny.patch_size x 2^(levels - 1))"
                )

    @property
    def is_latent(self) -> bool:
        """A base model from a folder or hub id (Stable Diffusion, or a prior made by `pretrain`)."""
        return self.base != TINY

    @property
    def base_path(self) -> str:
        """`base` as a local folder or hub id. A packed prior (`packaged:NAME` or the path of a `.safetensors`
        file) is hashed and unpacked on the first access only: the answer is kept for this value of `base`."""
        from .prior import resolve_base

        known = self.__dict__.get("_resolved_base")  # not a dataclass field: never saved, compared or printed
        if known is None or known[0] != self.base:
            known = self.__dict__["_resolved_base"] = (self.base, resolve_base(self.base))
        return known[1]

    @property
    def codec(self) -> str:
        """What turns pixels into the UNet's input: "vae" (an AutoencoderKL), "patches" (the lossless
        space-to-depth codec) or "pixels". A base folder says which in `vae/config.json`."""
        if not self.is_latent:
            return "patches" if self.tiny.patch_size > 1 else "pixels"
        return base_codec(self.base_path)

    def to_dict(self) -> dict:
        return asdict(self)


def config_spatial_factor(config: ModelConfig) -> int:
    """`spatial_factor` of the model a config builds, from config files alone (no weights read)."""
    if not config.is_latent:
        return config.tiny.patch_size
    _check_base(config.base_path)
    if config.codec == "pixels":
        return 1
    vae_config = AutoencoderKL.load_config(config.base_path, subfolder="vae")
    if config.codec == "patches":
        return vae_config["factor"]
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


@dataclass
class Denoiser:
    """The parts that `build_denoiser` returns."""

    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    vae: AutoencoderKL | SpaceToDepth | None


def build_tiny_unet(config: TinyUNetConfig, resolution: int, text_width: int | None = None) -> UNet2DConditionModel:
    """`text_width`: the text encoder's width, read through the UNet's own projection when
    `config.text_projection` is on."""
    channels = 3 * config.patch_size**2
    if config.text_projection and not text_width:
        raise InputError("model.tiny.text_projection needs the text encoder's width")
    return UNet2DConditionModel(
        encoder_hid_dim=text_width if config.text_projection else None,
        sample_size=resolution // config.patch_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(config.block_out_channels),
        down_block_types=tuple(config.down_block_types),
        up_block_types=tuple(config.up_block_types),
        mid_block_type="UNetMidBlock2DCrossAttn",
        layers_per_block=config.layers_per_block,
        attention_head_dim=config.attention_head_dim,
        cross_attention_dim=config.cross_attention_dim,
        norm_num_groups=config.norm_num_groups,
    )


def build_denoiser(
    config: ModelConfig, torch_dtype: torch.dtype | None = None, text_width: int | None = None
) -> Denoiser:
    """The UNet (random tiny, or the base model's), its training noise scheduler, and the codec (the VAE, the
    patch codec of a prior, or none)."""
    if not config.is_latent:
        scheduler = DDPMScheduler(
            num_train_timesteps=config.tiny.num_train_timesteps,
            beta_schedule=config.tiny.beta_schedule,
            prediction_type=config.tiny.prediction_type,
            clip_sample=False,
        )
        codec = SpaceToDepth(config.tiny.patch_size) if config.tiny.patch_size > 1 else None
        return Denoiser(build_tiny_unet(config.tiny, config.resolution, text_width), scheduler, codec)
    _check_base(config.base_path)
    unet = UNet2DConditionModel.from_pretrained(config.base_path, subfolder="unet", torch_dtype=torch_dtype)
    scheduler = DDPMScheduler.from_pretrained(config.base_path, subfolder="scheduler")
    if config.codec == "pixels":
        return Denoiser(unet, scheduler, None)
    codec = SpaceToDepth if config.codec == "patches" else AutoencoderKL
    vae = codec.from_pretrained(config.base_path, subfolder="vae", torch_dtype=torch_dtype)
    vae.requires_grad_(False).eval()
    return Denoiser(unet, scheduler, vae)


def build_unet_skeleton(config: ModelConfig, text_width: int | None = None) -> UNet2DConditionModel:
    """The UNet with its parameters on the meta device: shapes and counts, no weights read or allocated.

    For a Stable Diffusion base only `unet/config.json` is read (a local folder, or one small file from the Hub).
    """
    from accelerate import init_empty_weights

    if not config.is_latent:
        with init_empty_weights():
            return build_tiny_unet(config.tiny, config.resolution, text_width)
    _check_base(config.base_path)
    try:
        unet_config = UNet2DConditionModel.load_config(config.base_path, subfolder="unet")
    except OSError as error:
        raise MissingInput(
            f"cannot read the UNet config of {config.base!r} ({error}); give a local Stable Diffusion folder "
            "with --set model.base=PATH, or log in / go online for a hub id"
        ) from None
    with init_empty_weights():
        return UNet2DConditionModel.from_config(unet_config)


def _check_base(base: str) -> None:
    path = Path(base)
    if path.exists() and not (path / "unet").is_dir():
        raise MissingInput(
            f"{base} is not a Stable Diffusion folder (no unet/ subfolder); give a diffusers-format folder or a hub id"
        )


# peft's names: what LoRA adds to a layer ("...to_q.lora_A.default.weight") and the layer it wraps
# ("...to_q.base_layer.weight"). Every reader of a UNet's keys asks these two functions.
LORA_KEY = ".lora_"
BASE_LAYER_KEY = ".base_layer."


def is_lora_key(name: str) -> bool:
    return LORA_KEY in name


def plain_key(name: str) -> str:
    """A wrapped layer's key as the UNet without LoRA names it."""
    return name.replace(BASE_LAYER_KEY, ".")


def add_lora(unet: UNet2DConditionModel, rank: int, alpha: float, targets: tuple[str, ...] = LORA_TARGETS) -> None:
    """Inject the published LoRA (peft, gaussian init) into the UNet's attention projections."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets)))


def lora_parameters(unet: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in unet.named_parameters() if is_lora_key(name)]


def has_lora(unet: nn.Module) -> bool:
    return bool(getattr(unet, "peft_config", None))


def lora_fused(unet: nn.Module) -> bool:
    """Whether a LoRA is merged into the weights it adapts (`fuse_lora`)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(m.merged for m in unet.modules() if isinstance(m, BaseTunerLayer))


def fuse_lora(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """Merge a frozen LoRA into the weights it adapts (diffusers' `fuse_lora`: peft's merge, W + s B A): each
    adapted projection is then one matmul instead of three. Returns exact copies of the weights it changes, for
    `unfuse_lora`."""
    adapted = {n: p.detach().to("cpu", copy=True) for n, p in unet.named_parameters() if BASE_LAYER_KEY in n}
    unet.fuse_lora()
    return adapted


def unfuse_lora(unet: UNet2DConditionModel, adapted: dict[str, torch.Tensor]) -> None:
    """Undo `fuse_lora` bit for bit: peft's unmerge subtracts s B A again (which rounds), and then the weights
    it adapted are copied back from before the merge."""
    unet.unfuse_lora()
    parameters = dict(unet.named_parameters())
    with torch.no_grad():
        for name, value in adapted.items():
            parameters[name].copy_(value)


class TaxaDiffusionModel(nn.Module):
    """The UNet and the taxonomy encoder as one module (what `accelerate.prepare` wraps).

    `forward` predicts the noise for noisy inputs conditioned on per-rank text features summed down to
    `depth` ranks.
    """

    def __init__(self, unet: UNet2DConditionModel, taxonomy_encoder: TaxonomyEncoder):
        super().__init__()
        self.unet = unet
        self.taxonomy_encoder = taxonomy_encoder

    def forward(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        features: torch.Tensor,
        depth,
        frozen_sum: torch.Tensor | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """Noise prediction; `frozen_sum`/`start`: see `TaxonomyEncoder.forward`."""
        condition = self.taxonomy_encoder(features, depth, frozen_sum=frozen_sum, start=start)
        return self.unet(noisy, timesteps, encoder_hidden_states=condition).sample

    def configure_trainable(self, unet: str | None, encoder_levels: range | list[int]) -> list[nn.Parameter]:
        """Set what trains and return exactly those parameters, as a list.

        `unet`: "lora", "full" or None (frozen). `encoder_levels`: the rank encoders that train; encoders
        below the first of them are frozen and kept in eval mode (the published code left their dropout on).
        A list, not a one-shot generator, so the optimizer and gradient clipping see the same parameters.
        """
        levels = sorted(encoder_levels)
        self.unet.requires_grad_(unet == "full")
        if unet == "lora":
            if not has_lora(self.unet):
                raise InputError("the UNet has no LoRA adapter; build it with finetune='lora'")
            for p in lora_parameters(self.unet):
                p.requires_grad_(True)
        encoder = self.taxonomy_encoder
        encoder.freeze_below(levels[0] if levels else encoder.num_ranks)
        for level, block in enumerate(encoder.encoders):
            block.requires_grad_(level in levels)
        encoder.proj.requires_grad_(0 in levels)
        return [p for p in self.parameters() if p.requires_grad]


def conditioning_width(unet: UNet2DConditionModel) -> int:
    """The width of the features the UNet takes as `encoder_hidden_states`: the text width when it projects
    them itself (SD reading CLIP, a prior), else its cross-attention width."""
    return unet.config.encoder_hid_dim or unet.config.cross_attention_dim


def build_taxonomy_encoder(
    config: ModelConfig, num_ranks: int, text_width: int, cross_attention_dim: int, num_layers: int | None = None
):
    """The rank encoders; `num_layers` 0 passes the text features through unchanged (a prior's text path)."""
    return TaxonomyEncoder(
        num_ranks=num_ranks,
        text_width=text_width,
        cross_attention_dim=cross_attention_dim,
        num_layers=config.encoder_layers if num_layers is None else num_layers,
        num_heads=config.encoder_heads,
        dropout=config.encoder_dropout,
        dim_feedforward=config.encoder_feedforward,
    )


def assemble_model(
    config: ModelConfig, unet: UNet2DConditionModel, num_ranks: int, text_width: int, strategy: str
) -> TaxaDiffusionModel:
    """The UNet (with the LoRA when `finetune: lora`) and the rank encoders as one module.

    A prior being pretrained (`strategy: prior`) trains its whole UNet on the text features themselves: no LoRA, no
    rank-encoder layers, as SD's UNet reads CLIP's. The one-text baselines on a pretrained base (`flat`, `full`)
    read the species caption the same way, through the base's own text path: the paper's SD + LoRA and SD + full
    fine-tuning rows, as diffusers' text-to-image scripts train them. Without a pretrained base (the tiny
    from-scratch model) they keep a trained encoder, since no UNet there has learned to read raw text features."""
    prior = strategy == "prior"
    text_path = prior or (strategy in ("flat", "full") and config.is_latent)
    if config.finetune == "lora" and not prior:
        add_lora(unet, config.lora_rank, config.lora_alpha, config.lora_targets)
    encoder = build_taxonomy_encoder(config, num_ranks, text_width, conditioning_width(unet), 0 if text_path else None)
    return TaxaDiffusionModel(unet, encoder)


def count_parameters(parameters: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in parameters)
