"""bespoke.noise: sample i depends only on (seed, i)."""

import pytest
import torch

from bespoke import BespokeError
from bespoke.noise import draw_labels, draw_noise


def test_shape_dtype_device():
    x = draw_noise((3, 4), 5, seed=0)
    assert x.shape == (5, 3, 4) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert draw_noise(2, 7, seed=0, dtype=torch.float64).shape == (7, 2)
    assert draw_noise(2, 0, seed=0).shape == (0, 2)


def test_prefix_property():
    """The first k samples of a draw of n are the draw of k, for every k."""
    full = draw_noise((2,), 50, seed=7, dtype=torch.float64)
    for k in (1, 2, 17, 49, 50):
        assert torch.equal(draw_noise((2,), k, seed=7, dtype=torch.float64), full[:k])


def test_batch_independence():
    """Sample i is the same whether drawn alone, in a small batch or in a large one."""
    big = draw_noise((4, 4), 32, seed=3, dtype=torch.float64)
    for i in (0, 5, 31):
        alone = draw_noise((4, 4), i + 1, seed=3, dtype=torch.float64)[i]
        assert torch.equal(alone, big[i])
    # no two samples in a draw are the same numbers (each has its own generator)
    assert len({tuple(row.flatten().tolist()) for row in big}) == 32


def test_different_seeds_differ():
    a, b = draw_noise((8,), 10, seed=0), draw_noise((8,), 10, seed=1)
    assert not torch.any(torch.all(a == b, dim=1))
    assert torch.equal(draw_noise((8,), 10, seed=0), a)  # and a seed is reproducible


def test_float32_is_rounded_float64():
    x64 = draw_noise((5,), 20, seed=11, dtype=torch.float64)
    assert torch.equal(draw_noise((5,), 20, seed=11, dtype=torch.float32), x64.float())


def test_standard_normal():
    x = draw_noise((10,), 2000, seed=0, dtype=torch.float64)
    assert abs(float(x.mean())) < 0.03 and abs(float(x.std()) - 1) < 0.03


@pytest.mark.parametrize("kwargs", [{"num": -1}, {"num": 2.0}, {"seed": "0"}, {"shape": (0,)}, {"seed": True}])
def test_bad_arguments(kwargs):
    args = {"shape": (2,), "num": 3, "seed": 0} | kwargs
    with pytest.raises(BespokeError):
        draw_noise(**args)


def test_labels():
    lab = draw_labels(300, 3, seed=0)
    assert lab.dtype == torch.long and lab.shape == (300,)
    assert set(lab.tolist()) == {0, 1, 2}
    assert torch.equal(draw_labels(10, 3, seed=0), lab[:10])
    assert not torch.equal(draw_labels(300, 3, seed=1), lab)
    with pytest.raises(BespokeError):
        draw_labels(3, 0, seed=0)
