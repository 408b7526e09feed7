"""The evaluation protocol (paper, sec. 4): for every taxon at each rank, generate N images conditioned down
to that rank and score them against the real images of that taxon.

Three stages, each leaving its output on disk so that a killed run resumes from it and processes share it:
1. generate: `out/images/<rank>/` is the folder `generate --per-taxon N --rank RANK --seed S` writes (the same
   files, seeds and metadata.csv), so that either feeds the other. It is reused when the evaluation is run again
   with the same model and every setting that shapes an image (`out/images/generation.json` records them; on a
   mismatch the images are refused, or replaced with `regenerate`). `--images DIR` scores a `generate` folder, an
   evaluation's `images/` or another system's images laid out as `<rank>/<taxon>/*.png`;
2. score each taxon: `out/scores/<key>/<rank>/<taxon>.safetensors` (`scores.py`);
3. each rank's metrics from its taxa's scores: `metrics.json`, with the settings that produced every number.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..atomic import is_temporary, write_text_atomic
from ..data.images import load_image, prepare_image
from ..data.records import RecordSet
from ..devices import PRECISIONS
from ..errors import InputError
from ..fingerprint import generation_key
from ..generate import (
    METADATA_FILE,
    GenerationPlan,
    claim_output,
    generate,
    generated_files,
    generation_tag,
    image_path,
    plan_items,
    write_metadata,
)
from ..names import lineage_folder
from ..sampling import Negative, Spacing
from ..saved_files import check_saved_folder
from ..shards import Share, wait_for
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


GENERATION_FILE = "generation.json"
# How `out/images` is laid out, recorded with the generation settings: folders of an older layout
# (`<rank>/<taxon>/NN.png`, other seeds) are refused, or replaced with `regenerate`, never mixed with these.
LAYOUT = "a generate folder per rank"


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
        self._key: dict | None = None  # what decides the generated pixels (`_generation_key`)
        self._plans: dict[Rank, GenerationPlan] = {}  # each rank's, made once (`_plan`)
        self._tables: dict[Path, dict] = {}  # `generate` folders' metadata.csv, read once each (`_listed`)
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
        """A taxon's generated images at the resolution: those this evaluation generated, or those of `--images`. A
        `generate` folder is read through its metadata.csv (the images conditioned on exactly the taxon's lineage),
        at the top of `--images` or per rank (an evaluation's `images/`); else `<rank>/<taxon>/*.png`."""
        files = self._image_files(rank, taxon)
        return [np.asarray(prepare_image(load_image(path), self.resolution, "squash")) for path in files]

    def _image_files(self, rank: Rank, taxon: Taxon) -> list[Path]:
        if self.images_dir is None:  # this evaluation's own: the plan's files that exist
            folder, tag = self._rank_folder(rank), generation_tag(self._generation_key())
            paths = [folder / image_path(self.taxonomy.lineage(taxon), tag, i) for i in range(self.settings.per_taxon)]
            return [path for path in paths if path.is_file()]
        for table in (self.images_dir, self.images_dir / rank.value):
            if (table / METADATA_FILE).is_file():
                return self._listed(table).get(taxon.path, [])
        base = self.images_dir / rank.value
        folder = base / taxon_folder(taxon)
        if not folder.is_dir():
            named = base / taxon.name
            folder = named if named.is_dir() and len(self.taxonomy.find(taxon.name, rank)) == 1 else folder
        # a kill -9 mid-write leaves a `.tmp-` file: never an image
        return sorted(p for p in folder.glob("*.png") if not is_temporary(p)) if folder.is_dir() else []

    def _listed(self, folder: Path) -> dict[tuple[str, ...], list[Path]]:
        """A `generate` folder's images by lineage, read once; the rows whose image is gone are said once."""
        if folder not in self._tables:
            self._tables[folder], missing = generated_files(folder, self.taxonomy.ranks)
            if missing:
                print(f"taxadiffusion: {missing} rows of {folder / METADATA_FILE} name no image; scored without")
        return self._tables[folder]

    # -- stage 1: generate ------------------------------------------------------------------------

    def _rank_folder(self, rank: Rank) -> Path:
        return self.out / "images" / rank.value

    def _plan(self, rank: Rank) -> GenerationPlan:
        """A rank's images as `generate --per-taxon N --rank RANK` plans them (same seeds, same files), for the taxa
        with real images; a one-text model draws each through its species in turn (`_prompt`). Made once a rank."""
        if rank in self._plans:
            return self._plans[rank]
        lineages = [
            self.taxonomy.lineage(taxon)
            for taxon in self.taxa(rank)
            if self.one_text is None or self._species_below(taxon)  # else nothing to draw it through (F4K's
        ]  # class labelled to family)
        prompt = self._prompt if self.one_text is not None else None
        items = plan_items([(lineage, self.settings.per_taxon) for lineage in lineages], self.settings.seed, prompt)
        self._plans[rank] = GenerationPlan(items, f"{self.settings.per_taxon} per taxon at {rank}")
        return self._plans[rank]

    def _generate(self, rank: Rank, taxa: list[Taxon], progress: bool, share: Share) -> None:
        """Generate the rank's missing images with `generate`: the plan is cut into fixed batches and process r
        draws batches r, r + w, ... whole, so every image is drawn in the same batch however many processes share
        the work or how often it was killed: the same pixels. Then wait for the images of this process's `taxa`
        that others drew. One process writes metadata.csv as it goes; with several the main one writes it at the
        end."""
        key, plan, folder = self._generation_key(), self._plan(rank), self._rank_folder(rank)
        generate(
            self.pipeline,
            plan,
            folder,
            key,
            batch_size=self.settings.batch_size,
            shard=(share.rank, share.world),
            write_table=share.world == 1,
            progress=progress,
            taxonomy=self.taxonomy,
            label=f"generating {rank}",
        )
        ours, tag = {taxon.path for taxon in taxa}, generation_tag(key)
        theirs = [folder / image_path(i.lineage, tag, i.index) for i in plan.items if i.lineage.names in ours]
        wait_for(theirs, "images", False)

    def _species_below(self, taxon: Taxon) -> list[Taxon]:
        """The species under a taxon, listed once per taxon (every image of it asks again)."""
        if taxon.path not in self._below:
            finest = self.taxonomy.ranks[-1]
            below = [t for t in self.taxonomy.taxa(finest) if t.path[: len(taxon.path)] == taxon.path]
            self._below[taxon.path] = below
        return self._below[taxon.path]

    def _prompt(self, lineage: Lineage, index: int) -> Lineage:
        """What image `index` of a taxon is conditioned on by a one-text model: the text of one of its species (in
        turn)."""
        species = self._species_below(self.taxonomy.by_path(lineage.names))
        text = self.one_text(self.taxonomy.lineage(species[index % len(species)]))
        known = self.pipeline.taxonomy
        return known.lineage(known.by_path((text,)))

    def _generation_key(self) -> dict:
        """What decides the pixels (`generate`'s key: model, sampling settings, seed); its tag names the files."""
        if self._key is None:
            self._key = generation_key(self.pipeline, self.settings.seed)
        return self._key

    def _record(self) -> dict:
        """What `out/images/generation.json` holds: the generation key and the layout."""
        return {**self._generation_key(), "layout": LAYOUT}

    def _claim_images(self, share: Share) -> None:
        """Record what generates the images in `out/images` (the generation key and the layout); images of another
        model, other settings or an older layout there are refused, or deleted with `regenerate` (only the files
        this evaluation writes). The main process claims; the others wait until the record names this model and
        these settings."""
        folder, record = self.out / "images", self._record()
        marker = folder / GENERATION_FILE
        if not share.is_main:
            recorded = json.loads(json.dumps(record))  # as the main process writes it (tuples become lists)
            while _read_json(marker) != recorded:
                time.sleep(0.2)
            return
        saved = _read_json(marker) if marker.is_file() else None
        if isinstance(saved, dict):  # recorded before a setting existed: the value it had then
            saved.setdefault("negative", Negative.ENCODED.value)
            saved.setdefault("spacing", Spacing.LEADING.value)
        ours = []  # listed only when the record differs: a resumed run of the same settings walks no folder
        if saved != record and folder.is_dir():
            ours = [p for p in folder.rglob("*.png") if not is_temporary(p)]
        if ours:
            changed = [k for k in record if saved.get(k) != record[k]] if isinstance(saved, dict) else []
            why = f"other {', '.join(changed)}" if changed else f"unknown settings (no {GENERATION_FILE})"
            if changed == ["layout"]:
                why = "an earlier version of evaluate (<rank>/<taxon>/NN.png, other seeds)"
            if not self.regenerate:
                raise InputError(
                    f"{folder} holds {len(ours)} images generated with {why}; pass --regenerate to replace them "
                    "with this model and these settings, or choose another --out"
                )
            print(f"taxadiffusion: regenerating {len(ours)} images in {folder} (they were made with {why})")
            for path in ours:
                path.unlink()
            for path in [*folder.glob(f"*/{METADATA_FILE}"), *folder.glob(f"*/{GENERATION_FILE}")]:
                path.unlink()
            for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if path.is_dir() and not any(path.iterdir()):  # the taxa's folders, emptied
                    path.rmdir()
        for rank in self.ranks:  # each rank's folder is a `generate` folder of this key
            claim_output(self._rank_folder(rank), self._generation_key(), add=False)
        write_text_atomic(marker, json.dumps(record, indent=1) + "\n")

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
        # The main process computes the metrics (each rank's taxa streamed from their files, a taxon at a time) and
        # the others read them: one copy of that work. Its copy beside the scores is this run's, never stale.
        done = self.out / "scores" / self._scores_key / "metrics.json"
        if not share.is_main:
            wait_for([done], "the metrics", False)
            return json.loads(done.read_text(encoding="utf-8"))
        wait_for([f for files in scores.values() for f in files.values()], "scores", progress)
        if self.pipeline is not None and share.world > 1:  # every image is on disk: the tables one process writes
            key = self._generation_key()
            for rank in self.ranks:
                write_metadata(self._rank_folder(rank), self.taxonomy, self._plan(rank), generation_tag(key), key)
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
        images = self._record() if self.pipeline is not None else {"images": str(self.images_dir)}
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
        taxa = [taxon for taxon, path in files.items() if TaxonScores.counts(path)[1]]  # with generated images
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
            name: group_metrics([files[t] for t in group], ranks, seed=self.settings.seed)
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
    precision: str = "fp32"  # the generating pipeline's weights and sampling: fp32, bf16 or fp16 (`--precision`)

    def __post_init__(self) -> None:
        if (self.model is None) == (self.images is None):
            raise InputError("give exactly one of --model DIR (generate and score) or --images DIR (score a folder)")
        if self.zero_shot is not None and self.model is None:
            raise InputError("a zero-shot evaluation prompts a prior: give it as --model")
        if self.precision not in PRECISIONS:
            raise InputError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")


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
    from ..devices import sampling_dtype
    from ..pipeline import TaxaDiffusionPipeline

    if inputs.model is None:
        return None, None
    dtype = sampling_dtype(inputs.precision)
    if inputs.zero_shot is not None:
        known = inputs.taxonomy or real.taxonomy()
        species = [known.lineage(t) for t in known.taxa(known.ranks[-1])]

        def caption(lineage: Lineage) -> str:
            return species_caption(inputs.zero_shot, lineage)

        pipeline = TaxaDiffusionPipeline.from_prior(inputs.model, sorted({caption(lineage) for lineage in species}))
        pipeline.to(device)
        if dtype != torch.float32:  # built from its parts in fp32: cast whole
            pipeline.to(dtype)
        # classifier-free guidance against the prior's own unconditional input (its "None" caption)
        pipeline.configure_sampling(guidance="vanilla")
        pipeline.configure_sampling(**(inputs.sampling_changes or {}))
        return pipeline, caption
    pipeline = TaxaDiffusionPipeline.from_pretrained(inputs.model, dtype=dtype).to(device)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.configure_sampling(**(inputs.sampling_changes or {}))
    if pipeline.taxonomy.ranks == (Rank.SPECIFIC_EPITHET,) and len(real.ranks) > 1:  # a one-text baseline
        return pipeline, lambda lineage: lineage.scientific_name
    return pipeline, None
