"""The README's `bespoke` commands are ones the command line accepts: every flag and value in them parses."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from bespoke.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    """Each `bespoke ...` command of the README's bash blocks (continuation lines joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "bespoke" in words:  # also under torchrun: `torchrun ... -m bespoke gt ...`
                commands.append(words[words.index("bespoke") + 1 :])
    return [" ".join(c) for c in commands]


def test_the_readme_has_commands_to_check():
    assert len(readme_commands()) >= 10


@pytest.mark.parametrize("command", readme_commands())
def test_a_readme_command_parses(command):
    argv = shlex.split(command.replace("$M", "python:mymodel.py:make"))
    args = build_parser().parse_args(argv)  # a usage error raises SystemExit(2)
    assert args.command == argv[0]
