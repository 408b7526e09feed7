import pytest
import torch

from taxadiffusion.guidance import Guidance, cfg, in_window, taxonomic_cfg


def test_taxonomic_cfg_by_hand():
    fine = torch.tensor([1.0, 2.0, -1.0])
    coarse = torch.tensor([0.5, 2.0, 1.0])
    # (1 + w) * fine - w * coarse with w = 8: [9 - 4, 18 - 16, -9 - 8]
    assert torch.allclose(taxonomic_cfg(fine, coarse, 8.0), torch.tensor([5.0, 2.0, -17.0]), atol=1e-6)
    assert torch.allclose(taxonomic_cfg(fine, coarse, 0.0), fine, atol=1e-7)  # w = 0: the conditional prediction
    noisy = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    other = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(taxonomic_cfg(noisy, other, 8.0), 9.0 * noisy - 8.0 * other, atol=1e-5)
    # Same algebra as CFG with the level-0 branch as the negative and s = 1 + w.
    assert torch.allclose(taxonomic_cfg(fine, coarse, 8.0), cfg(fine, coarse, 9.0))
    assert torch.equal(cfg(fine, coarse, 1.0), fine)
    assert torch.equal(cfg(fine, coarse, 0.0), coarse)


def test_window():
    assert all(in_window(i, 10) for i in range(10))
    # Both ends included, as published (`i >= r0 * N and i <= r1 * N`): steps 0..5 of 10, 0..10 of 20.
    assert [in_window(i, 10, (0.0, 0.5)) for i in range(10)] == [True] * 6 + [False] * 4
    assert [i for i in range(20) if in_window(i, 20, (0.0, 0.5))] == list(range(11))
    assert [i for i in range(20) if in_window(i, 20, (0.25, 0.5))] == list(range(5, 11))
    assert [in_window(i, 4, (0.5, 1.0)) for i in range(4)] == [False, False, True, True]
    assert not any(in_window(i, 4, (0.3, 0.3)) for i in range(4))
    with pytest.raises(ValueError, match="r0 <= r1"):
        in_window(0, 4, (0.6, 0.2))


def test_guidance_names():
    assert Guidance.parse("taxonomic") is Guidance.TAXONOMIC
    with pytest.raises(ValueError, match="unknown guidance"):
        Guidance.parse("cfg++")
