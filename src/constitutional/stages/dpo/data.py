"""`cai dpo`'s data: comparisons from `cai label` (soft labels) and/or revision pairs from `cai revise`
(the revision preferred to the initial response), split into training and held-out rows, and the
check that policy and reference share a tokenizer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ...data.loaders import split_of
from ...errors import UserError
from ...run import RunDir
from ..preference import Comparison, read_comparisons
from ..sft import prompt_messages, read_records

from .config import Config, check_config


def revision_pairs(path: Path) -> tuple[list[Comparison], dict]:
    """Per usable revision chain, (last accepted revision, initial response) with target 1; and the
    counts {records, unusable, identical} of what was read and skipped."""
    out, counts = [], {"records": 0, "unusable": 0, "identical": 0}
    for line, rec in read_records(path):
        where = f"{path}:{line}"
        counts["records"] += 1
        if not isinstance(rec.get("usable"), bool) or not isinstance(rec.get("rounds"), list) or not isinstance(rec.get("initial_response"), str):
            raise UserError(f"{where}: a revision record needs `usable`, `rounds` and `initial_response`; is this revise/revisions.jsonl?")
        if not rec["usable"]:
            counts["unusable"] += 1
            continue
        ok = [r["revision"] for r in rec["rounds"]
              if isinstance(r, dict) and r.get("status") == "ok" and isinstance(r.get("revision"), str) and r["revision"].strip()]
        if not ok:
            raise UserError(f"{where} (rounds): marked usable but no round has status ok and a revision; rerun `cai revise` or fix the record")
        if ok[-1].strip() == rec["initial_response"].strip():
            counts["identical"] += 1  # no difference to learn from
            continue
        rid = str(rec.get("id", line))
        split = rec.get("split") if rec.get("split") in ("train", "test") else split_of(rid)
        out.append(Comparison(rid, prompt_messages(rec, where), ok[-1], rec["initial_response"], 1.0, split))
    return out, counts


def read_data(cfg: Config, run_dir: RunDir) -> tuple[list[tuple[str, Comparison]], list[tuple[str, Comparison]], dict]:
    """(training, held-out) (source, comparison) pairs, chosen oriented to p_chosen >= 0.5 and ids
    prefixed with the source; and the counts. Every input is checked before a model loads."""
    found, counts = [], {}
    for source in check_config(cfg):
        stage, name = ("label", "preferences.jsonl") if source == "preferences" else ("revise", "revisions.jsonl")
        path = run_dir.path / stage / name
        if not path.is_file():
            raise UserError(f"{path}: not found; run `cai {stage}` first, or leave {source} out of dpo.data")
        if source == "preferences":
            comps = read_comparisons(path)
        else:
            comps, counts["revision_records"] = revision_pairs(path)
        found += [(source, c) for c in comps]
    helpful = []
    if cfg.helpful:
        if not Path(cfg.helpful).is_file():
            raise UserError(f"{cfg.helpful}: helpfulness comparisons not found; check dpo.helpful or set it to \"\"")
        helpful = [("helpful", c) for c in read_comparisons(Path(cfg.helpful), default_p=1.0)]
    pairs = [(s, dataclasses.replace(_oriented(c), id=f"{s}/{c.id}")) for s, c in found + helpful]
    counts["ties_dropped"] = sum(c.p_chosen == 0.5 for _, c in pairs) if cfg.loss == "sigmoid" else 0
    if cfg.loss == "sigmoid":  # a tie says nothing about which response is better
        pairs = [(s, c) for s, c in pairs if c.p_chosen != 0.5]
    held = [s != "helpful" and (c.split == "test" or split_of(f"dpo:{c.id}", cfg.heldout) == "test") for s, c in pairs]
    train = [p for p, h in zip(pairs, held) if not h]
    heldout = [p for p, h in zip(pairs, held) if h]
    if not train:
        raise UserError(f"dpo.data {cfg.data!r}: no training comparisons ({len(pairs)} read, {len(heldout)} held out); "
                        "label or revise more prompts, or add comparisons with dpo.helpful")
    counts["train"] = {s: sum(p[0] == s for p in train) for s in dict.fromkeys(s for s, _ in pairs)}
    counts["heldout"] = {s: sum(p[0] == s for p in heldout) for s in dict.fromkeys(s for s, _ in heldout)}
    return train, heldout, counts


def _oriented(c: Comparison) -> Comparison:
    """The comparison with `chosen` the response its target prefers (p_chosen >= 0.5)."""
    return c if c.p_chosen >= 0.5 else dataclasses.replace(c, chosen=c.rejected, rejected=c.chosen, p_chosen=1.0 - c.p_chosen)


def check_tokenizers(policy: str, reference: str) -> None:
    """The reference must read the policy's token ids as the same tokens: equal vocabularies."""
    from transformers import AutoTokenizer

    from ...backends import model_path

    vocabs = []
    for spec, setting in ((policy, "dpo.policy"), (reference, "dpo.reference")):
        try:
            vocabs.append(AutoTokenizer.from_pretrained(model_path(spec)).get_vocab())
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UserError(f"{setting} {spec!r}: cannot load its tokenizer ({first}); give a model directory, a hub id or embedded") from None
    if vocabs[0] != vocabs[1]:
        diff = sorted(set(vocabs[0].items()) ^ set(vocabs[1].items()))[0]
        raise UserError(f"dpo.reference {reference!r}: its tokenizer does not match the policy's ({len(vocabs[1])} vs {len(vocabs[0])} "
                        f"tokens; e.g. {diff[0]!r} -> {diff[1]}); use a reference with the policy's tokenizer, or leave dpo.reference empty")
