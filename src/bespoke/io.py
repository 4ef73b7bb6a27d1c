"""Weight files: safetensors tensors plus one JSON metadata string, never a pickle.

One writer and one reader shared by every file the package ships or trains (the digits models,
the FD-digits classifier): writes are atomic and world-readable, reads are validated and fail with
an error that names the file and the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from .errors import BespokeError

__all__ = ["atomic_path", "load_tensors", "save_tensors", "weights_fingerprint"]

_KEY = "bespoke"  # the safetensors metadata entry that holds our JSON


@contextlib.contextmanager
def atomic_path(path, what: str = ""):
    """Yield a temporary path beside `path`; on success it is renamed over `path` with an ordinary file's
    mode, on any error removed: `path` is never half-written. `what` names the file in errors (e.g. --out)."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    name = f"{what} {path}".strip()
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as e:
        raise BespokeError(f"cannot write {name}: {e.strerror or e}") from None
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except OSError as e:
        raise BespokeError(f"cannot write {name}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write `tensors` with `meta` (JSON) to `path` atomically (temp file in the same folder, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={_KEY: json.dumps(meta)})


def load_tensors(path: Path, fix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a file written by `save_tensors`; `fix` says how to get a good file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise BespokeError(f"{path} is missing; {fix}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})[_KEY])
        tensors = load_file(str(path))
    except Exception as e:  # a missing key, bad JSON, or safetensors' own error types for a damaged file
        raise BespokeError(f"{path} is not a valid bespoke weights file ({type(e).__name__}: {e}); {fix}") from None
    return tensors, meta


def weights_fingerprint(state: dict[str, torch.Tensor], extra: str = "") -> str:
    """sha256 over the weights (names, dtypes, shapes, bytes) and `extra`, 16 hex digits: metadata edits keep it."""
    h = hashlib.sha256(extra.encode())
    for k in sorted(state):
        v = state[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.dtype == torch.bfloat16 else v.numpy().tobytes())
    return h.hexdigest()[:16]
