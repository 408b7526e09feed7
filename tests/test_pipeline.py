"""TaxaDiffusionPipeline against diffusers' StableDiffusionPipeline, and its save/load round trip."""

import logging

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from taxadiffusion.conditioning import TaxonomyEncoder
from taxadiffusion.errors import ConfigError
from taxadiffusion.model import add_lora, lora_parameters
from taxadiffusion.pipeline import SCHEDULERS, TaxaDiffusionPipeline, make_scheduler
from taxadiffusion.sampling import Scheduler
from taxadiffusion.taxonomy import NONE_ID as DROPPED
from taxadiffusion.taxonomy import UnknownTaxonError
from taxadiffusion.text import TextEmbeddingCache, TextEncoderSpec
from tiny_models import tiny_pixel_unet_config, tiny_unet

SPECIES = ("Actinopterygii", "Perciformes", "Pomacentridae", "Amphiprion", "clarkii")


@pytest.fixture(scope="module")
def sd(tiny_sd):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def parts(tiny_sd, small_taxonomy):
    spec = TextEncoderSpec(str(tiny_sd), model_subfolder="text_encoder", tokenizer_subfolder="tokenizer")
    cache = TextEmbeddingCache.build(small_taxonomy, spec.load())
    torch.manual_seed(0)
    encoder = TaxonomyEncoder(num_ranks=5, text_width=32, num_heads=4).eval()
    return cache, encoder


def _ours(sd, parts, scheduler="pndm", unet=None):
    cache, encoder = parts
    pipe = TaxaDiffusionPipeline(
        unet=unet or sd.unet,
        scheduler=make_scheduler(scheduler, sd.scheduler.config),
        taxonomy_encoder=encoder,
        text_embeddings=cache,
        vae=sd.vae,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _embeds(pipe, lineage, depth, negative):
    ids = torch.full((1, 5), DROPPED)
    ids[0, : lineage.depth] = torch.tensor(pipe.taxonomy.ids(lineage))
    features = pipe.text_embeddings.lookup(ids)
    if negative == "none":
        features = pipe.text_embeddings.lookup(torch.full_like(ids, DROPPED))
    return pipe.taxonomy_encoder(features, depth)


def _both(ours, sd, taxon: str, guidance: str, negative: torch.Tensor, c_k: torch.Tensor, nulls=None, **kwargs):
    """The same sampling run by our pipeline (from the taxon, its negative of kind `nulls`) and by diffusers'
    (from the embeddings)."""
    with torch.no_grad():
        expected = sd(
            prompt_embeds=c_k,
            negative_prompt_embeds=negative,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **kwargs,
        ).images
    got = ours(
        taxon, guidance=guidance, negative=nulls, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs
    )
    return got.images, expected


@pytest.mark.parametrize("scheduler", ["pndm", "ddim", "dpm"])
def test_taxonomic_cfg_equals_sd_with_level0_negative(sd, parts, scheduler):
    ours = _ours(sd, parts, scheduler)
    sd.scheduler = make_scheduler(scheduler, sd.scheduler.config)
    lineage = ours.resolve("Amphiprion clarkii")
    with torch.no_grad():
        c_k, c_0 = _embeds(ours, lineage, 5, None), _embeds(ours, lineage, 1, None)
    kwargs = {"guidance_scale": 9.0, "num_inference_steps": 6, "num_images_per_prompt": 2}
    got, expected = _both(ours, sd, "Amphiprion clarkii", "taxonomic", c_0, c_k, **kwargs)
    assert got.shape == expected.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("scheduler", ["pndm", "ddim", "dpm"])
def test_trailing_spacing_starts_at_the_last_training_step_and_equals_diffusers(sd, parts, scheduler, monkeypatch):
    """`spacing` reaches the scheduler: trailing's first step is t = T - 1 at any step count, leading's (the
    published) below it, and sampling with trailing equals diffusers' with the same `timestep_spacing`."""
    ours = _ours(sd, parts, scheduler)
    last = sd.scheduler.config.num_train_timesteps - 1
    first = {}
    for spacing in ("leading", "trailing"):
        ours.configure_sampling(scheduler=scheduler, spacing=spacing)
        assert ours.scheduler.config.timestep_spacing == spacing
        ours.scheduler.set_timesteps(8)
        first[spacing] = int(ours.scheduler.timesteps[0])
    assert first["trailing"] == last > first["leading"]
    held = ours.scheduler
    assert ours.configure_sampling(steps=6).spacing == "trailing" and ours.scheduler is held  # nothing rebuilt

    cls = type(ours.scheduler)
    assert cls is SCHEDULERS[Scheduler(scheduler)]
    extra = {"dpm": {"algorithm_type": "dpmsolver++"}, "pndm": {"skip_prk_steps": True}}.get(scheduler, {})
    monkeypatch.setattr(sd, "scheduler", cls.from_config(sd.scheduler.config, timestep_spacing="trailing", **extra))
    lineage = ours.resolve("Amphiprion clarkii")
    with torch.no_grad():
        c_k, c_0 = _embeds(ours, lineage, 5, None), _embeds(ours, lineage, 1, None)
    kwargs = {"guidance_scale": 9.0, "num_inference_steps": 6}
    got, expected = _both(ours, sd, "Amphiprion clarkii", "taxonomic", c_0, c_k, **kwargs)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_saved_spacing_loads_back_and_a_foreign_scheduler_keeps_its_own(sd, parts, tmp_path):
    from taxadiffusion.sampling import SETTINGS_FILE

    ours = _ours(sd, parts, "dpm")
    ours.configure_sampling(scheduler="dpm", spacing="trailing", steps=8)
    ours.save_pretrained(tmp_path / "pipe")
    loaded = TaxaDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert (loaded.sampling.scheduler, loaded.sampling.spacing, loaded.sampling.steps) == ("dpm", "trailing", 8)
    assert loaded.scheduler.config.timestep_spacing == "trailing"
    # saved by another program (no settings file): it samples with the scheduler and spacing it holds
    (tmp_path / "pipe" / SETTINGS_FILE).unlink()
    foreign = TaxaDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert (foreign.sampling.scheduler, foreign.sampling.spacing) == ("dpm", "trailing")
    with pytest.raises(ConfigError, match="spacing must be one of leading, trailing, linspace"):
        ours.configure_sampling(spacing="uniform")


def test_vanilla_cfg_equals_sd_with_none_negative(sd, parts):
    ours = _ours(sd, parts)
    sd.scheduler = make_scheduler("pndm", sd.scheduler.config)
    lineage = ours.resolve("Pomacentridae")
    with torch.no_grad():
        c_k, empty = _embeds(ours, lineage, 3, None), _embeds(ours, lineage, 3, "none")
    got, expected = _both(ours, sd, "Pomacentridae", "vanilla", empty, c_k, guidance_scale=5.0, num_inference_steps=5)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_window_is_honoured_step_by_step(sd, parts):
    ours = _ours(sd, parts, "ddim")  # one UNet call per step (PLMS calls it twice on its first step)
    batches = []
    hook = ours.unet.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    try:
        ours("Amphiprion clarkii", num_inference_steps=8, guidance_window=(0.25, 0.75), output_type="np")
        assert batches == [1, 1, 2, 2, 2, 2, 2, 1]  # steps 2..6: 0.25 x 8 <= i <= 0.75 x 8, as published
        batches.clear()
        ours(["Amphiprion clarkii", "Chromis viridis"], num_inference_steps=4, guidance="none", output_type="np")
        assert batches == [2, 2, 2, 2]
    finally:
        hook.remove()


def test_inputs_outputs_and_errors(sd, parts):
    ours = _ours(sd, parts)
    out = ours(["Amphiprion", "Labridae"], num_inference_steps=2, num_images_per_prompt=3, output_type="pt")
    assert out.images.shape == (6, 3, 16, 16) and out.images.min() >= 0 and out.images.max() <= 1
    assert [lin.depth for lin in out.lineages] == [4, 4, 4, 3, 3, 3]
    pil = ours("Amphiprion clarkii", num_inference_steps=2, condition_rank="family").images
    assert len(pil) == 1 and pil[0].size == (16, 16)
    with pytest.raises(UnknownTaxonError, match="did you mean 'Amphiprion'"):
        ours("Amphiprio", num_inference_steps=2)
    with pytest.raises(KeyError, match="give --rank"):
        ours("Chromis", num_inference_steps=2)
    homonym = ours.taxonomy.find("Chromis")[1]  # a lineage tells homonyms apart
    out = ours(ours.taxonomy.lineage(homonym), num_inference_steps=1, output_type="np")
    assert out.lineages[0].names[2] == "Tetraodontidae"


def test_save_load_reproduces_images_and_lora_loads_in_diffusers(sd, parts, tiny_sd, tmp_path):
    unet = tiny_unet(cross_attention_dim=32)
    add_lora(unet, rank=4, alpha=8.0)  # alpha != rank: the scale must survive the round trip
    generator = torch.Generator().manual_seed(0)
    for p in lora_parameters(unet):
        p.data.normal_(0.0, 0.2, generator=generator)
    ours = _ours(sd, parts, unet=unet)
    kwargs = {"num_inference_steps": 3, "output_type": "np"}
    before = ours("Amphiprion clarkii", generator=torch.Generator().manual_seed(5), **kwargs).images
    plain = _ours(sd, parts)("Amphiprion clarkii", generator=torch.Generator().manual_seed(5), **kwargs).images
    assert np.abs(before - plain).max() > 1e-3  # the LoRA changes the images

    ours.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "pytorch_lora_weights.safetensors").is_file()
    logged = logging.Handler()
    logged.emit = lambda record: messages.append(record.getMessage())
    messages = []
    logging.getLogger("diffusers").addHandler(logged)  # diffusers' loggers do not propagate to caplog's
    try:
        loaded = TaxaDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    finally:
        logging.getLogger("diffusers").removeHandler(logged)
    assert not [m for m in messages if "No LoRA keys" in m]  # no text encoder to look for keys of
    loaded.set_progress_bar_config(disable=True)
    assert loaded.taxonomy == ours.taxonomy
    after = loaded("Amphiprion clarkii", generator=torch.Generator().manual_seed(5), **kwargs).images
    np.testing.assert_allclose(after, before, atol=1e-5)

    # Fused for sampling (diffusers' fuse_lora), the same images; saved fused it would apply the LoRA twice
    loaded.fuse_lora()
    fused = loaded("Amphiprion clarkii", generator=torch.Generator().manual_seed(5), **kwargs).images
    np.testing.assert_allclose(fused, before, atol=1e-5)
    with pytest.raises(ValueError, match="unfuse_lora"):
        loaded.save_pretrained(tmp_path / "fused")

    # The LoRA file is a standard diffusers LoRA: StableDiffusionPipeline.load_lora_weights reads it.
    peer = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    peer.load_lora_weights(tmp_path / "pipe", weight_name="pytorch_lora_weights.safetensors")
    x, t, hidden = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 16, 32)
    with torch.no_grad():
        np.testing.assert_allclose(peer.unet(x, t, hidden).sample, unet(x, t, hidden).sample, atol=1e-5)


@pytest.mark.parametrize("patch_size", [1, 2])
def test_pixel_space_pipeline_round_trip(parts, tmp_path, patch_size):
    from taxadiffusion.codec import SpaceToDepth
    from taxadiffusion.model import ModelConfig, build_denoiser

    tiny = tiny_pixel_unet_config(patch_size)
    denoiser = build_denoiser(ModelConfig(resolution=16, tiny=tiny))
    cache, encoder = parts
    pipe = TaxaDiffusionPipeline(
        unet=denoiser.unet,
        scheduler=make_scheduler("ddim", denoiser.noise_scheduler.config),
        taxonomy_encoder=encoder,
        text_embeddings=cache,
        vae=denoiser.vae,
    )
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == patch_size
    images = pipe("Hemigymnus fasciatus", num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert images.images[0].size == (16, 16)
    pipe.save_pretrained(tmp_path / "pixel")
    loaded = TaxaDiffusionPipeline.from_pretrained(tmp_path / "pixel")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.vae is None if patch_size == 1 else isinstance(loaded.vae, SpaceToDepth)
    a = pipe("Labridae", num_inference_steps=3, generator=torch.Generator().manual_seed(2), output_type="np").images
    b = loaded("Labridae", num_inference_steps=3, generator=torch.Generator().manual_seed(2), output_type="np").images
    np.testing.assert_array_equal(a, b)


def test_sample_cli(tiny_pipeline, tmp_path, capsys):
    from taxadiffusion.cli import main

    model = str(tiny_pipeline)
    out = tmp_path / "samples"
    args = ["sample", "--model", model, "--taxon", "Amphiprion", "--n", "3", "--steps", "2"]
    assert main([*args, "--out", str(out), "--batch-size", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "Amphiprion_000.png",
        "Amphiprion_001.png",
        "Amphiprion_002.png",
        "Amphiprion_grid.png",
    ]
    assert main([*args, "--out", str(out)]) == 2  # never overwrites without the flag
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--out", str(out), "--overwrite"]) == 0
    capsys.readouterr()
    bad = ["sample", "--model", model, "--taxon", "Amphiprio", "--out", str(out)]
    assert main(bad) == 2
    assert "did you mean 'Amphiprion'" in capsys.readouterr().err


def test_published_nulls_are_the_raw_text_features(sd, parts):
    """negative=text: at depth 1 taxonomic guidance contrasts c_0 with the raw "<first rank>: None" features
    (so it does something; the encoded negative there is c_0 itself), and vanilla guidance with the raw
    empty prompt; each equals diffusers' pipeline given those features as the negative."""
    ours = _ours(sd, parts)
    sd.scheduler = make_scheduler("pndm", sd.scheduler.config)
    cache = ours.text_embeddings
    lineage = ours.resolve("Actinopterygii")
    with torch.no_grad():
        c_0 = _embeds(ours, lineage, 1, None)
    none_0, empty = cache.table(0)[-1:], cache.empty_text
    assert not torch.equal(none_0, c_0) and not torch.equal(empty, c_0)
    for guidance, raw in (("taxonomic", none_0), ("vanilla", empty)):
        kwargs = {"guidance_scale": 9.0, "num_inference_steps": 4}
        got, expected = _both(ours, sd, "Actinopterygii", guidance, raw, c_0, nulls="text", **kwargs)
        np.testing.assert_allclose(got, expected, atol=1e-6)
    # The encoded negative at depth 1 is the condition itself: guidance changes nothing there.
    plain = ours("Actinopterygii", guidance="none", generator=torch.Generator().manual_seed(0), output_type="np")
    encoded = ours("Actinopterygii", generator=torch.Generator().manual_seed(0), output_type="np", guidance_scale=9.0)
    np.testing.assert_allclose(plain.images, encoded.images, atol=1e-5)
    # At depth > 1 both read c_0 as the negative.
    a = ours("Amphiprion clarkii", negative="text", generator=torch.Generator().manual_seed(0), output_type="np")
    b = ours("Amphiprion clarkii", negative="encoded", generator=torch.Generator().manual_seed(0), output_type="np")
    np.testing.assert_array_equal(a.images, b.images)


def test_the_model_digest_is_the_same_whatever_schedulers_were_tried_before(tiny_pipeline):
    """A scheduler made from another's config keeps that one's keys; the digest that tells kept images of this
    model from another's reads only the scheduler's own parameters, so the order of `--scheduler` choices does not
    make the same model and settings look like another model."""
    from taxadiffusion.fingerprint import weights_digest

    pipe = TaxaDiffusionPipeline.from_pretrained(tiny_pipeline)
    pipe.configure_sampling(scheduler="dpm")
    direct = weights_digest(pipe)
    for scheduler in ("ddim", "pndm", "dpm"):
        pipe.configure_sampling(scheduler=scheduler)
    assert weights_digest(pipe) == direct
    pipe.configure_sampling(spacing="trailing")  # a setting that changes the pixels changes it
    assert weights_digest(pipe) != direct
