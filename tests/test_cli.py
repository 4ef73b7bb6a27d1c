"""The `bespoke` command, driven as a user drives it: `python -m bespoke ...` in a subprocess.

The subprocesses are started together (each spends most of its time importing torch) and their
results shared by the tests below, which keeps this file to a few seconds of wall time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import bespoke
from bespoke import cli
from bespoke.noise import draw_noise

NUM, SEED = 64, 3


def _cases(tmp: str) -> dict[str, list[str]]:
    a_file = os.path.join(tmp, "a-file")
    with open(a_file, "w") as f:
        f.write("x")
    ev = ["eval", "--model", "zoo:gmm2d", "--num", str(NUM)]
    return {
        "two": ev
        + ["--solvers", "euler,edm-heun", "--nfe", "4,8", "--seed", str(SEED), "--json", os.path.join(tmp, "two.json")],
        "all": ev + ["--solvers", "all", "--nfe", "2,4", "--quiet", "--json", os.path.join(tmp, "all.json")],
        "version": ["--version"],
        "unknown-solver": ev + ["--solvers", "euler,nosuch", "--nfe", "4"],
        "json-under-file": ev + ["--solvers", "euler", "--nfe", "4", "--json", os.path.join(a_file, "o.json")],
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("cli"))
    env = {k: v for k, v in os.environ.items() if k != "BESPOKE_DEBUG"}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "bespoke", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp,
        )
        for name, args in _cases(tmp).items()
    }
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        out[name] = (p.returncode, stdout, stderr)
    out["tmp"] = tmp
    return out


def _table(stdout: str) -> dict[str, list[str]]:
    """Rows of the PSNR table: solver name -> cell strings."""
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if parts and parts[0] in bespoke.SOLVER_NAMES:
            rows[parts[0]] = parts[1:]
    return rows


def test_two_solvers_table(runs):
    rc, stdout, stderr = runs["two"]
    assert rc == 0, stderr
    header = stdout.splitlines()[0]
    for part in (
        "zoo:gmm2d",
        "path condot",
        f"{NUM} samples",
        f"seed {SEED}",
        "dopri5",
        "rtol=1e-05",
        "atol=1e-05",
        "NFE per sample",
    ):
        assert part in header
    assert "NFE 4" in stdout and "NFE 8" in stdout
    rows = _table(stdout)
    assert set(rows) == {"euler", "edm-heun"}
    assert not any(c.endswith("*") for c in rows["euler"])
    assert all(c.endswith("*") for c in rows["edm-heun"])  # ran at NFE 3 and 7
    assert "* edm-heun ran at NFE 3 for 4, 7 for 8: it takes NFE = 1, 3, 5" in stdout
    assert "data range 2" in stdout and "counts as one" in stdout
    assert "Traceback" not in stderr
    assert "%|" in stderr  # the progress bar, on stderr


def test_two_solvers_json_matches_python_api(runs):
    rc, stdout, _ = runs["two"]
    assert rc == 0
    with open(os.path.join(runs["tmp"], "two.json")) as f:
        data = json.load(f)
    assert not [n for n in os.listdir(runs["tmp"]) if n.endswith(".tmp")]  # atomic write left nothing behind

    flow = bespoke.load_model("zoo:gmm2d", path="condot")
    noise = draw_noise(flow.sample_shape, NUM, SEED, dtype=torch.float64)
    gt = bespoke.ground_truth(flow, noise, rtol=1e-5, atol=1e-5)
    settings = data["ground_truth"]
    assert settings | {"seconds": 0} == settings | {
        "solver": "dopri5",
        "rtol": 1e-5,
        "atol": 1e-5,
        "nfe": gt.nfe,
        "seed": SEED,
        "num": NUM,
        "model": "zoo:gmm2d",
        "path": "condot",
        "seconds": 0,
    }

    results = data["results"]
    assert [(r["solver"], r["requested_nfe"], r["nfe"]) for r in results] == [
        ("euler", 4, 4),
        ("euler", 8, 8),
        ("edm-heun", 4, 3),
        ("edm-heun", 8, 7),
    ]
    rows = _table(stdout)
    for i, r in enumerate(results):
        assert set(r) >= {"solver", "nfe", "psnr_db", "rmse", "num_samples", "seconds"}
        assert r["num_samples"] == NUM
        expected = bespoke.evaluate(bespoke.solver(r["solver"], nfe=r["nfe"]), flow, noise, gt.samples)
        assert r["nfe"] == expected.nfe
        assert r["psnr_db"] == pytest.approx(expected.psnr_db, abs=1e-9)
        assert r["rmse"] == pytest.approx(expected.rmse, abs=1e-12)
        assert rows[r["solver"]][i % 2].rstrip("*") == f"{expected.psnr_db:.2f}"  # the table shows the same


def test_all_solvers_quiet(runs):
    rc, stdout, stderr = runs["all"]
    assert rc == 0, stderr
    assert stderr == ""  # --quiet: no progress bar, nothing at all
    rows = _table(stdout)
    assert list(rows) == list(bespoke.SOLVER_NAMES)
    assert rows["rk4"][0] == "-" and rows["rk4"][1][0].isdigit()  # no valid NFE <= 2; NFE 4 runs
    assert "- rk4 at NFE 2: no valid NFE" in stdout
    with open(os.path.join(runs["tmp"], "all.json")) as f:
        data = json.load(f)
    ran = {(r["solver"], r["requested_nfe"]) for r in data["results"]}
    assert ("rk4", 2) not in ran and ("rk4", 4) in ran
    assert {"solver": "rk4", "requested_nfe": 2} == {k: data["skipped"][0][k] for k in ("solver", "requested_nfe")}
    assert len(ran) == 2 * len(bespoke.SOLVER_NAMES) - 1


def test_version(runs):
    rc, stdout, _ = runs["version"]
    assert rc == 0 and stdout.strip() == f"bespoke {bespoke.__version__}"


BAD_INPUT = {
    "unknown-solver": (["--solvers", "euler,nosuch", "--nfe", "4"], ["nosuch", *bespoke.SOLVER_NAMES]),
    "unknown-model": (["--model", "zoo:nosuch", "--solvers", "euler", "--nfe", "4"], ["nosuch", "zoo:gmm2d"]),
    "bad-spec": (["--model", "nosuch", "--solvers", "euler", "--nfe", "4"], ["nosuch", "zoo:NAME"]),
    "nfe-abc": (["--solvers", "euler", "--nfe", "abc"], ["--nfe", "abc"]),
    "nfe-zero": (["--solvers", "euler", "--nfe", "4,0"], ["--nfe", ">= 1"]),
    "json-no-dir": (["--solvers", "euler", "--nfe", "4", "--json", "{tmp}/missing/o.json"], ["--json", "missing"]),
    "json-under-file": (["--solvers", "euler", "--nfe", "4", "--json", "{tmp}/a-file/o.json"], ["--json", "a-file"]),
    "json-is-dir": (["--solvers", "euler", "--nfe", "4", "--json", "{tmp}"], ["--json", "directory"]),
    "bad-labels": (["--solvers", "euler", "--nfe", "4", "--labels", "x"], ["--labels", "random"]),
    "bad-label": (["--solvers", "euler", "--nfe", "4", "--labels", "9"], ["--labels", "0..2"]),
    "bad-rtol": (["--solvers", "euler", "--nfe", "4", "--rtol", "-1"], ["--rtol"]),
    "bad-path": (["--solvers", "euler", "--nfe", "4", "--path", "nosuch"], ["--path", "condot"]),
    "missing-flag": (["--solvers", "euler"], ["--nfe"]),
}


def _check_one_line_error(rc, stdout, stderr, words):
    assert rc == 2
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bespoke: error: "), stderr
    for w in words:
        assert w in lines[0]


@pytest.mark.parametrize("case", ["unknown-solver", "json-under-file"])
def test_bad_input_subprocess(runs, case):
    """As a user sees it: exit 2 and one line, no traceback."""
    _check_one_line_error(*runs[case], BAD_INPUT[case][1])


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2(case, tmp_path, capsys):
    """Every kind of bad input, through cli.main (what `python -m bespoke` runs)."""
    (tmp_path / "a-file").write_text("x")
    args, words = BAD_INPUT[case]
    args = [a.format(tmp=tmp_path) for a in args]
    if "--model" not in args:
        args = ["--model", "zoo:gmm2d", *args]
    rc = cli.main(["eval", "--num", "8", "--quiet", *args])
    out, err = capsys.readouterr()
    _check_one_line_error(rc, out, err, words)


def test_internal_error_exit_1(monkeypatch, capsys):
    """An unexpected exception: one line and exit 1; the traceback only with BESPOKE_DEBUG=1."""

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(bespoke, "ground_truth", broken)
    argv = ["eval", "--model", "zoo:gmm2d", "--solvers", "euler", "--nfe", "4", "--num", "4", "--quiet"]
    monkeypatch.delenv("BESPOKE_DEBUG", raising=False)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["bespoke: internal error: RuntimeError: boom (set BESPOKE_DEBUG=1 for the traceback)"]
    monkeypatch.setenv("BESPOKE_DEBUG", "1")
    assert cli.main(argv) == 1
    assert "Traceback" in capsys.readouterr().err


def test_solver_failing_on_the_model_is_reported_in_its_cell(monkeypatch, capsys, tmp_path):
    """A solver that raises BespokeError for this model: 'err' in its cells, the others still run; exit 2."""
    real = bespoke.evaluate

    def evaluate(solver, *args, **kwargs):
        if solver.name == "ddim":
            raise bespoke.BespokeError("ddim needs the model's Gaussian path")
        return real(solver, *args, **kwargs)

    monkeypatch.setattr(bespoke, "evaluate", evaluate)
    out_json = tmp_path / "o.json"
    argv = ["eval", "--model", "zoo:gmm2d", "--solvers", "euler,ddim", "--nfe", "4", "--num", "8", "--quiet"]
    assert cli.main([*argv, "--json", str(out_json)]) == 2
    out, err = capsys.readouterr()
    rows = _table(out)
    assert rows["ddim"] == ["err"] and rows["euler"][0][0].isdigit()
    assert "err ddim at NFE 4: ddim needs the model's Gaussian path" in out
    assert err.splitlines() == ["bespoke: error: 1 of 2 evaluations failed; see the 'err' notes under the table"]
    data = json.loads(out_json.read_text())
    assert [r["solver"] for r in data["results"]] == ["euler"] and data["failed"][0]["solver"] == "ddim"
