"""The published settings a line-by-line reading of the authors' code found, each a config value or default:
the rank encoders' feed-forward width, training length in epochs, FishNet's box crop, the species text,
and the authors' evaluation protocol (the null conditions and the window are in test_pipeline/test_guidance)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from PIL import Image

from conftest import REPO
from taxadiffusion.config import Config, ConfigError, TrainConfig
from taxadiffusion.data.dataset import ImageDataset
from taxadiffusion.data.images import CropPolicy, crop_to_box, prepare_image
from taxadiffusion.data.readers import read_fishnet, read_records
from taxadiffusion.data.records import Record, split_records
from taxadiffusion.errors import InputError, UnreadableFile
from taxadiffusion.eval.protocol import EvalSettings
from taxadiffusion.eval.scores import uint8_batch as _uint8_batch
from taxadiffusion.model import ModelConfig, build_taxonomy_encoder, count_parameters
from taxadiffusion.taxonomy import FISHNET_RANKS, Lineage, Taxonomy
from taxadiffusion.text import rank_texts
from taxadiffusion.train.plan import load_training_records
from taxadiffusion.train.stages import plan_stages

# -- 1. the rank encoders' feed-forward width ---------------------------------------------------------


def test_encoder_parameters_at_sd_width_are_the_published_55_1_million():
    """nn.TransformerEncoderLayer(d_model=768, nhead=8) x 2 layers x 5 ranks with PyTorch's default
    dim_feedforward=2048: 55.1 M parameters (4 x width would give 70.9 M)."""
    with init_empty_weights():
        published = build_taxonomy_encoder(ModelConfig(), num_ranks=5, text_width=768, cross_attention_dim=768)
        wide = build_taxonomy_encoder(
            ModelConfig(encoder_feedforward=3072), num_ranks=5, text_width=768, cross_attention_dim=768
        )
    assert ModelConfig().encoder_feedforward == 2048
    assert round(count_parameters(list(published.parameters())) / 1e6, 1) == 55.1
    assert round(count_parameters(list(wide.parameters())) / 1e6, 1) == 70.9
    layer = published.encoders[0].layers[0]
    assert (layer.linear1.in_features, layer.linear1.out_features) == (768, 2048)
    with pytest.raises(InputError, match="encoder_feedforward"):
        ModelConfig(encoder_feedforward=0)


# -- 2. training length in epochs --------------------------------------------------------------------


def test_epochs_convert_to_steps_from_the_dataset_and_the_global_batch():
    model = ModelConfig()
    ranks = FISHNET_RANKS
    # 1,000 images at 32 per process x 2 processes x 2 accumulation = 128 per step: 20 epochs = 157 steps.
    stages = plan_stages(TrainConfig(epochs=20), model, ranks, images=1000, images_per_step=128)
    assert [s.steps for s in stages] == [157] * 5
    listed = plan_stages(TrainConfig(epochs=[1, 0.5, 2, 2, 3]), model, ranks, images=100, images_per_step=32)
    assert [s.steps for s in listed] == [4, 2, 7, 7, 10]
    (flat,) = plan_stages(TrainConfig(strategy="flat", epochs=1), model, ranks, images=64, images_per_step=32)
    assert flat.steps == 5 * 2  # one-stage strategies: the progressive schedule's total
    with pytest.raises(ConfigError, match="lists 2 stages"):
        plan_stages(TrainConfig(epochs=[1, 2]), model, ranks, images=100, images_per_step=32)
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        TrainConfig(epochs=float("nan"))


def test_dry_run_prints_steps_and_epochs_per_stage(capsys, tmp_path):
    from taxadiffusion.cli import main

    config = str(REPO / "configs" / "demo.yaml")
    assert (
        main(["train", "--config", config, "--output", str(tmp_path / "run"), "--dry-run", "--set", "train.epochs=2"])
        == 0
    )
    printed = capsys.readouterr().out
    stage_lines = [line for line in printed.splitlines() if line.startswith("stage ")]
    assert stage_lines
    for line in stage_lines:  # ceil(2 x images / batch) steps: 2 epochs, rounded up to whole steps
        steps, epochs = re.search(r"(\d+) steps .*; ([\d.]+) epochs", line).groups()
        assert int(steps) > 0 and 2.0 <= float(epochs) < 2.05


# -- 3. FishNet's published image preparation ------------------------------------------------------


def _boxed_image(path):
    """A 60 x 40 blue image with a red 20 x 30 box at (30, 5)."""
    image = Image.new("RGB", (60, 40), (0, 0, 255))
    image.paste((255, 0, 0), (30, 5, 50, 35))
    image.save(path)
    return (30, 5, 20, 30)


def test_fishnet_policy_crops_to_the_box_then_crops_or_squashes(tmp_path):
    box = _boxed_image(tmp_path / "fish.png")
    lineage = Lineage(FISHNET_RANKS, ("Actinopterygii", "Perciformes", "Pomacentridae", "Chromis", "viridis"))
    records = [Record(tmp_path / "fish.png", lineage, box=box)] * 40 + [Record(tmp_path / "fish.png", lineage)]
    taxonomy = Taxonomy.from_lineages([lineage], FISHNET_RANKS)
    dataset = ImageDataset(records, taxonomy, 16, "fishnet", seed=3)
    for index in range(40):  # inside the box: red whichever way the image is made square
        pixels = dataset.load(index)
        assert (pixels[..., 0] > 200).all() and (pixels[..., 2] < 60).all()
    whole = dataset.load(40)  # no box: the fish is a part of the image
    assert (whole[..., 2] > 200).any()
    # Per sample, p = 0.5 a random square crop, else a squash; without a generator a centre crop.
    tall = Image.new("RGB", (10, 40))
    tall.paste((255, 255, 255), (0, 0, 10, 20))
    import random

    kinds = [np.asarray(prepare_image(tall, 8, "fishnet", random.Random(i))).mean() for i in range(200)]
    squashed = np.asarray(prepare_image(tall, 8, "squash")).mean()
    share = np.mean([abs(k - squashed) < 1 for k in kinds])
    assert 0.35 < share < 0.65
    assert np.array_equal(prepare_image(tall, 8, "fishnet"), prepare_image(tall, 8, "random_crop"))
    assert CropPolicy.parse("fishnet") is CropPolicy.FISHNET
    assert crop_to_box(tall, (100, 100, 5, 5)).size == tall.size  # a box outside the image: the whole image


def test_fishnet_reader_carries_the_boxes_through(fishnet_csv, tmp_path):
    boxes = tmp_path / "boxes.json"
    boxes.write_text(
        json.dumps({"Cifil_u0": {"x": 1, "y": 2, "w": 30, "h": 20}, "nothere": {"x": 0, "y": 0, "w": 1, "h": 1}})
    )
    out = read_records("fishnet", fishnet_csv, root=tmp_path, boxes=boxes)
    by_image = {r.image.name: r for r in out}
    assert by_image["Cifil_u0.jpg"].box == (1, 2, 30, 20)
    assert sum(r.box is not None for r in out) == 1
    assert any("1 of 299 images have a bounding box" in note for note in out.notes)
    assert read_fishnet(fishnet_csv, root=tmp_path).records[0].box is None
    boxes.write_text('{"a": {"x": 1}}')
    with pytest.raises(UnreadableFile, match="is not"):
        read_fishnet(fishnet_csv, root=tmp_path, boxes=boxes)
    with pytest.raises(ConfigError, match=r"data\.boxes"):
        Config.from_dict({"data": {"format": "folder", "path": "x", "boxes": "b.json"}})
    with pytest.raises(ConfigError, match="cache_latents"):
        Config.from_dict({"data": {"crop": "fishnet"}, "model": {"base": "sd"}, "train": {"cache_latents": True}})


# -- 4. the species text -----------------------------------------------------------------------------


def test_species_text_is_the_epithet_or_the_binomial(small_taxonomy):
    epithet = rank_texts(small_taxonomy)[-1]
    binomial = rank_texts(small_taxonomy, species="binomial")[-1]
    assert "specific_epithet: clarkii" in epithet
    assert "specific_epithet: Amphiprion clarkii" in binomial and "specific_epithet: None" in binomial
    assert rank_texts(small_taxonomy, species="binomial")[:-1] == rank_texts(small_taxonomy)[:-1]
    assert Config.load(REPO / "configs" / "sd15_fishnet.yaml").text.species == "binomial"
    assert Config.load(REPO / "configs" / "sd15_bioscan.yaml").text.species == "binomial"
    assert Config.load(REPO / "configs" / "sd15_inat21.yaml").text.species == "epithet"
    with pytest.raises(ConfigError, match=r"text\.species"):
        Config.from_dict({"text": {"species": "latin"}})


# -- 7. the authors' evaluation protocol -----------------------------------------------------------


def test_authors_protocol_resizes_to_512_before_the_metrics():
    assert EvalSettings().metric_size is None
    assert EvalSettings(protocol="authors").metric_size == 512
    images = [np.full((16, 16, 3), value, dtype=np.uint8) for value in (0, 128, 255)]
    batch = _uint8_batch(images, 512)
    assert batch.shape == (3, 3, 512, 512) and batch.dtype == torch.uint8
    assert batch[:, 0, 100, 100].tolist() == [0, 128, 255]
    assert _uint8_batch(images).shape == (3, 3, 16, 16)
    with pytest.raises(InputError, match="protocol"):
        EvalSettings(protocol="fid50k")


# -- the held-out part and flips (the benchmarks' priors) ------------------------------------------


def test_holdout_leaves_out_the_benchmarks_split(f4k_mini, tmp_path):
    config = Config.from_dict({"data": {"format": "folder", "path": str(f4k_mini), "holdout": 0.2}})
    kept = load_training_records(config, tmp_path)
    everything = read_records("folder", f4k_mini)
    expected, held = split_records(everything.records, 0.2, seed=0)
    assert [r.image for r in kept] == [r.image for r in expected]
    assert not {r.image for r in kept} & {r.image for r in held}
    assert any("held out" in note for note in kept.notes)


def test_random_flip_mirrors_half_the_items_and_leaves_crops_alone(tmp_path):
    image = Image.new("RGB", (16, 16))
    image.paste((255, 255, 255), (0, 0, 8, 16))  # white left half
    image.save(tmp_path / "half.png")
    lineage = Lineage(FISHNET_RANKS, ("Actinopterygii",))
    records = [Record(tmp_path / "half.png", lineage)] * 100
    taxonomy = Taxonomy.from_lineages([lineage], FISHNET_RANKS)
    flipped = ImageDataset(records, taxonomy, 16, "squash", seed=0, random_flip=True)
    plain = ImageDataset(records, taxonomy, 16, "squash", seed=0)
    left_white = [flipped.load(i)[:, :4].mean() > 200 for i in range(100)]
    assert 30 < sum(left_white) < 70
    assert [flipped.load(i)[:, :4].mean() > 200 for i in range(100)] == left_white  # deterministic
    assert all(plain.load(i)[:, :4].mean() > 200 for i in range(10))
