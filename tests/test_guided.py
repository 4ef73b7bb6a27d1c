"""Guided BNS solvers: one solver for a range of classifier-free guidance scales (solvers/guided.py)."""

from __future__ import annotations

import json

import pytest
import torch

import bespoke
from bespoke import BespokeError, Guidance
from bespoke.solvers.bns import BNSSolver
from bespoke.solvers.files import read_metadata
from bespoke.solvers.guided import GuidedBNSSolver
from bespoke.train.guided import train_bns_guided
from bespoke.train.loop import FitConfig

SCALES = (1.0, 2.0, 3.0)


def gmm(w: float, convention: str = "diffusers"):
    return bespoke.load_model("zoo:gmm2d", guidance=Guidance(w, convention))


@pytest.fixture(scope="module")
def flows():
    return {w: gmm(w) for w in SCALES}


@pytest.fixture(scope="module")
def pairs(flows, tmp_path_factory):
    home = tmp_path_factory.mktemp("gt")
    out = {}
    for w, f in flows.items():
        cache = bespoke.generate_gt(f, home / f"w{w:g}", num=96, trajectory=9, quiet=True)
        out[w] = (cache.slice(32, 96), cache.slice(0, 32))
    return out


@pytest.fixture
def noise():
    return torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.fixture
def labels():
    return torch.arange(16) % 2


def two_anchor_solver(flow) -> GuidedBNSSolver:
    """Anchors at 1 (midpoint in NS form) and 3 (euler, its coefficients perturbed): different everywhere."""
    low = BNSSolver.from_solver(bespoke.solver("midpoint", 4), flow)
    high = BNSSolver.from_solver(bespoke.solver("euler", 4), flow)
    with torch.no_grad():
        high.a.add_(0.01)
        high.log_dt.mul_(1.1)
    return GuidedBNSSolver.from_anchors({1.0: low.bind_model(flow), 3.0: high.bind_model(flow)}, "diffusers")


def test_at_an_anchor_it_is_that_anchors_bns_solver_bit_for_bit(flows, noise, labels):
    g = two_anchor_solver(flows[1.0])
    low = BNSSolver.from_solver(bespoke.solver("midpoint", 4), flows[1.0])
    assert torch.equal(g.sample(flows[1.0], noise, labels=labels), low.sample(flows[1.0], noise, labels=labels))
    assert torch.equal(g.weights(3.0), torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_between_anchors_the_raw_parameters_are_interpolated_linearly_in_w(flows, noise, labels):
    g = two_anchor_solver(flows[1.0])
    raw = g.raw_at(2.5)  # lam = 0.75 of the way from anchor 1 to anchor 3
    for name in ("log_dt", "a", "b"):
        want = 0.25 * getattr(g, name)[0] + 0.75 * getattr(g, name)[1]
        torch.testing.assert_close(raw[name], want * (g.mask if name == "b" else 1), rtol=0, atol=1e-15)
    view = g.at_scale(2.5)
    flow = gmm(2.5)
    torch.testing.assert_close(g.sample(flow, noise, labels=labels), view.sample(flow, noise, labels=labels))
    torch.testing.assert_close(
        g.to_ns(flow).sample(flow, noise, labels=labels), view.sample(flow, noise, labels=labels)
    )


def test_the_scale_is_read_from_the_flow_in_the_solvers_convention(flows, noise, labels):
    """fm weight w is diffusers' 1 + w: the same guided velocity, the same parameters."""
    g = two_anchor_solver(flows[1.0])
    fm = gmm(1.5, "fm")
    torch.testing.assert_close(
        g.sample(fm, noise, labels=labels), g.sample(gmm(2.5), noise, labels=labels), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("w", [0.5, 3.5])
def test_a_scale_outside_the_range_is_refused_naming_the_range(flows, noise, labels, w):
    g = two_anchor_solver(flows[1.0])
    with pytest.raises(BespokeError, match=r"serves guidance scales \[1, 3\] \(diffusers convention.*not " + f"{w:g}"):
        g.sample(gmm(w), noise, labels=labels)
    with pytest.raises(BespokeError, match="runs without guidance"):
        g.sample(bespoke.load_model("zoo:gmm2d"), noise)


def test_file_round_trip_and_its_model_record(flows, noise, labels, tmp_path):
    g = two_anchor_solver(flows[1.0])
    path = tmp_path / "guided.safetensors"
    bespoke.save_solvers(path, [g], flows[2.0])
    meta = read_metadata(path)
    assert meta["model"]["guidance"] == {"range": [1.0, 3.0], "convention": "diffusers"}
    assert meta["solvers"]["4"]["guidance_anchors"] == [1.0, 3.0]
    back = bespoke.load_solver(path, 4, flow=flows[2.0])
    assert isinstance(back, GuidedBNSSolver)
    for w in (1.0, 1.7, 3.0):
        f = gmm(w)
        assert torch.equal(back.sample(f, noise, labels=labels), g.sample(f, noise, labels=labels))
    with pytest.raises(BespokeError, match=r"serves guidance scales \[1, 3\]"):
        bespoke.load_solver(path, 4, flow=gmm(5.0))


def test_a_file_mixing_guided_and_single_scale_solvers_is_refused(flows, tmp_path):
    g = two_anchor_solver(flows[1.0])
    plain = BNSSolver.from_solver(bespoke.solver("euler", 6), flows[1.0]).bind_model(flows[1.0])
    with pytest.raises(BespokeError, match="one guidance scale or for a range"):
        bespoke.save_solvers(tmp_path / "mixed.safetensors", [g, plain], flows[1.0])


def test_a_file_whose_anchors_disagree_with_its_tensors_is_refused(flows, tmp_path):
    from bespoke.io import read_tensors, save_tensors

    path = tmp_path / "guided.safetensors"
    bespoke.save_solvers(path, [two_anchor_solver(flows[1.0])], flows[1.0])
    tensors, meta, _ = read_tensors(path, "")
    meta["solvers"]["4"]["guidance_anchors"] = [1.0, 2.0]
    meta["model"]["guidance"]["range"] = [1.0, 2.0]
    save_tensors(path, tensors, meta)
    with pytest.raises(BespokeError, match="anchor scales differ"):
        bespoke.load_solver(path, 4)


def test_training_gives_the_per_scale_solver_at_each_anchor(flows, pairs, noise, labels):
    """Scales = anchors (no joint stage): at anchor w the guided solver is train_bns at w from the same start."""
    config = FitConfig(iterations=20, val_every=10)
    ends = {w: flows[w] for w in (1.0, 3.0)}
    g = train_bns_guided(
        ends, {w: pairs[w] for w in ends}, 4, init="midpoint", least_squares=False, config=config, quiet=True
    )
    assert g.anchor_list == [1.0, 3.0] and g.training_summary["joint"] is None
    for w, f in ends.items():
        alone = bespoke.train_bns(f, *pairs[w], 4, init="midpoint", least_squares=False, config=config, quiet=True)
        assert torch.equal(g.sample(f, noise, labels=labels), alone.sample(f, noise, labels=labels))


def test_a_scale_between_anchors_trains_the_interpolation_and_never_loses(flows, pairs):
    config = FitConfig(iterations=20, val_every=10)
    g = train_bns_guided(flows, pairs, 4, anchors=[1.0, 3.0], config=config, joint_iterations=30, quiet=True)
    summary = g.training_summary
    assert set(summary["val_psnr_by_guidance"]) == {"1", "2", "3"}
    assert summary["val_psnr"] >= summary["val_psnr_init"]  # the joint stage keeps its start unless it gains
    assert summary["joint"]["iterations"] == 30
    assert torch.isfinite(torch.tensor([v[1] for v in summary["val_psnr_by_guidance"].values()])).all()


def test_training_refuses_anchors_that_do_not_span_the_scales(flows, pairs):
    with pytest.raises(BespokeError, match="must span the training scales"):
        train_bns_guided(flows, pairs, 4, anchors=[1.0, 2.0], quiet=True)
    with pytest.raises(BespokeError, match="2 or more"):
        train_bns_guided({1.0: flows[1.0]}, {1.0: pairs[1.0]}, 4, quiet=True)


# --- BespokeScheduler ----------------------------------------------------------------------------


def test_the_scheduler_takes_the_scale_from_set_timesteps_the_attribute_or_the_pipeline(tmp_path):
    pytest.importorskip("diffusers")
    from bespoke.integrations.diffusers import BespokeScheduler

    flow = bespoke.load_model("zoo:gmm2d", path="vp-discrete", guidance=Guidance(1.0, "diffusers"))
    g = two_anchor_solver(flow)
    sched = BespokeScheduler.from_solvers([g], flow, prediction_type="epsilon")
    with pytest.raises(BespokeError, match="guidance_scale"):
        sched.set_timesteps(4)
    want = g.at_scale(2.5).to_ns(flow)

    def check(s):
        torch.testing.assert_close(torch.tensor(s._solver["a"], dtype=torch.float64), want.a)
        torch.testing.assert_close(s._solver["times"], want.times)

    sched.set_timesteps(4, guidance_scale=2.5)
    check(sched)
    sched.guidance_scale = 2.5
    sched.set_timesteps(4)
    check(sched)

    class Pipe:  # what diffusers' SD/SDXL/SD3/Flux pipelines hold while __call__ runs
        _guidance_scale = 2.5

    pipe = Pipe()
    sched.guidance_scale = None
    sched.follow(pipe).set_timesteps(4)
    check(sched)
    with pytest.raises(BespokeError, match=r"\[1, 3\]"):
        sched.set_timesteps(4, guidance_scale=7.0)
    sched.save_pretrained(tmp_path / "sched")
    config = json.loads((tmp_path / "sched" / "scheduler_config.json").read_text())
    assert config["solvers"]["4"]["guided"]["entry"]["guidance_anchors"] == [1.0, 3.0]
    back = type(sched).from_pretrained(tmp_path / "sched")
    back.set_timesteps(4, guidance_scale=2.5)
    check(back)


# --- the command line ----------------------------------------------------------------------------


def test_cli_trains_one_file_for_a_range_and_samples_at_any_scale_in_it(tmp_path, capsys):
    from bespoke import cli

    out = tmp_path / "guided.safetensors"
    model = ["--model", "zoo:gmm2d"]
    train = ["train", *model, "--solver", "bns", "--nfe", "4", "--guidance-scales", "1,2,3", "--anchors", "1,3"]
    train += ["--val-samples", "16", "--train-samples", "32", "--iterations", "6", "--out", str(out), "--quiet"]
    assert cli.main(train) == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    assert "for guidance [1, 3] (fm convention; anchors 1, 3)" in stdout and "w=2:" in stdout
    assert sorted(p.name for p in (tmp_path / "guided.safetensors.gt").iterdir()) == ["w1", "w2", "w3"]
    assert not (tmp_path / "guided.safetensors.ckpt").exists()  # checkpoints gone once the file is written
    sample = ["sample", *model, "--solver", str(out), "--nfe", "4", "--num", "8", "--quiet"]
    assert cli.main([*sample, "--guidance", "2.5", "--out", str(tmp_path / "s.safetensors")]) == 0
    assert cli.main([*sample, "--guidance", "5", "--out", str(tmp_path / "t.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "serves guidance scales [1, 3]" in err[0] and "not 5" in err[0]
    evaluate = ["eval", *model, "--solvers", f"euler,{out}", "--nfe", "4", "--num", "8", "--guidance", "1.5", "--quiet"]
    assert cli.main(evaluate) == 0
    assert cli.main(["info", str(out)]) == 0
    assert "guidance scales 1-3" in capsys.readouterr().out


def test_cli_guidance_scales_is_for_bns_without_a_fixed_guidance(tmp_path, capsys):
    from bespoke import cli

    base = ["train", "--model", "zoo:gmm2d", "--nfe", "4", "--guidance-scales", "1,3", "--out", str(tmp_path / "o")]
    assert cli.main([*base, "--solver", "bespoke-rk2"]) == 2
    assert cli.main([*base, "--solver", "bns", "--guidance", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("bespoke: error:") == 2 and "--guidance-scales" in err


def test_starts_that_evaluate_where_the_model_is_singular_are_passed_over(tmp_path):
    """On a VP path heun and rk4 evaluate at t = 1, where the model is singular: those grids are skipped."""
    flows = {w: bespoke.load_model("zoo:gmm2d", path="vp-discrete", guidance=Guidance(w, "diffusers")) for w in (1, 3)}
    pairs = {}
    for w, f in flows.items():
        cache = bespoke.generate_gt(f, tmp_path / f"w{w}", num=48, trajectory=9, quiet=True)
        pairs[w] = (cache.slice(16, 48), cache.slice(0, 16))

    def singular_at_one(f):  # as a diffusion network is: no finite velocity at the data end
        return f.derived(lambda t, x, **c: f._velocity(t, x, **c) * torch.where(t >= 1, torch.nan, 1.0)[:, None])

    flows = {w: singular_at_one(f) for w, f in flows.items()}
    g = train_bns_guided(flows, pairs, 4, config=FitConfig(iterations=2), quiet=True)
    candidates = g.training_summary["init_candidates_psnr"]
    assert candidates and not any(k.startswith(("heun", "rk4")) for k in candidates)
