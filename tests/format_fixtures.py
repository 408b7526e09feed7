"""Tiny datasets in the published formats, with real (small, random) images, for end-to-end tests.

iNat21 `train.json` (COCO style with the taxonomy on each category), FishNet (rows of the real sample CSV
in tests/data) and BIOSCAN-1M (metadata TSV, images in `part<chunk>/`).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

BIOSCAN_COLUMNS = [
    "sampleid",
    "processid",
    "uri",
    "phylum",
    "class",
    "order",
    "family",
    "subfamily",
    "tribe",
    "genus",
    "species",
    "nucraw",
    "image_file",
    "chunk_number",
    "split",
]


def write_image(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> Path:
    """A small random RGB image (JPEG or PNG by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def inat21_category(cid, kingdom, phylum, klass, order, family, genus, epithet) -> dict:
    """One iNat21 category, with every field the release has."""
    return {
        "id": cid,
        "name": f"{cid:05d}_{kingdom}_{phylum}_{klass}_{order}_{family}_{genus}_{epithet}",
        "common_name": "x",
        "supercategory": "Animals",
        "kingdom": kingdom,
        "phylum": phylum,
        "class": klass,
        "order": order,
        "family": family,
        "genus": genus,
        "specific_epithet": epithet,
        "image_dir_name": f"{cid:05d}_{genus}_{epithet}",
    }


INAT21_SPECIES = [
    ("Animalia", "Chordata", "Actinopterygii", "Perciformes", "Pomacentridae", "Amphiprion", "clarkii"),
    ("Animalia", "Chordata", "Actinopterygii", "Perciformes", "Pomacentridae", "Amphiprion", "ocellaris"),
    ("Animalia", "Chordata", "Aves", "Passeriformes", "Paridae", "Parus", "major"),
    ("Plantae", "Tracheophyta", "Magnoliopsida", "Rosales", "Rosaceae", "Rosa", "canina"),
]


def write_inat21(root: Path, per_species: int = 2) -> Path:
    """`root/train.json` and its images under `root/train/<image_dir_name>/`."""
    categories = [inat21_category(i, *names) for i, names in enumerate(INAT21_SPECIES)]
    images, annotations = [], []
    for category in categories:
        for _ in range(per_species):
            i = len(images)
            file_name = f"train/{category['image_dir_name']}/{i}.jpg"
            write_image(root / file_name, i)
            images.append({"id": i, "file_name": file_name, "width": 40, "height": 30})
            annotations.append({"id": i, "image_id": i, "category_id": category["id"]})
    path = root / "train.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def write_fishnet(root: Path, sample_csv: Path, rows: int = 12) -> Path:
    """The first `rows` usable rows of the real FishNet sample as `root/anns/train.csv`, their images
    under `root/images/<Folder>/`."""
    with sample_csv.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames
        kept = [row for row in reader if row["Class"] and row["Folder"] and row["image"]][:rows]
    for i, row in enumerate(kept):
        write_image(root / "images" / row["Folder"] / Path(row["image"]).name, i)
    path = root / "anns" / "train.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(kept)
    return path


BIOSCAN_TAXA = [
    (
        "Arthropoda",
        "Insecta",
        "Diptera",
        "Cecidomyiidae",
        "not_classified",
        "not_classified",
        "Asynapta",
        "Asynapta groverae",
    ),
    (
        "Arthropoda",
        "Insecta",
        "Diptera",
        "Sciaridae",
        "not_classified",
        "not_classified",
        "Bradysia",
        "Bradysia ocellaris",
    ),
    ("Arthropoda", "Insecta", "Hymenoptera", "Braconidae", "Microgastrinae", "x", "not_classified", "not_classified"),
]


def write_bioscan(root: Path, per_taxon: int = 3) -> Path:
    """`root/BIOSCAN_Insect_Dataset_metadata.tsv` and its images under `root/images/part<chunk>/`."""
    rows = []
    for taxon in BIOSCAN_TAXA:
        for i in range(per_taxon):
            n = len(rows)
            chunk = str(1 + n % 2)
            image = f"{n:04d}.jpg"
            write_image(root / "images" / f"part{chunk}" / image, n, size=(36, 48))
            rows.append([f"S{n}", f"P{n}", "u", *taxon, "ACGT", image, chunk, "train" if i else "validation"])
    path = root / "BIOSCAN_Insect_Dataset_metadata.tsv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(BIOSCAN_COLUMNS)
        writer.writerows(rows)
    return path
