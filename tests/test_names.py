"""File and folder names from taxon names: readable, unique, within a file name's bytes, stable for plain names."""

import pytest

from taxadiffusion.names import MAX_BYTES, lineage_folder, name_slug, unwritable


def old_slug(text: str) -> str:
    """The rule folders were written with before: kept for every plain name."""
    return "".join(c if c.isalnum() else "_" for c in text).strip("_") or "taxon"


@pytest.mark.parametrize("name", ["Amphiprion clarkii", "Chromis", "Aves", "Perciformes", "Pomacentridae 2"])
def test_plain_names_keep_the_folder_they_always_had(name):
    assert name_slug(name) == old_slug(name)


def test_names_that_shared_a_slug_no_longer_do():
    pairs = [("a/b", "a_b"), ("Genus sp. 1", "Genus sp 1"), ("a b", "a  b"), ("x", " x"), ("é", "e\u0301")]
    for one, other in pairs:
        assert name_slug(one) != name_slug(other), (one, other)
    assert name_slug("Genus sp 1") == "Genus_sp_1"


@pytest.mark.parametrize("name", ["", ".", "..", "/", "CON", "nul", "x" * 300, "é" * 200, "a\x00b", "\u202e"])
def test_every_slug_is_a_safe_file_name(name):
    slug = name_slug(name)
    assert slug not in ("", ".", "..") and "/" not in slug and "\\" not in slug
    assert len(slug.encode()) <= MAX_BYTES and slug.isprintable()
    assert slug.split(".")[0].upper() not in ("CON", "NUL")  # Windows reserves them, with any extension


def test_a_long_lineage_folder_is_cut_and_stays_unique():
    path = ["Animalia", "Chordata", "x" * 120, "y" * 120]
    other = [*path[:-1], "y" * 119 + "z"]
    assert len(lineage_folder(path).encode()) <= MAX_BYTES
    assert lineage_folder(path) != lineage_folder(other)
    assert lineage_folder(["Aves", "Passeriformes"]) == "Aves__Passeriformes"


def test_unwritable_says_why():
    assert unwritable("Amphiprion clarkii") is None
    assert unwritable("a/b") == "a path separator"
    assert unwritable("a\tb") == "control characters"
    assert unwritable("é" * 130) == "over 255 bytes"
