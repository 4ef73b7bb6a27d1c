"""BNS least-squares starts (train/least_squares.py), on the exact zoo:gmm2d flow."""

import pytest
import torch

import bespoke
from bespoke.solvers.bns import BNSSolver
from bespoke.train import generate_gt
from bespoke.train.bns import select_init, train_bns
from bespoke.train.least_squares import least_squares_coefficients
from bespoke.train.loop import FitConfig
from bespoke.train.pairs import solver_psnr
from helpers import Killed, killing_flow


@pytest.fixture(scope="module")
def pairs(flow, tmp_path_factory):
    gt = generate_gt(flow, tmp_path_factory.mktemp("gt"), num=384, shard_size=128, trajectory=33, quiet=True)
    return gt.slice(128, 384), gt.slice(0, 128)  # train, val


def final_mse(s, flow, pairs) -> float:
    with torch.no_grad():
        x = s.sample(flow, pairs.noise, **pairs.cond())
    return float((x - pairs.samples).pow(2).mean())


@pytest.mark.parametrize("sigma0", [1.0, 3.0])
def test_least_squares_coefficients_start_far_above_the_solver_whose_times_they_keep(sigma0, flow, pairs):
    train, val = pairs
    euler = BNSSolver.from_solver(bespoke.solver("euler", 8), flow, sigma0=sigma0)
    fitted = least_squares_coefficients(flow, euler, train)
    assert torch.equal(fitted.times(), euler.times()) and fitted.sigma0 == sigma0
    assert fitted.init == "euler[uniform]+lsq"
    gain = solver_psnr(fitted, flow, val) - solver_psnr(euler, flow, val)
    assert gain > (15.0 if sigma0 == 1.0 else 6.0), gain  # measured: +21.7 dB (sigma0 1), +9.6 dB (sigma0 3)


def test_the_last_row_is_the_least_squares_optimum_of_the_final_error(flow, pairs):
    """Given the chain before it, the last step's coefficients minimise the final MSE on the fitted pairs:
    moving them in any direction makes it worse."""
    train, _ = pairs
    fitted = least_squares_coefficients(flow, BNSSolver.from_solver(bespoke.solver("dpm++2m", 6), flow), train)
    best = final_mse(fitted, flow, train)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        moved = least_squares_coefficients(flow, BNSSolver.from_solver(bespoke.solver("dpm++2m", 6), flow), train)
        with torch.no_grad():
            moved.a[-1] += 1e-3 * torch.randn((), generator=g, dtype=torch.float64)
            moved.b[-1] += 1e-3 * torch.randn(6, generator=g, dtype=torch.float64)
        assert final_mse(moved, flow, train) > best


def test_auto_start_weighs_least_squares_refits_and_training_is_never_worse(flow, pairs):
    train, val = pairs
    s = train_bns(flow, train, val, 6, config=FitConfig(iterations=20, batch_size=32, val_every=10), quiet=True)
    ts = s.training_summary
    scores = {k: v for k, v in ts["init_candidates_psnr"].items() if v is not None}
    refits = [k for k in scores if k.endswith("+lsq")]
    assert refits and all(k.removesuffix("+lsq").split("[")[0] in scores for k in refits)
    best = max(scores, key=scores.get)
    assert ts["init"] == best if best.endswith("+lsq") else ts["init"].split("[")[0] == best
    assert ts["val_psnr"] >= ts["val_psnr_init"] == pytest.approx(scores[best], abs=1e-4)
    without = select_init(flow, val, 6)[1]
    assert not any(k.endswith("+lsq") for k in without)  # no training pairs given: dedicated solvers only
    plain = train_bns(flow, train, val, 6, least_squares=False, config=FitConfig(iterations=1), quiet=True)
    assert not plain.training_summary["init"].endswith("+lsq")


def test_a_killed_run_from_a_least_squares_start_resumes_bit_identical(flow, pairs, tmp_path):
    train, val = pairs
    cfg = FitConfig(iterations=30, batch_size=32, val_every=10)
    ref = train_bns(flow, train, val, 4, config=cfg, checkpoint=tmp_path / "a.ckpt", quiet=True)
    assert ref.training_summary["init"].endswith("+lsq")
    calls = {"n": 0}

    def counting(t, x, **cond):
        calls["n"] += 1
        return flow._velocity(t, x, **cond)

    before = bespoke.Flow(counting, scheduler=flow.scheduler, sample_shape=(2,), cond_keys=flow.cond_keys)
    select_init(before, val, 4, train=train)  # the calls of choosing the start ...
    start = calls["n"]
    ckpt = tmp_path / "b.ckpt"
    kill = start + 4 * (1 + 1 + 15 + 1) + 2  # ... the lr cap's and the first validation's rollouts, 15 iterations
    with pytest.raises(Killed):  # and the validation at 10: it dies inside iteration 16
        train_bns(killing_flow(flow, kill), train, val, 4, config=cfg, checkpoint=ckpt, quiet=True)
    assert torch.load(ckpt, weights_only=True)["step"] == 10
    resumed = train_bns(flow, train, val, 4, config=cfg, checkpoint=ckpt, quiet=True)
    for (k, p), q in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), k
    assert resumed.training_summary["history"] == ref.training_summary["history"]


def test_bespoke_train_gives_bns_trajectories_unless_they_would_be_too_large(tmp_path, capsys):
    from types import SimpleNamespace

    from bespoke.cli import train as cli

    args = SimpleNamespace(solver="bns", quiet=False)
    digits, latents = SimpleNamespace(sample_shape=(1, 16, 16)), SimpleNamespace(sample_shape=(4, 64, 64))
    assert cli._trajectory(args, digits, 768, tmp_path / "a.gt") == cli.TRAJECTORY
    assert cli._trajectory(args, latents, 768, tmp_path / "a.gt") == 0  # 6.5 GiB of trajectories
    assert "dedicated solvers only" in capsys.readouterr().err
    rk2 = SimpleNamespace(solver="bespoke-rk2", quiet=False)
    assert cli._trajectory(rk2, latents, 768, tmp_path / "a.gt") == cli.TRAJECTORY  # it cannot train without them
