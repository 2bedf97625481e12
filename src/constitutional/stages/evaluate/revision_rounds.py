"""The PM score of the revisions by critique/revision round (the paper's Figure 5).

With a PM and `<run>/revise/revisions.jsonl`, the PM score of the initial
response (round 0) and of the response after each critique/revision round (a dropped round keeps
the previous response), over the first `limit` revise records (Figure 5's shape).
"""

from __future__ import annotations

from ...run import RunDir, read_jsonl
from .config import Config
from .pm import mean_ci


def revision_items(run_dir: RunDir, limit: int) -> list[dict]:
    """PM scoring items for revision_rounds: the response after round k of each revise record (k = 0:
    the initial response; a dropped round keeps the previous response)."""
    records = read_jsonl(run_dir.path / "revise" / "revisions.jsonl")
    records = records[:limit] if limit else records
    rounds = max((len(r["rounds"]) for r in records), default=0)
    out = []
    for r in records:
        response = r["initial_response"]
        for k in range(rounds + 1):
            if 0 < k <= len(r["rounds"]) and r["rounds"][k - 1]["status"] == "ok":
                response = r["rounds"][k - 1]["revision"]
            out.append({"id": f"revise:{r['id']}:{k}", "round": k, "messages": r["messages"], "response": response})
    return out


def rounds(items: list[dict], scores: dict, cfg: Config) -> dict:
    by_round: dict[int, list[float]] = {}
    for it in items:
        by_round.setdefault(it["round"], []).append(scores[it["id"]])
    stats = [mean_ci(by_round[k], cfg) for k in sorted(by_round)]
    return {"rounds": sorted(by_round), "mean_pm": [s["mean"] for s in stats], "ci": [s["ci"] for s in stats], "n": stats[0]["n"]}
