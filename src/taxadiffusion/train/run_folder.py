"""A run's output folder: the names it owns, and the manifest that marks what it made.

A run writes `run.json` into its folder before it creates anything else, listing every name it may create
there. `--overwrite` deletes exactly those names and nothing else; a non-empty folder without the manifest is
not a run, and is refused whatever the flags (it may be a user's folder, or hold their dataset).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..atomic import temporary, write_text_atomic
from ..config import Config
from ..errors import TaxaDiffusionError
from ..prior import BASE_PARTS

MANIFEST = "run.json"
MANIFEST_FORMAT = "taxadiffusion.run"


class RunConflict(TaxaDiffusionError, ValueError):
    """The output folder holds something this run must not touch or cannot continue."""


@dataclass(frozen=True)
class RunPaths:
    """Where a run keeps each of its outputs, under `root`."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def taxonomy(self) -> Path:
        return self.root / "taxonomy.json"

    @property
    def plan(self) -> Path:
        return self.root / "plan.txt"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def pipeline(self) -> Path:
        return self.root / "pipeline"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def data(self) -> Path:
        """Where the synthetic taxonomy is rendered (only for `data.format: synthetic`)."""
        return self.root / "data"

    def owned(self, config: Config) -> tuple[Path, ...]:
        """Everything this run may create under `root`."""
        owned = [self.config, self.taxonomy, self.plan, self.checkpoints, self.logs, self.samples, self.pipeline]
        owned += [self.cache, temporary(self.pipeline)]
        if config.train.strategy == "prior":  # `pretrain` makes the run folder a base folder
            owned += [self.root / part for part in BASE_PARTS] + [temporary(self.root / "base")]
        if config.data.format == "synthetic":
            owned.append(self.data)
        return tuple(owned)


def read_manifest(paths: RunPaths) -> list[str] | None:
    """The names a run recorded as its own, or None when `root` holds no run manifest."""
    if not paths.manifest.is_file():
        return None
    try:
        data = json.loads(paths.manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("owns"), list):
        return None
    return [name for name in data["owns"] if isinstance(name, str) and "/" not in name and name not in ("", ".", "..")]


def write_manifest(paths: RunPaths, names: list[str]) -> None:
    write_text_atomic(
        paths.manifest, json.dumps({"format": MANIFEST_FORMAT, "owns": sorted(set(names))}, indent=1) + "\n"
    )


def adopt_unmarked_run(paths: RunPaths, config: Config) -> list[str] | None:
    """A run written before runs carried a manifest: its config, taxonomy and plan are all there. It owns what
    it would have made; `data` only where it holds the synthetic render's own marker."""
    if not all(p.is_file() for p in (paths.config, paths.taxonomy, paths.plan)):
        return None
    names = [p.name for p in paths.owned(config) if p.exists() and p != paths.data]
    if (paths.data / "synthetic.json").is_file():
        names.append(paths.data.name)
    return names


def dataset_paths(config: Config) -> list[Path]:
    """The user's dataset locations, which no run may delete or write into."""
    return [Path(p).resolve() for p in (config.data.path, config.data.root) if p]


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


LOCK = ".lock"  # held (flock) by the process that trains into the folder; never in the manifest, never deleted


def lock_run(root: Path):
    """Hold an exclusive lock on the run folder for this process's life (the returned open file; the lock goes
    when the process ends, however it ends). A second `train` into the folder is refused with the holder's PID
    and host. Where the OS has no `flock` (Windows), nothing is locked."""
    try:
        import fcntl
    except ImportError:
        return None
    import os
    import socket

    root.mkdir(parents=True, exist_ok=True)
    handle = open(root / LOCK, "a+", encoding="utf-8")  # noqa: SIM115 (held open for the run's life)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunConflict(
            f"{root} is in use: {holder} trains into it; wait for it to end or choose another --output"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def prepare_output(paths: RunPaths, config: Config, overwrite: bool):
    """Create the output folder, or accept it for resuming; with `overwrite`, delete what the run made. Returns
    the folder's lock (`lock_run`), taken before anything in it changes.

    A non-empty folder that is not a run is refused, with or without `overwrite`.
    """
    root = paths.root
    owned = paths.owned(config)
    names = [p.name for p in owned]
    recorded = read_manifest(paths)
    if recorded is None:
        recorded = adopt_unmarked_run(paths, config)
    if recorded is None and root.exists() and any(p.name != LOCK for p in root.iterdir()):
        raise RunConflict(
            f"{root} is not empty and is not a taxadiffusion run (it has no {MANIFEST}); "
            "train into a new or empty folder with another --output"
        )
    lock = lock_run(root)
    datasets = dataset_paths(config)
    resolved = root.resolve()
    # What this run will write, and what an earlier run recorded (and --overwrite would delete).
    targets = {p.name: p for p in owned} | {name: root / name for name in recorded or []}
    for target in targets.values():
        clash = [d for d in datasets if _inside(d, target.resolve())]
        if clash:
            raise RunConflict(
                f"the dataset ({clash[0]}) lies at {target}, where the run writes its {target.name}; "
                "keep the dataset outside the run's folder, or choose another --output"
            )
    if recorded is not None and overwrite:
        for name in recorded:
            target = root / name
            if not _inside(target.resolve(), resolved) or target.resolve() == resolved:
                continue  # the manifest names only entries directly under root
            if target == paths.data and not (target / "synthetic.json").is_file():
                continue  # not the synthetic render the run made there: someone's data since
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    elif recorded is not None and paths.config.is_file():
        check_same_config(paths, config)
    root.mkdir(parents=True, exist_ok=True)
    write_manifest(paths, (recorded or []) + names)
    return lock


def check_same_config(paths: RunPaths, config: Config) -> None:
    """A run folder resumes only with its own config."""
    from ..config import ConfigError

    try:
        saved = Config.load(paths.config)
    except ConfigError as error:
        raise RunConflict(
            f"{paths.config} is not a config this version can read ({error}); choose a new --output, "
            "or pass --overwrite to start this run over"
        ) from None
    if saved.fingerprint() != config.fingerprint():
        changes = "; ".join(config.differences(saved)[:8])
        raise RunConflict(
            f"{paths.root} holds a run with a different config ({changes}); "
            "resume it with its own config, choose a new --output, or pass --overwrite to start it over"
        )
