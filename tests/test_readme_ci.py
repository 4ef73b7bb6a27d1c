"""The README's set-up commands and .ci/run cannot drift apart, and .ci/run fails on 'no tests'."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_COMMAND = 'pip install -e ".[dev,diffusers]" && python -m pytest -q'


def _code_blocks(text: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S)]


def test_ci_runs_the_readme_test_command():
    blocks = _code_blocks((ROOT / "README.md").read_text())
    main_job, tests = blocks[0], blocks[1]
    assert main_job == "pip install -e . && bespoke demo"
    assert tests == TEST_COMMAND
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci
    assert "set -euo pipefail" in ci
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


@pytest.mark.parametrize("pytest_rc, expected", [(0, 0), (1, 1), (5, 1)])
def test_ci_exit_codes(tmp_path, pytest_rc, expected):
    """.ci/run with stand-ins for pip and python: pytest's exit 5 (no tests collected) fails the run."""
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, rc in (("pip", 0), ("python", pytest_rc)):
        (bin_dir / name).write_text(f"#!/bin/sh\nexit {rc}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    run = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], env=env, capture_output=True, text=True)
    assert run.returncode == expected
    if pytest_rc == 5:
        assert "no tests" in run.stderr
