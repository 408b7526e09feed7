"""The taxonomy encoder (sum over ranks) and condition dropout."""

import pytest
import torch

from taxadiffusion.conditioning import TaxonomyEncoder, cut_to_coarsest, drop_ranks
from taxadiffusion.taxonomy import NONE_ID as DROPPED


def test_drop_at_most_one_rank_with_p_each():
    ids = torch.arange(5).repeat(21_000, 1)
    dropped = drop_ranks(ids, 1 / 21, generator=torch.Generator().manual_seed(0)) == DROPPED
    assert dropped.sum(1).max() == 1  # at most one rank per sample
    per_rank = dropped.float().mean(0)
    assert torch.allclose(per_rank, torch.full((5,), 1 / 21), atol=0.005)
    assert abs(dropped.any(1).float().mean() - 5 / 21) < 0.01


def test_cascade_drops_every_finer_rank():
    ids = torch.arange(5).repeat(4000, 1)
    out = drop_ranks(ids, 0.2, cascade=True, generator=torch.Generator().manual_seed(1))
    dropped = out == DROPPED
    first = dropped.float().argmax(1)
    for row in torch.nonzero(dropped.any(1)).flatten()[:200]:
        assert dropped[row, first[row] :].all() and not dropped[row, : first[row]].any()
    assert (dropped[:, 0]).float().mean() > 0.15  # rank 0 drops drop everything


def test_dropout_is_deterministic_under_a_generator():
    ids = torch.arange(5).repeat(64, 1)
    a = drop_ranks(ids, 0.1, generator=torch.Generator().manual_seed(3))
    b = drop_ranks(ids, 0.1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(drop_ranks(ids, 0.0), ids)
    with pytest.raises(ValueError, match="at most one rank"):
        drop_ranks(ids, 0.3)


def _encoder(**kwargs):
    torch.manual_seed(0)
    return TaxonomyEncoder(num_ranks=3, text_width=16, num_heads=4, **kwargs).eval()


def test_output_is_the_sum_of_rank_encoders():
    encoder = _encoder()
    features = torch.randn(2, 3, 5, 16)
    per_rank = [encoder.encoders[i](features[:, i]) for i in range(3)]
    assert torch.allclose(encoder(features, 1), per_rank[0], atol=1e-6)
    assert torch.allclose(encoder(features, 3), per_rank[0] + per_rank[1] + per_rank[2], atol=1e-5)
    # Per-sample depths in one batch.
    mixed = encoder(features, torch.tensor([1, 2]))
    assert torch.allclose(mixed[0], per_rank[0][0], atol=1e-6)
    assert torch.allclose(mixed[1], per_rank[0][1] + per_rank[1][1], atol=1e-5)
    with pytest.raises(ValueError, match="depth must be in"):
        encoder(features, 4)


def test_projection_to_cross_attention_width(tmp_path):
    encoder = _encoder(cross_attention_dim=32)
    assert encoder(torch.randn(1, 3, 5, 16), 2).shape == (1, 5, 32)
    encoder.save_pretrained(tmp_path / "enc")
    loaded = TaxonomyEncoder.from_pretrained(tmp_path / "enc").eval()
    x = torch.randn(2, 3, 5, 16)
    assert torch.equal(loaded(x, 3), encoder(x, 3))


def test_frozen_encoders_stay_in_eval_mode():
    encoder = _encoder(dropout=0.5)
    encoder.freeze_below(2)
    encoder.train()
    assert [e.training for e in encoder.encoders] == [False, False, True]
    assert [any(p.requires_grad for p in e.parameters()) for e in encoder.encoders] == [False, False, True]
    x = torch.randn(1, 3, 5, 16)
    frozen = [encoder.encoders[i](x[:, i]) for i in range(2)]
    again = [encoder.encoders[i](x[:, i]) for i in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(frozen, again, strict=True))  # no dropout noise


def test_cut_to_coarsest_replays_rank_zero_at_its_rate():
    depth = torch.full((20_000,), 5)
    cut = cut_to_coarsest(depth, 0.1, generator=torch.Generator().manual_seed(0))
    assert set(cut.unique().tolist()) == {1, 5}
    assert abs((cut == 1).float().mean().item() - 0.1) < 0.01
    assert torch.equal(cut_to_coarsest(depth, 0.0), depth)
    with pytest.raises(ValueError, match="coarse dropout"):
        cut_to_coarsest(depth, 1.0)


def test_frozen_rank_tables_equal_the_full_encoder():
    """The training shortcut: the tabulated frozen ranks plus the live ones give what running every rank
    encoder gives, for every depth, dropped ("None") ids included."""
    from taxadiffusion.conditioning import FrozenRankTables
    from taxadiffusion.text import none_rows

    torch.manual_seed(0)
    encoder = TaxonomyEncoder(num_ranks=4, text_width=16, cross_attention_dim=32, num_heads=4)
    encoder.freeze_below(2)
    encoder.eval()  # the live encoders without dropout, so the two paths are comparable
    tables = [torch.randn(n + 1, 3, 16) for n in (2, 3, 4, 5)]  # the last row: "<rank>: None"
    ids = torch.tensor([[0, 1, 2, 3], [1, DROPPED, 0, 4], [DROPPED, 2, DROPPED, 0], [0, 0, 3, DROPPED]] * 2)
    features = torch.stack([tables[r][none_rows(ids[:, r], len(tables[r]))] for r in range(4)], dim=1)
    depth = torch.tensor([1, 2, 3, 4, 4, 3, 2, 1])
    frozen = FrozenRankTables(encoder, tables[:2], levels=2)
    full = encoder(features, depth)
    fast = encoder(features, depth, frozen_sum=frozen.sum(ids, depth), start=2)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(encoder(features, torch.full_like(depth, 4)), full)  # depth matters
