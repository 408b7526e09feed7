"""Tiny real components written in the real on-disk formats, for offline tests.

A 2-block UNet, a tiny VAE, a tiny CLIP text model with a byte-level BPE tokenizer (vocab.json +
merges.txt, as CLIP ships them), and a Stable Diffusion folder that holds them all.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from taxadiffusion.testing import write_clip_tokenizer


def tiny_clip_text_model(vocab_size: int, width: int = 32, max_length: int = 16, seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config).eval()


def tiny_unet(
    cross_attention_dim: int = 32,
    in_channels: int = 4,
    sample_size: int = 8,
    seed: int = 0,
    encoder_hid_dim: int | None = None,
):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        encoder_hid_dim=encoder_hid_dim,  # set: the UNet projects text features of that width itself
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=16,
    ).eval()


def sd_scheduler() -> PNDMScheduler:
    """SD 1.5's scheduler config (scaled_linear betas)."""
    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def write_tiny_sd(directory: Path, width: int = 32) -> Path:
    """A Stable Diffusion folder (unet, vae, text_encoder, tokenizer, scheduler, model_index.json)."""
    tokenizer = write_clip_tokenizer(directory / "tokenizer")
    tiny_clip_text_model(len(tokenizer), width).save_pretrained(directory / "text_encoder")
    tiny_unet(cross_attention_dim=width).save_pretrained(directory / "unet")
    tiny_vae().save_pretrained(directory / "vae")
    sd_scheduler().save_pretrained(directory / "scheduler")
    (directory / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": "0.42.1",
                "feature_extractor": [None, None],
                "requires_safety_checker": False,
                "safety_checker": [None, None],
                "scheduler": ["diffusers", "PNDMScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            }
        )
    )
    return directory


def tiny_pixel_unet_config(patch_size: int = 1, cross_attention_dim: int = 32):
    """A 2-block pixel-space UNet config (taxadiffusion's TinyUNetConfig) for fast tests."""
    from taxadiffusion.model import TinyUNetConfig

    return TinyUNetConfig(
        patch_size=patch_size,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
    )


def write_tiny_pipeline(directory: Path, sd_folder: Path, taxonomy, resolution: int = 16) -> Path:
    """A saved pixel-space TaxaDiffusionPipeline over `taxonomy`, its texts encoded by the tiny SD's CLIP."""
    from taxadiffusion.conditioning import TaxonomyEncoder
    from taxadiffusion.model import ModelConfig, build_denoiser
    from taxadiffusion.pipeline import TaxaDiffusionPipeline, make_scheduler
    from taxadiffusion.text import TextEmbeddingCache, TextEncoderSpec

    spec = TextEncoderSpec(str(sd_folder), model_subfolder="text_encoder", tokenizer_subfolder="tokenizer")
    cache = TextEmbeddingCache.build(taxonomy, spec.load())
    torch.manual_seed(0)
    encoder = TaxonomyEncoder(num_ranks=len(taxonomy.ranks), text_width=32, num_heads=4).eval()
    denoiser = build_denoiser(ModelConfig(resolution=resolution, tiny=tiny_pixel_unet_config()))
    TaxaDiffusionPipeline(
        unet=denoiser.unet,
        scheduler=make_scheduler("pndm", denoiser.noise_scheduler.config),
        taxonomy_encoder=encoder,
        text_embeddings=cache,
    ).save_pretrained(directory)
    return directory


# A 2-block pixel-space model config for training tests (16 px).
TINY_MODEL = {
    "base": "tiny",
    "resolution": 16,
    "finetune": "full",
    "encoder_heads": 4,
    "tiny": {
        "block_out_channels": [32, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "cross_attention_dim": 32,
    },
}


def write_two_rank_dataset(root: Path) -> Path:
    """A folder dataset with two ranks (genus, species): 4 species of synthetic fish, 6-8 images each, 16 px."""
    import csv

    from taxadiffusion.data.synthetic import SyntheticConfig, SyntheticTaxonomy

    branching = ((1, 1),) * 5 + ((2, 2), (2, 2))
    synth = SyntheticTaxonomy(SyntheticConfig(branching=branching, max_images=8, min_images=6, resolution=16))
    synth.write_folder(root, progress=False)
    rows = list(csv.DictReader((root / "taxonomy.csv").open()))
    with (root / "taxonomy.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["folder", "genus", "specific_epithet"])
        writer.writerows([r["folder"], r["genus"], r["specific_epithet"]] for r in rows)
    return root


def generated_images(out: Path) -> dict:
    """A generated dataset's images by path under `out`, as pixel arrays (work-in-progress `.tmp-` files left out)."""
    import numpy as np
    from PIL import Image

    return {p.relative_to(out).as_posix(): np.asarray(Image.open(p)) for p in sorted(out.glob("images/*/[!.]*.png"))}
