"""Files and folders written whole or not at all: an error mid-write leaves the old version and no leftover."""

import pytest

from taxadiffusion.atomic import TMP_PREFIX, atomic_file, atomic_folder, temporary, write_text_atomic


def test_a_text_file_is_replaced_whole(tmp_path):
    path = tmp_path / "metadata.csv"
    write_text_atomic(path, "a\n")
    write_text_atomic(path, "a\nb\n")
    assert path.read_text() == "a\nb\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metadata.csv"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    with pytest.raises(OSError, match="disk full"), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise OSError("disk full")
    assert path.read_text() == "old"
    assert not temporary(path).exists() and temporary(path).name == f"{TMP_PREFIX}metrics.json"


def test_an_interrupt_also_rolls_back(tmp_path):
    path = tmp_path / "image.png"
    with pytest.raises(KeyboardInterrupt), atomic_file(path) as tmp:
        tmp.write_bytes(b"\x89PNG")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_folder_is_published_whole_replacing_the_old_one(tmp_path):
    target = tmp_path / "pipeline"
    target.mkdir()
    (target / "old.json").write_text("{}")
    temporary(target).mkdir()  # a leftover of a killed write
    (temporary(target) / "junk").write_text("x")
    with atomic_folder(target) as tmp:
        assert list(tmp.iterdir()) == []  # the leftover was cleared
        (tmp / "unet").mkdir()
        (tmp / "unet" / "config.json").write_text("{}")
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["unet", "unet/config.json"]
    assert not temporary(target).exists()


def test_a_failed_folder_keeps_the_old_one(tmp_path):
    target = tmp_path / "cache"
    target.mkdir()
    (target / "kept").write_text("1")
    with pytest.raises(RuntimeError), atomic_folder(target) as tmp:
        (tmp / "partial").write_text("2")
        raise RuntimeError("killed")
    assert [p.name for p in target.iterdir()] == ["kept"] and not temporary(target).exists()
    with pytest.raises(FileExistsError), atomic_folder(target, replace=False) as tmp:
        (tmp / "new").write_text("3")
    assert [p.name for p in target.iterdir()] == ["kept"]
