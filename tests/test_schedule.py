"""Learned schedules (solvers/schedule.py, train/schedule.py): one warp of a method's grid for a range of NFEs."""

import pytest
import torch

import bespoke
from bespoke.cli import main
from bespoke.solvers.grids import GRIDS, continuous_grid, edm
from bespoke.solvers.schedule import SCHEDULE_BASES, ScheduleSolver
from bespoke.train import generate_gt
from bespoke.train.loop import FitConfig
from bespoke.train.pairs import solver_psnr
from bespoke.train.schedule import select_grid, train_schedule, warped_start
from helpers import Killed, killing_flow

PATHS = ("condot", "cosine", "vp-discrete")


@pytest.fixture(scope="module")
def pairs(flow, tmp_path_factory):
    gt = generate_gt(flow, tmp_path_factory.mktemp("gt"), num=192, shard_size=96, quiet=True)
    return gt.slice(64, 192), gt.slice(0, 64)  # train, val


def randomised(s: ScheduleSolver, seed: int) -> ScheduleSolver:
    with torch.no_grad():
        s.log_inc.copy_(torch.randn(2, s.knots, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return s


@pytest.mark.parametrize("path", PATHS)
def test_each_continuous_grid_at_i_over_n_is_the_discrete_grid(path):
    sch = bespoke.load_model("zoo:gmm2d", path=path).scheduler
    for n in (3, 8, 17):
        f = torch.arange(n + 1, dtype=torch.float64) / n
        for name in ("uniform", "quadratic", "logsnr"):
            want = torch.tensor(GRIDS[name](n, sch), dtype=torch.float64)
            assert torch.allclose(continuous_grid(name, f, sch), want, rtol=0, atol=1e-12), (name, n)
        # EDM's discrete grid puts its n noise levels at f = i / (n - 1), then sigma = 0 (t = 1)
        want = torch.tensor(edm(n, sch)[:-1], dtype=torch.float64)
        got = continuous_grid("edm", torch.arange(n, dtype=torch.float64) / (n - 1), sch)
        assert torch.allclose(got[:-1], want[:-1], rtol=0, atol=1e-7) and got[-1] == 1.0


@pytest.mark.parametrize("base", [b for b in SCHEDULE_BASES if b != "ipndm"])
def test_an_untrained_schedule_is_its_method_on_the_recommended_grid_at_every_nfe(base, flow, noise):
    s = ScheduleSolver(base, (3, 10))
    for n in s.valid_nfes():
        ours, theirs = s.at(n).sample(flow, noise), bespoke.solver(base, n).sample(flow, noise)
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-12), (base, n)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("base", ["dpm++2m", "ipndm", "midpoint"])
def test_times_increase_strictly_at_every_nfe_for_random_parameters(path, base):
    sch = bespoke.load_model("zoo:gmm2d", path=path).scheduler
    for seed in range(20):
        s = randomised(ScheduleSolver(base, (2, 16), knots=1 + seed % 9), seed)
        with torch.no_grad():
            s.log_inc.mul_(1 + seed)  # up to increments e^(+-60) apart: still monotone
        for n in s.valid_nfes():
            t = torch.tensor(s.at(n).grid(sch), dtype=torch.float64)
            assert t[0] == 0 and t[-1] == 1 and bool((torch.diff(t) > 0).all()), (seed, n, t)


@pytest.mark.parametrize("base", ["dpm++2m", "unipc", "midpoint"])
def test_the_gradient_through_the_compiled_grid_matches_finite_differences(base, flow, noise):
    s = randomised(ScheduleSolver(base, (4, 10)), 0).at(8)  # between the ends: both rows count
    loss = lambda: s.sample(flow, noise).pow(2).mean()  # noqa: E731
    loss().backward()
    eps, numeric = 1e-6, []
    with torch.no_grad():
        for k in range(s.log_inc.numel()):
            s.log_inc.view(-1)[k] += eps
            up = loss()
            s.log_inc.view(-1)[k] -= 2 * eps
            down = loss()
            s.log_inc.view(-1)[k] += eps
            numeric.append(float((up - down) / (2 * eps)))
    want = torch.tensor(numeric, dtype=torch.float64).view(2, -1)
    assert torch.allclose(s.log_inc.grad, want, rtol=1e-5, atol=1e-8)


def test_an_nfe_outside_the_range_is_refused_with_the_range(flow, tmp_path):
    s = ScheduleSolver("midpoint", (4, 12)).bind_model(flow)
    with pytest.raises(bespoke.BespokeError, match=r"serves NFE 4-12 \(4, 6, 8, 10, 12\), not 7"):
        s.at(7)
    file = tmp_path / "s.safetensors"
    bespoke.save_solvers(file, [s], flow)
    for nfe in (2, 14, 5):
        with pytest.raises(bespoke.BespokeError, match=f"no solver for NFE {nfe}; it has NFE 4-12"):
            bespoke.solver(str(file), nfe=nfe)


def test_a_schedule_file_round_trips_bit_identical_at_every_nfe(flow, noise, tmp_path):
    s = randomised(ScheduleSolver("unipc", (3, 9), knots=5), 1).bind_model(flow)
    fixed = bespoke.BNSSolver.from_solver(bespoke.solver("euler", 12), flow)
    file = tmp_path / "s.safetensors"
    bespoke.save_solvers(file, [s, fixed], flow)
    loaded = bespoke.load_solvers(file, flow=flow)
    assert sorted(loaded) == [3, 4, 5, 6, 7, 8, 9, 12]
    for n in range(3, 10):
        assert torch.equal(loaded[n].sample(flow, noise), s.at(n).sample(flow, noise)), n
    bespoke.save_solvers(tmp_path / "again.safetensors", loaded, flow)  # the views of one schedule: one entry
    assert sorted(bespoke.load_solvers(tmp_path / "again.safetensors")) == sorted(loaded)
    with pytest.raises(bespoke.BespokeError, match="overlap at NFE 8"):
        bespoke.save_solvers(file, [s, bespoke.BNSSolver.from_solver(bespoke.solver("euler", 8), flow)], flow)


def test_training_improves_every_nfe_of_the_range_and_is_never_worse_than_the_method(flow, pairs):
    train, val = pairs
    s = train_schedule(flow, train, val, "dpm++2m", "3-8", config=FitConfig(iterations=60, val_every=20), quiet=True)
    t = s.training_summary
    assert sorted(t["val_psnr_by_nfe"]) == ["3", "6", "8"] and t["history"][0][1] == 0.0
    gains = [
        solver_psnr(s.at(n), flow, val) - solver_psnr(bespoke.solver("dpm++2m", n), flow, val) for n in range(3, 9)
    ]
    assert min(gains) > 0.3 and max(gains) > 3.0, gains  # measured: +0.6 (NFE 3) to +5.8 dB (NFE 8)


def test_training_starts_from_the_best_fixed_grid_and_records_every_grid_it_scored(tmp_path):
    vp = bespoke.load_model("zoo:gmm2d", path="vp-discrete")
    gt = generate_gt(vp, tmp_path / "gt", num=96, shard_size=96, quiet=True)
    train, val = gt.slice(32, 96), gt.slice(0, 32)
    start, scores = select_grid(vp, val, "dpm++2m", (3, 6), knots=4)
    assert {f"dpm++2m[{g}]" for g in ("uniform", "quadratic", "logsnr", "edm")} <= set(scores)
    assert start.init == max(scores, key=scores.get) and start.init.startswith(f"dpm++2m[{start.grid_name}")
    s = train_schedule(vp, train, val, "dpm++2m", "3-6", knots=4, config=FitConfig(iterations=4), quiet=True)
    assert s.init == start.init and s.training_summary["init_candidates_psnr"] == {
        k: round(v, 4) for k, v in scores.items()
    }
    fixed = train_schedule(vp, train, val, "dpm++2m", "3-6", init="edm", config=FitConfig(iterations=4), quiet=True)
    assert fixed.init == "dpm++2m[edm]" and fixed.grid_name == "edm"


def test_a_warped_start_follows_one_grid_at_the_low_end_and_another_at_the_high_end(flow):
    sch = flow.scheduler
    s = warped_start(flow, "unipc", (3, 12), 8, high="logsnr", low="quadratic")
    assert s.init == "unipc[logsnr; quadratic at NFE 3]" and s.grid_name == "logsnr"
    gap = lambda a, b: max(abs(x - y) for x, y in zip(a, b))  # noqa: E731
    assert gap(s.at(12).grid(sch), bespoke.solver("unipc", 12, grid="logsnr").times(sch)) < 1e-12
    want = bespoke.solver("unipc", 3, grid="quadratic").times(sch)
    assert gap(s.at(3).grid(sch), want) < 5e-3  # exact at the knots (up to the floor), linear between them
    middle = torch.tensor(s.at(6).grid(sch))
    assert bool((torch.diff(middle) > 0).all())


def test_a_killed_schedule_run_resumes_bit_identical(flow, pairs, tmp_path):
    train, val = pairs
    cfg = FitConfig(iterations=12, batch_size=16, val_every=4)
    ref = train_schedule(flow, train, val, "euler", "2-4", config=cfg, checkpoint=tmp_path / "a.ckpt", quiet=True)
    ckpt = tmp_path / "b.ckpt"
    # scoring the 4 fixed grids, the start's scores and the validation at 0 (2 + 3 + 4 calls each), iterations
    # 0..3 (NFE 2, 3, 4, 2), the validation at 4, then it dies inside iteration 4
    with pytest.raises(Killed):
        kill = 4 * 9 + 9 + 9 + (2 + 3 + 4 + 2) + 9 + 2
        train_schedule(killing_flow(flow, kill), train, val, "euler", "2-4", config=cfg, checkpoint=ckpt, quiet=True)
    assert torch.load(ckpt, weights_only=True)["step"] == 4
    resumed = train_schedule(flow, train, val, "euler", "2-4", config=cfg, checkpoint=ckpt, quiet=True)
    assert torch.equal(resumed.log_inc, ref.log_inc)
    assert resumed.training_summary["history"] == ref.training_summary["history"]


def test_bespoke_train_learns_a_schedule_for_a_range_and_sample_uses_it(tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    args = ["train", "--model", "zoo:gmm2d", "--solver", "schedule:dpm++2m", "--nfe", "3-6", "--out", str(out)]
    assert main([*args, "--val-samples", "32", "--train-samples", "64", "--iterations", "8", "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out and out.exists()
    assert (
        main(
            [
                *args[:-1],
                str(tmp_path / "u.safetensors"),
                "--gt",
                str(out) + ".gt",
                "--init",
                "uniform",
                "--val-samples",
                "32",
                "--iterations",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    assert bespoke.load_solver(tmp_path / "u.safetensors", 4).grid_name == "uniform"
    capsys.readouterr()
    assert not (tmp_path / "s.safetensors.gt" / "manifest.json").read_text().count('"trajectory": 65')
    sample = ["sample", "--model", "zoo:gmm2d", "--solver", str(out), "-n", "8", "--quiet"]
    assert main([*sample, "--nfe", "5", "--out", str(tmp_path / "x.safetensors")]) == 0
    assert main([*sample, "--nfe", "7", "--out", str(tmp_path / "y.safetensors")]) == 2
    assert "it has NFE 3-6" in capsys.readouterr().err
    bns = ["train", "--model", "zoo:gmm2d", "--solver", "bns", "--nfe", "3-6", "--out", str(tmp_path / "b.safetensors")]
    assert main(bns) == 2
    assert "a range is for --solver schedule:METHOD" in capsys.readouterr().err
