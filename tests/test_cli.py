"""The command line: help everywhere, no torchvision, and the synthetic summary."""

import importlib.metadata
import json
import subprocess
import sys

import pytest

from taxadiffusion.cli import build_parser, main


def test_torchvision_is_not_installed():
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("torchvision")


def test_import_and_cli_work_with_torchvision_blocked():
    """Even if torchvision were present, nothing we run may import it."""
    code = (
        "import sys; sys.modules['torchvision'] = None\n"
        "import taxadiffusion, taxadiffusion.cli, taxadiffusion.data.dataset, taxadiffusion.data.synthetic\n"
        "import diffusers, transformers\n"
        "from diffusers import UNet2DConditionModel\n"
        "from transformers import CLIPTextModel\n"
        "sys.exit(taxadiffusion.cli.main(['data', 'synth', '--json']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["species"] > 0


def _subcommands(parser, prefix=()):
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _subcommands(sub, (*prefix, name))


def test_help_on_every_subcommand(capsys):
    commands = list(_subcommands(build_parser()))
    assert ("data", "inspect") in commands and ("data", "check") in commands
    for command in [(), *commands]:
        with pytest.raises(SystemExit) as exit_:
            main([*command, "--help"])
        assert exit_.value.code == 0
        assert "usage: taxadiffusion" in capsys.readouterr().out


def test_console_script_runs():
    result = subprocess.run(
        [sys.executable, "-m", "taxadiffusion", "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "taxadiffusion" in result.stdout


def test_synth_writes_and_refuses_user_folder(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["data", "synth", "--out", str(out), "--resolution", "16", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["folder"] == str(out) and (out / "taxonomy.csv").is_file()
    assert main(["data", "inspect", "--format", "folder", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == summary["images"]
    user = tmp_path / "user"
    user.mkdir()
    (user / "x.txt").write_text("x")
    assert main(["data", "synth", "--out", str(user)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_device_is_checked_before_anything_loads(monkeypatch):
    import torch

    from taxadiffusion.devices import choose_device as _device
    from taxadiffusion.errors import InputError as CommandError

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(CommandError, match=r"sees no CUDA GPU here .* use --device cpu"):
        _device("cuda")
    with pytest.raises(CommandError, match="'gpu' is not a device; use cpu, cuda"):
        _device("gpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(CommandError, match=r"only 1 CUDA GPU\(s\) here \(cuda:0 .. cuda:0\)"):
        _device("cuda:1")
    assert _device("cuda:0") == "cuda:0" and _device("cpu") == "cpu"


def test_fast_preset_fills_in_what_is_not_given():
    from taxadiffusion.cli import _sampling
    from taxadiffusion.cli_parser import build_parser
    from taxadiffusion.sampling import FAST

    base = ["sample", "--model", "m", "--taxon", "t", "--out", "o"]
    parse = build_parser().parse_args
    assert {k: v for k, v in _sampling(parse([*base, "--fast"])).items() if v is not None} == FAST
    mine = _sampling(parse([*base, "--fast", "--steps", "14", "--scale", "3"]))
    assert mine["steps"] == 14 and mine["scale"] == 3.0 and mine["scheduler"] == FAST["scheduler"]
    assert all(v is None for v in _sampling(parse(base)).values())


def test_classifier_train_synthetic_writes_an_oracle_of_the_seeds_taxonomy(tmp_path, capsys):
    """`classifier train --synthetic` (what `make demo` runs): an oracle of the synthetic taxonomy of
    `--synthetic-seed`, saved with its held-out accuracy at every rank."""
    from taxadiffusion.data.synthetic import SyntheticConfig, SyntheticTaxonomy
    from taxadiffusion.eval.classifier import TaxonClassifier

    out = tmp_path / "oracle"
    args = ["classifier", "train", "--synthetic", "--synthetic-seed", "3", "--per-species", "2", "--steps", "2"]
    assert main([*args, "--out", str(out)]) == 0
    held_out = json.loads((out / "heldout_accuracy.json").read_text())
    taxonomy = SyntheticTaxonomy(SyntheticConfig(seed=3)).taxonomy
    assert TaxonClassifier.from_pretrained(str(out)).taxonomy.to_dict() == taxonomy.to_dict()
    assert list(held_out["accuracy"]) == [rank.value for rank in taxonomy.ranks]
