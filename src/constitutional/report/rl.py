"""The report's RL-CAI section: per-step PM score, KL, length and entropy (Bai et al. 2022, Figure
4's axes; `rl/metrics.jsonl`) and the RL-CAI vs SL-CAI evaluation (`rl/eval.json`)."""

from __future__ import annotations

from . import plots
from .common import Missing, RunFiles, as_dict, as_list, bars, esc, figs, figure, note, num, pct, scalars, step_series, table


RL_PANELS = [("rl/score", "PM score (the reward before shaping)", "rl/score_std"), ("rl/reward", "reward (as trained on)", "rl/reward_std"),
             ("rl/kl", "KL to reference (nats/token)", None), ("rl/length", "response length (tokens)", None),
             ("rl/entropy", "entropy (nats/token)", None)]


def rl_panels(config: dict) -> list[tuple[str, str, str | None]]:
    """The per-step panels worth drawing for a run with these `rl` settings. The reward TRL trains on
    is the PM score whitened per batch (`normalize_reward`, the default): its batch mean is 0 at
    every step, a flat line, so it is drawn only when it differs from the PM score in a way a curve
    shows (no whitening and a length penalty)."""
    shaped = config.get("normalize_reward") is False and num(config.get("length_penalty")) and config["length_penalty"] > 0
    return [p for p in RL_PANELS if p[0] != "rl/reward" or shaped]


def rl(f: RunFiles) -> str:
    records, ev = f.jsonl("rl/metrics.jsonl"), f.json("rl/eval.json")
    if not records and ev is None:
        raise Missing("not run: cai rl" if records is None else "not run yet: rl/metrics.jsonl has no steps")
    records = [r for r in records or [] if isinstance(r, dict)]
    parts, items = [], []
    status = as_dict(as_dict(f.manifest.get("stages")).get("rl")).get("status")
    head = note(f"stage status: {status}; the curves end at the last logged step") if status and status != "done" else ""
    chosen = rl_panels(as_dict(as_dict(f.manifest.get("config")).get("rl")))
    panels = []
    for key, title, std in chosen:
        xs, ys, band = step_series(records, key, std)
        if xs:
            panels.append((title, xs, ys, band))
    if panels:
        whitened = "" if any(k == "rl/reward" for k, _, _ in chosen) else (
            " The reward the policy is trained on is this PM score whitened over each batch (mean 0 at every step), so it is not drawn.")
        items.append(figure(plots.curves(panels), f"Per-step RL metrics over {len(records)} steps (bands: ± one standard "
                                                  "deviation across the batch); Bai et al. 2022, Figure 4 plots PM score against RL training."
                                                  + whitened))
    head += "".join(f'<p class="warn">warning: {esc(w)}</p>' for w in as_list(f.summary("rl").get("warnings")))
    versus_sl_cai(as_dict(ev), "rl_cai", parts, items)
    return head + figs(*items) + "".join(parts)


def versus_sl_cai(ev: dict, name: str, parts: list[str], items: list[str]) -> None:
    """Append the held-out comparison of a trained policy with SL-CAI (`rl.evaluate`'s eval.json, the
    policy's keys named by `name`: rl_cai, dpo) to `parts` (tables) and `items` (figures)."""
    title = name.replace("_", "-").upper()
    if isinstance(ev.get("all"), dict):
        cols = {"all": ev["all"], **{k: as_dict(v) for k, v in as_dict(ev.get("by_set")).items()}}
        keys = list(dict.fromkeys(k for c in cols.values() for k in c))
        parts.append(f"<h3>{esc(title)} vs SL-CAI on held-out prompts</h3>"
                     + table(["measure", *cols], [[k, *[_cell(k, c.get(k)) for c in cols.values()]] for k in keys]))
        wins = {n: {f"{title} win rate": (c.get(f"win_rate_{name}"), c.get("win_rate_ci95"))} for n, c in cols.items()}
        items.append(bars(wins, f"{title} vs SL-CAI", f"win rate of {title}",
                          f"Win rate of {title} over SL-CAI judged by {ev.get('feedback_model', 'the feedback model')} in both orders "
                          "(a tie counts half), 95% Wilson intervals, per prompt set.", chance=0.5))
        rest = scalars({k: v for k, v in ev.items() if k not in ("all", "by_set")})
        if rest:
            parts.append(table(["setting", "value"], [list(r) for r in rest], "kv"))
    elif ev:
        parts.append("<h3>Evaluation</h3>" + table(["measure", "value"], [list(r) for r in scalars(ev)], "kv"))


def _cell(key: str, v):
    """Win rates and their intervals as percentages, other measures as they are."""
    if not key.startswith("win_rate"):
        return v
    return f"[{pct(v[0])}, {pct(v[1])}]" if isinstance(v, (list, tuple)) and len(v) == 2 else pct(v)
