"""Building denoisers, LoRA, and what trains at each stage."""

import pytest
import torch

from taxadiffusion.model import (
    ModelConfig,
    TaxaDiffusionModel,
    TinyUNetConfig,
    add_lora,
    build_denoiser,
    build_taxonomy_encoder,
    count_parameters,
    fuse_lora,
    lora_fused,
    lora_parameters,
    unfuse_lora,
)
from tiny_models import tiny_pixel_unet_config

TINY = tiny_pixel_unet_config()


def _trains(model, stage_index: int, finetune: str = "lora") -> list:
    """What a progressive stage trains, through the trainer's own path: the stage list, then
    `configure_trainable`."""
    from taxadiffusion.config import TrainConfig
    from taxadiffusion.taxonomy import Rank
    from taxadiffusion.train.stages import plan_stages

    ranks = (Rank.FAMILY, Rank.GENUS, Rank.SPECIFIC_EPITHET)
    stage = plan_stages(TrainConfig(steps=1), ModelConfig(finetune=finetune), ranks)[stage_index]
    return model.configure_trainable(stage.unet, stage.encoder_levels)


def _model(finetune="lora", ranks=3):
    config = ModelConfig(resolution=16, tiny=TINY, finetune=finetune, encoder_heads=4)
    denoiser = build_denoiser(config)
    if finetune == "lora":
        add_lora(denoiser.unet, config.lora_rank, config.lora_alpha)
    encoder = build_taxonomy_encoder(config, ranks, text_width=16, cross_attention_dim=32)
    return TaxaDiffusionModel(denoiser.unet, encoder), denoiser


def _expected_lora(unet, rank=4):
    total = 0
    for name, module in unet.named_modules():
        if name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")) and hasattr(module, "base_layer"):
            total += rank * (module.base_layer.in_features + module.base_layer.out_features)
    return total


def test_trainable_parameters_per_stage():
    model, _ = _model()
    encoder = model.taxonomy_encoder
    per_encoder = [count_parameters(list(e.parameters())) for e in encoder.encoders]
    proj = count_parameters(list(encoder.proj.parameters()))
    lora = _expected_lora(model.unet)
    assert lora > 0 and count_parameters(lora_parameters(model.unet)) == lora

    stage0 = _trains(model, 0)
    assert isinstance(stage0, list)
    assert count_parameters(stage0) == lora + per_encoder[0] + proj
    for stage in (1, 2):
        params = _trains(model, stage)
        assert count_parameters(params) == per_encoder[stage]
        assert {id(p) for p in params} == {id(p) for p in encoder.encoders[stage].parameters()}
        assert all(not p.requires_grad for p in lora_parameters(model.unet))
    model.train()
    assert [e.training for e in encoder.encoders] == [False, False, True]


def test_full_finetune_trains_the_unet():
    model, _ = _model(finetune="full")
    params = model.configure_trainable("full", range(3))
    unet = count_parameters(list(model.unet.parameters()))
    assert count_parameters(params) == unet + count_parameters(list(model.taxonomy_encoder.parameters()))
    with pytest.raises(ValueError, match="no LoRA adapter"):
        model.configure_trainable("lora", [0])


def test_forward_and_gradients_reach_only_trainable():
    model, denoiser = _model()
    params = _trains(model, 1)
    # Make LoRA non-zero so that a leak of gradient into it would show.
    for p in lora_parameters(model.unet):
        p.data.normal_()
    x = torch.randn(2, 3, 16, 16)
    out = model(x, torch.tensor([10, 500]), torch.randn(2, 3, 4, 16), 2)
    assert out.shape == x.shape
    out.pow(2).mean().backward()
    assert all(p.grad is not None for p in params)
    others = [p for p in model.parameters() if all(p is not q for q in params)]
    assert all(p.grad is None for p in others)
    assert denoiser.noise_scheduler.config.beta_schedule == "squaredcos_cap_v2"


def test_latent_model_uses_the_base_scheduler(tiny_sd):
    denoiser = build_denoiser(ModelConfig(base=str(tiny_sd), resolution=16))
    assert denoiser.vae is not None and not any(p.requires_grad for p in denoiser.vae.parameters())
    assert denoiser.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert denoiser.unet.config.cross_attention_dim == 32


def test_bad_model_config(tmp_path):
    with pytest.raises(ValueError, match="finetune"):
        ModelConfig(finetune="half")
    with pytest.raises(FileNotFoundError, match="not a Stable Diffusion folder"):
        build_denoiser(ModelConfig(base=str(tmp_path)))
    with pytest.raises(ValueError, match="divisible"):
        TinyUNetConfig(block_out_channels=(30, 60), down_block_types=("a", "b"), up_block_types=("a", "b"))


def test_a_fused_lora_predicts_the_same_and_unfuses_bit_for_bit():
    model, _ = _model()
    model.eval()  # the rank encoders' dropout off
    for p in lora_parameters(model.unet):
        p.data.normal_(std=0.1)  # a trained-looking adapter: B is zero at init
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    x, t, features = torch.randn(2, 3, 16, 16), torch.tensor([10, 500]), torch.randn(2, 3, 4, 16)
    with torch.no_grad():
        plain = model(x, t, features, 2)
        adapted = fuse_lora(model.unet)
        assert lora_fused(model.unet) and adapted and all(".base_layer." in k for k in adapted)
        assert any(not torch.equal(before[k], model.unet.state_dict()[k]) for k in adapted)  # merged into W
        torch.testing.assert_close(model(x, t, features, 2), plain, rtol=1e-4, atol=1e-5)
        unfuse_lora(model.unet, adapted)
        after = model.unet.state_dict()
        assert not lora_fused(model.unet) and all(torch.equal(before[k], after[k]) for k in before)
        assert torch.equal(model(x, t, features, 2), plain)
