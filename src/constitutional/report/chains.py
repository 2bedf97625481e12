"""The report's chains section: a few critique → revision chains (the SL-CAI data, §3;
`revise/revisions.jsonl`)."""

from __future__ import annotations

from .common import Missing, RunFiles, as_dict, as_list, esc, note, text_block


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
        for k, rd in enumerate(as_list(r.get("rounds")), 1):
            rd = as_dict(rd)
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
