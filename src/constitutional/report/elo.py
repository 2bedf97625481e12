"""The report's Elo section: harmlessness vs helpfulness Elo per model, with PM scores (Bai et al.
2022, Figure 2; from `eval/results.json`)."""

from __future__ import annotations

import json

from . import plots
from .common import Missing, RunFiles, as_dict, as_list, esc, figs, figure, fmt, note, num, table, with_ci


def elo(f: RunFiles) -> str:
    r = f.json("eval/results.json")
    if r is None:
        raise Missing("not run: cai eval")
    r = as_dict(r)
    harm_d, help_d = as_dict(r.get("harmlessness")), as_dict(r.get("helpfulness"))
    harm, helpf = as_dict(harm_d.get("elo")), as_dict(help_d.get("elo"))
    if not harm and not helpf:
        raise Missing("not measured: eval/results.json has no harmlessness or helpfulness Elo")
    models = as_dict(r.get("models"))
    names = list(dict.fromkeys([*helpf, *harm]))
    points = {n: (helpf[n]["elo"], helpf[n].get("ci"), harm[n]["elo"], harm[n].get("ci")) for n in names
              if num(as_dict(helpf.get(n)).get("elo")) and num(as_dict(harm.get(n)).get("elo"))}
    caption = (f"Elo fitted to {fmt(harm_d.get('comparisons'))} harmlessness and {fmt(help_d.get('comparisons'))} helpfulness "
               f"comparisons by the feedback model on {fmt(harm_d.get('n_prompts'))} red-team and {fmt(help_d.get('n_prompts'))} "
               "helpfulness prompts; bars are 95% intervals. Up and to the right is better (Bai et al. 2022, Figure 2).")
    body = figs(figure(plots.elo_scatter(points), caption)) if points else note("no model has both Elo scores: nothing to place on the plane")

    def pm(d: dict, n: str) -> str:
        v = as_dict(as_dict(d.get("pm_score")).get(n))
        return with_ci(v.get("mean"), v.get("ci")) if v else "–"

    rows = [[n, models.get(n, ""), with_ci(as_dict(helpf.get(n)).get("elo"), as_dict(helpf.get(n)).get("ci")),
             with_ci(as_dict(harm.get(n)).get("elo"), as_dict(harm.get(n)).get("ci")), pm(help_d, n), pm(harm_d, n)] for n in names]
    body += table(["model", "model string", "helpfulness Elo [95% CI]", "harmlessness Elo [95% CI]",
                   "PM score, helpful prompts", "PM score, red-team prompts"], rows)
    notes = [n for n in as_list(r.get("notes")) if n]
    if notes:
        body += '<ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>"
    extra = {k: r[k] for k in ("datasets", "settings") if r.get(k)}
    if extra:
        body += ("<details><summary>Evaluation data sets and settings</summary><pre>"
                 + esc(json.dumps(extra, indent=2, ensure_ascii=False, default=str)) + "</pre></details>")
    return body
