"""Refusals: how often a model refuses harmful prompts, and benign prompts that only look harmful
(a model that is harmless but not evasive refuses the first and answers the second).

The share of answers to the held-out red-team prompts that refuse, and of answers to
benign prompts that only look harmful (`benign_prompts`, all of them, up to `refusal_limit`; the harmful ones likewise), by the
pattern classifier in `constitutional/refusal.py` (its rule and known misses are stated there), with Wilson intervals.
Every model after the first also gets its change against the first (the starting model by
default), paired on the same prompts (`eval_math.paired_change`: difference, Newcombe interval,
exact McNemar test).

Beside the refusal rates, the share of answers that take up the request at all
(`harmful_engaged_rate`, `benign_engaged_rate`: `constitutional.engagement.engages`, a lexical check
validated on hand labels), with Wilson intervals and paired changes (`change.harmful_engaged`,
`change.benign_engaged`): a model that stops helping by deflecting instead of refusing shows there.
And each model's most common openings (`openings`: its answers' first three words
over the same harmful and benign prompts, `constitutional.refusal.top_openings`), and for every model
after the first the paired change in how often its top opening starts an answer (`change.opening`):
a model that learnt a stock deflection ("i'm here to ...") shows it there though the classifier,
which reads only refusal phrases, counts those answers as compliance.
"""

from __future__ import annotations

from ... import eval_math
from ...engagement import engages
from ...refusal import is_refusal, opening_words, top_openings


def refusal_jobs(sets: dict, kind: str) -> list[dict]:
    """The prompts of set `kind` the refusal rates use, in order (harmful: the compared prompts,
    then those only the rates use, `refusal_limit`)."""
    return sets[kind] + (sets.get("harmful_more", []) if kind == "harmful" else [])


def refused(answers: dict, sets: dict, kind: str) -> list[bool]:
    """The classifier's verdict on each answer of `refusal_jobs(sets, kind)`."""
    return [is_refusal(answers[j["id"]]["response"]) for j in refusal_jobs(sets, kind)]


def engaged(answers: dict, sets: dict, kind: str) -> list[bool]:
    """`engagement.engages` on each answer of `refusal_jobs(sets, kind)`: does it take up the request?"""
    return [engages(j["prompt"], answers[j["id"]]["response"]) for j in refusal_jobs(sets, kind)]


def _responses(answers: dict, sets: dict) -> list[str]:
    """The answers the rates read: harmful, then benign prompts."""
    return [answers[j["id"]]["response"] for kind in ("harmful", "benign") for j in refusal_jobs(sets, kind)]


def _share(flags: list[bool]) -> tuple[float | None, list[float]]:
    """The share of True in `flags` (None when empty) and its Wilson interval."""
    return (sum(flags) / len(flags) if flags else None), list(eval_math.wilson(sum(flags), len(flags)))


def refusal_rates(answers: dict, sets: dict) -> dict:
    out = {}
    for key in ("harmful", "benign"):
        verdicts = refused(answers, sets, key)
        out[f"{key}_refusal_rate"], out[f"{key}_ci"] = _share(verdicts)
        out[f"n_{key}"] = len(verdicts)
        out[f"{key}_engaged_rate"], out[f"{key}_engaged_ci"] = _share(engaged(answers, sets, key))
    out["openings"] = top_openings(_responses(answers, sets))
    return out


def opening_change(before: list[str], after: list[str]) -> dict | None:
    """How often the most common opening of `after` starts an answer, against `before` on the same
    prompts: {"opening", **paired_change}; None when `after` has no non-empty answer."""
    top = top_openings(after, k=1)
    if not top:
        return None
    text = top[0]["opening"]
    return {"opening": text, **eval_math.paired_change([opening_words(r) == text for r in before], [opening_words(r) == text for r in after])}


def refusal_changes(answers: dict[str, dict], sets: dict, names: list[str]) -> dict[str, dict]:
    """name -> {harmful, benign: paired_change of the refusal verdicts against names[0]; harmful_engaged,
    benign_engaged: the same for `engaged`; opening: `opening_change`}, for every name after the first."""
    base = {kind: refused(answers[names[0]], sets, kind) for kind in ("harmful", "benign")}
    took = {kind: engaged(answers[names[0]], sets, kind) for kind in base}
    first = _responses(answers[names[0]], sets)
    return {n: {**{kind: eval_math.paired_change(base[kind], refused(answers[n], sets, kind)) for kind in base},
                **{f"{kind}_engaged": eval_math.paired_change(took[kind], engaged(answers[n], sets, kind)) for kind in base},
                "opening": opening_change(first, _responses(answers[n], sets))} for n in names[1:]}
