"""Data loading at iNaturalist 2021's scale: reading the metadata, building the dataset, and the memory of
the DataLoader's workers over an epoch.

    python benchmarks/data_scale.py                 # 2,686,843 images of 10,000 species, 2 workers, one epoch
    python benchmarks/data_scale.py --images 300000 --samples 100000   # a quick look

Writes an iNat21-format `train.json` (metadata only: the images do not exist) to a temporary folder, then
times `read_inat21`, the taxonomy and `ImageDataset`, and iterates a DataLoader over the dataset's own item
code with `load_image` replaced by one in-memory image: this measures the data structures, not the disk.
Forked workers that touch their parent's Python objects copy their memory pages (PyTorch issue 13246); the
report gives the workers' private memory and the machine's memory rise. Linux only (/proc). Results go to
benchmarks/results/data_scale.md (its `## Reading` section is kept) and data_scale.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from taxadiffusion.data import dataset as dataset_module
from taxadiffusion.data.dataset import ImageDataset
from taxadiffusion.data.readers import read_inat21
from taxadiffusion.eval.report import write_keeping_section

from common import RESULTS

IMAGE_FIELDS = {  # the release's other keys per image, so that the file is as large to parse
    "license": 1,
    "rights_holder": "observer name",
    "date": "2019-06-01 10:00:00+00:00",
    "latitude": 43.1,
    "longitude": -79.2,
    "location_uncertainty": 10,
}
# iNat21's taxa per rank (train, 10,000 species), finest first.
TAXA = {"genus": 4884, "family": 1103, "order": 273, "class": 51, "phylum": 13, "kingdom": 3}


def write_inat21(path: Path, images: int, species: int) -> None:
    """A COCO-style train.json with the release's keys. Species i is in genus i mod 4884, a genus g in
    family g mod 1103, and so on up: the lineages nest, with the release's number of taxa at each rank."""
    categories = []
    for i in range(species):
        names, index = {}, i
        for rank, n in TAXA.items():
            index %= n
            names[rank] = f"{rank.title()}{index}"
        names = {rank: names[rank] for rank in reversed(TAXA)} | {"specific_epithet": f"epithet{i}"}
        folder = "_".join([f"{i:05d}", *names.values()])
        categories.append(
            {"id": i, "name": f"{names['genus']} epithet{i}", "common_name": f"species {i}", **names}
            | {"supercategory": names["kingdom"], "image_dir_name": folder}
        )
    rows = []
    for j in range(images):
        folder = categories[j % species]["image_dir_name"]
        name = f"train/{folder}/{j:08x}-4c1e-4a52-9d3b-2f6c0e8a1b7d.jpg"
        rows.append({"id": j, "width": 500, "height": 375, "file_name": name} | IMAGE_FIELDS)
    annotations = [{"id": j, "image_id": j, "category_id": j % species} for j in range(images)]
    path.write_text(json.dumps({"info": {}, "images": rows, "annotations": annotations, "categories": categories}))


def machine_used_mib() -> float:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return (int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])) / 1024


def private_mib(pid: int) -> float:
    """Pages a process holds alone: in a forked worker, what it copied from its parent (and its own)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1]) / 1024
    return 0.0


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def in_memory_image(path) -> Image.Image:
    """Stands in for `load_image`: the dataset's own item code runs, without the disk."""
    return IMAGE


IMAGE = Image.new("RGB", (64, 48), (40, 90, 120))


def measure(args: argparse.Namespace, folder: Path) -> dict:
    path = folder / "train.json"
    start = time.perf_counter()
    write_inat21(path, args.images, args.species)
    results = {"metadata_mib": path.stat().st_size / 2**20, "write_s": time.perf_counter() - start}
    print(f"wrote {path} ({results['metadata_mib']:.0f} MiB) in {results['write_s']:.0f} s", flush=True)

    start = time.perf_counter()
    records = read_inat21(path)
    results["read_s"], results["records"] = time.perf_counter() - start, len(records)
    start = time.perf_counter()
    taxonomy = records.taxonomy()
    results["taxonomy_s"] = time.perf_counter() - start
    start = time.perf_counter()
    dataset_module.load_image = in_memory_image  # before the workers fork, so they inherit it
    dataset = ImageDataset(records.records, taxonomy, size=32)
    results["dataset_s"], results["parent_rss_mib"] = time.perf_counter() - start, rss_mib()
    print(f"read {len(records):,} records, built the dataset; parent RSS {results['parent_rss_mib']:.0f} MiB")
    del records  # as the trainer does: it keeps the dataset and the taxonomy
    gc.collect()
    results["parent_rss_dataset_mib"] = rss_mib()

    samples = args.samples or len(dataset)
    sampler = torch.utils.data.RandomSampler(dataset, num_samples=samples, generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, sampler=sampler, num_workers=args.workers)
    base, private, rise = machine_used_mib(), 0.0, 0.0
    start = time.perf_counter()
    batches = iter(loader)
    for i, _ in enumerate(tqdm(batches, desc="DataLoader epoch", unit="batch")):
        if i % 100 == 0:
            private = max(private, sum(private_mib(w.pid) for w in batches._workers))
            rise = max(rise, machine_used_mib() - base)
    results |= {"samples": samples, "loader_s": time.perf_counter() - start}
    results |= {"workers_private_mib": private, "machine_rise_mib": rise, "parent_rss_end_mib": rss_mib()}
    return results


def report(results: dict, args: argparse.Namespace, argv: list[str]) -> str:
    r = results
    rows = [
        ("metadata (train.json)", f"{r['metadata_mib']:.0f} MiB, {r['records']:,} images of {args.species:,} species"),
        ("read_inat21", f"{r['read_s']:.1f} s"),
        ("taxonomy", f"{r['taxonomy_s']:.1f} s"),
        (
            "ImageDataset",
            f"{r['dataset_s']:.1f} s; parent RSS after it {r['parent_rss_mib']:,.0f} MiB, "
            f"{r['parent_rss_dataset_mib']:,.0f} MiB once the records are dropped (as the trainer does)",
        ),
        ("DataLoader", f"{r['samples']:,} items with {args.workers} workers in {r['loader_s']:.0f} s"),
        ("workers' private memory (peak, all workers)", f"{r['workers_private_mib']:,.0f} MiB"),
        ("main process RSS at the end of the epoch", f"{r['parent_rss_end_mib']:,.0f} MiB"),
        ("machine memory rise during the epoch (peak; every process)", f"{r['machine_rise_mib']:,.0f} MiB"),
    ]
    return "\n".join(
        [
            "# Data loading at iNat21 scale",
            "",
            f"Command: `{' '.join(['python benchmarks/data_scale.py', *argv])}`",
            f"Machine: {os.cpu_count()} CPUs, torch {torch.__version__}, Python {sys.version.split()[0]}.",
            "",
            "| what | measured |",
            "|---|---|",
            *(f"| {what} | {value} |" for what, value in rows),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2_686_843, help="iNat21 train has 2,686,843")
    parser.add_argument("--species", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=0, help="items to load (default: one epoch)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = measure(args, Path(tmp))
    argv = sys.argv[1:] if argv is None else argv
    text = report(results, args, argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_scale.json").write_text(json.dumps(results, indent=1) + "\n")
    write_keeping_section(args.out / "data_scale.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
