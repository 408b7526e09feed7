"""The fault matrix: bad inputs and damaged files, each through the command's entry point.

Every case asserts the exit code, a one-line message that names the file or key, no traceback, and that the
user's data is still there byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import struct
import zlib
from pathlib import Path

import pytest
import yaml

from taxadiffusion.cli import main
from taxadiffusion.train import checkpoint as ckpt
from tiny_models import TINY_MODEL, write_two_rank_dataset


def write_dataset(root: Path) -> Path:
    """A user's folder dataset (two ranks, 4 species, 16 px), without the synthetic render's marker."""
    write_two_rank_dataset(root)
    (root / "synthetic.json").unlink()
    return root


def write_config(path: Path, data: Path, text_encoder: Path, **train) -> Path:
    settings = {"steps": [1, 1], "batch_size": 4, "checkpoint_every": 1, "log_every": 1, "learning_rate": 1e-3}
    config = {
        "model": TINY_MODEL,
        "text": {"encoder": str(text_encoder)},
        "data": {"format": "folder", "path": str(data), "crop": "squash"},
        "train": settings | train,
        "sample": {"steps": 2, "grid_taxa": 2, "grid_images": 2},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` and the hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def run(capsys, *argv) -> tuple[int, str]:
    """Exit code and stderr of one command; stderr must be one line without a traceback."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return code, err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("taxadiffusion:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def dataset(tmp_path):
    data = write_dataset(tmp_path / "dataset")
    return data, snapshot(data)


# -- data loss -------------------------------------------------------------------------------------


def test_overwrite_never_deletes_a_folder_it_did_not_make(tmp_path, tiny_sd, capsys):
    out = tmp_path / "out"
    data = write_dataset(out / "data")  # the user's dataset lies where a synthetic run renders its own
    before = snapshot(out)
    config = write_config(tmp_path / "c.yaml", data, tiny_sd)
    code, err = run(capsys, "train", "--config", config, "--output", out, "--overwrite")
    message = one_line(err)
    assert code == 2 and str(out) in message and "not a taxadiffusion run" in message
    assert "--overwrite" not in message  # no invitation to delete it
    assert snapshot(out) == before


def test_overwrite_keeps_the_dataset_a_run_folder_holds(tmp_path, tiny_sd, capsys):
    out = tmp_path / "run"
    first = write_dataset(tmp_path / "first")
    assert (
        main(["train", "--config", str(write_config(tmp_path / "a.yaml", first, tiny_sd)), "--output", str(out)]) == 0
    )
    (out / "notes.txt").write_text("mine")
    # A run recorded `data` as its own (a synthetic render); the user has since put a dataset there.
    manifest = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps(manifest | {"owns": [*manifest["owns"], "data"]}))
    data = write_dataset(out / "data")
    before = snapshot(data)
    config = write_config(tmp_path / "b.yaml", data, tiny_sd, learning_rate=5e-4)
    code, err = run(capsys, "train", "--config", config, "--output", out, "--overwrite")
    assert code == 2 and "the dataset" in one_line(err) and str(out / "data") in err
    assert snapshot(data) == before
    # Overwriting a run with its dataset elsewhere removes only what the run made.
    code, _ = run(capsys, "train", "--config", write_config(tmp_path / "c.yaml", first, tiny_sd, learning_rate=5e-4),
                  "--output", out, "--overwrite")  # fmt: skip
    assert code == 0 and (out / "notes.txt").read_text() == "mine" and snapshot(data) == before


def test_a_foreign_config_file_is_not_a_run(tmp_path, dataset, tiny_sd, capsys):
    data, before = dataset
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("server:\n  port: 80\n")
    code, err = run(capsys, "train", "--config", write_config(tmp_path / "c.yaml", data, tiny_sd), "--output", out)
    assert code == 2 and "not a taxadiffusion run" in one_line(err) and "unknown config key" not in err
    assert (out / "config.yaml").read_text() == "server:\n  port: 80\n" and snapshot(data) == before


# -- values that would train to "success" ----------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.learning_rate=.inf", "train.learning_rate"),
        ("train.learning_rate=.nan", "train.learning_rate"),
        ("train.encoder_learning_rate=-1e-4", "train.encoder_learning_rate"),
        ("train.snr_gamma=-5", "train.snr_gamma"),
        ("train.weight_decay=-0.1", "train.weight_decay"),
        ("train.max_grad_norm=0", "train.max_grad_norm"),
        ("sample.steps=0", "sample.steps"),
        ("sample.window=[0.8, 0.2]", "sample.window"),
        ("sample.scale=-1", "sample.scale"),
        ("text.max_length=0", "text.max_length"),
        ("model.resolution=0", "resolution"),
        ("model.resolution=20", "resolution"),
        ("data.num_workers=-1", "data.num_workers"),
    ],
)
def test_bad_values_are_refused_by_the_dry_run(tmp_path, dataset, tiny_sd, capsys, override, key):
    data, before = dataset
    config = write_config(tmp_path / "c.yaml", data, tiny_sd)
    code, err = run(capsys, "train", "--config", config, "--set", override, "--output", tmp_path / "o", "--dry-run")
    assert code == 2 and key in one_line(err) and str(config) in err
    assert not (tmp_path / "o").exists() and snapshot(data) == before


def test_no_non_finite_weight_is_ever_saved(tmp_path, dataset, tiny_sd):
    import torch

    from taxadiffusion.config import Config
    from taxadiffusion.train.trainer import Trainer, TrainingDiverged

    data, _ = dataset
    config = Config.load(write_config(tmp_path / "c.yaml", data, tiny_sd, steps=[2, 2]))

    def poison(state, batch):  # the last step's update turns a weight into NaN (as lr=inf did)
        if state.global_step == 2:
            with torch.no_grad():
                next(trainer.model.taxonomy_encoder.parameters()).fill_(float("nan"))

    trainer = Trainer(config, tmp_path / "run", on_step=poison, progress=False)
    with pytest.raises(TrainingDiverged, match="became NaN or infinite at stage 0-genus, step 2"):
        trainer.run()
    for folder in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints"):
        weights = ckpt.read_weights(folder)
        assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (tmp_path / "run" / "pipeline").exists()


# -- messages instead of tracebacks ----------------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb; the data is one row)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4)) + chunk(b"IEND", b"")
    )


def test_a_decompression_bomb_is_counted_not_fatal(dataset, capsys):
    data, _ = dataset
    bomb = next((data / "images").iterdir()) / "bomb.png"
    bomb.write_bytes(png_claiming(30000, 30000))
    code = main(["data", "check", "--format", "folder", str(data)])
    captured = capsys.readouterr()
    assert code == 1 and "Traceback" not in captured.err
    assert "oversized: 1" in captured.out and str(bomb) in captured.out


def test_bad_training_images_are_named_before_step_one_or_skipped(tmp_path, dataset, tiny_sd, capsys):
    data, _ = dataset
    folders = sorted((data / "images").iterdir())
    broken = folders[0] / "0000.png"
    broken.write_bytes(b"not a png")
    (folders[1] / "0001.png").write_bytes(png_claiming(30000, 30000))
    config = write_config(tmp_path / "c.yaml", data, tiny_sd)
    code, err = run(capsys, "train", "--config", config, "--output", tmp_path / "run")
    message = one_line(err)
    assert code == 2 and "2 unusable training image(s)" in message and str(broken) in message
    assert "0001.png (oversized)" in message and "data.skip_bad_images" in message
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before step 1
    code, _ = run(
        capsys, "train", "--config", config, "--set", "data.skip_bad_images=true", "--output", tmp_path / "skip"
    )
    plan = (tmp_path / "skip" / "plan.txt").read_text()
    assert code == 0 and "unusable image (unreadable): 1" in plan and "unusable image (oversized): 1" in plan


def test_malformed_yaml_names_the_file(tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("train:\n  steps: [1, 2\n")
    code, err = run(capsys, "train", "--config", config, "--output", tmp_path / "o", "--dry-run")
    assert code == 2 and str(config) in one_line(err) and "not valid YAML at line" in err


@pytest.mark.parametrize("damage", ["truncated", "empty", "bad json"])
def test_a_damaged_pipeline_names_its_file(tmp_path, tiny_pipeline, capsys, damage):
    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline, model)
    if damage == "bad json":
        target = model / "unet" / "config.json"
        target.write_text("{not json")
    else:
        target = model / "unet" / "diffusion_pytorch_model.safetensors"
        target.write_bytes(target.read_bytes()[: 100 if damage == "truncated" else 0])
    code, err = run(
        capsys, "sample", "--model", model, "--taxon", "Chromis", "--rank", "genus", "--out", tmp_path / "s"
    )
    assert code == 2 and str(target) in one_line(err) and not (tmp_path / "s").exists()
    code, err = run(capsys, "sample", "--model", tmp_path, "--taxon", "Chromis", "--out", tmp_path / "s")
    assert code == 2 and "is not a saved pipeline (no model_index.json)" in one_line(err)


def trained_without_pipeline(tmp_path, dataset, tiny_sd) -> tuple[Path, Path, Path]:
    """A finished two-stage run whose pipeline is gone, so that the same command resumes from its checkpoints:
    (its config, its folder, its newest checkpoint)."""
    data, _ = dataset
    config = write_config(tmp_path / "c.yaml", data, tiny_sd, steps=[2, 2], keep_checkpoints=3)
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--output", str(out)]) == 0
    shutil.rmtree(out / "pipeline")
    return config, out, ckpt.list_checkpoints(out / "checkpoints")[-1]


def test_a_truncated_latest_checkpoint_falls_back_to_the_one_before(tmp_path, dataset, tiny_sd, capsys):
    config, out, latest = trained_without_pipeline(tmp_path, dataset, tiny_sd)
    weights = latest / ckpt.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:50])
    code = main(["train", "--config", str(config), "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 0 and "Traceback" not in captured.err
    assert f"skipping damaged checkpoint {latest}" in captured.out and str(weights) in captured.out
    assert (out / "pipeline" / "model_index.json").is_file()


def test_evaluate_without_the_classifier_folder(tmp_path, tiny_pipeline, dataset, capsys):
    data, _ = dataset
    missing = tmp_path / "no-classifier"
    code, err = run(
        capsys, "evaluate", "--model", tiny_pipeline, "--data", "folder", data, "--classifier", missing,
        "--ranks", "genus", "--out", tmp_path / "e",
    )  # fmt: skip
    assert code == 2 and str(missing) in one_line(err)


def test_a_busy_port_is_a_message(tmp_path, tiny_pipeline, capsys):
    pytest.importorskip("gradio")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, err = run(capsys, "app", "--model", tiny_pipeline, "--port", port, "--device", "cpu")
    assert code == 2 and f"--port {port}" in one_line(err)


def test_taxonomy_resolve_refuses_folders_and_existing_tables(tmp_path, capsys):
    code, err = run(capsys, "taxonomy", "resolve", "--file", tmp_path)
    assert code == 2 and str(tmp_path) in one_line(err) and "is a folder" in err
    code, err = run(capsys, "taxonomy", "resolve", "Chromis", "--csv", tmp_path)
    assert code == 2 and str(tmp_path) in one_line(err) and "is a folder" in err
    table = tmp_path / "lineages.csv"
    table.write_text("precious")
    code, err = run(capsys, "taxonomy", "resolve", "Chromis", "--csv", table)
    assert code == 2 and "--overwrite" in one_line(err) and table.read_text() == "precious"


def test_a_misspelled_binomial_gets_its_species_suggested(tmp_path, tiny_pipeline, capsys):
    code, err = run(capsys, "sample", "--model", tiny_pipeline, "--taxon", "Amphiprion clarki", "--out", tmp_path)
    assert code == 2 and "did you mean 'Amphiprion clarkii'" in one_line(err)
    code, err = run(capsys, "sample", "--model", tiny_pipeline, "--taxon", "Hemigymnus fasciatos", "--out", tmp_path)
    assert code == 2 and "Hemigymnus fasciatus" in one_line(err)


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("--n", "0", "--n must be between"),
        ("--n", "1000000000", "--n must be between"),
        ("--batch-size", "0", "--batch-size"),
    ],
)
def test_sample_counts_are_checked_before_the_model_loads(tmp_path, capsys, option, value, says):
    out = tmp_path / "samples"
    code, err = run(capsys, "sample", "--model", tmp_path / "absent", "--taxon", "x", "--out", out, option, value)
    assert code == 2 and says in one_line(err) and not out.exists()


def test_data_check_on_a_folder_without_images(tmp_path, capsys):
    (tmp_path / "taxonomy.csv").write_text("folder,genus\n")
    code, err = run(capsys, "data", "check", "--format", "folder", tmp_path)
    assert code != 0 and str(tmp_path) in one_line(err)


def test_a_table_that_is_not_utf8_names_the_file(tmp_path, capsys):
    table = tmp_path / "metadata.csv"
    table.write_bytes("file_name,genus\nimg.png,Chétodon\n".encode("latin-1"))
    code, err = run(capsys, "data", "inspect", "--format", "csv", table)
    assert code == 2 and str(table) in one_line(err) and "UTF-8" in err


def test_a_kill_during_pruning_leaks_no_checkpoint(tmp_path):
    import torch

    root = tmp_path / "checkpoints"
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    def write(step: int) -> Path:
        state = ckpt.TrainingState(global_step=step)
        return ckpt.write_checkpoint(root, state, {"w": torch.zeros(1)}, optimizer, scheduler, 0, True, lambda: None, 2)

    write(1)
    write(2)
    # A kill mid-prune leaves a renamed, half-deleted checkpoint; a kill mid-write leaves a temporary folder.
    (root / f"{ckpt.DELETED_PREFIX}step-00000000").mkdir()
    (root / f"{ckpt.TMP_PREFIX}step-00000009").mkdir()
    write(3)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000003"]


def test_messages_keep_their_quotes():
    """Errors that are also KeyErrors print their message as written, quotes included (the app showed them cut)."""
    from taxadiffusion.taxonomy import UnknownTaxonError

    error = UnknownTaxonError("Amphiprion clarki", None, ["Amphiprion clarkii"])
    assert str(error) == "unknown taxon 'Amphiprion clarki'; did you mean 'Amphiprion clarkii'?"


class _Hostile:
    """A pickle that creates a file when it is loaded: what a run folder from elsewhere could carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("name", [ckpt.OPTIM, "rng-0.pt"])
def test_resuming_never_unpickles_code(tmp_path, dataset, tiny_sd, capsys, name):
    """Checkpoints load with weights_only=True: a hostile optimizer or RNG file is passed over with its name, and
    the code in it never runs; the checkpoint before it resumes the run."""
    import torch

    config, out, latest = trained_without_pipeline(tmp_path, dataset, tiny_sd)
    marker = tmp_path / "code-ran"
    torch.save({"state": _Hostile(marker)}, latest / name)
    code = main(["train", "--config", str(config), "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 0 and "Traceback" not in captured.err
    assert not marker.exists()
    assert f"skipping damaged checkpoint {latest}" in captured.out and "never unpickled" in captured.out
    assert (out / "pipeline" / "model_index.json").is_file()


def test_an_older_runs_rng_state_still_resumes(tmp_path):
    """RNG files hold numpy's state as an array: the one non-tensor type allowed when they load."""
    import random

    import numpy as np
    import torch

    torch.save(ckpt.rng_state(), tmp_path / "rng-0.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(ckpt.read_rng(tmp_path, 0))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# -- stops: a second run, interrupts, a full disk --------------------------------------------------


def test_a_second_train_into_a_busy_run_folder_is_refused(tmp_path, dataset, tiny_sd, capsys):
    """The folder is locked (flock) while a process trains into it; the holder's PID and host are named."""
    import fcntl

    data, files = dataset
    config = write_config(tmp_path / "c.yaml", data, tiny_sd)
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("PID 4242 on node-7\n")
        held.flush()
        code, err = run(capsys, "train", "--config", config, "--output", out)
        assert code == 2 and "PID 4242 on node-7" in one_line(err) and "in use" in err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing of the run was written
    assert main(["train", "--config", str(config), "--output", str(out)]) == 0  # released: it trains
    assert snapshot(data) == files


@pytest.mark.parametrize(("stop", "code", "word"), [("sigint", 130, "interrupted"), ("sigterm", 143, "terminated")])
def test_an_interrupted_train_says_one_line_and_continues(
    tmp_path, dataset, tiny_sd, capsys, monkeypatch, stop, code, word
):
    """Ctrl-C or SIGTERM mid-stage: one line with the step, the usual exit code, and the same command finishes."""
    import os
    import signal

    from taxadiffusion.train.trainer import Trainer

    data, files = dataset
    config = write_config(tmp_path / "c.yaml", data, tiny_sd, steps=[3, 3])
    out = tmp_path / "run"
    real_loss, calls = Trainer.loss, []

    def stopping_loss(self, *args):
        calls.append(1)
        if len(calls) == 5:  # stage 1, its second step
            if stop == "sigint":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(self, *args)

    monkeypatch.setattr(Trainer, "loss", stopping_loss)
    result, err = run(capsys, "train", "--config", config, "--output", out)
    line = one_line(err)
    assert result == code and line.startswith(f"taxadiffusion: {word}") and "at step 1 of stage 1" in line
    assert "run the same command to continue" in line
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the command's handler is gone with it
    monkeypatch.setattr(Trainer, "loss", real_loss)
    assert main(["train", "--config", str(config), "--output", str(out)]) == 0
    assert (out / "pipeline" / "model_index.json").is_file() and snapshot(data) == files


def test_an_interrupted_generate_leaves_no_partial_file(tmp_path, tiny_pipeline, capsys, monkeypatch):
    from taxadiffusion.pipeline import TaxaDiffusionPipeline

    out = tmp_path / "synthetic"
    real_call, calls = TaxaDiffusionPipeline.__call__, []

    def stopping_call(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(TaxaDiffusionPipeline, "__call__", stopping_call)
    args = ["generate", "--model", tiny_pipeline, "--out", out, "--per-taxon", "2", "--batch-size", "2"]
    code, err = run(capsys, *args, "--steps", "2")
    assert code == 130 and "interrupted" in one_line(err)
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]
    monkeypatch.setattr(TaxaDiffusionPipeline, "__call__", real_call)
    assert main([str(a) for a in (*args, "--steps", "2")]) == 0  # the same command continues
    assert len(list((out / "images").rglob("*.png"))) == 10  # 5 species x 2


def test_a_full_disk_is_one_line_and_leaves_no_empty_file(tmp_path, tiny_pipeline, capsys, monkeypatch):
    """ENOSPC while images are written: one line naming the file, exit 74, no 0-byte leftover, and the same
    command finishes once there is space."""
    import errno

    from PIL import Image

    out = tmp_path / "synthetic"
    real_save, saved = Image.Image.save, []

    def full_disk(self, fp, *args, **kwargs):
        saved.append(fp)
        if len(saved) == 3:
            open(fp, "wb").close()  # the OS created the file, then ran out of space
            raise OSError(errno.ENOSPC, "No space left on device", str(fp))
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full_disk)
    args = ["generate", "--model", tiny_pipeline, "--out", out, "--per-taxon", "2", "--batch-size", "4", "--steps", "2"]
    code, err = run(capsys, *args)
    line = one_line(err)
    assert code == 74 and "no space left on the device writing" in line and str(saved[2]) in line
    assert not [p for p in out.rglob("*") if p.is_file() and p.stat().st_size == 0]
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert main([str(a) for a in args]) == 0
    assert len(list((out / "images").rglob("*.png"))) == 10  # 5 species x 2


# -- names that are not file names --------------------------------------------------------------------

HOSTILE = ["a/b", "a_b", "Genus sp. 1", "Genus sp 1", "x" * 300, "é" * 200, "..", "bell\x07name", "CON"]


def test_every_taxon_name_gets_its_own_safe_folder(tmp_path, tiny_sd, capsys):
    """`generate` with names that share a naive slug, are too long, or hold separators and control characters:
    every taxon gets its images, in its own folder of at most 255 bytes; metadata.csv keeps the exact names."""
    import csv

    from taxadiffusion.taxonomy import FISHNET_RANKS, Lineage, Taxonomy
    from tiny_models import write_tiny_pipeline

    lineages = [Lineage(FISHNET_RANKS[:2], ("Actinopterygii", name)) for name in HOSTILE]
    model = write_tiny_pipeline(tmp_path / "model", tiny_sd, Taxonomy.from_lineages(lineages))
    out = tmp_path / "synthetic"
    code, err = run(capsys, "generate", "--model", model, "--out", out, "--per-taxon", "1", "--steps", "1")
    assert code == 0, err
    folders = [p for p in (out / "images").iterdir() if p.is_dir()]
    assert len(folders) == len(HOSTILE) and all(len(p.name.encode()) <= 255 for p in folders)
    assert all(p.name not in ("", ".", "..") and "\x07" not in p.name for p in folders)
    with (out / "metadata.csv").open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["order"] for row in rows) == sorted(HOSTILE)
    assert all((out / row["file_name"]).is_file() for row in rows)
    plain = next(p for p in folders if p.name.startswith("Actinopterygii__Genus_sp_1"))
    assert "-" not in plain.name  # a name of letters, digits and spaces keeps the folder it always had


def test_data_inspect_lists_names_that_are_not_file_names(tmp_path, capsys):
    """Counted and listed by `data inspect` (and `data check`); reading them still works."""
    table = tmp_path / "metadata.csv"
    rows = ["file_name,class,order"] + [f"{i}.png,Actinopterygii,{name}" for i, name in enumerate(HOSTILE[:2])]
    rows += ["2.png,Actinopterygii,bell\x07name", f"3.png,Actinopterygii,{'x' * 300}"]
    table.write_text("\n".join(rows) + "\n", encoding="utf-8")
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(b"")
    assert main(["data", "inspect", "--format", "csv", str(table), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)["unwritable_names"]
    assert found["count"] == 3 and found["reasons"] == {
        "a path separator": 1,
        "control characters": 1,
        "over 255 bytes": 1,
    }
    assert main(["data", "inspect", "--format", "csv", str(table)]) == 0
    out = capsys.readouterr().out
    assert "names that cannot be file names as they are: 3" in out and "'a/b' (a path separator)" in out
    assert main(["data", "check", "--format", "csv", str(table)]) == 1  # the empty images are unusable
    assert "names that cannot be file names as they are: 3" in capsys.readouterr().out


def test_training_reads_names_that_are_not_file_names(tmp_path, tiny_sd, capsys):
    """The names train as they are: their texts are encoded, the run and its pipeline keep them exactly."""
    from PIL import Image

    from taxadiffusion.pipeline import TaxaDiffusionPipeline

    data = tmp_path / "data"
    data.mkdir()
    rows = ["file_name,class,order"]
    for i, name in enumerate(["a/b", "a_b", "bell\x07name", "x" * 300]):
        for j in range(2):
            Image.new("RGB", (16, 16), (40 * i, 60 * j, 90)).save(data / f"{i}-{j}.png")
            rows.append(f"{i}-{j}.png,Actinopterygii,{name}")
    (data / "metadata.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    config = write_config(tmp_path / "c.yaml", data, tiny_sd)
    settings = yaml.safe_load(config.read_text())
    settings["data"] = {"format": "csv", "path": str(data / "metadata.csv"), "crop": "squash"}
    config.write_text(yaml.safe_dump(settings))
    code, err = run(capsys, "train", "--config", config, "--output", tmp_path / "run")
    assert code == 0, err
    pipe = TaxaDiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    assert {"a/b", "a_b", "bell\x07name", "x" * 300} <= {t.name for t in pipe.taxonomy.taxa(pipe.taxonomy.ranks[-1])}
