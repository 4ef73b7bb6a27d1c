"""A CLIP-type tokenizer built offline from our own word list (no download).

CLIP's tokenizer is byte-pair encoding over lower-cased words whose last symbol carries `</w>`. A
vocabulary of the single characters plus one merge chain per word (s e -> se, se v -> sev, ...,
seve n</w> -> seven</w>) encodes every listed word as one token and any other text character by
character, so the stock `CLIPTokenizer` reads it as it reads OpenAI's files.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

__all__ = ["write_clip_tokenizer", "BOS", "EOS"]

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_CHARACTERS = string.ascii_lowercase + string.digits + ".,'!?-"


def _merges(word: str) -> list[tuple[str, str]]:
    """The merge chain that joins `word` (as BPE symbols, the last one marked </w>) left to right."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    merges, left = [], symbols[0]
    for right in symbols[1:]:
        merges.append((left, right))
        left = left + right
    return merges


def write_clip_tokenizer(folder, words, *, max_length: int = 16):
    """Write a CLIPTokenizer for `words` (lower-case, letters/digits) into `folder`; returns it loaded."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for token in [*_CHARACTERS, *(c + "</w>" for c in _CHARACTERS)]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted({w.lower() for w in words}):
        for pair in _merges(word):
            if pair not in merges:
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
    for token in (BOS, EOS):
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0) + "\n")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return CLIPTokenizer.from_pretrained(str(folder))
