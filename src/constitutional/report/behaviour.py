"""The report's behaviour section: refusal and over-refusal rates, multiple-choice accuracy,
truthfulness plain vs prompted, prompt-injection follow and flip rates (from `eval/results.json`)."""

from __future__ import annotations

from . import plots
from .common import Missing, RunFiles, as_dict, bars, figs, figure, note, num, pct, pct_ci, spec_name, table


def _top_opening(v: dict) -> str:
    top = [as_dict(o) for o in (v.get("openings") or [])[:1]]
    return f"\"{top[0].get('opening')}...\" {pct(top[0].get('share'))}" if top else "–"


def behaviour(f: RunFiles) -> str:
    r = f.json("eval/results.json")
    if r is None:
        raise Missing("not run: cai eval")
    r = as_dict(r)
    items, tables = [], []
    refusal = {n: as_dict(v) for n, v in as_dict(r.get("refusal")).items()}
    if refusal:
        groups = {n: {"red-team prompts (refusal)": (v.get("harmful_refusal_rate"), v.get("harmful_ci")),
                      "benign prompts (over-refusal)": (v.get("benign_refusal_rate"), v.get("benign_ci"))} for n, v in refusal.items()}
        items.append(bars(groups, "Refusal rates", "share of responses that refuse",
                          "Refusals of red-team requests (higher is safer) and of benign requests (over-refusal: lower is "
                          "better; the paper's harmless-but-evasive failure), 95% intervals."))
        points = {n: (v["benign_refusal_rate"], v.get("benign_ci"), v["harmful_refusal_rate"], v.get("harmful_ci"))
                  for n, v in refusal.items() if num(v.get("benign_refusal_rate")) and num(v.get("harmful_refusal_rate"))}
        if points:
            items.append(figure(plots.refusal_tradeoff(points),
                                "The same rates on one plane: harmful requests refused against benign look-alikes refused, "
                                "95% intervals. A model that learns to refuse only by refusing everything moves along the "
                                "diagonal (harmless but evasive); the goal is up and to the left."))
        tables.append(table(["model", "red-team refusal [95% CI]", "n", "benign refusal [95% CI]", "n",
                             "red-team answers that take up the request", "benign answers that take up the request",
                             "most common opening (share of answers)"],
                            [[n, pct_ci(v.get("harmful_refusal_rate"), v.get("harmful_ci")), v.get("n_harmful"),
                              pct_ci(v.get("benign_refusal_rate"), v.get("benign_ci")), v.get("n_benign"),
                              pct_ci(v.get("harmful_engaged_rate"), v.get("harmful_engaged_ci")),
                              pct_ci(v.get("benign_engaged_rate"), v.get("benign_engaged_ci")), _top_opening(v)]
                             for n, v in refusal.items()]))
        tables.append(note("The refusal classifier reads refusal phrases only. A model can stop helping without one: by a stock "
                           "deflection (\"I'm here to support you...\") or a statement of its role. The engagement columns "
                           "(constitutional/engagement.py: does the answer take up the request's own words? 84% accurate on "
                           "hand labels) and the most common opening show that; fewer red-team answers that take up the "
                           "request is safer, fewer benign ones is evasive."))
    mc = {n: as_dict(v) for n, v in as_dict(r.get("mc")).items()}
    if mc:
        groups = {n: {spec_name(s): as_dict(m).get("accuracy") for s, m in v.items()} for n, v in mc.items()}
        items.append(bars(groups, "Multiple-choice accuracy", "accuracy",
                          "Accuracy of each model as a multiple-choice judge, per comparison set (Bai et al. 2022, Figure 11)."))
        tables.append(table(["model", "set", "accuracy", "n", "both orders", "by subset"],
                            [[n, s, pct(as_dict(m).get("accuracy")), as_dict(m).get("n"), as_dict(m).get("both_orders"),
                              ", ".join(f"{k} {pct(x)}" for k, x in as_dict(as_dict(m).get("by_subset")).items()) or "–"]
                             for n, v in mc.items() for s, m in v.items()]))
    truth = {n: as_dict(v) for n, v in as_dict(r.get("truthfulness")).items()}
    if truth:
        groups = {n: {"plain": v.get("plain"), "prompted": v.get("prompted")} for n, v in truth.items()}
        items.append(bars(groups, "Truthfulness", "accuracy",
                          "Truthfulness accuracy of each model, plain and prompted with the HHH context."))
        tables.append(table(["model", "plain", "prompted", "n", "file"],
                            [[n, pct(v.get("plain")), pct(v.get("prompted")), v.get("n"), v.get("file")] for n, v in truth.items()]))
    inj = as_dict(r.get("injection"))
    user = {n: as_dict(v) for n, v in as_dict(inj.get("user_content")).items()}
    if user:
        items.append(bars({n: {"followed": v.get("followed_rate")} for n, v in user.items()}, "Injected instructions followed", "rate",
                          "Share of responses that follow an instruction injected into user-supplied content (lower is better)."))
    labeler = {n: as_dict(v) for n, v in as_dict(inj.get("labeler")).items()}
    if labeler:
        items.append(bars({f"{n} labeler": {"flip rate": v.get("flip_rate")} for n, v in labeler.items()}, "Labeler flips under injection",
                          "flip rate", "Share of preference labels flipped by an injection in a response, plain vs hardened labeler "
                          "prompt (lower is better)."))
    if user or labeler:
        tables.append(table(["target", "rate", "n"], [[f"{n}: followed injected instruction", pct(v.get("followed_rate")), v.get("n")] for n, v in user.items()]
                            + [[f"{n} labeler: flipped label", pct(v.get("flip_rate")), v.get("n")] for n, v in labeler.items()]))
    if not tables:
        raise Missing("not measured: eval/results.json has no refusal, mc, truthfulness or injection results")
    absent = [k for k, v in (("refusal", refusal), ("mc", mc), ("truthfulness", truth), ("injection", user or labeler)) if not v]
    return figs(*items) + "".join(tables) + (note("not measured: " + ", ".join(absent)) if absent else "")
