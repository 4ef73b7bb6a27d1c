"""The pictures: coinciding PSNR curves stay visible in the legend, and the coefficient colour scales never
saturate. The figures are inspected before they are written (plots._save captured)."""

from __future__ import annotations

import math

import pytest
import torch

import bespoke
from bespoke import plots
from bespoke.solvers.bns import BNSSolver


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions would save, instead of saving them; closed afterwards."""
    captured = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: captured.append(fig))
    yield captured
    for fig in captured:
        plots._pyplot().close(fig)


def _results(curves: dict[str, list[float]]) -> list[dict]:
    return [{"solver": s, "nfe": n, "psnr_db": db} for s, dbs in curves.items() for n, db in zip((4, 8, 16), dbs)]


def test_coinciding_solvers_share_one_line_named_after_both(figures):
    curves = {"euler": [28.19, 33.55, 39.0], "ddim": [28.19 + 1e-9, 33.55, 39.0], "bns": [30.0, 46.79, 50.0]}
    plots.psnr_vs_nfe(_results(curves), "unused.png", title="t", learned=("bns",))
    (ax,) = figures[0].axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["euler = ddim", "bns (learned)"]
    assert len(ax.get_lines()) == 2


def test_nearly_equal_solvers_keep_their_own_lines():
    by = {"a": [(4, 20.0), (8, 30.0)], "b": [(4, 20.0), (8, 30.001)], "c": [(4, 20.0)], "d": [(4, 20.0), (8, 30.0)]}
    assert plots._coinciding(by) == [["a", "d"], ["b"], ["c"]]


def _panel_limits(fig) -> list[tuple[float, float, float]]:
    """(vmin, vmax, max |value| shown) of every coefficient panel."""
    out = []
    for ax in fig.axes:
        for im in ax.get_images():
            data = im.get_array()
            top = max(abs(float(v)) for v in data.compressed()) if hasattr(data, "compressed") else math.nan
            out.append((*im.get_clim(), top))
    return out


def test_learned_parameters_colour_scales_do_not_saturate(figures):
    flow = bespoke.load_model("zoo:gmm2d")
    midpoint = bespoke.solver("midpoint", 8)
    bns = BNSSolver.from_solver(midpoint, flow)
    with torch.no_grad():
        bns.b.add_(0.3 * torch.tril(torch.ones_like(bns.b)))  # a learned change larger than midpoint's b
    plots.learned_parameters(("midpoint", midpoint), [("BNS", bns)], "unused.png", flow=flow, title="t " * 200)
    limits = _panel_limits(figures[0])
    assert len(limits) == 2  # midpoint's coefficients, BNS - midpoint
    for lo, hi, top in limits:
        assert lo == -hi and top <= hi + 1e-12 and top >= 0.99 * hi  # symmetric, reaching the largest |value|
    assert limits[0][1] == pytest.approx(1.0)  # midpoint's a_i = 1: its panel reaches 1, b's 0.25 does not cap it
    assert all(len(line) < 200 for line in figures[0]._suptitle.get_text().splitlines())  # a long title wraps
