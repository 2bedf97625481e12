"""Assemble the HTML report of a run directory: one self-contained file (inline CSS, figures as PNG
data URIs, no network), readable at 1280 px.

`build_report(run_path, manifest, title, chains)` reads what the stages wrote (ARCHITECTURE.md "Run
directory") and returns the page and what it holds. Each section is shown only when its inputs exist;
otherwise a one-line note says which command produces them ("not run: cai eval"). A file that exists
but cannot be read (malformed JSON, a corrupt record line) gives an "unreadable" note for its section
instead of stopping the report, since a report is most needed when something went wrong. Every piece
of text from a record is HTML-escaped. The sections (`SECTIONS`, in page order) and the paper figures
they mirror (Bai et al. 2022, arXiv 2212.08073; plots.py says what each figure draws):

1. overview: the manifest (stages, status, seconds, config hashes, versions, git commit), headline numbers.
2. elo: harmlessness vs helpfulness Elo per model (Figure 2).
3. revision-rounds: PM score over critique → revision rounds (Figure 5).
4. behaviour: refusal and over-refusal rates, multiple-choice accuracy, truthfulness plain vs
   prompted, prompt-injection follow and flip rates (from `eval/results.json`).
5. sft: the SL-CAI fine-tuning loss.
6. preference-model: PM training loss, calibration (Figure 10's reliability diagram), accuracy
   trained vs untrained.
7. labeler: the verdict, position bias, p_chosen histogram, MC calibration of the feedback model.
8. rl: RL-CAI reward, PM score, KL, length and entropy per step (Figure 4's axes); the RL-CAI vs
   SL-CAI evaluation.
9. dpo: DPO loss, margin, accuracy, rewards and KL per step; held-out preference accuracy before and
   after; the DPO vs SL-CAI evaluation (not in the paper: the alternative to RL).
10. distill: context distillation's held-out KL before/after and MC plain / prompted / distilled.
11. chains: a few critique → revision chains (the SL-CAI data, §3).

The page ends with a small inline script that sets `data-images-ok` on <body> to "yes" once every
image has decoded (the browser test reads it), and shows a banner when one has not.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError
from ..run import now, read_jsonl
from . import plots


class Missing(Exception):
    """A section's inputs are absent (or unreadable); the message is the one-line note shown instead."""


@dataclass
class Section:
    key: str  # id on the page and name in the stage summary
    title: str
    body: str = ""  # HTML; empty when the section is missing
    missing: str = ""  # the one-line note shown instead


class RunFiles:
    """Reads the run directory's files once each; None when a file is absent."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest, self._cache = path, manifest, {}

    def json(self, rel: str) -> Any:
        if rel not in self._cache:
            p = self.path / rel
            try:
                self._cache[rel] = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise Missing(f"unreadable: {rel} ({e}); rerun the stage that writes it") from None
        return self._cache[rel]

    def jsonl(self, rel: str) -> list[dict] | None:
        p = self.path / rel
        if not p.is_file():
            return None
        try:
            return read_jsonl(p)
        except UserError as e:
            raise Missing(f"unreadable: {e}") from None

    def summary(self, stage: str) -> dict:
        return _dict(_dict(_dict(self.manifest.get("stages")).get(stage)).get("summary"))


# ------------------------------------------------------------------------------------ formatting
def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fmt(v: Any) -> str:
    """A value for a table cell: numbers rounded for reading, intervals as [lo, hi], None as a dash."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, float):
        return f"{v:,.0f}" if math.isfinite(v) and abs(v) >= 1e4 else f"{v:.4g}"  # 4 significant digits
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return ", ".join(f"{k} {fmt(x)}" for k, x in v.items())
    return str(v)


def with_ci(v: Any, ci: Any) -> str:
    return fmt(v) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else "")


def table(headers: list[str], rows: list[list[Any]], cls: str = "") -> str:
    """An HTML table; every cell is formatted with `fmt` and escaped."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(c if isinstance(c, str) else fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def figure(img: plots.Image, caption: str) -> str:
    return (f'<figure style="width:{img.width}px"><img src="{img.uri}" width="{img.width}" height="{img.height}" alt="{esc(caption)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def bars(groups: dict, title: str, ylabel: str, caption: str, **kw) -> str:
    """A grouped bar figure (`plots.grouped_bars`), or "" when no bar has a value."""
    if not any(num(b[0] if isinstance(b, tuple) else b) for g in groups.values() for b in g.values()):
        return ""
    return figure(plots.grouped_bars(groups, title, ylabel, **kw), caption)


def figs(*items: str) -> str:
    return '<div class="figs">' + "".join(items) + "</div>"


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def text_block(label: str, text: Any, cls: str = "text") -> str:
    return f'<div class="block"><div class="label">{esc(label)}</div><div class="{cls}">{esc(text if text is not None else "–")}</div></div>'


def scalars(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Flatten nested dicts to (dotted key, value) for every number, string, bool or short list."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += scalars(v, f"{prefix}{k}.")
        elif v is None or isinstance(v, (str, int, float, bool)) or (isinstance(v, list) and len(v) <= 4 and all(num(x) for x in v)):
            out.append((f"{prefix}{k}", v))
    return out


def _dict(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


def _list(x: Any) -> list:
    return x if isinstance(x, list) else [x] if x else []


def _spec_name(spec: str) -> str:
    return Path(spec).name if "/" in spec else spec


# --------------------------------------------------------------------------------------- sections
def overview(f: RunFiles) -> str:
    from ..stages import STAGES

    m = f.manifest
    order = [s.name for s in STAGES]
    stages = {k: _dict(v) for k, v in _dict(m.get("stages")).items() if k != "report"}
    names = sorted(stages, key=lambda n: (order.index(n) if n in order else len(order), n))
    pipe = _dict(m.get("pipeline"))
    versions = ", ".join(f"{k} {v}" for k, v in _dict(m.get("versions")).items() if v)
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
                v = _dict(v).get(part)
            values.append(v)
        if any(v is not None for v in values):
            rows.append([stage, measure, template.format(*map(fmt, values))])
    try:
        results = _dict(f.json("eval/results.json"))
    except Missing:
        results = {}
    harm = _dict(_dict(results.get("harmlessness")).get("elo"))
    helpf = _dict(_dict(results.get("helpfulness")).get("elo"))
    for name in dict.fromkeys([*harm, *helpf]):
        rows.append(["eval", f"{name}: harmlessness / helpfulness Elo",
                     f"{fmt(_dict(harm.get(name)).get('elo'))} / {fmt(_dict(helpf.get(name)).get('elo'))}"])
    return rows


def elo(f: RunFiles) -> str:
    r = f.json("eval/results.json")
    if r is None:
        raise Missing("not run: cai eval")
    r = _dict(r)
    harm_d, help_d = _dict(r.get("harmlessness")), _dict(r.get("helpfulness"))
    harm, helpf = _dict(harm_d.get("elo")), _dict(help_d.get("elo"))
    if not harm and not helpf:
        raise Missing("not measured: eval/results.json has no harmlessness or helpfulness Elo")
    models = _dict(r.get("models"))
    names = list(dict.fromkeys([*helpf, *harm]))
    points = {n: (helpf[n]["elo"], helpf[n].get("ci"), harm[n]["elo"], harm[n].get("ci")) for n in names
              if num(_dict(helpf.get(n)).get("elo")) and num(_dict(harm.get(n)).get("elo"))}
    caption = (f"Elo fitted to {fmt(harm_d.get('comparisons'))} harmlessness and {fmt(help_d.get('comparisons'))} helpfulness "
               f"comparisons by the feedback model on {fmt(harm_d.get('n_prompts'))} red-team and {fmt(help_d.get('n_prompts'))} "
               "helpfulness prompts; bars are 95% intervals. Up and to the right is better (Bai et al. 2022, Figure 2).")
    body = figs(figure(plots.elo_scatter(points), caption)) if points else note("no model has both Elo scores: nothing to place on the plane")

    def pm(d: dict, n: str) -> str:
        v = _dict(_dict(d.get("pm_score")).get(n))
        return with_ci(v.get("mean"), v.get("ci")) if v else "–"

    rows = [[n, models.get(n, ""), with_ci(_dict(helpf.get(n)).get("elo"), _dict(helpf.get(n)).get("ci")),
             with_ci(_dict(harm.get(n)).get("elo"), _dict(harm.get(n)).get("ci")), pm(help_d, n), pm(harm_d, n)] for n in names]
    body += table(["model", "model string", "helpfulness Elo [95% CI]", "harmlessness Elo [95% CI]",
                   "PM score, helpful prompts", "PM score, red-team prompts"], rows)
    notes = [n for n in _list(r.get("notes")) if n]
    if notes:
        body += '<ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>"
    extra = {k: r[k] for k in ("datasets", "settings") if r.get(k)}
    if extra:
        body += ("<details><summary>Evaluation data sets and settings</summary><pre>"
                 + esc(json.dumps(extra, indent=2, ensure_ascii=False, default=str)) + "</pre></details>")
    return body


def revision_rounds(f: RunFiles) -> str:
    r = f.json("eval/results.json")
    if r is None:
        raise Missing("not run: cai eval")
    rr = _dict(_dict(r).get("revision_rounds"))
    cis = rr.get("ci") or []
    pts = [(x, y, cis[i] if i < len(cis) else None) for i, (x, y) in enumerate(zip(rr.get("rounds") or [], rr.get("mean_pm") or []))
           if num(x) and num(y)]
    if not pts:
        raise Missing("not measured: eval/results.json has no revision_rounds")
    img = plots.round_curve([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts])
    caption = (f"Mean preference-model score of the response after each critique → revision round on {fmt(rr.get('n'))} "
               "prompts (round 0 is the initial response), with 95% intervals (Bai et al. 2022, Figure 5).")
    return figs(figure(img, caption)) + table(["round", "mean PM score [95% CI]"], [[x, with_ci(y, c)] for x, y, c in pts])


def behaviour(f: RunFiles) -> str:
    r = f.json("eval/results.json")
    if r is None:
        raise Missing("not run: cai eval")
    r = _dict(r)
    items, tables = [], []
    refusal = {n: _dict(v) for n, v in _dict(r.get("refusal")).items()}
    if refusal:
        groups = {n: {"red-team prompts (refusal)": (v.get("harmful_refusal_rate"), v.get("harmful_ci")),
                      "benign prompts (over-refusal)": (v.get("benign_refusal_rate"), v.get("benign_ci"))} for n, v in refusal.items()}
        items.append(bars(groups, "Refusal rates", "share of responses that refuse",
                          "Refusals of red-team requests (higher is safer) and of benign requests (over-refusal: lower is "
                          "better; the paper's harmless-but-evasive failure), 95% intervals."))
        tables.append(table(["model", "red-team refusal [95% CI]", "n", "benign refusal [95% CI]", "n"],
                            [[n, with_ci(v.get("harmful_refusal_rate"), v.get("harmful_ci")), v.get("n_harmful"),
                              with_ci(v.get("benign_refusal_rate"), v.get("benign_ci")), v.get("n_benign")] for n, v in refusal.items()]))
    mc = {n: _dict(v) for n, v in _dict(r.get("mc")).items()}
    if mc:
        groups = {n: {_spec_name(s): _dict(m).get("accuracy") for s, m in v.items()} for n, v in mc.items()}
        items.append(bars(groups, "Multiple-choice accuracy", "accuracy",
                          "Accuracy of each model as a multiple-choice judge, per comparison set (Bai et al. 2022, Figure 11)."))
        tables.append(table(["model", "set", "accuracy", "n", "both orders", "by subset"],
                            [[n, s, _dict(m).get("accuracy"), _dict(m).get("n"), _dict(m).get("both_orders"), _dict(m).get("by_subset")]
                             for n, v in mc.items() for s, m in v.items()]))
    truth = {n: _dict(v) for n, v in _dict(r.get("truthfulness")).items()}
    if truth:
        groups = {n: {"plain": v.get("plain"), "prompted": v.get("prompted")} for n, v in truth.items()}
        items.append(bars(groups, "Truthfulness", "accuracy",
                          "Truthfulness accuracy of each model, plain and prompted with the HHH context."))
        tables.append(table(["model", "plain", "prompted", "n", "file"],
                            [[n, v.get("plain"), v.get("prompted"), v.get("n"), v.get("file")] for n, v in truth.items()]))
    inj = _dict(r.get("injection"))
    user = {n: _dict(v) for n, v in _dict(inj.get("user_content")).items()}
    if user:
        items.append(bars({n: {"followed": v.get("followed_rate")} for n, v in user.items()}, "Injected instructions followed", "rate",
                          "Share of responses that follow an instruction injected into user-supplied content (lower is better)."))
    labeler = {n: _dict(v) for n, v in _dict(inj.get("labeler")).items()}
    if labeler:
        items.append(bars({f"{n} labeler": {"flip rate": v.get("flip_rate")} for n, v in labeler.items()}, "Labeler flips under injection",
                          "flip rate", "Share of preference labels flipped by an injection in a response, plain vs hardened labeler "
                          "prompt (lower is better)."))
    if user or labeler:
        tables.append(table(["target", "rate", "n"], [[f"{n}: followed injected instruction", v.get("followed_rate"), v.get("n")] for n, v in user.items()]
                            + [[f"{n} labeler: flipped label", v.get("flip_rate"), v.get("n")] for n, v in labeler.items()]))
    if not tables:
        raise Missing("not measured: eval/results.json has no refusal, mc, truthfulness or injection results")
    absent = [k for k, v in (("refusal", refusal), ("mc", mc), ("truthfulness", truth), ("injection", user or labeler)) if not v]
    return figs(*items) + "".join(tables) + (note("not measured: " + ", ".join(absent)) if absent else "")


def _steps(records: Any, key: str, std: str | None = None) -> tuple[list, list, list | None]:
    """(steps, values of `key`, values of `std` or 0) over the records that have a number for `key`;
    the record's position stands in for a missing step; the third item is None without `std`."""
    rows = [e for e in _list(records) if isinstance(e, dict)]
    pts = [(e["step"] if num(e.get("step")) else i + 1, e[key], e.get(std) if num(e.get(std)) else 0.0)
           for i, e in enumerate(rows) if num(e.get(key))]
    return [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts] if std else None


def sft(f: RunFiles) -> str:
    loss = f.json("sft/loss.json")
    xs, ys, _ = _steps(loss, "loss")
    if not xs:
        raise Missing("not run: cai sft")
    s = f.summary("sft")
    data = (f" on {fmt(s['revision_examples'])} revisions and {fmt(s['helpful_examples'])} helpful samples"
            if num(s.get("revision_examples")) and num(s.get("helpful_examples")) else "")
    caption = f"Training loss per step of the SL-CAI fine-tune{data} (completion tokens only)."
    return figs(figure(plots.curves([("SFT loss", xs, ys, None)]), caption))


def _bins(bins: Any, conf: str, acc: str) -> list[tuple[float, float, int]]:
    return [(b.get(conf), b.get(acc), b.get("count") if num(b.get("count")) else 0) for b in _list(bins) if isinstance(b, dict)]


def preference_model(f: RunFiles) -> str:
    loss, metrics = f.json("train-pm/loss.json"), f.json("train-pm/metrics.json")
    if loss is None and metrics is None:
        raise Missing("not run: cai train-pm")
    items, parts = [], []
    xs, ys, _ = _steps(loss, "loss")
    if xs:
        items.append(figure(plots.curves([("preference-model loss", xs, ys, None)]),
                            "Soft-label preference-model loss per step: −[p·log σ(r_c − r_r) + (1 − p)·log σ(r_r − r_c)]."))
    else:
        parts.append(note("no training loss: train-pm/loss.json is missing or has no loss entries"))
    m = _dict(metrics)
    held, untrained = _dict(m.get("heldout")), _dict(m.get("untrained"))
    u_held = _dict(untrained.get("heldout"))
    series = {k: v for k, v in (("trained", _bins(held.get("bins"), "confidence", "agreement")),
                                ("untrained head", _bins(u_held.get("bins"), "confidence", "agreement"))) if v}
    if series:
        items.append(figure(plots.reliability(series, "PM calibration on held-out comparisons", "PM probability of its preferred response"),
                            f"Reliability diagram on {fmt(held.get('count'))} held-out comparisons: how often the PM's preferred response "
                            "is the labeler's, against the PM's confidence; area ∝ count, the diagonal is perfect calibration "
                            "(Bai et al. 2022, Figure 10)."))
    mc, u_mc = _dict(m.get("mc")), _dict(untrained.get("mc"))
    groups = {"held-out": {"trained": held.get("accuracy"), "untrained head": u_held.get("accuracy")},
              "MC (all)": {"trained": mc.get("accuracy"), "untrained head": u_mc.get("accuracy")}}
    by, u_by = _dict(mc.get("accuracy_by_subset")), _dict(u_mc.get("accuracy_by_subset"))
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


def labeler(f: RunFiles) -> str:
    d = f.json("label/diagnostics.json")
    if d is None:
        raise Missing("not run: cai label")
    d = _dict(d)
    body = f'<p class="verdict"><strong>Verdict:</strong> {esc(d["verdict"])}</p>' if d.get("verdict") else ""
    items = []
    hist = _dict(d.get("p_chosen_histogram"))
    if hist:
        items.append(figure(plots.histogram(hist, "Labeler confidence", "p_chosen (probability of the chosen response)", "comparisons"),
                            "Histogram of the soft labels p_chosen: clamping puts every label in its clamp range, and a labeler "
                            "without signal puts them all near 0.5."))
    mc = _dict(d.get("mc"))
    bins = _bins(mc.get("calibration_bins"), "mean_p", "accuracy")
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


RL_PANELS = [("rl/reward", "reward (as trained on)", "rl/reward_std"), ("rl/score", "PM score", "rl/score_std"),
             ("rl/kl", "KL to reference (nats/token)", None), ("rl/length", "response length (tokens)", None),
             ("rl/entropy", "entropy (nats/token)", None)]


def rl(f: RunFiles) -> str:
    records, ev = f.jsonl("rl/metrics.jsonl"), f.json("rl/eval.json")
    if not records and ev is None:
        raise Missing("not run: cai rl" if records is None else "not run yet: rl/metrics.jsonl has no steps")
    records = [r for r in records or [] if isinstance(r, dict)]
    parts, items = [], []
    status = _dict(_dict(f.manifest.get("stages")).get("rl")).get("status")
    head = note(f"stage status: {status}; the curves end at the last logged step") if status and status != "done" else ""
    panels = []
    for key, title, std in RL_PANELS:
        xs, ys, band = _steps(records, key, std)
        if xs:
            panels.append((title, xs, ys, band))
    if panels:
        items.append(figure(plots.curves(panels), f"Per-step RL metrics over {len(records)} steps (bands: ± one standard "
                                                  "deviation across the batch); Bai et al. 2022, Figure 4 plots PM score against RL training."))
    head += "".join(f'<p class="warn">warning: {esc(w)}</p>' for w in _list(f.summary("rl").get("warnings")))
    versus_sl_cai(_dict(ev), "rl_cai", parts, items)
    return head + figs(*items) + "".join(parts)


def versus_sl_cai(ev: dict, name: str, parts: list[str], items: list[str]) -> None:
    """Append the held-out comparison of a trained policy with SL-CAI (`rl.evaluate`'s eval.json, the
    policy's keys named by `name`: rl_cai, dpo) to `parts` (tables) and `items` (figures)."""
    title = name.replace("_", "-").upper()
    if isinstance(ev.get("all"), dict):
        cols = {"all": ev["all"], **{k: _dict(v) for k, v in _dict(ev.get("by_set")).items()}}
        keys = list(dict.fromkeys(k for c in cols.values() for k in c))
        parts.append(f"<h3>{esc(title)} vs SL-CAI on held-out prompts</h3>"
                     + table(["measure", *cols], [[k, *[c.get(k) for c in cols.values()]] for k in keys]))
        wins = {n: {f"{title} win rate": (c.get(f"win_rate_{name}"), c.get("win_rate_ci95"))} for n, c in cols.items()}
        items.append(bars(wins, f"{title} vs SL-CAI", f"win rate of {title}",
                          f"Win rate of {title} over SL-CAI judged by {ev.get('feedback_model', 'the feedback model')} in both orders "
                          "(a tie counts half), 95% Wilson intervals, per prompt set.", chance=0.5))
        rest = scalars({k: v for k, v in ev.items() if k not in ("all", "by_set")})
        if rest:
            parts.append(table(["setting", "value"], [list(r) for r in rest], "kv"))
    elif ev:
        parts.append("<h3>Evaluation</h3>" + table(["measure", "value"], [list(r) for r in scalars(ev)], "kv"))


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
        xs, ys, _ = _steps(records, key)
        if xs:
            panels.append((title, xs, ys, None))
    if panels:
        items.append(figure(plots.curves(panels), f"Per-step DPO metrics over {len(_list(records))} steps ({fmt(s.get('data'))}, "
                                                  f"{fmt(s.get('loss'))} loss, β = {fmt(s.get('beta'))}); Δ is the policy-vs-reference "
                                                  "log-ratio margin of chosen over rejected."))
    held = _dict(held)
    blocks = {"all": _dict(held.get("all")), **{k: _dict(v) for k, v in _dict(held.get("by_source")).items()}}
    if blocks["all"]:
        acc = {n: {"before": _dict(b.get("before")).get("accuracy"), "after": _dict(b.get("after")).get("accuracy"),
                   "implicit reward": _dict(b.get("reward")).get("accuracy")} for n, b in blocks.items()}
        items.append(bars(acc, "Held-out preference accuracy", "accuracy",
                          "Share of held-out comparisons where log π(chosen) > log π(rejected) under the starting policy (before) "
                          "and the trained one (after), and where the implicit reward β·log πθ/πref ranks chosen first.", chance=0.5))
        rows = [[f"{n}: {k}", b.get("count"), _dict(b.get(k)).get("accuracy"), _dict(b.get(k)).get("margin")]
                for n, b in blocks.items() for k in ("before", "after", "reward")]
        parts.append("<h3>Held-out comparisons</h3>" + table(["ranking", "n", "accuracy", "margin (nats)"], rows))
    elif held:
        parts.append(note(str(held.get("note", "no held-out comparisons"))))
    versus_sl_cai(_dict(ev), "dpo", parts, items)
    return figs(*items) + "".join(parts)


def distill(f: RunFiles) -> str:
    ev = f.json("distill/eval.json")
    if ev is None:
        raise Missing("not run: cai distill")
    ev = _dict(ev)
    gap = f" ({fmt(ev['gap_closed'])} of the gap closed)" if num(ev.get("gap_closed")) else ""
    mc = ev.get("mc") if isinstance(ev.get("mc"), dict) else _dict(ev.get("mc_accuracy"))  # {plain, prompted, distilled}
    items = [bars({"before training": {"KL": ev.get("kl_before")}, "after training": {"KL": ev.get("kl_after")}},
                  "KL to the prompted model", "nats per token", ylim=None,
                  caption=f"Per-token KL(p(·|C, x) ‖ p(·|x)) on held-out prompts before and after distillation{gap}."),
             bars({k: {"accuracy": v} for k, v in mc.items()}, "Multiple choice: plain, prompted, distilled", "accuracy",
                  "Multiple-choice accuracy without the context, with it, and after distilling it into the weights "
                  "(Askell et al. 2021, Figure 2).")]
    rows = [[k, v] for k, v in ev.items() if v is None or isinstance(v, (str, int, float, bool))]
    return figs(*items) + table(["measure", "value"], rows, "kv")


def chains(f: RunFiles, count: int) -> str:
    if count <= 0:
        raise Missing("not shown: report.chains is 0")
    records = [r for r in f.jsonl("revise/revisions.jsonl") or [] if isinstance(r, dict)]
    if not records:
        raise Missing("not run: cai revise")
    picked = sorted(records, key=lambda r: not r.get("usable", True))[:count]  # usable chains first, file order kept
    out = [note(f"{len(picked)} of {len(records)} chains from revise/revisions.jsonl, usable ones first.")]
    for r in picked:
        head = f"{r.get('id', '')}" + (f" · {r['category']}" if r.get("category") else "") + ("" if r.get("usable", True) else " · not usable")
        rounds = ""
        for k, rd in enumerate(_list(r.get("rounds")), 1):
            rd = _dict(rd)
            status = rd.get("status") or "ok"
            rounds += (f'<div class="round"><div class="round-head">Round {k} · principle <code>{esc(rd.get("principle_id", "?"))}</code>'
                       f' · <span class="status {"ok" if status == "ok" else "bad"}">{esc(status)}</span></div>'
                       + text_block("critique request", rd.get("critique_request"), "request") + text_block("critique", rd.get("critique"))
                       + text_block("revision request", rd.get("revision_request"), "request") + text_block("revision", rd.get("revision"))
                       + "</div>")
        out.append(f'<article class="chain"><h3>{esc(head)}</h3>' + text_block("prompt", r.get("prompt"))
                   + text_block("initial response", r.get("initial_response")) + rounds
                   + text_block("final response", r.get("final_response"), "text final") + "</article>")
    return "".join(out)


# ------------------------------------------------------------------------------------------- page
CSS = """
body{margin:0;background:#f4f5f7;color:#1f2328;font:14px/1.45 -apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif}
main,header{max-width:1220px;margin:0 auto;padding:0 20px}
header{padding-top:24px}h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:0 0 12px}h3{font-size:15px;margin:18px 0 8px}
.sub{color:#57606a;margin:0 0 12px}nav{display:flex;flex-wrap:wrap;gap:6px 14px;margin-bottom:16px}
nav a{color:#0b57a4;text-decoration:none}nav a.missing{color:#8c959f}
section{background:#fff;border:1px solid #d8dee4;border-radius:6px;padding:16px 20px;margin:0 0 16px}
section.missing{padding:10px 20px}section.missing h2{display:inline;font-size:15px;margin-right:10px}section.missing .note{display:inline}
.figs{display:flex;flex-wrap:wrap;gap:16px;margin:4px 0 8px}figure{margin:0;max-width:100%}
figure img{display:block;max-width:100%;height:auto;border:1px solid #eaeef2}
figcaption{font-size:12px;color:#57606a;margin-top:4px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}th,td{border-bottom:1px solid #eaeef2;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600}table.kv thead{display:none}table.kv td:first-child{color:#57606a}
.note{color:#57606a;font-style:italic;margin:6px 0}.warn{color:#9a3412;margin:6px 0}
.verdict{background:#fff4d6;border:1px solid #e3b341;border-radius:6px;padding:10px 14px;font-size:15px}
ul.notes{color:#7d4e00}details{margin:8px 0}pre{background:#f6f8fa;padding:10px;overflow:auto;font-size:12px;max-height:420px}
.chain{border-left:3px solid #3b6ea5;padding:2px 0 2px 14px;margin:14px 0}.chain h3{margin-top:0}
.block{margin:6px 0}.label{font-size:11px;text-transform:uppercase;letter-spacing:.04em;color:#57606a}
.text{white-space:pre-wrap;background:#f6f8fa;border-radius:4px;padding:6px 10px}.text.final{background:#eaf5ec}
.request{white-space:pre-wrap;color:#57606a;font-size:12px}
.round{border-top:1px dashed #d8dee4;margin-top:8px;padding-top:6px}.round-head{font-weight:600}
.status.ok{color:#1a7f37}.status.bad{color:#b35900}code{font-size:12px}
#image-error{display:none;background:#ffebe9;border:1px solid #cf222e;padding:8px 12px;margin:8px 0}
"""

# Sets <body data-images-ok="yes|no"> once the page has loaded, for the browser test and for readers.
IMAGE_CHECK = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var ok = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.imagesLoaded = String(ok);
  document.body.dataset.imagesOk = ok === images.length ? "yes" : "no";
  if (ok !== images.length) { document.getElementById("image-error").style.display = "block"; }
});
"""


SECTIONS: list[tuple[str, str, Callable[..., str]]] = [
    ("overview", "Run overview", overview),
    ("elo", "Harmlessness vs helpfulness (Elo)", elo),
    ("revision-rounds", "PM score over revision rounds", revision_rounds),
    ("behaviour", "Refusals, multiple choice, truthfulness, prompt injection", behaviour),
    ("sft", "Supervised stage (SL-CAI) training", sft),
    ("preference-model", "Preference model", preference_model),
    ("labeler", "AI-feedback labeler", labeler),
    ("rl", "RL-CAI training", rl),
    ("dpo", "DPO (preference optimisation without RL)", dpo),
    ("distill", "Context distillation", distill),
    ("chains", "Sample critique → revision chains", chains),
]


def build_report(run_path: Path, manifest: dict, title: str, chain_count: int) -> tuple[str, list[Section]]:
    """The report page of the run directory at `run_path` and its sections (shown or missing)."""
    files = RunFiles(run_path, manifest)
    sections = []
    for key, heading, make in SECTIONS:
        try:
            sections.append(Section(key, heading, body=make(files, chain_count) if make is chains else make(files)))
        except Missing as e:
            sections.append(Section(key, heading, missing=str(e)))
    nav = "".join(f'<a href="#{s.key}" class="{"missing" if s.missing else ""}">{esc(s.title)}</a>' for s in sections)
    body = "".join(
        f'<section id="{s.key}" class="missing" data-section="{s.key}"><h2>{esc(s.title)}</h2>{note(s.missing)}</section>' if s.missing
        else f'<section id="{s.key}" class="shown" data-section="{s.key}"><h2>{esc(s.title)}</h2>{s.body}</section>'
        for s in sections)
    version = _dict(manifest.get("versions")).get("constitutional")
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head>\n<body>\n<header><h1>{esc(title)}</h1>"
            f'<p class="sub">{esc(run_path)} · generated {esc(now())} by cai report'
            f'{" (constitutional " + esc(version) + ")" if version else ""}</p><nav>{nav}</nav>'
            '<div id="image-error">Some figures failed to load.</div></header>\n'
            f"<main>{body}</main>\n<script>{IMAGE_CHECK}</script>\n</body></html>\n")
    return page, sections
