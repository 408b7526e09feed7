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
