"""Prompts as data: the text conditioning of a text-to-image model, read from a file and recorded by hash.

A prompt set is an ordered list of prompts plus the negative prompt (the null condition of
classifier-free guidance, "" by default, as diffusers' pipelines use). A model loaded with a prompt set
takes `labels` = indices into it (prompt i of the set; index len(set) is the negative prompt), so GT
caches, training and sampling draw, store and batch prompts exactly as they do class labels, and the
encoded prompts are computed once and held in memory, never written per pair.

Files: `.txt` one prompt per line (blank lines skipped), `.json` a list of strings or of objects with a
"prompt" key (or {"prompts": [...]}), `.csv` a table with a `prompt` column.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import BespokeError

__all__ = ["Prompts", "read_prompts", "as_prompts"]


@dataclass(frozen=True)
class Prompts:
    """An ordered prompt set and its negative prompt; `source` is the file it came from (None from Python)."""

    texts: tuple[str, ...]
    negative: str = ""
    source: str | None = None
    file_sha256: str | None = None

    def __post_init__(self):
        if not self.texts:
            raise BespokeError("the prompt set is empty; give at least one prompt")
        bad = [i for i, t in enumerate(self.texts) if not isinstance(t, str)]
        if bad or not isinstance(self.negative, str):
            raise BespokeError(f"prompts must be strings (prompt {bad[0] + 1 if bad else 'negative'} is not)")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def sha256(self) -> str:
        """Hash of what conditions the model: the prompts in order and the negative prompt (not the file's format)."""
        payload = json.dumps({"prompts": list(self.texts), "negative": self.negative}, ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()

    @property
    def all_texts(self) -> list[str]:
        """The prompts, then the negative prompt: index len(self) is the null condition."""
        return [*self.texts, self.negative]

    def record(self) -> dict:
        """What GT caches and solver files record of the prompt set (JSON)."""
        return {
            "sha256": self.sha256,
            "count": len(self.texts),
            "negative": self.negative,
            "source": self.source,
            "file_sha256": self.file_sha256,
            "prompts": list(self.texts),
        }

    def describe(self) -> str:
        where = f" from {self.source}" if self.source else ""
        return f"{len(self)} prompt{'s' * (len(self) != 1)}{where} (sha256 {self.sha256[:12]})"


def as_prompts(prompts, negative: str | None = None) -> Prompts:
    """A Prompts from a Prompts, a list of strings, one string or a file path (str/Path of an existing file)."""
    if isinstance(prompts, Prompts):
        return prompts if negative is None else Prompts(prompts.texts, negative, prompts.source, prompts.file_sha256)
    if isinstance(prompts, Path):
        return read_prompts(prompts, negative=negative)
    if isinstance(prompts, str):
        prompts = [prompts]
    return Prompts(tuple(prompts), negative or "")


def read_prompts(path, *, negative: str | None = None) -> Prompts:
    """The prompt set in `path` (.txt, .json or .csv, see the module docstring), validated."""
    path = Path(path)
    if not path.is_file():
        raise BespokeError(f"--prompts {path}: no such file")
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise BespokeError(f"--prompts {path}: cannot read it as UTF-8 text ({e})") from None
    suffix = path.suffix.lower()
    texts = _json_prompts(path, text) if suffix == ".json" else _csv_prompts(path, text) if suffix == ".csv" else None
    if texts is None:
        texts = [line.strip() for line in text.splitlines()]
    texts = [t for t in texts if t]
    if not texts:
        raise BespokeError(
            f"--prompts {path}: the file holds no prompts; write one prompt per line (or a .json list, or a .csv "
            "with a 'prompt' column)"
        )
    return Prompts(tuple(texts), negative or "", str(path), hashlib.sha256(raw).hexdigest())


def _json_prompts(path: Path, text: str) -> list[str]:
    try:
        data = json.loads(text)
    except ValueError as e:
        raise BespokeError(f"--prompts {path}: not valid JSON ({e})") from None
    if isinstance(data, dict) and "prompts" in data:
        data = data["prompts"]
    items = data if isinstance(data, list) else None
    if items is not None:
        items = [x.get("prompt") if isinstance(x, dict) else x for x in items]
    if items is None or not all(isinstance(x, str) for x in items):
        raise BespokeError(
            f'--prompts {path}: a JSON prompt file is a list of strings, or of objects with a "prompt" string'
        )
    return [x.strip() for x in items]


def _csv_prompts(path: Path, text: str) -> list[str]:
    rows = csv.DictReader(io.StringIO(text))
    if rows.fieldnames is None or "prompt" not in [f.strip() for f in rows.fieldnames]:
        have = ", ".join(rows.fieldnames or []) or "none"
        raise BespokeError(f"--prompts {path}: a CSV prompt file needs a 'prompt' column (its columns: {have})")
    key = next(f for f in rows.fieldnames if f.strip() == "prompt")
    return [(row.get(key) or "").strip() for row in rows]
