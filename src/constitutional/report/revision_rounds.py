"""The report's revision-rounds section: PM score over critique → revision rounds (Bai et al.
2022, Figure 5; from `eval/results.json`)."""

from __future__ import annotations

from . import plots
from .common import Missing, RunFiles, as_dict, figs, figure, fmt, num, table, with_ci


def revision_rounds(f: RunFiles) -> str:
    r = f.json("eval/results.json")
    if r is None:
        raise Missing("not run: cai eval")
    rr = as_dict(as_dict(r).get("revision_rounds"))
    cis = rr.get("ci") or []
    pts = [(x, y, cis[i] if i < len(cis) else None) for i, (x, y) in enumerate(zip(rr.get("rounds") or [], rr.get("mean_pm") or []))
           if num(x) and num(y)]
    if not pts:
        raise Missing("not measured: eval/results.json has no revision_rounds")
    img = plots.round_curve([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts])
    caption = (f"Mean preference-model score of the response after each critique → revision round on {fmt(rr.get('n'))} "
               "prompts (round 0 is the initial response), with 95% intervals (Bai et al. 2022, Figure 5).")
    return figs(figure(img, caption)) + table(["round", "mean PM score [95% CI]"], [[x, with_ci(y, c)] for x, y, c in pts])
