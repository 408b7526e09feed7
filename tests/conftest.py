"""Shared fixtures: the small real files in tests/data, the benchmark datasets, and tiny model folders.

The suite passes on a clone with nothing beside it. Tests that read a whole benchmark dataset carry the
`data` marker and find it in the folder that `TAXADIFFUSION_DATA` names. Without it they are skipped with
one line naming what is missing; under `CI=true` they fail instead, so CI never passes a test it did not run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "data"
DATA_VARIABLE = "TAXADIFFUSION_DATA"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def benchmark_dataset(name: str) -> Path:
    """The folder of one benchmark dataset (e.g. "fish4knowledge") under $TAXADIFFUSION_DATA.

    Missing: skipped with one line, or failed under CI=true."""
    root = os.environ.get(DATA_VARIABLE)
    if not root:
        reason = f"{name}: set {DATA_VARIABLE} to the folder that holds the benchmark datasets"
    elif not (Path(root) / name).exists():
        reason = f"{name}: not found in {DATA_VARIABLE}={root}"
    else:
        return Path(root) / name
    if in_ci():
        pytest.fail(f"benchmark data missing under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def fishnet_csv() -> Path:
    """300 real rows of FishNet's annotation CSV."""
    return FIXTURES / "fishnet_sample.csv"


@pytest.fixture(scope="session")
def lpips_reference() -> Path:
    """The LPIPS authors' example images (their published distances are in tests/data/README.md)."""
    return FIXTURES / "lpips_reference"


@pytest.fixture(scope="session")
def f4k_mini() -> Path:
    """25 Fish4Knowledge photos in the dataset's own layout (5 classes, one labelled to family only)."""
    return FIXTURES / "fish4knowledge_mini"


@pytest.fixture(scope="session")
def f4k_root() -> Path:
    """The whole Fish4Knowledge folder (`data` tests only)."""
    return benchmark_dataset("fish4knowledge")


@pytest.fixture(scope="session")
def cub_root() -> Path:
    """The whole CUB-100-LT folder (`data` tests only)."""
    return benchmark_dataset("cub100_lt")


@pytest.fixture(scope="session")
def birds525_root() -> Path:
    """The whole birds525 corpus (`data` tests only)."""
    return benchmark_dataset("birds525")


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny Stable Diffusion folder in the real on-disk layout (see tiny_models.py)."""
    from tiny_models import write_tiny_sd

    return write_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def small_taxonomy():
    from taxadiffusion.taxonomy import FISHNET_RANKS, Lineage, Taxonomy

    names = [
        ("Actinopterygii", "Perciformes", "Pomacentridae", "Amphiprion", "clarkii"),
        ("Actinopterygii", "Perciformes", "Pomacentridae", "Amphiprion", "ocellaris"),
        ("Actinopterygii", "Perciformes", "Pomacentridae", "Chromis", "viridis"),
        ("Actinopterygii", "Perciformes", "Labridae", "Hemigymnus", "fasciatus"),
        ("Actinopterygii", "Tetraodontiformes", "Tetraodontidae", "Chromis", "fakeus"),  # homonym genus
        ("Elasmobranchii", "Orectolobiformes", "Orectolobidae", "Orectolobus"),  # labelled to genus
    ]
    return Taxonomy.from_lineages(Lineage(FISHNET_RANKS, n) for n in names)


@pytest.fixture(scope="module")
def pipe(tiny_pipeline):
    """The tiny pipeline loaded, sampling at 2 steps without progress bars (what `generate`'s tests draw with)."""
    from taxadiffusion.pipeline import TaxaDiffusionPipeline

    pipe = TaxaDiffusionPipeline.from_pretrained(tiny_pipeline)
    pipe.configure_sampling(steps=2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, tiny_sd, small_taxonomy) -> Path:
    """A saved tiny pixel-space pipeline over `small_taxonomy` (16 px)."""
    from tiny_models import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("pipeline"), tiny_sd, small_taxonomy)
