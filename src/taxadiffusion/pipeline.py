"""`TaxaDiffusionPipeline`: sampling conditioned on a lineage, with taxonomic guidance.

Follows the diffusers pipeline layout (check_inputs, encode, prepare_latents, __call__ as numbered
steps; randomness only through `generator`). Works in latent space (with a VAE) or pixel space
(tiny models, `vae=None`).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .checks import check_window
from .codec import SpaceToDepth, spatial_factor
from .conditioning import TaxonomyEncoder
from .errors import InputError
from .guidance import Guidance, cfg, in_window
from .model import ModelConfig, build_denoiser, has_lora, is_lora_key, lora_fused, plain_key
from .prior import PRIOR_FILE, read_prior, resolve_base
from .sampling import Negative, SamplingSettings, Scheduler, Spacing
from .saved_files import check_saved_folder, share_safetensors
from .taxonomy import NONE_ID, Lineage, Rank, Taxonomy
from .text import TextEmbeddingCache, TextEncoderSpec

SCHEDULERS = {Scheduler.PNDM: PNDMScheduler, Scheduler.DDIM: DDIMScheduler, Scheduler.DPM: DPMSolverMultistepScheduler}
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def make_scheduler(
    name: str, config, spacing: str = Spacing.LEADING.value
) -> PNDMScheduler | DDIMScheduler | DPMSolverMultistepScheduler:
    """A sampling scheduler from a scheduler config: PNDM (published, SD default), DDIM, or DPM-Solver++, with its
    timesteps spaced as `spacing` (see `Spacing`; published: leading)."""
    cls = SCHEDULERS[Scheduler.parse(name)]
    spaced = {"timestep_spacing": Spacing.parse(spacing).value}
    if cls is DPMSolverMultistepScheduler:
        return cls.from_config(config, algorithm_type="dpmsolver++", **spaced)
    if cls is PNDMScheduler:
        return cls.from_config(config, skip_prk_steps=True, **spaced)
    return cls.from_config(config, **spaced)


def held_settings(scheduler) -> dict:
    """The sampler and spacing a scheduler samples with, as sampling settings (empty for a scheduler of another
    kind)."""
    held = next((name for name, cls in SCHEDULERS.items() if isinstance(scheduler, cls)), None)
    if held is None:
        return {}
    return {"scheduler": held.value, "spacing": scheduler.config.get("timestep_spacing", Spacing.LEADING.value)}


def samples_as(scheduler, settings: SamplingSettings) -> bool:
    """Whether `scheduler` is the sampler and spacing `settings` name."""
    return held_settings(scheduler) == {"scheduler": settings.scheduler, "spacing": settings.spacing}


def scheduler_for(scheduler, settings: SamplingSettings):
    """`scheduler` when it samples as `settings` say, else one that does, built from its config."""
    if samples_as(scheduler, settings):
        return scheduler
    return make_scheduler(settings.scheduler, scheduler.config, settings.spacing)


@dataclass
class TaxaDiffusionPipelineOutput(BaseOutput):
    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    lineages: list[Lineage]


class TaxaDiffusionPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Generate images of a taxon from its lineage.

    Components: `unet`, `scheduler`, `taxonomy_encoder` (per-rank encoders), `text_embeddings` (frozen
    text features of every taxon, with the taxonomy) and an optional `vae` (None: pixel space).
    """

    model_cpu_offload_seq = "unet->vae"
    _optional_components: ClassVar[list[str]] = ["vae"]
    text_encoder = None  # taxon texts are pre-encoded; `load_lora_weights` looks for this attribute

    @classmethod
    def load_lora_into_text_encoder(cls, *args, text_encoder=None, **kwargs) -> None:
        """No text encoder takes a LoRA here (`load_lora_weights` would log, on every load, that it found
        no text-encoder keys); one passed explicitly is loaded as diffusers does."""
        if text_encoder is not None:
            super().load_lora_into_text_encoder(*args, text_encoder=text_encoder, **kwargs)

    def __init__(
        self,
        unet: UNet2DConditionModel,
        scheduler,
        taxonomy_encoder: TaxonomyEncoder,
        text_embeddings: TextEmbeddingCache,
        vae: AutoencoderKL | SpaceToDepth | None = None,
    ):
        super().__init__()
        self.register_modules(
            unet=unet, scheduler=scheduler, taxonomy_encoder=taxonomy_encoder, text_embeddings=text_embeddings, vae=vae
        )
        self.vae_scale_factor = spatial_factor(vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        # The defaults of `__call__`: the run's own settings once trained, saved as `sampling.json`.
        self.sampling = SamplingSettings()

    @property
    def taxonomy(self) -> Taxonomy:
        return self.text_embeddings.taxonomy

    def configure_sampling(self, **changes) -> SamplingSettings:
        """Change the default sampling settings (a change of None keeps the value); a scheduler of another
        name or spacing replaces the pipeline's scheduler, built from its config."""
        settings = self.sampling.replace(**changes)
        self.scheduler = scheduler_for(self.scheduler, settings)
        self.sampling = settings
        return settings

    # 1. inputs -------------------------------------------------------------------------------------

    def resolve(self, taxon: str | Lineage, rank: Rank | str | None = None) -> Lineage:
        """A lineage from a name at any rank (`"Chaetodon"`, `"Amphiprion clarkii"`) or a given lineage."""
        if isinstance(taxon, Lineage):
            self.taxonomy.ids(taxon)  # raises with suggestions for unknown names
            return taxon
        return self.taxonomy.lineage(self.taxonomy.resolve(taxon, rank))

    def check_inputs(self, num_inference_steps: int, guidance_scale: float, window, height: int, width: int):
        if num_inference_steps < 1:
            raise InputError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if guidance_scale < 0:
            raise InputError(f"guidance_scale must be >= 0, got {guidance_scale}")
        check_window("window", window)
        factor = self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if height % factor or width % factor:
            raise InputError(f"height and width must be multiples of {factor}, got {height}x{width}")

    # 2. conditioning ---------------------------------------------------------------------------------

    def encode(
        self,
        lineages: Sequence[Lineage],
        guidance: Guidance,
        num_images_per_prompt: int,
        negative: Negative = Negative.ENCODED,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(condition c_k, negative) each (B * n, L, C). The negative (see `Negative`) is c_0 or, as published,
        the raw `"<first rank>: None"` features at depth 1 (taxonomic); every rank "None" through the encoders,
        or as published the raw empty prompt (vanilla)."""
        device = self._execution_device
        ranks = len(self.taxonomy.ranks)
        ids = torch.full((len(lineages), ranks), NONE_ID, dtype=torch.long)
        for row, lineage in enumerate(lineages):
            known = self.taxonomy.ids(lineage)
            ids[row, : len(known)] = torch.tensor(known)
        depth = torch.tensor([lineage.depth for lineage in lineages], device=device)
        dtype = self.unet.dtype
        encoder_dtype = self.taxonomy_encoder.dtype
        features = self.text_embeddings.lookup(ids).to(device=device, dtype=encoder_dtype)
        condition = self.taxonomy_encoder(features, depth)

        def raw(text_features: torch.Tensor) -> torch.Tensor:
            """Text features as the UNet reads them without the rank encoders (through the projection only,
            where the text width differs from the UNet's)."""
            return self.taxonomy_encoder.proj(text_features.to(device=device, dtype=encoder_dtype))

        negative_branch = None
        if guidance is Guidance.TAXONOMIC:
            negative_branch = self.taxonomy_encoder(features, torch.ones_like(depth))
            if negative is Negative.TEXT:
                table = self.text_embeddings.table(0)
                none_0 = raw(table[-1:]).expand_as(negative_branch)
                negative_branch = torch.where((depth == 1)[:, None, None], none_0, negative_branch)
        elif guidance is Guidance.VANILLA:
            if negative is Negative.TEXT:
                empty = getattr(self.text_embeddings, "empty_text", None)
                if empty is None:
                    raise InputError(
                        "this pipeline's text features predate the empty prompt (negative: text); sample with "
                        "negative: encoded, or retrain to rebuild its text cache"
                    )
                negative_branch = raw(empty).expand_as(condition)
            else:
                empty = self.text_embeddings.lookup(torch.full_like(ids, NONE_ID))
                negative_branch = self.taxonomy_encoder(empty.to(device=device, dtype=features.dtype), depth)

        def expand(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(dtype).repeat_interleave(num_images_per_prompt, dim=0)

        return expand(condition), expand(negative_branch)

    # 3. latents ----------------------------------------------------------------------------------------

    def prepare_latents(self, batch, height, width, dtype, device, generator, latents=None) -> torch.Tensor:
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} images")
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype) if latents is None else latents
        return latents.to(device) * self.scheduler.init_noise_sigma

    def denoise(self, latents, condition, both, scale: float, window: tuple[float, float] | None, step_kwargs):
        """The sampling loop over the scheduler's timesteps. Inside the guidance `window` (None: never) the
        negative and the conditional branch run as one batch (`both` = [negative, condition]) and are combined by
        CFG; taxonomic and vanilla guidance differ only in that negative branch."""
        timesteps = self.scheduler.timesteps
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                use_guidance = window is not None and in_window(i, len(timesteps), window)
                model_input = torch.cat([latents] * 2) if use_guidance else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                hidden = both if use_guidance else condition
                noise = self.unet(model_input, t, encoder_hidden_states=hidden, return_dict=False)[0]
                if use_guidance:
                    eps_negative, eps_condition = noise.chunk(2)
                    noise = cfg(eps_condition, eps_negative, scale)
                latents = self.scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
                progress.update()
        return latents

    def decode(self, latents: torch.Tensor, output_type: str, generator=None):
        """Latents -> images in `output_type` ("pil", "np", "pt"; "latent" returns them as they are)."""
        if output_type == "latent":
            return latents
        images = latents
        if self.vae is not None:
            latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
            images = self.vae.decode(latents, return_dict=False, generator=generator)[0]
        denormalize = [True] * images.shape[0]
        return self.image_processor.postprocess(images, output_type=output_type, do_denormalize=denormalize)

    def _step_kwargs(self, generator, eta: float) -> dict:
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "eta" in accepted:
            kwargs["eta"] = eta
        if "generator" in accepted:
            kwargs["generator"] = generator
        return kwargs

    # 4. sampling -------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        taxa: str | Lineage | Sequence[str | Lineage],
        rank: Rank | str | None = None,
        condition_rank: Rank | str | None = None,
        num_inference_steps: int | None = None,
        guidance: Guidance | str | None = None,
        guidance_scale: float | None = None,
        guidance_window: tuple[float, float] | None = None,
        negative: Negative | str | None = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> TaxaDiffusionPipelineOutput | tuple:
        """Sample images of one or more taxa.

        Args:
            taxa: taxon name(s) at any rank or `Lineage`(s). Each is conditioned down to its finest known
                rank unless `condition_rank` names a coarser one (each must be labelled down to it).
            rank: the rank to look names up at (to tell homonyms apart).
            guidance: "taxonomic" (negative = level-0 conditioning; the paper's rule), "vanilla"
                (negative = every rank "None") or "none".
            guidance_scale: s = 1 + w (published 9.0); s <= 1 runs one conditional pass.
            guidance_window: fractions (r0, r1) of the schedule where guidance applies (both ends included,
                as published); elsewhere one conditional pass.
            negative: what the negative branch reads: "encoded" (the rank encoders' output) or "text" (the raw
                text features, as published); see `taxadiffusion.sampling.Negative`.
            Sampling settings not given are the pipeline's `sampling` (its run's settings once trained).
        """
        defaults = self.sampling
        num_inference_steps = defaults.steps if num_inference_steps is None else num_inference_steps
        guidance = Guidance.parse(defaults.guidance if guidance is None else guidance)
        guidance_scale = defaults.scale if guidance_scale is None else guidance_scale
        guidance_window = defaults.window if guidance_window is None else guidance_window
        negative = Negative.parse(defaults.negative if negative is None else negative)
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        self.check_inputs(num_inference_steps, guidance_scale, guidance_window, height, width)
        items = [taxa] if isinstance(taxa, str | Lineage) else list(taxa)
        lineages = [self.resolve(item, rank) for item in items]
        if condition_rank is not None:
            lineages = [lineage.down_to(condition_rank) for lineage in lineages]
        guided = guidance is not Guidance.NONE and guidance_scale > 1.0

        # 1. conditioning: c_k and the negative branch
        condition, uncondition = self.encode(
            lineages, guidance if guided else Guidance.NONE, num_images_per_prompt, negative
        )
        both = torch.cat([uncondition, condition]) if guided else None

        # 2. timesteps and initial noise
        device = self._execution_device
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        batch = len(lineages) * num_images_per_prompt
        latents = self.prepare_latents(batch, height, width, condition.dtype, device, generator, latents)
        step_kwargs = self._step_kwargs(generator, eta)

        # 3. denoising loop: both branches in one batched UNet call inside the window
        window = guidance_window if guided else None
        latents = self.denoise(latents, condition, both, guidance_scale, window, step_kwargs)

        # 4. decode
        images = self.decode(latents, output_type, generator)
        self.maybe_free_model_hooks()
        expanded = [lin for lin in lineages for _ in range(num_images_per_prompt)]
        if not return_dict:
            return images, expanded
        return TaxaDiffusionPipelineOutput(images=images, lineages=expanded)

    # persistence ----------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | Path, safe_serialization: bool = True, **kwargs) -> None:
        """Save every component; a LoRA UNet is saved as its base weights plus the LoRA in the diffusers
        format (`pytorch_lora_weights.safetensors`, readable by `load_lora_weights`)."""
        from peft.utils import get_peft_model_state_dict

        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.save_config(directory)
        self.sampling.save(directory)
        for name in self.components:
            component = getattr(self, name)
            if component is None:
                continue
            if name == "unet" and has_lora(component):
                if lora_fused(component):  # its base weights would hold the LoRA, and a load would add it again
                    raise ValueError("the UNet's LoRA is fused into its weights: call unfuse_lora() before saving")
                save_base_unet(component, directory / "unet")
                adapter = next(iter(component.peft_config))
                state = get_peft_model_state_dict(component, adapter_name=adapter)
                config = component.peft_config[adapter].to_dict()
                self.save_lora_weights(
                    directory,
                    unet_lora_layers=state,
                    weight_name=LORA_WEIGHT_NAME,
                    unet_lora_adapter_metadata=_jsonable(config),
                )
                share_safetensors(directory / LORA_WEIGHT_NAME)
            else:
                component.save_pretrained(directory / name, safe_serialization=safe_serialization)
            if (directory / name).is_dir():  # what this save wrote, not other files a user keeps beside it
                share_safetensors(directory / name)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> TaxaDiffusionPipeline:
        """Load a saved pipeline; a LoRA saved with it is loaded through `load_lora_weights`. A local folder is
        checked first: one that is not a saved pipeline, or holds a damaged file, raises an error naming it."""
        if is_local(pretrained_model_name_or_path):
            check_saved_folder(
                pretrained_model_name_or_path, "a saved pipeline", "model_index.json", "pass a training run's pipeline/"
            )
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if is_local(pretrained_model_name_or_path):
            pipe.sampling = SamplingSettings.load(pretrained_model_name_or_path)
        held = held_settings(pipe.scheduler)
        if held and not samples_as(pipe.scheduler, pipe.sampling):
            # saved without its settings (or by another program): the scheduler it holds is the one it samples with
            pipe.sampling = pipe.sampling.replace(**held)
        if (Path(pretrained_model_name_or_path) / LORA_WEIGHT_NAME).is_file():
            pipe.load_lora_weights(pretrained_model_name_or_path, weight_name=LORA_WEIGHT_NAME)
        return pipe

    @classmethod
    def from_prior(cls, base: str | Path, captions: list[str], scheduler: str = "pndm") -> TaxaDiffusionPipeline:
        """A prior made by `pretrain` prompted with captions of its own kind, no adaptation (the paper's SD row, and
        the check that its cross-attention responds to the text): the captions are encoded by the prior's text
        encoder and read by the UNet as they are (rank encoders of no layers). A packed file is prompted as the
        folder it unpacks to."""
        base = resolve_base(str(base))
        info = read_prior(base)
        if info is None:
            raise InputError(f"{base} is not a prior made by `taxadiffusion pretrain` (no {PRIOR_FILE})")
        encoder = TextEncoderSpec(info.text_encoder, max_length=info.max_length)
        if (Path(info.text_encoder) / "text_encoder").is_dir():
            encoder = TextEncoderSpec(info.text_encoder, "text_encoder", "tokenizer", info.max_length)
        ranks = (Rank.SPECIFIC_EPITHET,)  # the one-text slot `pretrain` trained through
        taxonomy = Taxonomy.from_lineages(Lineage(ranks, (caption,)) for caption in captions)
        cache = TextEmbeddingCache.build(taxonomy, encoder.load(), "{name}")
        denoiser = build_denoiser(ModelConfig(base=base, resolution=info.resolution))
        width = cache.config.width
        identity = TaxonomyEncoder(num_ranks=1, text_width=width, cross_attention_dim=width, num_layers=0).eval()
        pipe = cls(
            unet=denoiser.unet.eval(),
            scheduler=make_scheduler(scheduler, denoiser.noise_scheduler.config),
            taxonomy_encoder=identity,
            text_embeddings=cache,
            vae=denoiser.vae,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def is_local(name: str | Path) -> bool:
    """A path on this machine, as opposed to a Hub id ("owner/name"): it exists, or it is not shaped like an id."""
    text = str(name)
    return Path(text).exists() or text.startswith(("/", ".", "~")) or text.count("/") != 1


def save_base_unet(unet: UNet2DConditionModel, directory: Path) -> None:
    """Save a peft-injected UNet without its adapters, in the plain diffusers layout."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    unet.save_config(directory)
    base = {}
    for key, value in unet.state_dict().items():
        if is_lora_key(key):
            continue
        base[plain_key(key)] = value.detach().contiguous()
    save_file(base, directory / "diffusion_pytorch_model.safetensors")


def _jsonable(config: dict) -> dict:
    """peft configs hold sets and enums; make them JSON for the safetensors metadata."""
    return json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
