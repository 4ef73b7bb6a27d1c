"""Weight files: atomic, world-readable safetensors + JSON metadata; damaged files are refused."""

import stat

import pytest
import torch

from bespoke import BespokeError
from bespoke.io import load_tensors, save_tensors


def test_round_trip_is_exact_and_world_readable(tmp_path):
    path = tmp_path / "sub" / "w.safetensors"
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    save_tensors(path, tensors, {"name": "w", "nested": {"k": [1, 2]}})
    loaded, meta = load_tensors(path, "fix it")
    assert meta == {"name": "w", "nested": {"k": [1, 2]}}
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert not path.with_suffix(".tmp").exists()


def test_missing_or_damaged_file_names_the_fix(tmp_path):
    with pytest.raises(BespokeError, match="missing; do this"):
        load_tensors(tmp_path / "none.safetensors", "do this")
    path = tmp_path / "w.safetensors"
    save_tensors(path, {"a": torch.ones(100)}, {})
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(BespokeError, match="not a valid bespoke weights file.*do this"):
        load_tensors(path, "do this")
