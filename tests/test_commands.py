"""`bespoke gt`, `train`, `sample`, `info` and model specs, driven through the command line.

Most runs go through `cli.main` in-process (what `python -m bespoke` calls) on the analytic 2-D
mixture; one module-scoped chain makes a GT cache and a solver file that the other tests share.
"""

from __future__ import annotations

import json
import shutil
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import bespoke
from bespoke import cli
from bespoke.noise import draw_noise

MODEL = ["--model", "zoo:gmm2d"]


def train_bns_argv(gt) -> list:
    """The BNS training (NFE 4 and 6, 6 iterations) whose file the `made` fixture holds."""
    return ["train", *MODEL, "--solver", "bns", "--nfe", "4,6", "--gt", gt, "--val-samples", "16", "--iterations", "6"]


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(result, *words) -> None:
    rc, out, err = result
    assert rc == 2, (out, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bespoke: error: "), err
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A GT cache with trajectories and a BNS file (NFE 4 and 6) and an RK2 file (NFE 4) for zoo:gmm2d."""
    tmp = tmp_path_factory.mktemp("commands")
    gt, bns, rk2 = tmp / "gt", tmp / "bns.safetensors", tmp / "rk2.safetensors"
    common = [*MODEL, "--gt", gt, "--val-samples", "16", "--iterations", "6", "--quiet"]
    steps = [
        ["gt", *MODEL, "--num", "48", "--out", gt, "--trajectory", "9", "--shard-size", "16", "--quiet"],
        [*train_bns_argv(gt), "--out", bns, "--quiet"],
        ["train", *common, "--solver", "bespoke-rk2", "--nfe", "4", "--out", rk2],
    ]
    for argv in steps:
        assert cli.main([str(a) for a in argv]) == 0, argv
    return {"tmp": tmp, "gt": gt, "bns": bns, "rk2": rk2}


def test_gt_then_train_writes_valid_solver_files(made):
    cache = bespoke.load_gt(made["gt"], bespoke.load_model("zoo:gmm2d"))
    assert len(cache) == 48 and cache.trajectory_states is not None
    bns = bespoke.load_solvers(made["bns"], flow=bespoke.load_model("zoo:gmm2d"))
    assert sorted(bns) == [4, 6]
    assert bns[4].training_summary["val_pairs"] == 16 and bns[4].training_summary["train_pairs"] == 32
    assert sorted(bespoke.load_solvers(made["rk2"])) == [4]
    leftovers = [p.name for p in made["tmp"].iterdir() if p.name.endswith((".tmp", ".ckpt"))]
    assert leftovers == []  # checkpoints removed after success, no temporary files


def test_info_prints_nfes_fingerprint_and_training(made, capsys):
    flow = bespoke.load_model("zoo:gmm2d")
    rc, out, _ = run(capsys, "info", made["bns"])
    assert rc == 0
    assert "NFE 4: bns" in out and "NFE 6: bns" in out
    assert flow.fingerprint in out and "validation PSNR" in out and "on 16 pairs" in out
    rc, out, _ = run(capsys, "info", made["bns"], "--json")
    assert rc == 0 and sorted(json.loads(out)["solvers"]) == ["4", "6"]
    rc, out, _ = run(capsys, "info", made["gt"])
    assert rc == 0 and "48 pairs" in out and "trajectories at 9 times" in out and flow.fingerprint in out


@pytest.mark.parametrize("solver", ["dpm++2m", "bns"])
def test_sample_same_seed_any_batch_size(made, solver, capsys, tmp_path):
    name = made["bns"] if solver == "bns" else solver
    outs = []
    for batch in (7, 64):
        out = tmp_path / f"s{batch}.safetensors"
        rc, _, err = run(
            capsys,
            "sample",
            *MODEL,
            "--solver",
            name,
            "--nfe",
            "4",
            "--num",
            "20",
            "--seed",
            "5",
            "--batch-size",
            batch,
            "--dtype",
            "float64",
            "--labels",
            "random",
            "--out",
            out,
            "--quiet",
        )
        assert rc == 0, err
        outs.append(load_file(out))
    a, b = outs
    assert torch.equal(a["samples"], b["samples"]) and torch.equal(a["noise"], b["noise"])
    assert torch.equal(a["labels"], b["labels"])
    flow = bespoke.load_model("zoo:gmm2d")
    noise = draw_noise(flow.sample_shape, 20, 5, dtype=torch.float64)
    assert torch.equal(a["noise"], noise)
    s = bespoke.load_solver(made["bns"], 4) if solver == "bns" else bespoke.solver(solver, 4)
    with torch.no_grad():
        direct = s.sample(flow, noise, labels=a["labels"])
    torch.testing.assert_close(a["samples"], direct, rtol=0, atol=1e-12)


def test_sample_from_noise_file_and_grid(made, capsys, tmp_path):
    noise_file, out, grid = tmp_path / "n.safetensors", tmp_path / "o.safetensors", tmp_path / "g.png"
    save_file({"noise": torch.randn(6, 2, dtype=torch.float64), "labels": torch.arange(6) % 3}, str(noise_file))
    rc, stdout, err = run(
        capsys,
        "sample",
        *MODEL,
        "--solver",
        made["rk2"],
        "--noise",
        noise_file,
        "--out",
        out,
        "--grid",
        grid,
        "--quiet",
    )
    assert rc == 0, err
    got = load_file(out)
    assert got["samples"].shape == (6, 2) and got["samples"].dtype == torch.float32
    assert torch.equal(got["labels"], torch.arange(6) % 3)
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "6 samples" in stdout and "NFE 4" in stdout


def test_model_specs_python_file_and_module(tmp_path, monkeypatch, capsys):
    (tmp_path / "mymodel.py").write_text(
        textwrap.dedent(
            """
            import torch

            class Net(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.lin = torch.nn.Linear(2, 2)

                def forward(self, x, t):
                    return self.lin(x)

            def make():
                torch.manual_seed(0)
                return Net().double(), {"prediction": "velocity", "scheduler": "condot", "sample_shape": (2,)}

            def make_flow():
                return bespoke.load_model("zoo:gmm2d")

            import bespoke
            """
        )
    )
    spec = f"python:{tmp_path / 'mymodel.py'}:make"
    a, b = bespoke.load_model(spec), bespoke.load_model(spec)
    assert a.fingerprint is not None and a.fingerprint == b.fingerprint  # same weights, same fingerprint
    assert a.name == spec and a.sample_shape == (2,)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert bespoke.load_model("mymodel:make").fingerprint == a.fingerprint
    assert bespoke.load_model("mymodel:make_flow").fingerprint == bespoke.load_model("zoo:gmm2d").fingerprint
    rc, out, err = run(capsys, "eval", "--model", spec, "--solvers", "euler", "--nfe", "4", "--num", "8", "--quiet")
    assert rc == 0, err and "euler" in out


def _corrupt(path):
    path.write_bytes(b"\x00garbage" * 10)
    return path


BAD = {
    # name: (argv after the command, words the one-line error must hold)
    "unknown-model": (
        [
            "sample",
            "--model",
            "zoo:nosuch",
            "--solver",
            "euler",
            "--nfe",
            "4",
            "--num",
            "2",
            "--out",
            "{tmp}/o.safetensors",
        ],
        ["zoo:nosuch", "zoo:gmm2d"],
    ),
    "missing-python-file": (
        [
            "sample",
            "--model",
            "python:{tmp}/none.py:make",
            "--solver",
            "euler",
            "--nfe",
            "4",
            "--num",
            "2",
            "--out",
            "{tmp}/o.safetensors",
        ],
        ["none.py", "no such file"],
    ),
    "missing-module": (
        [
            "sample",
            "--model",
            "nosuchmodule:make",
            "--solver",
            "euler",
            "--nfe",
            "4",
            "--num",
            "2",
            "--out",
            "{tmp}/o.safetensors",
        ],
        ["nosuchmodule", "python:FILE.py:FUNC"],
    ),
    "unknown-solver": (
        [*["sample", *MODEL], "--solver", "nosuch", "--nfe", "4", "--num", "2", "--out", "{tmp}/o.safetensors"],
        ["nosuch", "dpm++2m"],
    ),
    "solver-needs-nfe": (
        [*["sample", *MODEL], "--solver", "rk4", "--nfe", "6", "--num", "2", "--out", "{tmp}/o.safetensors"],
        ["rk4", "NFE 6", "--nfe 4"],
    ),
    "file-for-another-model": (
        [
            *["sample", *MODEL],
            "--path",
            "cosine",
            "--solver",
            "{bns}",
            "--nfe",
            "4",
            "--num",
            "2",
            "--out",
            "{tmp}/o.safetensors",
        ],
        ["bns.safetensors", "fingerprint"],
    ),
    "nfe-not-in-file": (
        [*["sample", *MODEL], "--solver", "{bns}", "--nfe", "5", "--num", "2", "--out", "{tmp}/o.safetensors"],
        ["no solver for NFE 5", "NFE 4, 6"],
    ),
    "file-needs-nfe": (
        [*["sample", *MODEL], "--solver", "{bns}", "--num", "2", "--out", "{tmp}/o.safetensors"],
        ["NFE 4, 6", "--nfe"],
    ),
    "bad-noise-shape": (
        [
            *["sample", *MODEL],
            "--solver",
            "euler",
            "--nfe",
            "4",
            "--noise",
            "{wrong_noise}",
            "--out",
            "{tmp}/o.safetensors",
        ],
        ["'noise'", "(batch, 2)"],
    ),
    "unwritable-out": (
        [*["sample", *MODEL], "--solver", "euler", "--nfe", "4", "--num", "2", "--out", "{tmp}/missing/o.safetensors"],
        ["--out", "missing"],
    ),
    "corrupt-solver-file": (
        [*["sample", *MODEL], "--solver", "{corrupt}", "--nfe", "4", "--num", "2", "--out", "{tmp}/o.safetensors"],
        ["corrupt.safetensors", "not a valid"],
    ),
    "corrupt-info": (["info", "{corrupt}"], ["corrupt.safetensors", "not a valid"]),
    "eval-gt-other-model": (
        ["eval", *MODEL, "--path", "cosine", "--gt", "{gt}", "--solvers", "euler", "--nfe", "4"],
        ["{gt}", "fingerprint"],
    ),
    "train-gt-without-trajectories": (
        [
            "train",
            *MODEL,
            "--solver",
            "bespoke-rk2",
            "--nfe",
            "4",
            "--gt",
            "{gt_plain}",
            "--val-samples",
            "8",
            "--out",
            "{tmp}/r.safetensors",
        ],
        ["trajectories", "--trajectory"],
    ),
    "train-gt-too-small": (
        [
            "train",
            *MODEL,
            "--solver",
            "bns",
            "--nfe",
            "4",
            "--gt",
            "{gt_plain}",
            "--val-samples",
            "8",
            "--train-samples",
            "100",
            "--out",
            "{tmp}/r.safetensors",
        ],
        ["holds 16 pairs", "bespoke gt --model zoo:gmm2d --num 108 --seed 0 --shard-size 16"],
    ),
    "train-precondition-bespoke": (
        [
            "train",
            *MODEL,
            "--solver",
            "bespoke-rk1",
            "--nfe",
            "4",
            "--precondition",
            "2",
            "--out",
            "{tmp}/r.safetensors",
        ],
        ["--precondition", "bns"],
    ),
    "demo-out-under-file": (["demo", *MODEL, "--fast", "--out", "{tmp}/a-file/demo"], ["--out", "a-file"]),
    "corrupt-gt-shard": (["eval", *MODEL, "--gt", "{gt_bad}", "--solvers", "euler", "--nfe", "4"], ["gt-bad", "shard"]),
    "plot-not-png": (
        ["eval", *MODEL, "--solvers", "euler", "--nfe", "4", "--num", "4", "--plot", "{tmp}/p.txt"],
        ["--plot", "p.txt", ".png"],
    ),
    "grid-not-png": (
        [*["sample", *MODEL], "--solver", "euler", "--nfe", "4", "--num", "2", "--out", "{tmp}/o.safetensors"]
        + ["--grid", "{tmp}/g.jpg"],
        ["--grid", "g.jpg", ".png"],
    ),
    "sample-nfe-beyond-memory": (
        [*["sample", *MODEL], "--solver", "euler", "--nfe", str(10**12), "--num", "2", "--out", "{tmp}/o.safetensors"],
        ["NFE 1000000000000", "needs about", "available in cpu memory"],
    ),
    "sample-num-beyond-disk": (
        [*["sample", *MODEL], "--solver", "euler", "--nfe", "4", "--num", str(10**14), "--out", "{tmp}/o.safetensors"],
        ["100000000000000 samples", "needs about", "free on the disk"],
    ),
    "eval-nfe-beyond-memory": (
        ["eval", *MODEL, "--solvers", "euler", "--nfe", str(10**12)],
        ["NFE up to 1000000000000", "needs about", "--num"],
    ),
    "eval-num-beyond-memory": (
        ["eval", *MODEL, "--solvers", "euler", "--nfe", "4", "--num", str(10**12)],
        ["evaluating 1000000000000 samples", "needs about"],
    ),
    "train-nfe-beyond-memory": (
        ["train", *MODEL, "--solver", "bns", "--nfe", str(10**9), "--out", "{tmp}/r.safetensors"],
        ["training a solver at NFE 1000000000", "needs about", "lower --nfe"],
    ),
    "demo-nfe-beyond-memory": (
        ["demo", *MODEL, "--fast", "--nfe", str(10**9), "--out", "{tmp}/demo-huge"],
        ["training a solver at NFE 1000000000", "needs about"],
    ),
    "gt-num-beyond-disk": (
        ["gt", *MODEL, "--num", str(10**14), "--out", "{tmp}/gt-huge"],
        ["GT cache of 100000000000000 pairs", "needs about", "free on the disk"],
    ),
    "eval-missing-solver-file": (
        ["eval", *MODEL, "--solvers", "euler,{tmp}/none.safetensors", "--nfe", "4", "--num", "4"],
        ["none.safetensors is missing"],
    ),
    "model-returns-wrong-shape": (
        [*["sample", "--model", "python:{wrong_model}:make"], "--solver", "euler", "--nfe", "4", "--num", "3"]
        + ["--out", "{tmp}/o.safetensors", "--quiet"],
        ["returned (1, 2) for an input of shape (3, 2)", "eps prediction"],
    ),
    "sample-labels-out-of-range": (
        [
            *["sample", *MODEL],
            "--solver",
            "euler",
            "--nfe",
            "4",
            "--num",
            "2",
            "--labels",
            "7",
            "--out",
            "{tmp}/o.safetensors",
        ],
        ["--labels 7", "0..2"],
    ),
}


@pytest.fixture(scope="module")
def bad_files(made):
    tmp = made["tmp"] / "bad"
    tmp.mkdir()
    (tmp / "a-file").write_text("x")
    save_file({"noise": torch.randn(3, 5)}, str(tmp / "wrong.safetensors"))
    (made["tmp"] / "wrongmodel.py").write_text(  # outside tmp: its bytecode cache must not count as output
        "import torch\n\n"
        "def make():\n"
        "    net = lambda x, t: x[:1]  # one sample for the whole batch: would broadcast silently\n"
        "    return net, {'prediction': 'eps', 'scheduler': 'condot', 'sample_shape': (2,)}\n"
    )
    assert cli.main(["gt", *MODEL, "--num", "16", "--shard-size", "16", "--out", str(tmp / "gt-plain"), "--quiet"]) == 0
    shutil.copytree(tmp / "gt-plain", tmp / "gt-bad")
    shard = sorted((tmp / "gt-bad").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-8] + b"\x00" * 8)  # same size, different bytes
    return {
        "tmp": tmp,
        "gt_bad": tmp / "gt-bad",
        "bns": made["bns"],
        "gt": made["gt"],
        "gt_plain": tmp / "gt-plain",
        "wrong_noise": tmp / "wrong.safetensors",
        "wrong_model": made["tmp"] / "wrongmodel.py",
        "corrupt": _corrupt(tmp / "corrupt.safetensors"),
    }


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, bad_files, capsys):
    argv, words = BAD[case]
    fill = {k: str(v) for k, v in bad_files.items()}
    before = sorted(p.name for p in bad_files["tmp"].iterdir())
    one_line_error(run(capsys, *[a.format(**fill) for a in argv]), *[w.format(**fill) for w in words])
    assert sorted(p.name for p in bad_files["tmp"].iterdir()) == before  # no output, no temporary file


def test_train_refuses_to_overwrite_unfinished_checkpoints_without_resume(made, capsys, tmp_path):
    out = tmp_path / "s.safetensors"
    (tmp_path / "s.safetensors.ckpt").mkdir()
    (tmp_path / "s.safetensors.ckpt" / "bns-nfe4.pt").write_bytes(b"x")
    argv = ["train", *MODEL, "--solver", "bns", "--nfe", "4", "--gt", made["gt"], "--val-samples", "16", "--out", out]
    one_line_error(run(capsys, *argv), "unfinished run", "--resume")
    assert not out.exists()


def test_train_resume_matches_an_uninterrupted_run(made, capsys, tmp_path, monkeypatch):
    """Kill training at its second NFE, resume with --resume: the file equals an uninterrupted run's."""
    argv = [*train_bns_argv(made["gt"]), "--quiet"]
    real = bespoke.train_bns
    calls = []

    def dies_on_second(*args, **kwargs):
        calls.append(args[3])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bespoke, "train_bns", dies_on_second)
    rc, _, err = run(capsys, *argv, "--out", tmp_path / "k.safetensors")
    assert rc == 130 and "resume" in err and not (tmp_path / "k.safetensors").exists()
    assert (tmp_path / "k.safetensors.ckpt" / "bns-nfe4.pt").exists()
    monkeypatch.setattr(bespoke, "train_bns", real)
    assert run(capsys, *argv, "--out", tmp_path / "k.safetensors", "--resume")[0] == 0
    resumed, whole = load_file(tmp_path / "k.safetensors"), load_file(made["bns"])
    assert resumed.keys() == whole.keys()
    for k in whole:
        assert torch.equal(resumed[k], whole[k]), k


def test_resume_with_another_nfe_keeps_the_other_runs_checkpoints(made, capsys, tmp_path, monkeypatch):
    """A run killed at NFE 6 leaves bns-nfe6.pt; `--resume --nfe 4` trains NFE 4 and must not delete it."""
    from bespoke.train import loop

    out = tmp_path / "k.safetensors"
    real = loop._save_checkpoint

    def killed_after_saving(*args):
        real(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_save_checkpoint", killed_after_saving)
    argv = ["train", *MODEL, "--solver", "bns", "--gt", made["gt"], "--val-samples", "16", "--iterations", "6"]
    rc, _, err = run(capsys, *argv, "--nfe", "6", "--out", out, "--quiet")
    assert rc == 130 and "with --resume" in err  # the Ctrl-C message says how to continue
    ckpt = tmp_path / "k.safetensors.ckpt" / "bns-nfe6.pt"
    before = ckpt.read_bytes()
    monkeypatch.setattr(loop, "_save_checkpoint", real)
    rc, _, err = run(capsys, *argv, "--nfe", "4", "--out", out, "--resume")
    assert rc == 0 and "bns-nfe6.pt" in err and "kept" in err
    assert ckpt.read_bytes() == before and sorted(bespoke.load_solvers(out)) == [4]
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["bns-nfe6.pt"]  # NFE 4's own checkpoint is gone
    rc, _, err = run(capsys, *argv, "--nfe", "6", "--out", out, "--resume", "--quiet")  # and it still resumes
    assert rc == 0 and not ckpt.parent.exists() and sorted(bespoke.load_solvers(out)) == [6]


@pytest.fixture(scope="module")
def checkpoint(made, tmp_path_factory):
    """A real checkpoint of BNS training at NFE 4 (the state `train --resume` reads)."""
    from bespoke.train import loop

    out = tmp_path_factory.mktemp("ckpt") / "c.safetensors"
    argv = ["train", *MODEL, "--solver", "bns", "--nfe", "4", "--gt", made["gt"], "--val-samples", "16"]
    real = loop._save_checkpoint

    def killed_after_saving(*args):
        real(*args)
        raise KeyboardInterrupt

    loop._save_checkpoint = killed_after_saving
    try:
        assert cli.main([str(a) for a in [*argv, "--iterations", "6", "--out", out, "--quiet"]]) == 130
    finally:
        loop._save_checkpoint = real
    return torch.load(f"{out}.ckpt/bns-nfe4.pt", weights_only=True), argv


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda st: [1, 2], "not a training checkpoint"),
        (lambda st: {k: v for k, v in st.items() if k != "adam"}, "no adam"),
        (lambda st: dict(st, module={k: v[:1] for k, v in st["module"].items()}), "wrong structure"),
        (lambda st: dict(st, history="x"), "wrong structure"),
        (lambda st: dict(st, best_val="x"), "wrong structure"),
        (lambda st: dict(st, best={}), "wrong structure"),
        (lambda st: dict(st, signature=[]), "another training run"),
    ],
)
def test_a_checkpoint_of_the_wrong_structure_is_one_line_exit_2(damage, words, checkpoint, capsys, tmp_path):
    state, argv = checkpoint
    out = tmp_path / "c.safetensors"
    (tmp_path / "c.safetensors.ckpt").mkdir()
    torch.save(damage(state), tmp_path / "c.safetensors.ckpt" / "bns-nfe4.pt")
    one_line_error(run(capsys, *argv, "--iterations", "6", "--out", out, "--resume"), words, "delete")
    assert not out.exists() and (tmp_path / "c.safetensors.ckpt" / "bns-nfe4.pt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_cuda_is_exit_2(capsys, tmp_path):
    argv = ["sample", *MODEL, "--solver", "euler", "--nfe", "4", "--num", "2", "--out", tmp_path / "o.safetensors"]
    one_line_error(run(capsys, *argv, "--device", "cuda"), "--device cuda", "--device cpu")


def test_train_without_gt_makes_its_pairs_beside_the_output(capsys, tmp_path):
    out = tmp_path / "b.safetensors"
    argv = [
        "train",
        *MODEL,
        "--solver",
        "bespoke-rk1",
        "--nfe",
        "3",
        "--val-samples",
        "8",
        "--train-samples",
        "8",
        "--iterations",
        "2",
        "--out",
        out,
        "--quiet",
    ]
    rc, stdout, err = run(capsys, *argv)
    assert rc == 0, err
    assert "bespoke-rk1 NFE 3" in stdout and f"wrote {out}" in stdout
    cache = bespoke.load_gt(tmp_path / "b.safetensors.gt")
    assert len(cache) >= 16 and cache.trajectory_states is not None  # Bespoke needs the trajectories
    assert sorted(bespoke.load_solvers(out)) == [3]


def test_eval_plot_and_json_from_a_gt_cache(made, capsys, tmp_path):
    plot, out = tmp_path / "p.png", tmp_path / "e.json"
    argv = [
        "eval",
        *MODEL,
        "--gt",
        made["gt"],
        "--num",
        "16",
        "--solvers",
        f"euler,{made['bns']}",
        "--nfe",
        "4,6",
        "--plot",
        plot,
        "--json",
        out,
        "--quiet",
    ]
    rc, stdout, err = run(capsys, *argv)
    assert rc == 0, err
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(out.read_text())
    assert data["ground_truth"]["gt_dir"] == str(made["gt"]) and data["ground_truth"]["num"] == 16
    assert {(r["solver"], r["requested_nfe"]) for r in data["results"]} == {
        ("euler", 4),
        ("euler", 6),
        (str(made["bns"]), 4),
        (str(made["bns"]), 6),
    }
    assert "16 samples (GT cache" in stdout


def test_train_with_grad_checkpoint_gives_the_same_solver(made, capsys, tmp_path):
    out = tmp_path / "c.safetensors"
    argv = [*train_bns_argv(made["gt"]), "--grad-checkpoint", "--out", out, "--quiet"]
    assert run(capsys, *argv)[0] == 0
    a, b = load_file(out), load_file(made["bns"])
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-12)


def test_sample_streams_each_batch_to_the_file(made, capsys, tmp_path, monkeypatch):
    """Noise is read and samples are written one batch at a time; the file equals one big in-memory solve."""
    from bespoke.cli import common
    from bespoke.io import StreamedTensors

    noise_file, out = tmp_path / "n.safetensors", tmp_path / "o.safetensors"
    noise = torch.randn(23, 2, dtype=torch.float64)
    save_file({"noise": noise, "labels": torch.arange(23) % 3}, str(noise_file))
    writes, reads = [], []
    real_write, real_noise = StreamedTensors.write, common.NoiseFile.noise
    monkeypatch.setattr(
        StreamedTensors, "write", lambda f, name, a, rows: writes.append(rows.shape[0]) or real_write(f, name, a, rows)
    )
    monkeypatch.setattr(common.NoiseFile, "noise", lambda f, a, b: reads.append(b - a) or real_noise(f, a, b))
    argv = ["sample", *MODEL, "--solver", "dpm++2m", "--nfe", "6", "--noise", noise_file, "--out", out]
    assert run(capsys, *argv, "--batch-size", "10", "--dtype", "float64", "--quiet")[0] == 0
    assert reads == [10, 10, 3] and writes == [10, 10, 10, 10, 10, 10, 3, 3, 3]  # noise, samples, labels
    got, flow = load_file(out), bespoke.load_model("zoo:gmm2d")
    with torch.no_grad():
        direct = bespoke.solver("dpm++2m", 6).sample(flow, noise, labels=torch.arange(23) % 3)
    assert torch.equal(got["noise"], noise) and torch.equal(got["labels"], torch.arange(23) % 3)
    torch.testing.assert_close(got["samples"], direct, rtol=0, atol=1e-12)


def test_eval_reports_n_a_for_a_solver_that_cannot_run_on_the_model(capsys, tmp_path):
    """heun and rk4 evaluate an eps/VP model at t = 1, where it is singular: n/a cells, exit 0."""
    (tmp_path / "epsmodel.py").write_text(
        textwrap.dedent(
            """
            import torch

            def make():
                torch.manual_seed(0)
                net = torch.nn.Linear(2, 2).double()
                return (lambda x, t: net(x)), {"prediction": "eps", "scheduler": "vp", "sample_shape": (2,)}
            """
        )
    )
    out = tmp_path / "e.json"
    argv = ["eval", "--model", f"python:{tmp_path / 'epsmodel.py'}:make", "--solvers", "all", "--nfe", "4"]
    rc, stdout, err = run(capsys, *argv, "--num", "8", "--json", out, "--quiet")
    assert rc == 0, err
    rows = {line.split()[0]: line.split()[1:] for line in stdout.splitlines() if line[:1].isalpha()}
    assert rows["heun"] == ["n/a"] and rows["rk4"] == ["n/a"] and rows["dpm++2m"][0] != "n/a"
    assert "n/a heun: cannot run on this model" in stdout and "singular" in stdout
    data = json.loads(out.read_text())
    assert {s["solver"] for s in data["skipped"]} == {"heun", "rk4"} and data["failed"] == []


def test_eval_checks_solver_files_before_solving_the_ground_truth(capsys, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the ground truth was solved before the solver files were checked")

    monkeypatch.setattr(bespoke, "ground_truth", never)
    argv = ["eval", *MODEL, "--solvers", f"euler,{tmp_path / 'none.safetensors'}", "--nfe", "4", "--num", "4"]
    one_line_error(run(capsys, *argv), "none.safetensors is missing")


def test_the_command_that_extends_a_small_cache_works(made, capsys, tmp_path):
    """`train` on too small a cache suggests a `bespoke gt` command; run as given, it makes training possible."""
    gt = tmp_path / "gt"
    shutil.copytree(made["gt"], gt)
    argv = ["train", *MODEL, "--solver", "bespoke-rk2", "--nfe", "4", "--gt", gt, "--val-samples", "16"]
    argv += ["--train-samples", "40", "--iterations", "2", "--out", tmp_path / "r.safetensors", "--quiet"]
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and "--trajectory 9" in err
    suggested = err.split("`")[1]
    assert suggested.startswith("bespoke gt ")
    assert cli.main(suggested.split()[1:] + ["--quiet"]) == 0
    assert run(capsys, *argv)[0] == 0
