"""Image loading, crop policies, and `data check` on planted bad images."""

import json
import random

import numpy as np
import pytest
from PIL import Image

from taxadiffusion.cli import main
from taxadiffusion.data.check import check_images
from taxadiffusion.data.images import CropPolicy, check_image, load_image, prepare_image


def _save(path, image, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


@pytest.fixture
def planted(tmp_path):
    """A folder dataset with one good image and one bad image of every kind."""
    root = tmp_path / "ds"
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    _save(root / "good" / "ok.jpg", rgb)
    _save(root / "good" / "rgba.png", rgb.convert("RGBA"))
    _save(root / "good" / "palette.png", rgb.convert("P"))
    _save(root / "good" / "grey.png", rgb.convert("L"))
    _save(root / "good" / "cmyk.jpg", rgb.convert("CMYK"))
    _save(root / "good" / "deep.png", Image.fromarray(np.arange(2400, dtype=np.uint16).reshape(40, 60) * 27))
    (root / "good" / "junk.png").write_bytes(b"this is not an image at all")
    full = (root / "good" / "ok.jpg").read_bytes()
    (root / "good" / "cut.jpg").write_bytes(full[: len(full) // 2])
    png = root / "good" / "whole.png"
    _save(png, rgb)
    (root / "good" / "cut.png").write_bytes(png.read_bytes()[:300])
    png.unlink()
    (root / "taxonomy.csv").write_text("folder,family,genus\ngood,Pomacentridae,Amphiprion\n")
    return root


def test_check_image_kinds(planted, tmp_path):
    folder = planted / "good"
    assert check_image(tmp_path / "absent.png").problem == "missing"
    assert check_image(folder / "junk.png").problem == "unreadable"
    assert check_image(folder / "cut.jpg").problem == "truncated"
    assert check_image(folder / "cut.png").problem in ("truncated", "unreadable")
    assert check_image(folder / "ok.jpg").problem is None
    modes = {
        name: check_image(folder / name).odd_mode
        for name in ("rgba.png", "palette.png", "grey.png", "cmyk.jpg", "deep.png", "ok.jpg")
    }
    assert modes == {
        "rgba.png": "RGBA",
        "palette.png": "P",
        "grey.png": "L",
        "cmyk.jpg": "CMYK",
        "deep.png": "16-bit",
        "ok.jpg": None,
    }


def test_data_check_cli_finds_every_planted_problem(planted, capsys):
    code = main(["data", "check", "--format", "folder", str(planted), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 1
    assert result["checked"] == 9
    assert result["problems"]["unreadable"] + result["problems"]["truncated"] == 3
    assert result["problems"]["truncated"] >= 1
    assert result["odd_modes"] == {"16-bit": 1, "CMYK": 1, "L": 1, "P": 1, "RGBA": 1}
    assert any("junk.png" in p for p in result["examples"]["unreadable"])


def test_data_check_missing_and_clean(tmp_path, capsys):
    root = tmp_path / "ds"
    _save(root / "a" / "1.png", Image.new("RGB", (8, 8)))
    (root / "taxonomy.csv").write_text("folder,genus\na,Amphiprion\n")
    assert main(["data", "check", "--format", "folder", str(root)]) == 0
    assert "0 unusable" in capsys.readouterr().out
    table = tmp_path / "meta.csv"
    table.write_text("file_name,genus\nds/a/1.png,Amphiprion\nds/a/2.png,Amphiprion\n")
    report = check_images([tmp_path / "ds/a/1.png", tmp_path / "ds/a/2.png"], progress=False)
    assert report.problems["missing"] == 1
    assert main(["data", "check", "--format", "csv", str(table)]) == 1
    assert "missing: 1" in capsys.readouterr().out


def test_load_image_converts_every_mode_to_rgb(planted):
    for name in ("ok.jpg", "rgba.png", "palette.png", "grey.png", "cmyk.jpg", "deep.png"):
        image = load_image(planted / "good" / name)
        assert image.mode == "RGB" and image.size == (60, 40), name
    deep = np.asarray(load_image(planted / "good" / "deep.png"))
    assert deep.max() > 200  # 16-bit scaled down, not clipped to white or black
    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    path = _save(planted / "t.png", transparent)
    assert np.asarray(load_image(path))[0, 0].tolist() == [255, 255, 255]  # composited over white


def test_load_image_applies_exif_orientation(tmp_path):
    image = Image.new("RGB", (30, 10), (0, 0, 255))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = _save(tmp_path / "rot.jpg", image, exif=exif)
    assert Image.open(path).size == (30, 10)
    assert load_image(path).size == (10, 30)


def test_crop_policies():
    image = Image.new("RGB", (100, 50), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 50, 50))  # left half red
    for policy in CropPolicy:
        out = prepare_image(image, 32, policy, random.Random(0))
        assert out.size == (32, 32) and out.mode == "RGB"
    padded = np.asarray(prepare_image(image, 32, "pad"))
    assert padded[0, 16].tolist() == [255, 255, 255] and padded[16, 4].tolist()[0] > 200  # white band, red left
    squashed = np.asarray(prepare_image(image, 32, "squash"))
    assert squashed[16, 4, 0] > 200 and squashed[16, 28, 0] < 50  # both halves kept
    centre = np.asarray(prepare_image(image, 32, "random_crop", None))
    assert centre[16, 4, 0] > 200 and centre[16, 28, 0] < 50  # centre crop straddles the edge
    crops = {np.asarray(prepare_image(image, 32, "random_crop", random.Random(s)))[16, 16, 0] > 128 for s in range(20)}
    assert crops == {True, False}  # random crops land on both halves
    with pytest.raises(ValueError, match="unknown crop policy"):
        prepare_image(image, 32, "zoom")
