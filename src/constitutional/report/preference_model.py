"""The report's preference-model section: PM training loss, calibration (Bai et al. 2022, Figure
10's reliability diagram), accuracy trained vs untrained (`train-pm/loss.json`, `train-pm/metrics.json`)."""

from __future__ import annotations

from . import plots
from .common import Missing, RunFiles, as_dict, bars, bins_of, figs, figure, fmt, note, num, step_series, table


def preference_model(f: RunFiles) -> str:
    loss, metrics = f.json("train-pm/loss.json"), f.json("train-pm/metrics.json")
    if loss is None and metrics is None:
        raise Missing("not run: cai train-pm")
    items, parts = [], []
    xs, ys, _ = step_series(loss, "loss")
    if xs:
        items.append(figure(plots.curves([("preference-model loss", xs, ys, None)]),
                            "Soft-label preference-model loss per step: −[p·log σ(r_c − r_r) + (1 − p)·log σ(r_r − r_c)]."))
    else:
        parts.append(note("no training loss: train-pm/loss.json is missing or has no loss entries"))
    m = as_dict(metrics)
    held, untrained = as_dict(m.get("heldout")), as_dict(m.get("untrained"))
    u_held = as_dict(untrained.get("heldout"))
    series = {k: v for k, v in (("trained", bins_of(held.get("bins"), "confidence", "agreement")),
                                ("untrained head", bins_of(u_held.get("bins"), "confidence", "agreement"))) if v}
    if series:
        items.append(figure(plots.reliability(series, "PM calibration on held-out comparisons", "PM probability of its preferred response"),
                            f"Reliability diagram on {fmt(held.get('count'))} held-out comparisons: how often the PM's preferred response "
                            "is the labeler's, against the PM's confidence; area ∝ count, the diagonal is perfect calibration "
                            "(Bai et al. 2022, Figure 10)."))
    mc, u_mc = as_dict(m.get("mc")), as_dict(untrained.get("mc"))
    groups = {"held-out": {"trained": held.get("accuracy"), "untrained head": u_held.get("accuracy")},
              "MC (all)": {"trained": mc.get("accuracy"), "untrained head": u_mc.get("accuracy")}}
    by, u_by = as_dict(mc.get("accuracy_by_subset")), as_dict(u_mc.get("accuracy_by_subset"))
    groups.update({f"MC: {k}": {"trained": by.get(k), "untrained head": u_by.get(k)} for k in dict.fromkeys([*by, *u_by])})
    groups = {g: v for g, v in groups.items() if any(num(x) for x in v.values())}
    if groups:
        items.append(bars(groups, "PM accuracy, trained vs untrained head", "accuracy",
                          "Accuracy of the preference model on held-out comparisons (agreement with the labeler) and on the "
                          "multiple-choice set, after training and with its untrained head.", chance=0.5))
        rows = [["held-out comparisons", held.get("count"), u_held.get("count")], ["held-out accuracy", held.get("accuracy"), u_held.get("accuracy")],
                ["held-out loss", held.get("loss"), u_held.get("loss")], ["held-out ECE", held.get("ece"), u_held.get("ece")],
                ["MC items", mc.get("count"), u_mc.get("count")], ["MC accuracy", mc.get("accuracy"), u_mc.get("accuracy")]]
        parts.append(table(["measure", "trained", "untrained head"], [r for r in rows if r[1] is not None or r[2] is not None]))
    elif metrics is None:
        parts.append(note("no calibration or accuracy: train-pm/metrics.json is missing"))
    return figs(*items) + "".join(parts)
