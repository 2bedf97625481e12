"""The report's context-distillation section: held-out KL before/after and multiple choice plain /
prompted / distilled (`distill/eval.json`)."""

from __future__ import annotations

from .common import Missing, RunFiles, as_dict, bars, figs, fmt, num, table


def distill(f: RunFiles) -> str:
    ev = f.json("distill/eval.json")
    if ev is None:
        raise Missing("not run: cai distill")
    ev = as_dict(ev)
    gap = f" ({fmt(ev['gap_closed'])} of the gap closed)" if num(ev.get("gap_closed")) else ""
    mc = ev.get("mc") if isinstance(ev.get("mc"), dict) else as_dict(ev.get("mc_accuracy"))  # {plain, prompted, distilled}
    items = [bars({"before training": {"KL": ev.get("kl_before")}, "after training": {"KL": ev.get("kl_after")}},
                  "KL to the prompted model", "nats per token", ylim=None,
                  caption=f"Per-token KL(p(·|C, x) ‖ p(·|x)) on held-out prompts before and after distillation{gap}."),
             bars({k: {"accuracy": v} for k, v in mc.items()}, "Multiple choice: plain, prompted, distilled", "accuracy",
                  "Multiple-choice accuracy without the context, with it, and after distilling it into the weights "
                  "(Askell et al. 2021, Figure 2).")]
    rows = [[k, v] for k, v in ev.items() if v is None or isinstance(v, (str, int, float, bool))]
    return figs(*items) + table(["measure", "value"], rows, "kv")
