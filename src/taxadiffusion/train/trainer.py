"""The training loop: every stage in one process, on accelerate; running the same command again resumes.

Read top to bottom: the stage's optimizer and endless batches, then the `Trainer`: output folder, data, text
features, model and plan, resume, then one flat loop per stage in labelled paragraphs (forward / backward /
update, log, checkpoint, done), then the final pipeline.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..atomic import atomic_folder, write_text_atomic
from ..codec import SpaceToDepth, encode_images, spatial_factor
from ..conditioning import FrozenRankTables, cut_to_coarsest, drop_ranks
from ..config import Config
from ..data.check import screen_records
from ..data.dataset import ImageDataset
from ..devices import STORAGE_DTYPES
from ..errors import InputError, TaxaDiffusionError
from ..model import (
    assemble_model,
    build_denoiser,
    fuse_lora,
    is_lora_key,
    lora_parameters,
    plain_key,
    unfuse_lora,
)
from ..shards import Share
from ..taxonomy import Lineage, Taxonomy
from ..text import TextEmbeddingCache
from . import checkpoint as ckpt
from .latents import build_latent_dataset, sample_latents
from .plan import RunPlan, describe_device, fused_adamw, fuses_lora, run_records, text_encoder_spec, text_placement
from .run_folder import RunConflict, RunPaths, prepare_output
from .stages import Stage, plan_stages

STORAGE_DTYPE = {name: getattr(torch, torch_name) for name, torch_name in STORAGE_DTYPES.items()}


class TrainingDiverged(TaxaDiffusionError, RuntimeError):
    """The loss or a trained weight became NaN or infinite."""


# -- data --------------------------------------------------------------------------------------------


def taxonomy_hash(taxonomy: Taxonomy) -> str:
    return hashlib.sha256(json.dumps(taxonomy.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def grid_lineages(taxonomy: Taxonomy, n: int) -> list[Lineage]:
    """The most common leaf taxa and the rarest one: the rows of the per-stage sample grids."""
    leaves = sorted(taxonomy.leaves(), key=lambda t: (-t.count, t.path))
    chosen = leaves[: max(1, n - 1)] + ([leaves[-1]] if len(leaves) >= n else [])
    return [taxonomy.lineage(t) for t in chosen]


def make_accelerator(train, paths: RunPaths):
    """accelerate for this run: precision, accumulation, TensorBoard under `logs/`, a seedable sampler."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration

    return Accelerator(
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=train.process_group_timeout))],
        mixed_precision=train.mixed_precision,
        gradient_accumulation_steps=train.gradient_accumulation,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(paths.root), logging_dir=str(paths.logs)),
        # Shuffle order = f(seed, epoch) on every process, so a resumed run sees the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train.seed),
    )


def seed_everything(train) -> None:
    from accelerate.utils import set_seed

    if train.deterministic:
        # cuBLAS is reproducible only with a fixed workspace, read when its first handle is made.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    set_seed(train.seed, deterministic=train.deterministic)


# -- the stage's optimizer and batches ---------------------------------------------------------------


def build_optimizer(params: list[torch.nn.Parameter], encoder_params: set[int], stage: Stage, train) -> tuple:
    """AdamW over what the stage trains (the taxonomy encoders at `train.encoder_learning_rate` when set) and a
    constant LR schedule, as published."""
    rates = {False: stage.learning_rate, True: train.encoder_learning_rate or stage.learning_rate}
    groups = [
        {"params": [p for p in params if (id(p) in encoder_params) is is_encoder], "lr": rate}
        for is_encoder, rate in rates.items()
    ]
    devices = {p.device.type for g in groups for p in g["params"]}
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=stage.learning_rate,
        betas=(train.adam_beta1, train.adam_beta2),
        weight_decay=train.weight_decay,
        fused=True if fused_adamw(train, devices) else None,
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


@dataclass
class StageParts:
    """What one stage trains with: the model, the trained parameters, their optimizer and LR schedule and the
    data loader (as accelerate prepared them), and the frozen ranks' tables (None when every rank trains)."""

    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    loader: DataLoader
    tables: FrozenRankTables | None


def endless_batches(loader, dataset, accelerator, state: ckpt.TrainingState) -> Iterator[tuple[dict, int, int]]:
    """(batch, epoch, batches of the epoch consumed) forever, epoch after epoch, from the state's position.

    A resumed run skips the batches its epoch had already consumed (as EDM2's `InfiniteSampler(start_idx=...)`);
    the shuffle order and the random crops are functions of (seed, epoch), so it sees the same batches.
    """
    epoch, skip = state.epoch, state.batch_in_epoch
    while True:
        loader.set_epoch(epoch)
        dataset.set_epoch(epoch)
        position = skip
        for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
            position += 1
            yield batch, epoch, position
        epoch, skip = epoch + 1, 0


def nonfinite(weights: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding NaN or infinite values."""
    return [name for name, value in weights.items() if value.is_floating_point() and not torch.isfinite(value).all()]


# -- the run -----------------------------------------------------------------------------------------


class Trainer:
    """Holds a run's parts; `run()` trains every remaining stage and saves the pipeline."""

    def __init__(
        self,
        config: Config,
        output: str | Path,
        overwrite: bool = False,
        on_step: Callable[[ckpt.TrainingState, dict], None] | None = None,
        progress: bool = True,
    ):
        self._clock = time.perf_counter()  # the run's time counts its set-up too (data checks, text features)
        self.config = config
        self.paths = RunPaths(Path(output))
        self.on_step = on_step
        self.progress = progress
        self.unfused: dict[str, torch.Tensor] | None = None  # the LoRA-adapted weights while the LoRA is fused
        self.accelerator = acc = make_accelerator(config.train, self.paths)
        # accelerate's other processes of this launch share the main process's lock
        self._lock = prepare_output(self.paths, config, overwrite) if acc.is_main_process else None
        try:
            acc.wait_for_everyone()
            seed_everything(config.train)
            records = self._build_data()
            self._build_model()
            self.plan = self._write_plan(records)
            del records  # at iNat21's 2.7 M images it holds 1.6 GB per process (benchmarks/data_scale.py)
            self.resumed = self._resume()
            self.state = self.resumed.state if self.resumed else self._fresh_state()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Let another process train into the run folder (at the run's end, or when it stops)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # -- construction ---------------------------------------------------------------------------------

    def _build_data(self):
        """Records (screened: every image decodes), the taxonomy, the stages and the text features."""
        acc, config = self.accelerator, self.config
        with acc.main_process_first():  # the main process renders the synthetic set first
            records, self.dataset_ranks = run_records(config, self.paths.data)
        # Every process screens its share of the images and waits for the others' by watching the cache folder,
        # not at a barrier: a screen of millions of images cannot trip the process group's timeout (shards.py).
        records = screen_records(
            records, config.data.skip_bad_images, os.cpu_count() or 1, self.paths.cache, self.share, self.main_progress
        )
        self.taxonomy = records.taxonomy()
        train = config.train
        per_step = train.batch_size * acc.num_processes * train.gradient_accumulation
        self.stage_budget = len(records), per_step  # what train.epochs counts in
        self.stages = plan_stages(train, config.model, self.dataset_ranks, *self.stage_budget)
        with acc.main_process_first():  # each taxon's text encoded once, cached on disk
            self.cache = self._text_cache(self.progress)
        # The tables where and how train.text_features says; the saved pipeline re-reads the fp32 cache.
        self.text_embeddings = self.cache.to(self.text_device, STORAGE_DTYPE[config.train.text_features_dtype])
        return records

    def _text_cache(self, progress: bool) -> TextEmbeddingCache:
        """The run's fp32 text features: each taxon's text encoded once, then read from `cache/`."""
        config = self.config
        spec = text_encoder_spec(config)
        return TextEmbeddingCache.load_or_build(
            self.paths.cache, self.taxonomy, spec, config.text.template, progress, species=config.text.species
        )

    @property
    def share(self) -> Share:
        """This process's share of the preparation (`shards.py`)."""
        return Share(self.accelerator.process_index, self.accelerator.num_processes)

    @property
    def main_progress(self) -> bool:
        return self.progress and self.accelerator.is_main_process

    @functools.cached_property
    def text_device(self) -> torch.device:
        """Where the text-feature tables (and the frozen ranks' tables) live: as `train.text_features` says; under
        `auto`, in CPU memory when on a GPU they would take over an eighth of its memory."""
        device, train = self.accelerator.device, self.config.train
        itemsize = STORAGE_DTYPE[train.text_features_dtype].itemsize
        tables = sum(self.cache.table(level).numel() for level in range(len(self.cache.ranks))) * itemsize
        memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        return torch.device("cpu") if text_placement(train.text_features, tables, memory) == "cpu" else device

    @property
    def weight_dtype(self) -> torch.dtype | None:
        """The dtype of the never-trained weights (`Config.frozen_precision`); None: fp32."""
        precision = self.config.frozen_precision
        return STORAGE_DTYPE[precision] if precision else None

    def _build_model(self) -> None:
        """The UNet (+ LoRA) and the taxonomy encoder as one module, the noise schedule, the VAE."""
        acc, config = self.accelerator, self.config
        width = self.cache.config.width
        denoiser = build_denoiser(config.model, text_width=width)
        if config.train.gradient_checkpointing:
            denoiser.unet.enable_gradient_checkpointing()
        ranks = len(self.taxonomy.ranks)
        self.model = assemble_model(config.model, denoiser.unet, ranks, width, config.train.strategy).to(acc.device)
        self.noise_scheduler = denoiser.noise_scheduler
        self.vae = denoiser.vae.to(acc.device) if denoiser.vae is not None else None
        if self.weight_dtype is not None:  # the frozen base in low precision; the LoRA and encoders stay fp32
            unet = self.model.unet
            unet.to(self.weight_dtype)
            for parameter in lora_parameters(unet):
                parameter.data = parameter.data.float()
            if isinstance(self.vae, torch.nn.Module) and not isinstance(self.vae, SpaceToDepth):
                self.vae.to(self.weight_dtype)
        if config.train.channels_last:
            self.model.unet.to(memory_format=torch.channels_last)
        if config.train.compile:  # in place (nn.Module.compile): the state dict keeps its keys
            self.model.unet.compile()
        self.trained_keys = self._trained_keys()

    def _write_plan(self, records) -> str:
        """The dataset (its latents cached for latent models), then the plan, printed and saved with the config."""
        acc, config, train = self.accelerator, self.config, self.config.train
        self.dataset = ImageDataset(
            records.records,
            self.taxonomy,
            config.model.resolution,
            config.data.crop,
            seed=train.seed,
            random_flip=config.data.random_flip,
        )
        if train.cache_latents:  # the config refuses it without a VAE; split across processes as the screen is
            self.dataset = build_latent_dataset(
                self.dataset,
                self.vae,
                self.paths.cache,
                self.share,
                workers=config.data.num_workers,
                progress=self.main_progress,
            )
        needed = train.batch_size * acc.num_processes
        if len(self.dataset) < needed:
            raise InputError(f"{len(self.dataset)} training images but one step needs {needed}; lower train.batch_size")
        plan = RunPlan.from_model(
            config,
            records,
            self.taxonomy,
            self.stages,
            self.model,
            spatial_factor(self.vae),
            self.cache.config.width,
            acc.num_processes,
            self.cache.config.max_length,
            describe_device(acc.device),
            text_on_cpu=train.text_features == "cpu" or self.text_device != acc.device,
        ).describe()
        if acc.is_main_process:
            config.save(self.paths.config)
            self.taxonomy.save(self.paths.taxonomy)
            write_text_atomic(self.paths.plan, plan + "\n")
        return plan

    def describe(self) -> str:
        """The plan: data, then each stage with what trains and how many parameters."""
        return self.plan

    def _trained_keys(self) -> set[str]:
        """State-dict keys that any stage trains: what a checkpoint must hold."""
        keys = {f"taxonomy_encoder.{k}" for k in self.model.taxonomy_encoder.state_dict()}
        unet_modes = {stage.unet for stage in self.stages}
        unet_keys = self.model.unet.state_dict()
        if "full" in unet_modes:
            keys |= {f"unet.{k}" for k in unet_keys}
        elif "lora" in unet_modes:
            keys |= {f"unet.{k}" for k in unet_keys if is_lora_key(k)}
        return keys

    # -- resume ---------------------------------------------------------------------------------------

    def _fresh_state(self) -> ckpt.TrainingState:
        return ckpt.TrainingState(fingerprint=self.config.fingerprint(), taxonomy=taxonomy_hash(self.taxonomy))

    def _resume(self) -> ckpt.Checkpoint | None:
        """Load the newest readable checkpoint of this run (an unreadable one is reported and passed over)."""
        found = ckpt.list_checkpoints(self.paths.checkpoints)
        readable = self._readable_checkpoints(found)
        checkpoint = next(readable, None)
        if checkpoint is None:
            if found:
                raise RunConflict(
                    f"no checkpoint in {self.paths.checkpoints} can be read back ({len(found)} damaged); "
                    "pass --overwrite to start this run over"
                )
            return None
        checkpoint = self._reopen_if_lengthened(checkpoint, readable)
        self._check_fits(checkpoint)
        if checkpoint.rng is not None:
            ckpt.set_rng_state(checkpoint.rng)
        if self.accelerator.is_main_process:
            print(f"resuming from {checkpoint.path} (stage {checkpoint.state.stage}, step {checkpoint.state.step})")
        return checkpoint

    def _readable_checkpoints(self, found: list[Path]) -> Iterator[ckpt.Checkpoint]:
        """The checkpoints of `found` that read back whole, newest first; a damaged one is reported and passed over."""
        for path in reversed(found):
            try:
                yield ckpt.read_checkpoint(path, self.accelerator.process_index)
            except ckpt.CorruptCheckpoint as error:
                if self.accelerator.is_main_process:
                    print(f"taxadiffusion: skipping damaged checkpoint {path} ({error}); trying the one before")

    def _reopen_if_lengthened(self, checkpoint: ckpt.Checkpoint, older: Iterator[ckpt.Checkpoint]) -> ckpt.Checkpoint:
        """Train a finished stage longer (a prior extended from 5,000 to 10,000 steps) when no stage after it has
        started. Its final checkpoint holds the averaged weights (EMA copied in), not the trained ones, so the
        stage continues from its newest checkpoint inside it (the next of `older`, the readable checkpoints before
        it), replaying at most `checkpoint_every` steps; the schedule is constant and the batches are functions of
        (seed, epoch), so the result equals a run given the longer length from the start."""
        state = checkpoint.state
        stage = self.stages[state.stage] if state.stage < len(self.stages) else None
        if not state.stage_complete or stage is None or stage.steps <= state.step:
            return checkpoint
        for inside in older:
            if inside.state.running(state.stage):
                if self.accelerator.is_main_process:
                    print(
                        f"stage {stage.name} finished at {state.step} steps and now trains to {stage.steps}: "
                        f"it continues from {inside.path} (step {inside.state.step}), before its averaged weights"
                    )
                return inside
        raise RunConflict(
            f"stage {stage.name} finished at {state.step} steps, and this config gives it {stage.steps}; it can "
            f"train longer only from a checkpoint inside it (its final one holds the averaged weights), and "
            f"{self.paths.checkpoints} keeps none: restore its steps, choose a new --output, or pass --overwrite"
        )

    def _check_fits(self, checkpoint: ckpt.Checkpoint) -> None:
        """The checkpoint was written by this config on this data, and fits this model; its weights are loaded."""
        state, path = checkpoint.state, checkpoint.path
        # Re-fingerprint the checkpoint's own config.yaml: a key added since (at its default) is no change.
        saved = Config.load(path / "config.yaml") if (path / "config.yaml").is_file() else None
        saved_fingerprint = saved.fingerprint() if saved is not None else state.fingerprint
        fingerprint, tax = self.config.fingerprint(), taxonomy_hash(self.taxonomy)
        if saved_fingerprint != fingerprint or state.taxonomy != tax:
            what = "config" if saved_fingerprint != fingerprint else "training taxonomy (the data changed)"
            raise RunConflict(
                f"checkpoint {path} was written with a different {what}; "
                "choose a new --output, or pass --overwrite to start over"
            )
        if saved is not None:
            self._check_lengths(saved, state, path)
        absent = self.trained_keys - set(checkpoint.weights)
        _, unexpected = self.model.load_state_dict(checkpoint.weights, strict=False)
        if unexpected or absent:
            keys = sorted(unexpected or absent)[:3]
            raise RunConflict(f"checkpoint {path} does not fit this model (keys such as {keys})")

    def _check_lengths(self, saved: Config, state: ckpt.TrainingState, path: Path) -> None:
        """A resumed run may change how long its stages train (LENGTH_KEYS), but not a finished stage's: the
        stages after it were trained on what it was (the newest finished stage may grow: _reopen_if_lengthened).
        A running stage shortened to or below the checkpoint's step ends there."""
        before = plan_stages(saved.train, self.config.model, self.dataset_ranks, *self.stage_budget)
        for old, new in zip(before, self.stages, strict=True):
            if state.finished(old.index) and old.steps != new.steps:
                raise RunConflict(
                    f"checkpoint {path}: stage {old.name} finished at {old.steps} steps, and this config gives it "
                    f"{new.steps}; a finished stage keeps its length (only the running stage and those after it "
                    "may change): restore its steps, choose a new --output, or pass --overwrite to start over"
                )
            if state.running(old.index) and new.steps <= state.step and self.accelerator.is_main_process:
                print(f"stage {new.name} now ends at {new.steps} steps; it ran {state.step}, and ends there")

    # -- training -------------------------------------------------------------------------------------

    def run(self) -> Path:
        acc = self.accelerator
        try:
            acc.init_trackers("taxadiffusion", config=_hparams(self.config))
            for stage in self.stages:
                if not self.state.finished(stage.index):
                    self._train_stage(stage)
            saved = self.save_prior() if self.config.train.strategy == "prior" else self.save_pipeline()
            self._tick(self.state)  # the last grid and the save: `state.train_seconds` is now the run's total
            acc.end_training()  # closes the trackers and the process group: last
        finally:
            self.release()
        return saved

    def _tick(self, state: ckpt.TrainingState) -> None:
        """Add this process's seconds since the last tick to the run's training time."""
        now = time.perf_counter()
        state.train_seconds += now - self._clock
        self._clock = now

    def _train_stage(self, stage: Stage) -> None:
        acc, train = self.accelerator, self.config.train
        parts = self.prepare_stage(stage)
        ema = self._stage_ema(stage, parts.params)
        self.resumed = None  # its optimizer and EMA are restored: a later stage starts from its own fresh state
        state = self.state
        batches = endless_batches(parts.loader, self.dataset, acc, state)
        bar = self._progress_bar(stage, state)
        while state.step < stage.steps:
            # forward / backward / update
            batch, epoch, position = next(batches)
            loss = self.update(parts, batch, stage, state.step + 1)
            if not acc.sync_gradients:
                continue
            if ema is not None:
                ema.step(parts.params)
            state.step += 1
            state.global_step += 1
            state.epoch, state.batch_in_epoch = epoch, position

            # log
            if state.step % train.log_every == 0 or state.step == stage.steps:
                mean = acc.gather(loss.detach().reshape(1)).mean().item()
                acc.log({"train/loss": mean, f"train/loss_stage_{stage.name}": mean}, step=state.global_step)
                bar.set_postfix(loss=f"{mean:.4f}")
            bar.update()
            if self.on_step is not None:
                self.on_step(state, batch)

            # checkpoint (the stage's last one is written below, marked complete)
            if state.step % train.checkpoint_every == 0 and state.step < stage.steps:
                self._checkpoint(parts, state, stage, ema)

        # done: the averaged weights replace the trained ones; the stage's final checkpoint and sample grid
        batches.close()
        bar.close()
        if ema is not None:
            ema.copy_to(parts.params)
        state.stage_complete = True
        self._checkpoint(parts, state, stage)
        if acc.is_main_process:
            self.sample_grid(stage)
        acc.wait_for_everyone()
        acc.free_memory(parts.model, parts.optimizer, parts.loader, parts.lr_scheduler)

    def update(self, parts: StageParts, batch: dict, stage: Stage, step: int) -> torch.Tensor:
        """One batch's forward and backward, and the optimizer's step where gradient accumulation ends; the
        batch's loss. `step` (counted from 1) names the step in the error of a loss that is not finite."""
        acc = self.accelerator
        with acc.accumulate(parts.model):
            loss = self.loss(parts.model, batch, stage, parts.tables)
            if not torch.isfinite(loss):
                raise self._diverged(f"loss became {loss.item()}", stage, step)
            acc.backward(loss)
            if acc.sync_gradients:
                clip_gradients(acc, parts.params, self.config.train.max_grad_norm)
            parts.optimizer.step()
            parts.lr_scheduler.step()
            parts.optimizer.zero_grad(set_to_none=True)
        return loss

    def prepare_stage(self, stage: Stage) -> StageParts:
        """What the stage trains, its optimizer and data loader (prepared by accelerate), its frozen ranks'
        tables, and its state: the resumed one (optimizer included) inside this stage, else a fresh one."""
        acc, train = self.accelerator, self.config.train
        self._fuse_frozen_lora(stage.unet is None)
        params = self.model.configure_trainable(stage.unet, stage.encoder_levels)
        encoder_params = {id(p) for p in self.model.taxonomy_encoder.parameters()}
        optimizer, lr_scheduler = build_optimizer(params, encoder_params, stage, train)
        # The loader's own generator: creating an iterator must not draw from the global RNG, whose
        # state a checkpoint restores (else a run resumed mid-epoch would draw different noise).
        loader = DataLoader(
            self.dataset,
            batch_size=train.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.config.data.num_workers,
            generator=torch.Generator().manual_seed(train.seed),
        )
        model, optimizer, loader, lr_scheduler = acc.prepare(self.model, optimizer, loader, lr_scheduler)
        state = self.state
        if state.stage == stage.index and state.step > 0:  # resume inside this stage
            optimizer.load_state_dict(self.resumed.optim["optimizer"])
            lr_scheduler.load_state_dict(self.resumed.optim["lr_scheduler"])
        else:
            self.state = ckpt.TrainingState(
                stage=stage.index,
                global_step=state.global_step,
                fingerprint=state.fingerprint,
                taxonomy=state.taxonomy,
                train_seconds=state.train_seconds,
            )
        return StageParts(model, params, optimizer, lr_scheduler, loader, self._frozen_tables(stage))

    def _fuse_frozen_lora(self, frozen: bool) -> None:
        """While no stage trains the LoRA (after stage 0 of `unet_stages: first`), it is merged into the weights it
        adapts (`fuses_lora` says when): one matmul per adapted projection instead of three. Undone bit for bit
        before the LoRA trains again and before the pipeline is saved; a resumed run merges the same weights the
        same way, so resume stays bitwise."""
        unet = self.model.unet
        if frozen and self.unfused is None and fuses_lora(unet, self.config):
            self.unfused = fuse_lora(unet)
        elif not frozen and self.unfused is not None:
            unfuse_lora(unet, self.unfused)
            self.unfused = None

    def _stage_ema(self, stage: Stage, params: list[torch.nn.Parameter]):
        """The EMA of what the stage trains (None when `train.ema_decay` is off), resumed inside the stage."""
        decay = self.config.train.ema_decay
        if decay is None:
            return None
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=decay)
        saved = self.resumed.optim.get("ema") if self.resumed is not None else None
        if saved is not None and self.state.stage == stage.index and self.state.step > 0:
            ema.load_state_dict(saved)
        return ema

    def _frozen_tables(self, stage: Stage) -> FrozenRankTables | None:
        """Frozen rank encoders give a fixed output per taxon: tabulate them once for the stage."""
        first = min(stage.encoder_levels) if stage.encoder_levels else len(self.taxonomy.ranks)
        if first == 0:
            return None
        text = [self.text_embeddings.table(i) for i in range(first)]
        dtype = STORAGE_DTYPE[self.config.train.text_features_dtype]
        return FrozenRankTables(self.model.taxonomy_encoder, text, first, device=self.text_device, dtype=dtype)

    def _progress_bar(self, stage: Stage, state: ckpt.TrainingState):
        from tqdm.auto import tqdm

        show = self.progress and self.accelerator.is_main_process
        return tqdm(total=stage.steps, initial=state.step, desc=f"stage {stage.name}", disable=not show)

    def _diverged(self, what: str, stage: Stage, step: int) -> TrainingDiverged:
        last = ckpt.list_checkpoints(self.paths.checkpoints)
        return TrainingDiverged(
            f"{what} at stage {stage.name}, step {step}; last good checkpoint: {last[-1] if last else 'none'}. "
            "Lower train.learning_rate or use train.mixed_precision=no."
        )

    def loss(self, model, batch: dict, stage: Stage, tables: FrozenRankTables | None) -> torch.Tensor:
        """Epsilon-prediction MSE (or v-prediction, if the base scheduler says so) for one batch."""
        train = self.config.train
        if "latent_params" in batch:  # cached VAE latents: the encoder never runs here
            targets = sample_latents(batch["latent_params"], self.vae.config.scaling_factor)
        else:
            targets = encode_images(self.vae, batch["pixel_values"]).float()  # fp32 noise and targets
        if self.config.train.channels_last:
            targets = targets.contiguous(memory_format=torch.channels_last)
        noise = torch.randn_like(targets)
        batch_size = targets.shape[0]
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (batch_size,), device=targets.device
        )
        noisy = self.noise_scheduler.add_noise(targets, noise, timesteps)
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(targets, noise, timesteps)
        elif prediction_type == "sample":
            target = targets
        else:
            target = noise
        ids = drop_ranks(batch["taxon_ids"].cpu(), train.condition_dropout, train.cascade_dropout)
        ranks = len(self.taxonomy.ranks)
        depth = stage.depth if stage.depth is not None else int(torch.randint(1, ranks + 1, ()))
        depth = cut_to_coarsest(torch.full((batch_size,), depth), train.coarse_dropout).to(targets.device)
        device = targets.device
        features = self.text_embeddings.lookup(ids).to(device=device, dtype=torch.float32, non_blocking=True)
        frozen = tables.sum(ids, depth).to(device=device, dtype=torch.float32) if tables is not None else None
        prediction = model(noisy, timesteps, features, depth, frozen_sum=frozen, start=tables.levels if tables else 0)
        if train.snr_gamma is None:
            return F.mse_loss(prediction.float(), target.float())
        return min_snr_loss(prediction, target, timesteps, self.noise_scheduler, train.snr_gamma)

    def _checkpoint(self, parts: StageParts, state: ckpt.TrainingState, stage: Stage, ema=None) -> None:
        """Write a checkpoint of what trains (and its EMA, inside a stage); weights that are no longer finite
        are never saved."""
        acc = self.accelerator
        trained = {k: v for k, v in acc.unwrap_model(parts.model).state_dict().items() if k in self.trained_keys}
        bad = nonfinite(trained)  # every process checks its own replica, so all of them stop together
        if bad:
            raise self._diverged(f"{len(bad)} trained weight tensor(s) became NaN or infinite", stage, state.step)
        self._tick(state)
        ckpt.write_checkpoint(
            self.paths.checkpoints,
            state,
            trained if acc.is_main_process else None,
            parts.optimizer,
            parts.lr_scheduler,
            acc.process_index,
            acc.is_main_process,
            acc.wait_for_everyone,
            self.config.train.keep_checkpoints,
            ema=ema,
            files={"config.yaml": self.paths.config.read_text(), "taxonomy.json": self.paths.taxonomy.read_text()}
            if acc.is_main_process
            else None,
        )

    # -- outputs ----------------------------------------------------------------------------------

    def pipeline(self):
        from ..pipeline import TaxaDiffusionPipeline, make_scheduler

        sample = self.config.sample
        pipe = TaxaDiffusionPipeline(
            unet=self.model.unet,
            scheduler=make_scheduler(sample.scheduler, self.noise_scheduler.config, sample.spacing),
            taxonomy_encoder=self.model.taxonomy_encoder,
            text_embeddings=self.text_embeddings,
            vae=self.vae,
        )
        pipe.sampling = sample.sampling()  # saved with the pipeline: its default settings
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def sample_grid(self, stage: Stage) -> Path:
        """A PNG per stage: the most common species' lineage coarse to fine down to the stage's rank (one
        row per rank), then other species (the rarest last) at the stage's rank."""
        from ..grid import image_grid

        sample = self.config.sample
        depth = stage.depth or len(self.taxonomy.ranks)
        chosen = grid_lineages(self.taxonomy, sample.grid_taxa)
        rows: list[Lineage] = [chosen[0].truncate(d) for d in range(1, min(depth, chosen[0].depth) + 1)]
        for lineage in chosen[1:]:
            cut = lineage.truncate(min(depth, lineage.depth))  # a taxon labelled above the stage's rank: whole
            if cut not in rows:
                rows.append(cut)
        self.model.eval()
        with torch.random.fork_rng(devices=[]):  # the pipeline samples with config.sample, its saved settings
            images = self.pipeline()(
                rows, num_images_per_prompt=sample.grid_images, generator=torch.Generator().manual_seed(0)
            ).images
        self.model.train()
        self.paths.samples.mkdir(parents=True, exist_ok=True)
        path = self.paths.samples / f"stage-{stage.name}.png"
        if len(self.taxonomy.ranks) == 1:  # a prior's captions, a flat run's species: one text, no rank to name
            labels = [lin.scientific_name for lin in rows]
        else:
            labels = [f"{lin.finest_rank}: {lin.scientific_name}" for lin in rows]
        image_grid(images, columns=sample.grid_images, labels=labels).save(path)
        return path

    def save_prior(self) -> Path:
        """`pretrain`'s result: the run folder becomes a base folder that `model.base` loads."""
        from ..prior import PriorInfo, save_base_folder

        if self.accelerator.is_main_process:
            config = self.config
            info = PriorInfo(
                text_encoder=config.text.encoder,
                max_length=self.cache.config.max_length,
                resolution=config.model.resolution,
                codec=config.model.codec,
                caption_rank=config.caption.rank,
                caption_template=config.caption.template,
                captions={t.name: t.count for t in self.taxonomy.leaves()},
            )
            save_base_folder(self.paths.root, self.model.unet, self.noise_scheduler, self.vae, info)
        self.accelerator.wait_for_everyone()
        return self.paths.root

    def _restore_full_precision(self) -> None:
        """Before the pipeline is saved: the frozen parts kept in low precision get the base's own weights back
        (re-read from the base, not the rounded copy), and the text features their fp32 cache."""
        config = self.config
        if self.weight_dtype is not None:
            base = build_denoiser(config.model, text_width=self.cache.config.width)
            unet = self.model.unet.to(torch.float32)
            own = base.unet.state_dict()
            frozen = {k: own[plain_key(k)] for k in unet.state_dict() if not is_lora_key(k)}
            unet.load_state_dict(frozen, strict=False)
            if base.vae is not None:
                self.vae = base.vae.to(self.accelerator.device)
        if config.train.text_features_dtype != "fp32":
            self.text_embeddings = self._text_cache(progress=False)

    def save_pipeline(self) -> Path:
        """The final pipeline folder (written aside, then renamed into place)."""
        target = self.paths.pipeline
        if self.accelerator.is_main_process:
            self._fuse_frozen_lora(False)
            self._restore_full_precision()
            with atomic_folder(target) as tmp:  # the run's own pipeline/, replaced whole
                self.pipeline().save_pretrained(tmp)
        self.accelerator.wait_for_everyone()
        return target


def min_snr_loss(prediction, target, timesteps, noise_scheduler, gamma: float) -> torch.Tensor:
    """MSE weighted by min(SNR(t), gamma), expressed for the scheduler's prediction type (Hang et al.,
    "Efficient Diffusion Training via Min-SNR Weighting Strategy", 2023, eq. 9)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=gamma)
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        weights = weights / snr
    elif kind == "v_prediction":
        weights = weights / (snr + 1)
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


def clip_gradients(accelerator, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm of `params` (a list: a one-shot generator would be empty by now,
    and clipping would silently do nothing); returns the norm before clipping."""
    if not isinstance(params, list):
        raise TypeError("pass the trainable parameters as a list, the same one the optimizer holds")
    return accelerator.clip_grad_norm_(params, max_norm)


def _hparams(config: Config) -> dict:
    """TensorBoard takes scalars and strings only."""
    return {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in config.flat().items()}


def train(config: Config, output: str | Path, overwrite: bool = False, **kwargs) -> Path:
    """Train every stage of `config` into `output` (resuming if it holds this run); returns the pipeline folder."""
    return Trainer(config, output, overwrite=overwrite, **kwargs).run()
