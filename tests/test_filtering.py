"""`generate --filter`: images kept and rejected by a classifier's scores, rejected ones redrawn from new seeds
up to a budget, deterministically, and a killed run resumes to the same files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from taxadiffusion.cli import main
from taxadiffusion.filtering import ImageFilter, read_journals, retry_seed
from taxadiffusion.fingerprint import generation_key
from taxadiffusion.generate import METADATA_FILE, claim_output, generate, generation_tag, plan_per_taxon
from taxadiffusion.taxonomy import Rank
from tiny_models import generated_images


class Brightness(nn.Module):
    """A classifier whose belief is a function of the image: its species head favours the species that a digit of
    the image's mean brightness points to. Deterministic, so each kept or rejected image can be checked again from
    its PNG."""

    def __init__(self, taxonomy):
        super().__init__()
        self.taxonomy = taxonomy
        self.scale = nn.Parameter(torch.tensor(40.0))

    def forward(self, images):
        species = self.taxonomy.num_taxa(Rank.SPECIFIC_EPITHET)
        brightness = (images.mean(dim=(1, 2, 3)) * 1000).frac().abs()  # in [0, 1), varying from seed to seed
        centre = (torch.arange(species) + 0.5) / species
        return [torch.zeros(len(images), self.taxonomy.num_taxa(r)) for r in self.taxonomy.ranks[:-1]] + [
            -self.scale * (brightness[:, None] - centre[None]).abs()
        ]


def _run(pipe, plan, out, image_filter, **kwargs):
    key = generation_key(pipe, 0) | {"filter": image_filter.describe()}
    claim_output(out, key, False)
    return generate(pipe, plan, out, key, progress=False, image_filter=image_filter, **kwargs)


def _rows(out):
    with open(out / METADATA_FILE, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_filter_keeps_what_the_classifier_places_and_redraws_the_rest(pipe, small_taxonomy, tmp_path):
    image_filter = ImageFilter(Brightness(small_taxonomy), "specific_epithet", threshold=0.3, retries=3)
    plan = plan_per_taxon(small_taxonomy, 3)
    out = tmp_path / "kept"
    result = _run(pipe, plan, out, image_filter, batch_size=4)
    summary = json.loads((out / "filter_summary.json").read_text())
    rows = _rows(out)
    assert summary["kept"] == len(rows) == result.rows and summary["kept"] + summary["given_up"] == len(plan.items)
    assert summary["rejected"] > 0 and any(int(row["attempt"]) > 0 for row in rows)  # redraws happened
    by_file = {row["file_name"]: row for row in rows}
    for item in plan.items:  # every kept image is one the classifier places, with the score it got
        row = next(
            (r for r in rows if (r["scientific_name"], int(r["index"])) == (item.lineage.scientific_name, item.index)),
            None,
        )
        if row is None:
            continue
        image = Image.open(out / row["file_name"])
        ((kept, score),) = image_filter.scores([image], [item.lineage])
        assert kept and score == pytest.approx(float(row["score"])) and score >= 0.3
        assert (
            int(row["seed"]) == retry_seed(item.seed, int(row["attempt"])) and row["rank_checked"] == "specific_epithet"
        )
    assert set(by_file) == {p for p in generated_images(out)}
    impossible = ImageFilter(Brightness(small_taxonomy), "specific_epithet", threshold=1.0, retries=1)
    nothing = tmp_path / "nothing"
    _run(pipe, plan, nothing, impossible, batch_size=4)
    assert json.loads((nothing / "filter_summary.json").read_text())["given_up"] == len(plan.items)
    assert _rows(nothing) == [] and not generated_images(nothing)


def test_a_killed_filtered_run_resumes_to_the_same_files(pipe, small_taxonomy, tmp_path):
    image_filter = ImageFilter(Brightness(small_taxonomy), "specific_epithet", threshold=0.3, retries=2)
    plan = plan_per_taxon(small_taxonomy, 3)
    _run(pipe, plan, tmp_path / "whole", image_filter, batch_size=4)

    def kill(done):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(pipe, plan, tmp_path / "killed", image_filter, batch_size=4, on_batch=kill)
    tag = generation_tag(generation_key(pipe, 0) | {"filter": image_filter.describe()})
    assert 0 < len(read_journals(tmp_path / "killed", tag)) < len(plan.items)
    _run(pipe, plan, tmp_path / "killed", image_filter, batch_size=4)
    whole, resumed = generated_images(tmp_path / "whole"), generated_images(tmp_path / "killed")
    assert whole.keys() == resumed.keys() and whole
    for name in whole:
        np.testing.assert_array_equal(whole[name], resumed[name])
    assert (tmp_path / "whole" / METADATA_FILE).read_text() == (tmp_path / "killed" / METADATA_FILE).read_text()
    summary = "filter_summary.json"
    assert (tmp_path / "whole" / summary).read_text() == (tmp_path / "killed" / summary).read_text()


def test_generate_filter_through_the_command(tiny_pipeline, small_taxonomy, tmp_path, capsys):
    from taxadiffusion.eval.classifier import TaxonClassifier

    classifier = tmp_path / "classifier"
    torch.manual_seed(0)
    TaxonClassifier(small_taxonomy.to_dict(), resolution=16, width=4).save_pretrained(classifier)
    out = tmp_path / "synthetic"
    args = ["generate", "--model", str(tiny_pipeline), "--out", str(out), "--per-taxon", "2", "--steps", "1"]
    args += ["--filter", str(classifier), "--filter-threshold", "0", "--filter-retries", "1"]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "the filter kept" in said and "filter_summary.json" in said
    rows = _rows(out)
    assert {"score", "attempt", "rank_checked"} <= set(rows[0]) if rows else True
    assert json.loads((out / "filter_summary.json").read_text())["kept"] == len(rows)
    bad = [*args[:-6], "--filter", str(classifier), "--filter-rank", "kingdom"]
    assert main(bad) == 2 and "the classifier knows" in capsys.readouterr().err
    # a filter that keeps nothing: the first batch keeps no image, and the time estimate counts what it decided
    none = [*args[:-6], "--filter", str(classifier), "--filter-threshold", "1.01", "--filter-retries", "0"]
    none[none.index("--out") + 1] = str(tmp_path / "none")
    assert main(none) == 2 and "--filter-threshold must be in [0, 1]" in capsys.readouterr().err
    none[none.index("1.01")] = "1.0"
    assert main(none) == 0 and "estimated:" in capsys.readouterr().out
    assert json.loads((tmp_path / "none" / "filter_summary.json").read_text())["kept"] == 0
    # run again: every place was decided (given up), none of them is an image on disk
    assert main(none) == 0
    said = capsys.readouterr().out
    assert "no image left to make, 10 places already decided (kept or given up)" in said and "lists 0 images" in said


def test_two_processes_keep_the_same_images_as_one(pipe, small_taxonomy, tmp_path):
    """Each process journals its own blocks; the main one writes the table from all journals."""
    from taxadiffusion.generate import write_metadata

    image_filter = ImageFilter(Brightness(small_taxonomy), "specific_epithet", threshold=0.3, retries=2)
    plan = plan_per_taxon(small_taxonomy, 3)
    _run(pipe, plan, tmp_path / "one", image_filter, batch_size=4)
    key = generation_key(pipe, 0) | {"filter": image_filter.describe()}
    shared = tmp_path / "two"
    claim_output(shared, key, False)
    for index in range(2):
        generate(pipe, plan, shared, key, batch_size=4, shard=(index, 2), write_table=False, progress=False,
                 image_filter=image_filter)  # fmt: skip
    tag = generation_tag(key)
    assert sorted(p.name for p in shared.glob("filter-*.jsonl")) == [f"filter-{tag}-0.jsonl", f"filter-{tag}-1.jsonl"]
    write_metadata(shared, small_taxonomy, plan, tag, key, read_journals(shared, tag))
    assert (shared / METADATA_FILE).read_text() == (tmp_path / "one" / METADATA_FILE).read_text()
    one, two = generated_images(tmp_path / "one"), generated_images(shared)
    assert one.keys() == two.keys()
    for name in one:
        np.testing.assert_array_equal(one[name], two[name])


def test_a_taxon_the_classifier_never_saw_is_kept_unscored(small_taxonomy):
    from taxadiffusion.taxonomy import Lineage

    image_filter = ImageFilter(Brightness(small_taxonomy), "specific_epithet", threshold=0.3, retries=1)
    unknown = Lineage(small_taxonomy.ranks, ("Actinopterygii", "Perciformes", "Pomacentridae", "Amphiprion", "nova"))
    assert image_filter.scores([Image.new("RGB", (16, 16))], [unknown]) == [(True, None)]


def test_a_flat_models_species_is_found_by_its_binomial(small_taxonomy):
    """A flat model's images carry one rank, the species' binomial: the filter scores them as the full lineage's."""
    from taxadiffusion.taxonomy import Lineage

    image_filter = ImageFilter(Brightness(small_taxonomy), "specific_epithet", threshold=0.0, retries=0)
    image = Image.new("RGB", (16, 16), (90, 90, 90))
    for species in small_taxonomy.taxa("specific_epithet"):
        full = small_taxonomy.lineage(species)
        flat = Lineage((Rank.SPECIFIC_EPITHET,), (full.scientific_name,))
        scored = image_filter.scores([image, image], [full, flat])
        assert scored[0] == scored[1] and scored[0][1] is not None
