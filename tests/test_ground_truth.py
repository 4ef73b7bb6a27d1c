"""Ground truth (dopri5) and the metrics it is scored with."""

import math

import pytest
import torch

import bespoke
from bespoke import BespokeError
from bespoke.paths import VPDiscrete
from bespoke.zoo.gmm import gmm2d_mixture

F64 = torch.float64


@pytest.fixture(scope="module")
def noise():
    return torch.randn(32, 2, generator=torch.Generator().manual_seed(1), dtype=F64)


def test_gt_matches_a_10000_step_rk4_reference(noise):
    flow = bespoke.load_model("zoo:gmm2d")
    gt = bespoke.ground_truth(flow, noise)  # rtol = atol = 1e-5
    reference = bespoke.solver("rk4", nfe=40_000).sample(flow, noise)
    assert bespoke.rmse(gt.samples, reference).mean().item() <= 1e-4
    assert 30 < gt.nfe < 1000  # dopri5 reports what it spent


def test_gt_reports_nfe_and_tolerances(noise):
    flow = bespoke.load_model("zoo:gmm2d")
    loose = bespoke.ground_truth(flow, noise, rtol=1e-3, atol=1e-3)
    tight = bespoke.ground_truth(flow, noise, rtol=1e-9, atol=1e-9)
    assert tight.nfe > loose.nfe
    assert tight.settings() == {"solver": "dopri5", "rtol": 1e-9, "atol": 1e-9, "nfe": tight.nfe}
    assert tight.samples.dtype == F64


def test_dense_states_at_requested_times(noise):
    flow = bespoke.load_model("zoo:gmm2d")
    times = [0.25, 0.5, 0.9]
    gt = bespoke.ground_truth(flow, noise, rtol=1e-10, atol=1e-10, times=times)
    assert gt.states.shape == (3, *noise.shape)
    for t, state in zip(times, gt.states):  # each state is the trajectory at t
        direct = bespoke.ground_truth(
            bespoke.Flow(lambda s, x, _f=flow, _t=t: _t * _f(s * _t, x), sample_shape=(2,)),  # time rescaled to [0, t]
            noise,
            rtol=1e-10,
            atol=1e-10,
        ).samples
        assert (state - direct).abs().max().item() < 1e-7
    with pytest.raises(BespokeError, match="strictly increasing"):
        bespoke.ground_truth(flow, noise, times=[0.5, 0.2])


def test_discrete_model_gt_stops_at_smallest_timestep_and_denoises(noise):
    """DESIGN §3: ODE from timestep 999 to 0, then the data prediction there (one more NFE)."""
    sch = VPDiscrete.ddpm_linear()
    field = gmm2d_mixture().velocity(sch)
    eps_net = lambda x, tau: bespoke.flows.prediction_from_velocity(  # noqa: E731
        "eps", field(sch.time_of_timestep(tau), x), x, sch.time_of_timestep(tau), sch
    )
    flow = bespoke.from_network(eps_net, prediction="eps", scheduler=sch, sample_shape=(2,))
    assert flow.ode_end == pytest.approx(999 / 1000)
    gt = bespoke.ground_truth(flow, noise, rtol=1e-9, atol=1e-9)
    stop = bespoke.ground_truth(
        bespoke.Flow(field, scheduler=sch, sample_shape=(2,), ode_end=flow.ode_end), noise, rtol=1e-9, atol=1e-9
    )
    # the exact mixture flow run all the way to t = 1 lands within sigma_min^2-order of it
    full = bespoke.ground_truth(bespoke.load_model("zoo:gmm2d", path=sch), noise, rtol=1e-9, atol=1e-9)
    assert (gt.samples - stop.samples).abs().max().item() < 1e-7
    assert bespoke.rmse(gt.samples, full.samples).mean().item() < 1e-3


def test_psnr_and_rmse_definitions():
    ref = torch.zeros(3, 4)
    x = torch.tensor([[0.1] * 4, [0.2] * 4, [0.4] * 4])
    assert torch.allclose(bespoke.rmse(x, ref), torch.tensor([0.1, 0.2, 0.4], dtype=F64))
    per = [20 * math.log10(2 / e) for e in (0.1, 0.2, 0.4)]
    assert bespoke.psnr(x, ref) == pytest.approx(sum(per) / 3)  # mean of per-sample PSNR
    assert bespoke.psnr(x, ref, data_range=1.0) == pytest.approx(sum(per) / 3 - 20 * math.log10(2))
    assert torch.allclose(bespoke.psnr(x, ref, reduction="none"), torch.tensor(per, dtype=F64))
    with pytest.raises(BespokeError, match="shape"):
        bespoke.psnr(x, torch.zeros(3, 5))


def test_the_python_api_a_user_would_guess(noise):
    flow = bespoke.load_model("zoo:gmm2d")
    s = bespoke.solver("dpm++2m", nfe=8)
    x = s.sample(flow, noise)
    gt = bespoke.ground_truth(flow, noise)
    assert bespoke.psnr(x, gt) == bespoke.psnr(x, gt.samples) > 25
