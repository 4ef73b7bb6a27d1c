"""Checking the JSON records our files carry (solver-file metadata, GT manifests) field by field, so that a
record of any shape gives either what the readers expect or one line naming the field and what it must be.

A table lists (field, check, what it must be, default); `fields_problem` walks it. JSON can hold anything:
bools where ints are meant (`True == 1` in Python), NaN, 400-digit integers, strings for numbers.
"""

from __future__ import annotations

import math
import reprlib

__all__ = ["REQUIRED", "OPTIONAL", "short", "is_int", "is_real", "is_str", "is_guidance", "fields_problem"]

REQUIRED, OPTIONAL = object(), object()  # defaults: the field must be there / may be absent
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = 40


def short(value) -> str:
    """A bounded one-line repr of a JSON value, for error messages."""
    return _SHORT.repr(value)


def is_int(value, low: int | None = None) -> bool:
    """An int (not a bool), at least `low`."""
    return isinstance(value, int) and not isinstance(value, bool) and (low is None or value >= low)


def is_real(value, *, finite: bool = True) -> bool:
    """A number that converts to float (not a bool or NaN; finite unless finite=False, so not a 400-digit int)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return not math.isnan(value) and (math.isfinite(value) or not finite)
    except OverflowError:
        return False


def is_str(value) -> bool:
    return isinstance(value, str)


def is_guidance(value) -> bool:
    """null, or {"weight": a finite number, "convention": a string} (Guidance.as_dict)."""
    return value is None or (
        isinstance(value, dict) and is_real(value.get("weight")) and isinstance(value.get("convention"), str)
    )


def is_prompts(value) -> bool:
    """null, or a prompt set's record (Prompts.record): its sha256, prompts and negative prompt."""
    return value is None or (
        isinstance(value, dict)
        and is_str(value.get("sha256"))
        and isinstance(value.get("prompts"), list)
        and all(is_str(p) for p in value["prompts"])
        and is_str(value.get("negative"))
    )


def fields_problem(record: dict, fields, where: str = "") -> str | None:
    """The first field of `record` that is missing or fails its check, as text (None if all pass); the
    defaults of absent fields that have one are filled in. fields: (key, check, what it must be, default)."""
    for key, check, what, default in fields:
        if key not in record:
            if default is REQUIRED:
                return f"{key!r}{where} is missing"
            if default is not OPTIONAL:
                record[key] = default
        elif not check(record[key]):
            return f"{key!r}{where} must be {what}, got {short(record[key])}"
    return None
