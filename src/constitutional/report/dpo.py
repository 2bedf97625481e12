"""The report's DPO section (not in the paper: the alternative to RL): loss, margin, accuracy,
rewards and KL per step; held-out preference accuracy before and after; the DPO vs SL-CAI
evaluation (`dpo/metrics.jsonl`, `dpo/heldout.json`, `dpo/eval.json`)."""

from __future__ import annotations

from . import plots
from .common import Missing, RunFiles, as_dict, as_list, bars, figs, figure, fmt, note, step_series, table
from .rl import versus_sl_cai


DPO_PANELS = [("dpo/loss", "loss (nats)"), ("dpo/margin", "margin β·Δ"), ("dpo/accuracy", "share of pairs with Δ > 0"),
              ("dpo/chosen_reward", "chosen reward β·log πθ/πref"), ("dpo/rejected_reward", "rejected reward β·log πθ/πref"),
              ("dpo/kl", "KL to reference (nats/token)")]


def dpo(f: RunFiles) -> str:
    records, held, ev = f.jsonl("dpo/metrics.jsonl"), f.json("dpo/heldout.json"), f.json("dpo/eval.json")
    if not records and held is None and ev is None:
        raise Missing("not run: cai dpo" if records is None else "not run yet: dpo/metrics.jsonl has no steps")
    s = f.summary("dpo")
    parts, items = [], []
    panels = []
    for key, title in DPO_PANELS:
        xs, ys, _ = step_series(records, key)
        if xs:
            panels.append((title, xs, ys, None))
    if panels:
        items.append(figure(plots.curves(panels), f"Per-step DPO metrics over {len(as_list(records))} steps ({fmt(s.get('data'))}, "
                                                  f"{fmt(s.get('loss'))} loss, β = {fmt(s.get('beta'))}); Δ is the policy-vs-reference "
                                                  "log-ratio margin of chosen over rejected."))
    held = as_dict(held)
    blocks = {"all": as_dict(held.get("all")), **{k: as_dict(v) for k, v in as_dict(held.get("by_source")).items()}}
    if blocks["all"]:
        acc = {n: {"before": as_dict(b.get("before")).get("accuracy"), "after": as_dict(b.get("after")).get("accuracy"),
                   "implicit reward": as_dict(b.get("reward")).get("accuracy")} for n, b in blocks.items()}
        items.append(bars(acc, "Held-out preference accuracy", "accuracy",
                          "Share of held-out comparisons where log π(chosen) > log π(rejected) under the starting policy (before) "
                          "and the trained one (after), and where the implicit reward β·log πθ/πref ranks chosen first.", chance=0.5))
        rows = [[f"{n}: {k}", b.get("count"), as_dict(b.get(k)).get("accuracy"), as_dict(b.get(k)).get("margin")]
                for n, b in blocks.items() for k in ("before", "after", "reward")]
        parts.append("<h3>Held-out comparisons</h3>" + table(["ranking", "n", "accuracy", "margin (nats)"], rows))
    elif held:
        parts.append(note(str(held.get("note", "no held-out comparisons"))))
    versus_sl_cai(as_dict(ev), "dpo", parts, items)
    return figs(*items) + "".join(parts)
