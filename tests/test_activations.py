"""The plan's activation memory: what autograd saves in one forward, counted on the meta device."""

import threading

import pytest
import torch
import torch.nn.functional as F

from taxadiffusion.model import LORA_TARGETS, conditioning_width
from taxadiffusion.train.activations import (
    AUTOCAST_RATIO,
    OVERHEAD,
    _FusedAttentionMode,
    activation_bytes,
    cards_that_fit,
)
from tiny_models import tiny_unet


def saved_on_real_tensors(unet, batch: int, tokens: int) -> int:
    """The same count on a real forward on the CPU: the meta device must see what a real step saves."""
    saved, weights = {}, {id(parameter) for parameter in unet.parameters()}

    def pack(tensor):
        base = tensor._base if tensor._base is not None else tensor
        if id(base) not in weights:  # the weights autograd keeps are counted as weights
            saved[id(base)] = (base, base.numel() * base.element_size())  # the tensor kept: its id stays its own
        return tensor

    unet.requires_grad_(True).train()
    sample = torch.randn(batch, unet.config.in_channels, 8, 8)
    condition = torch.randn(batch, tokens, conditioning_width(unet), requires_grad=True)
    with _FusedAttentionMode(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        unet(sample, torch.zeros(batch, dtype=torch.long), condition)
    return sum(size for _, size in saved.values())


@pytest.mark.parametrize("projects", [False, True], ids=["cross-attention width", "projects text features"])
def test_the_meta_count_is_what_a_real_forward_saves(projects):
    unet = tiny_unet(encoder_hid_dim=48 if projects else None)  # a prior projects its text features itself
    counted = activation_bytes(unet, 3, (4, 8, 8), 5, "full")
    assert counted == saved_on_real_tensors(unet, 3, 5)


def test_the_count_leaves_other_threads_attention_alone():
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    expected = F.scaled_dot_product_attention(q, q, q)
    seen = {}
    with _FusedAttentionMode():  # while one thread counts, another (an app serving images) attends for real
        counted = F.scaled_dot_product_attention(q, q, q)
        worker = threading.Thread(target=lambda: seen.update(out=F.scaled_dot_product_attention(q, q, q)))
        worker.start()
        worker.join()
    assert counted.grad_fn is not None and "FusedAttention" in type(counted.grad_fn).__name__
    assert torch.equal(seen["out"], expected)
    assert torch.equal(F.scaled_dot_product_attention(q, q, q), expected)  # and nothing is left swapped after


def test_activations_grow_with_the_batch_and_shrink_with_what_trains():
    unet = tiny_unet()
    full = activation_bytes(unet, 2, (4, 8, 8), 5, "full")
    assert activation_bytes(unet, 4, (4, 8, 8), 5, "full") == pytest.approx(2 * full, rel=0.02)
    lora = activation_bytes(unet, 2, (4, 8, 8), 5, "lora", LORA_TARGETS)
    frozen = activation_bytes(unet, 2, (4, 8, 8), 5, None)
    assert frozen < lora <= full and frozen > 0  # the condition takes gradients even through a frozen UNet
    assert activation_bytes(unet, 2, (4, 8, 8), 5, "full", checkpointing=True) < full
    assert activation_bytes(unet, 2, (4, 8, 8), 5, "full", mixed_precision="bf16") == int(full * AUTOCAST_RATIO)


def test_cards_that_fit_leave_room_for_the_process():
    assert cards_that_fit(int(20e9)) == [24, 40, 48, 80, 141]
    assert cards_that_fit(int(24e9 - OVERHEAD) + 1) == [40, 48, 80, 141]
    assert cards_that_fit(int(200e9)) == []
