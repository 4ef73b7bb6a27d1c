"""BNS solvers: parameterisation, exact initialisation, training, kill/resume, solver files.

Everything runs on the exact Gaussian-mixture flow zoo:gmm2d (closed-form velocity), in float64.
"""

import dataclasses
import hashlib
import math

import pytest
import torch

import bespoke
from bespoke import BespokeError
from bespoke.flows import scale_time_flow
from bespoke.paths import Preconditioned
from bespoke.solvers.bns import BNSSolver
from bespoke.solvers.files import load_solver, load_solvers, read_metadata, save_solvers
from bespoke.train import generate_gt
from bespoke.train.bns import init_candidates, select_init, train_bns
from bespoke.train.loop import FitConfig
from bespoke.train.pairs import solver_psnr
from helpers import Killed, killing_flow

F64 = torch.float64


@pytest.fixture(scope="module")
def pairs(flow, tmp_path_factory):
    gt = generate_gt(flow, tmp_path_factory.mktemp("gt"), num=384, shard_size=128, quiet=True)
    return gt.slice(128, 384), gt.slice(0, 128)  # train, val


def perturbed(s: BNSSolver, seed: int = 0, scale: float = 0.05) -> BNSSolver:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in s.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=F64) * p.abs().clamp(min=0.1))
    return s


# --- parameterisation ------------------------------------------------------------------------------


@pytest.mark.parametrize("nfe,count", [(4, 17), (8, 51), (16, 167)])
def test_parameter_count_is_n_n_plus_5_over_2_minus_1(nfe, count, flow):
    s = BNSSolver.from_solver(bespoke.solver("euler", nfe), flow)
    assert s.num_parameters == count < 200
    stored = s.log_dt.numel() + s.a.numel() + int(s.mask.sum())  # b is stored square, used lower triangular
    assert stored == count + 1  # n log-increments carry n - 1 free times


def test_times_stay_monotone_with_pinned_ends_for_any_parameters(flow):
    s = perturbed(BNSSolver.from_solver(bespoke.solver("euler", 8), flow), scale=3.0)
    t = s.times()
    assert t[0].item() == 0.0 and t[-1].item() == 1.0
    assert torch.all(torch.diff(t) > 0)


@pytest.mark.parametrize("sigma0", [1.0, 3.0])
@pytest.mark.parametrize("name", ["euler", "midpoint", "heun", "rk4", "ddim", "dpm++2m", "unipc", "ipndm"])
def test_bns_at_initialisation_is_its_initialiser(name, sigma0, flow, noise):
    """[BNS] §3.4: theta_0 is the dedicated solver itself (in the preconditioned coordinates if sigma0 != 1)."""
    s = bespoke.solver(name, nfe=8)
    bns = BNSSolver.from_solver(s, flow, sigma0=sigma0)
    with torch.no_grad():
        got = bns.sample(flow, noise)
    if sigma0 == 1.0:
        want = s.sample(flow, noise)
    else:  # the dedicated solver on the preconditioned path, from x_bar_0 = sigma0 x_0, ending at s_1 = 1
        want = s.sample(scale_time_flow(flow, Preconditioned(flow.scheduler, sigma0)), sigma0 * noise)
    assert (got - want).abs().max().item() <= 1e-10


def test_edm_heun_initialisation_keeps_its_truncated_start(flow, noise):
    s = bespoke.solver("edm-heun", nfe=7)
    with torch.no_grad():
        got = BNSSolver.from_solver(s, flow).sample(flow, noise)
    assert (got - s.sample(flow, noise)).abs().max().item() <= 1e-10


@pytest.mark.parametrize("sigma0", [1.0, 4.0])
def test_plain_ns_compilation_of_a_trained_looking_solver_reproduces_it(sigma0, flow, noise):
    bns = perturbed(BNSSolver.from_solver(bespoke.solver("midpoint", 8), flow, sigma0=sigma0), seed=1)
    with torch.no_grad():
        direct = bns.sample(flow, noise)
    ns = bns.to_ns(flow)
    assert isinstance(ns, bespoke.NSSolver) and ns.nfe == 8
    assert (ns.sample(flow, noise) - direct).abs().max().item() <= 1e-10


def test_preconditioning_needs_a_path_that_reaches_zero_snr():
    vp = bespoke.load_model("zoo:gmm2d", path="vp-discrete")
    with pytest.raises(BespokeError, match="sigma0 = 1"):
        BNSSolver.from_solver(bespoke.solver("ddim", 8), vp, sigma0=5.0)


def test_gradients_reach_times_and_coefficients(flow, noise):
    bns = BNSSolver.from_solver(bespoke.solver("euler", 6), flow, sigma0=2.0)
    bns.sample(flow, noise).pow(2).mean().backward()
    for name, p in bns.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_gradients(flow, noise):
    grads = []
    for checkpoint in (False, True):
        bns = perturbed(BNSSolver.from_solver(bespoke.solver("midpoint", 6), flow), seed=2)
        bns.sample(flow, noise, checkpoint=checkpoint).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in bns.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-12, atol=1e-14)


def test_float32_sampling_keeps_float64_parameters(flow, noise):
    bns = BNSSolver.from_solver(bespoke.solver("dpm++2m", 8), flow)
    with torch.no_grad():
        x32, x64 = bns.sample(flow, noise.float()), bns.sample(flow, noise)
    assert x32.dtype == torch.float32 and all(p.dtype == F64 for p in bns.parameters())
    assert (x32.double() - x64).abs().max().item() < 1e-5


# --- training --------------------------------------------------------------------------------------

FAST = dict(iterations=60, batch_size=32, lr=5e-3, val_every=20)


def test_training_improves_validation_psnr_and_reports_it(flow, pairs):
    train, val = pairs
    s = train_bns(flow, train, val, 4, config=FitConfig(**FAST), quiet=True)
    ts = s.training_summary
    assert set(ts["init_candidates_psnr"]) == set(init_candidates(flow, 4))
    assert ts["init"].split("[")[0] == max(ts["init_candidates_psnr"], key=ts["init_candidates_psnr"].get)
    assert ts["val_psnr"] > ts["val_psnr_init"] + 3.0  # measured ~+10 dB
    assert solver_psnr(s, flow, val) == pytest.approx(ts["val_psnr"], abs=1e-4)  # the best checkpoint is what it holds


def test_initial_solvers_that_cannot_run_on_the_flow_are_passed_over(flow, pairs):
    """A VP-type model is singular at the data end: Heun and RK4 evaluate there, so automatic
    initialisation must score them NaN and pick among the others, not fail."""
    _, val = pairs

    def singular_at_data_end(t, x, **cond):
        u = flow(t, x, **cond)
        return torch.where((t >= 1.0)[:, None], torch.full_like(u, float("nan")), u)

    vp_like = bespoke.Flow(
        singular_at_data_end, scheduler=flow.scheduler, sample_shape=(2,), name="vp-like", cond_keys=("labels",)
    )
    s, scores = select_init(vp_like, val, 4)
    assert math.isnan(scores["heun"]) and math.isnan(scores["rk4"])
    finite = {k: v for k, v in scores.items() if not math.isnan(v)}
    assert len(finite) >= 4 and s.init.split("[")[0] == max(finite, key=finite.get)
    with pytest.raises(BespokeError, match="heun.*data end.*choose --init explicitly"):
        select_init(vp_like, val, 4, candidates=["heun"])


def mismatched(pairs):
    """The same pairs with each noise paired with another's ground truth: training on them cannot help."""
    return dataclasses.replace(pairs, samples=pairs.samples.roll(1, 0))


def test_a_run_that_only_gets_worse_returns_its_initialiser(flow, pairs, noise):
    """Never a final solver worse than the start: trained on mismatched pairs, only the start is any good."""
    train, val = pairs
    wrong = mismatched(train)
    s = train_bns(flow, wrong, val, 4, init="euler", config=FitConfig(iterations=20, val_every=10), quiet=True)
    ts = s.training_summary
    assert ts["val_psnr"] == ts["val_psnr_init"] and ts["best_iteration"] == 0
    assert min(v for _, v in ts["history"][1:]) < ts["val_psnr_init"]
    with torch.no_grad():
        assert torch.equal(s.sample(flow, noise), bespoke.solver("euler", 4).to_ns(flow).sample(flow, noise))


def test_an_overshooting_adam_backtracks_to_its_best_with_half_the_rate(flow, pairs, tmp_path):
    train, val = pairs
    cfg = FitConfig(iterations=60, batch_size=32, lr=0.3, val_every=10, backtrack_db=1.0)
    s = train_bns(flow, train, val, 8, init="midpoint", config=cfg, checkpoint=tmp_path / "c.ckpt", quiet=True)
    state = torch.load(tmp_path / "c.ckpt", weights_only=True)
    hist = s.training_summary["history"]
    drops = sum(v < max(u for _, u in hist[:k]) - 1.0 for k, (_, v) in enumerate(hist) if k)
    assert drops >= 1 and state["lr_factor"] == 0.5**drops
    assert s.training_summary["val_psnr"] >= s.training_summary["val_psnr_init"]


def test_early_stopping_ends_adam_after_patience_validations_without_progress(flow, pairs):
    train, val = pairs
    wrong = mismatched(train)
    cfg = FitConfig(iterations=200, val_every=10, patience=2)
    ts = train_bns(flow, wrong, val, 4, init="euler", config=cfg, quiet=True).training_summary
    assert ts["stopped_early"] and ts["iterations"] == 20 and [h[0] for h in ts["history"]] == [0, 10, 20]


def test_a_killed_training_resumes_to_the_same_result(flow, pairs, tmp_path):
    train, val = pairs
    cfg = FitConfig(iterations=40, batch_size=32, lr=5e-3, val_every=10)
    ref = train_bns(flow, train, val, 4, init="euler", config=cfg, checkpoint=tmp_path / "a.ckpt", quiet=True)
    ckpt = tmp_path / "b.ckpt"
    # 4 NFE per rollout: initial validation, 25 iterations, validations at 10 and 20 -> dies inside iteration 26
    with pytest.raises(Killed):
        train_bns(
            killing_flow(flow, 4 * (1 + 25 + 2) + 2),
            train,
            val,
            4,
            init="euler",
            config=cfg,
            checkpoint=ckpt,
            quiet=True,
        )
    assert ckpt.exists()
    resumed = train_bns(flow, train, val, 4, init="euler", config=cfg, checkpoint=ckpt, quiet=True)
    for (k, p), q in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), k
    assert resumed.training_summary["history"] == ref.training_summary["history"]


def test_lbfgs_polish_improves_on_adam_and_resumes_exactly(flow, pairs, tmp_path):
    """Phase 2 (L-BFGS on the whole training set) starts from Adam's best and a kill inside it resumes exactly."""
    train, val = pairs
    adam_only = FitConfig(iterations=40, batch_size=32, lr=5e-3, val_every=20)
    polished = FitConfig(iterations=40, batch_size=32, lr=5e-3, val_every=20, polish_steps=4, polish_evals=5)
    a = train_bns(flow, train, val, 4, init="euler", config=adam_only, quiet=True).training_summary
    ref = train_bns(flow, train, val, 4, init="euler", config=polished, checkpoint=tmp_path / "a.ckpt", quiet=True)
    p = ref.training_summary
    assert p["history"][: len(a["history"])] == a["history"]  # the same Adam phase
    assert p["val_psnr"] > a["val_psnr"] + 0.5 and p["best_iteration"] > 40
    ckpt = tmp_path / "b.ckpt"
    # rollouts of 4 NFE: 1 + 40 + 2 validations in phase 1, then the first L-BFGS step and its validation
    # (2 training-set chunks of 4 NFE per evaluation); die during the second L-BFGS step
    evals_before = 4 * (1 + 40 + 2)
    with pytest.raises(Killed):
        train_bns(
            killing_flow(flow, evals_before + 4 * 64),
            train,
            val,
            4,
            init="euler",
            config=polished,
            checkpoint=ckpt,
            quiet=True,
        )
    assert torch.load(ckpt, weights_only=True)["step"] > 40  # it died inside phase 2
    resumed = train_bns(flow, train, val, 4, init="euler", config=polished, checkpoint=ckpt, quiet=True)
    for (k, v), w in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(v, w), k


def test_a_checkpoint_of_another_run_is_refused(flow, pairs, tmp_path):
    train, val = pairs
    ckpt = tmp_path / "c.ckpt"
    train_bns(
        flow, train, val, 4, init="euler", config=FitConfig(iterations=10, val_every=10), checkpoint=ckpt, quiet=True
    )
    with pytest.raises(BespokeError, match="another training run.*nfe"):
        train_bns(
            flow,
            train,
            val,
            5,
            init="euler",
            config=FitConfig(iterations=10, val_every=10),
            checkpoint=ckpt,
            quiet=True,
        )


# --- solver files ----------------------------------------------------------------------------------


@pytest.fixture
def trained(flow):
    return {n: perturbed(BNSSolver.from_solver(bespoke.solver("euler", n), flow, sigma0=2.0), seed=n) for n in (4, 8)}


def test_save_load_sample_round_trips_bit_for_bit(flow, trained, noise, tmp_path):
    path = tmp_path / "s.safetensors"
    trained[4].training_summary = {"val_psnr": 40.0}
    save_solvers(path, trained, flow)
    loaded = load_solvers(path, flow=flow)
    assert sorted(loaded) == [4, 8]
    with torch.no_grad():
        for n, s in trained.items():
            assert torch.equal(loaded[n].sample(flow, noise), s.sample(flow, noise))
    meta = read_metadata(path)
    assert meta["format"] == "bespoke-solver" and meta["version"] == 2
    assert meta["model"]["fingerprint"] == flow.fingerprint and meta["library_version"] == bespoke.__version__
    e = meta["solvers"]["4"]
    assert e["kind"] == "bns" and e["nfe"] == 4 and e["sigma0"] == 2.0 and e["init"] == "euler[uniform]"
    assert e["training"] == {"val_psnr": 40.0} and len(e["times"]) == 5
    # bespoke.solver(file, nfe) is the same solver, usable wherever a built-in one is
    s8 = bespoke.solver(str(path), nfe=8)
    assert s8.nfe == 8 and bespoke.evaluate(s8, flow, noise, noise).nfe == 8


def test_asking_for_an_nfe_the_file_lacks_lists_the_ones_it_has(flow, trained, tmp_path):
    path = tmp_path / "s.safetensors"
    save_solvers(path, trained, flow)
    with pytest.raises(BespokeError, match="no solver for NFE 16; it has NFE 4, 8"):
        load_solver(path, 16)
    with pytest.raises(BespokeError, match="choose one"):
        load_solver(path)


def test_a_file_for_another_model_is_refused_unless_forced(flow, trained, noise, tmp_path):
    path = tmp_path / "s.safetensors"
    save_solvers(path, trained, flow)
    other = bespoke.load_model("zoo:gmm2d", path="cosine")
    assert other.fingerprint != flow.fingerprint
    with pytest.raises(BespokeError, match="fingerprint .*force"):
        load_solver(path, 4, flow=other)
    s = load_solver(path, 4)  # loaded without a model: refused when it meets the wrong one
    with pytest.raises(BespokeError, match="trained for the model"):
        s.sample(other, noise)
    load_solver(path, 4, flow=other, force=True).sample(other, noise)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("damage", ["flip", "truncate", "version", "format", "shape"])
def test_damaged_files_give_one_line_errors_and_stay_untouched(damage, flow, trained, tmp_path):
    path = tmp_path / "s.safetensors"
    if damage in ("version", "format", "shape"):
        from bespoke.io import save_tensors

        tensors = {f"nfe4.{k}": v for k, v in trained[4].state_tensors().items()}
        meta = {
            "format": "bespoke-solver",
            "version": 1,
            "model": {"fingerprint": flow.fingerprint},
            "solvers": {"4": trained[4].file_entry()},
        }
        if damage == "version":
            meta["version"] = 99
        elif damage == "format":
            meta["format"] = "something-else"
        else:
            tensors["nfe4.b"] = tensors["nfe4.b"][:3]
        save_tensors(path, tensors, meta)
    else:
        save_solvers(path, trained, flow)
        data = bytearray(path.read_bytes())
        if damage == "flip":
            data[20:40] = b"\xff" * 20  # inside the JSON header
        else:
            data = data[: len(data) // 2]
        path.write_bytes(bytes(data))
    before = _digest(path)
    with pytest.raises(BespokeError) as info:
        load_solver(path, 4, flow=flow)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    assert {"version": "version 99", "format": "not a bespoke solver file", "shape": "nfe4.b"}.get(damage, "") in msg
    assert _digest(path) == before


def test_saving_an_invalid_solver_leaves_the_existing_file_alone(flow, trained, tmp_path):
    path = tmp_path / "s.safetensors"
    save_solvers(path, trained, flow)
    before = _digest(path)
    with torch.no_grad():
        trained[8].a[0] = float("nan")
    with pytest.raises(BespokeError, match="NaN"):
        save_solvers(path, trained, flow)
    assert _digest(path) == before and not list(tmp_path.glob("*.tmp"))


# --- the CLI treats a solver file like a built-in solver -------------------------------------------


def test_eval_cli_scores_a_solver_file_like_the_python_api(flow, trained, tmp_path, capsys):
    import json

    from bespoke import cli
    from bespoke.noise import draw_labels

    path = tmp_path / "bns.safetensors"
    save_solvers(path, trained, flow)
    out = tmp_path / "eval.json"
    argv = [
        "eval",
        "--model",
        "zoo:gmm2d",
        "--solvers",
        f"euler,{path}",
        "--nfe",
        "4,6,8",
        "--num",
        "64",
        "--labels",
        "random",
        "--quiet",
        "--json",
        str(out),
    ]
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    assert str(path) in table and "the file holds NFE 4, 8" in table  # NFE 6 is not in the file
    rows = {(r["solver"], r["nfe"]): r for r in json.loads(out.read_text())["results"]}
    noise = bespoke.draw_noise((2,), 64, 0, dtype=F64)
    labels = draw_labels(64, flow.num_classes, 0)
    gt = bespoke.ground_truth(flow, noise, labels=labels)
    for nfe in (4, 8):
        with torch.no_grad():
            want = bespoke.psnr(trained[nfe].sample(flow, noise, labels=labels), gt)
        assert rows[str(path), nfe]["psnr_db"] == pytest.approx(want, abs=1e-9)
    # a file made for another model: exit 2 with one line, unless --force
    argv[2] = "zoo:gmm2d"
    rc = cli.main(argv + ["--path", "cosine"])
    err = capsys.readouterr().err
    assert rc == 2 and "fingerprint" in err and err.count("\n") == 1
    assert cli.main(argv + ["--path", "cosine", "--force"]) == 0
