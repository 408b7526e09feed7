"""The synthetic taxonomy: determinism, long tail, trait layout, and its folder export."""

import colorsys
from dataclasses import astuple

import numpy as np
import pytest

from taxadiffusion.data.readers import read_folder
from taxadiffusion.data.synthetic import SyntheticConfig, SyntheticTaxonomy
from taxadiffusion.taxonomy import STANDARD_RANKS

# Trait fields owned by each rank (kingdom .. specific_epithet).
OWNED = (
    ("background_value",),
    ("background_hue",),
    ("shape",),
    ("elongation", "tail"),
    ("body_hue",),
    ("pattern",),
    ("density", "accent"),
)


@pytest.fixture(scope="module")
def synth():
    return SyntheticTaxonomy()


def test_default_size_and_long_tail(synth):
    summary = synth.summary()
    assert 32 <= summary["species"] <= 64
    assert summary["taxa"]["kingdom"] == 1 and list(summary["taxa"]) == [r.value for r in STANDARD_RANKS]
    assert summary["rare_species_under_10_images"] >= 3
    assert summary["images_per_species"]["max"] >= 10 * summary["images_per_species"]["min"]
    assert synth.taxonomy.num_taxa("specific_epithet") == len(synth)
    assert (
        synth.taxonomy.resolve(synth.species[0].lineage.names[-1], "specific_epithet").count
        == synth.species[0].n_images
    )


def test_deterministic_under_seed():
    a, b, c = SyntheticTaxonomy(), SyntheticTaxonomy(), SyntheticTaxonomy(SyntheticConfig(seed=1))
    assert [s.lineage for s in a.species] == [s.lineage for s in b.species]
    assert [s.lineage for s in a.species] != [s.lineage for s in c.species]
    sp = a.species[3]
    assert np.array_equal(a.training_image(sp, 5), b.training_image(b.species[3], 5))
    assert not np.array_equal(a.training_image(sp, 5), a.training_image(sp, 6))
    first = a.sample(sp.lineage.names, 4, np.random.default_rng(7))
    again = a.sample(sp.lineage.names, 4, np.random.default_rng(7))
    fresh = a.sample(sp.lineage.names, 4, np.random.default_rng(8))
    assert first.shape == (4, 32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again) and not np.array_equal(first, fresh)
    assert a.training_image(sp, 0, size=64).shape == (64, 64, 3)


def test_each_rank_owns_one_trait(synth):
    """Two species share every trait of the ranks above their split and differ in the split rank's trait."""
    pairs = 0
    for i, s in enumerate(synth.species):
        for t in synth.species[i + 1 :]:
            split = next(k for k in range(7) if s.lineage.names[k] != t.lineage.names[k])
            for level in range(split):
                assert [getattr(s.traits, f) for f in OWNED[level]] == [getattr(t.traits, f) for f in OWNED[level]]
            assert [getattr(s.traits, f) for f in OWNED[split]] != [getattr(t.traits, f) for f in OWNED[split]]
            pairs += 1
    assert pairs == len(synth) * (len(synth) - 1) // 2
    assert len({astuple(s.traits) for s in synth.species}) == len(synth)  # every species looks different


def test_images_show_their_traits(synth):
    """The body colour is the family's hue; the border is the background colour."""
    for species in synth.species[:: max(1, len(synth) // 8)]:
        image = synth.training_image(species, 0, size=64).astype(float) / 255
        hsv = np.array([colorsys.rgb_to_hsv(*p) for p in image.reshape(-1, 3)])
        saturated = hsv[(hsv[:, 1] > 0.75) & (hsv[:, 2] > 0.6)]
        hue_error = np.abs((saturated[:, 0] - species.traits.body_hue + 0.5) % 1.0 - 0.5)
        assert np.median(hue_error) < 0.03
        corner = image[:3, :3].reshape(-1, 3).mean(0)
        expected = np.array(colorsys.hsv_to_rgb(species.traits.background_hue, 0.35, species.traits.background_value))
        assert np.abs(corner - expected).max() < 0.25


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="branching for phylum"):
        SyntheticConfig(branching=((1, 1), (9, 9), (1, 1), (1, 1), (1, 1), (1, 1), (1, 1)))
    with pytest.raises(ValueError, match="min_images"):
        SyntheticConfig(min_images=0)


def test_write_folder_round_trip(tmp_path):
    synth = SyntheticTaxonomy(SyntheticConfig(branching=((1, 1),) * 5 + ((2, 2), (2, 2)), max_images=6, min_images=2))
    out = synth.write_folder(tmp_path / "data", progress=False)
    records = read_folder(out)
    assert len(records) == sum(s.n_images for s in synth.species) and not records.skipped
    assert records.taxonomy() == synth.taxonomy
    # Re-running with the same config reuses the folder; another folder with files is refused.
    synth.write_folder(out, progress=False)
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        synth.write_folder(tmp_path / "user", progress=False)
    assert (tmp_path / "user" / "precious.txt").read_text() == "keep me"
