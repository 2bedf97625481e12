"""Refusals: how often a model refuses harmful prompts, and benign prompts that only look harmful
(a model that is harmless but not evasive refuses the first and answers the second).

The share of answers to the held-out red-team prompts that refuse, and of answers to
benign prompts that only look harmful (`benign_prompts`, all of them, up to `limit`), by the
pattern classifier in `constitutional/refusal.py` (its rule and known misses are stated there), with Wilson intervals.
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
