"""k-diffusion-style sampling (`bespoke.integrations.kdiffusion`) on an exact Gaussian-mixture denoiser, in float64.

The denoiser is the posterior mean D(x, sigma) = E[x1 | x1 + sigma eps = x] of the zoo:gmm2d mixture (closed
form), called the k-diffusion way: model(x, sigma * s_in, **extra_args).
"""

import pytest
import torch

import bespoke
from bespoke import BespokeError
from bespoke.flows import velocity_from_prediction
from bespoke.integrations.kdiffusion import edm_flow, sample_bns
from bespoke.paths import EDM
from bespoke.zoo.gmm import gmm2d_mixture

F64 = torch.float64
SMAX = 80.0


def gmm_denoiser(mixture, calls=None):
    """E[x1 | x] for x = x1 + sigma eps, x1 ~ sum_k pi_k N(mu_k, s_k^2 I): a mixture of per-component means."""

    def model(x, sigma, *, scale=1.0):
        if calls is not None:
            calls.append((tuple(sigma.shape), sigma.dtype, scale))
        v = mixture.stds.to(x) ** 2 + sigma.to(x)[:, None] ** 2  # (B, K)
        diff = x[:, None, :] - mixture.means.to(x)[None]  # (B, K, d)
        logp = torch.log(mixture.weights.to(x))[None] - 0.5 * ((diff * diff).sum(-1) / v + x.shape[1] * torch.log(v))
        w = torch.softmax(logp, -1)
        post = mixture.means.to(x)[None] + (mixture.stds.to(x) ** 2)[None, :, None] / v[:, :, None] * diff
        return scale * (w[:, :, None] * post).sum(1)

    return model


@pytest.fixture(scope="module")
def model():
    return gmm_denoiser(gmm2d_mixture())


@pytest.fixture(scope="module")
def x():
    return bespoke.draw_noise((2,), 32, seed=5, dtype=F64) * SMAX


def karras(n: int, rho: float = 7.0, sigma_min: float = 0.0) -> torch.Tensor:
    """n + 1 noise levels of the EDM path at the uniform canonical grid (k-diffusion's get_sigmas_karras)."""
    return EDM(sigma_min, SMAX, rho).sigma(torch.linspace(0.0, 1.0, n + 1, dtype=F64))


def close(a, b, tol=1e-10):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("name, nfe", [("euler", 8), ("dpm++2m", 8), ("ipndm", 6), ("heun", 8), ("edm-heun", 7)])
def test_builtin_solver_matches_its_sample_on_edm_flow(model, x, name, nfe):
    s = bespoke.solver(name, nfe)
    ref = s.sample(edm_flow(model, SMAX, sample_shape=(2,)), x)
    out = sample_bns(model, x, karras(nfe), solver=s, disable=True)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert torch.isfinite(out).all() and close(out, ref)
    assert close(sample_bns(model, x, karras(nfe), solver=name, disable=True), ref)  # built-in by name


def test_bns_solver_and_solver_file(model, x, tmp_path):
    flow = edm_flow(model, SMAX, sample_shape=(2,))
    bns = bespoke.BNSSolver.from_solver(bespoke.solver("ipndm", 6), flow)
    with torch.no_grad():  # not just iPNDM any more
        bns.a.mul_(1.01)
        bns.b.mul_(0.99)
    ref = bns.sample(flow, x)
    assert close(sample_bns(model, x, karras(6), solver=bns, disable=True), ref)
    path = tmp_path / "b.safetensors"
    bespoke.save_solvers(path, [bns], flow)
    assert close(sample_bns(model, x, karras(6), solver=str(path), disable=True), ref)
    with pytest.raises(BespokeError, match="no solver for NFE 8; it has NFE 6"):
        sample_bns(model, x, karras(8), solver=path, disable=True)
    with pytest.raises(BespokeError, match=r"trained on the path EDM\(sigma_min=0.0, sigma_max=80.0, rho=7.0\)"):
        sample_bns(model, x, karras(6) * 0.5, solver=path, disable=True)  # another sigma_max


def test_a_guided_solver_runs_at_the_scale_given_or_the_cond_scale(model, x):
    """A guided solver's NS form at guidance_scale= (or extra_args' cond_scale, k-diffusion's CFG convention)."""
    from bespoke.solvers.guided import GuidedBNSSolver

    flow = edm_flow(model, SMAX, sample_shape=(2,))
    low = bespoke.BNSSolver.from_solver(bespoke.solver("ipndm", 6), flow)
    high = bespoke.BNSSolver.from_solver(bespoke.solver("dpm++2m", 6), flow)
    guided = GuidedBNSSolver.from_anchors({1.0: low, 5.0: high}, "diffusers")
    ref = guided.at_scale(2.0).sample(flow, x)

    def cfg(x, sigma, *, cond_scale):  # a CFG wrapper's signature; the analytic model has no condition
        return model(x, sigma)

    out = sample_bns(model, x, karras(6), solver=guided, guidance_scale=2.0, disable=True)
    assert close(out, ref)
    assert close(sample_bns(cfg, x, karras(6), solver=guided, extra_args={"cond_scale": 2.0}, disable=True), ref)
    with pytest.raises(BespokeError, match=r"serves guidance scales \[1, 5\]"):
        sample_bns(model, x, karras(6), solver=guided, disable=True)
    with pytest.raises(BespokeError, match="not 9"):
        sample_bns(model, x, karras(6), solver=guided, guidance_scale=9.0, disable=True)


@pytest.mark.parametrize("order", [1, 2])
def test_bespoke_solver(model, x, order):
    flow = edm_flow(model, SMAX, sample_shape=(2,))
    bes = bespoke.BespokeSolver.identity(order, 8)
    with torch.no_grad():
        bes.log_s.add_(0.05 * torch.sin(torch.arange(bes.log_s.numel(), dtype=F64)))  # a non-trivial scale
    assert close(sample_bns(model, x, karras(8), solver=bes, disable=True), bes.sample(flow, x))


def kdiffusion_euler(model, x, sigmas):
    """k-diffusion's sample_euler (s_churn = 0): x += (x - D)/sigma * (sigma_next - sigma)."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        d = (x - model(x, sigmas[i] * s_in)) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def test_time_conventions_against_kdiffusion_euler(model, x):
    # rho = 1: sigma is linear in t, so Euler in t on the uniform grid is Euler in sigma on the same sigmas
    assert bespoke.solver("euler", 8).grid_name == "uniform"
    lin = karras(8, rho=1.0)
    assert close(
        sample_bns(model, x, lin, solver=bespoke.solver("euler", 8), rho=1.0, disable=True),
        kdiffusion_euler(model, x, lin),
    )
    # rho = 7: DDIM on the EDM path (alpha = 1) is exactly Euler in sigma, on Karras' sigmas
    sig = karras(8, sigma_min=0.002)
    assert close(sample_bns(model, x, sig, solver="ddim", disable=True), kdiffusion_euler(model, x, sig))


def test_velocity_is_the_x1_adapter_and_zero_at_the_data(model, x):
    flow = edm_flow(model, SMAX, extra_args={"scale": 1.0})
    t = torch.tensor([0.0, 0.3, 0.9, 0.999], dtype=F64).repeat(8)
    sigma = flow.scheduler.sigma(t)
    expected = velocity_from_prediction("x1", model(x, sigma), x, t, flow.scheduler)
    assert close(flow(t, x), expected, 1e-12)
    assert torch.equal(flow(1.0, x), torch.zeros_like(x))  # sigma = sigma' = 0 at t = 1 (rho = 7)
    with pytest.raises(BespokeError, match="rho = 1"):
        edm_flow(model, SMAX, rho=1.0)(1.0, x)


def test_callback_progress_bar_and_model_call(x, capsys):
    calls, seen = [], []
    model = gmm_denoiser(gmm2d_mixture(), calls)
    out = sample_bns(
        model, x, karras(8), extra_args={"scale": 1.0}, callback=seen.append, disable=True, solver="dpm++2m"
    )
    assert capsys.readouterr().err == ""
    assert len(seen) == 8 == len(calls)
    assert all(set(c) == {"x", "i", "sigma", "sigma_hat", "denoised"} for c in seen)
    assert [c["i"] for c in seen] == list(range(8))
    sig = [c["sigma"].item() for c in seen]
    assert sig[0] == pytest.approx(SMAX) and all(a > b > 0 for a, b in zip(sig, sig[1:]))
    assert all(torch.equal(c["sigma"], c["sigma_hat"]) and c["denoised"].shape == x.shape for c in seen)
    assert all(shape == (x.shape[0],) and dtype == F64 and scale == 1.0 for shape, dtype, scale in calls)
    assert torch.isfinite(out).all()
    sample_bns(model, x, karras(8), disable=False, solver="euler")
    assert "8/8" in capsys.readouterr().err


def test_float32_state(model, x):
    out = sample_bns(model, x.float(), karras(8).float(), solver="dpm++2m", disable=True)
    ref = sample_bns(model, x, karras(8), solver="dpm++2m", disable=True)
    assert out.dtype == torch.float32 and (out.double() - ref).abs().max() < 1e-3


def test_converges_to_ground_truth(model, x):
    gt = bespoke.ground_truth(edm_flow(model, SMAX, sample_shape=(2,)), x, rtol=1e-8, atol=1e-8).samples

    def error(name, nfe):  # median over samples: a sample near a boundary between modes converges late
        return (sample_bns(model, x, karras(nfe), solver=name, disable=True) - gt).norm(dim=1).median().item()

    euler = [error("euler", n) for n in (8, 16, 64)]
    assert euler[0] > euler[1] > euler[2] and euler[2] < 0.25 * euler[0]
    assert error("heun", 64) < 0.3 * euler[2]  # second order, same NFE


def test_bad_arguments(model, x):
    with pytest.raises(BespokeError, match="solver="):
        sample_bns(model, x, karras(8), disable=True)
    with pytest.raises(BespokeError, match="decreasing sigmas"):
        sample_bns(model, x, karras(8).flip(0), solver="euler", disable=True)
    with pytest.raises(BespokeError, match="1-D"):
        sample_bns(model, x, torch.tensor([80.0]), solver="euler", disable=True)
    with pytest.raises(BespokeError, match="unknown solver"):
        sample_bns(model, x, karras(8), solver="nope", disable=True)


def test_gt_pairs_start_from_noise_times_sigma_max_and_train_a_solver_for_sample_bns(model, tmp_path):
    """edm_flow's noise_scale is sigma_max: generate_gt draws k-diffusion's initial states, so a BNS solver
    trained on its pairs is one sample_bns runs."""
    import warnings

    flow = edm_flow(model, SMAX, sample_shape=(2,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a callable has no fingerprint to record
        pairs = bespoke.generate_gt(flow, tmp_path / "gt", num=48, shard_size=48, quiet=True)
    unit = bespoke.draw_noise((2,), 48, seed=0, dtype=F64)
    assert torch.equal(pairs.noise, unit * SMAX)
    config = bespoke.FitConfig(iterations=4, batch_size=16, val_every=2)
    bns = bespoke.train_bns(flow, pairs.slice(16), pairs.slice(0, 16), 4, config=config, quiet=True)
    x = pairs.noise[:16]
    assert close(sample_bns(model, x, karras(4), solver=bns, disable=True), bns.sample(flow, x))
    assert bespoke.psnr(bns.sample(flow, x), pairs.samples[:16]) > 10  # pairs and solver agree on the start
