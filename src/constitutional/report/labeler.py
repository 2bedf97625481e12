"""The report's labeler section: the verdict, position bias, p_chosen histogram and MC calibration
of the feedback model (`label/diagnostics.json`)."""

from __future__ import annotations

from . import plots
from .common import Missing, RunFiles, as_dict, bins_of, esc, figs, figure, fmt, table


def labeler(f: RunFiles) -> str:
    d = f.json("label/diagnostics.json")
    if d is None:
        raise Missing("not run: cai label")
    d = as_dict(d)
    body = f'<p class="verdict"><strong>Verdict:</strong> {esc(d["verdict"])}</p>' if d.get("verdict") else ""
    items = []
    hist = as_dict(d.get("p_chosen_histogram"))
    if hist:
        items.append(figure(plots.histogram(hist, "Labeler confidence", "p_chosen (probability of the chosen response)", "comparisons"),
                            "Histogram of the soft labels p_chosen: clamping puts every label in its clamp range, and a labeler "
                            "without signal puts them all near 0.5."))
    mc = as_dict(d.get("mc"))
    bins = bins_of(mc.get("calibration_bins"), "mean_p", "accuracy")
    if any(b[2] for b in bins):
        items.append(figure(plots.reliability({"feedback model": bins}, "Labeler calibration on the MC set", "probability of its chosen option", "accuracy"),
                            f"The feedback model as a judge on {fmt(mc.get('items'))} multiple-choice items: accuracy against "
                            "confidence per bin, area ∝ count (Bai et al. 2022, Figure 10 for the feedback model)."))
    rows = [["feedback model", d.get("feedback_model")], ["comparisons", d.get("comparisons")],
            ["position bias rate (same position wins both orders)", d.get("position_bias_rate")],
            ["order consistency", d.get("order_consistency")], ["order ties", d.get("order_ties")], ["share choosing (A)", d.get("share_A")],
            ["mean p_chosen", d.get("p_chosen_mean")], ["MC set", mc.get("set")], ["MC accuracy", mc.get("accuracy")],
            ["MC accuracy by subset", mc.get("accuracy_by_subset")], ["MC ECE", mc.get("ece")]]
    return body + figs(*items) + table(["measure", "value"], [r for r in rows if r[1] is not None], "kv")
