"""The list of training stages, derived from the config (no hand-edited file per stage).

Published schedule (TaxaDiffusion, sec. 3.3): one stage per rank, coarse to fine. Stage 0 trains the
UNet's LoRA and the rank-0 encoder with the lineage cut at rank 0; stage k >= 1 trains encoder k only,
conditioning on ranks 0..k, with everything else frozen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ConfigError, TrainConfig
from ..model import ModelConfig
from ..taxonomy import Rank


@dataclass(frozen=True)
class Stage:
    index: int
    name: str
    steps: int
    learning_rate: float
    unet: str | None  # "lora", "full", or None (frozen)
    encoder_levels: tuple[int, ...]  # rank encoders that train
    depth: int | None  # ranks conditioned on; None: a random depth per batch (the `random` ablation)

    def describe(self) -> str:
        trains = [f"UNet ({self.unet})"] if self.unet else []
        trains += [f"encoder {lv}" for lv in self.encoder_levels]
        depth = "random depth per batch" if self.depth is None else f"depth {self.depth}"
        return (
            f"stage {self.index} [{self.name}]: {self.steps} steps at lr {self.learning_rate:g}, {depth}; "
            f"trains {', '.join(trains)}"
        )


def per_stage(value, n_ranks: int, key: str) -> list:
    """A per-stage setting given as one value for every stage or as a list of one per rank."""
    if not isinstance(value, list):
        return [value] * n_ranks
    if len(value) != n_ranks:
        raise ConfigError(f"{key} lists {len(value)} stages but the dataset has {n_ranks} ranks")
    return list(value)


def steps_per_stage(train: TrainConfig, n_ranks: int, images: int = 0, images_per_step: int = 1) -> list[int]:
    """Optimizer steps per rank: `train.steps`, or `train.epochs` over `images` training images at
    `images_per_step` (the global batch)."""
    if train.epochs is None:
        return per_stage(train.steps, n_ranks, "train.steps")
    if images < 1:
        raise ConfigError("train.epochs needs the number of training images")
    return [math.ceil(e * images / images_per_step) for e in per_stage(train.epochs, n_ranks, "train.epochs")]


def plan_stages(
    train: TrainConfig,
    model: ModelConfig,
    dataset_ranks: tuple[Rank, ...],
    images: int = 0,
    images_per_step: int = 1,
) -> list[Stage]:
    """The stages of a run. One-stage strategies get the progressive schedule's total step budget."""
    n = len(dataset_ranks)
    steps = steps_per_stage(train, n, images, images_per_step)
    rates = train.stage_learning_rates
    if rates is not None and len(rates) != (n if train.strategy == "progressive" else 1):
        raise ConfigError(f"train.stage_learning_rates needs one rate per stage, got {len(rates)}")

    def rate(index: int) -> float:
        return float(rates[index]) if rates else train.learning_rate

    if train.strategy == "progressive":
        return [
            Stage(
                index=k,
                name=f"{k}-{rank.value}",
                steps=steps[k],
                learning_rate=rate(k),
                unet=model.finetune if (k == 0 or train.unet_stages == "all") else None,
                encoder_levels=(k,),
                depth=k + 1,
            )
            for k, rank in enumerate(dataset_ranks)
        ]
    total = sum(steps)
    if train.strategy in ("all", "random"):
        levels = tuple(range(n))
        depth = n if train.strategy == "all" else None
        return [Stage(0, train.strategy, total, rate(0), model.finetune, levels, depth)]
    if train.strategy == "prior":  # pretraining: the whole UNet on captions through the text path alone
        return [Stage(0, "prior", total, rate(0), "full", (), 1)]
    # flat / full: the species name as one text (the SD + LoRA and SD + full fine-tuning baselines)
    unet = "full" if train.strategy == "full" else model.finetune
    return [Stage(0, train.strategy, total, rate(0), unet, (0,), 1)]
