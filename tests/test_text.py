"""Text encoders and the per-taxon embedding cache."""

from dataclasses import replace

import pytest
import torch

from taxadiffusion.taxonomy import NONE_ID as DROPPED
from taxadiffusion.text import (
    TextEmbeddingCache,
    TextEncoderSpec,
    TransformersTextEncoder,
    packaged_minilm_path,
    rank_texts,
)


class CountingEncoder:
    """A fake encoder that records every text it is asked to encode."""

    identity = "counting"
    width = 6
    max_length = 4

    def __init__(self):
        self.seen = []

    def encode(self, texts):
        self.seen.extend(texts)
        return torch.stack([torch.full((self.max_length, self.width), float(hash(t) % 997)) for t in texts])


def test_each_unique_text_is_encoded_once(small_taxonomy):
    encoder = CountingEncoder()
    cache = TextEmbeddingCache.build(small_taxonomy, encoder)
    texts = rank_texts(small_taxonomy)
    unique = {"", *(t for rank_list in texts for t in rank_list)}  # "": the published vanilla-CFG negative
    assert sorted(encoder.seen) == sorted(unique)  # once each
    assert cache.empty_text.shape == (1, 4, 6)
    # The two genera called Chromis are two taxa but one text, encoded once.
    assert sum(t == "genus: Chromis" for rank_list in texts for t in rank_list) == 2
    assert encoder.seen.count("genus: Chromis") == 1
    assert texts[-1][-1] == "specific_epithet: None"
    assert cache.table(3).shape == (small_taxonomy.num_taxa("genus") + 1, 4, 6)


def test_lookup_maps_dropped_to_none_row(small_taxonomy):
    cache = TextEmbeddingCache.build(small_taxonomy, CountingEncoder())
    ids = torch.tensor([[0, 1, 2, 0, DROPPED]])
    features = cache.lookup(ids)
    assert features.shape == (1, 5, 4, 6)
    none_row = cache.table(4)[-1]
    assert torch.equal(features[0, 4], none_row)
    assert torch.equal(features[0, 2], cache.table(2)[2])


def test_cache_round_trip(small_taxonomy, tmp_path):
    cache = TextEmbeddingCache.build(small_taxonomy, CountingEncoder())
    cache.save_pretrained(tmp_path / "cache")
    loaded = TextEmbeddingCache.from_pretrained(tmp_path / "cache")
    assert loaded.taxonomy == small_taxonomy
    for level in range(5):
        assert torch.equal(loaded.table(level), cache.table(level))


def test_clip_encoder_from_sd_folder(tiny_sd):
    spec = TextEncoderSpec(str(tiny_sd), model_subfolder="text_encoder", tokenizer_subfolder="tokenizer")
    encoder = spec.load()
    features = encoder.encode(["genus: Amphiprion", "specific_epithet: clarkii", "genus: Amphiprion"])
    assert features.shape == (3, 16, 32)
    assert torch.equal(features[0], features[2]) and not torch.equal(features[0], features[1])
    # The same features the CLIP text model gives for SD's padded prompt.
    ids = encoder.tokenizer(
        ["genus: Amphiprion"], padding="max_length", max_length=16, truncation=True, return_tensors="pt"
    )
    assert torch.allclose(features[0], encoder.model(ids.input_ids).last_hidden_state[0])
    assert spec.identity() == spec.identity()


def test_load_or_build_reuses_the_cache(tiny_sd, small_taxonomy, tmp_path, monkeypatch):
    spec = TextEncoderSpec(str(tiny_sd), model_subfolder="text_encoder", tokenizer_subfolder="tokenizer")
    loads = []
    original = TransformersTextEncoder.from_pretrained

    def counted(cls_spec):
        loads.append(cls_spec)
        return original(cls_spec)

    monkeypatch.setattr(TransformersTextEncoder, "from_pretrained", staticmethod(counted))
    first = TextEmbeddingCache.load_or_build(tmp_path, small_taxonomy, spec, progress=False)
    second = TextEmbeddingCache.load_or_build(tmp_path, small_taxonomy, spec, progress=False)
    assert len(loads) == 1  # the second run read the cache and never loaded the encoder
    assert torch.equal(first.table(4), second.table(4))
    other = TextEmbeddingCache.load_or_build(tmp_path, small_taxonomy, spec, template="a photo of {name}")
    assert len(loads) == 2 and not torch.equal(other.table(4), first.table(4))
    # another token length is another cache, never the first one's tables at the wrong length
    shorter = TextEmbeddingCache.load_or_build(tmp_path, small_taxonomy, replace(spec, max_length=8), progress=False)
    assert len(loads) == 3 and shorter.table(4).shape[1] == 8 and first.table(4).shape[1] == 16


def test_packaged_minilm_encodes_offline():
    path = packaged_minilm_path()
    encoder = TextEncoderSpec("minilm", max_length=16).load()
    assert encoder.width == 384 and path.endswith("model")
    features = encoder.encode(["family: Pomacentridae", "family: Labridae"])
    assert features.shape == (2, 16, 384)
    assert not torch.allclose(features[0], features[1])


def test_bad_template(small_taxonomy):
    with pytest.raises(ValueError, match="must contain"):
        rank_texts(small_taxonomy, "{rank}")
