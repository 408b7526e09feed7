"""The evaluation protocol (paper, sec. 4): for every taxon at each rank, generate N images conditioned down
to that rank and score them against the real images of that taxon.

Three stages, each leaving its output on disk so that a killed run resumes from it and processes share it:
1. generate: `out/images/<rank>/<taxon>/NN.png`, reused when the evaluation is run again with the same model and
   every setting that shapes an image (`out/images/generation.json` records them; on a mismatch the images are
   refused, or replaced with `regenerate`); `--images DIR` scores another system's images laid out the same way;
2. score each taxon: `out/scores/<key>/<rank>/<taxon>.safetensors` (`scores.py`);
3. each rank's metrics from its taxa's scores: `metrics.json`, with the settings that produced every number.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import SchedulerMixin
from PIL import Image

from ..atomic import atomic_file, is_temporary, temporary, write_text_atomic
from ..data.images import load_image, prepare_image
from ..data.records import RecordSet
from ..errors import InputError
from ..names import lineage_folder
from ..sampling import Negative, Spacing
from ..saved_files import check_saved_folder
from ..shards import ONE_PROCESS, Share, wait_for
from ..taxonomy import Lineage, Rank, Taxon, Taxonomy, UnknownTaxonError
from .bioclip import BioCLIPScorer, taxon_text
from .classifier import TaxonClassifier
from .fid import FEATURE_NETWORK, RESIZE_RULE, InceptionFeatures
from .lpips import LPIPS
from .scores import Scorers, TaxonScores, group_metrics, score_taxon
from .settings import PROTOCOL_TEXT, EvalSettings


def taxon_folder(taxon: Taxon) -> str:
    """An unambiguous folder name for a taxon: its path's names as `names.lineage_folder` writes them (the rule
    `generate` and `sample` share; homonyms stay apart)."""
    return lineage_folder(taxon.path)


def image_seed(*parts: int) -> int:
    """The seed of one generated image: a function of (evaluation seed, rank level, taxon id, index)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


GENERATION_FILE = "generation.json"


def own_config(component) -> dict:
    """A component's config as far as it decides the outputs. A scheduler's holds only its own parameters:
    `from_config` also keeps the keys of the scheduler it was made from, so the same scheduler would read
    differently after another sequence of `--scheduler` choices. diffusers' bookkeeping keys (`_class_name`,
    `_diffusers_version`, `_name_or_path`, `_use_default_values`) are left out: they decide no pixel, and
    `_use_default_values` lists a set, in an order that changes from one process to the next."""
    config = {k: v for k, v in dict(getattr(component, "config", None) or {}).items() if not k.startswith("_")}
    if isinstance(component, SchedulerMixin):
        own = inspect.signature(type(component).__init__).parameters
        config = {k: v for k, v in config.items() if k in own}
    return config


def weights_digest(pipeline) -> str:
    """A hash of a pipeline's weights and configs (every component), whether loaded from disk or in memory."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(pipeline.components):
        component = pipeline.components[name]
        if component is None:
            continue
        digest.update(json.dumps([name, type(component).__name__, own_config(component)], default=str).encode())
        if isinstance(component, torch.nn.Module):
            for key, value in sorted(component.state_dict().items()):
                digest.update(key.encode())
                flat = value.detach().cpu().contiguous().reshape(-1)
                digest.update(str(value.dtype).encode() + memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def generation_key(pipeline, seed: int) -> dict:
    """What decides the pixels of a generated image: the model, its sampling settings and the seed."""
    return {"model": weights_digest(pipeline), **pipeline.sampling.to_dict(), "seed": seed}


def check_classifier(settings: EvalSettings) -> None:
    """The classifier folder, if one is set, is a saved taxonomic classifier (not a Hub id to reach)."""
    if settings.classifier:
        hint = "train one with `taxadiffusion classifier train`"
        check_saved_folder(settings.classifier, "a taxonomic classifier", "config.json", hint)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class Evaluation:
    """One evaluation run; `run()` returns the metrics dict and writes it with the report."""

    def __init__(
        self,
        real: RecordSet,
        out: str | Path,
        settings: EvalSettings,
        pipeline=None,
        images=None,
        taxonomy: Taxonomy | None = None,
        regenerate: bool = False,
        one_text: Callable[[Lineage], str] | None = None,
        device: str | torch.device | None = None,
    ):
        """`taxonomy`: the training taxonomy when scoring a folder of images or a one-text model, so that rare and
        common taxa are told apart by their training counts (default: the real set's own counts). `regenerate`:
        replace images generated earlier in `out` with another model or other settings (else they are refused).
        `one_text`: the pipeline knows one text per species (the flat and full baselines, a prior prompted
        zero-shot), the one this maps a species' lineage to; a taxon above species is drawn through its species
        in turn. `device`: where the scoring networks run (default: the pipeline's, else the CPU)."""
        if (pipeline is None) == (images is None):
            raise InputError("evaluate either a model (--model) or a folder of generated images (--images)")
        check_classifier(settings)  # before any image is generated
        self.settings = settings
        self.out = Path(out)
        self.pipeline = pipeline
        self.device = torch.device(device or (pipeline.device if pipeline is not None else "cpu"))
        if pipeline is not None and settings.sampling is not None:
            pipeline.configure_sampling(**settings.sampling.to_dict())
        self.regenerate = regenerate
        self._claimed: dict | None = None  # the generation key this evaluation checked and recorded
        self.images_dir = Path(images) if images else None
        self.one_text = one_text
        self._below: dict[tuple[str, ...], list[Taxon]] = {}  # one-text models: the species under each taxon
        own = pipeline is not None and one_text is None
        self.taxonomy: Taxonomy = pipeline.taxonomy if own else (taxonomy or real.taxonomy())
        if tuple(real.ranks) != tuple(self.taxonomy.ranks):
            ours, theirs = ", ".join(real.ranks), ", ".join(self.taxonomy.ranks)
            raise InputError(f"the real data's ranks ({ours}) differ from the model's ({theirs})")
        unknown = [r for r in settings.ranks if Rank.parse(r) not in self.taxonomy.ranks]
        if unknown:
            raise InputError(f"rank(s) {', '.join(unknown)} not in this taxonomy ({', '.join(self.taxonomy.ranks)})")
        self.ranks = [Rank.parse(r) for r in settings.ranks]
        self.resolution = settings.resolution or self._model_resolution()
        self.real_by_path: dict[tuple[str, ...], list[Path]] = {}
        for record in real:
            for depth in range(1, record.lineage.depth + 1):
                self.real_by_path.setdefault(record.lineage.names[:depth], []).append(record.image)

    def _model_resolution(self) -> int:
        if self.pipeline is None:
            raise InputError("give --resolution when scoring a folder of images")
        return self.pipeline.unet.config.sample_size * self.pipeline.vae_scale_factor

    # -- taxa and images --------------------------------------------------------------------------

    def taxa(self, rank: Rank) -> list[Taxon]:
        """Taxa at `rank` that have real images to compare with."""
        return [t for t in self.taxonomy.taxa(rank) if t.path in self.real_by_path]

    def real_images(self, taxon: Taxon) -> list[np.ndarray]:
        """A taxon's real images (at most `max_real_per_taxon`, drawn by the seed), centre-cropped to the resolution.
        Read again for each rank that needs them: holding them would grow with the dataset."""
        paths = sorted(self.real_by_path[taxon.path], key=str)
        if len(paths) > self.settings.max_real_per_taxon:
            paths = sorted(random.Random(self.settings.seed).sample(paths, self.settings.max_real_per_taxon), key=str)
        return [np.asarray(prepare_image(load_image(path), self.resolution, "random_crop", None)) for path in paths]

    def generated_images(self, rank: Rank, taxon: Taxon) -> list[np.ndarray]:
        """A taxon's generated images (those of `--images`, or those this evaluation generated), at the resolution.
        A `--images` folder written by `generate` is read through its metadata.csv: the images conditioned on
        exactly the taxon's lineage (`generate --per-taxon N --rank RANK` makes them for every taxon of a rank)."""
        if self.images_dir is not None and (self.images_dir / "metadata.csv").is_file():
            files = [self.images_dir / name for name in self._generated_by_lineage.get(taxon.path, [])]
            return [np.asarray(prepare_image(load_image(p), self.resolution, "squash")) for p in files]
        base = (self.images_dir or self.out / "images") / rank.value
        folder = base / taxon_folder(taxon)
        if not folder.is_dir():
            named = base / taxon.name
            folder = named if named.is_dir() and len(self.taxonomy.find(taxon.name, rank)) == 1 else folder
        # a kill -9 mid-write leaves a `.tmp-` file: never an image
        files = sorted(p for p in folder.glob("*.png") if not is_temporary(p)) if folder.is_dir() else []
        return [np.asarray(prepare_image(load_image(p), self.resolution, "squash")) for p in files]

    @functools.cached_property
    def _generated_by_lineage(self) -> dict[tuple[str, ...], list[str]]:
        """`generate`'s metadata.csv as {lineage names: image files}, in the order of its rows."""
        import csv

        found: dict[tuple[str, ...], list[str]] = {}
        missing = 0
        with open(self.images_dir / "metadata.csv", newline="", encoding="utf-8") as file:
            for row in csv.DictReader(file):
                if not (self.images_dir / row["file_name"]).is_file():
                    missing += 1  # an image moved or deleted after generation: counted, not scored
                    continue
                names = tuple(row[rank.value] for rank in self.taxonomy.ranks if row.get(rank.value))
                found.setdefault(names, []).append(row["file_name"])
        if missing:
            print(f"taxadiffusion: {missing} rows of {self.images_dir / 'metadata.csv'} name no image; scored without")
        return found

    def _generate(self, rank: Rank, taxa: list[Taxon], progress: bool, share: Share = ONE_PROCESS) -> None:
        """Generate the missing images of `taxa` (this process's share of the rank); each image has its own seeded
        generator. The rank's images are cut into fixed batches and process r draws batches r, r + w, ... whole,
        so every image is drawn in the same batch however many processes share the work or how often it was
        killed: the same pixels. Then it waits for the images of its taxa that others drew."""
        from tqdm.auto import tqdm

        self._claim_images(share)
        s = self.settings
        level = self.taxonomy.level(rank)
        jobs = []
        for taxon in self.taxa(rank):
            if self.one_text is not None and not self._species_below(taxon):
                continue  # nothing a one-text model can draw it through (F4K's class labelled to family)
            folder = self.out / "images" / rank.value / taxon_folder(taxon)
            jobs += [(taxon, i, folder / f"{i:02d}.png") for i in range(s.per_taxon)]
        batches = share.mine([jobs[i : i + s.batch_size] for i in range(0, len(jobs), s.batch_size)])
        missing = [batch for batch in batches if not all(target.is_file() for _, _, target in batch)]
        for batch in tqdm(missing, desc=f"generating {rank}", unit="batch", disable=not progress):
            lineages = [self._prompt(taxon, i) for taxon, i, _ in batch]
            generators = [torch.Generator().manual_seed(image_seed(s.seed, level, t.id, i)) for t, i, _ in batch]
            images = self.pipeline(lineages, generator=generators).images  # the pipeline's sampling settings
            for image, (_, _, target) in zip(images, batch, strict=True):
                target.parent.mkdir(parents=True, exist_ok=True)
                temporary(target).unlink(missing_ok=True)  # a killed run's partial image
                with atomic_file(target) as tmp:
                    image.save(tmp, format="PNG")
        ours = set(taxa)
        wait_for([target for taxon, _, target in jobs if taxon in ours], "images", False)

    def _species_below(self, taxon: Taxon) -> list[Taxon]:
        """The species under a taxon, listed once per taxon (every image of it asks again)."""
        if taxon.path not in self._below:
            finest = self.taxonomy.ranks[-1]
            below = [t for t in self.taxonomy.taxa(finest) if t.path[: len(taxon.path)] == taxon.path]
            self._below[taxon.path] = below
        return self._below[taxon.path]

    def _prompt(self, taxon: Taxon, index: int) -> Lineage:
        """What image `index` of a taxon is conditioned on: the taxon's lineage, or for a one-text model the text
        of one of its species (in turn)."""
        if self.one_text is None:
            return self.taxonomy.lineage(taxon)
        species = self._species_below(taxon)
        text = self.one_text(self.taxonomy.lineage(species[index % len(species)]))
        known = self.pipeline.taxonomy
        return known.lineage(known.by_path((text,)))

    def _claim_images(self, share: Share = ONE_PROCESS) -> dict:
        """Record what generates the images in `out/images`; images of another model or other settings there
        are refused, or deleted with `regenerate` (only the files this evaluation writes). The main process
        claims; the others wait until the record names this model and these settings."""
        if self._claimed is not None:  # checked once per evaluation: the model and settings do not change
            return self._claimed
        folder = self.out / "images"
        key = generation_key(self.pipeline, self.settings.seed)
        marker = folder / GENERATION_FILE
        if not share.is_main:
            recorded = json.loads(json.dumps(key))  # as the main process writes it (tuples become lists)
            while _read_json(marker) != recorded:
                time.sleep(0.2)
            self._claimed = key
            return key
        ours = sorted(folder.glob("*/*/[0-9][0-9]*.png")) if folder.is_dir() else []
        saved = None
        if marker.is_file():
            try:
                saved = json.loads(marker.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                saved = {}
            if isinstance(saved, dict):  # recorded before a setting existed: the value it had then
                saved.setdefault("negative", Negative.ENCODED.value)
                saved.setdefault("spacing", Spacing.LEADING.value)
        if ours and saved != key:
            changed = [k for k in key if (saved or {}).get(k) != key[k]] if saved is not None else []
            why = f"other {', '.join(changed)}" if changed else f"unknown settings (no {GENERATION_FILE})"
            if not self.regenerate:
                raise InputError(
                    f"{folder} holds {len(ours)} images generated with {why}; pass --regenerate to replace them "
                    "with this model and these settings, or choose another --out"
                )
            print(f"taxadiffusion: regenerating {len(ours)} images in {folder} (they were made with {why})")
            for path in ours:
                path.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(marker, json.dumps(key, indent=1) + "\n")
        self._claimed = key
        return key

    # -- metrics ----------------------------------------------------------------------------------

    def run(self, progress: bool = True, features: InceptionFeatures | None = None, share: Share | None = None) -> dict:
        """Score every rank, in stages that each leave their output on disk: generate (`images/`), score each taxon
        (`scores/`), then each rank's metrics from its taxa's scores (`metrics.json`). Under `accelerate launch` or
        torchrun each process takes every world-th taxon of a rank; the main process waits for every taxon's scores
        by watching the folder and computes the metrics, and the others read them. `features`: an Inception
        extractor shared between evaluations (its memo featurises each real image once for all of them)."""
        share = share or Share.from_environment()
        self.out.mkdir(parents=True, exist_ok=True)
        if self.pipeline is not None:  # the main process claims `images/` before any process names a scores file
            self._claim_images(share)
        scores = {}
        for rank in self.ranks:
            taxa = self.taxa(rank)
            scores[rank] = {taxon: self._scores_file(rank, taxon) for taxon in taxa}
            mine = share.mine(taxa)
            if self.pipeline is not None:
                self._generate(rank, mine, progress, share)
            self._score(rank, [t for t in mine if not scores[rank][t].is_file()], features, progress)
        # The main process computes the metrics (each rank's features loaded at once) and the others read them: one
        # copy of that work and memory, not one per process. Its copy beside the scores is this run's, never stale.
        done = self.out / "scores" / self._scores_key / "metrics.json"
        if not share.is_main:
            wait_for([done], "the metrics", False)
            return json.loads(done.read_text(encoding="utf-8"))
        wait_for([f for files in scores.values() for f in files.values()], "scores", progress)
        results = {rank.value: self._rank_metrics(rank, files) for rank, files in scores.items()}
        metrics = {"settings": self._settings(FEATURE_NETWORK, RESIZE_RULE), "ranks": results}
        for path in (done, self.out / "metrics.json"):
            write_text_atomic(path, json.dumps(metrics, indent=1) + "\n")
        return metrics

    def _scores_file(self, rank: Rank, taxon: Taxon) -> Path:
        """Where a taxon's scores at a rank go: under a folder named by everything that decides them (a scoring
        setting or other images: another folder, never a stale file)."""
        return self.out / "scores" / self._scores_key / rank.value / f"{taxon_folder(taxon)}.safetensors"

    @functools.cached_property
    def _scores_key(self) -> str:
        settings = {**asdict(self.settings), "sampling": None, "resolution": self.resolution}
        images = self._claim_images() if self.pipeline is not None else {"images": str(self.images_dir)}
        payload = json.dumps([settings, images], sort_keys=True, default=str)
        return hashlib.blake2b(payload.encode(), digest_size=8).hexdigest()

    def _score(self, rank: Rank, taxa: list[Taxon], features, progress: bool) -> None:
        """Score each taxon alone (its images read, scored and let go) and save the numbers."""
        from tqdm.auto import tqdm

        if not taxa:
            return
        scorers = self._scorers(features)
        for taxon in tqdm(taxa, desc=f"scoring {rank}", unit="taxon", disable=not progress):
            fake = self.generated_images(rank, taxon)
            real = self.real_images(taxon) if fake else []
            truth = self._truth(scorers.classifier, rank, taxon) if scorers.classifier is not None else None
            scores = score_taxon(scorers, real, fake, self.settings.metric_size, truth, self._bioclip_text(taxon))
            scores.save(self._scores_file(rank, taxon))

    def _scorers(self, features: InceptionFeatures | None) -> Scorers:
        """The scoring networks, loaded once an evaluation has something to score, on the evaluation's device."""
        if self.__dict__.get("scorers") is None:
            features = features or InceptionFeatures(self.settings.inception)
            scorers = Scorers(features, self._lpips(), self._classifier(), self._bioclip())
            self.__dict__["scorers"] = scorers.to(self.device)
        return self.__dict__["scorers"]

    def _rank_metrics(self, rank: Rank, files: dict[Taxon, Path]) -> dict:
        """A rank's metrics over all its taxa and over the rare and the common ones, and its sample sheet."""
        loaded = {taxon: TaxonScores.load(path) for taxon, path in files.items()}
        taxa = [taxon for taxon, scores in loaded.items() if not scores.empty]
        if not taxa:
            raise InputError(f"no {rank} taxon has both real and generated images")
        (self.out / "grids").mkdir(exist_ok=True)
        shown = {t.path: self.generated_images(rank, t) for t in taxa[:8]}
        save_grid(shown, taxa[:8], self.out / "grids" / f"{rank.value}.png")
        threshold = self.settings.rare_threshold
        groups = {"all": taxa, "rare": [t for t in taxa if t.count < threshold]}
        groups["common"] = [t for t in taxa if t.count >= threshold]
        ranks = [r.value for r in self.taxonomy.ranks[: self.taxonomy.level(rank) + 1]]
        return {
            name: group_metrics([loaded[t] for t in group], ranks, seed=self.settings.seed)
            for name, group in groups.items()
            if group
        }

    def _truth(self, classifier, rank: Rank, taxon: Taxon) -> torch.Tensor:
        """The taxon's ids in the classifier's taxonomy down to `rank` (-1 where it does not know the taxon)."""
        ids = []
        for depth in range(1, self.taxonomy.level(rank) + 2):
            try:
                ids.append(classifier.taxonomy.by_path(taxon.path[:depth]).id)
            except UnknownTaxonError:
                ids.append(-1)
        return torch.tensor(ids + [-1] * (len(classifier.taxonomy.ranks) - len(ids)))

    def _bioclip_text(self, taxon: Taxon) -> str:
        return taxon_text(taxon.path, self.settings.bioclip_template)

    def _lpips(self):
        return LPIPS(self.settings.lpips_net)

    def _classifier(self):
        if not self.settings.classifier:
            return None
        model = TaxonClassifier.from_pretrained(self.settings.classifier).eval()
        if tuple(model.taxonomy.ranks) != tuple(self.taxonomy.ranks):
            raise InputError("the classifier was trained on a taxonomy with other ranks")
        return model

    def _bioclip(self):
        if not self.settings.bioclip:
            return None
        return BioCLIPScorer(self.settings.bioclip, self.settings.bioclip_tokenizer)

    def _settings(self, network: str, resize: str) -> dict:
        import diffusers
        import torchmetrics
        import transformers

        from .. import __version__

        settings = asdict(self.settings)
        del settings["sampling"]
        if self.pipeline is not None:  # flat, as the report reads them
            settings.update(self.pipeline.sampling.to_dict())
        settings.update(
            resolution=self.resolution,
            model=str(self.pipeline.name_or_path) if self.pipeline is not None else None,
            images=str(self.images_dir) if self.images_dir else None,
            feature_network=network,
            resize_rule=resize,
            protocol_description=PROTOCOL_TEXT[self.settings.protocol],
            lpips=f"LPIPS v0.1, {self.settings.lpips_net} backbone, paired real/generated per taxon",
            versions={
                "taxadiffusion": __version__,
                "torch": torch.__version__,
                "torchmetrics": torchmetrics.__version__,
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
            },
        )
        return settings


def save_grid(images: dict, taxa: list[Taxon], path: Path, per_row: int = 6) -> None:
    """A sample sheet: one row per taxon."""
    from ..grid import image_grid

    rows = [t for t in taxa if t.path in images]
    tiles = []
    for taxon in rows:
        picked = images[taxon.path][:per_row]
        tiles += [Image.fromarray(a) for a in picked] + [Image.new("RGB", Image.fromarray(picked[0]).size, "white")] * (
            per_row - len(picked)
        )
    image_grid(tiles, columns=per_row, labels=[t.name for t in rows]).save(path)


def species_caption(template: str, lineage: Lineage) -> str:
    """A species' caption from a template over `{scientific_name}` and the rank names (`{genus}`, `{family}`)."""
    names = {rank.value: name for rank, name in zip(lineage.ranks, lineage.names, strict=False)}
    try:
        return template.format(scientific_name=lineage.scientific_name, **names)
    except (KeyError, IndexError, ValueError) as error:
        raise InputError(f"caption template {template!r}: {error} is not {{scientific_name}} or a rank") from None


@dataclass
class EvalInputs:
    """What an evaluation compares: the real images, and what generates the other side (a saved pipeline, a prior
    prompted zero-shot, or a folder of images generated before)."""

    data: tuple[str, str | Path]  # (reader format, path) of the real images
    model: str | Path | None = None  # a saved pipeline; with `zero_shot`, a prior made by `pretrain`
    images: str | Path | None = None  # or: score the images of this folder (<rank>/<taxon>/*.png)
    root: str | Path | None = None  # image root of `data`
    split: str | None = None  # keep only this split of `data`
    # A caption template per species ("a photo of {scientific_name}") that prompts the prior unadapted: the
    # paper's SD row.
    zero_shot: str | None = None
    # The training taxonomy of a one-text or zero-shot model, whose counts tell rare taxa from common ones
    # (default: the real set's).
    taxonomy: Taxonomy | None = None
    sampling_changes: dict | None = None  # sampling settings that differ from the model's saved ones

    def __post_init__(self) -> None:
        if (self.model is None) == (self.images is None):
            raise InputError("give exactly one of --model DIR (generate and score) or --images DIR (score a folder)")
        if self.zero_shot is not None and self.model is None:
            raise InputError("a zero-shot evaluation prompts a prior: give it as --model")


def evaluate(
    inputs: EvalInputs,
    out: str | Path,
    settings: EvalSettings,
    device: str = "cpu",
    *,
    regenerate: bool = False,
    progress: bool = True,
) -> dict:
    """The whole evaluation: read the real images, generate with the model (or score the folder of images),
    score every rank, and write `metrics.json` and the report into `out`. A model that knows only species names
    (the flat and full baselines, a prior prompted zero-shot) draws each taxon through its species."""
    from ..data.readers import read_records
    from .report import write_report

    check_classifier(settings)  # before the data and the model load
    real = read_records(inputs.data[0], inputs.data[1], root=inputs.root)
    if inputs.split:
        real = real.split(inputs.split)
    pipeline, one_text = _generator(inputs, real, device)
    evaluation = Evaluation(
        real,
        out,
        settings,
        pipeline,
        inputs.images,
        taxonomy=inputs.taxonomy,
        regenerate=regenerate,
        one_text=one_text,
        device=device,
    )
    metrics = evaluation.run(progress)
    if Share.from_environment().is_main:
        write_report(out, {Path(out).name: metrics})
    return metrics


def _generator(inputs: EvalInputs, real: RecordSet, device: str) -> tuple:
    """The pipeline that generates (None for a folder of images) and, for a model that reads one text per
    species, the text of a lineage (else None)."""
    from ..pipeline import TaxaDiffusionPipeline

    if inputs.model is None:
        return None, None
    if inputs.zero_shot is not None:
        known = inputs.taxonomy or real.taxonomy()
        species = [known.lineage(t) for t in known.taxa(known.ranks[-1])]

        def caption(lineage: Lineage) -> str:
            return species_caption(inputs.zero_shot, lineage)

        pipeline = TaxaDiffusionPipeline.from_prior(inputs.model, sorted({caption(lineage) for lineage in species}))
        # classifier-free guidance against the prior's own unconditional input (its "None" caption)
        pipeline.to(device).configure_sampling(guidance="vanilla")
        pipeline.configure_sampling(**(inputs.sampling_changes or {}))
        return pipeline, caption
    pipeline = TaxaDiffusionPipeline.from_pretrained(inputs.model).to(device)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.configure_sampling(**(inputs.sampling_changes or {}))
    if pipeline.taxonomy.ranks == (Rank.SPECIFIC_EPITHET,) and len(real.ranks) > 1:  # a one-text baseline
        return pipeline, lambda lineage: lineage.scientific_name
    return pipeline, None
