"""`cai label`: AI-feedback preference labels for response pairs (RL-CAI, paper Section 4.1).

Reads `<run>/sample/pairs.jsonl` (`id, prompt, messages, responses: [r0, r1, ...]`), asks the feedback
model which response is better under a principle drawn from the constitution (the multiple-choice
template in `feedback.py`), and writes `<run>/label/preferences.jsonl`, one record per comparison:
`id, prompt, messages, chosen, rejected, p_chosen` (the soft label in [0.5, 1]) plus the evidence
(`p_response0`, `hard_label`, `principle_ids`, and per principle and order the log-probs of " (A)" and
" (B)", p(A) and, in CoT mode, the chain of thought). With more than two responses, consecutive pairs
(0, 1), (2, 3), ... are separate comparisons with ids `<id>-<k>`.

Each comparison is scored in both orders (r0 as (A), then as (B)) and P(r0 better) is the average of
the two, which cancels a labeler's preference for a position; with `principles: k > 1` it is the mean
over k distinct principles (an ensemble), else one principle drawn at random per comparison (seeded
by `seed` and the comparison id, so a resumed run draws the same ones). Ties (P = 0.5): response 0 is
`chosen`, and they are counted.

Diagnostics (`<run>/label/diagnostics.json` and the stage summary): speed, ties, position bias and
order consistency, the p_chosen distribution, principle agreement, and a calibration check on a
multiple-choice set with known answers (`mc`; its records in `mc.jsonl`): items that carry
question/correct_response/incorrect_response go through the same labeler (template, principle draw,
few-shot, both orders), other items are scored as given. `verdict` says plainly when the labeler is
near chance or dominated by position, i.e. when its labels carry little signal.
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from ..backends import GenerationParams, load_backend
from ..config import opt
from ..constitution import Constitution, FeedbackPrinciple, load_constitution, load_fewshot
from ..data.loaders import MCItem, load_mc
from ..errors import UserError
from ..feedback import (
    COT_STOP,
    OPTIONS,
    calibration,
    chat_messages,
    clamp,
    cut_reasoning,
    ensemble_mean,
    histogram,
    normalise_pair,
    order_average,
    position_stats,
    raw_text,
    render_question,
    verdict,
    winner,
)
from ..run import RecordShard, RunDir, atomic_write_json, read_records
from . import resolve_model


@dataclass
class Config:
    feedback_model: str = opt("auto", "feedback model: auto (this run's SL-CAI model if trained, else embedded), embedded, a local model directory, or a hub id")
    dtype: str = opt("float32", "float32 (bf16 scoring noise on CPU is 0.2-0.4 nats, too much for labels), bfloat16 or auto")
    batch_size: int = opt(8, "comparisons per labeling call (each is 2 x principles prompts) and prompts per forward pass")
    pairs: str = opt("", "response pairs JSONL; empty = this run's sample/pairs.jsonl")
    constitution: str = opt("default", "constitution with the feedback principles: default or a path")
    principles: int = opt(1, "principles per comparison: 1 = one drawn at random, k > 1 = the mean over k distinct ones")
    fewshot: int = opt(8, "few-shot examples before each question (0 to 8, from data/fewshot_feedback.yaml)")
    chat: bool = opt(True, "true: question as a user turn, the answer prefilled in the assistant turn; false: the paper's plain text")
    cot: bool = opt(False, "chain of thought: sample reasoning after \"Let's think step-by-step:\", then read the answer (needs chat: true)")
    cot_max_new_tokens: int = opt(128, "tokens of reasoning to sample (CoT only)")
    cot_temperature: float = opt(0.7, "sampling temperature of the reasoning (CoT only; 0 = greedy)")
    clamp_low: float = opt(0.4, "lower clamp of each order's p(A) (CoT only; the paper clamps CoT to 40-60%)")
    clamp_high: float = opt(0.6, "upper clamp of each order's p(A) (CoT only)")
    mc: str = opt("builtin:mc", "multiple-choice set with known answers for the calibration check; empty to skip")
    mc_limit: int = opt(0, "how many multiple-choice items to check (0 = all)")
    limit: int = opt(0, "how many comparisons to label (0 = all)")
    seed: int = opt(0, "random seed: principle draws and CoT sampling")


@dataclass
class Comparison:
    """One labeling question: which of `responses` (r0, r1) is the better reply to `messages`."""

    id: str
    messages: list[dict]
    responses: tuple[str, str]
    principles: list[FeedbackPrinciple]


def draw_principles(constitution: Constitution, k: int, seed: int, cid: str) -> list[FeedbackPrinciple]:
    """One principle at random (k = 1) or k distinct ones, from a generator seeded by (seed, id)."""
    rng = random.Random(f"label:{seed}:{cid}")
    if k == 1:
        return [constitution.sample_feedback(rng)]
    return rng.sample(constitution.feedback, k)


class Labeler:
    """Scores comparisons in both orders under each of their principles (see `feedback.py`)."""

    def __init__(self, backend, examples: Sequence[dict], chat: bool = True, cot: bool = False, cot_max_new_tokens: int = 128,
                 cot_temperature: float = 0.7, clamp_low: float = 0.4, clamp_high: float = 0.6, seed: int = 0):
        self.backend, self.examples, self.chat, self.cot = backend, list(examples), chat, cot
        self.cot_params = GenerationParams(max_new_tokens=cot_max_new_tokens, temperature=cot_temperature, seed=seed, stop=list(COT_STOP))
        self.clamp_low, self.clamp_high = clamp_low, clamp_high

    @staticmethod
    def questions(c: Comparison) -> list[tuple[FeedbackPrinciple, str, str]]:
        """(principle, order, question) for each principle, order AB (r0 is (A)) then BA."""
        r0, r1 = c.responses
        out = []
        for p in c.principles:
            out.append((p, "AB", render_question(c.messages, p.text, r0, r1)))
            out.append((p, "BA", render_question(c.messages, p.text, r1, r0)))
        return out

    def prompt(self, question: str, reasoning: str | None = None) -> str:
        """The exact text after which " (A)" and " (B)" are scored."""
        if not self.chat:
            return raw_text(question, self.examples)
        return self.backend.render_chat(chat_messages(question, self.examples, self.cot, reasoning))

    def label(self, comparisons: Sequence[Comparison]) -> list[list[dict]]:
        """Per comparison, its `orders` evidence: [{principle_id, order, logprob_A, logprob_B, p_A, ...}].

        All prompts of the call go to the backend together, so the few-shot prefix is shared.
        """
        slots = [(i, p, order, q) for i, c in enumerate(comparisons) for p, order, q in self.questions(c)]
        reasoning: list[str | None] = [None] * len(slots)
        if self.cot:
            convs = [chat_messages(q, self.examples, cot=True) for *_, q in slots]
            reasoning = [cut_reasoning(t) for t in self.backend.generate(convs, self.cot_params)]
        texts = [self.prompt(q, r) for (*_, q), r in zip(slots, reasoning)]
        scores = self.backend.option_logprobs(texts, [list(OPTIONS)] * len(texts))
        orders: list[list[dict]] = [[] for _ in comparisons]
        for (i, p, order, _), r, (la, lb) in zip(slots, reasoning, scores):
            p_a = normalise_pair(la, lb)
            entry = {"principle_id": p.id, "order": order, "logprob_A": la, "logprob_B": lb, "p_A": p_a}
            if self.cot:
                entry.update(p_A=clamp(p_a, self.clamp_low, self.clamp_high), p_A_raw=p_a, cot=r)
            orders[i].append(entry)
        return orders


def combine(orders: Sequence[dict]) -> tuple[float, list[float], tuple[float, float]]:
    """(P(r0 better), P per principle, (mean pA in order AB, mean pA in order BA)) from `orders`."""
    by_principle: dict[str, dict[str, float]] = {}
    for o in orders:
        by_principle.setdefault(o["principle_id"], {})[o["order"]] = o["p_A"]
    per = [order_average(d["AB"], d["BA"]) for d in by_principle.values()]
    ab = ensemble_mean([d["AB"] for d in by_principle.values()])
    ba = ensemble_mean([d["BA"] for d in by_principle.values()])
    return ensemble_mean(per), per, (ab, ba)


# ---------------------------------------------------------------- inputs
def load_pairs(path: Path, default: bool) -> list[dict]:
    """Comparisons from a pairs JSONL: {id, prompt, messages, responses (2), split, category}."""
    if not path.is_file():
        if default:
            raise UserError(f"{path}: no response pairs in this run; run `cai sample` first, or set label.pairs to a pairs JSONL file")
        raise UserError(f"{path}: pairs file not found; check label.pairs, or run `cai sample` to make <run>/sample/pairs.jsonl")
    out: list[dict] = []
    seen: set[str] = set()
    for rec, n in read_records(path, "fix it or rerun `cai sample --force`"):
        where = f"{path}:{n}"
        if not isinstance(rec, dict) or "id" not in rec:
            raise UserError(f"{where}: expected an object with id, prompt/messages and responses")
        responses = rec.get("responses")
        if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) for r in responses):
            raise UserError(f"{where} (responses): expected a list of at least two response strings")
        messages = rec.get("messages")
        if not isinstance(messages, list) or not messages:
            if not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
                raise UserError(f"{where}: no conversation; give messages or prompt")
            messages = [{"role": "user", "content": rec["prompt"]}]
        if not all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str) for m in messages):
            raise UserError(f"{where} (messages): expected [{{role, content}}] with roles system, user, assistant")
        if messages[-1]["role"] != "user":
            raise UserError(f"{where} (messages): the conversation must end with the human's turn that the responses answer")
        prompt = rec.get("prompt") or next(m["content"] for m in reversed(messages) if m["role"] == "user")
        for k in range(len(responses) // 2):
            cid = str(rec["id"]) if len(responses) == 2 else f"{rec['id']}-{k}"
            if cid in seen:
                raise UserError(f"{where}: duplicate comparison id {cid!r}; pair ids must be unique")
            seen.add(cid)
            out.append({"id": cid, "prompt": prompt, "messages": messages, "responses": responses[2 * k : 2 * k + 2],
                        "split": rec.get("split"), "category": rec.get("category")})
    if not out:
        raise UserError(f"{path}: no response pairs; run `cai sample` to make some")
    return out


def check_config(cfg: Config, constitution: Constitution, examples: list) -> None:
    n = len(constitution.feedback)
    if not 1 <= cfg.principles <= max(n, 1):
        raise UserError(f"label.principles = {cfg.principles}: the constitution {constitution.source} has {n} feedback principles; use 1 to {n}")
    if not 0 <= cfg.fewshot <= len(examples):
        raise UserError(f"label.fewshot = {cfg.fewshot}: there are {len(examples)} few-shot feedback examples; use 0 to {len(examples)}")
    if cfg.cot and not cfg.chat:
        raise UserError("label.cot = true needs label.chat = true: the reasoning is sampled as the feedback model's assistant turn")
    if not 0.0 <= cfg.clamp_low <= 0.5 <= cfg.clamp_high <= 1.0:
        raise UserError(f"label.clamp_low/clamp_high = {cfg.clamp_low}/{cfg.clamp_high}: need 0 <= clamp_low <= 0.5 <= clamp_high <= 1")
    if cfg.cot_max_new_tokens < 1 or cfg.cot_temperature < 0:
        raise UserError(f"label.cot_max_new_tokens = {cfg.cot_max_new_tokens}, cot_temperature = {cfg.cot_temperature}: need >= 1 and >= 0")
    if cfg.batch_size < 1:
        raise UserError(f"label.batch_size = {cfg.batch_size}: must be >= 1")
    for name in ("limit", "mc_limit"):
        if getattr(cfg, name) < 0:
            raise UserError(f"label.{name} = {getattr(cfg, name)}: must be >= 0 (0 = all)")


def _chunks(items, n):
    for i in range(0, len(items), n):
        yield items[i : i + n]


# ---------------------------------------------------------------- records
def preference_record(pair: dict, orders: list[dict], feedback_model: str) -> dict:
    p0, _, _ = combine(orders)
    r0, r1 = pair["responses"]
    tie = winner(p0) is None
    first = tie or p0 > 0.5
    rec = {
        "id": pair["id"], "prompt": pair["prompt"], "messages": pair["messages"],
        "chosen": r0 if first else r1, "rejected": r1 if first else r0,
        "p_chosen": 0.5 if tie else max(p0, 1.0 - p0), "p_response0": p0, "hard_label": "A" if first else "B", "tie": tie,
        "principle_ids": list(dict.fromkeys(o["principle_id"] for o in orders)), "orders": orders,
        "feedback_model": feedback_model, "split": pair.get("split"),
    }
    if pair.get("category") is not None:
        rec["category"] = pair["category"]
    return rec


def mc_comparison(item: MCItem) -> tuple[list[dict], tuple[str, str], int] | None:
    """(messages, (r0, r1), index of the correct response) for an item the labeler can render."""
    m = item.meta
    if not all(isinstance(m.get(k), str) for k in ("question", "correct_response", "incorrect_response")):
        return None
    # keep the file's own placement (balanced A/B in the built-in set); both orders are scored anyway
    if str(m.get("correct_position", "A")).strip().upper() == "B":
        return [{"role": "user", "content": m["question"]}], (m["incorrect_response"], m["correct_response"]), 1
    return [{"role": "user", "content": m["question"]}], (m["correct_response"], m["incorrect_response"]), 0


def _credit(chosen: int | None, correct: Sequence[int]) -> float:
    return 0.5 if chosen is None else float(chosen in correct)


def calibrate(labeler: Labeler, items: list[MCItem], cfg: Config, constitution: Constitution, shard: RecordShard) -> None:
    """Score the multiple-choice items into `shard` (the labeler path where possible, else as given)."""
    todo = [it for it in items if it.id not in shard.done]
    via = [(it, mc_comparison(it)) for it in todo]
    labeled = [(it, c) for it, c in via if c is not None]
    given = [it for it, c in via if c is None]
    for chunk in tqdm(list(_chunks(labeled, cfg.batch_size)), desc="label: multiple choice", unit="batch", file=sys.stderr):
        comps = [Comparison(it.id, msgs, resp, draw_principles(constitution, cfg.principles, cfg.seed, it.id)) for it, (msgs, resp, _) in chunk]
        for (it, (_, _, correct)), orders in zip(chunk, labeler.label(comps)):
            p0, _, (ab, ba) = combine(orders)
            w = winner(p0)
            shard.append({"id": it.id, "subset": it.subset, "via": "labeler", "correct_response": correct, "p_response0": p0,
                          "chosen": w, "p_chosen": max(p0, 1.0 - p0), "credit": _credit(w, [correct]),
                          "p_A_by_order": [ab, ba], "orders": orders})
    for chunk in _chunks(given, cfg.batch_size):
        for it, lp in zip(chunk, labeler.backend.option_logprobs([it.prompt for it in chunk], [it.options for it in chunk])):
            z = max(lp)
            probs = [math.exp(x - z) for x in lp]
            probs = [p / sum(probs) for p in probs]
            best = max(probs)
            top = [j for j, p in enumerate(probs) if p == best]
            w = top[0] if len(top) == 1 else None
            shard.append({"id": it.id, "subset": it.subset, "via": "as_given", "options": it.options, "logprobs": lp, "probs": probs,
                          "chosen": w, "p_chosen": best, "credit": _credit(w, it.correct)})


# ---------------------------------------------------------------- diagnostics
def diagnose(records: list[dict], mc_records: list[dict], seconds: float, labeled_now: int, k: int, feedback_model: str, mc: str) -> dict:
    """The labeler's diagnostics from its records (see the module docstring)."""
    pos = position_stats([combine(r["orders"])[2] for r in records])
    p_chosen = [r["p_chosen"] for r in records]
    agree = None
    if k > 1 and records:
        agree = sum(len({winner(p) for p in combine(r["orders"])[1]}) == 1 for r in records) / len(records)
    out = {
        "feedback_model": feedback_model,
        "comparisons": len(records),
        "labeled_now": labeled_now,
        "seconds": seconds,
        "seconds_per_comparison": seconds / labeled_now if labeled_now else None,
        "ties": sum(r["tie"] for r in records),
        **pos,
        "p_chosen_mean": sum(p_chosen) / len(p_chosen) if p_chosen else None,
        "p_chosen_histogram": histogram(p_chosen),
        "principles_per_comparison": k,
        "principle_agreement": agree,
        "mc": None,
    }
    if mc_records:
        by_subset: dict[str, list[float]] = {}
        for r in mc_records:
            by_subset.setdefault(r["subset"] or "all", []).append(r["credit"])
        bins, ece = calibration([r["p_chosen"] for r in mc_records], [r["credit"] for r in mc_records])
        via = [r for r in mc_records if r["via"] == "labeler"]
        out["mc"] = {
            "set": mc,
            "items": len(mc_records),
            "scored_as_given": len(mc_records) - len(via),
            "accuracy": sum(r["credit"] for r in mc_records) / len(mc_records),
            "accuracy_by_subset": {s: sum(v) / len(v) for s, v in sorted(by_subset.items())},
            "ece": ece,
            "calibration_bins": bins,
            "position_bias_rate": position_stats([tuple(r["p_A_by_order"]) for r in via])["position_bias_rate"],
        }
    mc_acc = out["mc"]["accuracy"] if out["mc"] else None
    out["verdict"] = verdict(mc_acc, out["position_bias_rate"], out["mc"]["ece"] if out["mc"] else None)
    return _rounded(out)


def _rounded(obj):
    """Floats to 4 decimals, for a readable summary (the records keep full precision)."""
    if isinstance(obj, float):
        return round(obj, 4)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj


def run(cfg: Config, run_dir: RunDir) -> dict:
    pairs_path = Path(cfg.pairs) if cfg.pairs else run_dir.path / "sample" / "pairs.jsonl"
    pairs = load_pairs(pairs_path, default=not cfg.pairs)
    pairs = pairs[: cfg.limit] if cfg.limit else pairs
    constitution = load_constitution(None if cfg.constitution == "default" else cfg.constitution)
    examples = load_fewshot(None, "feedback")
    check_config(cfg, constitution, examples)
    items = load_mc(cfg.mc) if cfg.mc else []
    items = items[: cfg.mc_limit] if cfg.mc_limit else items
    backend = load_backend(resolve_model(cfg.feedback_model, run_dir), dtype=cfg.dtype, batch_size=cfg.batch_size)
    labeler = Labeler(backend, examples[: cfg.fewshot], chat=cfg.chat, cot=cfg.cot, cot_max_new_tokens=cfg.cot_max_new_tokens,
                      cot_temperature=cfg.cot_temperature, clamp_low=cfg.clamp_low, clamp_high=cfg.clamp_high, seed=cfg.seed)
    out = run_dir.stage_dir("label")
    t0, labeled_now = time.perf_counter(), 0
    with RecordShard(out / "preferences.jsonl") as shard:
        todo = shard.todo(pairs)
        for chunk in tqdm(list(_chunks(todo, cfg.batch_size)), desc="label: comparisons", unit="batch", file=sys.stderr):
            comps = [Comparison(p["id"], p["messages"], tuple(p["responses"]), draw_principles(constitution, cfg.principles, cfg.seed, p["id"])) for p in chunk]
            for p, orders in zip(chunk, labeler.label(comps)):
                shard.append(preference_record(p, orders, backend.name))
                labeled_now += 1
        wanted = {p["id"] for p in pairs}
        records = [r for r in shard.records if r["id"] in wanted]
    seconds = time.perf_counter() - t0
    mc_records: list[dict] = []
    if items:
        with RecordShard(out / "mc.jsonl") as shard:
            calibrate(labeler, items, cfg, constitution, shard)
            wanted = {it.id for it in items}
            mc_records = [r for r in shard.records if r["id"] in wanted]
    diagnostics = diagnose(records, mc_records, seconds, labeled_now, cfg.principles, backend.name, cfg.mc)
    atomic_write_json(out / "diagnostics.json", diagnostics)
    return diagnostics
