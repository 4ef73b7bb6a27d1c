"""Dedicated solvers: NS equivalence, convergence order, NFE accounting, bad input.

Everything runs on the exact Gaussian-mixture flow (closed-form velocity), in float64.
"""

import math

import pytest
import torch

import bespoke
from bespoke import BespokeError
from bespoke.paths import VE, CondOT, VPDiscrete
from bespoke.solvers import METHODS, SOLVER_NAMES, NSSolver, largest_valid_nfe
from bespoke.solvers.grids import GRIDS, karras_sigmas
from bespoke.zoo import gmm_flow
from bespoke.zoo.gmm import gmm2d_mixture

F64 = torch.float64


def valid_nfe(name: str, nfe: int) -> int:
    return largest_valid_nfe(name, nfe)


@pytest.fixture(scope="module")
def noise():
    return torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=F64)


# --- NS form --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["condot", "cosine", "vp-discrete"])
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_every_solver_equals_its_ns_compilation(name, path, noise):
    flow = bespoke.load_model("zoo:gmm2d", path=path)
    for nfe in (4, 8, 12, 16):
        s = bespoke.solver(name, nfe=valid_nfe(name, nfe))
        ns = s.to_ns(flow)
        assert isinstance(ns, NSSolver) and ns.nfe == s.nfe
        direct, compiled = s.sample(flow, noise), ns.sample(flow, noise)
        scale = max(1.0, direct.abs().max().item())  # edm-heun diverges at tiny NFE; compare relatively
        assert (direct - compiled).abs().max().item() <= 1e-10 * scale, (name, nfe)


def test_euler_ns_coefficients_are_the_spec_closed_form():
    ns = bespoke.solver("euler", nfe=5).to_ns()
    n = 5
    assert torch.allclose(ns.a, torch.ones(n, dtype=F64))
    assert torch.allclose(ns.b, torch.tril(torch.full((n, n), 1 / n, dtype=F64)))
    assert torch.allclose(ns.times, torch.linspace(0, 1, n + 1, dtype=F64))


def test_midpoint_ns_coefficients_are_the_spec_closed_form():
    """Spec §3.2: a_i = 1; b_{2k+1} = [0, H, 0, H, ...]; b_{2k} = b_{2k-1} padded with H/2."""
    n, H = 6, 1 / 3
    ns = bespoke.solver("midpoint", nfe=n).to_ns()
    b = torch.zeros(n, n, dtype=F64)
    for i in range(n):
        for j in range(1, i + 1, 2):
            b[i, j] = H
        if i % 2 == 0:
            b[i, i] = H / 2
    assert torch.allclose(ns.a, torch.ones(n, dtype=F64))
    assert torch.allclose(ns.b, b, atol=1e-15)
    assert torch.allclose(ns.times, torch.linspace(0, 1, n + 1, dtype=F64))


def test_ddim_on_condot_is_euler(noise):
    flow = bespoke.load_model("zoo:gmm2d", path="condot")
    for nfe in (3, 8, 17):
        x_ddim = bespoke.solver("ddim", nfe=nfe).sample(flow, noise)
        x_euler = bespoke.solver("euler", nfe=nfe).sample(flow, noise)
        assert (x_ddim - x_euler).abs().max().item() < 1e-12


def test_ns_validation():
    with pytest.raises(BespokeError, match="not monotone"):
        NSSolver([0.0, 0.6, 0.4, 1.0], torch.ones(3), torch.tril(torch.ones(3, 3)))
    with pytest.raises(BespokeError, match="lower triangular"):
        NSSolver([0.0, 0.5, 1.0], torch.ones(2), torch.ones(2, 2))
    with pytest.raises(BespokeError, match="shape"):
        NSSolver([0.0, 1.0], torch.ones(2), torch.ones(2, 2))
    with pytest.raises(BespokeError, match=r"\[0, 1\]"):
        NSSolver([0.0, 0.5, 1.5], torch.ones(2), torch.tril(torch.ones(2, 2)))


# --- convergence order ------------------------------------------------------------------------------


def measured_order(flow, name, noise, steps, grid=None, **options):
    """Least-squares slope of log(mean RMSE vs GT) against log(steps)."""
    gt = bespoke.ground_truth(flow, noise, rtol=1e-12, atol=1e-12).samples
    per_step = METHODS[name].evals_per_step
    errs = []
    for k in steps:
        s = bespoke.solver(name, nfe=per_step * k - METHODS[name].saved_evals, grid=grid, **options)
        errs.append(bespoke.rmse(s.sample(flow, noise), gt).mean().item())
    x = torch.log(torch.tensor(steps, dtype=F64))
    y = torch.log(torch.tensor(errs, dtype=F64))
    xc = x - x.mean()
    return -float((xc * (y - y.mean())).sum() / (xc * xc).sum())


# RK-type methods: the flow ODE itself on a uniform grid (CondOT: both ends exact).
@pytest.mark.parametrize(
    "name, order, exact",
    [
        ("euler", 1, True),
        ("ddim", 1, True),
        ("midpoint", 2, True),
        ("heun", 2, True),
        ("rk4", 4, True),
        ("ipndm", 3, False),
    ],
)
def test_convergence_order_on_condot(name, order, exact, noise):
    flow = bespoke.load_model("zoo:gmm2d", path="condot")
    slope = measured_order(flow, name, noise[:32], [32, 64, 128, 256], grid="uniform")
    if exact:
        assert abs(slope - order) <= 0.2, slope
    else:
        assert slope >= order - 0.2, slope


# Exponential integrators step in log-SNR; on paths whose log-SNR is infinite at an end (CondOT at
# t = 0 and t = 1) every grid has steps of infinite lambda-length whatever the NFE, so their order
# is measured on the VE path, whose log-SNR range is finite (and where logsnr = uniform grid).
@pytest.mark.parametrize("name, order, exact", [("ddim", 1, True), ("dpm++2m", 2, True), ("unipc", 2, False)])
def test_convergence_order_of_exponential_integrators_on_ve(name, order, exact, noise):
    flow = gmm_flow(gmm2d_mixture(), VE())
    x0 = noise[:32] * float(flow.scheduler.sigma(0.0))
    slope = measured_order(flow, name, x0, [32, 64, 128, 256], grid="logsnr")
    if exact:
        assert abs(slope - order) <= 0.2, slope
    else:
        assert slope >= order - 0.2, slope


def test_solvers_converge_to_ground_truth_on_their_default_grids(noise):
    """At high NFE every solver lands on GT (EDM-Heun too, despite its truncated start)."""
    flow = bespoke.load_model("zoo:gmm2d", path="condot")
    gt = bespoke.ground_truth(flow, noise, rtol=1e-10, atol=1e-10).samples
    for name in SOLVER_NAMES:
        x = bespoke.solver(name, nfe=valid_nfe(name, 128)).sample(flow, noise)
        assert bespoke.psnr(x, gt) > 50, name


# --- NFE accounting -----------------------------------------------------------------------------------


class CountingNet(torch.nn.Module):
    """A 'network' predicting the exact velocity of the mixture; counts its real calls."""

    def __init__(self, scheduler):
        super().__init__()
        self.field = gmm2d_mixture().velocity(scheduler)
        self.calls = 0

    def forward(self, x, t, labels=None):
        self.calls += 1
        return self.field(t, x, labels=labels)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_every_solver_calls_the_network_exactly_nfe_times(name, noise):
    net = CountingNet(CondOT())
    flow = bespoke.from_network(net, prediction="velocity", scheduler=CondOT(), sample_shape=(2,))
    for nfe in range(1, 18):
        try:
            s = bespoke.solver(name, nfe=nfe)
        except BespokeError:
            continue
        net.calls = 0
        with flow.counting() as count:
            s.sample(flow, noise[:4])
        assert net.calls == nfe == count.nfe == s.nfe
        result = bespoke.evaluate(s, flow, noise[:4], torch.zeros(4, 2, dtype=F64))
        assert result.nfe == nfe


def test_edm_heun_counts_2n_minus_1():
    """EDM-Heun with N noise levels: N-1 Heun steps (2 NFE) and a final Euler step (1 NFE)."""
    for steps in (1, 2, 5, 9):
        assert bespoke.solver("edm-heun", nfe=2 * steps - 1).steps == steps
    with pytest.raises(BespokeError, match="NFE = 1, 3, 5, 7"):
        bespoke.solver("edm-heun", nfe=8)


# --- grids --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("path", ["condot", "vp", "vp-discrete"])
def test_grids_run_from_noise_to_data(grid, path):
    flow = bespoke.load_model("zoo:gmm2d", path=path)
    t = GRIDS[grid](10, flow.scheduler, flow.ode_end)
    assert len(t) == 11 and t[0] == 0.0 and t[-1] == 1.0
    assert all(b > a for a, b in zip(t, t[1:]))


def test_logsnr_grid_is_uniform_in_lambda_inside():
    sch = VPDiscrete.ddpm_linear()
    t = GRIDS["logsnr"](8, sch, float(sch.time_of_timestep(0)))
    lam = sch.log_snr(torch.tensor(t[1:-1], dtype=F64))
    steps = lam[1:] - lam[:-1]
    assert torch.allclose(steps, steps.mean().expand_as(steps), atol=1e-9)


def test_edm_grid_is_karras_rho7_in_sigma():
    sch = CondOT()  # sigma_t / alpha_t = (1 - t) / t
    t = GRIDS["edm"](6, sch, 1.0, exact_start=False)
    sigma = torch.tensor([(1 - x) / x for x in t[:-1]], dtype=F64)
    assert torch.allclose(sigma, karras_sigmas(6, 0.002, 80.0, 7.0), rtol=1e-9)
    assert sigma[0].item() == pytest.approx(80.0) and t[-1] == 1.0


# --- bad input ----------------------------------------------------------------------------------------


def test_unknown_solver_lists_valid_names():
    with pytest.raises(BespokeError) as e:
        bespoke.solver("dpm++3m", nfe=8)
    for name in SOLVER_NAMES:
        assert name in str(e.value)


@pytest.mark.parametrize(
    "name, nfe, says",
    [
        ("midpoint", 7, "NFE = 2, 4, 6, 8"),
        ("rk4", 6, "NFE = 4, 8, 12, 16"),
        ("heun", 3, "2 evaluations per step"),
        ("euler", 0, "any NFE >= 1"),
    ],
)
def test_nfe_a_solver_cannot_take(name, nfe, says):
    with pytest.raises(BespokeError, match=f"{name} cannot take nfe={nfe}.*{says}"):
        bespoke.solver(name, nfe=nfe)


def test_bad_options_and_grids():
    with pytest.raises(BespokeError, match="options: order"):
        bespoke.solver("unipc", nfe=8, orde=2)
    with pytest.raises(BespokeError, match="1..3"):
        bespoke.solver("unipc", nfe=8, order=5)
    with pytest.raises(BespokeError, match="valid: uniform, logsnr, edm, quadratic"):
        bespoke.solver("euler", nfe=8, grid="karras")
    with pytest.raises(BespokeError, match="integer"):
        bespoke.solver("euler", nfe=8.0)


def test_wrong_noise_shape_and_nan_model(noise):
    flow = bespoke.load_model("zoo:gmm2d")
    with pytest.raises(BespokeError, match=r"\(batch, 2\)"):
        bespoke.solver("euler", nfe=4).sample(flow, torch.randn(8, 3))
    nan_flow = bespoke.Flow(lambda t, x: torch.full_like(x, math.nan), sample_shape=(2,), name="broken")
    with pytest.raises(BespokeError, match="non-finite"):
        bespoke.solver("euler", nfe=4).sample(nan_flow, noise)


def test_scheduler_free_flow_refuses_exponential_solvers(noise):
    plain = bespoke.Flow(lambda t, x: -x, sample_shape=(2,), name="plain")
    bespoke.solver("rk4", nfe=8).sample(plain, noise)  # RK methods need no Gaussian path
    with pytest.raises(BespokeError, match="Gaussian path"):
        bespoke.solver("dpm++2m", nfe=8).sample(plain, noise)


def test_float32_noise_keeps_its_dtype():
    flow = bespoke.load_model("zoo:gmm2d")
    x = bespoke.solver("unipc", nfe=6).sample(flow, torch.randn(8, 2))
    assert x.dtype == torch.float32 and torch.isfinite(x).all()


def test_explicit_times(noise):
    flow = bespoke.load_model("zoo:gmm2d")
    times = [0.0, 0.2, 0.45, 0.7, 0.9, 1.0]
    s = bespoke.solver("dpm++2m", nfe=5, grid=times)
    assert s.to_ns(flow).times.tolist() == times
    assert torch.allclose(s.sample(flow, noise), s.to_ns(flow).sample(flow, noise), atol=1e-12)
    with pytest.raises(BespokeError, match="not monotone"):
        bespoke.solver("euler", nfe=3, grid=[0.0, 0.6, 0.4, 1.0])
    with pytest.raises(BespokeError, match="needs 5 times"):
        bespoke.solver("midpoint", nfe=8, grid=[0.0, 0.5, 1.0])


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_largest_valid_nfe_is_the_largest_nfe_the_solver_accepts(name):
    for nfe in range(0, 20):
        accepted = [k for k in range(1, nfe + 1) if _accepts(name, k)]
        assert largest_valid_nfe(name, nfe) == (max(accepted) if accepted else None)


def _accepts(name, nfe):
    try:
        bespoke.solver(name, nfe=nfe)
        return True
    except BespokeError:
        return False
