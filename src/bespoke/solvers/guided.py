"""One BNS solver for a range of classifier-free guidance scales ([BNS] §6 lists it as future work).

The solver holds a BNS parameter set theta_k = (log_dt, a, b) at each of K anchor scales w_1 < ... < w_K and
samples at a scale w in [w_1, w_K] with their piecewise-linear interpolation

    theta(w) = (1 - lam) theta_k + lam theta_{k+1},    lam = (w - w_k) / (w_{k+1} - w_k),  w_k <= w <= w_{k+1}

so at an anchor it *is* the BNS solver of that anchor, and between anchors its times, a and b move smoothly
(the guided velocity u_w = u_uncond + w (u_cond - u_uncond) is linear in w, and so is the ODE it solves).
The anchors share the ends of the time grid, the preconditioning sigma0 and the start scale. The scale comes
from the model: `sample(flow, ...)` reads `flow.guidance`, converted to the solver's convention (fm weight w
is diffusers' 1 + w); a scale outside [w_1, w_K] is refused, naming the range.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import BespokeError
from .base import validate_times
from .bns import BNSSolver, run_bns
from .learned import Learned, pinned_times

__all__ = ["GuidedBNSSolver", "guidance_scale_of", "to_convention"]


def to_convention(weight: float, convention: str, target: str) -> float:
    """A guidance weight in `convention` written in `target`: fm's (1+w) c - w u is diffusers' u + (1+w)(c - u)."""
    if convention == target:
        return float(weight)
    return float(weight) + 1.0 if target == "diffusers" else float(weight) - 1.0


def guidance_scale_of(flow, convention: str) -> float | None:
    """The guidance scale `flow` runs at, in `convention`; None for a flow without guidance."""
    g = getattr(flow, "guidance", None)
    return None if g is None else to_convention(g.weight, g.convention, convention)


class GuidedBNSSolver(Learned):
    """BNS parameters at K anchor guidance scales, interpolated linearly in w (module docstring); NFE n."""

    kind = "bns"

    def __init__(
        self,
        anchors,
        log_dt: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        t_ends: torch.Tensor,
        *,
        convention: str,
        start_scale: float = 1.0,
        sigma0: float = 1.0,
        init: str = "custom",
        model_fingerprint: str | None = None,
        force: bool = False,
    ):
        super().__init__(init=init, model_fingerprint=model_fingerprint, force=force)
        anchors = torch.as_tensor(anchors, dtype=torch.float64).flatten()
        k, n = len(anchors), a.shape[-1]
        if k < 2 or not torch.all(torch.diff(anchors) > 0) or not torch.isfinite(anchors).all():
            raise BespokeError(f"a guided solver needs 2 or more increasing anchor scales, got {anchors.tolist()}")
        if log_dt.shape != (k, n) or a.shape != (k, n) or b.shape != (k, n, n) or t_ends.shape != (2,):
            raise BespokeError(
                f"a guided solver with {k} anchors at NFE {n} needs log_dt, a ({k}, {n}), b ({k}, {n}, {n})"
            )
        if not float(sigma0) > 0:
            raise BespokeError(f"sigma0 must be > 0 (1 = no preconditioning), got {sigma0}")
        if convention not in ("fm", "diffusers"):
            raise BespokeError(f"unknown guidance convention {convention!r}; valid: 'fm', 'diffusers'")
        self.convention = convention
        self.sigma0, self.start_scale = float(sigma0), float(start_scale)
        self.register_buffer("anchors", anchors.clone())
        self.register_buffer("t_ends", t_ends.detach().clone().double())
        self.register_buffer("mask", torch.tril(torch.ones(n, n, dtype=torch.float64)))
        self.log_dt = nn.Parameter(log_dt.detach().clone().double())
        self.a = nn.Parameter(a.detach().clone().double())
        self.b = nn.Parameter(b.detach().clone().double() * self.mask)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_anchors(cls, solvers: dict, convention: str, *, init: str | None = None) -> GuidedBNSSolver:
        """The guided solver whose anchor at scale w is the BNS solver solvers[w] (same NFE, grid ends, sigma0)."""
        scales = sorted(solvers)
        first = solvers[scales[0]]
        for w in scales:
            s = solvers[w]
            same = (s.nfe, s.sigma0, s.start_scale) == (first.nfe, first.sigma0, first.start_scale)
            if not isinstance(s, BNSSolver) or not same or not torch.equal(s.t_ends.cpu(), first.t_ends.cpu()):
                raise BespokeError(
                    "the anchors of a guided solver must be BNS solvers with the same NFE, time-grid ends, sigma0 "
                    f"and start scale; the one at w={w:g} differs from the one at w={scales[0]:g}"
                )
        stack = lambda name: torch.stack([getattr(solvers[w], name).detach().cpu().double() for w in scales])
        return cls(
            scales,
            stack("log_dt"),
            stack("a"),
            stack("b"),
            first.t_ends.cpu(),
            convention=convention,
            start_scale=first.start_scale,
            sigma0=first.sigma0,
            init=init or first.init,
            model_fingerprint=first.model_fingerprint,
        )

    # --- the scale ----------------------------------------------------------------------------
    @property
    def guidance_range(self) -> tuple[float, float]:
        return float(self.anchors[0]), float(self.anchors[-1])

    def range_text(self) -> str:
        lo, hi = self.guidance_range
        return (
            f"[{lo:g}, {hi:g}] ({self.convention} convention; anchors {', '.join(f'{w:g}' for w in self.anchor_list)})"
        )

    @property
    def anchor_list(self) -> list[float]:
        return self.anchors.tolist()

    def check_scale(self, w: float) -> float:
        lo, hi = self.guidance_range
        if not lo - 1e-9 <= w <= hi + 1e-9:
            raise BespokeError(
                f"this solver serves guidance scales {self.range_text()}, not {w:g}; sample at a scale in its "
                "range or train one for a range that holds it (bespoke train --guidance W1,W2,...)"
            )
        return min(max(float(w), lo), hi)

    def weights(self, w: float) -> torch.Tensor:
        """The anchors' weights at scale w: hat functions, (1 - lam, lam) on the two anchors around w."""
        w = self.check_scale(w)
        anchors = self.anchors.cpu()
        k = int(
            torch.searchsorted(anchors, torch.tensor(w, dtype=torch.float64), right=True).clamp(1, len(anchors) - 1)
        )
        lam = (w - float(anchors[k - 1])) / float(anchors[k] - anchors[k - 1])
        out = torch.zeros(len(anchors), dtype=torch.float64)
        out[k - 1], out[k] = 1.0 - lam, lam
        return out.to(self.a.device)

    def scale_of(self, flow) -> float:
        """The scale `flow` runs at, in this solver's convention (refused when it has no guidance)."""
        w = guidance_scale_of(flow, self.convention)
        if w is None:
            raise BespokeError(
                f"this solver serves guidance scales {self.range_text()}, but {flow.name} runs without guidance; "
                "load the model with a guidance scale (--guidance W / guidance=W)"
            )
        return w

    # --- the parameters at one scale -------------------------------------------------------------
    def raw_at(self, w: float) -> dict[str, torch.Tensor]:
        """theta(w): the interpolated raw parameters (log_dt, a, b), differentiable in the anchors' parameters."""
        lam = self.weights(w)
        return {
            "log_dt": lam @ self.log_dt,
            "a": lam @ self.a,
            "b": torch.einsum("k,kij->ij", lam, self.b) * self.mask,
        }

    def coefficients(self, w: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raw = self.raw_at(w)
        return pinned_times(raw["log_dt"], self.t_ends), raw["a"], raw["b"]

    def at_scale(self, w: float) -> BNSSolver:
        """The BNS solver this one is at scale w (a detached copy, bound to the same model at that scale)."""
        with torch.no_grad():
            raw = {k: v.detach().cpu() for k, v in self.raw_at(w).items()}
        s = BNSSolver(
            pinned_times(raw["log_dt"], self.t_ends.cpu()),
            raw["a"],
            raw["b"],
            start_scale=self.start_scale,
            sigma0=self.sigma0,
            init=f"{self.init}@w={w:g}",
            model_fingerprint=self.model_fingerprint,
            force=self.force,
        )
        with torch.no_grad():
            s.log_dt.copy_(raw["log_dt"])  # the raw parameters exactly, not their round trip through the grid
        s.model_guidance = {"weight": float(w), "convention": self.convention}
        s.training_summary = self.training_summary
        return s

    # --- Solver -------------------------------------------------------------------------------
    @property
    def nfe(self) -> int:
        return self.a.shape[-1]

    @property
    def name(self) -> str:
        lo, hi = self.guidance_range
        return f"bns{self.nfe}[w{lo:g}-{hi:g}]"

    @property
    def num_parameters(self) -> int:
        n = self.nfe
        return len(self.anchors) * ((n - 1) + n + n * (n + 1) // 2)

    def times(self, w: float | None = None) -> torch.Tensor:
        """The time grid at scale w (the middle anchor's by default)."""
        return self.coefficients(self.anchor_list[len(self.anchors) // 2] if w is None else w)[0]

    def __repr__(self):
        pre = f", sigma0={self.sigma0:g}" if self.sigma0 != 1.0 else ""
        return f"GuidedBNSSolver(nfe={self.nfe}, anchors={self.anchor_list}, convention={self.convention!r}{pre})"

    def check_model(self, flow) -> None:
        """The fingerprint as every learned solver; the guidance scale: in range (never forced)."""
        self.check_scale(self.scale_of(flow))
        mine, theirs = self.model_fingerprint, getattr(flow, "fingerprint", None)
        if mine and theirs and mine != theirs:
            problem = f"this solver was trained for the model with fingerprint {mine}, but {flow.name} has {theirs}"
            self.refuse_unless_forced(problem, "train a solver for this model")

    def sample(self, flow, noise: torch.Tensor, *, checkpoint: bool = False, **cond) -> torch.Tensor:
        """Algorithm 1 with theta(w), w = the guidance scale of `flow`."""
        flow.check_noise(noise)
        self.check_model(flow)
        coefficients = self.coefficients(self.scale_of(flow))
        return run_bns(flow, noise, coefficients, self.start_scale, self.sigma0, cond, checkpoint)

    def to_ns(self, target=None, ode_end: float = 1.0):
        """The NS form at the scale of `target` (a flow with guidance)."""
        if target is None or getattr(target, "guidance", None) is None:
            raise BespokeError(
                f"a guided solver has an NS form per guidance scale: call to_ns(flow) with a flow that has one, "
                f"or at_scale(w).to_ns(...) (it serves {self.range_text()})"
            )
        return self.at_scale(self.scale_of(target)).to_ns(target, ode_end)  # at_scale checks the range

    # --- file state (solvers/files.py) ------------------------------------------------------------
    def _state(self) -> dict[str, torch.Tensor]:
        return {"anchors": self.anchors, "log_dt": self.log_dt, "a": self.a, "b": self.b, "t_ends": self.t_ends}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = super().state_tensors()
        state["b"] = state["b"] * self.mask.cpu()
        return state

    def file_entry(self) -> dict:
        return {
            "kind": self.kind,
            "nfe": self.nfe,
            "guidance_anchors": self.anchor_list,
            "guidance_convention": self.convention,
            "init": self.init,
            "sigma0": self.sigma0,
            "start_scale": self.start_scale,
            "parameters": self.num_parameters,
            "guidance_times": {f"{w:g}": [round(t, 12) for t in self.times(w).tolist()] for w in self.anchor_list},
            "training": self.training_summary,
        }

    @classmethod
    def state_shapes(cls, entry: dict) -> dict[str, tuple[int, ...]]:
        k, n = len(entry["guidance_anchors"]), entry["nfe"]
        return {"anchors": (k,), "log_dt": (k, n), "a": (k, n), "b": (k, n, n), "t_ends": (2,)}

    @classmethod
    def from_state(cls, state: dict, entry: dict, model_fingerprint: str | None) -> GuidedBNSSolver:
        if torch.any(torch.triu(state["b"], diagonal=1) != 0):
            raise BespokeError("b is not lower triangular")
        if state["anchors"].tolist() != [float(w) for w in entry["guidance_anchors"]]:
            raise BespokeError("its anchor scales differ from the ones its metadata lists")
        solver = cls(
            state["anchors"],
            state["log_dt"],
            state["a"],
            state["b"],
            state["t_ends"],
            convention=str(entry["guidance_convention"]),
            start_scale=float(entry.get("start_scale", 1.0)),
            sigma0=float(entry.get("sigma0", 1.0)),
            init=str(entry.get("init", "custom")),
            model_fingerprint=model_fingerprint,
        )
        return solver.restored(state, entry)

    def validate(self) -> None:
        """Finite parameters and a monotone grid at every anchor (between them: convex combinations of those)."""
        for name, p in self.named_parameters():
            if not torch.isfinite(p).all():
                raise BespokeError(f"the guided {self.kind} solver's {name} contains NaN or inf")
        for w in self.anchor_list:
            validate_times(self.times(w).tolist())
