import numpy as np
import pytest
import torch
from PIL import Image

from taxadiffusion.data.dataset import ImageDataset, PathTable
from taxadiffusion.data.readers import read_folder
from taxadiffusion.data.records import RecordSet
from taxadiffusion.taxonomy import NONE_ID as UNLABELLED
from taxadiffusion.taxonomy import STANDARD_RANKS


def test_items_carry_pixels_and_ids(tmp_path):
    (tmp_path / "taxonomy.csv").write_text(
        "folder,family,genus,species\na,Pomacentridae,Amphiprion,clarkii\nb,Labridae,,\n"
    )
    for folder in "ab":
        (tmp_path / folder).mkdir()
        pixels = np.random.default_rng(0).integers(0, 255, (20, 50, 4), dtype=np.uint8)
        Image.fromarray(pixels, "RGBA").save(tmp_path / folder / "1.png")
    records = read_folder(tmp_path)
    taxonomy = records.taxonomy()
    dataset = ImageDataset(records.records, taxonomy, size=16, seed=3)
    item = dataset[0]
    assert item["pixel_values"].shape == (3, 16, 16) and item["pixel_values"].dtype == torch.float32
    assert item["pixel_values"].min() >= -1.0 and item["pixel_values"].max() <= 1.0
    assert item["taxon_ids"].tolist() == list(taxonomy.ids(records.records[0].lineage))
    assert dataset[1]["taxon_ids"].tolist()[1:] == [UNLABELLED, UNLABELLED]
    assert torch.equal(dataset[0]["pixel_values"], item["pixel_values"])  # same epoch, same crop
    crops = set()
    for epoch in range(8):  # a 20x50 image has 31 square crop positions
        dataset.set_epoch(epoch)
        crops.add(dataset[0]["pixel_values"].numpy().tobytes())
    assert len(crops) > 1


def test_unreadable_image_names_the_file(tmp_path):
    (tmp_path / "taxonomy.csv").write_text("folder,genus\na,Amphiprion\n")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "bad.png").write_bytes(b"nope")
    records = read_folder(tmp_path)
    dataset = ImageDataset(records.records, records.taxonomy(), size=8)
    with pytest.raises(RuntimeError, match=r"bad\.png.*data check"):
        dataset[0]


def test_path_table_round_trips_paths(tmp_path):
    paths = [tmp_path / "a" / "1.png", tmp_path / "ünïcode dir" / "2 x.jpg", tmp_path / "b.png"]
    table = PathTable(paths)
    assert len(table) == 3 and list(table) == [str(p) for p in paths]
    assert table[-1] == str(paths[-1])
    with pytest.raises(IndexError):
        table[3]
    assert list(PathTable([])) == []


def test_rows_of_one_taxon_share_one_lineage(tmp_path):
    """Readers of millions of rows keep one Lineage per taxon; the dataset's ids match a per-row lookup."""
    out = RecordSet(STANDARD_RANKS[-3:])

    def row(*names):
        return dict(zip(out.ranks, names, strict=True))

    for i in range(6):
        out.add(tmp_path / f"{i}.png", row("Labridae", "Labrus", "bergylta" if i % 2 else None))
    out.add(tmp_path / "gap.png", row("Labridae", None, "bergylta"))
    out.add(tmp_path / "gap2.png", row("Labridae", None, "bergylta"))
    assert len(out) == 6 and out.skipped == {"missing genus": 2}
    assert len({id(r.lineage) for r in out.records}) == 2
    taxonomy = out.taxonomy()
    dataset = ImageDataset(out.records, taxonomy, size=8)
    expected = [list(taxonomy.ids(r.lineage)) + [UNLABELLED] * (3 - r.lineage.depth) for r in out.records]
    assert dataset.taxon_ids.tolist() == expected
    assert list(dataset.paths) == [str(r.image) for r in out.records]


def test_split_records_holds_out_part_of_every_taxon():
    from collections import Counter

    from taxadiffusion.data.records import split_records
    from taxadiffusion.taxonomy import Rank

    ranks = (Rank.GENUS, Rank.SPECIFIC_EPITHET)
    sizes = {"a": 1, "b": 2, "c": 10, "d": 41}
    records = RecordSet(ranks)
    for epithet, n in sizes.items():
        for i in range(n):
            records.add(f"/{epithet}/{i}.png", {Rank.GENUS: "G", Rank.SPECIFIC_EPITHET: epithet})
    kept, held = split_records(records.records, 0.2, seed=0)
    assert {r.image for r in kept}.isdisjoint(r.image for r in held)
    assert sorted(map(str, (r.image for r in kept + held))) == sorted(str(r.image) for r in records)
    per_taxon = Counter(r.lineage.names[-1] for r in held)
    assert per_taxon == {"b": 1, "c": 2, "d": 8}  # a lone image stays in training; at least one held out
    assert all(Counter(r.lineage.names[-1] for r in kept)[t] >= 1 for t in sizes)
    again, _ = split_records(list(reversed(records.records)), 0.2, seed=0)
    assert [r.image for r in again] == [r.image for r in kept]  # a function of the records, not their order
    assert split_records(records.records, 0.2, seed=1)[1] != held
    with pytest.raises(ValueError, match=r"held-out fraction must be in \(0, 1\)"):
        split_records(records.records, 1.0, seed=0)


def test_the_pre_flight_screen_is_split_across_processes_and_kept_in_a_manifest(tmp_path, monkeypatch):
    """Each process screens its chunks; a later start of the same images reads the manifest and opens no file."""
    from concurrent.futures import ThreadPoolExecutor

    from taxadiffusion.data import check
    from taxadiffusion.errors import InputError
    from taxadiffusion.shards import Share
    from taxadiffusion.taxonomy import FISHNET_RANKS

    records = RecordSet(FISHNET_RANKS)
    for i in range(5):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
        records.add(tmp_path / f"{i}.png", {FISHNET_RANKS[0]: "Actinopterygii"})
    (tmp_path / "3.png").write_bytes(b"not an image")
    decoded = []
    original = check.check_image
    monkeypatch.setattr(check, "check_image", lambda path: decoded.append(path) or original(path))
    monkeypatch.setattr(check, "SCREEN_CHUNK", 2)  # chunks {0, 1} {2, 3} {4}: process 0 takes two, process 1 one

    def process(rank: int):
        return check.screen_records(records, True, 1, tmp_path / "cache", Share(rank, 2), progress=False)

    with ThreadPoolExecutor(2) as pool:
        kept = list(pool.map(process, (0, 1)))
    assert sorted(decoded) == sorted(r.image for r in records)  # each image decoded once, by one process
    assert [[r.image.name for r in k] for k in kept] == [["0.png", "1.png", "2.png", "4.png"]] * 2
    assert kept[0].skipped["unusable image (unreadable)"] == 1
    (folder,) = (tmp_path / "cache").glob("screen-*")
    assert sorted(p.name for p in folder.iterdir()) == [f"chunk-00000{i}.json" for i in range(3)] + ["manifest.json"]

    decoded.clear()  # a later start: the manifest, not a file opened
    with pytest.raises(InputError, match="1 unusable training image"):
        check.screen_records(records, False, 1, tmp_path / "cache", progress=False)
    assert decoded == []
    (folder / "manifest.json").write_text("{damaged")  # a damaged manifest: the finished chunks are read again
    assert len(check.screen_records(records, True, 1, tmp_path / "cache", progress=False)) == 4 and decoded == []
    fewer = RecordSet(FISHNET_RANKS, records.records[:2])  # other images: another key, screened anew
    assert check.screen_records(fewer, False, 1, tmp_path / "cache", progress=False) is fewer and len(decoded) == 2
