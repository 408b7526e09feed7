"""The training switches that make the same step faster: frozen weights in low precision under mixed precision
(saved unrounded), text-feature tables in CPU memory or half precision, torch.compile, channels-last, fused
AdamW. Their speed is measured in benchmarks/speed.py; here, what each one does to the model and the saved files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from taxadiffusion.config import Config, ConfigError
from taxadiffusion.model import lora_parameters
from taxadiffusion.text import TextEmbeddingCache
from taxadiffusion.train.plan import fused_adamw
from taxadiffusion.train.stages import Stage
from taxadiffusion.train.trainer import Trainer, build_optimizer
from tiny_models import TINY_MODEL, write_two_rank_dataset


@pytest.fixture(scope="module")
def two_rank_data(tmp_path_factory):
    return write_two_rank_dataset(tmp_path_factory.mktemp("two-rank"))


@pytest.fixture
def mixed_precision_state():
    """accelerate keeps one process-wide state whose precision cannot change once set; a mixed-precision run in a
    test process that trained in fp32 before (and the fp32 tests after it) need it cleared (accelerate's own tests
    do the same)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _lora_config(data, base, **train):
    return Config.from_dict(
        {
            "model": {"base": str(base), "resolution": 16, "finetune": "lora", "encoder_heads": 4},
            "text": {"encoder": "base"},
            "data": {"format": "folder", "path": str(data), "crop": "squash"},
            "train": {"steps": [2, 1], "batch_size": 4, "cache_latents": False, "log_every": 1, **train},
            "sample": {"steps": 2, "grid_taxa": 1, "grid_images": 1},
        }
    )


def _tiny_config(data, text_encoder, **train):
    """The tiny pixel-space model (no pretrained base) on the two-rank data, one step per stage."""
    return Config.from_dict(
        {
            "model": TINY_MODEL,
            "text": {"encoder": str(text_encoder)},
            "data": {"format": "folder", "path": str(data), "crop": "squash"},
            "train": {"steps": [1, 1], "batch_size": 4, **train},
            "sample": {"steps": 2, "grid_taxa": 1, "grid_images": 1},
        }
    )


def test_frozen_base_in_low_precision_and_saved_unrounded(two_rank_data, tiny_sd, tmp_path, mixed_precision_state):
    trainer = Trainer(_lora_config(two_rank_data, tiny_sd, mixed_precision="bf16"), tmp_path / "run", progress=False)
    unet = trainer.model.unet
    lora = {id(p) for p in lora_parameters(unet)}
    assert lora and all(p.dtype == torch.float32 for p in lora_parameters(unet))
    assert all(p.dtype == torch.bfloat16 for p in unet.parameters() if id(p) not in lora)
    assert all(p.dtype == torch.float32 for p in trainer.model.taxonomy_encoder.parameters())
    assert trainer.vae.dtype == torch.bfloat16
    assert "frozen base weights kept in bf16" in trainer.describe()
    pipeline = trainer.run()
    # The saved base is the base's own fp32 weights, not the bf16 copy training used; the LoRA is fp32.
    for part in ("unet", "vae"):
        saved = load_file(pipeline / part / "diffusion_pytorch_model.safetensors")
        original = load_file(tiny_sd / part / "diffusion_pytorch_model.safetensors")
        assert saved.keys() == original.keys()
        assert all(saved[k].dtype == torch.float32 and torch.equal(saved[k], original[k]) for k in saved)
    lora_saved = load_file(pipeline / "pytorch_lora_weights.safetensors")
    assert lora_saved and all(v.dtype == torch.float32 for v in lora_saved.values())
    assert any(v.abs().sum() > 0 for k, v in lora_saved.items() if "lora_B" in k or "lora.up" in k)  # it trained


def test_low_precision_only_where_nothing_trains(two_rank_data, tiny_sd):
    assert _lora_config(two_rank_data, tiny_sd, mixed_precision="bf16").frozen_precision == "bf16"
    assert _lora_config(two_rank_data, tiny_sd, mixed_precision="no").frozen_precision is None
    off = _lora_config(two_rank_data, tiny_sd, mixed_precision="fp16", frozen_in_low_precision=False)
    assert off.frozen_precision is None
    full = _lora_config(two_rank_data, tiny_sd, mixed_precision="bf16", strategy="full")
    assert full.frozen_precision is None  # the whole UNet trains
    tiny = Config.from_dict({"model": TINY_MODEL, "train": {"mixed_precision": "bf16"}})
    assert tiny.frozen_precision is None  # no pretrained base: the UNet trains


def test_text_features_leave_a_gpu_they_would_fill_over_an_eighth_of():
    from taxadiffusion.train.plan import text_placement

    gib = 2**30
    assert Config().train.text_features == "auto"
    assert text_placement("auto", int(3.6 * gib), 80 * gib) == "device"  # iNat21's CLIP features on an 80 GB card
    assert text_placement("auto", int(3.6 * gib), 24 * gib) == "cpu"  # ... on a 24 GB one
    assert text_placement("auto", 10 * gib, None) == "device"  # no GPU: the device is the CPU
    assert text_placement("device", 10 * gib, 24 * gib) == "device" and text_placement("cpu", 1, 80 * gib) == "cpu"


def test_text_features_in_cpu_memory_and_half_precision(two_rank_data, tiny_sd, tmp_path):
    config = _tiny_config(two_rank_data, tiny_sd, text_features="cpu", text_features_dtype="fp16")
    trainer = Trainer(config, tmp_path / "run", progress=False)
    assert trainer.text_embeddings.table(0).dtype == torch.float16
    assert trainer.text_embeddings.table(0).device.type == "cpu"
    plan = trainer.describe()
    assert "in fp16, in CPU memory; the frozen ranks' tables up to" in plan
    stage1 = trainer.stages[1]
    trainer.model.configure_trainable(stage1.unet, stage1.encoder_levels)
    tables = trainer._frozen_tables(stage1)
    assert tables.tables[0].dtype == torch.float16
    pipeline = trainer.run()
    saved = TextEmbeddingCache.from_pretrained(pipeline / "text_embeddings")
    cached = next((tmp_path / "run" / "cache").glob("text-*"))
    fp32 = TextEmbeddingCache.from_pretrained(cached)
    assert saved.table(0).dtype == torch.float32 and torch.equal(saved.table(0), fp32.table(0))
    with pytest.raises(ConfigError, match="text_features_dtype"):
        Config.from_dict({"train": {"text_features_dtype": "int8"}})


def test_compile_and_channels_last_keep_the_state_dict(two_rank_data, tiny_sd, tmp_path):
    """Compiled in place (nn.Module.compile): the checkpoint and pipeline keys are the plain ones."""
    config = _tiny_config(two_rank_data, tiny_sd, compile=True, channels_last=True)
    trainer = Trainer(config, tmp_path / "run", progress=False)
    unet = trainer.model.unet
    assert unet._compiled_call_impl is not None
    assert not any("_orig_mod" in k for k in unet.state_dict())
    conv = unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert "compiled UNet (CPU: minutes of compiling before the first step), channels-last" in trainer.describe()
    # A resume on another machine may switch them: they change how the step runs, not what it computes.
    plain = Config.from_dict({**config.to_dict(), "train": {**config.to_dict()["train"], "compile": False}})
    assert plain.fingerprint() == config.fingerprint()


def test_the_fused_optimizer_takes_the_default_ones_steps():
    stage = Stage(0, "0", 1, 1e-3, None, (0,), 1)
    runs = {}
    for fused in (False, True):
        train = Config.from_dict({"train": {"fused_optimizer": fused, "weight_decay": 0.01}}).train
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8))]
        optimizer, _ = build_optimizer(params, {id(params[1])}, stage, train)
        assert bool(optimizer.defaults.get("fused")) is fused  # the CPU has the fused kernel
        for _ in range(3):
            for p in params:
                p.grad = torch.sin(p.detach() * 3)
            optimizer.step()
        runs[fused] = [p.detach().clone() for p in params]
    for default, fused in zip(runs[False], runs[True], strict=True):
        torch.testing.assert_close(fused, default, rtol=1e-6, atol=1e-7)
    # the plan says so only where the kernel exists (a device torch has no fused AdamW for takes the default)
    assert fused_adamw(train, {"cpu"}) and fused_adamw(train, {"cuda"}) and not fused_adamw(train, {"cpu", "hpu"})


@pytest.mark.slow
def test_compiled_training_runs(two_rank_data, tiny_sd, tmp_path):
    config = _tiny_config(two_rank_data, tiny_sd, compile=True, channels_last=True)
    assert (Trainer(config, tmp_path / "run", progress=False).run() / "model_index.json").is_file()
