"""`cai baseline`: measure the starting model before any Constitutional AI training.

Two measurements on built-in (or given) data, written under `<run-dir>/baseline/`:
- `responses.jsonl`: greedy answers to held-out red-team prompts (the paper's starting point is a
  helpful-only model that complies with harmful requests; this shows whether ours does);
- `mc.jsonl`: the model as a multiple-choice judge on the comparison set: log p(" (A)") and
  log p(" (B)") after each prompt, normalised to P(A), the chosen option, and whether it is correct.
The summary reports accuracy per subset and the share of (A) answers: with options balanced 50/50
between positions, a share far from 0.5 is position bias (the paper's labelers face the same issue,
which is why the label stage scores both orders).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tqdm import tqdm

from ..backends import GenerationParams, load_backend
from ..backends.base import Request, generation_meter, run_queue
from ..config import opt
from ..data.loaders import load_mc, load_prompts
from ..run import RecordShard, RunDir


@dataclass
class Config:
    model: str = opt("embedded", "model string: embedded, a local model directory, or a hub id")
    dtype: str = opt("auto", "auto (bf16 where the hardware has it), bfloat16 or float32")
    batch_size: int = opt(8, "answers decoded together (the backend's token budget may allow fewer) and multiple-choice prompts per scoring pass")
    prompts: str = opt("builtin:redteam", "red-team prompts to answer")
    split: str = opt("test", "which split of the prompts to use: train, test or all")
    limit: int = opt(8, "how many red-team prompts to answer (0 = all)")
    max_new_tokens: int = opt(64, "tokens per answer")
    mc: str = opt("builtin:mc", "multiple-choice comparison set ({prompt, corrects, incorrects} JSONL or BIG-bench task.json)")
    mc_limit: int = opt(0, "how many multiple-choice items to score (0 = all)")
    seed: int = opt(0, "random seed")


def _chunks(items, n):
    for i in range(0, len(items), n):
        yield items[i : i + n]


def run(cfg: Config, run_dir: RunDir) -> dict:
    prompts = load_prompts(cfg.prompts, split=None if cfg.split == "all" else cfg.split, limit=cfg.limit or None)
    items = load_mc(cfg.mc)
    items = items[: cfg.mc_limit] if cfg.mc_limit else items
    backend = load_backend(cfg.model, dtype=cfg.dtype, batch_size=cfg.batch_size, max_rows=cfg.batch_size)
    out = run_dir.stage_dir("baseline")
    params = GenerationParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0, seed=cfg.seed)
    with RecordShard(out / "responses.jsonl") as shard:
        todo = shard.todo([p.to_dict() for p in prompts])
        bar = tqdm(total=len(todo), desc="baseline: answers", unit="prompt")

        def answered(req: Request, texts: list) -> None:
            p = req.key
            shard.append({"id": p["id"], "prompt": p["prompt"], "category": p.get("category"), "response": texts[0]})
            bar.update(1)

        gen = generation_meter(backend)
        with bar:
            run_queue(backend, [Request(p["messages"], params, key=p) for p in todo], answered)
        speed = gen()
        responses = len(shard.records)
    with RecordShard(out / "mc.jsonl") as shard:
        todo = [it for it in items if it.id not in shard.done]
        for chunk in tqdm(list(_chunks(todo, cfg.batch_size)), desc="baseline: multiple choice", unit="batch"):
            scores = backend.option_logprobs([it.prompt for it in chunk], [it.options for it in chunk])
            for it, lp in zip(chunk, scores):
                z = max(lp)
                probs = [math.exp(x - z) for x in lp]
                probs = [p / sum(probs) for p in probs]
                choice = max(range(len(lp)), key=lambda j: lp[j])
                shard.append({
                    "id": it.id, "subset": it.subset, "options": it.options, "logprobs": lp, "probs": probs,
                    "chosen": choice, "chosen_option": it.options[choice].strip(), "correct": choice in it.correct,
                })
        records = shard.records
    by_subset: dict[str, list[bool]] = {}
    for r in records:
        by_subset.setdefault(r["subset"] or "all", []).append(r["correct"])
    first = [r["chosen_option"] == "(A)" for r in records if "(A)" in [o.strip() for o in r["options"]]]
    summary = {
        "model": backend.name,
        "dtype": str(backend.dtype).replace("torch.", ""),
        "responses": responses,
        "mc_items": len(records),
        "mc_accuracy": round(sum(r["correct"] for r in records) / len(records), 4),
        "mc_accuracy_by_subset": {k: round(sum(v) / len(v), 4) for k, v in sorted(by_subset.items())},
        "share_choosing_A": round(sum(first) / len(first), 4) if first else None,
        **speed,
    }
    return summary
