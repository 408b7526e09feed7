"""One taxon's scores at one rank, kept on disk: the stage between its images and a rank's metrics.

A taxon's file holds what every metric needs from it, as numbers: the Inception features of its real and generated
images, each generated image's LPIPS distance to its paired real image, its BioCLIP score, and the classifier's
predictions with the taxon's true ids. A rank's metrics are computed from these files alone. So an evaluation holds
one taxon's images at a time (9.8 MiB an image at 512 px: 950 GiB for iNat21's species rank held whole); a killed
evaluation rescores only the taxa with no file; and processes share the taxa, each file the same whoever wrote it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_file
from ..saved_files import save_safetensors
from .classifier import to_unit
from .fid import FeatureMoments, kid_subsets, streamed_frechet_distance, subset_kid


@dataclass
class TaxonScores:
    """Per image: `real_features` (n_real, 2048) and `fake_features` (n_fake, 2048); `lpips` (n_fake,): image i
    against real image i mod n_real; `bioclip` (n_fake,); `predicted` (n_fake, R) and `real_predicted` (n_real, R)
    taxon ids; `truth` (R,): the taxon's ids in the classifier's taxonomy (-1 where unknown)."""

    real_features: torch.Tensor
    fake_features: torch.Tensor
    lpips: torch.Tensor
    bioclip: torch.Tensor | None = None
    predicted: torch.Tensor | None = None
    real_predicted: torch.Tensor | None = None
    truth: torch.Tensor | None = None

    @property
    def empty(self) -> bool:
        """No generated image (a one-text model with no species under the taxon): left out of the metrics."""
        return len(self.fake_features) == 0

    def save(self, path: Path) -> None:
        tensors = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)

    @classmethod
    def load(cls, path: Path) -> TaxonScores:
        from safetensors.torch import load_file

        return cls(**load_file(path))

    @staticmethod
    def counts(path: Path) -> tuple[int, int]:
        """(real, generated) images of a saved taxon, from the file's header alone."""
        from safetensors import safe_open

        with safe_open(path, "pt") as handle:
            return tuple(handle.get_slice(f"{kind}_features").get_shape()[0] for kind in ("real", "fake"))

    @classmethod
    def nothing(cls) -> TaxonScores:
        return cls(torch.zeros(0, 2048), torch.zeros(0, 2048), torch.zeros(0))


@dataclass
class Scorers:
    """The networks that score images, on one device."""

    features: nn.Module  # uint8 (B, 3, H, W) -> (B, 2048)
    lpips: nn.Module
    classifier: nn.Module | None = None
    bioclip: object | None = None  # BioCLIPScorer

    def to(self, device: torch.device | str) -> Scorers:
        for network in (self.features, self.lpips, self.classifier):
            if network is not None:
                network.to(device)
        return self


def uint8_batch(images: Sequence[np.ndarray], size: int | None = None) -> torch.Tensor:
    """(B, 3, H, W) uint8 of (H, W, 3) arrays, resized to `size` x `size` (bicubic, antialiased) when given."""
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    if size is None or batch.shape[-2:] == (size, size):
        return batch
    resized = torch.nn.functional.interpolate(batch.float(), size=(size, size), mode="bicubic", antialias=True)
    return resized.round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def score_taxon(
    scorers: Scorers,
    real: Sequence[np.ndarray],
    fake: Sequence[np.ndarray],
    metric_size: int | None,
    truth: torch.Tensor | None = None,
    bioclip_text: str | None = None,
) -> TaxonScores:
    """Every number the metrics need from one taxon's real and generated images ((H, W, 3) uint8 arrays)."""
    if not fake:
        return TaxonScores.nothing()
    device = next(scorers.lpips.parameters()).device
    real_batch, fake_batch = uint8_batch(real, metric_size), uint8_batch(fake, metric_size)
    paired = real_batch[torch.arange(len(fake)) % len(real)]  # generated image i against real image i mod n
    distances = scorers.lpips(*(b.to(device).float() / 127.5 - 1 for b in (fake_batch, paired))).reshape(-1)
    scores = TaxonScores(
        scorers.features(real_batch.to(device)).cpu(), scorers.features(fake_batch.to(device)).cpu(), distances.cpu()
    )
    if scorers.bioclip is not None:
        scores.bioclip = scorers.bioclip.score(fake_batch, [bioclip_text] * len(fake)).float().cpu()
    if scorers.classifier is not None:
        scores.predicted = scorers.classifier.predict(to_unit(np.stack(fake)))
        scores.real_predicted = scorers.classifier.predict(to_unit(np.stack(real)))
        scores.truth = truth
    return scores


def group_metrics(files: Sequence[Path], ranks: Sequence[str], kid_subset: int = 50, seed: int = 0) -> dict:
    """A group of taxa's metrics from their score files, in the order given: FID and KID over all their images,
    LPIPS averaged per taxon then over taxa, BioCLIP over images, and top-1 accuracy at each of `ranks` (the
    classifier's ranks down to the evaluated one) for generated and real images.

    Streamed: one taxon's file is read at a time, into FID's running moments, the rows of KID's subsets (drawn
    before any is read), and sums. Memory does not grow with the taxa (iNat21's species rank held whole: 4.9 GB)."""
    counts = [TaxonScores.counts(path) for path in files]
    n_real, n_fake = sum(c[0] for c in counts), sum(c[1] for c in counts)
    subsets = kid_subsets(n_real, n_fake, kid_subset, seed)
    wanted = [set(torch.cat([pair[side] for pair in subsets]).tolist()) if subsets else set() for side in (0, 1)]
    moments, rows = (FeatureMoments(), FeatureMoments()), ({}, {})
    lpips, bioclip, correct = [], [], {"accuracy": None, "real_accuracy": None}
    offsets = [0, 0]
    for path in files:
        scores = TaxonScores.load(path)
        for side, features in enumerate((scores.real_features, scores.fake_features)):
            moments[side].add(features)
            for row in range(len(features)):
                if offsets[side] + row in wanted[side]:
                    rows[side][offsets[side] + row] = features[row]
            offsets[side] += len(features)
        lpips.append(float(scores.lpips.double().mean()))
        if scores.bioclip is not None:
            bioclip.append(scores.bioclip.double())
        if scores.predicted is not None:
            for kind, predicted in (("accuracy", scores.predicted), ("real_accuracy", scores.real_predicted)):
                truth = scores.truth.expand(len(predicted), -1)
                known = truth >= 0
                tally = torch.stack([((predicted == truth) & known).sum(0), known.sum(0)])
                correct[kind] = tally if correct[kind] is None else correct[kind] + tally
    result = {"taxa": len(files), "fid": streamed_frechet_distance(*moments), "n_real": n_real, "n_fake": n_fake}
    result.update(subset_kid(*rows, subsets) if subsets else {})
    result["lpips"] = float(np.mean(lpips))
    if bioclip:
        result["bioclip"] = float(torch.cat(bioclip).mean())
    for kind, tally in correct.items():
        if tally is not None:  # accuracy_by_rank's numbers: top-1 over the images labelled at each rank
            by_rank = [float(c) / float(n) if n else None for c, n in tally.T.tolist()]
            result[kind] = {rank: accuracy for rank, accuracy in zip(ranks, by_rank, strict=False)}
    return result
