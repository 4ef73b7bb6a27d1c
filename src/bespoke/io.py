"""Weight files: safetensors tensors plus one JSON metadata string, never a pickle.

One writer and one reader shared by every file the package ships or trains (the digits models,
the FD-digits classifier): writes are atomic and world-readable, reads are validated and fail with
an error that names the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .errors import BespokeError

__all__ = ["load_tensors", "save_tensors", "weights_fingerprint"]

_KEY = "bespoke"  # the safetensors metadata entry that holds our JSON


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write `tensors` with `meta` (JSON) to `path` atomically (temp file in the same folder, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={_KEY: json.dumps(meta)})
    os.chmod(tmp, 0o644)  # safetensors writes 0600; a file shipped in the package must be world-readable
    os.replace(tmp, path)


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
