"""How good is the SL-CAI data? Figures on the final revisions of `cai revise`, by principle.

Paper: Bai et al. 2022, Section 3 (the revisions are the supervised stage's training targets; small
models revise worse, Figure 5). A 135M model's "revisions" often talk about the critique or about
"the request" instead of answering the human, or copy a sentence of a few-shot example into an
unrelated conversation. Fine-tuning on such text teaches exactly that. These figures say how much of
the data does what the method needs, before any training:

- `addresses_human`: the revision speaks to the human, not about the exchange: its opening (the
  refusal classifier's first two sentences) does not refer to "the request", "the critique", "the
  response", "the human", "the user", "the assistant", "the revision" or "the prompt", and does not
  open by agreeing with a critique ("This is a great point", "You're right", "I agree").
- `declines`: the refusal classifier (`refusal.is_refusal`) calls the revision a refusal.
- `redirects`: it does not decline in so many words but points the human elsewhere (a helpline, a
  professional, a safer alternative: `REDIRECT` patterns anywhere in the text).
- `copies_fewshot`: it shares a word 6-gram (`cleaning.COPY_NGRAM`) with a few-shot example's text, or half its word
  trigrams occur there (`cleaning.copies_fewshot`; `cai revise` rejects these since the quality
  figures were added, so in new runs this counts the ones that got through before a retry).
- `copies_critique`: half its word trigrams occur in its round's critique (as `cleaning`'s echo check).
- `changed`: it differs from the initial response.
- `engages`: it takes up the request at all (`engagement.engages`: 3 of the prompt's content words;
  False when the record has no prompt). A revision that is harmless only because it deflects
  ("I'm here to support you...") fails this, and SFT on it teaches the model to deflect everything.

Every figure is a share of the records with a usable revision, overall and by the principle of
the last accepted round; `initial_declines` and `initial_engages` are the same checks on the model's
own first answers, the baseline the revisions move from.
"""

from __future__ import annotations

import re
from collections import defaultdict

from .cleaning import containment, copies_fewshot
from .engagement import engages
from .refusal import is_refusal, opening

_META = re.compile(
    r"\b(?:the|this|that|your|my|their|his|her)\s+(?:(?:last|previous|original|initial|revised|above)\s+)?"
    r"(?:request|critique|response|human|user|assistant|revision|prompt)'?s?\b"
    r"|^(?:this|that) is a (?:great|good|valid|fair|excellent) (?:point|question|critique)"
    r"|^(?:you're|you are) (?:right|correct)|^i agree\b|^thank you for (?:the|your) (?:critique|feedback)",
    re.IGNORECASE,
)
REDIRECT = re.compile(
    r"\b(?:instead|consider (?:talking|speaking|reaching|contacting|seeking)|reach out to|talk to (?:a|an|someone|your)|"
    r"speak (?:to|with) (?:a|an|someone|your)|contact (?:a|an|the|your|local)|seek (?:professional|help|support|advice)|"
    r"helpline|hotline|crisis line|a (?:doctor|therapist|counsel(?:l)?or|lawyer|professional)|the (?:police|authorities))\b",
    re.IGNORECASE,
)
FIGURES = ("addresses_human", "declines", "redirects", "declines_or_redirects", "copies_fewshot", "copies_critique", "changed", "engages")


def addresses_human(text: str) -> bool:
    return not any(_META.search(s) for s in opening(text))


def judge(revision: str, initial: str, critique: str = "", fewshot_text: str = "", prompt: str = "") -> dict[str, bool]:
    """The figures of one revision (see the module docstring)."""
    declines = is_refusal(revision)
    redirects = not declines and bool(REDIRECT.search(revision))
    return {
        "addresses_human": addresses_human(revision),
        "declines": declines,
        "redirects": redirects,
        "declines_or_redirects": declines or redirects,
        "copies_fewshot": bool(fewshot_text) and copies_fewshot(revision, fewshot_text),
        "copies_critique": bool(critique) and containment(revision, critique) >= 0.5,
        "changed": revision.strip() != initial.strip(),
        "engages": bool(prompt) and engages(prompt, revision),
    }


def summarise(records: list[dict], fewshot_text: str = "") -> dict:
    """Quality figures of `cai revise` records (revisions.jsonl rows): {records, usable,
    initial_declines, overall: {figure: share}, by_principle: {principle id: {n, figure: share}}}.
    Shares are of the usable records (those with an accepted revision); None when there are none."""
    usable = [r for r in records if r.get("usable")]
    groups: dict[str, list[dict]] = defaultdict(list)
    rows = []
    for rec in usable:
        last = [x for x in rec["rounds"] if x["status"] == "ok"][-1]
        row = judge(rec["final_response"], rec["initial_response"], last.get("critique") or "", fewshot_text, rec.get("prompt") or "")
        rows.append(row)
        groups[last["principle_id"]].append(row)

    def shares(rs: list[dict]) -> dict:
        return {f: round(sum(r[f] for r in rs) / len(rs), 4) if rs else None for f in FIGURES}

    return {
        "records": len(records),
        "usable": len(usable),
        "initial_declines": round(sum(is_refusal(r["initial_response"]) for r in records) / len(records), 4) if records else None,
        "initial_engages": round(sum(bool(r.get("prompt")) and engages(r["prompt"], r["initial_response"]) for r in records) / len(records), 4)
        if records else None,
        "overall": shares(rows),
        "by_principle": {pid: {"n": len(rs), **shares(rs)} for pid, rs in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))},
    }


def fewshot_text(examples: list) -> str:
    """The texts of the few-shot block a revision may copy: every response, critique and revision."""
    out = []
    for e in examples:
        if isinstance(e, str):
            out.append(e)
        else:
            out += [e.get("response", ""), e.get("critique", ""), e.get("revision", "")]
    return "\n".join(t for t in out if t)
