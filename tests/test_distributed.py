"""torch.distributed: `bespoke gt` and `bespoke train` under torchrun with 2 CPU processes (gloo) give what
one process gives. Each run is a subprocess with a time limit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import bespoke

MODEL = ["--model", "zoo:gmm2d"]


def _run(argv, cwd, procs: int):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    cmd = (launcher if procs > 1 else [sys.executable]) + ["-m", "bespoke", *map(str, argv)]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "BESPOKE_DEBUG")}
    env["OMP_NUM_THREADS"] = "1"
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    gt = ["gt", *MODEL, "-n", "96", "--shard-size", "16", "--trajectory", "5", "--quiet"]
    train = [
        "train",
        *MODEL,
        "--solver",
        "bns",
        "--nfe",
        "4",
        "--val-samples",
        "16",
        "--iterations",
        "6",
        "--batch-size",
        "20",
        "--quiet",
    ]
    out = {"tmp": tmp}
    for procs in (1, 2):
        out[f"gt{procs}"] = _run([*gt, "--out", tmp / f"gt{procs}"], tmp, procs)
    for procs in (1, 2):
        out[f"train{procs}"] = _run([*train, "--gt", tmp / "gt1", "--out", tmp / f"bns{procs}.safetensors"], tmp, procs)
    return out


def test_gt_shards_from_two_ranks_equal_one_process(runs):
    one, two = (bespoke.load_gt(runs["tmp"] / f"gt{k}") for k in (1, 2))
    assert len(one) == len(two) == 96 and len(two.manifest["shards"]) == 6 and two.manifest["complete"]
    for name in ("noise", "samples", "labels", "trajectory_states", "trajectory_velocities"):
        assert torch.equal(getattr(one, name), getattr(two, name)), name
    assert runs["gt2"].stdout.count("96 pairs") == 1  # rank 0 alone prints


def test_two_process_training_gives_the_parameters_of_one(runs):
    one = load_file(runs["tmp"] / "bns1.safetensors")
    two = load_file(runs["tmp"] / "bns2.safetensors")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-6)
    assert not (runs["tmp"] / "bns2.safetensors.ckpt").exists()


def test_other_commands_refuse_torchrun(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    argv = ["-m", "bespoke", "eval", *MODEL, "--solvers", "euler", "--nfe", "4", "-n", "4"]
    p = subprocess.run(launcher + argv, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "only gt and train run under torchrun" in p.stderr
