"""The training loop: every stage in one process, on accelerate; running the same command again resumes.

Read top to bottom: output folder, data, text features, model, then one loop per stage (step,
logging, checkpoint, sample grid), then the final pipeline.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..conditioning import FrozenRankTables, cut_to_coarsest, drop_ranks
from ..config import Config
from ..data.dataset import ImageDataset
from ..model import (
    TaxaDiffusionModel,
    add_lora,
    build_denoiser,
    build_taxonomy_encoder,
    encode_images,
    spatial_factor,
)
from ..taxonomy import Lineage, Taxonomy
from ..text import TextEmbeddingCache
from . import checkpoint as ckpt
from .latents import build_latent_dataset, sample_latents
from .plan import describe_device, describe_model, run_records, text_encoder_spec
from .stages import Stage, plan_stages

# What a run writes into its output folder; `--overwrite` removes these and nothing else.
OWNED = ("config.yaml", "taxonomy.json", "plan.txt", "checkpoints", "logs", "samples", "pipeline", "cache", "data")


class RunConflict(ValueError):
    """The output folder holds something this run must not touch or cannot continue."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class RunPaths:
    root: Path

    def __getattr__(self, name: str) -> Path:
        files = {"config": "config.yaml", "taxonomy": "taxonomy.json", "plan": "plan.txt"}
        if name in files:
            return self.root / files[name]
        if name in OWNED:
            return self.root / name
        raise AttributeError(name)


# -- output folder ---------------------------------------------------------------------------------


def prepare_output(paths: RunPaths, config: Config, overwrite: bool) -> None:
    """Create the output folder, or accept it for resuming; never wipe a user's folder without the flag."""
    root = paths.root
    if root.exists() and any(root.iterdir()):
        if overwrite:
            for name in OWNED:
                target = root / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        elif paths.config.is_file():
            saved = Config.load(paths.config)
            if saved.fingerprint() != config.fingerprint():
                changes = "; ".join(config.differences(saved)[:8])
                raise RunConflict(
                    f"{root} holds a run with a different config ({changes}); "
                    "resume it with its own config, choose a new --output, or pass --overwrite to start over"
                )
        else:
            raise RunConflict(
                f"{root} exists and is not a taxadiffusion run; choose a new --output or pass --overwrite"
            )
    root.mkdir(parents=True, exist_ok=True)


# -- data --------------------------------------------------------------------------------------------


def taxonomy_hash(taxonomy: Taxonomy) -> str:
    return hashlib.sha256(json.dumps(taxonomy.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def grid_lineages(taxonomy: Taxonomy, n: int) -> list[Lineage]:
    """The most common leaf taxa and the rarest one: the rows of the per-stage sample grids."""
    leaves = sorted(taxonomy.leaves(), key=lambda t: (-t.count, t.path))
    chosen = leaves[: max(1, n - 1)] + ([leaves[-1]] if len(leaves) >= n else [])
    return [taxonomy.lineage(t) for t in chosen]


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
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

        self.config = config
        self.paths = RunPaths(Path(output))
        self.on_step = on_step
        self.progress = progress
        self.resume_from: Path | None = None
        train = config.train
        self.accelerator = Accelerator(
            mixed_precision=train.mixed_precision,
            gradient_accumulation_steps=train.gradient_accumulation,
            log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(self.paths.root), logging_dir=str(self.paths.logs)),
            # Shuffle order = f(seed, epoch) on every process, so a resumed run sees the same batches.
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train.seed),
        )
        acc = self.accelerator
        if acc.is_main_process:
            prepare_output(self.paths, config, overwrite)
        acc.wait_for_everyone()
        if train.deterministic:
            # cuBLAS is reproducible only with a fixed workspace, read when its first handle is made.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        set_seed(train.seed, deterministic=train.deterministic)

        # 1. data (the main process renders the synthetic set first)
        with acc.main_process_first():
            records, self.dataset_ranks = run_records(config, self.paths.data)
        # `records` is dropped once the dataset and the plan are built: at iNat21's 2.7 M images it holds
        # 1.6 GB per process, where the dataset's arrays hold a fraction (benchmarks/data_scale.py).
        self.taxonomy = records.taxonomy()
        self.stages = plan_stages(train, config.model, self.dataset_ranks)

        # 2. text features: each taxon's text encoded once, cached on disk
        with acc.main_process_first():
            cache = TextEmbeddingCache.load_or_build(
                self.paths.cache, self.taxonomy, text_encoder_spec(config), config.text.template, progress
            )
        self.text_embeddings = cache.to(acc.device)

        # 3. model: the UNet (+ LoRA) and the taxonomy encoder as one module
        denoiser = build_denoiser(config.model)
        if config.model.finetune == "lora":
            add_lora(denoiser.unet, config.model.lora_rank, config.model.lora_alpha, config.model.lora_targets)
        if train.gradient_checkpointing:
            denoiser.unet.enable_gradient_checkpointing()
        encoder = build_taxonomy_encoder(
            config.model, len(self.taxonomy.ranks), cache.config.width, denoiser.unet.config.cross_attention_dim
        )
        self.model = TaxaDiffusionModel(denoiser.unet, encoder).to(acc.device)
        self.noise_scheduler = denoiser.noise_scheduler
        self.vae = denoiser.vae.to(acc.device) if denoiser.vae is not None else None
        self.trained_keys = self._trained_keys()

        self.dataset = ImageDataset(
            records.records, self.taxonomy, config.model.resolution, config.data.crop, seed=train.seed
        )
        if train.cache_latents:  # the config refuses it without a VAE
            with acc.main_process_first():
                self.dataset = build_latent_dataset(self.dataset, self.vae, self.paths.cache, progress=progress)
        needed = train.batch_size * acc.num_processes
        if len(self.dataset) < needed:
            raise ValueError(f"{len(self.dataset)} training images but one step needs {needed}; lower train.batch_size")

        self.plan = describe_model(
            config,
            records,
            self.taxonomy,
            self.stages,
            self.model,
            spatial_factor(self.vae),
            cache.config.width,
            acc.num_processes,
            cache.config.max_length,
            describe_device(acc.device),
        ).describe()
        if acc.is_main_process:
            config.save(self.paths.config)
            self.taxonomy.save(self.paths.taxonomy)
            self.paths.plan.write_text(self.plan + "\n")
        self.state = self._resume()

    # -- plan and resume --------------------------------------------------------------------------

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
            keys |= {f"unet.{k}" for k in unet_keys if ".lora_" in k}
        return keys

    def _resume(self) -> ckpt.TrainingState:
        fingerprint, tax = self.config.fingerprint(), taxonomy_hash(self.taxonomy)
        found = ckpt.list_checkpoints(self.paths.checkpoints)
        if not found:
            return ckpt.TrainingState(fingerprint=fingerprint, taxonomy=tax)
        latest = found[-1]
        state = ckpt.read_state(latest)
        # Re-fingerprint the checkpoint's own config.yaml: a key added since (at its default) is no change.
        saved = latest / "config.yaml"
        saved_fingerprint = Config.load(saved).fingerprint() if saved.is_file() else state.fingerprint
        if saved_fingerprint != fingerprint or state.taxonomy != tax:
            what = "config" if saved_fingerprint != fingerprint else "training taxonomy (the data changed)"
            raise RunConflict(
                f"checkpoint {latest} was written with a different {what}; "
                "choose a new --output, or pass --overwrite to start over"
            )
        weights = ckpt.read_weights(latest)
        absent = self.trained_keys - set(weights)
        _, unexpected = self.model.load_state_dict(weights, strict=False)
        if unexpected or absent:
            keys = sorted(unexpected or absent)[:3]
            raise RunConflict(f"checkpoint {latest} does not fit this model (keys such as {keys})")
        rng = ckpt.read_rng(latest, self.accelerator.process_index)
        if rng is not None:
            ckpt.set_rng_state(rng)
        if self.accelerator.is_main_process:
            print(f"resuming from {latest} (stage {state.stage}, step {state.step})")
        self.resume_from = latest
        return state

    # -- training ---------------------------------------------------------------------------------

    def run(self) -> Path:
        acc = self.accelerator
        acc.init_trackers("taxadiffusion", config=_hparams(self.config))
        for stage in self.stages:
            if stage.index < self.state.stage or (stage.index == self.state.stage and self.state.stage_complete):
                continue
            self._train_stage(stage)
        pipeline = self.save_pipeline()
        acc.end_training()  # closes the trackers and the process group: last
        return pipeline

    def _train_stage(self, stage: Stage) -> None:
        acc, train = self.accelerator, self.config.train
        params = self.model.configure_trainable(stage.unet, stage.encoder_levels)
        encoder_ids = {id(p) for p in self.model.taxonomy_encoder.parameters()}
        groups = [
            {"params": [p for p in params if id(p) not in encoder_ids], "lr": stage.learning_rate},
            {
                "params": [p for p in params if id(p) in encoder_ids],
                "lr": train.encoder_learning_rate or stage.learning_rate,
            },
        ]
        optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]],
            lr=stage.learning_rate,
            betas=(train.adam_beta1, train.adam_beta2),
            weight_decay=train.weight_decay,
        )
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # constant, as published
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
            saved = ckpt.read_optim(self.resume_from)
            optimizer.load_state_dict(saved["optimizer"])
            lr_scheduler.load_state_dict(saved["lr_scheduler"])
        else:
            state = ckpt.TrainingState(
                stage=stage.index, global_step=state.global_step, fingerprint=state.fingerprint, taxonomy=state.taxonomy
            )

        # Frozen rank encoders give a fixed output per taxon: tabulate them once for the stage.
        first = min(stage.encoder_levels) if stage.encoder_levels else len(self.taxonomy.ranks)
        tables = None
        if first > 0:
            text = [self.text_embeddings.table(i) for i in range(first)]
            tables = FrozenRankTables(self.model.taxonomy_encoder, text, first)

        from tqdm.auto import tqdm

        bar = tqdm(
            total=stage.steps,
            initial=state.step,
            desc=f"stage {stage.name}",
            disable=not (self.progress and acc.is_main_process),
        )
        skip = state.batch_in_epoch
        while state.step < stage.steps:
            loader.set_epoch(state.epoch)
            self.dataset.set_epoch(state.epoch)
            batches = acc.skip_first_batches(loader, skip) if skip else loader
            position = skip
            for batch in batches:
                position += 1
                with acc.accumulate(model):
                    loss = self._loss(model, batch, stage, tables)
                    if not torch.isfinite(loss):
                        last = ckpt.list_checkpoints(self.paths.checkpoints)
                        raise TrainingDiverged(
                            f"loss became {loss.item()} at stage {stage.name}, step {state.step + 1}; "
                            f"last good checkpoint: {last[-1] if last else 'none'}. "
                            "Lower train.learning_rate or use train.mixed_precision=no."
                        )
                    acc.backward(loss)
                    if acc.sync_gradients:
                        clip_gradients(acc, params, train.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                if not acc.sync_gradients:
                    continue
                state.step += 1
                state.global_step += 1
                state.batch_in_epoch = position
                if state.step % train.log_every == 0 or state.step == stage.steps:
                    mean = acc.gather(loss.detach().reshape(1)).mean().item()
                    acc.log({"train/loss": mean, f"train/loss_stage_{stage.name}": mean}, step=state.global_step)
                    bar.set_postfix(loss=f"{mean:.4f}")
                bar.update()
                if self.on_step is not None:
                    self.on_step(state, batch)
                if state.step % train.checkpoint_every == 0 and state.step < stage.steps:
                    self._checkpoint(model, optimizer, lr_scheduler, state)
                if state.step >= stage.steps:
                    break
            else:
                state.epoch += 1
                state.batch_in_epoch = skip = 0
                continue
            break
        bar.close()

        state.stage_complete = True
        self._checkpoint(model, optimizer, lr_scheduler, state)
        self.state = state
        if acc.is_main_process:
            self.sample_grid(stage)
        acc.wait_for_everyone()
        acc.free_memory(model, optimizer, loader, lr_scheduler)

    def _loss(self, model, batch: dict, stage: Stage, tables: FrozenRankTables | None) -> torch.Tensor:
        """Epsilon-prediction MSE (or v-prediction, if the base scheduler says so) for one batch."""
        train = self.config.train
        if "latent_params" in batch:  # cached VAE latents: the encoder never runs here
            targets = sample_latents(batch["latent_params"], self.vae.config.scaling_factor)
        else:
            targets = encode_images(self.vae, batch["pixel_values"])
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
        features = self.text_embeddings.lookup(ids)
        frozen = tables.sum(ids, depth) if tables is not None else None
        prediction = model(noisy, timesteps, features, depth, frozen_sum=frozen, start=tables.levels if tables else 0)
        if train.snr_gamma is None:
            return F.mse_loss(prediction.float(), target.float())
        return min_snr_loss(prediction, target, timesteps, self.noise_scheduler, train.snr_gamma)

    def _checkpoint(self, model, optimizer, lr_scheduler, state: ckpt.TrainingState) -> None:
        acc = self.accelerator
        weights = None
        if acc.is_main_process:
            full = acc.unwrap_model(model).state_dict()
            weights = {k: v for k, v in full.items() if k in self.trained_keys}
        self.resume_from = ckpt.write_checkpoint(
            self.paths.checkpoints,
            state,
            weights,
            optimizer,
            lr_scheduler,
            acc.process_index,
            acc.is_main_process,
            acc.wait_for_everyone,
            self.config.train.keep_checkpoints,
            files={"config.yaml": self.paths.config.read_text(), "taxonomy.json": self.paths.taxonomy.read_text()}
            if acc.is_main_process
            else None,
        )

    # -- outputs ----------------------------------------------------------------------------------

    def pipeline(self):
        from ..pipeline import TaxaDiffusionPipeline, make_scheduler

        pipe = TaxaDiffusionPipeline(
            unet=self.model.unet,
            scheduler=make_scheduler(self.config.sample.scheduler, self.noise_scheduler.config),
            taxonomy_encoder=self.model.taxonomy_encoder,
            text_embeddings=self.text_embeddings,
            vae=self.vae,
        )
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
            cut = lineage.truncate(min(depth, lineage.depth))
            if cut not in rows:
                rows.append(cut)
        self.model.eval()
        with torch.random.fork_rng(devices=[]):
            images = self.pipeline()(
                rows,
                num_images_per_prompt=sample.grid_images,
                num_inference_steps=sample.steps,
                guidance=sample.guidance,
                guidance_scale=sample.scale,
                guidance_window=sample.window,
                generator=torch.Generator().manual_seed(0),
            ).images
        self.model.train()
        self.paths.samples.mkdir(parents=True, exist_ok=True)
        path = self.paths.samples / f"stage-{stage.name}.png"
        labels = [f"{lin.finest_rank}: {lin.scientific_name}" for lin in rows]
        image_grid(images, columns=sample.grid_images, labels=labels).save(path)
        return path

    def save_pipeline(self) -> Path:
        """The final pipeline folder (written aside, then renamed into place)."""
        target = self.paths.pipeline
        if self.accelerator.is_main_process:
            tmp = target.with_name(".tmp-pipeline")
            shutil.rmtree(tmp, ignore_errors=True)
            self.pipeline().save_pretrained(tmp)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
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
