"""Every sampler behind one interface: `solver(name, nfe=N)` returns a `Solver`.

Built-in methods (each a short program over the shared machinery; each also compiles to NS form):

    name       method                                              NFE            default grid
    euler      RK1                                                 any            uniform
    midpoint   RK2 (midpoint)                                      2 per step     uniform
    heun       RK2 (Heun / trapezoidal)                            2 per step     uniform
    rk4        classical RK4                                       4 per step     uniform
    ddim       DDIM, deterministic                                 any            uniform
    dpm++2m    DPM-Solver++(2M), first order at first/last step    any            logsnr
    unipc      UniPC bh2, order 2 (option order=1..3)              any            logsnr
    ipndm      iPNDM, Adams-Bashforth 4 (option order=1..4)        any            edm
    edm-heun   EDM sampler: Heun in sigma, final Euler step        odd: 2N - 1    edm (from sigma_max = 80)

Default grids follow the field's recommendations (anchors §1.2): logSNR for DPM-Solver++ and
UniPC, EDM's rho = 7 for iPNDM and EDM-Heun; uniform t for the RK methods and DDIM, which is the
grid of the RK baselines in [BES]/[BNS] and DDIM's uniform timesteps.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from ..errors import BespokeError
from .base import Dedicated, Solver, validate_times
from .exponential import ddim, dpmpp_2m, unipc
from .grids import edm, grid_by_name
from .multistep import ipndm
from .nonstationary import NSSolver, compile_ns
from .rk import EULER, HEUN, MIDPOINT, RK4, edm_heun, rk_program

__all__ = ["largest_valid_nfe", "solver", "SOLVER_NAMES", "Solver", "NSSolver", "Dedicated", "compile_ns", "METHODS"]


@dataclass(frozen=True)
class Method:
    program: Callable
    grid: str
    evals_per_step: int = 1  # NFE = evals_per_step * steps - saved_evals
    saved_evals: int = 0
    needs_scheduler: bool = False
    options: tuple[str, ...] = ()

    def steps_for(self, name: str, nfe: int) -> int:
        steps, rem = divmod(nfe + self.saved_evals, self.evals_per_step)
        if rem or steps < 1 or nfe < 1:
            raise BespokeError(f"{name} cannot take nfe={nfe}; it takes {self.nfe_rule()}")
        return steps

    def largest_nfe(self, nfe: int) -> int | None:
        """The largest NFE <= nfe this method takes (None if there is none)."""
        steps = (nfe + self.saved_evals) // self.evals_per_step
        return self.evals_per_step * steps - self.saved_evals if steps >= 1 else None

    def nfe_rule(self) -> str:
        k, s = self.evals_per_step, self.saved_evals
        if k == 1:
            return "any NFE >= 1"
        valid = ", ".join(str(k * n - s) for n in range(1, 5))
        how = f"{k} evaluations per step" + (f", {s} fewer on the last" if s else "")
        return f"NFE = {valid}, ... ({how})"


METHODS: dict[str, Method] = {
    "euler": Method(rk_program(EULER), "uniform"),
    "midpoint": Method(rk_program(MIDPOINT), "uniform", evals_per_step=2),
    "heun": Method(rk_program(HEUN), "uniform", evals_per_step=2),
    "rk4": Method(rk_program(RK4), "uniform", evals_per_step=4),
    "ddim": Method(ddim, "uniform", needs_scheduler=True),
    "dpm++2m": Method(dpmpp_2m, "logsnr", needs_scheduler=True),
    "unipc": Method(unipc, "logsnr", needs_scheduler=True, options=("order",)),
    "ipndm": Method(ipndm, "edm", options=("order",)),
    "edm-heun": Method(edm_heun, "edm-start", evals_per_step=2, saved_evals=1, needs_scheduler=True),
}
SOLVER_NAMES = tuple(METHODS)


def largest_valid_nfe(name: str, nfe: int) -> int | None:
    """The largest NFE <= nfe that the built-in solver `name` takes (None if there is none)."""
    if name not in METHODS:
        raise BespokeError(f"unknown solver {name!r}; valid names: {', '.join(SOLVER_NAMES)}")
    return METHODS[name].largest_nfe(nfe)


_OPTION_RANGES = {"unipc": {"order": (1, 3)}, "ipndm": {"order": (1, 4)}}


def _grid(name: str):
    if name == "edm-start":  # EDM's own sampler starts at sigma_max, not at t = 0
        return partial(edm, exact_start=False)
    return grid_by_name(name)


def solver(name: str, nfe: int | None = None, *, grid: str | Sequence[float] | None = None, **options) -> Solver:
    """A built-in solver by name, or a learned one from a solver file, for exactly `nfe` network evaluations.

    name: a built-in name (SOLVER_NAMES) or the path of a solver file (`*.safetensors`, see
          `solvers/files.py`; options flow=..., force=... check it against the model).

    grid: one of uniform, logsnr, edm, quadratic (default: the method's recommended grid), or
          explicit times t_0 = 0 < ... < t_N = 1 (N = number of steps for that NFE).
    options: method options, e.g. solver("unipc", nfe=8, order=2).
    """
    if isinstance(name, Solver):
        return name
    if isinstance(name, (str, os.PathLike)) and (str(name).endswith(".safetensors") or os.path.isfile(name)):
        from .files import load_solver

        return load_solver(name, nfe, **options)
    method = METHODS.get(name)
    if method is None:
        raise BespokeError(f"unknown solver {name!r}; valid names: {', '.join(SOLVER_NAMES)}")
    if not isinstance(nfe, int) or isinstance(nfe, bool):
        raise BespokeError(f"nfe must be an integer, got {nfe!r}")
    steps = method.steps_for(name, nfe)
    unknown = set(options) - set(method.options)
    if unknown:
        valid = ", ".join(method.options) if method.options else "none"
        raise BespokeError(f"{name} has no option {', '.join(sorted(unknown))}; its options: {valid}")
    for key, value in options.items():
        lo, hi = _OPTION_RANGES[name][key]
        if not isinstance(value, int) or not lo <= value <= hi:
            raise BespokeError(f"{name}: {key} must be an integer in {lo}..{hi}, got {value!r}")
    program = partial(method.program, **options) if options else method.program
    if grid is None or isinstance(grid, str):
        grid_name = grid or method.grid
        make_grid = _grid(grid_name)
        uses_path = grid_name in ("logsnr", "edm", "edm-start")
    else:
        make_grid, grid_name, uses_path = _explicit_times(name, grid, steps), "explicit", False
    return Dedicated(
        name=name,
        nfe=nfe,
        steps=steps,
        program=program,
        grid=make_grid,
        grid_name=grid_name,
        needs_scheduler=method.needs_scheduler or uses_path,
        options=dict(options),
    )


def _explicit_times(name: str, times: Sequence[float], steps: int):
    times = [float(t) for t in times]
    if len(times) != steps + 1:
        raise BespokeError(f"{name} takes {steps} steps at this NFE, so it needs {steps + 1} times; got {len(times)}")
    validate_times(times)
    return lambda steps_, scheduler=None, ode_end=1.0: list(times)
