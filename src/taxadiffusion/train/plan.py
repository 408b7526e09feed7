"""The plan of a run: its data, model, stages, what trains in each, steps and checkpoints.

`plan_run(config)` computes it without loading weights or images (`taxadiffusion train --dry-run`):
metadata and folder listings are read, the UNet is built on the meta device from its config file, and
the text encoder's width comes from its config. The trainer prints the same plan from its real model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..config import Config
from ..data.readers import read_folder, read_records
from ..data.records import RecordSet, flatten_to_species, split_records
from ..data.synthetic import SyntheticTaxonomy, appearance
from ..errors import InputError
from ..model import (
    TaxaDiffusionModel,
    assemble_model,
    build_unet_skeleton,
    config_spatial_factor,
    count_parameters,
    has_lora,
    is_lora_key,
)
from ..prior import read_prior
from ..taxonomy import Rank, Taxonomy
from ..text import TextEncoderSpec
from .activations import CARDS_GB, activation_bytes, cards_that_fit
from .stages import Stage, plan_stages

# -- the run's records and text encoder ------------------------------------------------------------


def load_training_records(config: Config, data_folder: Path, render: bool = True) -> RecordSet:
    """The training records. The synthetic taxonomy is rendered into `data_folder` (or, with
    `render=False`, only listed as the records rendering would give)."""
    data = config.data
    if data.format == "synthetic":
        synthetic = SyntheticTaxonomy(data.synthetic)
        if not render:
            return synthetic.records(data_folder)
        records = read_folder(synthetic.write_folder(data_folder, progress=False))
    else:
        records = read_records(data.format, data.path, root=data.root, resolve=data.resolve_taxonomy, boxes=data.boxes)
    if data.split:
        records = records.split(data.split)
    if data.holdout:
        kept, held = split_records(records.records, data.holdout, seed=data.holdout_seed)
        note = f"{len(held)} images held out (data.holdout {data.holdout}, seed {data.holdout_seed})"
        records = RecordSet(records.ranks, kept, records.skipped, records.source, [*records.notes, note])
    if not records.records:
        raise InputError(f"no training records in {data.path or data_folder} (split {data.split!r})")
    return records


def caption_records(
    sources: list[RecordSet], captions: list, looks: list[SyntheticTaxonomy | None] | None = None
) -> RecordSet:
    """A prior's records: every image of every source with its caption as one text (in the one-rank slot the
    one-text baselines use); images not labelled down to the caption's ranks are counted. `captions`: per
    source, its `CaptionConfig`. `looks`: per source, the synthetic taxonomy that describes its images' traits
    (None for a dataset of photos)."""
    captioned = RecordSet((Rank.SPECIFIC_EPITHET,), source=" + ".join(s.source for s in sources))
    looks = looks or [None] * len(sources)
    for records, caption, look in zip(sources, captions, looks, strict=True):
        absent = [rank.value for rank in caption.ranks if rank not in records.ranks]
        if absent:
            raise InputError(
                f"caption.template names {', '.join(absent)}, which the dataset {records.source} does not have "
                f"(its ranks: {', '.join(records.ranks)})"
            )
        if caption.describes and look is None:
            raise InputError(
                f"caption.template describes each image ({{appearance}}), which only the synthetic taxonomy's "
                f"traits can; the dataset {records.source} is not synthetic"
            )
        captioned.skipped.update(records.skipped)
        for record in records:
            words = appearance(look.species_of(record.lineage).traits) if caption.describes else None
            text = caption.caption(record.lineage, words)
            if text is None:
                captioned.skip(f"not labelled down to {caption.rank} (caption)")
                continue
            captioned.add(record.image, {Rank.SPECIFIC_EPITHET: text}, record.split, record.box)
    return captioned


def run_records(config: Config, data_folder: Path, render: bool = True) -> tuple[RecordSet, tuple[Rank, ...]]:
    """The records the run trains on (flattened for the one-text baselines, captioned for a prior) and the
    dataset's ranks."""
    records = load_training_records(config, data_folder, render)
    ranks = records.ranks
    if config.train.strategy in ("flat", "full"):
        records = flatten_to_species(records)
    elif config.train.strategy == "prior":
        extra = [
            load_training_records(
                replace(config, data=replace(data, caption=None)), data_folder / f"corpus-{i}", render
            )
            for i, data in enumerate(config.corpus)
        ]
        looks = [
            SyntheticTaxonomy(d.synthetic) if d.format == "synthetic" else None for d in (config.data, *config.corpus)
        ]
        captions = [config.caption, *(data.caption or config.caption for data in config.corpus)]
        records = caption_records([records, *extra], captions, looks)
        ranks = records.ranks
    return records, ranks


def text_encoder_spec(config: Config) -> TextEncoderSpec:
    """The run's text encoder: the config's, the base's CLIP (`base`), or the one a prior was trained with."""
    encoder, max_length = config.text.encoder, config.text.max_length
    prior = read_prior(config.model.base_path) if config.model.is_latent else None
    if prior is not None:  # a prior made by `pretrain`: its own text encoder, at its resolution
        prior.check_fits(config)
        encoder, max_length = prior.text_encoder, max_length or prior.max_length
    elif encoder == "base":
        if not config.model.is_latent:
            raise InputError("text.encoder=base needs a Stable Diffusion base model (model.base)")
        return TextEncoderSpec(config.model.base_path, "text_encoder", "tokenizer", max_length)
    if (Path(encoder) / "text_encoder").is_dir():  # a Stable Diffusion folder: use its CLIP
        return TextEncoderSpec(encoder, "text_encoder", "tokenizer", max_length)
    return TextEncoderSpec(encoder, max_length=max_length)


# -- the plan --------------------------------------------------------------------------------------


@dataclass
class RunPlan:
    config: Config
    records: RecordSet
    taxonomy: Taxonomy
    stages: list[Stage]
    stage_parameters: list[int]  # what trains in each stage
    trained_parameters: int  # what any stage trains: what a checkpoint holds
    unet_parameters: int
    encoder_parameters: int
    text_width: int
    latent_shape: tuple[int, int, int]  # (channels, height, width) the UNet denoises
    num_processes: int = 1
    text_tokens: int = 77  # tokens per cached text
    device: str | None = None  # what each process trains on, once known (not in a dry run)
    fused_lora: bool = False  # the stages that leave the LoRA frozen run it merged into the UNet
    text_on_cpu: bool | None = None  # where the trainer put the text tables (None in a dry run: the config says)
    activations: int = 0  # bytes one step's forward saves for the backward pass (train/activations.py)

    @property
    def text_in_cpu_memory(self) -> bool:
        """Whether the text tables live in CPU memory (`auto` counts as the device until a GPU decides)."""
        return self.config.train.text_features == "cpu" if self.text_on_cpu is None else self.text_on_cpu

    @property
    def device_type(self) -> str | None:
        """The torch device type the description names (`cuda:0 (NVIDIA H100 ...)` -> `cuda`)."""
        return self.device.split(" ")[0].split(":")[0] if self.device else None

    @property
    def images_per_step(self) -> int:
        train = self.config.train
        return train.batch_size * self.num_processes * train.gradient_accumulation

    def epochs(self, steps: int) -> float:
        return steps * self.images_per_step / max(1, len(self.records))

    def checkpoints(self, stage: Stage) -> int:
        """Checkpoints a stage writes: every `checkpoint_every` steps, and one at its end."""
        return (max(stage.steps, 1) - 1) // self.config.train.checkpoint_every + 1

    def checkpoint_megabytes(self) -> float:
        """fp32 trained weights plus AdamW's two moments for the largest stage."""
        return (4 * self.trained_parameters + 8 * max(self.stage_parameters, default=0)) / 2**20

    def latent_cache_bytes(self) -> int:
        """Disk of the VAE-latent cache if every image were square: fp32 mean and log-variance per latent cell
        (a non-square image stores its whole latent, so more)."""
        c, h, w = self.latent_shape
        return len(self.records) * 4 * 2 * c * h * w

    def text_feature_rows(self) -> int:
        """Rows of the text-feature tables: every taxon, plus each rank's "None" text."""
        return sum(self.taxonomy.num_taxa(rank) + 1 for rank in self.taxonomy.ranks)

    def text_feature_bytes(self) -> int:
        """The text-feature tables in `train.text_features_dtype` (iNat21 with CLIP: 16,334 rows of 77 x 768,
        about 3.6 GiB in fp32)."""
        return self.text_feature_rows() * self.text_tokens * self.text_width * self._feature_bytes

    def frozen_table_bytes(self) -> int:
        """The frozen ranks' tables at the last stage (every rank but the finest), same layout as the text's."""
        rows = sum(self.taxonomy.num_taxa(rank) for rank in self.taxonomy.ranks[:-1])
        return rows * self.text_tokens * self.text_width * self._feature_bytes

    @property
    def _frozen_tables(self) -> bool:
        """Whether the last stage holds the frozen ranks' tables (a progressive run of several ranks)."""
        return self.config.train.strategy == "progressive" and len(self.taxonomy.ranks) > 1

    @property
    def _feature_bytes(self) -> int:
        return 4 if self.config.train.text_features_dtype == "fp32" else 2

    def describe(self) -> str:
        """The plan a person reads before the run: data, model, conditioning, text, optimizer, batch, stages."""
        lines = [*self._data_lines(), self._model_line(), self._conditioning_line(), self._text_line()]
        lines += [self._optimizer_line(), self._batch_line(), self._memory_line(), *self._stage_lines()]
        return "\n".join(lines)

    def _data_lines(self) -> list[str]:
        config = self.config
        where = "synthetic (embedded default)" if config.data.format == "synthetic" else config.data.path
        lines = [
            f"data: {config.data.format} {where}: {len(self.records):,} images; "
            + ", ".join(f"{r} {self.taxonomy.num_taxa(r):,}" for r in self.taxonomy.ranks)
            + f"; crop {config.data.crop}"
        ]
        if self.records.skipped:
            skipped = ", ".join(f"{reason}: {n:,}" for reason, n in sorted(self.records.skipped.items()))
            lines.append(f"rows not used ({skipped})")
        return lines

    def _model_line(self) -> str:
        model = self.config.model
        c, h, w = self.latent_shape
        tuning = (
            f"LoRA r{model.lora_rank}/alpha {model.lora_alpha:g} on {', '.join(model.lora_targets)}"
            if model.finetune == "lora"
            else "full fine-tuning"
        )
        return (
            f"model: {model.base} at {model.resolution} px (UNet denoises {c}x{h}x{w}); "
            f"UNet {self.unet_parameters / 1e6:,.1f} M parameters, {tuning}"
        )

    def _conditioning_line(self) -> str:
        """What the UNet reads: a prior's captions, a one-text baseline's species caption, or the rank encoders."""
        config, model = self.config, self.config.model
        if config.train.strategy == "prior":
            own = "".join(
                f"; corpus[{i}]: {data.caption.template!r} (down to {data.caption.rank})"
                for i, data in enumerate(config.corpus)
                if data.caption is not None
            )
            return (
                f"captions: {config.caption.template!r} (ranks down to {config.caption.rank}){own}, "
                f"{self.taxonomy.num_taxa(self.taxonomy.ranks[0]):,} distinct; read by the UNet as text features "
                f"of width {self.text_width}, no rank encoders"
            )
        if self.encoder_parameters == 0:
            return (
                f"species caption {config.text.template!r} read by the UNet as text features of width "
                f"{self.text_width} (the base's own text path, as SD + LoRA / full fine-tuning), no rank encoders"
            )
        return (
            f"taxonomy encoder: {len(self.taxonomy.ranks)} ranks x {model.encoder_layers} layers x "
            f"{model.encoder_heads} heads, text width {self.text_width}, feed-forward {model.encoder_feedforward}, "
            f"dropout {model.encoder_dropout:g} "
            f"({self.encoder_parameters / 1e6:,.2f} M parameters)"
        )

    def _text_line(self) -> str:
        config, train = self.config, self.config.train
        where = "in CPU memory" if self.text_in_cpu_memory else "on the training device"
        if train.text_features == "auto":  # a GPU they would fill over an eighth of sends them to CPU memory
            where += " (train.text_features: auto)"
        frozen = (
            f"; the frozen ranks' tables up to {_size(self.frozen_table_bytes())} at the last stage"
            if self._frozen_tables
            else ""
        )
        return (
            f"text: {config.text.encoder}, template {config.text.template!r}; features of "
            f"{self.text_feature_rows():,} texts x {self.text_tokens} tokens x {self.text_width} "
            f"({_size(self.text_feature_bytes())} in {train.text_features_dtype}, {where}{frozen}); condition dropout "
            f"{train.condition_dropout:.4g} per rank{' (cascading)' if train.cascade_dropout else ''}"
            + (f"; rank 0 alone for {train.coarse_dropout:.3g} of samples" if train.coarse_dropout else "")
        )

    def _optimizer_line(self) -> str:
        train = self.config.train
        return (
            "optimizer: AdamW, constant lr (per stage below"
            + (f"; taxonomy encoders at {train.encoder_learning_rate:g}" if train.encoder_learning_rate else "")
            + f"), betas ({train.adam_beta1:g}, {train.adam_beta2:g}), weight decay {train.weight_decay:g}, "
            f"gradient clip {train.max_grad_norm:g}" + (f", Min-SNR {train.snr_gamma:g}" if train.snr_gamma else "")
        )

    def _speed_switches(self) -> str:
        train = self.config.train
        # On CPU the first steps wait minutes for Inductor (167 s measured on the CUB benchmark's 12 M UNet, for
        # ~5% a step), so the plan says so before anyone waits on it.
        compiled = "compiled UNet" + (
            " (CPU: minutes of compiling before the first step)" if self.device_type == "cpu" else ""
        )
        fused = fused_adamw(train, {self.device_type}) if self.device else train.fused_optimizer
        switches = ((compiled, train.compile), ("channels-last", train.channels_last), ("fused AdamW", fused))
        return "".join(f"{name}, " for name, on in switches if on)

    def _batch_line(self) -> str:
        config, train = self.config, self.config.train
        return (
            f"batch: {train.batch_size} per process x {self.num_processes} process(es)"
            + (f" on {self.device}" if self.device else "")
            + " x "
            f"{train.gradient_accumulation} accumulation = {self.images_per_step} images per step; "
            f"one epoch = {math.ceil(len(self.records) / self.images_per_step):,} steps; "
            f"precision {train.mixed_precision}"
            + (f" (frozen base weights kept in {config.frozen_precision})" if config.frozen_precision else "")
            + f", gradient checkpointing {_on(train.gradient_checkpointing)}, "
            + self._speed_switches()
            + ("deterministic kernels, " if train.deterministic else "")
            + f"latent cache {_on(train.cache_latents)}"
            + (f" (at least {_size(self.latent_cache_bytes())} on disk)" if train.cache_latents else "")
        )

    def memory_bytes(self) -> tuple[int, int]:
        """(device, host) bytes each process holds that the plan can count: the weights (the frozen base in
        `frozen_precision` when set), the largest stage's gradients and AdamW moments (fp32), and the text tables
        (with the frozen ranks' at the last stage) where `train.text_features` puts them. Activations come on
        top: they grow with batch and resolution, and one step measures them (benchmarks/speed.py)."""
        largest = max(self.stage_parameters, default=0)
        if any(stage.unet == "full" for stage in self.stages):  # every weight trains: fp32
            weights = 4 * (self.unet_parameters + self.encoder_parameters)
        else:  # the UNet's base is frozen; what trains (LoRA, encoders) is fp32
            weights = (2 if self.config.frozen_precision else 4) * self.unet_parameters + 4 * self.trained_parameters
        text = self.text_feature_bytes() + (self.frozen_table_bytes() if self._frozen_tables else 0)
        device = weights + 12 * largest + (0 if self.text_in_cpu_memory else text)
        return device, text if self.text_in_cpu_memory else 0

    def _memory_line(self) -> str:
        device, host = self.memory_bytes()
        total = device + self.activations
        cards = cards_that_fit(total)
        fits = f"fits GPUs of {cards[0]} GB and more" if cards else f"fits no GPU of up to {CARDS_GB[-1]} GB"
        return (
            f"memory per process: {_size(device)} on the device (weights, the largest stage's gradients and AdamW "
            f"moments, text tables on the device) + about {_size(self.activations)} of activations at batch "
            f"{self.config.train.batch_size} (counted on the meta device, within about a fifth) = {_size(total)}: "
            f"{fits}" + (f"; {_size(host)} of text tables in host memory" if host else "")
        )

    def _stage_lines(self) -> list[str]:
        train = self.config.train
        lines = [
            f"{stage.describe()} ({params:,} parameters; {self.epochs(stage.steps):.2f} epochs, "
            f"{self.checkpoints(stage)} checkpoint(s))"
            + ("; the LoRA fused into the frozen UNet" if self.fused_lora and stage.unet is None else "")
            for stage, params in zip(self.stages, self.stage_parameters, strict=True)
        ]
        total = sum(s.steps for s in self.stages)
        lines.append(
            f"total: {total:,} steps ({self.epochs(total):.2f} epochs); checkpoints every "
            f"{train.checkpoint_every:,} steps and at each stage end, the last {train.keep_checkpoints} kept, "
            f"about {self.checkpoint_megabytes():,.0f} MB each; processes wait up to "
            f"{train.process_group_timeout / 3600:g} h for each other (train.process_group_timeout)"
        )
        return lines

    @classmethod
    def from_model(
        cls,
        config: Config,
        records: RecordSet,
        taxonomy: Taxonomy,
        stages: list[Stage],
        model: TaxaDiffusionModel,
        factor: int,
        text_width: int,
        num_processes: int = 1,
        text_tokens: int = 77,
        device: str | None = None,
        text_on_cpu: bool | None = None,
    ) -> RunPlan:
        """The plan of a run from its (real or meta-device) model; `factor`: pixels per latent cell."""
        per_stage, trained = stage_parameter_counts(model, stages)
        unet = model.unet
        side = config.model.resolution // factor
        latent_shape = (unet.config.in_channels, side, side)
        trains = next((kind for kind in ("full", "lora") if any(stage.unet == kind for stage in stages)), None)
        activations = activation_bytes(
            unet,
            config.train.batch_size,
            latent_shape,
            text_tokens,
            trains,
            config.model.lora_targets,
            config.train.mixed_precision,
            config.train.gradient_checkpointing,
        )
        return cls(
            config=config,
            records=records,
            taxonomy=taxonomy,
            stages=stages,
            stage_parameters=per_stage,
            trained_parameters=trained,
            unet_parameters=sum(p.numel() for n, p in unet.named_parameters() if not is_lora_key(n)),
            encoder_parameters=count_parameters(list(model.taxonomy_encoder.parameters())),
            text_width=text_width,
            latent_shape=latent_shape,
            num_processes=num_processes,
            text_tokens=text_tokens,
            device=device,
            fused_lora=fuses_lora(unet, config),
            text_on_cpu=text_on_cpu,
            activations=activations,
        )


def text_placement(setting: str, table_bytes: int, gpu_memory: int | None) -> str:
    """Where `train.text_features` puts the text tables ("device" or "cpu"): `auto` keeps them on the device unless
    on a GPU (`gpu_memory` bytes) they would take over an eighth of it."""
    if setting != "auto":
        return setting
    return "cpu" if gpu_memory is not None and table_bytes > gpu_memory / 8 else "device"


def fuses_lora(unet, config: Config) -> bool:
    """Whether the stages that leave a LoRA frozen run it merged into the weights it adapts (the trainer's
    `_fuse_frozen_lora`). Not over frozen weights kept in low precision: W + s B A rounded to bf16 would lose most
    of the LoRA's update."""
    return has_lora(unet) and not config.frozen_precision


def stage_parameter_counts(model: TaxaDiffusionModel, stages: list[Stage]) -> tuple[list[int], int]:
    """Trainable parameters per stage, and in the union of all stages. Leaves the model as the last stage set it."""
    per_stage, union = [], {}
    for stage in stages:
        params = model.configure_trainable(stage.unet, stage.encoder_levels)
        per_stage.append(count_parameters(params))
        union.update({id(p): p for p in params})
    return per_stage, count_parameters(list(union.values()))


# Devices with torch's fused AdamW kernel (one pass over each tensor's weights and moments, where the default
# kernel makes several): on CPU the optimizer step over a whole 24.6 M-parameter UNet took 77 ms against 333 ms
# (benchmarks/results/speed.md). Both take the same steps up to rounding; elsewhere the default kernel.
FUSED_ADAMW_DEVICES = frozenset({"cuda", "cpu", "mps", "xpu"})


def fused_adamw(train, device_types: set[str]) -> bool:
    """Whether the optimizer takes the fused kernel: asked for, and every parameter on a device that has it."""
    return bool(train.fused_optimizer) and set(device_types) <= FUSED_ADAMW_DEVICES


def describe_device(device: torch.device) -> str:
    """A device as a plan names it: `cuda:0 (NVIDIA H100 80GB HBM3)`, `cpu (2 threads)`."""
    if device.type == "cuda":  # accelerate gives a lone GPU as plain `cuda`
        index = torch.cuda.current_device() if device.index is None else device.index
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


def plan_run(config: Config, data_folder: str | Path, num_processes: int = 1) -> RunPlan:
    """The plan, reading metadata and config files only: no weights, no images (`train --dry-run`)."""
    from accelerate import init_empty_weights

    records, dataset_ranks = run_records(config, Path(data_folder), render=False)
    train = config.train
    per_step = train.batch_size * num_processes * train.gradient_accumulation
    stages = plan_stages(train, config.model, dataset_ranks, len(records), per_step)
    spec = text_encoder_spec(config)
    text_width = spec.width()
    unet = build_unet_skeleton(config.model, text_width)
    with init_empty_weights():
        model = assemble_model(config.model, unet, len(records.ranks), text_width, config.train.strategy)
    factor = config_spatial_factor(config.model)
    # the config's, or a prior's own (`text.encoder: base`); without either min(the tokenizer's limit, 77)
    tokens = spec.max_length or 77
    taxonomy = records.taxonomy()
    return RunPlan.from_model(config, records, taxonomy, stages, model, factor, text_width, num_processes, tokens)


def _size(count: int) -> str:
    return f"{count / 2**30:,.1f} GB" if count >= 2**30 else f"{count / 2**20:,.1f} MB"


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def dry_run_report(config: Config, output: Path) -> str:
    """The resolved config and the plan, as `train --dry-run` prints them: metadata and config files are read,
    nothing is written."""
    import os

    import yaml

    processes = int(os.environ.get("WORLD_SIZE", "1"))  # set by `accelerate launch`
    plan = plan_run(config, Path(output) / "data", num_processes=processes)
    resolved = yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip()
    return f"# resolved config\n{resolved}\n\n# plan (output {output})\n{plan.describe()}"
