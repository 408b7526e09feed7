"""A small taxonomic classifier (one head per rank) to score generated images by per-rank accuracy.

Trained on the real training images (minutes on CPU at 32-64 px). On the synthetic taxonomy it trains
on fresh renders and serves as an oracle.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..atomic import write_text_atomic
from ..errors import InputError, TaxaDiffusionError
from ..saved_files import refuse_nonempty, share_safetensors
from ..taxonomy import Taxonomy
from .settings import ClassifierTraining, GeneratedRecipe

if TYPE_CHECKING:
    from ..data.synthetic import SyntheticConfig


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class TaxonClassifier(ModelMixin, ConfigMixin):
    """Images in [-1, 1] (B, 3, S, S) -> per-rank logits; the taxonomy travels in the config."""

    @register_to_config
    def __init__(self, taxonomy: dict, resolution: int = 32, width: int = 32):
        super().__init__()
        self.taxonomy = Taxonomy.from_dict(taxonomy)
        self.trunk = nn.Sequential(_block(3, width), _block(width, 2 * width), _block(2 * width, 4 * width))
        self.heads = nn.ModuleList(nn.Linear(4 * width, self.taxonomy.num_taxa(r)) for r in self.taxonomy.ranks)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.shape[-1] != self.config.resolution:
            images = F.interpolate(images, size=self.config.resolution, mode="bilinear", align_corners=False)
        pooled = self.trunk(images).mean(dim=(2, 3))
        return [head(pooled) for head in self.heads]

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """(B, R) predicted taxon ids."""
        self.eval()
        out = []
        for start in range(0, len(images), batch_size):
            logits = self(images[start : start + batch_size].to(self.device))
            out.append(torch.stack([lg.argmax(-1) for lg in logits], dim=1).cpu())
        return torch.cat(out)


def to_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) or (B, 3, H, W) -> float (B, 3, H, W) in [-1, 1]."""
    x = torch.as_tensor(images)
    if x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    return x.float() / 127.5 - 1.0


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and small shifts (pose variation), nothing that changes colour."""
    flip = torch.rand(len(x), generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    pad = max(1, x.shape[-1] // 16)
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return padded[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]


def train_classifier(
    taxonomy: Taxonomy,
    batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]],
    steps: int,
    resolution: int = 32,
    width: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
    model: TaxonClassifier | None = None,
) -> TaxonClassifier:
    """Train on `(images in [-1, 1], taxon ids (B, R), -1 = unlabelled)` batches with a cosine schedule; a batch
    may carry a third item, each image's loss weight (B,). `model`: continue training this one (fine-tuning)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = model if model is not None else TaxonClassifier(taxonomy.to_dict(), resolution, width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    step = 0
    with tqdm(total=steps, desc="training classifier", disable=not progress) as bar:
        while step < steps:
            before = step
            for images, ids, *weights in batches():
                logits = model(augment(images, generator))
                loss = _loss(logits, ids, weights[0] if weights else None)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if step >= steps:
                    break
            if step == before:  # an epoch without a batch would loop for ever
                raise InputError("the classifier has no training images")
    return model.eval()


def _loss(logits: list[torch.Tensor], ids: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy summed over ranks, each averaged over the images labelled at that rank, weighted per image
    when the batch says so (without weights: exactly PyTorch's mean, as the classifier always trained)."""
    if weights is None:
        return sum(F.cross_entropy(lg, ids[:, r], ignore_index=-1) for r, lg in enumerate(logits))
    total = 0.0
    for r, lg in enumerate(logits):
        labelled = (ids[:, r] >= 0).float() * weights
        each = F.cross_entropy(lg, ids[:, r].clamp_min(0), reduction="none")
        total = total + (each * labelled).sum() / labelled.sum().clamp_min(1e-12)
    return total


def mixed_batches(
    real: tuple[np.ndarray, torch.Tensor],
    generated: tuple[np.ndarray, torch.Tensor],
    batch_size: int,
    seed: int,
    recipe: GeneratedRecipe,
):
    """A factory of epochs over real and generated images, with each image's loss weight (real 1, generated
    `recipe.generated_weight`). Without `generated_probability` the two form one shuffled pool; with it, each
    batch position is a generated image with that probability, each source drawn from its own shuffled stream.
    An epoch is as many batches as the real images fill."""
    ids = torch.cat([real[1], generated[1]])
    n_real, n_generated = len(real[1]), len(generated[1])
    weights = torch.cat([torch.ones(n_real), torch.full((n_generated,), float(recipe.generated_weight))])
    generator = torch.Generator().manual_seed(seed)
    p = recipe.generated_probability

    def stream(offset: int, n: int) -> Iterator[int]:
        while True:
            yield from (offset + torch.randperm(n, generator=generator)).tolist()

    def epoch():
        if p is None:
            order = torch.randperm(len(ids), generator=generator)
            batches = [order[k : k + batch_size] for k in full_batches(len(order), batch_size)]
        else:
            reals, fakes = stream(0, n_real), stream(n_real, n_generated) if n_generated else None
            batches = []
            for _ in range(max(1, n_real // batch_size)):
                fake = (torch.rand(batch_size, generator=generator) < p).tolist() if fakes else [False] * batch_size
                batches.append(torch.tensor([next(fakes) if f else next(reals) for f in fake]))
        for index in batches:
            fake = index >= n_real  # rows of the two pools, in the batch's order
            _, height, width, channels = real[0].shape
            x = torch.empty(len(index), channels, height, width)
            if (~fake).any():
                x[~fake] = unit_batch(real[0], index[~fake])
            if fake.any():
                x[fake] = unit_batch(generated[0], index[fake] - n_real)
            yield x, ids[index], weights[index]

    return epoch


def accuracy_by_rank(predicted: torch.Tensor, truth: torch.Tensor) -> list[float | None]:
    """Top-1 accuracy per rank over the samples labelled at that rank (None where none is)."""
    out = []
    for rank in range(truth.shape[1]):
        known = truth[:, rank] >= 0
        out.append(float((predicted[known, rank] == truth[known, rank]).float().mean()) if known.any() else None)
    return out


def synthetic_pool(synth, per_species: int, resolution: int, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """Fresh renders of every species of a synthetic taxonomy (uint8 (N, S, S, 3), ids (N, R))."""
    rng = np.random.default_rng(seed)
    images, ids = [], []
    for species in synth.species:
        labels = synth.taxonomy.ids(species.lineage)
        for _ in range(per_species):
            images.append(synth.render(species, rng, resolution))
            ids.append(labels)
    return np.stack(images), torch.tensor(ids)


class RecordImages(torch.utils.data.Dataset):
    """A record's image as the classifier reads it: a centre crop at `resolution`, inside its box where it has one."""

    def __init__(self, records, resolution: int, crop: str):
        self.records, self.resolution, self.crop = records, resolution, crop

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> np.ndarray:
        from ..data.images import crop_to_box, load_image, prepare_image

        record = self.records[index]
        image = crop_to_box(load_image(record.image), record.box)
        # a copy: a view of the PIL image is read-only, which the DataLoader's collate warns about on every batch
        return np.array(prepare_image(image, self.resolution, self.crop, None))


def record_pool(
    records, taxonomy: Taxonomy, resolution: int, crop: str = "random_crop", workers: int | None = None
) -> tuple[np.ndarray, torch.Tensor]:
    """Real images of `records` at `resolution` with their per-rank ids (-1 = unlabelled). The images are decoded
    once, by DataLoader workers, into a memory-mapped file that is deleted when closed: training reads a batch at a
    time from the page cache, so memory holds a batch, not the set (iNat21 at 32 px: 8.3 GB on disk, where
    stacking it took 8.3 GB of memory plus 33 GB for its float copy)."""
    import tempfile

    ids = np.full((len(records), len(taxonomy.ranks)), -1, dtype=np.int64)
    for row, record in enumerate(records):
        known = taxonomy.ids(record.lineage)
        ids[row, : len(known)] = known
    ids = torch.from_numpy(ids)
    shape = (len(records), resolution, resolution, 3)
    if not records:
        return np.zeros(shape, np.uint8), ids
    with tempfile.TemporaryFile() as file:  # the map outlives the file object; the file has no name to leave behind
        images = np.memmap(file, np.uint8, "w+", shape=shape)
    if workers is None:  # starting workers costs about a second: only worth it for a large set
        workers = 0 if len(records) < 4096 else min(8, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(RecordImages(records, resolution, crop), batch_size=256, num_workers=workers)
    start = 0
    for batch in loader:
        images[start : start + len(batch)] = batch.numpy()
        start += len(batch)
    return images, ids


def unit_batch(images: np.ndarray, index: torch.Tensor) -> torch.Tensor:
    """Rows of a uint8 pool (in memory or memory-mapped) as the classifier's float input."""
    return to_unit(np.ascontiguousarray(images[index.numpy()]))


def full_batches(n: int, batch_size: int) -> range:
    """The starts of an epoch's batches over `n` shuffled images: full batches only (the last partial one is
    dropped), or one batch of them all when they fill none."""
    return range(0, max(n - batch_size + 1, min(n, 1)), batch_size)


def pool_batches(images: np.ndarray, ids: torch.Tensor, batch_size: int, seed: int):
    """A factory of shuffled epochs over a pool (what `train_classifier` consumes), converted a batch at a time."""
    generator = torch.Generator().manual_seed(seed)

    def epoch():
        order = torch.randperm(len(images), generator=generator)
        for start in full_batches(len(order), batch_size):
            index = order[start : start + batch_size]
            yield unit_batch(images, index), ids[index]

    return epoch


def predict_pool(model: TaxonClassifier, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """(N, R) predicted ids of a pool, converted a batch at a time."""
    index = torch.arange(len(images))
    return torch.cat(
        [model.predict(unit_batch(images, index[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    )


@dataclass
class ClassifierRun:
    """A trained classifier and its top-1 accuracy per rank on images it never saw."""

    model: TaxonClassifier
    held_out_images: int
    accuracy: dict[str, float | None]

    def describe(self) -> str:
        lines = [f"held-out top-1 accuracy ({self.held_out_images} images):"]
        lines += [f"  {r:<17} {a:.1%}" if a is not None else f"  {r:<17} –" for r, a in self.accuracy.items()]
        return "\n".join(lines)

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """The model folder plus `heldout_accuracy.json`; a non-empty folder needs `overwrite`."""
        out = refuse_nonempty(out, overwrite)
        self.model.save_pretrained(out)
        share_safetensors(out)
        report = {"held_out_images": self.held_out_images, "accuracy": self.accuracy}
        write_text_atomic(out / "heldout_accuracy.json", json.dumps(report, indent=1))  # the finished-run marker
        return out


def train_on_records(records, holdout: float = 0.1, training: ClassifierTraining | None = None) -> ClassifierRun:
    """The taxonomic classifier of a dataset: trained on all but a stratified `holdout` of each taxon's images,
    and scored on that held-out part."""
    from ..data.records import split_records

    training = training or ClassifierTraining()
    taxonomy = records.taxonomy()
    train_records, held_records = split_records(records.records, holdout, seed=0)
    images, ids = record_pool(train_records, taxonomy, training.resolution)
    held_images, held_ids = record_pool(held_records, taxonomy, training.resolution)
    return _fit(taxonomy, images, ids, held_images, held_ids, training)


def train_with_generated(
    records,
    generated,
    holdout: float = 0.1,
    training: ClassifierTraining | None = None,
    recipe: GeneratedRecipe | None = None,
) -> ClassifierRun:
    """The classifier of a real dataset with generated images in its training set (`generate`'s output read as
    records), scored on the real held-out part only. `recipe`: their weight, draw probability and pretraining.
    Generated images of taxa the real set does not have are left out, and counted."""
    from ..data.records import split_records

    training, recipe = training or ClassifierTraining(), recipe or GeneratedRecipe()
    taxonomy = records.taxonomy()
    known = [r for r in generated.records if _labelled_in(taxonomy, r.lineage)]
    if len(known) < len(generated.records):
        print(f"taxadiffusion: {len(generated.records) - len(known)} generated images of taxa the real set lacks")
    train_records, held_records = split_records(records.records, holdout, seed=0)
    real = record_pool(train_records, taxonomy, training.resolution)
    fake = record_pool(known, taxonomy, training.resolution) if known else (real[0][:0], real[1][:0])
    held_images, held_ids = record_pool(held_records, taxonomy, training.resolution)
    model = fit_with_generated(taxonomy, real, fake, training, recipe)
    accuracy = accuracy_by_rank(predict_pool(model, held_images), held_ids)
    by_rank = {r.value: a for r, a in zip(taxonomy.ranks, accuracy, strict=True)}
    return ClassifierRun(model, len(held_ids), by_rank)


def fit_with_generated(
    taxonomy: Taxonomy,
    real: tuple[np.ndarray, torch.Tensor],
    generated: tuple[np.ndarray, torch.Tensor],
    training: ClassifierTraining,
    recipe: GeneratedRecipe,
    seed: int = 0,
) -> TaxonClassifier:
    """A classifier trained on real and generated pools by `recipe`: first `pretrain_steps` on the generated images
    alone, then `training.steps` on both, mixed by `mixed_batches` (weights and draw probability)."""
    t, model = training, None
    if recipe.pretrain_steps and len(generated[1]):
        pretrain = pool_batches(*generated, t.batch_size, seed=seed + 1)
        model = train_classifier(
            taxonomy, pretrain, recipe.pretrain_steps, t.resolution, t.width, seed=seed, progress=t.progress
        )
        model.train()
    batches = mixed_batches(real, generated, t.batch_size, seed, recipe)
    return train_classifier(
        taxonomy, batches, t.steps, t.resolution, t.width, seed=seed, progress=t.progress, model=model
    )


def _labelled_in(taxonomy: Taxonomy, lineage) -> bool:
    try:
        taxonomy.ids(lineage)
    except TaxaDiffusionError:  # other ranks, or a taxon the real set does not have
        return False
    return True


def train_synthetic_oracle(
    synthetic: SyntheticConfig, per_species: int = 120, training: ClassifierTraining | None = None
) -> ClassifierRun:
    """An oracle for a synthetic taxonomy (the embedded default's, or a prior's): trained on fresh renders, scored
    on other fresh ones."""
    from ..data.synthetic import SyntheticTaxonomy

    training = training or ClassifierTraining()
    synth = SyntheticTaxonomy(synthetic)
    images, ids = synthetic_pool(synth, per_species, training.resolution, seed=1)
    held_images, held_ids = synthetic_pool(synth, 20, training.resolution, seed=2)  # fresh, never trained on
    return _fit(synth.taxonomy, images, ids, held_images, held_ids, training)


def _fit(taxonomy, images, ids, held_images, held_ids, training: ClassifierTraining) -> ClassifierRun:
    batches = pool_batches(images, ids, training.batch_size, seed=0)
    t = training
    model = train_classifier(taxonomy, batches, t.steps, t.resolution, t.width, progress=t.progress)
    accuracy = accuracy_by_rank(predict_pool(model, held_images), held_ids)
    by_rank = {r.value: a for r, a in zip(taxonomy.ranks, accuracy, strict=True)}
    return ClassifierRun(model, len(held_ids), by_rank)
