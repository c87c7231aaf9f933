"""Figures of the HTML report, drawn by matplotlib and returned as inline SVG text.

Figures are built with :class:`matplotlib.figure.Figure` (no pyplot state, no GUI backend). Text stays
text in the SVG (``svg.fonttype = "none"``) and element ids are salted per figure, so several figures
can share one HTML page. Token colours come from a matplotlib colormap centred on 0 (red = positive
= proponent side, blue = negative).
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.colors import CenteredNorm, to_hex
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

TOKEN_COLORMAP = "RdBu_r"
"""Diverging colormap of the token heatmaps: red for positive influence, blue for negative."""

_salt = itertools.count()


def new_page() -> None:
    """Salt the next figures' ids from the first again (call before a page's figures are drawn): a page made again
    from the same results, in the same process too, is the same text (the ids differed from the second page on)."""
    global _salt
    _salt = itertools.count()


def svg(figure: Figure) -> str:
    """The figure as an ``<svg>`` element (XML header and DOCTYPE dropped, ids unique to this figure), without the
    time it was drawn (its ``dc:date`` made two reports of the same results differ)."""
    buffer = io.StringIO()
    with mpl.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"wherefrom-{next(_salt)}"}):
        figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def _errors(stats: Sequence[Mapping[str, Any] | None]) -> tuple[np.ndarray, np.ndarray]:
    """Means and ``(2, n)`` non-negative error-bar lengths from ``{mean, low, high}`` stats (0 where unknown)."""
    means = np.array([s["mean"] if s else np.nan for s in stats], dtype=np.float64)
    low = np.array([s["low"] if s and s.get("low") is not None else np.nan for s in stats], dtype=np.float64)
    high = np.array([s["high"] if s and s.get("high") is not None else np.nan for s in stats], dtype=np.float64)
    bars = np.nan_to_num(np.stack([means - low, high - means]), nan=0.0)
    return means, np.clip(bars, 0, None)


def share_axis_top(stats: Sequence[Mapping[str, Any] | None]) -> float:
    """Top of a share axis: 1, or 1.35 x the highest interval end (mean where there is none) when that
    is below 0.74, so that 30 layers of about 1/30 each are not flat bars under an empty plot (the
    headroom keeps the legend off the bars)."""
    ends = [s["high"] if s.get("high") is not None else s["mean"] for s in stats if s and s.get("mean") is not None]
    highest = max((e for e in ends if np.isfinite(e)), default=1.0)
    return min(1.0, 1.35 * highest) if highest > 0 else 1.0


def share_plot(series: Mapping[str, Mapping[str, Any]], labels: Sequence[str], title: str, xlabel: str) -> str:
    """Grouped bars of shares with their intervals: ``series`` maps a legend name to ``{label: stat}``."""
    figure = Figure(figsize=(max(4.0, 0.5 * len(labels) + 2), 2.8))
    ax = figure.subplots()
    width = 0.8 / max(1, len(series))
    x = np.arange(len(labels))
    for i, (name, shares) in enumerate(series.items()):
        means, bars = _errors([shares.get(label) for label in labels])
        ax.bar(x + i * width - 0.4 + width / 2, means, width, yerr=bars, capsize=2, label=name)
    ax.set_xticks(x, labels, rotation=45 if len(labels) > 8 else 0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("share")
    ax.set_ylim(0, share_axis_top([s for shares in series.values() for s in shares.values()]))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return svg(figure)


def tail_plot(row: np.ndarray, fit: Mapping[str, Any] | None, title: str) -> str:
    """Empirical CCDF ``P(X >= x)`` of a query's positive scores on log-log axes, with the power-law fit
    ``P(X >= x) = (n_tail / n_positive) (x / xmin)^(1 - alpha)`` above ``xmin`` when ``fit`` is given."""
    figure = Figure(figsize=(4.5, 3.2))
    ax = figure.subplots()
    values = np.sort(np.asarray(row, dtype=np.float64))
    values = values[np.isfinite(values) & (values > 0)]
    if values.size:
        ccdf = 1.0 - np.arange(values.size) / values.size
        ax.loglog(values, ccdf, ".", markersize=3, label="positive scores")
    if fit:
        x = np.geomspace(fit["xmin"], values[-1], 50)
        y = fit["n_tail"] / fit["n_positive"] * (x / fit["xmin"]) ** (1 - fit["alpha"])
        ax.loglog(x, y, "-", label=f"power law, alpha = {fit['alpha']:.2f} +- {1.96 * fit['sigma']:.2f}")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log axis overlap
    ax.set_xlabel("influence (positive scores)")
    ax.set_ylabel("P(X >= x)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return svg(figure)


def interval_plot(stats: Mapping[str, Mapping[str, Any] | None], title: str) -> str:
    """One row per method: its mean with the 95% interval, ``stats`` mapping a method to ``{mean, low, high}``."""
    names = list(stats)
    figure = Figure(figsize=(5.0, 0.3 * len(names) + 1.2))
    ax = figure.subplots()
    means, bars = _errors([stats[n] for n in names])
    ax.errorbar(means, np.arange(len(names)), xerr=bars, fmt="o", capsize=3)
    ax.set_yticks(np.arange(len(names)), names)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return svg(figure)


def matrix_plot(labels: Sequence[str], matrix: Sequence[Sequence[float | None]], title: str) -> str:
    """A square heatmap in ``[-1, 1]`` with each cell's value written in it (e.g. method agreement)."""
    values = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=np.float64)
    size = 0.5 * len(labels) + 1.5
    figure = Figure(figsize=(size + 1, size))
    ax = figure.subplots()
    image = ax.imshow(values, cmap=TOKEN_COLORMAP, vmin=-1, vmax=1)
    ax.set_xticks(np.arange(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(np.arange(len(labels)), labels)
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, "–" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7)
    figure.colorbar(image, ax=ax, shrink=0.8)
    ax.set_title(title, fontsize=10)
    return svg(figure)


TOKEN_COLOR_RANGE = 0.3
"""Half-width of the colormap span the token colours use around its white centre (0.5 +- 0.3): the
largest ``|value|`` gets a mid red or blue on which the black token text stays legible."""


def token_colors(values: Sequence[float]) -> list[str]:
    """A hex background colour per token value, centred on 0 and scaled by the largest ``|value|``
    (which maps to ``0.5 +- TOKEN_COLOR_RANGE`` of :data:`TOKEN_COLORMAP`)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return []
    scale = float(np.abs(array).max()) or 1.0
    cmap = mpl.colormaps[TOKEN_COLORMAP]
    position = 0.5 + 2 * TOKEN_COLOR_RANGE * (CenteredNorm(0.0, scale)(array) - 0.5)
    return [to_hex(cmap(v)) for v in position]
