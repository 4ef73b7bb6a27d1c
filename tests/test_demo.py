"""`bespoke demo --fast` end to end on the analytic model, as a user runs it (a subprocess), and
`bespoke eval` on the same solvers and noise giving the numbers of its report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import bespoke
from bespoke.io import load_tensors

FILES = (
    "report.md",
    "results.json",
    "psnr_vs_nfe.png",
    "samples.png",
    "learned.png",
    "bns.safetensors",
    "bespoke-rk2.safetensors",
    "schedule-dpm++2m.safetensors",
)
LEARNED = ("bns", "bespoke-rk2", "schedule-dpm++2m")
NFES = list(range(4, 17))


def _bespoke(*argv, cwd):
    env = {k: v for k, v in os.environ.items() if k != "BESPOKE_DEBUG"}
    p = subprocess.run(
        [sys.executable, "-m", "bespoke", *argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    first = _bespoke("demo", "--fast", "--model", "zoo:gmm2d", "--out", "d", cwd=tmp)
    assert first[0] == 0, first[2]
    results = (tmp / "d" / "results.json").read_text()
    solvers = ",".join(["all", *(f"d/{name}.safetensors" for name in LEARNED)])
    common = ["eval", "--model", "zoo:gmm2d", "--solvers", solvers, "--nfe", "4-16", "--quiet"]
    with_gt = _bespoke(*common, "--gt", "d/cache/gt-eval", "--json", "gt.json", cwd=tmp)
    with_seed = _bespoke(*common, "--num", "64", "--seed", "0", "--labels", "random", "--json", "seed.json", cwd=tmp)
    again = _bespoke("demo", "--fast", "--model", "zoo:gmm2d", "--out", "d", "--quiet", cwd=tmp)
    return {"tmp": tmp, "first": first, "results": results, "with_gt": with_gt, "with_seed": with_seed, "again": again}


def _field(path, key: str) -> dict[tuple[str, int], float]:
    """`key` of every eval-JSON result, by (solver file stem or name, requested NFE)."""
    data = json.loads(path.read_text())
    return {
        (os.path.basename(r["solver"]).removesuffix(".safetensors"), r["requested_nfe"]): r[key]
        for r in data["results"]
    }


def _psnr(path) -> dict[tuple[str, int], float]:
    return _field(path, "psnr_db")


def test_demo_writes_every_file(demo):
    out = demo["tmp"] / "d"
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in FILES:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    rc, stdout, stderr = demo["first"]
    assert "%|" in stderr  # progress bars
    assert all(name in stdout for name in LEARNED) and "PSNR (dB)" in stdout
    report = (out / "report.md").read_text()
    for part in (
        "## PSNR against ground truth",
        "## Learned solvers",
        "## Timings",
        "psnr_vs_nfe.png",
        "samples.png",
        "learned.png",
        "bespoke sample --model zoo:gmm2d",
    ):
        assert part in report


def test_report_numbers_equal_eval_on_the_same_noise(demo):
    rc, _, err = demo["with_gt"]
    assert rc == 0, err
    mine = _psnr(demo["tmp"] / "d" / "results.json")
    theirs = _psnr(demo["tmp"] / "gt.json")
    assert mine.keys() == theirs.keys()
    learned = {k for k in mine if k[0] in LEARNED}  # BNS at 8; one RK2 solver at 4, 6, ..., 16; one schedule at 4-16
    assert learned == {("bns", 8), *(("bespoke-rk2", n) for n in NFES[::2]), *(("schedule-dpm++2m", n) for n in NFES)}
    assert mine == theirs  # bit for bit: the same solvers, noise and ground truth
    report = (demo["tmp"] / "d" / "report.md").read_text()
    rows = {}
    for line in report.splitlines():
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        if len(cells) == 1 + len(NFES) and cells[0] in (*bespoke.SOLVER_NAMES, *LEARNED) and "." in line:
            rows.setdefault(cells[0], cells[1:])  # the first table is PSNR
    for (name, nfe), value in theirs.items():
        assert rows[name][NFES.index(nfe)].rstrip("*") == f"{value:.2f}", (name, nfe)


def test_eval_from_the_seed_agrees_with_the_cached_ground_truth(demo):
    """The demo's evaluation pairs are `--num 64 --seed 0 --labels random`: a fresh dopri5 solve of the same
    noise agrees to the ground truth's own accuracy (dopri5's step control sees the whole batch there and
    shards of 32 in the cache), so every solver's RMSE moves by at most that much (triangle inequality)."""
    rc, _, err = demo["with_seed"]
    assert rc == 0, err
    cached, fresh = _field(demo["tmp"] / "gt.json", "rmse"), _field(demo["tmp"] / "seed.json", "rmse")
    assert cached.keys() == fresh.keys()
    for k in cached:
        assert fresh[k] == pytest.approx(cached[k], abs=2e-4), k


def test_rerun_reuses_ground_truth_and_solvers(demo):
    rc, stdout, stderr = demo["again"]
    assert rc == 0, stderr
    assert stderr == ""  # --quiet
    report = (demo["tmp"] / "d" / "report.md").read_text()
    steps = ("ground truth, evaluation pairs", "ground truth, training pairs", "train BNS", "train RK2-Bespoke")
    steps += ("train dpm++2m schedule",)
    for step in (*steps, "evaluation"):
        assert f"| {step} | cached |" in report, step
    assert _psnr(demo["tmp"] / "d" / "results.json") == _psnr(demo["tmp"] / "gt.json")
    again = json.loads((demo["tmp"] / "d" / "results.json").read_text())
    assert again["results"] == json.loads(demo["results"])["results"]  # every number, from the cached cells


def test_a_damaged_evaluation_cell_is_evaluated_again(demo, tmp_path):
    """One cached cell cut short and one overwritten: the demo evaluates (and rewrites) those two, reuses the rest."""
    out = tmp_path / "d"
    shutil.copytree(demo["tmp"] / "d", out)
    files = sorted((out / "cache" / "eval").glob("*.safetensors"))
    ran = [p for p in files if load_tensors(p, "")[1]["result"] is not None]
    ran[0].write_bytes(ran[0].read_bytes()[:100])
    ran[1].write_bytes(b"not a safetensors file")
    before = {p: p.read_bytes() for p in files}
    rc, _, stderr = _bespoke("demo", "--fast", "--model", "zoo:gmm2d", "--out", "d", cwd=tmp_path)
    assert rc == 0, stderr
    assert f"({len(files) - 2} of {len(files)} cells cached)" in stderr
    assert [p for p in files if p.read_bytes() != before[p]] == ran[:2]
    assert all(load_tensors(p, "")[1]["result"] is not None for p in ran[:2])
    assert "| evaluation | cached |" not in (out / "report.md").read_text()
    assert _psnr(out / "results.json") == _psnr(demo["tmp"] / "gt.json")


def test_a_cached_cell_reads_back_as_run_eval_made_it(tmp_path):
    """Every field of a Cell and its EvalResult (samples bit for bit) survives the cache; another key or a
    damaged file reads as missing."""
    from bespoke.cli import demo as d
    from bespoke.cli.evaluate import Cell

    samples = torch.randn(5, 2, dtype=torch.float64)
    result = bespoke.EvalResult("x.safetensors", 8, 41.5, 0.0123, 5, 0.25, samples=samples)
    cells = [Cell("x.safetensors", 8, 8, result), Cell("heun", 4, 4, na="singular at t = 1"), Cell("bns", 4, None)]
    for k, cell in enumerate(cells):
        key = {"solver": f"id{k}", "requested_nfe": cell.requested}
        path = d._cell_path(tmp_path, key)
        d._save_cell(path, key, cell)
        back = d._load_cell(path, key, cell.solver, "cpu")
        assert back == cell  # dataclass equality: every field (EvalResult compares all but samples)
        if cell.result is not None:
            assert torch.equal(back.result.samples, samples) and back.result.samples.dtype == torch.float64
        assert d._load_cell(path, dict(key, solver="other"), cell.solver, "cpu") is None
        path.write_bytes(path.read_bytes()[:-1])
        assert d._load_cell(path, key, cell.solver, "cpu") is None
