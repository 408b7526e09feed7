"""A prior made by `pretrain`, then adapted by the published recipe (LoRA, `unet_stages: first`), then sampled."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from taxadiffusion.cli import main
from tiny_models import TINY_MODEL, write_two_rank_dataset

PRIOR_MODEL = TINY_MODEL | {"tiny": TINY_MODEL["tiny"] | {"patch_size": 2, "text_projection": True}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_two_rank_dataset(tmp_path_factory.mktemp("two-rank"))


def prior_config(path, data, text_encoder, **train):
    config = {
        "model": PRIOR_MODEL,
        "text": {"encoder": str(text_encoder), "template": "{name}"},
        "data": {"format": "folder", "path": str(data), "crop": "squash"},
        "caption": {"rank": "genus", "template": "a photo of {genus}"},
        "train": {"strategy": "prior", "steps": 3, "batch_size": 4, "checkpoint_every": 2, "learning_rate": 1e-3}
        | train,
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def prior(data, tiny_sd, tmp_path_factory):
    root = tmp_path_factory.mktemp("prior")
    config = prior_config(root / "prior.yaml", data, tiny_sd, ema_decay=0.9)
    assert main(["pretrain", "--config", str(config), "--output", str(root / "run")]) == 0
    return root / "run"


def test_pretrain_writes_a_base_folder(prior, tiny_sd):
    info = json.loads((prior / "prior.json").read_text())
    assert info["format"] == "taxadiffusion.prior" and info["text_encoder"] == str(tiny_sd)
    assert info["codec"] == "patches" and info["resolution"] == 16
    assert len(info["captions"]) == 2 and all(c.startswith("a photo of ") for c in info["captions"])
    unet_config = json.loads((prior / "unet" / "config.json").read_text())
    assert unet_config["encoder_hid_dim"] == 32  # reads the text encoder's features as SD reads CLIP's
    assert json.loads((prior / "vae" / "config.json").read_text())["_class_name"] == "SpaceToDepth"


def test_the_published_recipe_adapts_the_prior(prior, data, tiny_sd, tmp_path, capsys):
    config = {
        "model": {"base": str(prior), "resolution": 16, "finetune": "lora", "encoder_heads": 4},
        "text": {"encoder": "base"},
        "data": {"format": "folder", "path": str(data), "crop": "squash"},
        "train": {"steps": [2, 2], "batch_size": 4, "unet_stages": "first", "learning_rate": 1e-3},
        "sample": {"steps": 2, "grid_taxa": 2, "grid_images": 2},
    }
    path = tmp_path / "adapt.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path), "--output", str(tmp_path / "run")]) == 0
    pipeline = tmp_path / "run" / "pipeline"
    base = load_file(prior / "unet" / "diffusion_pytorch_model.safetensors")
    adapted = load_file(pipeline / "unet" / "diffusion_pytorch_model.safetensors")
    assert base.keys() == adapted.keys() and all(torch.equal(base[k], adapted[k]) for k in base)  # frozen UNet
    lora = load_file(pipeline / "pytorch_lora_weights.safetensors")
    assert lora and all("lora" in k for k in lora)
    encoder = json.loads((pipeline / "taxonomy_encoder" / "config.json").read_text())
    assert encoder["cross_attention_dim"] == encoder["text_width"] == 32  # no projection of its own
    from taxadiffusion.taxonomy import Taxonomy

    genus = Taxonomy.load(tmp_path / "run" / "taxonomy.json").taxa("genus")[0].name
    out = tmp_path / "samples"
    assert main(["sample", "--model", str(pipeline), "--taxon", genus, "--n", "2", "--out", str(out)]) == 0
    assert len(list(out.glob("*.png"))) == 3
    # Every weights file the run wrote (pipeline, checkpoints, text cache) is as readable as its configs.
    assert_readable_like_other_files(tmp_path / "run")
    capsys.readouterr()


def assert_readable_like_other_files(folder: Path) -> None:
    """safetensors 0.8 leaves what it writes at 0600; the project's saves give them the umask's mode."""
    from taxadiffusion.saved_files import new_file_mode

    weights = list(folder.rglob("*.safetensors"))
    assert weights and {oct(f.stat().st_mode & 0o777) for f in weights} == {oct(new_file_mode())}


def test_the_frozen_lora_is_fused_and_a_killed_run_resumes_bit_for_bit(prior, data, tmp_path):
    """After stage 0 the LoRA is merged into the weights it adapts (a shorter step). A run killed inside a fused
    stage, EMA on, resumes to the same pipeline bit for bit, whose UNet is the prior's own."""
    from taxadiffusion.config import Config
    from taxadiffusion.model import lora_fused
    from taxadiffusion.train.trainer import Trainer

    train = {"steps": [2, 3], "batch_size": 4, "unet_stages": "first", "learning_rate": 1e-3, "checkpoint_every": 1}
    config = Config.from_dict(
        {
            "model": {"base": str(prior), "resolution": 16, "finetune": "lora", "encoder_heads": 4},
            "text": {"encoder": "base"},
            "data": {"format": "folder", "path": str(data), "crop": "squash"},
            "train": train | {"ema_decay": 0.9, "condition_dropout": 0.2},
            "sample": {"steps": 2, "grid_taxa": 2, "grid_images": 2},
        }
    )
    seen = []
    trainer = Trainer(
        config,
        tmp_path / "whole",
        progress=False,
        on_step=lambda state, batch: seen.append((state.stage, lora_fused(trainer.model.unet))),
    )
    whole = trainer.run()
    assert seen == [(0, False)] * 2 + [(1, True)] * 3
    plan = (tmp_path / "whole" / "plan.txt").read_text().splitlines()
    assert ["LoRA fused" in line for line in plan if line.startswith("stage ")] == [False, True]

    def kill(state, batch):
        if state.global_step == 4:  # stage 1, step 2: resumes from its checkpoint at step 1, fused again
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(config, tmp_path / "killed", progress=False, on_step=kill).run()
    resumed = Trainer(config, tmp_path / "killed", progress=False).run()
    files = sorted(p.relative_to(whole) for p in whole.rglob("*.safetensors"))
    assert files == sorted(p.relative_to(resumed) for p in resumed.rglob("*.safetensors")) and len(files) >= 3
    for name in files:
        a, b = load_file(whole / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    base = load_file(prior / "unet" / "diffusion_pytorch_model.safetensors")
    saved = load_file(whole / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(base[k], saved[k]) for k in base)  # unfused bit for bit before saving


def test_the_plan_counts_the_priors_own_token_length(prior, data, tiny_sd, tmp_path, capsys):
    """`text.encoder: base` takes the prior's `text.max_length` unless given fewer; the dry run's memory plan must
    count it too."""
    import shutil

    base = shutil.copytree(prior, tmp_path / "prior")
    info = json.loads((base / "prior.json").read_text())
    (base / "prior.json").write_text(json.dumps(info | {"max_length": 12}))
    config = {
        "model": {"base": str(base), "resolution": 16, "finetune": "lora", "encoder_heads": 4},
        "text": {"encoder": "base"},
        "data": {"format": "folder", "path": str(data), "crop": "squash"},
        "train": {"steps": [2, 2], "batch_size": 4, "unet_stages": "first"},
    }
    path = tmp_path / "adapt.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path), "--output", str(tmp_path / "run"), "--dry-run"]) == 0
    assert " x 12 tokens x 32 " in capsys.readouterr().out
    # fewer tokens than the prior's captions had: the rank texts need only their own
    shorter = ["--set", "text.max_length=8", "--output", str(tmp_path / "short"), "--dry-run"]
    assert main(["train", "--config", str(path), *shorter]) == 0
    assert " x 8 tokens x 32 " in capsys.readouterr().out
    longer = ["--set", "text.max_length=13", "--output", str(tmp_path / "long"), "--dry-run"]
    assert main(["train", "--config", str(path), *longer]) == 2
    assert "trained with text.max_length 12, not 13; set text.max_length to at most 12" in capsys.readouterr().err
    # a prior pretrained further may read longer captions: its whole UNet trains on them
    further = prior_config(tmp_path / "further.yaml", data, tiny_sd)
    longer = ["--set", f"model.base={base}", "--set", "text.max_length=13", "--output", str(tmp_path / "f")]
    assert main(["pretrain", "--config", str(further), *longer, "--dry-run"]) == 0
    assert " x 13 tokens x 32 " in capsys.readouterr().out


@pytest.mark.parametrize("strategy", ["flat", "full"])
def test_one_text_baselines_on_a_prior_read_the_caption_through_its_text_path(prior, data, tmp_path, strategy):
    """SD + LoRA and SD + full fine-tuning: the species caption goes through the prior's own text path (no
    rank-encoder layers to train), as diffusers' text-to-image scripts train SD."""
    from taxadiffusion.config import Config
    from taxadiffusion.train.trainer import Trainer

    config = Config.from_dict(
        {
            "model": {"base": str(prior), "resolution": 16, "finetune": "lora", "encoder_heads": 4},
            "text": {"encoder": "base", "template": "a photo of {name}"},
            "data": {"format": "folder", "path": str(data), "crop": "squash"},
            "train": {"strategy": strategy, "steps": [1, 1], "batch_size": 4},
            "sample": {"steps": 2, "grid_taxa": 1, "grid_images": 1},
        }
    )
    trainer = Trainer(config, tmp_path / "run", progress=False)
    encoder = trainer.model.taxonomy_encoder
    assert not list(encoder.parameters())  # the text features themselves
    (stage,) = trainer.stages
    trained = trainer.model.configure_trainable(stage.unet, stage.encoder_levels)
    unet_parameters = list(trainer.model.unet.parameters())
    if strategy == "flat":
        assert trained and all(any(p is q for q in unet_parameters) for p in trained)  # the LoRA alone
        assert len(trained) < len(unet_parameters)
    else:
        assert len(trained) == len(unet_parameters)  # the whole UNet
    assert "the base's own text path" in trainer.describe()
    pipeline = trainer.run()
    if strategy == "flat":  # a species-only model is evaluated at every rank through its species
        out = tmp_path / "eval"
        assert (
            main(["evaluate", "--model", str(pipeline), "--data", "folder", str(data), "--out", str(out), *EVAL]) == 0
        )
        metrics = json.loads((out / "metrics.json").read_text())
        assert set(metrics["ranks"]) == {"genus", "specific_epithet"}
        assert len(list((out / "images" / "genus").glob("images/*/*.png"))) == 2 * len(metrics_taxa(metrics, "genus"))


EVAL = ["--ranks", "genus,specific_epithet", "--per-taxon", "2", "--steps", "2", "--max-real", "3"]


def metrics_taxa(metrics: dict, rank: str) -> range:
    return range(metrics["ranks"][rank]["all"]["taxa"])


def test_zero_shot_prompts_the_prior_with_species_captions(prior, data, tmp_path, capsys):
    """The paper's SD row: the prior, unadapted, prompted with a caption per species; classifier-free guidance
    against its own unconditional input."""
    out = tmp_path / "zero-shot"
    args = ["evaluate", "--model", str(prior), "--zero-shot", "a photo of {scientific_name}", "--data", "folder"]
    assert main([*args, str(data), "--out", str(out), *EVAL]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["ranks"]) == {"genus", "specific_epithet"} and metrics["settings"]["guidance"] == "vanilla"
    species = metrics["ranks"]["specific_epithet"]["all"]["taxa"]
    assert len(list((out / "images" / "specific_epithet").glob("images/*/*.png"))) == 2 * species
    capsys.readouterr()
    assert main([*args[:4], "a photo of {colour}", *args[5:], str(data), "--out", str(tmp_path / "x"), *EVAL]) == 2
    assert "not {scientific_name} or a rank" in capsys.readouterr().err


def adapt_config(path: Path, base, data, text_encoder: str) -> Path:
    """An adaptation config of `base` (a prior's folder or packed file) at 16 px, written to `path`."""
    config = {
        "model": {"base": str(base), "resolution": 16, "encoder_heads": 4},
        "text": {"encoder": text_encoder},
        "data": {"format": "folder", "path": str(data)},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_prior_refuses_another_text_encoder_or_resolution(prior, data, tmp_path, capsys):
    path = adapt_config(tmp_path / "adapt.yaml", prior, data, "minilm")
    assert main(["train", "--config", str(path), "--output", str(tmp_path / "o"), "--dry-run"]) == 2
    assert "trained with text encoder" in capsys.readouterr().err
    args = ["--set", "text.encoder=base", "--set", "model.resolution=32"]
    assert main(["train", "--config", str(path), *args, "--output", str(tmp_path / "o"), "--dry-run"]) == 2
    assert "trained at 16 px" in capsys.readouterr().err


def test_caption_ranks_are_checked(data, tiny_sd, tmp_path, capsys):
    path = prior_config(tmp_path / "p.yaml", data, tiny_sd)
    absent = ["--set", "caption.template=a photo of {family}"]  # the dataset has genus and species only
    assert main(["pretrain", "--config", str(path), *absent, "--output", str(tmp_path / "o"), "--dry-run"]) == 2
    assert "does not have" in capsys.readouterr().err
    finer = ["--set", "caption.template=a photo of {specific_epithet}"]
    assert main(["pretrain", "--config", str(path), *finer, "--output", str(tmp_path / "o"), "--dry-run"]) == 2
    assert "finer than caption.rank" in capsys.readouterr().err
    assert main(["train", "--config", str(path), "--output", str(tmp_path / "o"), "--dry-run"]) == 2
    assert "taxadiffusion pretrain" in capsys.readouterr().err
    looks = ["--set", "caption.template=a photo of {genus}, {appearance}"]  # photos have no traits to describe
    assert main(["pretrain", "--config", str(path), *looks, "--output", str(tmp_path / "o"), "--dry-run"]) == 2
    assert "is not synthetic" in capsys.readouterr().err


def test_each_corpus_entry_may_name_its_own_species(tmp_path):
    """The prior of the birds benchmarks: other species captioned with their binomial, family and order, beside
    the evaluated ones captioned down to the order; `data` keeps the prior's caption."""
    from taxadiffusion.config import Config
    from taxadiffusion.errors import ConfigError
    from taxadiffusion.train.plan import run_records

    def table(name: str, rows: list[tuple[str, ...]]) -> str:
        folder = tmp_path / name
        folder.mkdir()
        header = "file_name,class,order,family,genus,specific_epithet\n"
        lines = [f"{i}.png," + ",".join(row) + "\n" for i, row in enumerate(rows)]
        for i in range(len(rows)):
            Image.new("RGB", (8, 8)).save(folder / f"{i}.png")
        (folder / "metadata.csv").write_text(header + "".join(lines))
        return str(folder / "metadata.csv")

    evaluated = table("evaluated", [("Aves", "Passeriformes", "Parulidae", "Setophaga", "kirtlandii")])
    others = [
        ("Aves", "Passeriformes", "Pellorneidae", "Malacocincla", "abbotti"),
        ("Aves", "Piciformes", "Picidae", "Picus", ""),
    ]
    named = {"rank": "specific_epithet", "template": "a photo of {genus} {specific_epithet}, {family}, {order}"}
    config = Config.from_dict(
        {
            "data": {"format": "csv", "path": evaluated, "crop": "squash"},
            "corpus": [{"format": "csv", "path": table("others", others), "crop": "squash", "caption": named}],
            "caption": {"rank": "order", "template": "a photo of {class}, {order}"},
            "text": {"template": "{name}"},
            "train": {"strategy": "prior"},
        }
    )
    records, _ = run_records(config, tmp_path / "render")
    texts = [record.lineage.names[0] for record in records]
    assert texts == ["a photo of Aves, Passeriformes", "a photo of Malacocincla abbotti, Pellorneidae, Passeriformes"]
    assert dict(records.skipped) == {"not labelled down to specific_epithet (caption)": 1}  # counted, not lost
    with pytest.raises(ConfigError, match=r"data\.caption"):
        Config.from_dict({"data": {"format": "csv", "path": evaluated, "caption": named}})


def test_appearance_captions_describe_each_look_and_name_nothing_below_the_caption_rank(tmp_path):
    from taxadiffusion.config import CaptionConfig
    from taxadiffusion.data.synthetic import SyntheticConfig, SyntheticTaxonomy
    from taxadiffusion.taxonomy import Rank
    from taxadiffusion.train.plan import caption_records

    taxonomy = SyntheticTaxonomy(SyntheticConfig(seed=1, max_images=3, min_images=2))
    caption = CaptionConfig(rank="order", template="a photo of {class}, {order}: {appearance}")
    assert caption.ranks == [Rank.CLASS, Rank.ORDER] and caption.describes
    source = taxonomy.records(tmp_path)
    records = caption_records([source], [caption], [taxonomy])
    by_species = {}
    for image, captioned in zip(source, records, strict=True):
        text = captioned.lineage.name(Rank.SPECIFIC_EPITHET)
        by_species.setdefault(taxonomy.species_of(image.lineage).index, set()).add(text)
    assert len(records) == sum(s.n_images for s in taxonomy.species)
    assert all(len(texts) == 1 for texts in by_species.values())  # one caption per species' images
    texts = {text for group in by_species.values() for text in group}
    looks = {
        (
            s.traits.shape,
            s.traits.elongation,
            s.traits.tail,
            s.traits.body_hue,
            s.traits.pattern,
            s.traits.density,
            s.traits.accent,
        )
        for s in taxonomy.species
    }
    assert len(texts) == len(looks)  # distinct looks, distinct words
    finer = {name.lower() for s in taxonomy.species for name in s.lineage.names[4:]}
    words = {word.strip(",:").lower() for text in texts for word in text.split()}
    assert words.isdisjoint(finer)


def test_the_shipped_prior_loads_offline_and_is_the_committed_recipe(tmp_path, monkeypatch):
    """`model.base: packaged:demo` is one safetensors file in the package, made from configs/prior_demo.yaml."""
    from safetensors import safe_open

    from taxadiffusion.config import Config
    from taxadiffusion.model import build_denoiser
    from taxadiffusion.prior import packaged_file, read_prior
    from taxadiffusion.train.plan import text_encoder_spec

    shipped = packaged_file("demo")
    assert shipped.stat().st_size <= 25 * 2**20
    with safe_open(str(shipped), framework="pt") as handle:
        recipe = handle.metadata()["recipe"]
    committed = Path(__file__).resolve().parents[1] / "configs" / "prior_demo.yaml"
    assert recipe == committed.read_text(encoding="utf-8")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # unpacked into the user's cache, once
    config = Config.load(Path(__file__).resolve().parents[1] / "configs" / "demo_prior.yaml")
    prior = read_prior(config.model.base_path)
    assert config.model.base_path.startswith(str(tmp_path)) and prior.resolution == config.model.resolution
    spec = text_encoder_spec(config)
    denoiser = build_denoiser(config.model, text_width=spec.width())
    assert denoiser.unet.config.encoder_hid_dim == spec.width() == 384 and denoiser.vae.config.factor == 2
    assert Config.from_dict(yaml.safe_load(recipe)).caption.rank == "order"  # the prior never saw a finer name


def test_a_packed_priors_recipe_is_its_config_and_the_overrides_that_changed_it(data, tiny_sd, tmp_path):
    """`pretrain --pack` records its config file as written and, after it, the command line's `--set` values."""
    from safetensors import safe_open

    config = prior_config(tmp_path / "prior.yaml", data, tiny_sd)
    packed = tmp_path / "prior.safetensors"
    run = ["pretrain", "--config", str(config), "--output", str(tmp_path / "run"), "--pack", str(packed)]
    assert main([*run, "--set", "train.steps=1", "--set", "train.log_every=1"]) == 0
    with safe_open(str(packed), framework="pt") as handle:
        recipe = handle.metadata()["recipe"]
    overrides = "# pretrained with --set train.steps=1\n# pretrained with --set train.log_every=1\n"
    assert recipe == config.read_text(encoding="utf-8") + overrides
    assert yaml.safe_load(recipe) == yaml.safe_load(config.read_text(encoding="utf-8"))  # still the file's YAML


def test_a_packed_prior_unpacks_to_the_same_base(prior, tmp_path):
    """`pretrain --pack` writes one file (its folder made if need be) that unpacks to the same UNet."""
    from safetensors.torch import load_file

    from taxadiffusion.prior import pack_prior, unpack_prior

    packed = pack_prior(prior, tmp_path / "new" / "folder" / "prior.safetensors", "recipe: text")
    folder = unpack_prior(packed, tmp_path / "unpacked")
    weights = "unet/diffusion_pytorch_model.safetensors"
    before, after = load_file(prior / weights), load_file(folder / weights)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert (folder / "prior.json").read_text() == (prior / "prior.json").read_text()
    for written in (prior, packed, folder):
        assert_readable_like_other_files(written if written.is_dir() else written.parent)


def test_a_packed_file_is_a_base_to_pretrain_further_or_to_adapt(prior, data, tiny_sd, tmp_path, monkeypatch, capsys):
    """`model.base` may name the file `pretrain --pack` wrote: it is unpacked into the user's cache once and read as
    its base folder, to pretrain further (a longer prior from a committed one) or to adapt. A missing file, or a
    safetensors file that is not a packed prior, is refused with a line naming it, before any step."""
    from safetensors.torch import save_file

    from taxadiffusion.pipeline import TaxaDiffusionPipeline
    from taxadiffusion.prior import pack_prior

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    packed = pack_prior(prior, tmp_path / "prior.safetensors", "recipe: text")
    config = prior_config(tmp_path / "more.yaml", data, tiny_sd)
    further = tmp_path / "further"
    more = ["--set", f"model.base={packed}", "--set", "train.steps=2"]
    assert main(["pretrain", "--config", str(config), *more, "--output", str(further)]) == 0
    (unpacked,) = (tmp_path / "cache" / "taxadiffusion" / "priors").glob("prior-*")
    weights = "unet/diffusion_pytorch_model.safetensors"
    start, packed_weights, after = (
        load_file(prior / weights),
        load_file(unpacked / weights),
        load_file(further / weights),
    )
    assert all(torch.equal(packed_weights[k], start[k]) for k in start)
    # two AdamW steps at lr 1e-3 move a weight by about 2e-3: the run went on from the packed weights, and moved them
    assert all(torch.allclose(after[k], start[k], atol=1e-2) for k in start)
    assert any(not torch.equal(after[k], start[k]) for k in start)
    zero_shot = TaxaDiffusionPipeline.from_prior(
        packed, ["a photo of Aus"]
    )  # `evaluate --zero-shot` prompts the file's prior
    assert all(torch.equal(value, start[k]) for k, value in zero_shot.unet.state_dict().items())
    path = adapt_config(tmp_path / "adapt.yaml", packed, data, "base")
    dry_run = ["--output", str(tmp_path / "o"), "--dry-run"]
    assert main(["train", "--config", str(path), *dry_run]) == 0
    assert f"model: {packed} at 16 px" in capsys.readouterr().out
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    for base, message in (
        (tmp_path / "absent.safetensors", "no such file"),
        (tmp_path / "plain.safetensors", "not a packed prior"),
    ):
        assert main(["train", "--config", str(path), "--set", f"model.base={base}", *dry_run]) == 2
        assert message in capsys.readouterr().err


def test_saved_weights_are_readable_by_others_under_a_shared_umask(prior, tmp_path):
    """Under umask 022 a packed prior and the folder unpacked from it are 0644, as any file written here."""
    from taxadiffusion.prior import pack_prior, unpack_prior

    before = os.umask(0o022)
    try:
        packed = pack_prior(prior, tmp_path / "prior.safetensors", "recipe: text")
        folder = unpack_prior(packed, tmp_path / "unpacked")
    finally:
        os.umask(before)
    for file in [packed, *folder.rglob("*.safetensors")]:
        assert file.stat().st_mode & 0o777 == 0o644, file


def test_an_unpacked_prior_is_reused_only_for_its_own_file(prior, tmp_path):
    """A base folder is unpacked once and reused for the same file; another file (a prior repacked under the
    same name) is refused rather than silently paired with what was adapted from the first. A folder unpacked
    before the record existed is checked by its weights; a folder that holds something else is left alone."""
    import shutil

    from taxadiffusion.errors import InputError
    from taxadiffusion.prior import UNPACKED_FILE, pack_prior, unpack_prior

    packed = pack_prior(prior, tmp_path / "a.safetensors", "recipe: text")
    folder = unpack_prior(packed, tmp_path / "unpacked")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    written = weights.stat().st_mtime_ns
    assert unpack_prior(packed, folder) == folder and weights.stat().st_mtime_ns == written  # reused
    other = pack_prior(prior, tmp_path / "b.safetensors", "recipe: text", precision="fp16")
    with pytest.raises(InputError, match="unpacked from another file"):
        unpack_prior(other, folder)
    (folder / UNPACKED_FILE).unlink()  # unpacked by an earlier version: compared by its weights
    assert unpack_prior(packed, folder) == folder and (folder / UNPACKED_FILE).is_file()
    (folder / UNPACKED_FILE).unlink()
    with pytest.raises(InputError, match="unpacked from another file"):
        unpack_prior(other, folder)
    mine = tmp_path / "mine"
    shutil.copytree(prior / "unet", mine / "unet")
    with pytest.raises(InputError, match="not empty and holds no prior"):
        unpack_prior(packed, mine)
    assert (mine / "unet" / "config.json").is_file()


def test_an_fp16_pack_is_half_the_size_and_unpacks_to_fp32(prior, tmp_path):
    """`--pack-precision fp16` (a prior that would not fit a file size at fp32): the weights rounded to fp16,
    upcast to the fp32 a base folder's UNet holds, so an adaptation loads it as any prior."""
    from safetensors.torch import load_file

    from taxadiffusion.errors import InputError
    from taxadiffusion.prior import pack_prior, unpack_prior

    full = pack_prior(prior, tmp_path / "fp32.safetensors", "recipe: text")
    half = pack_prior(prior, tmp_path / "fp16.safetensors", "recipe: text", precision="fp16")
    assert half.stat().st_size < 0.55 * full.stat().st_size
    weights = "unet/diffusion_pytorch_model.safetensors"
    before, after = load_file(prior / weights), load_file(unpack_prior(half, tmp_path / "unpacked") / weights)
    assert before.keys() == after.keys()
    assert all(after[k].dtype == torch.float32 for k in after)
    assert all(torch.equal(after[k], before[k].half().float()) for k in before)
    assert any(not torch.equal(after[k], before[k]) for k in before)  # really rounded
    with pytest.raises(InputError, match="pack precision 'bf8'"):
        pack_prior(prior, tmp_path / "x.safetensors", "recipe: text", precision="bf8")


BENCHMARK_PRIORS = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "priors").glob("*.safetensors"))


@pytest.mark.parametrize("packed", BENCHMARK_PRIORS, ids=[p.stem for p in BENCHMARK_PRIORS])
def test_the_benchmark_priors_are_their_committed_recipes(packed):
    """Every benchmarks/priors/<name>.safetensors (Table 1's priors, and those of its investigations) was made by
    configs/prior_<name>.yaml, and fits the 50 MB a committed prior may take."""
    from safetensors import safe_open

    repo, name = Path(__file__).resolve().parents[1], packed.stem
    assert packed.stat().st_size <= 50 * 2**20
    with safe_open(str(packed), framework="pt") as handle:
        assert handle.metadata()["recipe"] == (repo / "configs" / f"prior_{name}.yaml").read_text(encoding="utf-8")


def test_the_prior_prompted_alone_responds_to_its_captions(prior):
    """The zero-shot row: the prior sampled from its own captions, no adaptation."""
    import numpy as np

    from taxadiffusion.pipeline import TaxaDiffusionPipeline
    from taxadiffusion.prior import read_prior

    captions = sorted(read_prior(prior).captions)
    pipe = TaxaDiffusionPipeline.from_prior(prior, captions)
    images = [
        pipe(caption, num_inference_steps=2, guidance="vanilla", generator=torch.Generator().manual_seed(0),
             output_type="np").images
        for caption in captions
    ]  # fmt: skip
    assert images[0].shape == (1, 16, 16, 3) and not np.array_equal(images[0], images[1])


def test_the_zero_shot_pipeline_reads_as_the_same_model_in_every_process(prior):
    """An interrupted zero-shot evaluation resumes: the digest that tells its kept images from another model's is
    the same in a new process (diffusers' `_use_default_values` lists a set, whose order follows the hash seed)."""
    import subprocess
    import sys

    script = (
        "import sys; from taxadiffusion.pipeline import TaxaDiffusionPipeline;"
        "from taxadiffusion.fingerprint import weights_digest;"
        "print(weights_digest(TaxaDiffusionPipeline.from_prior(sys.argv[1], ['a photo of Aa bb', 'a photo of Cc dd'])))"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", script, str(prior)], env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        for seed in ("0", "1")
    }  # fmt: skip
    assert len(digests) == 1 and len(digests.pop()) == 32


def test_prior_fidelity_scores_the_prior_on_its_own_taxonomy_per_rank(tiny_sd, tmp_path, monkeypatch):
    """benchmarks/prior_fidelity.py: an oracle trained on the prior's synthetic taxonomy scores samples of every
    species under the caption its training images had, at every rank."""
    import importlib.util

    synthetic = {"seed": 1, "branching": [[1, 1], [1, 1], [2, 2], [1, 1], [1, 1], [1, 1], [2, 2]]}
    config = {
        "model": PRIOR_MODEL,
        "text": {"encoder": str(tiny_sd), "template": "{name}"},
        "data": {"format": "synthetic", "crop": "squash", "synthetic": synthetic | {"max_images": 3, "min_images": 2}},
        "caption": {"rank": "order", "template": "a photo of {class}, {order}: {appearance}"},
        "train": {"strategy": "prior", "steps": 2, "batch_size": 4, "checkpoint_every": 2},
    }
    (tmp_path / "prior.yaml").write_text(yaml.safe_dump(config))
    assert main(["pretrain", "--config", str(tmp_path / "prior.yaml"), "--output", str(tmp_path / "prior")]) == 0
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(repo / "benchmarks"))  # it imports its sibling common.py, as when run alone
    spec = importlib.util.spec_from_file_location("prior_fidelity", repo / "benchmarks" / "prior_fidelity.py")
    fidelity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fidelity)
    out = tmp_path / "fidelity.json"
    args = ["--config", str(tmp_path / "prior.yaml"), "--prior", str(tmp_path / "prior"), "--per-taxon", "2"]
    args += ["--steps", "2", "--oracle", str(tmp_path / "oracle"), "--oracle-steps", "2", "--out", str(out)]
    assert fidelity.main(args) == 0
    result = json.loads(out.read_text())
    accuracy = result["accuracy"][str(tmp_path / "prior")]
    assert result["species"] == 4 and list(accuracy) == list(result["oracle_held_out_accuracy"])
    assert accuracy["kingdom"] == 1.0 and all(0.0 <= a <= 1.0 for a in accuracy.values())  # one kingdom
    assert (tmp_path / "oracle" / "config.json").is_file()  # saved, for a later run to reuse
