"""The report's overview: the manifest (stages, status, seconds, config hashes, versions, git
commit) and the headline numbers of the stage summaries and eval/results.json."""

from __future__ import annotations

import json
from typing import Any

from .common import Missing, RunFiles, as_dict, esc, fmt, note, table


def overview(f: RunFiles) -> str:
    from ..stages import STAGES

    m = f.manifest
    order = [s.name for s in STAGES]
    stages = {k: as_dict(v) for k, v in as_dict(m.get("stages")).items() if k != "report"}
    names = sorted(stages, key=lambda n: (order.index(n) if n in order else len(order), n))
    pipe = as_dict(m.get("pipeline"))
    versions = ", ".join(f"{k} {v}" for k, v in as_dict(m.get("versions")).items() if v)
    meta = [["run", m.get("name")], ["directory", str(f.path)], ["created", m.get("created")], ["updated", m.get("updated")],
            ["pipeline config", pipe.get("source")], ["starting model", pipe.get("model")], ["seed", m.get("seed")],
            ["git commit", m.get("git_commit")], ["versions", versions or None]]
    body = table(["", ""], [r for r in meta if r[1] is not None], "kv")
    heads = headlines(f)
    if heads:
        body += "<h3>Headline numbers</h3>" + table(["stage", "measure", "value"], heads)
    if names:
        rows = [[n, stages[n].get("status"), stages[n].get("seconds"), stages[n].get("config_hash"),
                 stages[n].get("finished") or stages[n].get("started"), stages[n].get("error") or ""] for n in names]
        body += "<h3>Stages</h3>" + table(["stage", "status", "seconds", "config hash", "finished", "error"], rows)
    else:
        body += note("no stage has run in this run directory yet")
    if m.get("config"):
        body += ("<details><summary>Resolved configuration of each stage</summary><pre>"
                 + esc(json.dumps(m["config"], indent=2, ensure_ascii=False, default=str)) + "</pre></details>")
    return body


HEADLINES = [  # (stage, measure, summary keys (dotted for nested), how to show their values)
    ("revise", "usable revision chains", ("usable", "prompts"), "{} of {} prompts"),
    ("sft", "training loss, first → last step", ("first_loss", "final_loss", "steps"), "{} → {} ({} steps)"),
    ("label", "position bias rate (same position wins both orders)", ("position_bias_rate",), "{}"),
    ("label", "feedback model MC accuracy", ("mc.accuracy",), "{}"),
    ("train-pm", "PM held-out accuracy (untrained head)", ("heldout_accuracy", "heldout_accuracy_untrained"), "{} ({})"),
    ("train-pm", "PM MC accuracy (untrained head)", ("mc_accuracy", "mc_accuracy_untrained"), "{} ({})"),
    ("rl", "PM score, first → last 10% of steps", ("score_first", "score_last"), "{} → {}"),
    ("rl", "KL to the reference, last steps (nats/token)", ("kl_last",), "{}"),
    ("rl", "RL-CAI win rate vs SL-CAI (held out)", ("eval.win_rate_rl_cai",), "{}"),
    ("dpo", "held-out log π(chosen) > log π(rejected), before → after", ("heldout_accuracy_before", "heldout_accuracy_after"), "{} → {}"),
    ("dpo", "DPO win rate vs SL-CAI (held out)", ("eval.win_rate_dpo",), "{}"),
    ("distill", "KL to the prompted model, before → after", ("kl_before", "kl_after"), "{} → {}"),
    ("distill", "share of the KL gap closed", ("gap_closed",), "{}"),
]


def headlines(f: RunFiles) -> list[list[Any]]:
    """One row per headline number that this run has, from the stage summaries and eval/results.json."""
    rows: list[list[Any]] = []
    for stage, measure, keys, template in HEADLINES:
        values = []
        for key in keys:
            v: Any = f.summary(stage)
            for part in key.split("."):
                v = as_dict(v).get(part)
            values.append(v)
        if any(v is not None for v in values):
            rows.append([stage, measure, template.format(*map(fmt, values))])
    try:
        results = as_dict(f.json("eval/results.json"))
    except Missing:
        results = {}
    harm = as_dict(as_dict(results.get("harmlessness")).get("elo"))
    helpf = as_dict(as_dict(results.get("helpfulness")).get("elo"))
    for name in dict.fromkeys([*harm, *helpf]):
        rows.append(["eval", f"{name}: harmlessness / helpfulness Elo",
                     f"{fmt(as_dict(harm.get(name)).get('elo'))} / {fmt(as_dict(helpf.get(name)).get('elo'))}"])
    return rows
