"""Data loading at iNaturalist 2021's scale: reading the metadata, building the dataset, and the memory of
the DataLoader's workers over an epoch.

    python benchmarks/data_scale.py                 # 2,686,843 images of 10,000 species, 2 workers, one epoch
    python benchmarks/data_scale.py --images 300000 --samples 100000   # a quick look
    python benchmarks/data_scale.py --part evaluation --taxa 16000 --processes 2   # `evaluate` at iNat21's taxa
    python benchmarks/data_scale.py --part latents --images 16384 --processes 2    # the latent cache, sharded

Writes an iNat21-format `train.json` (metadata only: the images do not exist) to a temporary folder, then
times `read_inat21`, the taxonomy and `ImageDataset`, and iterates a DataLoader over the dataset's own item
code with `load_image` replaced by one in-memory image: this measures the data structures, not the disk.
Forked workers that touch their parent's Python objects copy their memory pages (PyTorch issue 13246); the
report gives the workers' private memory and the machine's memory rise. Linux only (/proc). Results go to
benchmarks/results/data_scale.md (its `## Reading` section is kept) and data_scale.json.

`--part evaluation` scores a folder of generated images (`evaluate --images`) for a simulated taxonomy of
`--taxa` species in genera of 4, one real and one generated 64 px image a species, on `--processes` processes
(RANK and WORLD_SIZE, as a launcher sets them). The networks are tiny: LPIPS-AlexNet and a small random
convolutional network in Inception's place, so that the protocol's own cost and memory are what is measured.
Each process's resident memory is sampled every 500 taxa scored; it must not grow with the taxa.

`--part latents` builds the latent cache (the step `prepare` and `train` start with) of `--images` 64 px images,
first in one process and then in `--processes` (RANK and WORLD_SIZE, one thread each), with a small VAE of SD's
architecture (2 down blocks, 4 latent channels). It reports each process's time, images/s and resident memory
after each shard, and checks that the shards and index are the same bytes however many processes wrote them.
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


class SmallFeatures(torch.nn.Module):
    """Stands in for Inception: uint8 (B, 3, H, W) -> (B, 2048), a few random convolutions."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten()
        )
        self.head = torch.nn.Linear(256, 2048)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(images.float() / 127.5 - 1))


def write_evaluation_folder(root: Path, taxa: int) -> None:
    """Real images (`real/<genus>/<species>/0.png` with a taxonomy.csv) and generated ones in `evaluate`'s layout."""
    from taxadiffusion.names import lineage_folder
    from taxadiffusion.taxonomy import Rank

    ranks = (Rank.GENUS, Rank.SPECIFIC_EPITHET)
    rows = ["folder,genus,specific_epithet"]
    for i in tqdm(range(taxa), desc="writing images", unit="taxon"):
        genus, species = f"Genus{i // 4}", f"epithet{i}"
        colour = (i * 37 % 256, i * 91 % 256, i * 53 % 256)
        (root / "real" / f"s{i}").mkdir(parents=True)
        Image.new("RGB", (64, 64), colour).save(root / "real" / f"s{i}" / "0.png")
        rows.append(f"s{i},{genus},{species}")
        for rank, names in ((ranks[1], (genus, species)), (ranks[0], (genus,))):
            folder = root / "images" / rank.value / lineage_folder(names)
            if not folder.exists():
                folder.mkdir(parents=True)
                Image.new("RGB", (64, 64), colour[::-1]).save(folder / "00.png")
    (root / "real" / "taxonomy.csv").write_text("\n".join(rows) + "\n")


def evaluation_worker(root: Path) -> dict:
    """One process's share of the evaluation, with its time and memory."""
    from taxadiffusion.data.readers import read_folder
    from taxadiffusion.eval import protocol
    from taxadiffusion.eval.protocol import Evaluation
    from taxadiffusion.eval.settings import EvalSettings

    samples, score = [], protocol.score_taxon

    def sampled(*args, **kwargs):
        if len(samples) % 500 == 0:
            samples.append(rss_mib())
        else:
            samples.append(None)
        return score(*args, **kwargs)

    protocol.score_taxon = sampled
    start = time.perf_counter()
    real = read_folder(root / "real")
    settings = EvalSettings(ranks=("genus", "specific_epithet"), lpips_net="alex", resolution=64)
    evaluation = Evaluation(real, root / "eval", settings, images=root / "images")
    ready = time.perf_counter()
    evaluation.run(progress=False, features=SmallFeatures())
    memory = [m for m in samples if m is not None]
    return {
        "setup_s": ready - start,
        "score_and_metrics_s": time.perf_counter() - ready,
        "taxa_scored": len(samples),
        "rss_samples_mib": memory,
        "peak_rss_mib": peak_rss_mib(),
    }


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def launch(part: list[str], processes: int) -> list[dict]:
    """This script's worker `part` in `processes` fresh Pythons (RANK and WORLD_SIZE, as a launcher sets them, one
    thread each); each prints its measurements as its last line of JSON."""
    import subprocess

    command = [sys.executable, __file__, "--part", *part]
    env = {**os.environ, "WORLD_SIZE": str(processes), "OMP_NUM_THREADS": "1"}
    launched = [
        subprocess.Popen(command, env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, text=True)
        for r in range(processes)
    ]
    outputs = [p.communicate()[0] for p in launched]
    if any(p.returncode for p in launched):
        raise SystemExit(f"a {part[0]} process failed (exit codes {[p.returncode for p in launched]})")
    return [json.loads(output.strip().splitlines()[-1]) for output in outputs]


def measure_evaluation(args: argparse.Namespace, folder: Path) -> dict:
    """The evaluation on `args.processes` processes, each a fresh Python running this script's worker part."""
    start = time.perf_counter()
    write_evaluation_folder(folder, args.taxa)
    results = {"taxa": args.taxa, "processes": args.processes, "write_s": time.perf_counter() - start}
    start = time.perf_counter()
    workers = launch(["evaluation-worker", "--root", str(folder)], args.processes)
    results |= {"wall_s": time.perf_counter() - start, "per_process": workers}
    results["metrics_written"] = (folder / "eval" / "metrics.json").is_file()
    return results


def evaluation_report(r: dict) -> list[str]:
    rows = [
        ("simulated taxa", f"{r['taxa']:,} species in genera of 4: {r['taxa'] + r['taxa'] // 4:,} taxa scored"),
        ("processes", f"{r['processes']} (RANK / WORLD_SIZE), wall time {r['wall_s']:.0f} s"),
    ]
    for rank, worker in enumerate(r["per_process"]):
        rss = worker["rss_samples_mib"]
        rows.append(
            (
                f"process {rank}",
                f"{worker['taxa_scored']:,} taxa in {worker['score_and_metrics_s']:.0f} s (setup "
                f"{worker['setup_s']:.0f} s); RSS every 500 taxa {rss[0]:,.0f} to {rss[-1]:,.0f} MiB "
                f"(min {min(rss):,.0f}, max {max(rss):,.0f}); peak {worker['peak_rss_mib']:,.0f} MiB",
            )
        )
    return (
        ["## Evaluation at iNat21's taxa", "", "| what | measured |", "|---|---|"]
        + [f"| {what} | {value} |" for what, value in rows]
        + [""]
    )


LATENT_SIZE = 64  # pixels a side


def write_latent_images(root: Path, images: int) -> None:
    """`images` small noisy PNGs in a folder dataset of 64 species (`root/<species>/<i>.png`, taxonomy.csv)."""
    import numpy as np

    rng = np.random.default_rng(0)
    rows = ["folder,genus,specific_epithet"]
    for species in range(64):
        (root / f"s{species}").mkdir(parents=True)
        rows.append(f"s{species},Genus{species // 4},epithet{species}")
    (root / "taxonomy.csv").write_text("\n".join(rows) + "\n")
    for i in tqdm(range(images), desc="writing images", unit="img"):
        pixels = rng.integers(0, 255, (LATENT_SIZE, LATENT_SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"s{i % 64}" / f"{i}.png", compress_level=1)


def small_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=LATENT_SIZE,
    ).eval()


def latents_worker(root: Path, cache: Path) -> dict:
    """One process's share of the latent cache (its RANK and WORLD_SIZE), with its time and memory per shard."""
    from taxadiffusion.data.readers import read_folder
    from taxadiffusion.shards import Share
    from taxadiffusion.train import latents

    torch.set_num_threads(1)
    start = time.perf_counter()
    records = read_folder(root)
    dataset = ImageDataset(records.records, records.taxonomy(), size=LATENT_SIZE, policy="squash")
    vae, share = small_vae(), Share.from_environment()
    memory, encode = [], latents.encode_shard

    def measured(*args, **kwargs):
        shard = encode(*args, **kwargs)
        memory.append(rss_mib())
        return shard

    latents.encode_shard = measured
    ready = time.perf_counter()
    latents.build_latent_dataset(dataset, vae, cache, share, batch_size=64, progress=False)
    return {
        "setup_s": ready - start,
        "build_s": time.perf_counter() - ready,
        "shards": len(memory),
        "rss_after_each_shard_mib": memory,
        "peak_rss_mib": peak_rss_mib(),
    }


def measure_latents(args: argparse.Namespace, folder: Path) -> dict:
    """The latent cache of `args.images` images by one process, then by `args.processes`; the same bytes?"""
    from taxadiffusion.shards import LATENT_CHUNK

    start = time.perf_counter()
    write_latent_images(folder / "data", args.images)
    results = {"images": args.images, "chunk": LATENT_CHUNK, "write_s": time.perf_counter() - start, "runs": {}}
    for processes in (1, args.processes):
        cache = folder / f"cache-{processes}"
        start = time.perf_counter()
        workers = launch(["latents-worker", "--root", str(folder / "data"), "--cache", str(cache)], processes)
        results["runs"][str(processes)] = {"wall_s": time.perf_counter() - start, "per_process": workers}
    one, many = (
        {p.name: p.read_bytes() for p in next((folder / f"cache-{n}").glob("latents-*")).iterdir()}
        for n in (
            1,
            args.processes,
        )
    )
    results["same_bytes"] = one == many
    results["files"] = len(one)
    results["bytes_per_image"] = sum(len(v) for v in one.values()) / args.images
    return results


def latents_report(r: dict) -> list[str]:
    rows = [
        (
            "images",
            f"{r['images']:,} at {LATENT_SIZE} px, in shards of {r['chunk']:,} ({r['files']} files with the index)",
        ),
        ("cache on disk", f"{r['bytes_per_image']:,.0f} bytes per image (fp32 mean and log-variance)"),
    ]
    for processes, run in sorted(r["runs"].items()):
        rows.append(
            (
                f"{processes} process(es)",
                f"wall time {run['wall_s']:.0f} s, {r['images'] / run['wall_s']:,.0f} images/s",
            )
        )
        for rank, worker in enumerate(run["per_process"]):
            rss = worker["rss_after_each_shard_mib"]
            memory = f"RSS after each shard {min(rss):,.0f} to {max(rss):,.0f} MiB; " if rss else ""
            rows.append(
                (
                    f"{processes} process(es), process {rank}",
                    f"{worker['shards']} shards in {worker['build_s']:.0f} s (setup {worker['setup_s']:.0f} s); "
                    f"{memory}peak {worker['peak_rss_mib']:,.0f} MiB",
                )
            )
    rows.append(("shards and index", "the same bytes" if r["same_bytes"] else "DIFFERENT bytes"))
    return (
        ["## The latent cache across processes", "", "| what | measured |", "|---|---|"]
        + [f"| {what} | {value} |" for what, value in rows]
        + [""]
    )


# The parts beside the loading measurement: how each measures, and its section of data_scale.md.
PARTS = {"evaluation": (measure_evaluation, evaluation_report), "latents": (measure_latents, latents_report)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parts = ["loading", "evaluation", "latents", "evaluation-worker", "latents-worker"]
    parser.add_argument("--part", choices=parts, default="loading")
    parser.add_argument("--taxa", type=int, default=16_000, help="--part evaluation: species simulated")
    parser.add_argument("--processes", type=int, default=2, help="--part evaluation: processes sharing it")
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, help="iNat21 train has 2,686,843 (default); --part latents: 16,384")
    parser.add_argument("--species", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=0, help="items to load (default: one epoch)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.part == "evaluation-worker":
        print(json.dumps(evaluation_worker(args.root)))
        return 0
    if args.part == "latents-worker":
        print(json.dumps(latents_worker(args.root, args.cache)))
        return 0
    args.images = args.images or (16_384 if args.part == "latents" else 2_686_843)
    argv = sys.argv[1:] if argv is None else argv
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in PARTS:
            measured = PARTS[args.part][0](args, Path(tmp)) | {"command": " ".join(argv)}
            (args.out / f"data_scale_{args.part}.json").write_text(json.dumps(measured, indent=1) + "\n")
        else:
            results = measure(args, Path(tmp)) | {"command": " ".join(argv)}
            (args.out / "data_scale.json").write_text(json.dumps(results, indent=1) + "\n")
    results = json.loads((args.out / "data_scale.json").read_text())
    text = report(results, args, results.get("command", "").split())
    for part, (_, section) in PARTS.items():  # each part's section, from its last measurement
        if (args.out / f"data_scale_{part}.json").is_file():
            measured = json.loads((args.out / f"data_scale_{part}.json").read_text())
            command = f"\nCommand: `python benchmarks/data_scale.py {measured['command']}`\n"
            text += "\n" + "\n".join(section(measured)) + command
    write_keeping_section(args.out / "data_scale.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
