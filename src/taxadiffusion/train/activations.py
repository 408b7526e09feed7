"""How much memory a training step's activations take, counted without running it.

The plan states the memory each process needs. Weights, gradients and optimizer moments follow from parameter
counts; activations depend on the UNet's layout, the batch and the resolution. They are counted here by running
the UNet's forward once on the meta device (shapes only: no weights, no memory, under a second for SD 1.5) and
adding up every tensor autograd saves for the backward pass (`torch.autograd.graph.saved_tensors_hooks`).

Weights that autograd keeps for the backward pass are left out: the plan counts them with the weights.

Checked against steps measured on an H100 (benchmarks/results/speed_sd15*.md: SD 1.5 at 512 px, batch 8, LoRA,
latent cache). In fp32 the count is 12.9 GB; the step's peak less its fp32 weights and the rank encoder's
optimizer state was about 13.3 GB. In bf16 autocast the peak so reduced was about 11.2 GB: autocast keeps the
normalisations in fp32 and saves a cast copy for each matrix product, so it saves 0.87 of the fp32 count, the
ratio used here. The figure is an estimate to within about a fifth: enough to tell which cards a preset fits,
not to fill one to the last gigabyte.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..model import conditioning_width

# bf16 / fp16 autocast against the fp32 count: about 11.2 against 12.9 GB on SD 1.5 at batch 8 (the module's doc)
AUTOCAST_RATIO = 0.87
# GPU memory sizes users plan with (GB as cards are sold): 16 (V100, T4), 24 (A10, L4, RTX 4090), 40 (A100 40GB),
# 48 (A6000, L40S), 80 (A100 80GB, H100), 141 (H200)
CARDS_GB = (16, 24, 40, 48, 80, 141)
# What a process holds beyond what is counted: the CUDA context, kernels' workspace, the allocator's fragmentation
OVERHEAD = 1.5 * 2**30


class _FusedAttention(torch.autograd.Function):
    """Stands in for `scaled_dot_product_attention` while counting: on the meta device torch would take its
    unfused path and count the B x heads x N x N attention matrix, which the fused kernels of a GPU never store.
    What they save: q, k, v, the output and one float per query row."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the count stops at the forward
        q, k, v, *_ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


class _FusedAttentionMode(TorchFunctionMode):
    """Routes `scaled_dot_product_attention` to `_FusedAttention` for the count. A torch function mode is local
    to the thread that enters it, so other threads' attention (an app serving images) is left alone, which a
    swap of the module's function would not do."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return _FusedAttention.apply(*args[:3])
        return func(*args, **(kwargs or {}))


def activation_bytes(
    unet,
    batch: int,
    latent_shape: tuple[int, int, int],
    text_tokens: int,
    trains: str | None,
    lora_targets: tuple[str, ...] = (),
    mixed_precision: str = "no",
    checkpointing: bool = False,
) -> int:
    """Bytes autograd saves in one forward of `unet`'s layout (its config; a meta copy is built) at `batch` on
    latents of `latent_shape` with `text_tokens` condition tokens. `trains`: "full" (every weight), "lora" (the
    LoRA's `lora_targets`, counted as the weights they adapt) or None (a frozen UNet; the condition still takes
    gradients, as the rank encoders train)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        meta = type(unet).from_config(unet.config)
    for name, parameter in meta.named_parameters():
        wanted = trains == "full" or (trains == "lora" and any(f".{t}." in f".{name}" for t in lora_targets))
        parameter.requires_grad_(wanted)
    if checkpointing:
        meta.enable_gradient_checkpointing()
    meta.train()
    saved: dict[int, tuple[torch.Tensor, int]] = {}

    weights = {id(parameter) for parameter in meta.parameters()}  # saved too, but counted with the weights

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor._base if tensor._base is not None else tensor  # a view shares its base's memory
        if id(base) not in weights:
            saved[id(base)] = (base, base.numel() * base.element_size())  # held: no other tensor takes its id
        return tensor

    sample = torch.empty(batch, *latent_shape, device="meta")
    # the width the UNet reads: the text width where it projects text features itself (a prior), as `train` feeds it
    condition = torch.empty(batch, text_tokens, conditioning_width(unet), device="meta", requires_grad=True)
    timesteps = torch.zeros(batch, dtype=torch.long, device="meta")
    with _FusedAttentionMode(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        meta(sample, timesteps, condition)
    total = sum(size for _, size in saved.values())
    return int(total * AUTOCAST_RATIO) if mixed_precision != "no" else total


def cards_that_fit(bytes_needed: int) -> list[int]:
    """The card sizes (GB as sold) that hold `bytes_needed` plus a process's overhead."""
    return [gb for gb in CARDS_GB if bytes_needed + OVERHEAD <= gb * 1e9]
