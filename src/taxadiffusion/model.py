"""Building the denoiser: a Stable Diffusion UNet (latent space) or a tiny pixel-space UNet, plus LoRA.

The noise schedule for training is the base model's own scheduler config (SD 1.5: `scaled_linear`);
the published code trained with `linear` betas while sampling with `scaled_linear`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .conditioning import TaxonomyEncoder
from .errors import InputError, MissingInput

TINY = "tiny"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


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
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise InputError(
                f"tiny UNet: prediction_type must be epsilon, v_prediction or sample, got {self.prediction_type!r}"
            )
        for name in ("patch_size", "layers_per_block", "attention_head_dim", "cross_attention_dim", "norm_num_groups"):
            if getattr(self, name) < 1:
                raise InputError(f"tiny UNet: {name} must be >= 1, got {getattr(self, name)}")
        if self.num_train_timesteps < 2:
            raise InputError(f"tiny UNet: num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if not self.block_out_channels:
            raise InputError("tiny UNet: block_out_channels needs at least one level")
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise InputError("tiny UNet: block_out_channels, down_block_types and up_block_types need equal lengths")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise InputError(
                f"tiny UNet: every block width must be divisible by norm_num_groups={self.norm_num_groups}"
            )


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
        if self.finetune not in ("lora", "full"):
            raise InputError(f"finetune must be 'lora' or 'full', got {self.finetune!r}")
        if self.lora_rank < 1:
            raise InputError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if self.resolution < 8 or self.resolution % 8:
            raise InputError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise InputError(f"lora_alpha must be a finite number > 0, got {self.lora_alpha}")
        if self.encoder_feedforward < 1:
            raise InputError(f"encoder_feedforward must be >= 1, got {self.encoder_feedforward}")
        if self.encoder_layers < 1 or self.encoder_heads < 1:
            raise InputError(
                f"encoder_layers and encoder_heads must be >= 1, got {self.encoder_layers}, {self.encoder_heads}"
            )
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise InputError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout}")
        if not self.is_latent:
            factor = self.tiny.patch_size * 2 ** (len(self.tiny.block_out_channels) - 1)
            if self.resolution % factor:
                raise InputError(
                    f"resolution {self.resolution} must be a multiple of {factor} for this tiny UNet "
                    f"(patch_size x 2^(levels - 1))"
                )

    @property
    def is_latent(self) -> bool:
        """A base model from a folder or hub id (Stable Diffusion, or a prior made by `pretrain`)."""
        return self.base != TINY

    @property
    def base_path(self) -> str:
        """`base` as a local folder or hub id (a packed prior, `packaged:NAME` or the path of a `.safetensors`
        file, is unpacked once)."""
        from .prior import resolve_base

        return resolve_base(self.base)

    @property
    def codec(self) -> str:
        """What turns pixels into the UNet's input: "vae" (an AutoencoderKL), "patches" (the lossless
        space-to-depth codec) or "pixels". A base folder says which in `vae/config.json`."""
        if not self.is_latent:
            return "patches" if self.tiny.patch_size > 1 else "pixels"
        return base_codec(self.base_path)

    def to_dict(self) -> dict:
        return asdict(self)


class SpaceToDepth(ModelMixin, ConfigMixin):
    """A lossless pixel-space "autoencoder": each `factor` x `factor` block of pixels becomes channels.

    It stands where a VAE stands (encode/decode, `scaling_factor` 1), so pixel models with patches use
    the same training and sampling code as latent models. No library offers this as a diffusers
    component; it is two calls to torch's pixel (un)shuffle.
    """

    @register_to_config
    def __init__(self, factor: int = 2, channels: int = 3, scaling_factor: float = 1.0):
        super().__init__()
        # A persistent scalar gives the module a device and dtype, and diffusers a weights file to save and load.
        self.register_buffer("anchor", torch.zeros(()))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(pixels, self.config.factor)

    def decode(self, latents: torch.Tensor, return_dict: bool = False, generator=None) -> tuple[torch.Tensor]:
        return (F.pixel_shuffle(latents, self.config.factor),)


def base_codec(base: str) -> str:
    """The codec of a base folder or hub id: "vae" unless its `vae/config.json` names another (a prior)."""
    config_file = Path(base) / "vae" / "config.json"
    if not config_file.is_file():
        # a prior in pixel space has no codec; else a hub id, or a folder checked elsewhere
        return "pixels" if (Path(base) / "prior.json").is_file() else "vae"
    try:
        name = json.loads(config_file.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "vae"  # the loader names the damaged file
    return "patches" if name == SpaceToDepth.__name__ else "vae"


def spatial_factor(vae: nn.Module | None) -> int:
    """How many pixels one latent cell spans."""
    if vae is None:
        return 1
    if isinstance(vae, SpaceToDepth):
        return vae.config.factor
    return 2 ** (len(vae.config.block_out_channels) - 1)


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


@torch.no_grad()
def encode_images(vae: nn.Module | None, pixels: torch.Tensor, generator: torch.Generator | None = None):
    """Pixels in [-1, 1] -> the space the UNet denoises (VAE latents x scaling factor, patches, or pixels)."""
    if vae is None:
        return pixels
    if isinstance(vae, SpaceToDepth):
        return vae.encode(pixels)
    latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample(generator)
    return latents * vae.config.scaling_factor


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


def add_lora(unet: UNet2DConditionModel, rank: int, alpha: float, targets: tuple[str, ...] = LORA_TARGETS) -> None:
    """Inject the published LoRA (peft, gaussian init) into the UNet's attention projections."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets)))


def lora_parameters(unet: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in unet.named_parameters() if ".lora_" in name]


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
    adapted = {n: p.detach().to("cpu", copy=True) for n, p in unet.named_parameters() if ".base_layer." in n}
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
