"""FD-digits (DESIGN §8): the shipped classifier, the Fréchet distance and its sanity properties.
Nothing is trained here; the classifier's weights ship with the package."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from safetensors import safe_open

from bespoke.errors import BespokeError
from bespoke.fd import class_accuracy, digit_features, fd_digits, fd_floor, frechet_distance
from bespoke.zoo.classifier import CLASSIFIER_PATH, DigitsClassifier, load_classifier
from bespoke.zoo.digits import load_digits16


@pytest.fixture(scope="module")
def heldout():
    return load_digits16("heldout")


def _gaussian_samples(mu: torch.Tensor, var: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n samples whose empirical mean is exactly mu and empirical covariance exactly diag(var)."""
    z = torch.randn(n, len(mu), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T  # whiten: cov(z) = I
    return mu + z * var.sqrt()


def _scipy_fd(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().numpy(), b.double().numpy()
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * scipy.linalg.sqrtm(sa @ sb).real))


# --- the classifier --------------------------------------------------------------------------------


def test_shipped_classifier_loads_from_safetensors_and_is_accurate(heldout):
    with safe_open(str(CLASSIFIER_PATH), framework="pt") as f:
        meta = json.loads(f.metadata()["bespoke"])
    assert meta["heldout_accuracy"] >= 0.97 and meta["training"]["wall_seconds"] > 0
    net = load_classifier()
    assert isinstance(net, DigitsClassifier) and not net.training
    assert not any(p.requires_grad for p in net.parameters())
    assert load_classifier() is net  # cached
    x, y = heldout
    with torch.no_grad():
        assert (net(x).argmax(1) == y).double().mean() >= 0.97
        assert net.features(x[:5]).shape == (5, 128)


def test_class_accuracy_true_vs_shuffled_labels(heldout):
    x, y = heldout
    assert class_accuracy(x, y) >= 0.97
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    assert abs(class_accuracy(x, shuffled) - 0.1) < 0.05


# --- frechet_distance ------------------------------------------------------------------------------


def test_known_answer_diagonal_gaussians():
    threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(1)
    d = 16
    mu_a, mu_b = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    var_a = torch.rand(d, generator=g, dtype=torch.float64) * 3 + 0.1
    var_b = torch.rand(d, generator=g, dtype=torch.float64) * 3 + 0.1
    a, b = _gaussian_samples(mu_a, var_a, 200, 2), _gaussian_samples(mu_b, var_b, 500, 3)
    expected = float((mu_a - mu_b).pow(2).sum() + (var_a.sqrt() - var_b.sqrt()).pow(2).sum())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8, abs=1e-8)
    # a common rotation leaves FD unchanged but makes the covariances full (non-diagonal) matrices
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    assert frechet_distance(a @ q.T, b @ q.T) == pytest.approx(expected, rel=1e-8, abs=1e-8)
    # float32 input is promoted to float64
    assert torch.get_num_threads() == threads  # the one-thread section restores the setting
    assert frechet_distance(a.float(), b.float()) == pytest.approx(expected, rel=1e-5)


def test_matches_scipy_sqrtm_on_full_rank_covariances():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(400, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    b = torch.randn(300, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    assert frechet_distance(a, b) == pytest.approx(_scipy_fd(a, b), rel=1e-8)


def test_self_distance_is_zero_and_fd_is_symmetric(heldout):
    f = digit_features(heldout[0])
    scale = float(torch.cov(f.double().T).trace())
    assert frechet_distance(f, f) < 1e-6 * scale
    assert fd_digits(heldout[0]) < 1e-6 * scale
    few = f[:40]  # fewer samples than dimensions: singular covariance, still fine
    assert frechet_distance(few, few) < 1e-6 * scale
    train = digit_features(load_digits16("train")[0])
    ab, ba = frechet_distance(f, train), frechet_distance(train, f)
    assert ab == pytest.approx(ba, rel=1e-6)
    assert frechet_distance(few, train) == pytest.approx(frechet_distance(train, few), rel=1e-6)


# --- FD-digits ---------------------------------------------------------------------------------------


def test_fd_grows_with_noise(heldout):
    x = heldout[0]
    g = torch.Generator().manual_seed(0)
    fds = [fd_digits(x + s * torch.randn(x.shape, generator=g)) for s in (0.0, 0.1, 0.3, 0.6)]
    assert all(a < b for a, b in zip(fds, fds[1:])), fds


def test_fd_grows_with_blur_and_shift(heldout):
    x = heldout[0]
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None]).div(16)[None, None]
    blurred, fds = x, [0.0]
    for _ in range(3):
        blurred = F.conv2d(F.pad(blurred, (1, 1, 1, 1), value=-1.0), k)
        fds.append(fd_digits(blurred))
    assert all(a < b for a, b in zip(fds, fds[1:])), fds
    shifted = [fd_digits(F.pad(x, (d, 0, d, 0), value=-1.0)[..., :16, :16]) for d in (0, 1, 2, 3)]
    assert all(a < b for a, b in zip(shifted, shifted[1:])), shifted


def test_floor_is_small_compared_with_noise():
    floor = fd_floor()
    noise = fd_digits(torch.randn(300, 1, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert 0 < floor < noise / 20
    assert floor < fd_floor(300) < noise / 20  # fewer samples, larger finite-sample bias


def test_clamps_and_accepts_any_float_dtype(heldout):
    x = heldout[0]
    ref = fd_digits(x * 0.9)
    assert fd_digits((x * 0.9).double()) == pytest.approx(ref, rel=1e-4)
    assert fd_digits((x * 0.9).half()) == pytest.approx(ref, rel=0.05, abs=0.5)
    wild = x + 3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    assert fd_digits(wild) == pytest.approx(fd_digits(wild.clamp(-1, 1)), rel=1e-6)  # clamped to [-1, 1] first


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(4, 16, 16),
        torch.zeros(4, 3, 16, 16),
        torch.zeros(4, 1, 8, 8),
        torch.zeros(4, 1, 16, 16).long(),
        torch.zeros(0, 1, 16, 16),
        torch.full((4, 1, 16, 16), float("nan")),
    ],
)
def test_bad_images_raise(bad):
    with pytest.raises(BespokeError):
        fd_digits(bad)


def test_bad_arguments_raise(heldout):
    x, y = heldout
    with pytest.raises(BespokeError):
        class_accuracy(x, y[:10])
    with pytest.raises(BespokeError):
        class_accuracy(x, y[:, None])
    with pytest.raises(BespokeError):
        fd_digits(x, reference="test")
    with pytest.raises(BespokeError):
        fd_floor(1)
    for a, b in [
        (torch.zeros(10), torch.zeros(10)),
        (torch.randn(10, 3), torch.randn(10, 4)),
        (torch.randn(1, 3), torch.randn(10, 3)),
        (torch.full((5, 3), float("inf")), torch.randn(5, 3)),
    ]:
        with pytest.raises(BespokeError):
            frechet_distance(a, b)
