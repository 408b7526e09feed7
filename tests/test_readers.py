"""Every reader on a fixture in its published format, with counts checked by hand."""

import csv
import json
from collections import Counter

import pytest

from format_fixtures import BIOSCAN_COLUMNS, BIOSCAN_TAXA, inat21_category
from taxadiffusion.cli import main
from taxadiffusion.data.readers import read_bioscan, read_fishnet, read_folder, read_inat21, read_records, read_table
from taxadiffusion.taxonomy import BIOSCAN_RANKS, INAT21_RANKS, Rank


def test_inat21(tmp_path):
    categories = [
        inat21_category(
            0, "Animalia", "Chordata", "Actinopterygii", "Perciformes", "Pomacentridae", "Amphiprion", "clarkii"
        ),
        inat21_category(
            1, "Animalia", "Chordata", "Actinopterygii", "Perciformes", "Pomacentridae", "Amphiprion", "ocellaris"
        ),
        inat21_category(2, "Plantae", "Tracheophyta", "Magnoliopsida", "Rosales", "Rosaceae", "Rosa", "canina"),
    ]
    images = [{"id": i, "file_name": f"train/{categories[i % 3]['image_dir_name']}/{i}.jpg"} for i in range(7)]
    annotations = [{"id": i, "image_id": i, "category_id": i % 3} for i in range(6)]  # image 6 has none
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    out = read_inat21(path)
    assert out.ranks == INAT21_RANKS
    assert len(out) == 6 and dict(out.skipped) == {"no annotation": 1}
    first = out.records[0]
    assert first.image == tmp_path / "train" / "00000_Amphiprion_clarkii" / "0.jpg"
    assert first.split == "train"
    assert first.lineage.texts()[-1] == "specific_epithet: clarkii"
    summary = out.summary()
    assert summary["taxa"] == {
        "kingdom": 2,
        "phylum": 2,
        "class": 2,
        "order": 2,
        "family": 2,
        "genus": 2,
        "specific_epithet": 3,
    }
    assert summary["labelled_to"]["specific_epithet"] == 6
    with pytest.raises(ValueError, match="not an iNat21 file"):
        (tmp_path / "bad.json").write_text("{}")
        read_inat21(tmp_path / "bad.json")


def test_fishnet_sample_counts(fishnet_csv, tmp_path):
    """Counts worked out by hand from the 300 real rows (see the CSV): one row has no Class."""
    out = read_fishnet(fishnet_csv, root=tmp_path)
    assert out.summary() == {
        "records": 299,
        "taxa": {"class": 3, "order": 61, "family": 135, "genus": 216, "specific_epithet": 131},
        "labelled_to": {"class": 299, "order": 299, "family": 299, "genus": 299, "specific_epithet": 131},
        "skipped": {"missing class": 1},
        # FishNet's own order names hold "/" ("Eupercaria/misc"): counted and listed, trained on as they are
        "unwritable_names": {
            "count": 6,
            "reasons": {"a path separator": 6},
            "examples": [
                ["Eupercaria/misc", "a path separator"],
                ["Perciformes/Serranoidei", "a path separator"],
                ["Ovalentaria/misc", "a path separator"],
                ["Perciformes/Scorpaenoidei", "a path separator"],
                ["Perciformes/Percoidei", "a path separator"],
            ],
        },
    }
    by_image = {r.image.name: r for r in out}
    # An iNat-sourced row: no species, so labelled to genus; the path is root/Folder/image.
    inat = by_image["1c23ecff-5cd9-4cf8-b3b6-ec80b5b3da44.jpg"]
    assert inat.image == tmp_path / "Fundulidae" / "1c23ecff-5cd9-4cf8-b3b6-ec80b5b3da44.jpg"
    assert inat.lineage.names == ("Actinopterygii", "Cyprinodontiformes", "Fundulidae", "Fundulus")
    # A FishBase row: the image is a URL; the species rank holds the epithet only.
    fishbase = by_image["Cifil_u0.jpg"]
    assert fishbase.image == tmp_path / "Labridae" / "Cifil_u0.jpg"
    assert fishbase.lineage.names[-2:] == ("Cirrhilabrus", "filamentosus")
    # Class names stay as given: the release mixes Actinopterygii and Actinopteri.
    assert {r.lineage.names[0] for r in out} == {"Actinopterygii", "Actinopteri", "Elasmobranchii"}


def test_fishnet_inspect_json_cli(fishnet_csv, capsys):
    assert main(["data", "inspect", "--format", "fishnet", str(fishnet_csv), "--json"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1
    result = json.loads(printed)
    assert result["records"] == 299 and result["skipped"] == {"missing class": 1}
    assert set(result) == {"records", "taxa", "labelled_to", "skipped", "unwritable_names"}


def test_bioscan(tmp_path):
    rows = [
        ["S1", "P1", "u", *BIOSCAN_TAXA[0], "ACGT", "a.jpg", "1", "train"],  # Asynapta groverae
        [
            "S2",
            "P2",
            "u",
            "Arthropoda",
            "Insecta",
            "Diptera",
            "Sciaridae",
            "not_classified",
            "not_classified",
            "not_classified",
            "not_classified",
            "ACGT",
            "b.jpg",
            "7",
            "validation",
        ],
        [
            "S3",
            "P3",
            "u",
            "Arthropoda",
            "Insecta",
            "Diptera",
            "not_classified",
            "x",
            "x",
            "Asynapta",
            "not_classified",
            "ACGT",
            "c.jpg",
            "2",
            "train",
        ],  # gap: genus without family
        [
            "S4",
            "P4",
            "u",
            "Arthropoda",
            "Insecta",
            "Hymenoptera",
            "not_classified",
            "x",
            "x",
            "not_classified",
            "not_classified",
            "ACGT",
            "",
            "2",
            "test",
        ],  # no image
    ]
    path = tmp_path / "BIOSCAN_Insect_Dataset_metadata.tsv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(BIOSCAN_COLUMNS)
        writer.writerows(rows)
    out = read_bioscan(path, root=tmp_path / "cropped_256")
    assert out.ranks == BIOSCAN_RANKS
    assert len(out) == 2
    assert dict(out.skipped) == {"missing family": 1, "no image path": 1}
    first, second = out.records
    assert first.image == tmp_path / "cropped_256" / "part1" / "a.jpg"
    assert first.lineage.names == ("Insecta", "Diptera", "Cecidomyiidae", "Asynapta", "groverae")
    assert first.split == "train"
    assert second.lineage.depth == 3 and second.split == "validation"


def test_folder_f4k_mini_keeps_the_family_level_class(f4k_mini):
    """The fixture in the dataset's own layout: 5 classes of 5 photos; fish_18 is labelled to family only."""
    out = read_folder(f4k_mini)
    assert out.summary()["records"] == 25
    assert out.summary()["labelled_to"]["specific_epithet"] == 20
    assert out.summary()["taxa"]["specific_epithet"] == 4
    scarid = [r for r in out if r.image.parent.name == "fish_18"]
    assert len(scarid) == 5 and scarid[0].lineage.finest_rank is Rank.FAMILY


@pytest.mark.data
def test_folder_f4k_counts(f4k_root):
    """Fish4Knowledge: 23 folders; fish_18 is labelled to family only (45 images)."""
    out = read_folder(f4k_root)
    per_folder = {d.name: len(list(d.iterdir())) for d in (f4k_root / "fish_image").iterdir()}
    assert sum(per_folder.values()) == 3917
    assert out.summary() == {
        "records": 3917,
        "taxa": {"kingdom": 1, "phylum": 1, "class": 1, "order": 6, "family": 12, "genus": 20, "specific_epithet": 22},
        "labelled_to": {
            "kingdom": 3917,
            "phylum": 3917,
            "class": 3917,
            "order": 3917,
            "family": 3917,
            "genus": 3917 - 45,
            "specific_epithet": 3917 - 45,
        },
        "skipped": {},
    }
    scarid = [r for r in out if r.image.parent.name == "fish_18"]
    assert len(scarid) == per_folder["fish_18"] == 45
    assert scarid[0].lineage.finest_rank is Rank.FAMILY


def test_folder_counts_what_it_skips(tmp_path):
    (tmp_path / "taxonomy.csv").write_text(
        "folder,order,family,genus,species\n"
        "a,Perciformes,Pomacentridae,Amphiprion,Amphiprion clarkii\n"
        "b,Perciformes,Labridae,,\n"
        "gone,Perciformes,Labridae,Thalassoma,lunare\n"
    )
    for name, files in {"a": ["1.png", "2.JPG", "notes.txt"], "b": ["x.png"], "stray": ["s.png"]}.items():
        (tmp_path / name).mkdir()
        for file in files:
            (tmp_path / name / file).write_bytes(b"")
    out = read_folder(tmp_path)
    assert [r.image.name for r in out] == ["1.png", "2.JPG", "x.png"]
    assert out.records[0].lineage.names == ("Perciformes", "Pomacentridae", "Amphiprion", "clarkii")
    assert dict(out.skipped) == {"folder missing": 1, "not an image file": 1, "folder not in taxonomy table": 1}


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_generic_table(tmp_path, suffix):
    rows = [
        {
            "file_name": "img/1.png",
            "family": "Pomacentridae",
            "genus": "Amphiprion",
            "species": "Amphiprion clarkii",
            "split": "train",
        },
        {"file_name": "img/2.png", "family": "Pomacentridae", "genus": "Amphiprion", "species": "", "split": "val"},
        {"file_name": "", "family": "Pomacentridae", "genus": "Amphiprion", "species": "", "split": "val"},
        {"file_name": "img/3.png", "family": "", "genus": "Amphiprion", "species": "", "split": "val"},
    ]
    path = tmp_path / f"metadata{suffix}"
    if suffix == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = read_table(path)
    assert out.ranks == (Rank.FAMILY, Rank.GENUS, Rank.SPECIFIC_EPITHET)
    assert [r.lineage.names for r in out] == [
        ("Pomacentridae", "Amphiprion", "clarkii"),
        ("Pomacentridae", "Amphiprion"),
    ]
    assert [r.split for r in out] == ["train", "val"]
    assert out.records[0].image == tmp_path / "img" / "1.png"
    assert dict(out.skipped) == {"no image path": 1, "missing family": 1}
    assert read_records("csv", path).summary() == out.summary()


def test_unknown_format_and_missing_file(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown format"):
        read_records("coco", tmp_path)
    assert main(["data", "inspect", "--format", "fishnet", str(tmp_path / "nope.csv")]) == 2
    assert "FishNet CSV not found" in capsys.readouterr().err


@pytest.mark.data
def test_cub100_lt_counts(cub_root):
    """CUB-100-LT as the benchmarks read it: 1,782 images of 100 species in 13 orders, long-tailed."""
    out = read_records("csv", cub_root / "metadata.csv")
    summary = out.summary()
    assert summary["records"] == 1782 and not summary["skipped"]
    assert summary["taxa"]["order"] == 13 and summary["taxa"]["specific_epithet"] == 100
    per_species = Counter(r.lineage.names for r in out)
    assert min(per_species.values()) == 4 and sum(1 for n in per_species.values() if n == 4) == 30


@pytest.mark.data
def test_birds525_shares_no_species_with_cub100_lt(birds525_root, cub_root):
    """The prior's corpus: 2,295 photos of 459 species, none of them a species the CUB benchmark evaluates. The 5
    photos of the fish eagle Ichthyophaga ichthyaetus carry a flatworm's lineage (a homonym genus resolved to the
    wrong kingdom branch, no class): they are counted as skipped, not lost, and the other 38 orders remain."""
    birds = read_records("csv", birds525_root / "metadata.csv")
    cub = read_records("csv", cub_root / "metadata.csv")
    assert len(birds) == 2290 and dict(birds.skipped) == {"missing class": 5}
    assert birds.summary()["taxa"]["order"] == 38
    binomial = Rank.SPECIFIC_EPITHET
    cub_species = {r.lineage.names for r in cub if r.lineage.finest_rank is binomial}
    assert not {r.lineage.names for r in birds if r.lineage.finest_rank is binomial} & cub_species


def test_a_folder_dataset_finds_its_root_in_one_pass_over_its_taxa(tmp_path, monkeypatch):
    """The image root is found without trying each class folder as a root: that was one stat per (folder, folder)
    pair, hours at 16,000 taxa (benchmarks/data_scale.py --part evaluation)."""
    from pathlib import Path

    from PIL import Image

    rows = ["folder,genus,specific_epithet"]
    for i in range(60):
        (tmp_path / f"s{i}").mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / f"s{i}" / "0.png")
        rows.append(f"s{i},Genus{i // 4},epithet{i}")
    (tmp_path / "taxonomy.csv").write_text("\n".join(rows) + "\n")
    calls, is_dir = [], Path.is_dir
    monkeypatch.setattr(Path, "is_dir", lambda self: calls.append(self) or is_dir(self))
    assert len(read_folder(tmp_path)) == 60
    assert len(calls) < 10 * 60  # a handful per folder; trying each folder as a root made it 60 x 61 more
