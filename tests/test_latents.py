"""The VAE-latent cache: whole-image latents in shards, square windows drawn like the pixel random crop."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from taxadiffusion.config import Config, ConfigError
from taxadiffusion.data.dataset import ImageDataset
from taxadiffusion.data.images import resize_short_side
from taxadiffusion.data.readers import read_folder
from taxadiffusion.train.latents import build_latent_dataset, encoder_input
from tiny_models import tiny_vae

SIZES = [(64, 32), (32, 48), (32, 32), (40, 32)]  # (width, height): wide, tall, square, a little wide


@pytest.fixture
def records(tmp_path):
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "taxonomy.csv").write_text("folder,genus,species\na,Amphiprion,clarkii\n")
    rng = np.random.default_rng(0)
    for i, (width, height) in enumerate(SIZES):
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "data" / "a" / f"{i}.png")
    return read_folder(tmp_path / "data")


def test_resize_short_side_keeps_the_aspect_at_the_granularity():
    wide, tall, square = Image.new("RGB", (60, 30)), Image.new("RGB", (30, 61)), Image.new("RGB", (50, 50))
    assert resize_short_side(wide, 16, 4).size == (32, 16)
    assert resize_short_side(tall, 16, 4).size == (16, 32)  # 32.5 rounds to a multiple of 4
    assert resize_short_side(tall, 16).size == (16, 33)
    assert resize_short_side(square, 16, 8).size == (16, 16)


def _direct(vae, dataset, index):
    """The latent distribution a step would encode from the whole resized image."""
    with torch.no_grad():
        return vae.encode(encoder_input(dataset, index, 2)[None]).latent_dist.parameters[0]


def test_cached_windows_are_random_crops_of_the_whole_latent(records, tmp_path):
    vae = tiny_vae()  # 2x downsampling: 16 px images are 8 x 8 latents
    dataset = ImageDataset(records.records, records.taxonomy(), size=16, seed=1)
    cached = build_latent_dataset(dataset, vae, tmp_path / "cache", batch_size=2, progress=False, chunk=3)
    shards = sorted((tmp_path / "cache").glob("latents-*/shard-*.safetensors"))
    assert len(shards) == 2  # 4 images in shards of 3
    index = {Path(path).name: i for i, path in enumerate(dataset.paths)}

    wide, tall = index["0.png"], index["1.png"]
    assert cached.latent(wide).shape == (8, 8, 16) and cached.latent(tall).shape == (8, 12, 8)
    assert cached.latent(index["2.png"]).shape == (8, 8, 8)
    whole = _direct(vae, dataset, wide)
    torch.testing.assert_close(cached.latent(wide), whole, atol=1e-5, rtol=1e-5)

    lefts = set()
    for epoch in range(12):
        cached.set_epoch(epoch)
        window = cached[wide]["latent_params"]
        assert window.shape == (8, 8, 8)
        matches = [x for x in range(9) if torch.allclose(window, whole[:, :, x : x + 8], atol=1e-5)]
        assert matches, "every item is a square window of the image's latent"
        lefts.add(matches[0])
        torch.testing.assert_close(cached[wide]["latent_params"], window)  # the same (seed, epoch, index): same crop
    assert len(lefts) > 2  # and the crop moves from epoch to epoch

    batch = next(iter(torch.utils.data.DataLoader(cached, batch_size=4)))
    assert batch["latent_params"].shape == (4, 8, 8, 8)
    assert pickle.loads(pickle.dumps(cached))[tall]["latent_params"].shape == (8, 8, 8)  # open handles stay behind
    # the index is three arrays (40 bytes an image at the paper's scale), not lists of Python objects
    assert all(type(part).__module__ == "numpy" for part in (cached.shard, cached.offset, cached.shapes))


def test_centre_windows_without_random_crops_and_exact_latents_for_squash(records, tmp_path):
    vae = tiny_vae()
    fixed = ImageDataset(records.records, records.taxonomy(), size=16, random_crop=False)
    cached = build_latent_dataset(fixed, vae, tmp_path / "cache", progress=False)
    wide = [Path(path).name for path in fixed.paths].index("0.png")
    torch.testing.assert_close(cached[wide]["latent_params"], _direct(vae, fixed, wide)[:, :, 4:12])

    squashed = ImageDataset(records.records, records.taxonomy(), size=16, policy="squash")
    cached = build_latent_dataset(squashed, vae, tmp_path / "cache", progress=False)
    assert all(cached.latent(i).shape == (8, 8, 8) for i in range(len(cached)))
    assert len(list((tmp_path / "cache").glob("latents-*"))) == 2  # the policy is part of the key


def test_the_cache_is_reused_and_an_interrupted_build_goes_on(records, tmp_path, monkeypatch):
    vae = tiny_vae()
    dataset = ImageDataset(records.records, records.taxonomy(), size=16)
    clean = build_latent_dataset(dataset, vae, tmp_path / "clean", batch_size=1, progress=False)

    calls = []
    original = type(vae).encode

    def killed_after_two(self, x, *args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the job were killed mid-build
        calls.append(len(x))
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(type(vae), "encode", killed_after_two)
    with pytest.raises(KeyboardInterrupt):  # one image per shard: two complete shards survive
        build_latent_dataset(dataset, vae, tmp_path / "cache", batch_size=1, progress=False, chunk=1)
    (folder,) = (tmp_path / "cache").glob("latents-*")
    assert not (folder / "index.safetensors").exists() and len(list(folder.glob("shard-*.safetensors"))) == 2

    calls.clear()
    monkeypatch.setattr(
        type(vae), "encode", lambda self, x, *a, **k: calls.append(len(x)) or original(self, x, *a, **k)
    )
    resumed = build_latent_dataset(dataset, vae, tmp_path / "cache", batch_size=1, progress=False, chunk=1)
    assert sum(calls) == len(SIZES) - 2  # only the images no complete shard holds
    for i in range(len(SIZES)):
        torch.testing.assert_close(resumed.latent(i), clean.latent(i))

    calls.clear()
    build_latent_dataset(dataset, vae, tmp_path / "cache", batch_size=1, progress=False, chunk=1)
    assert calls == []  # complete: reused as is


def test_shards_split_across_processes_are_the_files_one_process_writes(records, tmp_path):
    """Process r of w encodes shards r, r + w, ...: each shard the same bytes as one process writes, so two
    processes (here two threads, each waiting for the other's shards) build the same cache."""
    from concurrent.futures import ThreadPoolExecutor

    from taxadiffusion.shards import Share

    vae = tiny_vae()
    dataset = ImageDataset(records.records, records.taxonomy(), size=16)
    build_latent_dataset(dataset, vae, tmp_path / "one", batch_size=2, progress=False, chunk=1, workers=2)

    def process(rank: int):
        share = Share(rank, 2)
        return build_latent_dataset(dataset, vae, tmp_path / "two", share, batch_size=2, progress=False, chunk=1)

    with ThreadPoolExecutor(2) as pool:
        assert all(len(cached) == len(SIZES) for cached in pool.map(process, (0, 1)))
    (one,), (two,) = (list((tmp_path / name).glob("latents-*")) for name in ("one", "two"))
    assert one.name == two.name
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir()) and len(names) == len(SIZES) + 1
    assert all((one / name).read_bytes() == (two / name).read_bytes() for name in names)


def test_cache_latents_defaults_on_for_latent_models_only(tiny_sd):
    assert Config().train.cache_latents is False  # the tiny pixel-space model has no VAE
    assert Config.from_dict({"model": {"base": str(tiny_sd)}}).train.cache_latents is True
    off = Config.from_dict({"model": {"base": str(tiny_sd)}, "train": {"cache_latents": False}})
    assert off.train.cache_latents is False
    with pytest.raises(ConfigError, match="cache_latents needs a latent model"):
        Config.from_dict({"train": {"cache_latents": True}})


def test_every_process_names_the_same_cache_for_a_vae_with_defaulted_settings(records):
    """A VAE whose saved config lacks newer keys (SD 1.5's, from the Hub) carries diffusers' `_use_default_values`,
    a set listed in another order in each process. The cache's name leaves it out: otherwise each process of a
    launch would build and wait for another folder, forever."""
    from diffusers.configuration_utils import FrozenDict

    from taxadiffusion.train.latents import cache_key

    dataset = ImageDataset(records.records, records.taxonomy(), size=16)
    vae = tiny_vae()
    keys = []
    for order in (["scaling_factor", "force_upcast"], ["force_upcast", "scaling_factor"]):
        vae._internal_dict = FrozenDict({**vae.config, "_use_default_values": order})
        keys.append(cache_key(dataset, vae))
    assert keys[0] == keys[1]
