"""[BES] Thm 2.3 on the ideal velocity: the scale-time transform of a flow to another path is the
flow of the same data under that path."""

import pytest
import torch

import bespoke
from bespoke.flows import scale_time_flow
from bespoke.paths import CondOT, Cosine, VPLinear
from bespoke.zoo import gmm_flow
from bespoke.zoo.gmm import gmm2d_mixture


@pytest.mark.parametrize(
    "source, target", [(CondOT(), Cosine()), (Cosine(), CondOT()), (CondOT(), VPLinear()), (VPLinear(), Cosine())]
)
def test_transformed_velocity_is_the_ideal_velocity_of_the_target_path(source, target):
    mixture = gmm2d_mixture()
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    moved = scale_time_flow(gmm_flow(mixture, source), target)
    native = gmm_flow(mixture, target)
    for r in (0.05, 0.3, 0.6, 0.9):
        assert (moved(r, x) - native(r, x)).abs().max().item() < 1e-10


def test_transformed_flow_costs_one_nfe_per_evaluation():
    base = bespoke.load_model("zoo:gmm2d")
    moved = scale_time_flow(base, Cosine())
    x = torch.randn(4, 2, dtype=torch.float64)
    bespoke.solver("euler", nfe=6).sample(moved, x)
    assert base.nfe == moved.nfe == 6
