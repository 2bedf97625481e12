"""Refusals: how often a model refuses harmful prompts, and benign prompts that only look harmful
(a model that is harmless but not evasive refuses the first and answers the second).

The share of answers to the held-out red-team prompts that refuse, and of answers to
benign prompts that only look harmful (`benign_prompts`, all of them, up to `limit`), by the
pattern classifier in `constitutional/refusal.py` (its rule and known misses are stated there), with Wilson intervals.
Every model after the first also gets its change against the first (the starting model by
default), paired on the same prompts (`eval_math.paired_change`: difference, Newcombe interval,
exact McNemar test).
"""

from __future__ import annotations

from ... import eval_math
from ...refusal import is_refusal


def refusal_rates(answers: dict, sets: dict) -> dict:
    out = {}
    for kind, key in (("harmful", "harmful"), ("benign", "benign")):
        responses = [answers[j["id"]]["response"] for j in sets[kind]]
        k = sum(is_refusal(r) for r in responses)
        out[f"{key}_refusal_rate"] = k / len(responses) if responses else None
        out[f"{key}_ci"] = list(eval_math.wilson(k, len(responses)))
        out[f"n_{key}"] = len(responses)
    return out


def refusal_changes(answers: dict[str, dict], sets: dict, names: list[str]) -> dict[str, dict]:
    """name -> {harmful, benign: paired_change against names[0]}, for every name after the first."""
    def refused(n: str, kind: str) -> list[bool]:
        return [is_refusal(answers[n][j["id"]]["response"]) for j in sets[kind]]

    return {n: {kind: eval_math.paired_change(refused(names[0], kind), refused(n, kind)) for kind in ("harmful", "benign")} for n in names[1:]}
