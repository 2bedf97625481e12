"""Multiple-choice accuracy: log p(option) after the prompt, as the baseline stage scores it.

Accuracy on multiple-choice files (`mc`), scored by log p(option) after the prompt as the
baseline stage does. Items that carry question/correct_response/incorrect_response and list them
as "(A) ...\\n(B) ..." in their prompt are also scored with the two swapped, and the probability of
the correct option is averaged over both orders (cancelling a preference for a position; credit
1 above 0.5, 0 below, 0.5 for an exact tie); other items (e.g. BIG-bench tasks) are scored as
given (credit: the share of correct options among the top-scoring ones). `both_orders` says
whether every item of a file was scored both ways.
"""

from __future__ import annotations

import math

from ...data.loaders import MCItem
from ...feedback import winner


def mc_views(item: MCItem) -> list[tuple[str, list[int]]]:
    """(prompt, indices of the correct options) for each order scored: the item as given and, when
    its prompt lists its two responses as "(A) ...\\n(B) ..." (meta question/correct_response/
    incorrect_response), the same prompt with the two swapped."""
    views = [(item.prompt, list(item.correct))]
    m = item.meta
    letters = [o.strip() for o in item.options]
    if not all(isinstance(m.get(k), str) for k in ("question", "correct_response", "incorrect_response")):
        return views
    if sorted(letters) != ["(A)", "(B)"] or len(item.correct) != 1:
        return views
    right = letters[item.correct[0]]
    a, b = (m["correct_response"], m["incorrect_response"]) if right == "(A)" else (m["incorrect_response"], m["correct_response"])
    needle = f"(A) {a}\n(B) {b}"
    if item.prompt.count(needle) != 1:
        return views
    views.append((item.prompt.replace(needle, f"(A) {b}\n(B) {a}"), [k for k, x in enumerate(letters) if x != right]))
    return views


def _softmax(lp: list[float]) -> list[float]:
    z = max(lp)
    e = [math.exp(x - z) for x in lp]
    return [x / sum(e) for x in e]


def mc_credit(probs_by_view: list[list[float]], correct_by_view: list[list[int]]) -> tuple[float, float]:
    """(P(correct) averaged over the views, credit). Two options: credit 1 when P > 0.5, 0 when
    P < 0.5, 0.5 for a tie; more options (one view): the share of correct options among the top ones."""
    p = sum(sum(pr[k] for k in c) for pr, c in zip(probs_by_view, correct_by_view)) / len(probs_by_view)
    if len(probs_by_view[0]) == 2:
        w = winner(p)
        return p, 0.5 if w is None else float(w == 0)
    probs, correct = probs_by_view[0], correct_by_view[0]
    top = [k for k, x in enumerate(probs) if x >= max(probs) - 1e-12]
    return p, sum(k in correct for k in top) / len(top)


def score_mc(backend, items: list[MCItem], prefix: str, kind: str, spec: str) -> list[dict]:
    """One choices record per item (all views of all items in one `option_logprobs` call)."""
    views = [(it, mc_views(it)) for it in items]
    flat = [(prefix + prompt, it.options) for it, vs in views for prompt, _ in vs]
    scores = iter(backend.option_logprobs([p for p, _ in flat], [o for _, o in flat]))
    out = []
    for it, vs in views:
        probs = [_softmax(list(next(scores))) for _ in vs]
        p, credit = mc_credit(probs, [c for _, c in vs])
        out.append({"id": f"{kind}|{spec}|{it.id}", "kind": kind, "spec": spec, "item_id": it.id, "subset": it.subset,
                    "both_orders": len(vs) == 2, "p_correct": p, "credit": credit})
    return out


def accuracy(records: list[dict]) -> float | None:
    return sum(r["credit"] for r in records) / len(records) if records else None


def mc_entry(records: list[dict]) -> dict:
    by_subset: dict[str, list[dict]] = {}
    for r in records:
        by_subset.setdefault(r["subset"] or "all", []).append(r)
    return {"accuracy": accuracy(records), "by_subset": {s: accuracy(v) for s, v in sorted(by_subset.items())},
            "n": len(records), "both_orders": bool(records) and all(r["both_orders"] for r in records)}


def judge_accuracy(models: dict[str, str], feedback_model: str, mc: dict) -> dict | None:
    """What the judge of the Elo comparisons is worth: its multiple-choice accuracy on the first mc
    file (labelled comparisons, both orders) when the judge is one of the evaluated models (the
    default feedback model `embedded` is the base model), with a Wilson interval; `at_chance` when
    the interval holds 0.5. None when the judge was not evaluated."""
    from ... import eval_math

    for n, model in models.items():
        if model == feedback_model and mc.get(n):
            spec, entry = next(iter(mc[n].items()))
            if entry["accuracy"] is None:
                return None
            k, total = round(entry["accuracy"] * entry["n"]), entry["n"]
            lo, hi = eval_math.wilson(k, total)
            return {"model": feedback_model, "as": n, "spec": spec, "accuracy": entry["accuracy"], "ci": [lo, hi], "n": total,
                    "at_chance": lo <= 0.5 <= hi}
    return None
