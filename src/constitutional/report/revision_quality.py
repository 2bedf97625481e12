"""The report's revision-quality section: what the SL-CAI training targets do, overall and by
principle (`revision_quality.py`'s figures; from revise's summary, or recomputed from
`revise/revisions.jsonl` when the summary predates them)."""

from __future__ import annotations

from .. import revision_quality as rq
from .common import Missing, RunFiles, as_dict, note, pct, table

LABELS = {"addresses_human": "address the human", "declines": "decline", "redirects": "redirect", "copies_fewshot": "copy few-shot text",
          "copies_critique": "copy the critique", "changed": "changed", "engages": "take up the request"}


def revision_quality(f: RunFiles) -> str:
    q = as_dict(f.summary("revise").get("quality"))
    if not q:
        records = [r for r in f.jsonl("revise/revisions.jsonl") or [] if isinstance(r, dict) and "rounds" in r]
        if not records:
            raise Missing("not run: cai revise")
        q = rq.summarise(records)  # without the few-shot texts: copies_fewshot is not known
        q["overall"]["copies_fewshot"] = None
        for v in q["by_principle"].values():
            v["copies_fewshot"] = None
    if not q.get("usable"):
        return note(f"None of the {q.get('records', 0)} chains has a usable revision.")
    figures = list(LABELS)
    rows = [["all", q["usable"]] + [pct(as_dict(q["overall"]).get(k)) for k in figures]]
    rows += [[pid, v.get("n")] + [pct(v.get(k)) for k in figures] for pid, v in as_dict(q.get("by_principle")).items()]
    lead = (f"{q['usable']} of {q['records']} chains have a usable final revision; the model's own first answers decline "
            f"{pct(q.get('initial_declines'))} of the time and take up the request {pct(q.get('initial_engages'))} of the time. Shares of the usable revisions, by the principle of the last accepted round "
            "(rules in constitutional/revision_quality.py; the decline figure is the refusal classifier's, which misses about half "
            "of all refusals on its labelled set).")
    return note(lead) + table(["principle", "n"] + [LABELS[k] for k in figures], rows)
