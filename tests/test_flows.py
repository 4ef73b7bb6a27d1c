"""The model-adapter layer: parameterisation conversions (spec §1.3, [BNS] Table 1), networks as flows,
classifier-free guidance, NFE counting and the errors bad input gets.

The reference is the Gaussian-mixture oracle: its posterior means E[x1 | x], E[x0 | x] are recomputed here,
independently of bespoke, so that adapters are checked against the mathematics and not against themselves.
"""

import math

import pytest
import torch

import bespoke
from bespoke import BespokeError, Guidance
from bespoke.flows import prediction_from_velocity, scale_time_flow, velocity_from_prediction
from bespoke.paths import SCHEDULERS, CondOT, Cosine, VPDiscrete
from bespoke.zoo import gmm_flow
from bespoke.zoo.gmm import gmm2d_mixture

F64 = torch.float64

ALL = pytest.mark.parametrize("name", list(SCHEDULERS))
KINDS = pytest.mark.parametrize("kind", ["eps", "x1", "v"])
B = 64
T = torch.linspace(0.02, 0.98, B, dtype=F64)  # one time per sample
LABELS = torch.arange(B) % 3  # classes 0, 1, 2; the null label is 3


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def per_sample(c, like):
    return c.reshape(-1, *([1] * (like.dim() - 1)))


def posterior_means(mixture, sched, t, x, labels=None):
    """E[x1 | x_t = x] and E[x0 | x_t = x] for the mixture, from Bayes' rule (module docstring of zoo/gmm.py).

    Given component k, x = alpha x1 + sigma x0 is N(alpha mu_k, v_k I) with v_k = alpha^2 s_k^2 + sigma^2, and
    E[x1 | x, k] = mu_k + alpha s_k^2 (x - alpha mu_k) / v_k,  E[x0 | x, k] = sigma (x - alpha mu_k) / v_k.
    """
    a, s = sched.alpha(t)[:, None], sched.sigma(t)[:, None]  # (B, 1)
    mu, var = mixture.means, mixture.stds**2  # (K, d), (K,)
    v = a * a * var + s * s  # (B, K)
    resid = x[:, None, :] - a[:, :, None] * mu  # (B, K, d)
    d = x.shape[1]
    logp = torch.log(mixture.weights) - 0.5 * (resid.pow(2).sum(-1) / v + d * torch.log(2 * math.pi * v))
    if labels is not None:
        allowed = (mixture.classes == labels[:, None]) | (labels[:, None] == mixture.null_label)
        logp = logp.masked_fill(~allowed, -math.inf)
    w = torch.softmax(logp, -1)[:, :, None]  # p(k | x)
    x1 = (w * (mu + (a * var)[:, :, None] * resid / v[:, :, None])).sum(1)
    x0 = (w * s[:, :, None] * resid / v[:, :, None]).sum(1)
    return x1, x0


# --- 7. conversions between parameterisations ----------------------------------------------------


@ALL
@KINDS
def test_prediction_velocity_round_trip(name, kind):
    sched = SCHEDULERS[name]()
    x, f = randn(B, 3, 4, seed=1), randn(B, 3, 4, seed=2)
    u = velocity_from_prediction(kind, f, x, T, sched)
    torch.testing.assert_close(prediction_from_velocity(kind, u, x, T, sched), f, rtol=1e-10, atol=1e-10)


@ALL
@KINDS
def test_adapter_satisfies_the_path_identities(name, kind):
    """x = alpha x1 + sigma eps and u = alpha' x1 + sigma' eps (spec §1.3), v = alpha eps - sigma x1.

    Unlike the round trip, this fails if a coefficient is wrong in both directions, or if the per-sample
    times are applied to the wrong samples."""
    sched = SCHEDULERS[name]()
    x1, eps = randn(B, 3, 4, seed=3), randn(B, 3, 4, seed=4)
    a, s, da, ds = (per_sample(c(T), x1) for c in (sched.alpha, sched.sigma, sched.d_alpha, sched.d_sigma))
    x, u = a * x1 + s * eps, da * x1 + ds * eps
    f = {"eps": eps, "x1": x1, "v": a * eps - s * x1}[kind]
    torch.testing.assert_close(velocity_from_prediction(kind, f, x, T, sched), u, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(prediction_from_velocity(kind, u, x, T, sched), f, rtol=1e-10, atol=1e-10)


# --- 8. consistency with the oracle --------------------------------------------------------------


@pytest.mark.parametrize("name", ["condot", "cosine", "vp", "vp-discrete"])
def test_oracle_predictions_are_the_posterior_means(name):
    sched = SCHEDULERS[name]()
    mixture = gmm2d_mixture()
    flow = gmm_flow(mixture, sched)
    x = randn(B, 2, seed=5)
    u = flow(T, x)
    x1_hat, eps_hat = flow.predict("x1", T, x, u), flow.predict("eps", T, x, u)
    a, s = sched.alpha(T)[:, None], sched.sigma(T)[:, None]
    torch.testing.assert_close(a * x1_hat + s * eps_hat, x, rtol=1e-10, atol=1e-10)
    x1_ref, eps_ref = posterior_means(mixture, sched, T, x)
    torch.testing.assert_close(x1_hat, x1_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(eps_hat, eps_ref, rtol=1e-10, atol=1e-10)


def test_oracle_labels_restrict_the_mixture_to_their_class():
    """u(x | y) = alpha' E[x1 | x, y] + sigma' E[x0 | x, y] over class y's components; the null label is all."""
    sched, mixture = Cosine(), gmm2d_mixture()
    flow = gmm_flow(mixture, sched)
    x = randn(B, 2, seed=14)
    da, ds = sched.d_alpha(T)[:, None], sched.d_sigma(T)[:, None]
    for labels in (LABELS, torch.full_like(LABELS, mixture.null_label)):
        x1, x0 = posterior_means(mixture, sched, T, x, labels)
        torch.testing.assert_close(flow(T, x, labels=labels), da * x1 + ds * x0, rtol=1e-10, atol=1e-10)
    unconditional = flow(T, x, labels=torch.full_like(LABELS, mixture.null_label))
    torch.testing.assert_close(unconditional, flow(T, x), rtol=0, atol=0)


class OracleEpsNet(torch.nn.Module):
    """A 'trained' eps-prediction network: the exact posterior mean of the noise, at the network's own time."""

    def __init__(self, sched, net_time_to_t):
        super().__init__()
        self.sched, self.to_t, self.mixture = sched, net_time_to_t, gmm2d_mixture()
        self.received = []

    def forward(self, x, time):
        self.received.append(time.clone())
        return posterior_means(self.mixture, self.sched, self.to_t(time.to(F64)), x)[1]


def test_eps_network_on_canonical_time_gives_the_oracle_velocity():
    sched = Cosine()
    net = OracleEpsNet(sched, lambda time: time)
    flow = bespoke.from_network(net, prediction="eps", scheduler=sched, time_input="canonical")
    x = randn(B, 2, seed=6)
    torch.testing.assert_close(flow(T, x), gmm_flow(gmm2d_mixture(), sched)(T, x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(net.received[-1], T, rtol=0, atol=0)


def test_eps_network_on_ddpm_timesteps_gives_the_oracle_velocity():
    sched = VPDiscrete.ddpm_linear()
    n = sched.num_timesteps
    net = OracleEpsNet(sched, sched.time_of_timestep)
    flow = bespoke.from_network(net, prediction="eps", scheduler=sched, time_input="timestep")
    assert flow.ode_end == pytest.approx((n - 1) / n)  # timestep 0
    # t = 0 is timestep 999, t = 0.5 is 499, 0.25037 is a fractional timestep; 0.999 is timestep 0
    t = torch.tensor([0.0, 0.25037, 0.5, 0.75, 0.9, 0.999], dtype=F64)
    x = randn(len(t), 2, seed=7)
    torch.testing.assert_close(flow(t, x), gmm_flow(gmm2d_mixture(), sched)(t, x), rtol=1e-10, atol=1e-10)
    want = torch.tensor([999.0, 748.63, 499.0, 249.0, 99.0, 0.0], dtype=F64)  # tau = (N-1) - t N
    torch.testing.assert_close(net.received[-1], want, rtol=0, atol=1e-9)
    # past the smallest training timestep the network is held at timestep 0 (never fed negative timesteps);
    # t = 1 itself is excluded: there sigma' = -inf and an eps model has no finite velocity
    flow(torch.tensor([0.9995, 0.99999], dtype=F64), x[:2])
    assert net.received[-1].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("source,target", [("condot", "cosine"), ("cosine", "condot"), ("condot", "vp")])
def test_scale_time_flow_is_the_oracle_of_the_target_path(source, target):
    """Thm 2.3 at the velocity level: the ST-transformed ideal field is the ideal field of the target path."""
    src = bespoke.load_model("zoo:gmm2d", path=source)
    tgt = bespoke.load_model("zoo:gmm2d", path=target)
    moved = scale_time_flow(src, tgt.scheduler)
    x = randn(B, 2, seed=8)
    torch.testing.assert_close(moved(T, x), tgt(T, x), rtol=1e-10, atol=1e-10)
    assert src.nfe == 1 and moved.nfe == 1  # one NFE of u_bar is one of u


# --- 9. classifier-free guidance -----------------------------------------------------------------


@pytest.mark.parametrize("convention,w", [("fm", 0.0), ("fm", 1.5), ("diffusers", 1.0), ("diffusers", 4.0)])
def test_guided_gmm_velocity_is_the_named_combination(convention, w):
    mixture = gmm2d_mixture()
    assert mixture.null_label == mixture.num_classes == 3
    flow = gmm_flow(mixture)
    guided = gmm_flow(mixture, guidance=Guidance(w, convention=convention, null={"labels": mixture.null_label}))
    x = randn(B, 2, seed=9)
    cond = flow(T, x, labels=LABELS)
    uncond = flow(T, x, labels=torch.full_like(LABELS, mixture.null_label))
    assert (cond - uncond).abs().max() > 0.1  # the labels matter, so the test can tell the formulas apart
    want = (1 + w) * cond - w * uncond if convention == "fm" else uncond + w * (cond - uncond)
    torch.testing.assert_close(guided(T, x, labels=LABELS), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("w_fm", [0.0, 0.5, 2.0])
def test_guidance_conventions_agree_when_w_diffusers_is_one_plus_w_fm(w_fm):
    fm = bespoke.load_model("zoo:gmm2d", guidance=Guidance(w_fm, convention="fm", null={"labels": 3}))
    df = bespoke.load_model("zoo:gmm2d", guidance=Guidance(1 + w_fm, convention="diffusers", null={"labels": 3}))
    x = randn(B, 2, seed=10)
    torch.testing.assert_close(fm(T, x, labels=LABELS), df(T, x, labels=LABELS), rtol=1e-12, atol=1e-12)


class CountingNet(torch.nn.Module):
    """A velocity network that records each call; its output depends on x, t and the label."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, labels):
        self.calls.append((x.clone(), t.clone(), labels.clone()))
        return torch.sin(x) * (1.0 + labels[:, None].to(x.dtype)) + t[:, None]


def test_network_guidance_batches_the_pair_into_one_call():
    net = CountingNet()
    null = 10
    flow = bespoke.from_network(
        net, prediction="velocity", scheduler=CondOT(), guidance=Guidance(2.0, convention="fm", null={"labels": null})
    )
    x, labels = randn(8, 2, seed=11), torch.arange(8)
    t = torch.linspace(0.1, 0.8, 8, dtype=F64)
    u = flow(t, x, labels=labels)
    assert len(net.calls) == 1 and flow.nfe == 1
    xs, ts, ls = net.calls[0]
    assert xs.shape == (16, 2)
    torch.testing.assert_close(xs, torch.cat([x, x]), rtol=0, atol=0)
    torch.testing.assert_close(ts, torch.cat([t, t]), rtol=0, atol=0)
    assert ls.tolist() == labels.tolist() + [null] * 8
    cond, uncond = net(x, t, labels), net(x, t, torch.full_like(labels, null))
    torch.testing.assert_close(u, 3.0 * cond - 2.0 * uncond, rtol=1e-12, atol=1e-12)
    flow(t, x, labels=labels)
    assert len(net.calls) == 1 + 2 + 1 and flow.nfe == 2  # (+2: the reference calls just above)


# --- 10. NFE counting ----------------------------------------------------------------------------


def test_nfe_counter_counts_every_evaluation():
    flow = bespoke.load_model("zoo:gmm2d")
    x = randn(4, 2, seed=12)
    assert flow.nfe == 0
    for _ in range(3):
        flow(0.5, x)
    assert flow.nfe == 3
    with flow.counting() as outer:
        flow(0.1, x)
        with flow.counting() as inner:
            flow(0.2, x)
            flow(0.3, x)
            assert inner.nfe == 2  # live inside the block
        flow(0.4, x)
    flow(0.5, x)  # after the blocks: not counted by them
    assert (outer.nfe, inner.nfe, flow.nfe) == (4, 2, 8)


def test_ground_truth_reports_the_nfe_the_flow_counted():
    flow = bespoke.load_model("zoo:gmm2d")
    flow(0.5, randn(4, 2, seed=13))
    gt = bespoke.ground_truth(flow, randn(4, 2, seed=13))
    assert gt.nfe > 10 and flow.nfe == 1 + gt.nfe


# --- 11. bad input -------------------------------------------------------------------------------


def test_misspelt_model_keyword_names_it_and_the_valid_ones():
    flow = bespoke.load_model("zoo:gmm2d")
    with pytest.raises(BespokeError, match=r"unknown model keyword 'lables'.*takes labels"):
        flow(0.5, randn(4, 2), lables=torch.zeros(4, dtype=torch.long))


def test_network_with_var_kwargs_needs_cond_keys():
    def net(x, t, **kwargs):
        return x

    with pytest.raises(BespokeError, match=r"\*\*kwargs.*cond_keys"):
        bespoke.from_network(net, prediction="velocity", scheduler=CondOT())
    flow = bespoke.from_network(net, prediction="velocity", scheduler=CondOT(), cond_keys=("labels",))
    assert flow.cond_keys == ("labels",)  # named explicitly, it is accepted


def test_condition_with_the_wrong_batch_size():
    flow = bespoke.load_model("zoo:gmm2d")
    with pytest.raises(BespokeError, match=r"'labels'.*batch size 4.*\(3,\)"):
        flow(0.5, randn(4, 2), labels=torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("guidance", [Guidance(0.0, "fm", {"labels": 10}), Guidance(1.0, "diffusers", {"labels": 10})])
def test_a_weight_that_makes_guidance_the_conditional_output_skips_the_unconditional_pass(guidance):
    """w = 0 (fm) or w = 1 (diffusers) is the conditional velocity: one network call on the batch itself (the
    digit models load this way; before, every call ran the network on twice the batch and threw half away)."""
    net = CountingNet()
    flow = bespoke.from_network(net, prediction="velocity", scheduler=CondOT(), guidance=guidance)
    x, labels, t = randn(8, 2, seed=12), torch.arange(8), torch.full((8,), 0.3, dtype=F64)
    u = flow(t, x, labels=labels)
    assert len(net.calls) == 1 and net.calls[0][0].shape == (8, 2)
    torch.testing.assert_close(u, net(x, t, labels), rtol=0, atol=0)
    with pytest.raises(BespokeError, match=r"guidance.*needs the condition labels"):
        flow(t, x)


def test_guidance_without_labels():
    flow = bespoke.load_model("zoo:gmm2d", guidance=Guidance(1.0, convention="fm", null={"labels": 3}))
    with pytest.raises(BespokeError, match=r"guidance.*needs the condition labels"):
        flow(0.5, randn(4, 2))


def test_unknown_guidance_convention_lists_both():
    with pytest.raises(BespokeError, match="unknown guidance convention 'cfg'") as info:
        Guidance(1.0, convention="cfg")
    assert "'fm'" in str(info.value) and "'diffusers'" in str(info.value)


def test_unknown_prediction_type_lists_the_valid_ones():
    with pytest.raises(BespokeError, match=r"unknown prediction type 'score'; valid: eps, x1, v, velocity"):
        bespoke.from_network(lambda x, t: x, prediction="score", scheduler=CondOT())


@pytest.mark.parametrize("shape", [(4, 3), (4, 2, 1), (2,)])
def test_noise_of_the_wrong_shape_shows_the_expected_one(shape):
    flow = bespoke.load_model("zoo:gmm2d")
    with pytest.raises(BespokeError, match=r"takes \(batch, 2\).*torch\.randn\(batch, 2\)"):
        bespoke.ground_truth(flow, randn(*shape))


def test_non_finite_velocity_is_an_error():
    flow = bespoke.from_network(lambda x, t: x * math.nan, prediction="velocity", scheduler=CondOT(), name="broken")
    with pytest.raises(BespokeError, match=r"broken returned a non-finite velocity at t = 0\.5"):
        flow(0.5, randn(4, 2))


@pytest.mark.parametrize(
    "net, got",
    [
        (lambda x, t: x[:1], r"\(1, 2\)"),  # one sample for the batch: would broadcast silently
        (lambda x, t: x[:, :1], r"\(4, 1\)"),  # one coordinate: would broadcast too
        (lambda x, t: x.sum(1), r"\(4,\)"),
        (lambda x, t: torch.cat([x, x]), r"\(8, 2\)"),
    ],
)
def test_a_model_returning_the_wrong_shape_is_a_one_line_error(net, got):
    flow = bespoke.from_network(net, prediction="eps", scheduler=CondOT(), name="mynet", sample_shape=(2,))
    with pytest.raises(BespokeError, match=rf"mynet returned {got} for an input of shape \(4, 2\); .*eps prediction"):
        flow(0.5, randn(4, 2))
    bare = bespoke.Flow(lambda t, x: net(x, t), name="myfield")  # a velocity field given directly
    with pytest.raises(BespokeError, match=rf"myfield returned {got} .*velocity"):
        bare(0.5, randn(4, 2))


def test_a_guided_model_returning_one_half_of_the_pair_is_caught():
    net = lambda x, t, labels: x[: x.shape[0] // 2]  # noqa: E731  (ignores the batched null half)
    g = Guidance(2.0, "fm", {"labels": 10})
    flow = bespoke.from_network(net, prediction="velocity", scheduler=CondOT(), guidance=g, name="half")
    with pytest.raises(BespokeError, match=r"half returned \(4, 2\) for an input of shape \(8, 2\)"):
        flow(0.5, randn(4, 2), labels=torch.zeros(4, dtype=torch.long))


def test_autocast_flow_runs_the_network_in_bf16_and_keeps_the_state_dtype():
    from bespoke.flows import autocast_flow

    flow = bespoke.load_model("zoo:digits-ot")
    fast = autocast_flow(flow, "bf16")
    noise, labels = bespoke.draw_noise(flow.sample_shape, 4, 0, dtype=torch.float64), torch.arange(4)
    with torch.no_grad():
        full = bespoke.solver("midpoint", 4).sample(flow, noise, labels=labels)
        half = bespoke.solver("midpoint", 4).sample(fast, noise, labels=labels)
    assert half.dtype == torch.float64 and fast.fingerprint == flow.fingerprint
    assert 35 < bespoke.psnr(half, full) < 90  # bf16 rounding shows, but only just
    with pytest.raises(bespoke.BespokeError, match="bf16, fp16"):
        autocast_flow(flow, torch.float64)
