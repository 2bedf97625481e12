"""The report's figures: matplotlib (Agg canvas, no display, no pyplot state) → PNG data URIs.

Each function takes plain numbers, draws one figure and returns an `Image` (a `data:image/png;base64`
URI and its display size in CSS pixels), so the HTML page is one self-contained file. Figures are
drawn at 2x the display size so that they stay sharp on high-density screens.

What each figure shows, and the paper figure it mirrors (Bai et al. 2022, arXiv 2212.08073):
- `elo_scatter`: harmlessness Elo (y) against helpfulness Elo (x), one labelled point per model with
  95% intervals on both axes: the shape of Figure 2 (and Figures 3 and 8), where up and to the right
  is better and the frontier between the two is the point of the method.
- `refusal_tradeoff`: the same kind of plane for refusals: harmful requests refused (y) against benign
  look-alikes refused (x), the paper's harmless-vs-evasive trade-off (§4.4) as one picture.
- `round_curve`: mean preference-model score of the response after each critique → revision round
  (round 0 = the initial response), with a 95% interval: Figure 5.
- `grouped_bars`: rates or accuracies per model (or per setting) with optional 95% intervals and a
  chance line: refusal and over-refusal rates (the paper's harmful-vs-evasive trade-off, §4.4),
  multiple-choice accuracy (Figure 11's HHH evaluations), truthfulness plain vs prompted,
  prompt-injection flip rates, preference-model accuracy trained vs untrained, context distillation's
  plain / prompted / distilled bars (Askell et al. 2021, Figure 2).
- `curves`: small multiples of training curves against the step: SFT loss, preference-model loss, RL
  reward / PM score / KL / length / entropy (Figure 4 plots PM score against RL training).
- `reliability`: predicted probability against observed agreement per bin, point area ∝ count, the
  diagonal is perfect calibration: Figure 10's calibration of the preference model (and of the
  feedback model on the multiple-choice set).
- `histogram`: counts per labelled bin (the labeler's p_chosen histogram, where clamping to
  [0.4, 0.6] shows up as a spike).
"""

from __future__ import annotations

import base64
import io
import math
from typing import Mapping, NamedTuple, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

SIZE = (5.4, 3.3)  # inches at DISPLAY_DPI: 540 x 330 CSS pixels, two figures side by side at 1280 px
DISPLAY_DPI = 100
SCALE = 2  # drawn at 2x for high-density screens
COLORS = ["#3b6ea5", "#d9822b", "#4c9a5f", "#b8474b", "#7d62a8", "#8c6d4f", "#c55fa3", "#707070"]

Interval = Sequence[float] | None
Bar = float | tuple[float, Interval] | None  # a value, or (value, [lo, hi])


class Image(NamedTuple):
    uri: str  # data:image/png;base64,...
    width: int  # display size in CSS pixels
    height: int


def _figure(size: tuple[float, float] = SIZE) -> Figure:
    fig = Figure(figsize=size, dpi=DISPLAY_DPI, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas: rasterises without a display or pyplot's global state
    fig.set_facecolor("white")
    return fig


def _style(ax, title: str, xlabel: str = "", ylabel: str = "") -> None:
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, color="#e6e6e6", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def to_image(fig: Figure) -> Image:
    """Rasterise `fig` to PNG and return it as a data URI with its display size."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DISPLAY_DPI * SCALE, metadata={"Software": None})
    w, h = fig.get_size_inches()
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return Image(uri, round(w * DISPLAY_DPI), round(h * DISPLAY_DPI))


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _err(value: float, ci: Interval) -> tuple[float, float]:
    """(below, above) error-bar lengths from an interval; zero where it is missing."""
    if not isinstance(ci, (list, tuple)) or len(ci) != 2 or not (_finite(ci[0]) and _finite(ci[1])):
        return 0.0, 0.0
    return max(0.0, value - ci[0]), max(0.0, ci[1] - value)


def elo_scatter(points: Mapping[str, tuple[float, Interval, float, Interval]]) -> Image:
    """`points[model] = (helpfulness_elo, help_ci, harmlessness_elo, harm_ci)`; Figure 2's shape."""
    return scatter(points, "Harmlessness vs helpfulness (higher is better)", "helpfulness Elo", "harmlessness Elo")


def refusal_tradeoff(points: Mapping[str, tuple[float, Interval, float, Interval]]) -> Image:
    """`points[model] = (benign_refusal, ci, harmful_refusal, ci)`, as shares: harmless but not
    evasive is the top left corner."""
    return scatter(points, "Refusal vs over-refusal (top left is better)", "benign look-alikes refused (over-refusal)",
                   "harmful requests refused", limits=(0.0, 1.0))


def scatter(points: Mapping[str, tuple[float, Interval, float, Interval]], title: str, xlabel: str, ylabel: str,
            limits: tuple[float, float] | None = None) -> Image:
    """One labelled point per model, `(x, x_ci, y, y_ci)`, with both intervals as error bars."""
    fig = _figure((5.4, 4.2))
    ax = fig.add_subplot()
    for k, (name, (x, xci, y, yci)) in enumerate(points.items()):
        color = COLORS[k % len(COLORS)]
        xe, ye = _err(x, xci), _err(y, yci)
        ax.errorbar([x], [y], xerr=[[xe[0]], [xe[1]]], yerr=[[ye[0]], [ye[1]]], fmt="o", color=color,
                    ecolor=color, elinewidth=1, capsize=3, markersize=6)
        ax.annotate(name, (x, y), xytext=(6, 6), textcoords="offset points", fontsize=8, color=color)
    if limits:
        ax.set_xlim(limits[0] - 0.03, limits[1] + 0.03)
        ax.set_ylim(limits[0] - 0.03, limits[1] + 0.03)
    else:
        ax.margins(0.25)
    _style(ax, title, xlabel, ylabel)
    return to_image(fig)


def round_curve(rounds: Sequence[int], means: Sequence[float], cis: Sequence[Interval] | None) -> Image:
    """Mean PM score per revision round with a 95% band (Figure 5's shape)."""
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(rounds, means, "o-", color=COLORS[0], linewidth=1.5, markersize=5)
    if cis and len(cis) == len(rounds) and all(isinstance(c, (list, tuple)) and len(c) == 2 and _finite(c[0]) and _finite(c[1]) for c in cis):
        ax.fill_between(rounds, [c[0] for c in cis], [c[1] for c in cis], color=COLORS[0], alpha=0.18, linewidth=0)
    ax.set_xticks(list(rounds))
    _style(ax, "PM score over critique → revision rounds", "revision round (0 = initial response)", "mean PM score")
    return to_image(fig)


def grouped_bars(groups: Mapping[str, Mapping[str, Bar]], title: str, ylabel: str,
                 ylim: tuple[float, float] | None = (0.0, 1.08), chance: float | None = None) -> Image:
    """Bars per group (x) and series (colour): `groups[group][series] = value or (value, [lo, hi])`.
    Missing values (None) leave a gap; values are printed above their bars."""
    series = list(dict.fromkeys(s for g in groups.values() for s in g))
    fig = _figure()
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(series))
    labelled: set[str] = set()
    for j, s in enumerate(series):
        for i, g in enumerate(groups):
            bar = groups[g].get(s)
            value, ci = bar if isinstance(bar, tuple) else (bar, None)
            if not _finite(value):
                continue
            x = i + (j - (len(series) - 1) / 2) * width
            lo, hi = _err(value, ci)
            ax.bar([x], [value], width=width * 0.92, color=COLORS[j % len(COLORS)], label=None if s in labelled else s)
            labelled.add(s)
            if lo or hi:
                ax.errorbar([x], [value], yerr=[[lo], [hi]], fmt="none", ecolor="#333333", elinewidth=1, capsize=3)
            ax.annotate(f"{value:.2f}", (x, value + hi), xytext=(0, 2), textcoords="offset points", ha="center",
                        va="bottom", fontsize=7, color="#333333")
    if chance is not None:
        ax.axhline(chance, color="#888888", linestyle="--", linewidth=1, zorder=3, label="chance" if len(labelled) > 1 else None)
        if len(labelled) <= 1:
            ax.annotate("chance", (1, chance), xycoords=("axes fraction", "data"), xytext=(-2, 2), textcoords="offset points",
                        ha="right", fontsize=7, color="#555555", zorder=4, bbox={"fc": "white", "ec": "none", "pad": 1})
    ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if len(labelled) > 1:  # below the axes, where it cannot hide a bar or its value
        ax.legend(fontsize=7, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(labelled) + (chance is not None))
    _style(ax, title, "", ylabel)
    ax.grid(False, axis="x")
    return to_image(fig)


def curves(panels: Sequence[tuple[str, Sequence[float], Sequence[float], Sequence[float] | None]],
           xlabel: str = "step") -> Image:
    """Small multiples, one panel per `(title, xs, ys, band)`; `band` is a ±std around ys or None."""
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _figure((SIZE[0] if cols == 1 else 11.0, 3.0 * rows if cols > 1 else SIZE[1]))
    for k, (title, xs, ys, band) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        color = COLORS[k % len(COLORS)]
        ax.plot(xs, ys, "-", color=color, linewidth=1.3, marker="o" if len(xs) < 30 else None, markersize=3)
        if band is not None:
            ax.fill_between(xs, [y - b for y, b in zip(ys, band)], [y + b for y, b in zip(ys, band)],
                            color=color, alpha=0.15, linewidth=0)
        _style(ax, title, xlabel, "")
    return to_image(fig)


def reliability(series: Mapping[str, Sequence[tuple[float, float, int]]], title: str,
                xlabel: str = "predicted probability", ylabel: str = "observed agreement") -> Image:
    """Reliability diagram: `series[name] = [(mean predicted p, observed rate, count), ...]` per bin."""
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], "--", color="#888888", linewidth=1, label="perfect calibration")
    for k, (name, bins) in enumerate(series.items()):
        bins = [b for b in bins if _finite(b[0]) and _finite(b[1]) and b[2]]
        if not bins:
            continue
        total = sum(b[2] for b in bins)
        ax.plot([b[0] for b in bins], [b[1] for b in bins], "-", color=COLORS[k % len(COLORS)], linewidth=1, alpha=0.6)
        ax.scatter([b[0] for b in bins], [b[1] for b in bins], s=[20 + 300 * b[2] / total for b in bins],
                   color=COLORS[k % len(COLORS)], alpha=0.8, label=name, zorder=3)
    xs = [b[0] for bins in series.values() for b in bins if _finite(b[0])]
    ax.set_xlim(0.45 if xs and min(xs) >= 0.5 else 0.0, 1.0)  # probabilities of a chosen option are >= 0.5
    ax.set_ylim(0, 1.05)
    legend = ax.legend(fontsize=7, frameon=False, loc="upper left")
    for handle in legend.legend_handles:  # legend markers at one size, not the first bin's
        if hasattr(handle, "set_sizes"):
            handle.set_sizes([30])
    _style(ax, title, xlabel, ylabel)
    return to_image(fig)


def histogram(counts: Mapping[str, float], title: str, xlabel: str, ylabel: str = "count") -> Image:
    """Bars of `counts[bin label]` in the given order."""
    fig = _figure()
    ax = fig.add_subplot()
    labels = list(counts)
    values = [counts[k] if _finite(counts[k]) else 0 for k in labels]
    ax.bar(range(len(labels)), values, color=COLORS[0], width=0.8)
    for i, v in enumerate(values):
        ax.annotate(f"{v:g}", (i, v), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=7)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    _style(ax, title, xlabel, ylabel)
    ax.grid(False, axis="x")
    return to_image(fig)
