"""NFE-agnostic Bespoke solvers (solvers/bespoke_range.py): one continuous scale-time transform for a range of NFEs."""

import pytest
import torch

import bespoke
from bespoke.cli import main
from bespoke.solvers.adaptive import ground_truth
from bespoke.solvers.bespoke_range import BespokeRangeSolver, scale_curve, speed_curve
from bespoke.solvers.scale_time import BespokeSolver
from bespoke.train import generate_gt
from bespoke.train.bespoke import train_bespoke
from bespoke.train.loop import FitConfig
from bespoke.train.pairs import solver_psnr


@pytest.fixture(scope="module")
def pairs(flow, tmp_path_factory):
    gt = generate_gt(flow, tmp_path_factory.mktemp("gt"), num=160, shard_size=80, trajectory=17, quiet=True)
    return gt.slice(64, 160), gt.slice(0, 64)  # train, val


def randomised(s: BespokeRangeSolver, seed: int, size: float = 1.0) -> BespokeRangeSolver:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in s.parameters():
            p.copy_(size * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return s


@pytest.mark.parametrize("order", [1, 2])
def test_an_untrained_range_solver_is_the_base_method_on_the_uniform_grid_at_every_nfe(order, flow, noise):
    s = BespokeRangeSolver(order, (2, 12))
    assert s.valid_nfes() == list(range(2, 13, order))
    for n in s.valid_nfes():
        ours, theirs = s.at(n).sample(flow, noise), BespokeSolver.identity(order, n).sample(flow, noise)
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-12), (order, n)


@pytest.mark.parametrize("target", ["cosine", "vp"])
def test_a_change_of_path_start_matches_the_fixed_nfe_solvers_of_that_path(target, flow, noise):
    s = BespokeRangeSolver(2, (4, 16))
    s.set_row(0, flow, target)
    s.set_row(1, flow, target)
    for n in (4, 8, 16):
        fixed = BespokeSolver.from_path(flow, target, 2, n)
        assert (s.at(n).times() - fixed.times()).abs().max() < 3e-3, n  # t: least squares (vp: 1.8e-3 at NFE 8)
        gap = (s.at(n).transform().s - fixed.transform().s).abs()
        # s: exact at the knots; onto vp, (log s)' is infinite at r = 1, so the last segment is only close
        assert gap[: 7 * n // 8 + 1].max() < 1e-3 and gap.max() < 0.03, (n, gap)


@pytest.mark.parametrize("seed", range(12))
def test_the_curves_pin_their_ends_and_their_derivatives_are_exact(seed):
    s = randomised(BespokeRangeSolver(2, (2, 64), knots=1 + seed % 8), seed, size=1 + seed)
    g, h, slopes = s.row(2 + 2 * seed)
    r = torch.rand(50, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.98 + 0.01
    t, dt = speed_curve(g, r)
    sc, ds = scale_curve(h, slopes, r)
    eps = 1e-6
    fd = lambda f: (f(r + eps)[0] - f(r - eps)[0]) / (2 * eps)  # noqa: E731
    assert torch.allclose(dt, fd(lambda x: speed_curve(g, x)), rtol=1e-5, atol=1e-7)
    assert torch.allclose(ds, fd(lambda x: scale_curve(h, slopes, x)), rtol=1e-5, atol=1e-7)
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert speed_curve(g, ends)[0].tolist() == [0.0, 1.0] and scale_curve(h, slopes, ends)[0][0] == 1.0


@pytest.mark.parametrize("order", [1, 2])
def test_times_increase_strictly_at_every_nfe_for_random_parameters(order):
    for seed in range(20):
        s = randomised(BespokeRangeSolver(order, (2, 40), knots=1 + seed % 9), seed, size=1 + 2 * seed)
        s.validate()  # every NFE of the range: 0 = t_0 < ... < t_N = 1, t' > 0, s > 0
        for n in s.valid_nfes():
            v = s.at(n).transform()
            assert bool((torch.diff(v.t) > 0).all() and (v.dt > 0).all() and (v.s > 0).all()), (seed, n)


def test_the_solver_converges_at_its_base_methods_order_as_the_nfe_grows(flow, noise):
    """Thm 2.2 for the continuous transform: RK2 on a fixed smooth transform, NFE doubled -> error / ~4."""
    s = randomised(BespokeRangeSolver(2, (16, 256), knots=4), 5, size=0.3)
    s.log_speed.data[1] = s.log_speed.data[0]  # one transform at every NFE (the rows mix in log n otherwise)
    s.log_scale.data[1], s.scale_slope.data[1] = s.log_scale.data[0], s.scale_slope.data[0]
    exact = ground_truth(flow, noise, rtol=1e-11, atol=1e-11).samples
    with torch.no_grad():
        err = [float((s.at(n).sample(flow, noise) - exact).abs().max()) for n in (64, 128, 256)]
    rates = [a / b for a, b in zip(err, err[1:])]
    assert all(3.0 < q < 5.0 for q in rates), (err, rates)


def test_a_view_samples_as_the_fixed_nfe_solver_it_equals(flow, noise):
    s = randomised(BespokeRangeSolver(2, (4, 12)), 2, size=0.3).bind_model(flow)
    for n in (4, 10):
        fixed = s.at(n).fixed()
        assert isinstance(fixed, BespokeSolver) and fixed.nfe == n
        assert torch.allclose(fixed.sample(flow, noise), s.at(n).sample(flow, noise), rtol=0, atol=1e-12)
        ns = s.at(n).to_ns()
        assert torch.allclose(ns.sample(flow, noise), s.at(n).sample(flow, noise), rtol=0, atol=1e-10)


def test_a_range_file_round_trips_and_refuses_an_nfe_outside_its_range(flow, noise, tmp_path):
    s = randomised(BespokeRangeSolver(2, (4, 10), knots=5), 1, size=0.3).bind_model(flow)
    file = tmp_path / "r.safetensors"
    bespoke.save_solvers(file, [s, BespokeSolver.identity(1, 3).bind_model(flow)], flow)
    loaded = bespoke.load_solvers(file, flow=flow)
    assert sorted(loaded) == [3, 4, 6, 8, 10]
    for n in (4, 6, 8, 10):
        assert torch.equal(loaded[n].sample(flow, noise), s.at(n).sample(flow, noise)), n
    assert torch.equal(bespoke.solver(str(file), nfe=6).sample(flow, noise), s.at(6).sample(flow, noise))
    for nfe in (2, 5, 12):
        with pytest.raises(bespoke.BespokeError, match=rf"no solver for NFE {nfe}; it has NFE 3, 4-10 \(4, 6, 8, 10\)"):
            bespoke.solver(str(file), nfe=nfe)
    with pytest.raises(bespoke.BespokeError, match=r"serves NFE 4-10 \(4, 6, 8, 10\), not 7"):
        s.at(7)
    bespoke.save_solvers(tmp_path / "again.safetensors", loaded, flow)  # the views of one solver: one entry
    assert sorted(bespoke.load_solvers(tmp_path / "again.safetensors")) == sorted(loaded)


def test_training_a_range_is_never_worse_than_its_start_and_beats_the_base_method(flow, pairs):
    train, val = pairs
    cfg = FitConfig(iterations=60, val_every=20)
    s = train_bespoke(flow, train, val, "4-12", order=2, config=cfg, quiet=True)
    assert isinstance(s, BespokeRangeSolver) and s.valid_nfes() == [4, 6, 8, 10, 12]
    t = s.training_summary
    assert sorted(t["val_psnr_by_nfe"], key=int) == ["4", "8", "12"]
    assert all(kept >= start - 1e-9 for start, kept in t["val_psnr_by_nfe"].values())
    gains = [
        solver_psnr(s.at(n), flow, val) - solver_psnr(bespoke.solver("midpoint", n), flow, val) for n in (4, 8, 12)
    ]
    assert min(gains) > 1.0, gains


def test_bespoke_train_learns_an_nfe_agnostic_solver_and_sample_and_info_use_it(tmp_path, capsys):
    out = tmp_path / "r.safetensors"
    args = ["train", "--model", "zoo:gmm2d", "--solver", "bespoke-rk2", "--nfe", "4-8", "--out", str(out)]
    assert main([*args, "--val-samples", "32", "--train-samples", "64", "--iterations", "6", "--quiet"]) == 0
    assert "bespoke-rk2 NFE 4-8" in capsys.readouterr().out
    assert sorted(bespoke.load_solvers(out)) == [4, 6, 8]
    sample = ["sample", "--model", "zoo:gmm2d", "--solver", str(out), "-n", "8", "--quiet"]
    assert main([*sample, "--nfe", "6", "--out", str(tmp_path / "x.safetensors")]) == 0
    assert main([*sample, "--nfe", "5", "--out", str(tmp_path / "y.safetensors")]) == 2
    assert "it has NFE 4-8 (4, 6, 8)" in capsys.readouterr().err
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "NFE 4-8: bespoke-rk2" in text and "times at NFE 4:" in text and "times at NFE 8:" in text


def test_bespoke_scheduler_serves_every_nfe_of_an_nfe_agnostic_file(tmp_path):
    from bespoke.integrations.diffusers import BespokeScheduler

    flow = bespoke.load_model("zoo:digits-vp", guidance=None)
    s = randomised(BespokeRangeSolver(2, (4, 8), knots=4), 3, size=0.2).bind_model(flow)
    file = tmp_path / "r.safetensors"
    bespoke.save_solvers(file, [s], flow)
    sched = BespokeScheduler.from_solvers(file, flow)
    assert sched.nfes == [4, 6, 8]
    sched.set_timesteps(6)
    want = s.at(6).to_ns().times[:-1]
    assert torch.allclose(sched.timesteps.double(), flow.scheduler.timestep(want), atol=1e-3)
    with pytest.raises(bespoke.BespokeError, match="no solver for 5 steps; it has NFE 4, 6, 8"):
        sched.set_timesteps(5)
