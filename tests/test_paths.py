"""Schedulers (spec §1.2) and the scale-time change between them ([BES] Thm 2.3, spec §1.4-1.5).

Everything is float64. Derivatives are checked against central finite differences, inverses by
round trips, boundary values against their closed forms, the discrete DDPM schedule against
diffusers, and Thm 2.3 on the exact Gaussian-mixture flow (trajectory level).
"""

import math

import pytest
import torch

import bespoke
from bespoke.paths import EDM, SCHEDULERS, VE, CondOT, Scheduler, VPDiscrete, VPLinear, scale_time

F64 = torch.float64
H = 1e-6  # finite-difference step: truncation error ~H^2 f'''/6 and round-off ~1e-16 f/H both <= 4e-10 here

ALL = pytest.mark.parametrize("name", list(SCHEDULERS))

# Interior points. 0.02 + 0.02 k are integer DDPM timesteps for VPDiscrete (t * 1000 is an integer, i.e. the
# knots of its Hermite interpolant); the shifted copy sits 0.437 of a timestep off them, inside the cubic pieces.
GRID = torch.linspace(0.02, 0.98, 49, dtype=F64)
INTERIOR = torch.cat([GRID, GRID + 0.000437])


def central_difference(f, t, h=H):
    return (f(t + h) - f(t - h)) / (2 * h)


def assert_close_scaled(got, want, tol, what):
    """|got - want| <= tol * max(1, |want|): absolute where |want| <= 1, relative where the values are large
    (VE and EDM sigma reach 50 and 80, and their d_sigma ~ 400, where 1e-7 absolute is below float64 FD resolution)."""
    err = ((got - want).abs() / want.abs().clamp(min=1.0)).max().item()
    assert err <= tol, f"{what}: scaled error {err:.3e} > {tol:.0e}"


# --- 1. derivatives ------------------------------------------------------------------------------


@ALL
@pytest.mark.parametrize("part", ["alpha", "sigma"])
def test_derivative_matches_finite_difference(name, part):
    sched = SCHEDULERS[name]()
    f, df = getattr(sched, part), getattr(sched, f"d_{part}")
    assert_close_scaled(df(INTERIOR), central_difference(f, INTERIOR), 1e-7, f"{sched!r} d_{part}")


@ALL
def test_sigma_d_sigma_is_sigma_times_d_sigma(name):
    sched = SCHEDULERS[name]()
    t = torch.cat([torch.tensor([0.0], dtype=F64), INTERIOR])
    assert_close_scaled(sched.sigma_d_sigma(t), sched.sigma(t) * sched.d_sigma(t), 1e-12, repr(sched))


@pytest.mark.parametrize("name", ["vp", "vp-discrete"])
def test_sigma_d_sigma_is_finite_at_the_vp_data_end(name):
    """At t = 1 a VP path has sigma = 0 and sigma' = -inf, but (sigma^2)'/2 = -(alpha^2)'/2 is finite:
    -beta_min/2 for the linear-beta path, and N log(1 - beta_start)/2 ~ -0.05 for DDPM (the Hermite slope at
    the t = 1 knot is log(alphas_cumprod[0]) - 0 per timestep, and d tau/dt = -N)."""
    sched = SCHEDULERS[name]()
    one = torch.tensor([1.0], dtype=F64)
    want = -0.1 / 2 if name == "vp" else 1000 * math.log(1 - 1e-4) / 2
    assert sched.sigma_d_sigma(one).item() == pytest.approx(want, rel=1e-12)
    assert not torch.isfinite(sched.d_sigma(one)).all()  # the reason sigma_d_sigma exists


# --- 2. SNR and its inverse ----------------------------------------------------------------------


@ALL
def test_snr_inverse_round_trip(name):
    sched = SCHEDULERS[name]()
    torch.testing.assert_close(sched.snr_inverse(sched.snr(INTERIOR)), INTERIOR, rtol=0, atol=1e-9)


@ALL
def test_t_of_log_snr_round_trip(name):
    sched = SCHEDULERS[name]()
    torch.testing.assert_close(sched.t_of_log_snr(sched.log_snr(INTERIOR)), INTERIOR, rtol=0, atol=1e-9)


@ALL
def test_log_snr_is_log_alpha_over_sigma_and_strictly_increasing(name):
    sched = SCHEDULERS[name]()
    t = torch.linspace(0.0, 1.0, 20_001, dtype=F64)[1:-1]  # 20 points per DDPM timestep
    lam = sched.log_snr(t)
    torch.testing.assert_close(lam, torch.log(sched.alpha(t) / sched.sigma(t)), rtol=1e-12, atol=1e-12)
    assert (lam.diff() > 0).all()


# --- 3. boundary values --------------------------------------------------------------------------

ZERO, ONE = torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64)


@pytest.mark.parametrize("name", ["condot", "cosine"])
def test_fm_paths_run_exactly_from_noise_to_data(name):
    sched = SCHEDULERS[name]()
    assert (sched.alpha(ZERO).item(), sched.sigma(ZERO).item()) == (0.0, 1.0)
    assert (sched.alpha(ONE).item(), sched.sigma(ONE).item()) == (1.0, 0.0)


def test_vp_linear_boundary_values():
    sched = VPLinear(0.1, 20.0)
    b, B = 0.1, 20.0
    t0 = (B - b) / 2 + b  # T(0) = (1-0)^2 (B-b)/2 + (1-0) b = 10.05
    assert sched.alpha(ZERO).item() == pytest.approx(math.exp(-t0 / 2), rel=1e-12)
    assert sched.sigma(ZERO).item() == pytest.approx(math.sqrt(1 - math.exp(-t0)), rel=1e-12)
    assert (sched.alpha(ONE).item(), sched.sigma(ONE).item()) == (1.0, 0.0)


def test_vp_discrete_hits_alphas_cumprod_at_integer_timesteps():
    sched = VPDiscrete.ddpm_linear()
    n = sched.num_timesteps
    k = torch.arange(n, dtype=F64)
    t_k = sched.time_of_timestep(k)
    torch.testing.assert_close(t_k, (n - 1 - k) / n, rtol=0, atol=1e-15)  # t_k = (N-1-k)/N
    torch.testing.assert_close(sched.timestep(t_k), k, rtol=0, atol=1e-9)
    torch.testing.assert_close(sched.alpha(t_k) ** 2, sched.alphas_cumprod, rtol=1e-13, atol=0)
    torch.testing.assert_close(sched.sigma(t_k) ** 2, 1 - sched.alphas_cumprod, rtol=1e-13, atol=0)
    assert (sched.alpha(ONE).item(), sched.sigma(ONE).item()) == (1.0, 0.0)


def test_ve_boundary_values():
    sched = VE(sigma_min=0.01, sigma_max=50.0)
    assert sched.sigma(ZERO).item() == pytest.approx(50.0, rel=1e-13)
    assert sched.sigma(ONE).item() == pytest.approx(0.01, rel=1e-13)
    assert sched.alpha(ZERO).item() == sched.alpha(ONE).item() == 1.0


def test_edm_boundary_values():
    sched = EDM()
    assert sched.sigma(ZERO).item() == pytest.approx(80.0, rel=1e-13)
    assert sched.sigma(ONE).item() == pytest.approx(0.002, rel=1e-13)
    assert sched.alpha(ZERO).item() == sched.alpha(ONE).item() == 1.0


# --- 4. the DDPM schedule against diffusers ------------------------------------------------------


def test_ddpm_linear_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.DDPMScheduler(beta_schedule="linear").alphas_cumprod.to(F64)
    sched = VPDiscrete.ddpm_linear()
    assert sched.num_timesteps == reference.numel() == 1000
    # diffusers builds betas with linspace and takes the cumulative product of 1000 factors in float32
    # (eps 6e-8 per rounding, accumulating like a random walk): its values are ~2.5e-7 off the float64 ones
    # (measured). 1e-6 absolute is well above that and far below any schedule mistake (e.g. an off-by-one in
    # the timestep is ~1e-2 at the noise end).
    torch.testing.assert_close(sched.alphas_cumprod, reference, rtol=0, atol=1e-6)
    k = torch.arange(1000, dtype=F64)
    torch.testing.assert_close(sched.alpha(sched.time_of_timestep(k)) ** 2, reference, rtol=0, atol=1e-6)


# --- 5. scale-time map between schedulers (Thm 2.3) ----------------------------------------------

PAIRS = pytest.mark.parametrize(
    "source,target", [("condot", "cosine"), ("cosine", "condot"), ("condot", "vp"), ("vp", "cosine")]
)
R = torch.linspace(0.02, 0.98, 49, dtype=F64)


@PAIRS
@pytest.mark.parametrize("part", ["t", "s"])
def test_scale_time_derivatives_match_finite_differences(source, target, part):
    src, tgt = SCHEDULERS[source](), SCHEDULERS[target]()
    value = lambda r: getattr(scale_time(src, tgt, r), part)
    exact = getattr(scale_time(src, tgt, R), f"d{part}")
    assert_close_scaled(exact, central_difference(value, R), 1e-7, f"{source}->{target} d{part}")


@PAIRS
def test_scale_time_maps_the_source_path_onto_the_target(source, target):
    """alpha_bar(r) = s_r alpha(t_r) and sigma_bar(r) = s_r sigma(t_r): the SNR match and the scale."""
    src, tgt = SCHEDULERS[source](), SCHEDULERS[target]()
    st = scale_time(src, tgt, R)
    assert ((st.t > 0) & (st.t < 1)).all() and (st.dt > 0).all() and (st.s > 0).all()
    torch.testing.assert_close(st.s * src.alpha(st.t), tgt.alpha(R), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(st.s * src.sigma(st.t), tgt.sigma(R), rtol=1e-12, atol=1e-14)


class ScaledCondOT(Scheduler):
    """(alpha_bar, sigma_bar) = (r, sigma0 (1 - r)): the [BNS] preconditioner of spec §1.5's worked example.
    Only alpha, sigma and their derivatives are given: log_snr and its inverse come from the base class."""

    def __init__(self, sigma0: float):
        self.sigma0 = sigma0

    def alpha(self, r):
        return torch.as_tensor(r, dtype=F64).clone()

    def sigma(self, r):
        return self.sigma0 * (1.0 - torch.as_tensor(r, dtype=F64))

    def d_alpha(self, r):
        return torch.ones_like(torch.as_tensor(r, dtype=F64))

    def d_sigma(self, r):
        return torch.full_like(torch.as_tensor(r, dtype=F64), -self.sigma0)


def test_scale_time_worked_example_of_the_spec():
    sigma0 = 5.0
    r = torch.linspace(0.0, 1.0, 21, dtype=F64)  # closed interval: the formulas hold at both ends
    st = scale_time(CondOT(), ScaledCondOT(sigma0), r)
    q = r + sigma0 * (1 - r)
    tol = dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(st.t, r / q, **tol)
    torch.testing.assert_close(st.s, q, **tol)
    torch.testing.assert_close(st.dt, sigma0 / q**2, **tol)
    torch.testing.assert_close(st.ds, torch.full_like(r, 1 - sigma0), **tol)


# --- 6. Thm 2.3 on the exact Gaussian-mixture flow ------------------------------------------------


@pytest.mark.parametrize("source,target", [("condot", "cosine"), ("cosine", "condot"), ("condot", "vp")])
def test_ideal_trajectories_are_scale_time_transforms_of_each_other(source, target):
    src_flow = bespoke.load_model("zoo:gmm2d", path=source)
    tgt_flow = bespoke.load_model("zoo:gmm2d", path=target)
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    r = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 1.0], dtype=F64)
    st = scale_time(src_flow.scheduler, tgt_flow.scheduler, r)
    start = scale_time(src_flow.scheduler, tgt_flow.scheduler, torch.tensor(0.0, dtype=F64))

    # Where does the target trajectory start? Thm 2.3 says x_target(r) = s_r x_src(t_r) for all r, so at r = 0
    # it is s_0 x_src(t_0) with t_0 = rho^{-1}(rho_bar(0)). Between CondOT and Cosine both paths start exactly
    # at noise (alpha_0 = 0, sigma_0 = 1), so t_0 = 0, s_0 = 1 and the same x0 starts both. The VP path does
    # not reach SNR 0: alpha_bar(0) = exp(-10.05/2) ~ 0.0066, so t_0 ~ 0.0065 > 0 and s_0 ~ 1.0066; the CondOT
    # trajectory must first be run from 0 to t_0, and the VP one started from s_0 x_OT(t_0). (Starting VP from
    # x0 itself is a different trajectory: it misses by ~2e-4, far above the 1e-6 tolerance.)
    if source in ("condot", "cosine") and target in ("condot", "cosine"):
        assert start.t.item() == 0.0 and start.s.item() == 1.0
    src_times = st.t if start.t.item() == 0.0 else torch.cat([start.t.reshape(1), st.t])
    src_states = bespoke.ground_truth(src_flow, x0, rtol=1e-10, atol=1e-10, times=src_times).states
    x_start = x0 if start.t.item() == 0.0 else start.s * src_states[0]
    x_src = src_states[-len(r) :]  # x_src(t_r)

    x_tgt = bespoke.ground_truth(tgt_flow, x_start, rtol=1e-10, atol=1e-10, times=r).states  # x_target(r)
    torch.testing.assert_close(x_tgt, st.s[:, None, None] * x_src, rtol=0, atol=1e-6)
