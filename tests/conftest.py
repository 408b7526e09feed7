"""Shared fixtures: paths to the data beside the repository, and small writers of fixture files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TAXADIFFUSION_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"test data missing: {path} (the repository expects ../shared beside it, or TAXADIFFUSION_SHARED)")
    return path


@pytest.fixture(scope="session")
def fishnet_csv() -> Path:
    return _need(DATA / "formats" / "fishnet_sample.csv")


@pytest.fixture(scope="session")
def f4k_root() -> Path:
    return _need(DATA / "fish4knowledge")


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


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, tiny_sd, small_taxonomy) -> Path:
    """A saved tiny pixel-space pipeline over `small_taxonomy` (16 px)."""
    from tiny_models import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("pipeline"), tiny_sd, small_taxonomy)
