"""What a learned solver that serves a range of NFEs shares (a learned schedule, an NFE-agnostic Bespoke solver):
the range LO-HI, the NFEs in it that its method takes, views at one NFE that share the parameters, and the
weight that moves its parameters from the range's lowest NFE to its highest, linearly in log n.
"""

from __future__ import annotations

import copy
import math

from ..errors import BespokeError

__all__ = ["Ranged", "parse_nfe_range", "log_position", "served_text"]


def parse_nfe_range(value) -> tuple[int, int]:
    """'4-16' -> (4, 16); '8' or 8 -> (8, 8); a (lo, hi) pair passes through (checked)."""
    try:
        if isinstance(value, str):
            parts = value.strip().split("-")
            if len(parts) > 2:
                raise ValueError(value)
            lo, hi = int(parts[0]), int(parts[-1])
        elif isinstance(value, int) and not isinstance(value, bool):
            lo = hi = value
        else:
            lo, hi = (int(v) for v in value)
    except (TypeError, ValueError):
        raise BespokeError(f"an NFE range is LO-HI (e.g. 4-16) or one NFE; got {value!r}") from None
    if not 1 <= lo <= hi:
        raise BespokeError(f"an NFE range needs 1 <= LO <= HI; got {lo}-{hi}")
    return lo, hi


def served_text(nfes: list[int]) -> str:
    """The NFEs a range solver serves, for messages: all of them, or the first two and the last when many."""
    return ", ".join(map(str, nfes)) if len(nfes) <= 8 else f"{nfes[0]}, {nfes[1]}, ..., {nfes[-1]}"


def log_position(nfe: int, nfe_range: tuple[int, int]) -> float:
    """a = log(n / lo) / log(hi / lo): 0 at the range's lowest NFE, 1 at its highest (0 for a single NFE)."""
    lo, hi = nfe_range
    return math.log(nfe / lo) / math.log(hi / lo) if hi > lo else 0.0


class Ranged:
    """Mixin: `nfe_range`, `valid_nfes()` (subclasses), `.at(n)` views and the current view's `.nfe`.
    Subclasses set `self.nfe_range` and `self._nfe`, and name themselves in errors by `range_what`."""

    nfe_range: tuple[int, int]
    _nfe: int
    range_what = "solver"

    def valid_nfes(self) -> list[int]:
        raise NotImplementedError

    def range_text(self) -> str:
        lo, hi = self.nfe_range
        return f"{lo}-{hi}" if lo != hi else str(lo)

    def _check_nfe(self, nfe) -> int:
        valid = self.valid_nfes()
        if nfe not in valid:
            raise BespokeError(
                f"this {self.range_what} serves NFE {self.range_text()} ({served_text(valid)}), not {nfe!r}; "
                "choose an NFE in its range or train one for a range that holds it"
            )
        return int(nfe)

    def at(self, nfe: int):
        """The same solver at NFE `nfe` (shares the parameters: training one trains all)."""
        view = copy.copy(self)
        view._nfe = self._check_nfe(nfe)
        return view

    def validation_views(self) -> list:
        """The solvers training validates on: the lowest, middle and highest NFE of the range."""
        valid = self.valid_nfes()
        return [self.at(n) for n in sorted({valid[0], valid[len(valid) // 2], valid[-1]})]

    @property
    def nfe(self) -> int:
        return self._nfe

    def position(self, nfe: int | None = None) -> float:
        """log_position of NFE `nfe` (this view's by default) in the range."""
        return log_position(self.nfe if nfe is None else nfe, self.nfe_range)
