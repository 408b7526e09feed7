"""`taxadiffusion generate`: the plan's counts, images that do not depend on the batch or the process layout,
resuming after a kill, and an output the project's csv reader loads back."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from taxadiffusion.cli import main
from taxadiffusion.data.readers import read_records
from taxadiffusion.errors import InputError, OutputExists
from taxadiffusion.fingerprint import generation_key
from taxadiffusion.generate import (
    METADATA_FILE,
    claim_output,
    generate,
    plan_fill_to,
    plan_per_taxon,
    plan_taxa,
    write_metadata,
)
from taxadiffusion.taxonomy import FISHNET_RANKS, Lineage
from tiny_models import generated_images


def _run(pipe, plan, out, **kwargs):
    key = generation_key(pipe, 0)
    claim_output(out, key, kwargs.pop("add", False))
    return generate(pipe, plan, out, key, progress=False, **kwargs)


def test_plan_counts(small_taxonomy):
    species = plan_per_taxon(small_taxonomy, 3)
    assert len(species.items) == 15 and species.taxa == 5  # five species; the shark is labelled to genus
    assert plan_per_taxon(small_taxonomy, 2, rank="genus").taxa == 5  # the two Chromis stay apart
    clarkii = ("Actinopterygii", "Perciformes", "Pomacentridae", "Amphiprion", "clarkii")
    viridis = ("Actinopterygii", "Perciformes", "Pomacentridae", "Chromis", "viridis")
    real = [Lineage(FISHNET_RANKS, clarkii)] * 2 + [Lineage(FISHNET_RANKS, viridis)] * 5
    real.append(Lineage(FISHNET_RANKS, clarkii[:4]))  # labelled to genus: counts for no species
    fill = plan_fill_to(small_taxonomy, 3, real)
    per = {names: sum(i.lineage.names == names for i in fill.items) for names in {i.lineage.names for i in fill.items}}
    assert per[clarkii] == 1 and viridis not in per and len(per) == 4 and sum(per.values()) == 10
    named = plan_taxa(
        small_taxonomy,
        ["Amphiprion clarkii", "Actinopterygii > Perciformes > Pomacentridae > Chromis > viridis", "Labridae", ""],
        2,
    )
    assert named.taxa == 3 and len(named.items) == 6
    with pytest.raises(InputError, match="2 of 3 names") as error:
        plan_taxa(small_taxonomy, ["Amphiprion clarki", "Nemo", "Labridae"], 2)
    assert "Amphiprion clarkii" in str(error.value)  # suggested
    # Seeds depend on the taxon and the index only.
    again = plan_per_taxon(small_taxonomy, 5)
    assert {(i.lineage.names, i.index): i.seed for i in species.items}.items() <= {
        (i.lineage.names, i.index): i.seed for i in again.items
    }.items()


def test_images_do_not_depend_on_the_batch(pipe, small_taxonomy, tmp_path):
    """Seeds per image: another batch size gives the same images up to float rounding (convolution kernels pick
    their algorithm by batch size), and the same metadata."""
    plan = plan_per_taxon(small_taxonomy, 2)
    _run(pipe, plan, tmp_path / "one", batch_size=1)
    _run(pipe, plan, tmp_path / "three", batch_size=3)
    one, three = generated_images(tmp_path / "one"), generated_images(tmp_path / "three")
    assert len(one) == 10 and one.keys() == three.keys()
    for name in one:
        difference = np.abs(one[name].astype(int) - three[name].astype(int))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.01
    assert (tmp_path / "one" / METADATA_FILE).read_text() == (tmp_path / "three" / METADATA_FILE).read_text()


def test_a_killed_run_continues_to_the_same_files_and_metadata(pipe, small_taxonomy, tmp_path):
    plan = plan_per_taxon(small_taxonomy, 2)
    _run(pipe, plan, tmp_path / "whole", batch_size=4)

    def kill(done):
        if done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(pipe, plan, tmp_path / "killed", batch_size=4, on_batch=kill)
    killed = tmp_path / "killed"
    # The metadata written so far names only complete images.
    with open(killed / METADATA_FILE) as handle:
        rows = list(csv.DictReader(handle))
    assert 0 < len(rows) < 10 and all((killed / r["file_name"]).is_file() for r in rows)
    pending = next(name for name in generated_images(tmp_path / "whole") if not (killed / name).is_file())
    half = (killed / pending).with_name(".tmp-" + (killed / pending).name)  # a write the kill cut short
    half.parent.mkdir(parents=True, exist_ok=True)
    half.write_bytes(b"\x89PNG")
    result = _run(pipe, plan, killed, batch_size=4)
    assert result.existing == 4 and result.written == 6 and not half.exists()
    whole, resumed = generated_images(tmp_path / "whole"), generated_images(killed)
    assert whole.keys() == resumed.keys()
    for name in whole:
        np.testing.assert_array_equal(whole[name], resumed[name])
    assert (tmp_path / "whole" / METADATA_FILE).read_text() == (killed / METADATA_FILE).read_text()


def test_two_processes_write_disjoint_shards(pipe, small_taxonomy, tmp_path):
    plan = plan_per_taxon(small_taxonomy, 2)
    key = generation_key(pipe, 0)
    shared = tmp_path / "shared"
    claim_output(shared, key, add=False)
    seen = []
    for index in (0, 1):
        before = set(generated_images(shared))
        generate(pipe, plan, shared, key, batch_size=3, shard=(index, 2), write_table=False, progress=False)
        seen.append(set(generated_images(shared)) - before)
    assert seen[0] and seen[1] and not seen[0] & seen[1] and len(seen[0] | seen[1]) == 10
    assert write_metadata(shared, small_taxonomy, plan, generation_tag_of(key), key) == 10
    _run(pipe, plan, tmp_path / "single", batch_size=3)
    assert (shared / METADATA_FILE).read_text() == (tmp_path / "single" / METADATA_FILE).read_text()
    single = generated_images(tmp_path / "single")
    for name, pixels in generated_images(shared).items():  # bit for bit: the same blocks, on whichever process
        np.testing.assert_array_equal(pixels, single[name])


def generation_tag_of(key):
    from taxadiffusion.generate import generation_tag

    return generation_tag(key)


def test_output_loads_back_through_the_csv_reader(pipe, small_taxonomy, tmp_path):
    plan = plan_taxa(small_taxonomy, ["Amphiprion clarkii", "Orectolobus"], 2)
    _run(pipe, plan, tmp_path / "set", batch_size=4)
    records = read_records("csv", tmp_path / "set" / METADATA_FILE)
    assert sorted(r.lineage.names for r in records) == sorted(i.lineage.names for i in plan.items)
    assert all(r.image.is_file() for r in records)
    with open(tmp_path / "set" / METADATA_FILE) as handle:
        row = next(csv.DictReader(handle))
    settings = pipe.sampling.to_dict()  # every sampling setting is a column, as the images were made
    assert {"seed", "index", *settings} <= row.keys()
    assert row["spacing"] == settings["spacing"] and json.loads(row["window"]) == settings["window"]


def test_other_settings_are_refused_unless_added(pipe, small_taxonomy, tmp_path):
    plan = plan_per_taxon(small_taxonomy, 1)
    out = tmp_path / "set"
    _run(pipe, plan, out)
    pipe.configure_sampling(scale=2.0)
    try:
        with pytest.raises(OutputExists, match="other scale"):
            _run(pipe, plan, out)
        _run(pipe, plan, out, add=True)
    finally:
        pipe.configure_sampling(scale=9.0)
    with open(out / METADATA_FILE) as handle:
        scales = sorted(row["scale"] for row in csv.DictReader(handle))
    assert scales == ["2.0"] * 5 + ["9.0"] * 5
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file")
    with pytest.raises(OutputExists, match="not empty"):
        _run(pipe, plan, tmp_path / "mine")


def test_generate_cli(tiny_pipeline, tmp_path, capsys):
    out = tmp_path / "set"
    base = ["generate", "--model", str(tiny_pipeline), "--out", str(out), "--steps", "2"]
    assert main([*base, "--per-taxon", "2", "--dry-run"]) == 0
    assert "10 images of 5 taxa" in capsys.readouterr().out and not out.exists()
    names = tmp_path / "names.txt"
    names.write_text("Amphiprion clarki\nLabridae\n")
    assert main([*base, "--taxa", str(names)]) == 2
    assert "did you mean 'Amphiprion clarkii'" in capsys.readouterr().err
    assert main([*base, "--per-taxon", "1", "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "5 images made" in printed and "lists 5 images" in printed
    assert main([*base, "--per-taxon", "1"]) == 0  # again: nothing left to make
    printed = capsys.readouterr().out
    assert "no image left to make" in printed and "5 already there" in printed
    assert main(["generate", "--model", str(tiny_pipeline), "--out", str(out)]) == 2


def test_metadata_grows_by_appending_and_a_torn_line_is_cut(pipe, small_taxonomy, tmp_path):
    """Each batch appends its rows (the same file, never rewritten mid-run: linear, not quadratic); a line torn
    by a kill is cut before the next rows; the end rewrites the table sorted, equal to an uninterrupted run's."""
    import os

    plan = plan_per_taxon(small_taxonomy, 2)
    out = tmp_path / "appended"
    seen = []

    def look(done):
        table = out / METADATA_FILE
        with open(table) as handle:
            seen.append((os.stat(table).st_ino, len(list(csv.DictReader(handle))), done))

    _run(pipe, plan, out, batch_size=4, on_batch=look)
    assert len({inode for inode, _, _ in seen}) == 1 and all(rows == done for _, rows, done in seen)
    table = out / METADATA_FILE
    whole = table.read_text()
    torn = tmp_path / "torn"
    _run(pipe, plan, torn, batch_size=4, on_batch=lambda done: None)
    lines = whole.splitlines(keepends=True)
    (torn / METADATA_FILE).write_text("".join(lines[:3]) + lines[3][:10])  # killed mid-line
    for image in sorted((torn / "images").rglob("*.png"))[4:]:
        image.unlink()
    _run(pipe, plan, torn, batch_size=4)
    assert (torn / METADATA_FILE).read_text() == whole


def test_fill_to_counts_a_flat_models_species_by_their_binomial(tmp_path):
    """A flat model (one rank: the binomial) tops its species up counting a dataset labelled with full lineages."""
    from PIL import Image

    from taxadiffusion.generate import plan_request
    from taxadiffusion.taxonomy import Rank, Taxonomy

    rows = ["file_name,order,family,genus,specific_epithet"]
    for i, (genus, epithet) in enumerate([("Spinus", "tristis")] * 3 + [("Cardinalis", "cardinalis")]):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,Passeriformes,Fringillidae,{genus},{epithet}")
    (tmp_path / "metadata.csv").write_text("\n".join(rows) + "\n")
    flat = Taxonomy.from_lineages(
        [Lineage((Rank.SPECIFIC_EPITHET,), (name,)) for name in ("Spinus tristis", "Cardinalis cardinalis")]
    )
    plan = plan_request(flat, fill_to=4, data=("csv", str(tmp_path / "metadata.csv")))
    from collections import Counter

    assert Counter(i.lineage.names for i in plan.items) == {("Spinus tristis",): 1, ("Cardinalis cardinalis",): 3}


def test_half_precision_draws_its_own_images_under_a_key_that_names_it(tiny_pipeline, tmp_path, capsys):
    """`--precision bf16` loads the pipeline's weights in bf16 and samples in it: images near fp32's but not the
    same pixels, so their key names the precision and a folder of fp32 images refuses them unless added."""
    from PIL import Image

    from taxadiffusion.generate import GENERATION_FILE

    base = ["generate", "--model", str(tiny_pipeline), "--steps", "2", "--per-taxon", "1", "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path / "fp32")]) == 0
    assert main([*base, "--out", str(tmp_path / "bf16"), "--precision", "bf16"]) == 0
    keys = {p: json.loads((tmp_path / p / GENERATION_FILE).read_text())["tags"] for p in ("fp32", "bf16")}
    (fp32,), (bf16,) = keys["fp32"].values(), keys["bf16"].values()
    assert "precision" not in fp32 and bf16["precision"] == "bf16" and bf16["model"] != fp32["model"]
    pixels = {
        p: np.stack([np.asarray(Image.open(f), dtype=float) for f in sorted((tmp_path / p).rglob("*.png"))])
        for p in ("fp32", "bf16")
    }
    difference = np.abs(pixels["fp32"] - pixels["bf16"])
    assert pixels["fp32"].shape == pixels["bf16"].shape == (5, 16, 16, 3)
    assert 0 < difference.mean() < 8  # rounding of the weights and activations, not other images
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "fp32"), "--precision", "bf16"]) == 2
    assert "other model, precision; pass --add" in capsys.readouterr().err
