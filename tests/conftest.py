"""Fixtures shared by the learned-solver tests: the exact Gaussian-mixture flow and float64 noise for it.
A test module that needs another `flow` or `noise` defines its own, which takes precedence."""

import pytest
import torch

import bespoke


@pytest.fixture(scope="module")
def flow():
    return bespoke.load_model("zoo:gmm2d")


@pytest.fixture(scope="module")
def noise():
    return bespoke.draw_noise((2,), 64, seed=3, dtype=torch.float64)
