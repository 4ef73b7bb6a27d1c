"""Weight files: safetensors tensors plus one JSON metadata string, never a pickle.

One writer and one reader shared by every file the package ships or trains (the digits models,
the FD-digits classifier, solver files, GT shards): writes are atomic and world-readable, reads are
validated and fail with an error that names the file and the fix. Every file written here carries a
SHA-256 over its JSON and its tensors (names, dtypes, shapes, bytes), so that any changed byte is
caught on reading; files written before checksums existed read as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import torch

from .errors import BespokeError

__all__ = ["StreamedTensors", "atomic_path", "load_tensors", "read_tensors", "save_tensors", "weights_fingerprint"]

_KEY = "bespoke"  # the safetensors metadata entry that holds our JSON
_SUM = "bespoke_sha256"  # ... and the one that holds the checksum of that JSON and the tensors


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
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    text = json.dumps(meta)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={_KEY: text, _SUM: _checksum(text, tensors)})


def read_tensors(path: Path, fix: str) -> tuple[dict[str, torch.Tensor], object, bool]:
    """(tensors, metadata, checked) of a file written by `save_tensors`; `fix` says how to get a good file.

    A file whose checksum does not match its contents is refused; checked = False for a file without one."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise BespokeError(f"{path} is missing; {fix}")
    try:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
        text = header[_KEY]
        meta = json.loads(text)
        tensors = load_file(str(path))
    except Exception as e:  # a missing key, bad JSON, or safetensors' own error types for a damaged file
        raise BespokeError(f"{path} is not a valid bespoke weights file ({type(e).__name__}: {e}); {fix}") from None
    checked = _SUM in header
    if checked and header[_SUM] != _checksum(text, tensors):
        raise BespokeError(f"{path} is damaged: its contents do not match the checksum written with them; {fix}")
    return tensors, meta, checked


def load_tensors(path: Path, fix: str) -> tuple[dict[str, torch.Tensor], object]:
    """(tensors, metadata) of a file written by `save_tensors`, checked against its checksum when it has one."""
    return read_tensors(path, fix)[:2]


def _raw_bytes(v: torch.Tensor) -> bytes:
    """The tensor's data as stored (row-major, native byte order), any dtype (bfloat16 included)."""
    return v.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _hash_tensors(h, tensors: dict[str, torch.Tensor]) -> None:
    """Feed names, dtypes, shapes and bytes of `tensors` (in name order) to the hash `h`."""
    for k in sorted(tensors):
        v = tensors[k]
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(_raw_bytes(v))


def _checksum(text: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over a file's JSON metadata and its tensors: any changed byte of either changes it."""
    h = hashlib.sha256(text.encode())
    _hash_tensors(h, tensors)
    return h.hexdigest()


_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
}


class StreamedTensors:
    """A safetensors file written in pieces: the header (names, dtypes, shapes, offsets) first, then rows of
    each tensor at their place, so a file far larger than memory is written one batch at a time.

        with StreamedTensors(path, {"samples": ((n, 3, 64, 64), torch.float32)}, {"bespoke": "..."}) as f:
            for a in range(0, n, b):
                f.write("samples", a, x[a : a + b])

    The file appears at `path` (atomically) only when the block ends without an error; safetensors reads
    it like any other."""

    def __init__(self, path, layout: dict[str, tuple[tuple[int, ...], torch.dtype]], metadata: dict[str, str]):
        self.path, self.layout, self._offsets = path, layout, {}
        header, end = {"__metadata__": metadata}, 0
        for name, (shape, dtype) in layout.items():
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            kind = _SAFETENSORS_DTYPES[dtype]
            header[name] = {"dtype": kind, "shape": list(shape), "data_offsets": [end, end + nbytes]}
            self._offsets[name] = end
            end += nbytes
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        self._head, self.nbytes = 8 + len(text), 8 + len(text) + end
        self._prefix = len(text).to_bytes(8, "little") + text

    def __enter__(self):
        self._atomic = atomic_path(self.path, "--out")
        tmp = self._atomic.__enter__()
        self._file = open(tmp, "r+b")
        self._file.write(self._prefix)
        self._file.truncate(self.nbytes)  # sparse until written; every byte is written before the rename
        return self

    def write(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Rows start, start + 1, ... of tensor `name` (their shape and dtype as declared)."""
        shape, dtype = self.layout[name]
        if rows.dtype != dtype or tuple(rows.shape[1:]) != tuple(shape[1:]) or start + rows.shape[0] > shape[0]:
            raise BespokeError(f"rows {tuple(rows.shape)} {rows.dtype} at {start} do not fit {name} {shape} {dtype}")
        row = math.prod(shape[1:]) * rows.element_size()
        self._file.seek(self._head + self._offsets[name] + start * row)
        self._file.write(_raw_bytes(rows))

    def __exit__(self, kind, error, trace):
        self._file.close()
        return self._atomic.__exit__(kind, error, trace)


def weights_fingerprint(state: dict[str, torch.Tensor], extra: str = "") -> str:
    """sha256 over the weights (names, dtypes, shapes, bytes) and `extra`, 16 hex digits: metadata edits keep it."""
    h = hashlib.sha256(extra.encode())
    _hash_tensors(h, state)
    return h.hexdigest()[:16]
