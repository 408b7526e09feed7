"""Metrics: FID/KID, LPIPS reference values, the BioCLIP converter, the classifier oracle, the report."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch import nn

from taxadiffusion.eval.fid import InceptionFeatures, fid_kid
from taxadiffusion.eval.lpips import LPIPS


class FixedFeatures(nn.Module):
    """Maps image i (its first pixel holds i) to a fixed random 16-d feature vector."""

    num_features = 16

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, images):
        return self.table[images[:, 0, 0, 0].long()]


def _indexed_images(indices):
    images = torch.zeros(len(indices), 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.tensor(indices, dtype=torch.uint8)
    return images


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID by its textbook formula: |mu_a - mu_b|^2 + tr(S_a + S_b - 2 sqrtm(S_a S_b))."""
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)


def test_fid_matches_scipy_and_is_zero_on_itself():
    table = 0.2 * torch.randn(200, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    table[100:] = table[100:] * 1.5 + 0.5
    features = FixedFeatures(table)
    real, fake = _indexed_images(range(100)), _indexed_images(range(100, 200))
    got = fid_kid(features, real, fake)
    expected = _scipy_fid(table[:100].double().numpy(), table[100:].double().numpy())
    assert got["fid"] == pytest.approx(expected, rel=1e-4)
    same = fid_kid(features, real, real)
    assert abs(same["fid"]) < 1e-3
    # KID compares random subsets of each set: on the same set it is an unbiased estimate of 0.
    assert abs(same["kid"]) < 0.1 * got["kid"]


@pytest.mark.parametrize("n_real,n_fake", [(5, 9), (12, 3), (40, 40)])
def test_frechet_distance_equals_the_square_root_formula(n_real, n_fake):
    """Fewer images than features (the singular-value route) and more (the D x D route)."""
    from taxadiffusion.eval.fid import frechet_distance

    generator = torch.Generator().manual_seed(n_real)
    real = torch.randn(n_real, 24, generator=generator, dtype=torch.float64)
    fake = 1.3 * torch.randn(n_fake, 24, generator=generator, dtype=torch.float64) + 0.2
    expected = _scipy_fid(real.numpy(), fake.numpy())
    assert frechet_distance(real.float(), fake.float()) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("per_taxon", [2, 9])  # 60 and 270 images a set: fewer and more than the 64 features
def test_a_rank_streamed_a_taxon_at_a_time_scores_as_its_features_held_whole(tmp_path, per_taxon):
    """FID, KID, LPIPS, BioCLIP and accuracy over a group read one taxon file at a time equal the metrics of
    all its features concatenated (KID through torchmetrics itself, with the same subsets)."""
    from taxadiffusion.eval.classifier import accuracy_by_rank
    from taxadiffusion.eval.fid import frechet_distance, kernel_inception_distance
    from taxadiffusion.eval.scores import TaxonScores, group_metrics

    generator = torch.Generator().manual_seed(per_taxon)
    taxa, files = [], []
    for t in range(30):
        n_real, n_fake = per_taxon + t % 3, per_taxon
        scores = TaxonScores(
            torch.randn(n_real, 64, generator=generator),
            1.2 * torch.randn(n_fake, 64, generator=generator) + 0.1,
            torch.rand(n_fake, generator=generator),
            bioclip=torch.rand(n_fake, generator=generator),
            predicted=torch.randint(0, 3, (n_fake, 2), generator=generator),
            real_predicted=torch.randint(0, 3, (n_real, 2), generator=generator),
            truth=torch.tensor([t % 3, -1 if t % 5 == 0 else t % 2]),
        )
        scores.save(tmp_path / f"{t}.safetensors")
        taxa.append(scores)
        files.append(tmp_path / f"{t}.safetensors")
    got = group_metrics(files, ["order", "family"], kid_subset=50, seed=3)
    real = torch.cat([s.real_features for s in taxa])
    fake = torch.cat([s.fake_features for s in taxa])
    assert got["fid"] == pytest.approx(frechet_distance(real, fake), rel=1e-7)  # another exact route: rounding
    kid = kernel_inception_distance(real, fake, 50, seed=3)
    assert (got["kid"], got["kid_std"]) == pytest.approx((kid["kid"], kid["kid_std"]), rel=1e-6)
    assert got["lpips"] == pytest.approx(float(np.mean([s.lpips.double().mean() for s in taxa])))
    assert got["bioclip"] == pytest.approx(float(torch.cat([s.bioclip for s in taxa]).double().mean()))
    for kind, field in (("accuracy", "predicted"), ("real_accuracy", "real_predicted")):
        predicted = torch.cat([getattr(s, field) for s in taxa])
        truth = torch.cat([s.truth.expand(len(getattr(s, field)), -1) for s in taxa])
        expected = dict(zip(["order", "family"], accuracy_by_rank(predicted, truth), strict=True))
        assert got[kind] == pytest.approx(expected)
    assert (got["taxa"], got["n_real"], got["n_fake"]) == (30, len(real), len(fake))


def test_inception_features_are_2048d_and_memoised():
    features = InceptionFeatures()
    images = torch.randint(0, 255, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = features(images)
    assert out.shape == (3, 2048) and len(features.memo) == 3
    again = features(images[[2, 0]])
    assert torch.equal(again, out[[2, 0]]) and len(features.memo) == 3


def test_inception_features_equal_the_graphs_own():
    """Batched, resized and scaled as the TF-Inception graph expects, in batches smaller than the images given."""
    from taxadiffusion.eval.weights import inception_weights

    images = torch.randint(0, 255, (2, 3, 40, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    graph = torch.jit.load(str(inception_weights()), map_location="cpu").eval()
    batch = torch.nn.functional.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
    with torch.no_grad():
        expected = graph(batch / 128.0 - 1.0)
    torch.testing.assert_close(InceptionFeatures(batch_size=1)(images), expected, rtol=1e-4, atol=1e-4)


def _load(path):
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[
        None
    ]


def test_lpips_reproduces_the_published_distances(lpips_reference):
    ref, p0, p1 = (_load(lpips_reference / f"ex_{n}.png") for n in ("ref", "p0", "p1"))
    alex = LPIPS("alex")
    assert round(float(alex(ref, p0)), 3) == 0.722
    assert round(float(alex(ref, p1)), 3) == 0.138
    vgg = LPIPS("vgg")
    assert float(vgg(ref, p1)) < float(vgg(ref, p0))  # the same judgement with the paper's default backbone
    assert float(vgg(ref, ref)) == pytest.approx(0.0, abs=1e-6)


def _to_open_clip(model) -> dict:
    """transformers CLIPModel -> open_clip state dict (the inverse of the converter under test)."""
    state = model.state_dict()
    out = {
        "logit_scale": state["logit_scale"],
        "text_projection": state["text_projection.weight"].t(),
        "visual.proj": state["visual_projection.weight"].t(),
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
        "visual.class_embedding": state["vision_model.embeddings.class_embedding"],
        "visual.conv1.weight": state["vision_model.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": state["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": state["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": state["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": state["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": state["vision_model.post_layernorm.bias"],
        "attn_mask": torch.zeros(1),
    }
    names = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "self_attn.out_proj": "attn.out_proj",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    for tower, prefix in (("text_model", ""), ("vision_model", "visual.")):
        layers = (
            model.config.text_config.num_hidden_layers
            if tower == "text_model"
            else model.config.vision_config.num_hidden_layers
        )
        for i in range(layers):
            src, dst = f"{tower}.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
            for new, old in names.items():
                for p in ("weight", "bias"):
                    out[f"{dst}{old}.{p}"] = state[f"{src}{new}.{p}"]
            for p in ("weight", "bias"):
                out[f"{dst}attn.in_proj_{p}"] = torch.cat([state[f"{src}self_attn.{x}_proj.{p}"] for x in "qkv"])
    return out


def test_bioclip_converter_round_trip(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from taxadiffusion.eval.bioclip import BioCLIPScorer
    from tiny_models import write_clip_tokenizer

    tokenizer = write_clip_tokenizer(tmp_path / "bioclip", max_length=16)
    vocab = len(tokenizer)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "vocab_size": vocab,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 1,
            "max_position_embeddings": 16,
            "hidden_act": "quick_gelu",
            "bos_token_id": vocab - 2,
            "eos_token_id": vocab - 1,
            "pad_token_id": vocab - 1,
        },
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 1,
            "image_size": 32,
            "patch_size": 8,
            "hidden_act": "quick_gelu",
        },
        projection_dim=24,
    )
    original = CLIPModel(config).eval()
    torch.save(_to_open_clip(original), tmp_path / "bioclip" / "open_clip_pytorch_model.bin")
    (tmp_path / "bioclip" / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": True}}))

    scorer = BioCLIPScorer(tmp_path / "bioclip")
    images = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    texts = ["Animalia Chordata", "Amphiprion clarkii"]
    with torch.no_grad():
        pixels = scorer.preprocess(images)
        expected_image = torch.nn.functional.normalize(
            _features(original.get_image_features(pixel_values=pixels)), dim=-1
        )
        ids = scorer.tokenizer(
            texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt"
        ).input_ids
        expected_text = torch.nn.functional.normalize(_features(original.get_text_features(input_ids=ids)), dim=-1)
    assert torch.allclose(scorer.image_embeddings(images), expected_image, atol=1e-5)
    assert torch.allclose(scorer.text_embeddings(texts), expected_text, atol=1e-5)
    scores = scorer.score(images, texts)
    assert scores.shape == (2,) and torch.allclose(scores, 100 * (expected_image * expected_text).sum(-1), atol=1e-3)


def _features(output):
    return getattr(output, "pooler_output", output)


def test_classifier_is_an_oracle_on_synthetic_species():
    from taxadiffusion.data.synthetic import SyntheticConfig, SyntheticTaxonomy
    from taxadiffusion.eval.classifier import accuracy_by_rank, pool_batches, synthetic_pool, to_unit, train_classifier

    branching = ((1, 1), (2, 2), (1, 1), (2, 2), (1, 1), (2, 2), (2, 2))  # 16 species
    synth = SyntheticTaxonomy(SyntheticConfig(branching=branching, seed=3))
    images, ids = synthetic_pool(synth, 60, 32, seed=1)
    model = train_classifier(synth.taxonomy, pool_batches(images, ids, 64, seed=0), 400, 32, progress=False)
    held_images, held_ids = synthetic_pool(synth, 25, 32, seed=2)  # fresh renders
    accuracy = accuracy_by_rank(model.predict(to_unit(held_images)), held_ids)
    assert min(accuracy) >= 0.98, accuracy


def test_the_classifier_reads_its_images_from_a_memory_map_a_batch_at_a_time(tmp_path):
    """`record_pool` decodes each image once (in DataLoader workers or not, the same bytes) into a memory-mapped
    file; batches are converted to floats one at a time, never the whole set."""
    from taxadiffusion.data.readers import read_folder
    from taxadiffusion.data.synthetic import SyntheticConfig, SyntheticTaxonomy
    from taxadiffusion.eval.classifier import (
        RecordImages,
        TaxonClassifier,
        pool_batches,
        predict_pool,
        record_pool,
        to_unit,
    )

    synth = SyntheticTaxonomy(SyntheticConfig(branching=((1, 1),) * 5 + ((2, 2), (2, 2)), max_images=8, min_images=3))
    records = read_folder(synth.write_folder(tmp_path / "data", progress=False))
    taxonomy = records.taxonomy()
    images, ids = record_pool(records.records, taxonomy, 16)
    assert isinstance(images, np.memmap) and images.shape == (len(records), 16, 16, 3)
    direct = RecordImages(records.records, 16, "random_crop")
    assert all(np.array_equal(images[i], direct[i]) for i in range(len(records)))
    assert direct[0].flags.writeable  # the DataLoader's collate warns on read-only arrays
    assert np.array_equal(record_pool(records.records, taxonomy, 16, workers=2)[0], images)
    assert ids.tolist() == [list(taxonomy.ids(r.lineage)) for r in records.records]
    x, y = next(pool_batches(images, ids, 4, seed=0)())
    first = torch.randperm(len(records), generator=torch.Generator().manual_seed(0))[:4]  # the epoch's first batch
    assert torch.equal(x, to_unit(np.asarray(images)[first.numpy()])) and torch.equal(y, ids[first])
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    model = TaxonClassifier(taxonomy.to_dict(), 16, 8)
    assert predict_pool(model, images, batch_size=3).shape == (len(records), len(taxonomy.ranks))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A random tiny pixel-space pipeline over a 4-species synthetic folder dataset."""
    from taxadiffusion.conditioning import TaxonomyEncoder
    from taxadiffusion.data.readers import read_folder
    from taxadiffusion.data.synthetic import SyntheticConfig, SyntheticTaxonomy
    from taxadiffusion.model import ModelConfig, build_denoiser
    from taxadiffusion.pipeline import TaxaDiffusionPipeline, make_scheduler
    from taxadiffusion.text import TextEmbeddingCache
    from tiny_models import tiny_pixel_unet_config

    root = tmp_path_factory.mktemp("eval")
    branching = ((1, 1),) * 5 + ((2, 2), (2, 2))
    synth = SyntheticTaxonomy(SyntheticConfig(branching=branching, max_images=60, min_images=6, resolution=16))
    data = synth.write_folder(root / "data", progress=False)
    records = read_folder(data)
    taxonomy = records.taxonomy()

    class Encoder:
        identity, width, max_length = "fixed", 16, 4

        def encode(self, texts):
            return torch.stack([torch.full((4, 16), float(len(t))) for t in texts])

    cache = TextEmbeddingCache.build(taxonomy, Encoder())
    tiny = tiny_pixel_unet_config()
    denoiser = build_denoiser(ModelConfig(resolution=16, tiny=tiny))
    torch.manual_seed(0)
    encoder = TaxonomyEncoder(num_ranks=7, text_width=16, cross_attention_dim=32, num_heads=4).eval()
    pipe = TaxaDiffusionPipeline(
        unet=denoiser.unet,
        scheduler=make_scheduler("ddim", denoiser.noise_scheduler.config),
        taxonomy_encoder=encoder,
        text_embeddings=cache,
    )
    pipe.save_pretrained(root / "model")
    return root, data


def _table_cells(md: str) -> list[list[str]]:
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


EVAL_ARGS = [
    "--ranks",
    "genus,specific_epithet",
    "--per-taxon",
    "3",
    "--steps",
    "2",
    "--rare-threshold",
    "30",
    "--max-real",
    "5",
]


@pytest.fixture(scope="module")
def evaluated(tiny_run):
    """The tiny model evaluated once at genus and species rank."""
    from taxadiffusion.cli import main

    root, data = tiny_run
    out = root / "eval"
    args = ["evaluate", "--model", str(root / "model"), "--data", "folder", str(data), "--out", str(out), *EVAL_ARGS]
    assert main(args) == 0
    return root, data, out, args


def test_evaluate_writes_a_report_equal_to_metrics_json(evaluated, capsys):
    from taxadiffusion.cli import main

    _, _, out, args = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["ranks"]) == {"genus", "specific_epithet"}
    species = metrics["ranks"]["specific_epithet"]
    assert species["all"]["taxa"] == 4 and species["all"]["n_fake"] == 12
    assert {"rare", "common"} <= set(species)
    assert "TF-Inception" in metrics["settings"]["feature_network"] and metrics["settings"]["versions"]["torchmetrics"]
    assert len(list((out / "images" / "specific_epithet").rglob("*.png"))) == 12

    md = (out / "report.md").read_text()
    header, row = _table_cells(md)[:2]
    for title, key, fmt in (("FID", "fid", "{:.2f}"), ("KID", "kid", "{:.4f}"), ("LPIPS", "lpips", "{:.4f}")):
        for rank, short in (("genus", "genus"), ("specific_epithet", "species")):
            column = next(i for i, h in enumerate(header) if h.startswith(title + " ") and h.endswith(short))
            assert row[column] == fmt.format(metrics["ranks"][rank]["all"][key])
    html = (out / "report.html").read_text()
    assert f"{metrics['ranks']['genus']['all']['fid']:.2f}" in html
    assert (out / "plot_fid.png").is_file() and (out / "grids" / "genus.png").is_file()

    # Run again: nothing is regenerated, the numbers are the same.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == stamps
    assert json.loads((out / "metrics.json").read_text())["ranks"] == metrics["ranks"]
    capsys.readouterr()


def test_two_processes_evaluate_as_one(evaluated, tmp_path):
    """Under a launcher (RANK of WORLD_SIZE) each process draws every other batch and scores every other taxon,
    waiting for the other's files, not at a barrier: the images and the metrics are one process's, bit for bit."""
    _, _, out, args = evaluated
    two = tmp_path / "two"
    command = [sys.executable, "-m", "taxadiffusion", *[str(two) if a == str(out) else a for a in args]]
    env = {**os.environ, "WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": ""}
    launched = [
        subprocess.Popen(
            command, env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for r in range(2)
    ]
    outputs = [process.communicate(timeout=600) for process in launched]
    assert [process.returncode for process in launched] == [0, 0], outputs
    assert "report:" in outputs[0][0] and outputs[1][0] == ""  # the main process reports
    metrics = json.loads((two / "metrics.json").read_text())["ranks"]
    assert metrics == json.loads((out / "metrics.json").read_text())["ranks"]

    def images(folder):
        return {p.relative_to(folder): p.read_bytes() for p in (folder / "images").rglob("*.png")}

    assert images(two) == images(out) and len(images(out)) == 18


def test_a_killed_scoring_resumes_with_the_taxa_it_had_not_scored(evaluated, tmp_path, monkeypatch):
    """Each taxon's scores are a file: a run killed after three of the six taxa rescores only the other three."""
    from taxadiffusion.cli import main
    from taxadiffusion.eval import protocol

    _, _, out, args = evaluated
    copy = tmp_path / "eval"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "scores")
    (copy / "metrics.json").unlink()
    args = [str(copy) if a == str(out) else a for a in args]
    scored, real_score = [], protocol.score_taxon

    def killed_after_three(*a, **k):
        if len(scored) == 3:
            raise KeyboardInterrupt
        scored.append(1)
        return real_score(*a, **k)

    monkeypatch.setattr(protocol, "score_taxon", killed_after_three)
    assert main(args) == 130  # interrupted: "run the same command to continue"
    assert len(list((copy / "scores").rglob("*.safetensors"))) == 3 and not (copy / "metrics.json").exists()
    scored.clear()
    monkeypatch.setattr(protocol, "score_taxon", lambda *a, **k: scored.append(1) or real_score(*a, **k))
    assert main(args) == 0
    assert len(scored) == 3
    assert (
        json.loads((copy / "metrics.json").read_text())["ranks"]
        == json.loads((out / "metrics.json").read_text())["ranks"]
    )


def test_evaluate_never_reuses_images_of_other_settings(evaluated, tmp_path, capsys):
    """Images in --out were made with taxonomic guidance: an evaluation with other settings refuses them, and
    with --regenerate replaces them; metrics.json then records the settings that made the images."""
    import hashlib

    from taxadiffusion.cli import main

    _, _, out, args = evaluated
    copy = tmp_path / "eval"
    shutil.copytree(out, copy)

    def hashes() -> dict:
        return {p.relative_to(copy): hashlib.sha256(p.read_bytes()).digest() for p in (copy / "images").rglob("*.png")}

    before = hashes()
    other = [a if a != str(out) else str(copy) for a in args] + ["--guidance", "none"]
    assert main(other) == 2
    err = capsys.readouterr().err
    assert str(copy / "images") in err and "other guidance" in err and "--regenerate" in err
    assert hashes() == before
    assert main([*other, "--regenerate"]) == 0
    after = hashes()
    # the old images are gone; as many new ones, named by the new settings' tag, none the same pixels
    assert len(after) == len(before) and not after.keys() & before.keys()
    assert not set(after.values()) & set(before.values())
    assert json.loads((copy / "metrics.json").read_text())["settings"]["guidance"] == "none"
    assert json.loads((copy / "images" / "generation.json").read_text())["guidance"] == "none"
    capsys.readouterr()


def test_images_recorded_before_a_setting_existed_are_kept(evaluated, tmp_path, capsys):
    """A generation record written before `negative` and `spacing` existed is read with the values they had then
    (encoded, leading): the images are the same settings' and are reused, not refused."""
    from taxadiffusion.cli import main

    _, _, out, args = evaluated
    copy = tmp_path / "eval"
    shutil.copytree(out, copy)
    marker = copy / "images" / "generation.json"
    record = json.loads(marker.read_text())
    assert (record.pop("negative"), record.pop("spacing")) == ("encoded", "leading")
    marker.write_text(json.dumps(record))
    stamps = {p: p.stat().st_mtime_ns for p in (copy / "images").rglob("*.png")}
    assert main([a if a != str(out) else str(copy) for a in args]) == 0
    assert {p: p.stat().st_mtime_ns for p in (copy / "images").rglob("*.png")} == stamps
    assert json.loads(marker.read_text())["spacing"] == "leading"
    capsys.readouterr()


def test_images_of_an_earlier_layout_are_refused_not_mixed(evaluated, tmp_path, capsys):
    """A folder written by an earlier `evaluate` (its record names no layout: `<rank>/<taxon>/NN.png`, other seeds)
    is refused with the reason, not scored beside the new images."""
    from taxadiffusion.cli import main

    _, _, out, args = evaluated
    copy = tmp_path / "eval"
    shutil.copytree(out, copy)
    marker = copy / "images" / "generation.json"
    record = json.loads(marker.read_text())
    del record["layout"]
    marker.write_text(json.dumps(record))
    assert main([a if a != str(out) else str(copy) for a in args]) == 2
    err = capsys.readouterr().err
    assert "an earlier version of evaluate" in err and "--regenerate" in err


def test_evaluate_a_folder_of_images_and_compare(evaluated, tmp_path):
    from taxadiffusion.cli import main

    root, data, _, _ = evaluated
    generated = root / "eval" / "images"
    out = tmp_path / "external"
    args = [
        "evaluate",
        "--images",
        str(generated),
        "--data",
        "folder",
        str(data),
        "--ranks",
        "genus",
        "--resolution",
        "16",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    external = json.loads((out / "metrics.json").read_text())
    assert external["ranks"]["genus"]["all"]["n_fake"] == 6
    assert main(["evaluate", "--compare", str(root / "eval"), str(out), "--out", str(tmp_path / "both")]) == 0
    rows = _table_cells((tmp_path / "both" / "report.md").read_text())
    assert [r[0] for r in rows[1:3]] == ["eval", "external"]
    assert re.match(r"FID . genus", rows[0][1])
    # the rare/common table: a row per run and rank it was evaluated at (external: genus only)
    split = [r[:2] for r in rows if len(r) > 1 and r[1] in ("genus", "species")]
    assert split == [["eval", "genus"], ["eval", "species"], ["external", "genus"]]


def test_a_generated_dataset_is_scored_as_a_folder_of_images(evaluated, tmp_path, capsys):
    """`generate --per-taxon N --rank genus` writes what `evaluate --images` scores at that rank: each genus's images
    found through metadata.csv, every one of them scored."""
    from taxadiffusion.cli import main

    root, data, _, _ = evaluated
    generated = tmp_path / "generated"
    make = ["generate", "--model", str(root / "model"), "--out", str(generated), "--per-taxon", "2"]
    assert main([*make, "--rank", "genus", "--steps", "2"]) == 0
    out = tmp_path / "scored"
    score = ["evaluate", "--images", str(generated), "--data", "folder", str(data), "--ranks", "genus"]
    assert main([*score, "--resolution", "16", "--out", str(out)]) == 0
    genus = json.loads((out / "metrics.json").read_text())["ranks"]["genus"]["all"]
    assert genus["taxa"] == 2 and genus["n_fake"] == 4
    next((generated / "images").rglob("*.png")).unlink()  # an image deleted after generation: counted, not scored
    capsys.readouterr()
    assert main([*score, "--resolution", "16", "--out", str(tmp_path / "fewer")]) == 0
    assert "1 rows of" in capsys.readouterr().out
    assert json.loads((tmp_path / "fewer" / "metrics.json").read_text())["ranks"]["genus"]["all"]["n_fake"] == 3


def test_evaluate_generates_what_generate_makes(evaluated, tmp_path):
    """An evaluation's images of a rank are a `generate` folder: `generate --per-taxon N --rank RANK` with the same
    seed, sampling settings and batch size writes the same files, bit for bit, and the same metadata.csv."""
    from taxadiffusion.cli import main

    root, _, out, _ = evaluated
    made = tmp_path / "generated"
    command = ["generate", "--model", str(root / "model"), "--out", str(made), "--per-taxon", "3"]
    assert main([*command, "--rank", "specific_epithet", "--steps", "2", "--batch-size", "32", "--seed", "0"]) == 0
    evaluated_images = out / "images" / "specific_epithet"

    def files(folder):
        return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.suffix in (".png", ".csv")}

    assert files(made) == files(evaluated_images) and len(files(made)) == 13  # 4 species x 3, and the table


def test_evaluate_generates_in_the_precision_asked(evaluated):
    """`evaluate --precision bf16` generates with the pipeline's weights in bf16, under a key that names it (so its
    images never mix with fp32's); a precision that is not one is refused before anything loads."""
    from taxadiffusion.data.readers import read_records
    from taxadiffusion.errors import InputError
    from taxadiffusion.eval.protocol import EvalInputs, _generator
    from taxadiffusion.fingerprint import generation_key

    root, data, _, _ = evaluated
    inputs = EvalInputs(data=("folder", str(data)), model=root / "model", precision="bf16")
    pipeline, one_text = _generator(inputs, read_records("folder", data), "cpu")
    assert pipeline.unet.dtype == pipeline.taxonomy_encoder.dtype == torch.bfloat16 and one_text is None
    assert generation_key(pipeline, 0)["precision"] == "bf16"
    with pytest.raises(InputError, match="precision 'fp64' is not one of fp32, bf16, fp16"):
        EvalInputs(data=("folder", str(data)), model=root / "model", precision="fp64")


def test_regenerated_report_keeps_its_hand_written_reading(tmp_path):
    from taxadiffusion.eval.report import write_keeping_section

    target = tmp_path / "results.md"
    write_keeping_section(target, "# Results\n\n| a |\n")
    assert target.read_text() == "# Results\n\n| a |\n"
    target.write_text(target.read_text() + "\n## Reading\n\nWritten by hand.\n")
    write_keeping_section(target, "# Results\n\n| b |\n")
    assert target.read_text() == "# Results\n\n| b |\n\n## Reading\n\nWritten by hand.\n"
