"""Pictures: PSNR-vs-NFE curves, sample grids from the same noise, learned solver parameters.

Each function draws one figure and writes it atomically (a temporary file in the same folder, then a
rename), so an interrupted run never leaves half a PNG. matplotlib runs on the Agg backend.
"""

from __future__ import annotations

import math
import textwrap

import torch

from .errors import BespokeError
from .io import atomic_path
from .metrics import psnr

__all__ = ["psnr_vs_nfe", "image_grid", "sample_grid", "learned_parameters", "is_image"]

_LEARNED_STYLES = (
    {"color": "black", "marker": "*", "markersize": 13, "linewidth": 2.6},
    {"color": "crimson", "marker": "D", "markersize": 8, "linewidth": 2.6},
    {"color": "darkgoldenrod", "marker": "P", "markersize": 10, "linewidth": 2.6},
)
_PSNR_SPAN = 45.0  # dB shown below the best value in PSNR-vs-NFE plots
_DEDICATED_STYLE = {"linewidth": 1.2, "marker": ".", "markersize": 6, "alpha": 0.85}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    """Save `fig` as a PNG at `path` through a temporary file in the same folder, then close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=fig.dpi, format="png")
    finally:
        _pyplot().close(fig)


def is_image(shape) -> bool:
    """Whether samples of this shape draw as pictures: (C, H, W) with 1 or 3 channels."""
    return len(shape) == 3 and shape[0] in (1, 3) and min(shape[1:]) >= 4


_SAME_DB = 1e-6  # dB: solvers whose PSNR agrees to this at every NFE are drawn as one line


def _coinciding(by: dict[str, list[tuple[int, float]]], tol: float = _SAME_DB) -> list[list[str]]:
    """Solvers grouped by identical curves: the same NFEs, and PSNRs equal to `tol` dB at each; in input order."""
    groups: list[list[str]] = []
    for name, points in by.items():
        for group in groups:
            other = by[group[0]]
            if [n for n, _ in other] == [n for n, _ in points] and all(
                abs(a - b) <= tol for (_, a), (_, b) in zip(other, points)
            ):
                group.append(name)
                break
        else:
            groups.append([name])
    return groups


def psnr_vs_nfe(results: list[dict], path, *, title: str, learned: tuple[str, ...] = ()) -> None:
    """PSNR (dB) against NFE, one line per solver. results: eval-JSON entries (solver, nfe, psnr_db),
    drawn at the NFE each really spent, ticks at the NFEs asked for; solvers named in `learned` bold.
    Solvers with the same curve share one line, labelled "a = b"."""
    plt = _pyplot()
    by: dict[str, list[tuple[int, float]]] = {}
    for r in results:
        if math.isfinite(r["psnr_db"]):
            by.setdefault(r["solver"], []).append((r["nfe"], r["psnr_db"]))
    by = {name: sorted(set(points)) for name, points in by.items()}
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    top = max(db for points in by.values() for _, db in points)
    floor = min(db for points in by.values() for _, db in points)
    floor = max(floor, top - _PSNR_SPAN)  # a diverging solver must not squash everyone else
    for group in _coinciding(by):
        nfe, db = zip(*by[group[0]])
        k = next((learned.index(n) for n in group if n in learned), -1)
        style = _LEARNED_STYLES[k % len(_LEARNED_STYLES)] if k >= 0 else _DEDICATED_STYLE
        names = " = ".join(n + (" (learned)" if n in learned else "") for n in group)
        label = names + (" (partly below)" if min(db) < floor else "")
        ax.plot(nfe, db, label=label, zorder=3 if k >= 0 else 2, **style)
    ax.set_ylim(floor - 2, top + 3)
    nfes = sorted({r.get("requested_nfe", r["nfe"]) for r in results})
    if len(nfes) <= 6:  # a few NFEs a factor apart (4, 8, 16): log scale; every NFE of a range: linear
        ax.set_xscale("log", base=2)
    ax.set_xticks(nfes, [str(n) for n in nfes])
    ax.minorticks_off()
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel("PSNR against ground truth [dB]")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    _save(fig, path)


def _image(x: torch.Tensor, data_range: float):
    """A (H, W[, 3]) array in [0, 1] from a (C, H, W) sample in [-data_range/2, data_range/2]."""
    img = (x.detach().float().cpu() / data_range + 0.5).clamp(0, 1)
    return img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()


def pictures(flow, samples: torch.Tensor) -> torch.Tensor:
    """What to draw of `samples`: a latent model's decoded pictures (its VAE), else the samples themselves."""
    decode = getattr(flow, "decode", None)
    return samples if decode is None else decode(samples.float())


def captions(flow, labels) -> list[str]:
    """A caption per sample: its prompt (text-to-image models) or its class label."""
    prompts = getattr(flow, "prompts", None)
    if prompts is None:
        return [f"label {int(k)}" for k in labels]
    return [_shorten(prompts.texts[int(k)]) for k in labels]


def _shorten(text: str, width: int = 18) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def image_grid(samples: torch.Tensor, path, *, data_range: float, title: str, columns: int = 8, captions=None) -> None:
    """Samples as a grid of pictures, each with its caption if given (or, for 2-D samples, a scatter plot)."""
    plt = _pyplot()
    shape = tuple(samples.shape[1:])
    if not is_image(shape):
        if shape != (2,):
            raise BespokeError(f"cannot draw samples of shape {shape}: need (C, H, W) images or 2-D points")
        fig, ax = plt.subplots(figsize=(4.6, 4.6), dpi=110)
        x = samples.detach().cpu()
        ax.scatter(x[:, 0], x[:, 1], s=6)
        ax.set_xlabel("x₁")
        ax.set_ylabel("x₂")
        ax.set_aspect("equal", adjustable="datalim")
    else:
        n = samples.shape[0]
        cols = min(columns, n)
        rows = math.ceil(n / cols)
        high = 1.0 if captions is None else 1.2
        fig, axes = plt.subplots(rows, cols, figsize=(1.0 * cols + 0.2, high * rows + 0.6), dpi=110, squeeze=False)
        for k, ax in enumerate(axes.flat):
            ax.set_axis_off()
            if k < n:
                ax.imshow(_image(samples[k], data_range), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                if captions is not None:
                    ax.set_title(str(captions[k]), fontsize=7, pad=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def sample_grid(
    rows: list[tuple[str, torch.Tensor]],
    path,
    *,
    reference: torch.Tensor,
    data_range: float,
    title: str,
    decode=None,
) -> None:
    """The `reference` row (ground truth), then per solver (label, samples (n, *shape)) its samples
    captioned with their PSNR against the reference and, under them, its error |x - reference| on
    one colour scale shared by all solvers; all from the same noise.
    2-D samples are drawn as scatter panels instead, one per solver. A latent model's samples are drawn
    through `decode` (its VAE) and their errors are in pixels, while the PSNR captions stay on latents."""
    plt = _pyplot()
    shape = tuple(reference.shape[1:])
    if not is_image(shape) and decode is None:
        return _scatter_panels(rows, path, reference=reference, title=title)
    n = reference.shape[0]
    draw = (lambda x: x.detach().cpu().double()) if decode is None else (lambda x: decode(x).double())
    ref = draw(reference)
    drawn = [draw(x) for _, x in rows]
    errors = [(x - ref).abs().mean(1) for x in drawn]  # (n, H, W), mean over channels
    top = max(float(e.max()) for e in errors) or 1.0
    grid = [("ground truth (dopri5)", "image", ref, None)]
    for (label, x), pic, err in zip(rows, drawn, errors):
        grid.append((label, "image", pic, psnr(x.to(reference.dtype), reference, data_range, "none")))
        grid.append((f"|error| ({label.split(' ')[0]})", "error", err, None))
    fig, axes = plt.subplots(len(grid), n, figsize=(1.1 * n + 1.9, 1.3 * len(grid) + 0.6), dpi=110, squeeze=False)
    for i, (label, kind, x, scores) in enumerate(grid):
        for j in range(n):
            ax = axes[i, j]
            if kind == "image":
                ax.imshow(_image(x[j], data_range), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                im = ax.imshow(x[j].numpy(), cmap="magma", vmin=0, vmax=top, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if scores is not None:
                ax.set_xlabel(f"{float(scores[j]):.1f} dB", fontsize=8)
        axes[i, 0].set_ylabel(label, fontsize=9, rotation=0, ha="right", va="center")
    fig.subplots_adjust(left=0.17, right=0.9, top=0.9, bottom=0.03, wspace=0.08, hspace=0.35)
    unit = "data units" if decode is None else "pixels"
    fig.colorbar(im, cax=fig.add_axes((0.92, 0.25, 0.012, 0.45)), label=f"|error| ({unit})")
    on = "" if decode is None else " (on latents; pictures decoded by the VAE)"
    fig.suptitle(
        f"{title}\nsame noise in every column; caption: PSNR against ground truth{on}; error rows share one scale",
        fontsize=10,
    )
    _save(fig, path)


def _scatter_panels(rows, path, *, reference, title) -> None:
    plt = _pyplot()
    if reference.shape[1:] != (2,):
        raise BespokeError(f"cannot draw samples of shape {tuple(reference.shape[1:])}: need (C, H, W) images or 2-D")
    all_rows = [("ground truth (dopri5)", reference)] + rows
    fig, axes = plt.subplots(1, len(all_rows), figsize=(3.4 * len(all_rows), 3.6), dpi=110, squeeze=False)
    ref = reference.detach().cpu()
    lo, hi = ref.min(0).values - 0.3, ref.max(0).values + 0.3
    for ax, (label, x) in zip(axes[0], all_rows):
        x = x.detach().cpu().to(ref.dtype)
        if x is not reference:
            for a, b in zip(ref, x):  # where each noise sample ended up, against its ground truth
                ax.plot([a[0], b[0]], [a[1], b[1]], color="tab:red", linewidth=0.6, alpha=0.6)
        ax.scatter(ref[:, 0], ref[:, 1], s=6, color="0.6", label="ground truth")
        ax.scatter(x[:, 0], x[:, 1], s=6, color="tab:blue", label=label)
        ax.set_title(label, fontsize=9)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_xlabel("x₁")
        ax.set_ylabel("x₂")
    fig.suptitle(f"{title}\nsame noise in every panel; red: error against ground truth", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def _number(v: float, decimals: int) -> str:
    """`v` with at most `decimals` decimals, trailing zeros dropped (0.125, 0.25, 1, -0.04)."""
    text = f"{v:.{decimals}f}"
    text = text.rstrip("0").rstrip(".") if "." in text else text
    return "0" if text == "-0" else text


def _decimals(m, fallback: int) -> int:
    """Decimals to write the values of `m` with: as few as show them all exactly (up to 3), else `fallback`."""
    for d in (0, 1, 2, 3):
        if abs(m - m.round(d)).max() < 1e-9:
            return d
    return fallback


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def _coefficient_panel(ax, fig, m, title: str, lim: float) -> None:
    """An [a | b] coefficient matrix (rows: steps; columns: x0, u_0..u_{n-1}) on the colour scale -lim..lim,
    values written in (in units of 10^-k when all are below 0.1); entries above the diagonal left blank."""
    import numpy as np

    n = m.shape[0]
    scale = 0 if lim >= 0.1 else -math.floor(math.log10(lim))
    if scale:  # small changes: written as 1.2 [×10⁻²], not 0.012
        m, lim, title = m * 10.0**scale, lim * 10.0**scale, f"{title}  [×10{str(-scale).translate(_SUPERSCRIPT)}]"
    decimals = _decimals(m, 1 if scale else 2)
    shown = np.where(np.arange(n + 1)[None, :] <= np.arange(n)[:, None] + 1, m, np.nan)
    cmap = _pyplot().get_cmap("RdBu_r").with_extremes(bad="white")
    im = ax.imshow(shown, cmap=cmap, vmin=-lim, vmax=lim)
    ax.axvline(0.5, color="0.3", linewidth=1.2)  # a_i (on x0) | b_ij (on the velocities)
    if n <= 10:
        size = 8 if n <= 8 else 7
        for i in range(n):
            for j in range(i + 2):
                dark = abs(m[i, j]) > 0.6 * lim
                text = _number(m[i, j], decimals)
                ax.text(j, i, text, ha="center", va="center", fontsize=size, color="w" if dark else "k")
    ax.set_xticks(range(n + 1), ["x₀"] + [f"u{j}" for j in range(n)], fontsize=10)
    ax.set_yticks(range(n), [str(i + 1) for i in range(n)], fontsize=10)
    ax.set_xlabel("weight on", fontsize=11)
    ax.set_ylabel("step i+1", fontsize=11)
    ax.set_title(title, fontsize=12)
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    bar.ax.tick_params(labelsize=9)


def learned_parameters(
    reference: tuple[str, object], learned: list[tuple[str, object]], path, *, flow, title: str
) -> None:
    """What the learned solvers changed, against a `reference` solver of the same NFE (label, solver).

    Panel 1: the steps of the time grids (where each solver evaluates the model). Panel 2: the reference's NS
    coefficients x_(i+1) = a_i x0 + sum_j b_ij u_j ([BNS] Eq. 11). Then, per learned solver, its
    coefficients minus the reference's: what learning moved, on one shared colour scale. Every colour
    scale is symmetric about 0 and reaches the largest |value| it shows, so none saturates."""
    plt = _pyplot()
    ref_label, ref = reference[0], reference[1].to_ns(flow)
    forms = [(label, s.to_ns(flow)) for label, s in learned]
    fig, axes = plt.subplots(1, 2 + len(forms), figsize=(4.6 + 4.8 * (1 + len(forms)), 5.0), dpi=110, squeeze=False)
    _steps_panel(axes[0, 0], [(ref_label, ref), *forms])

    def matrix(ns):
        return torch.cat([ns.a[:, None], ns.b], dim=1).numpy()

    base = matrix(ref)
    _coefficient_panel(axes[0, 1], fig, base, f"{ref_label}: a_i | b_ij", float(abs(base).max()) or 1.0)
    deltas = [(label, matrix(ns) - base) for label, ns in forms if ns.nfe == ref.nfe]
    lim = max([float(abs(d).max()) for _, d in deltas] + [1e-6])
    for ax, (label, d) in zip(axes[0, 2:], deltas):
        _coefficient_panel(ax, fig, d, f"{label} − {ref_label}", lim)
    fig.suptitle(textwrap.fill(title, width=int(fig.get_figwidth() * 72 / (12 * 0.55))), fontsize=12)
    fig.tight_layout()
    _save(fig, path)


def _steps_panel(ax, forms) -> None:
    """The steps h_i = t_(i+1) - t_i of each (label, NS form), in plain numbers (no offset for a uniform grid)."""
    steps = [(label, ns.times.diff().tolist()) for label, ns in forms]
    for label, h in steps:
        ax.plot(range(len(h)), h, marker="o", markersize=5, label=label)
    lo, hi = min(min(h) for _, h in steps), max(max(h) for _, h in steps)
    if hi - lo < 0.02 * hi:  # (nearly) uniform grids: show at least +-2% around them, not rounding noise
        mid = (lo + hi) / 2
        ax.set_ylim(mid - 0.02 * hi, mid + 0.02 * hi)
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.tick_params(labelsize=10)
    ax.set_xlabel("step i", fontsize=11)
    ax.set_ylabel("hᵢ = tᵢ₊₁ − tᵢ (t: 0 = noise, 1 = data)", fontsize=11)
    ax.set_title("time steps between model evaluations", fontsize=12)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=10)
