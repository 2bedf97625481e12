"""`cai sample`: k responses per prompt from the policy, the comparisons the feedback model labels.

Paper: Bai et al. 2022, Section 4.1; the seeds' "Reinforcement Learning Stage: RLAI": the SL-CAI
model is prompted with harmful prompts and produces two responses each, which become a
multiple-choice question for the feedback model (`cai label`). Sampling at temperature 1 as in the
paper. The policy defaults to this run's SL-CAI model (`<run>/sft/model`), else the starting model.

Output `<run>/sample/pairs.jsonl` (resumable: finished ids are skipped): `id, prompt, messages,
category, split, responses: [k texts], truncated: [k flags], policy`. Identical responses are kept
(the labeler then has nothing to choose between: a tie) and counted in the summary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tqdm import tqdm

from ..backends import GenerationParams, load_backend
from ..backends.base import Request, generation_meter, run_queue
from ..config import opt
from ..errors import UserError
from ..run import RecordShard, RunDir
from . import load_prompt_sets, resolve_model


@dataclass
class Config:
    policy: str = opt("auto", "the model to sample from (auto = this run's SL-CAI model, else the starting model)")
    dtype: str = opt("auto", "auto (bf16 where the hardware has it), bfloat16 or float32")
    batch_size: int = opt(64, "most sequences decoded together (the backend's token budget may allow fewer)")
    prompts: str = opt("builtin:redteam", "prompts to sample on; join sets with '+', run:redteam = this run's generated prompts")
    split: str = opt("train", "which split of the prompts: train, test or all (keep test for evaluation)")
    limit: int = opt(0, "prompts per prompt set (0 = all)")
    k: int = opt(2, "responses per prompt (paper: 2)")
    temperature: float = opt(1.0, "sampling temperature (paper: 1)")
    top_p: float = opt(1.0, "nucleus sampling mass")
    repetition_penalty: float = opt(1.0, "penalty on tokens a sample already generated (1 = none)")
    max_new_tokens: int = opt(128, "tokens per response")
    seed: int = opt(0, "random seed")


def run(cfg: Config, run_dir: RunDir) -> dict:
    if cfg.k < 2:
        raise UserError(f"sample.k {cfg.k}: need at least 2 responses per prompt to compare")
    t0 = time.time()
    prompts = load_prompt_sets(cfg.prompts, run_dir, split=cfg.split, limit=cfg.limit)
    policy = resolve_model(cfg.policy, run_dir)
    backend = load_backend(policy, dtype=cfg.dtype, max_rows=cfg.batch_size)
    params = GenerationParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              repetition_penalty=cfg.repetition_penalty, n=cfg.k, seed=cfg.seed)
    with RecordShard(run_dir.stage_dir("sample") / "pairs.jsonl") as shard:
        todo = shard.todo([p.to_dict() for p in prompts])
        bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="sample: responses", unit="prompt")

        def sampled(req: Request, mine: list) -> None:
            p = req.key
            shard.append({
                "id": p["id"], "prompt": p["prompt"], "messages": p["messages"], "category": p.get("category"),
                "split": p.get("split"), "responses": [str(t) for t in mine],
                "truncated": [bool(getattr(t, "truncated", False)) for t in mine], "policy": backend.name,
            })
            bar.update(1)

        gen = generation_meter(backend)
        with bar:
            run_queue(backend, [Request(p["messages"], params, key=p) for p in todo], sampled)
        speed = gen()
        records = shard.records
    n = sum(len(r["responses"]) for r in records)
    return {
        "prompts": len(records),
        "sampled_now": len(todo),
        "responses": n,
        "identical_pairs": sum(len(set(r["responses"])) < len(r["responses"]) for r in records),
        "truncated_share": round(sum(sum(r["truncated"]) for r in records) / n, 3) if n else None,
        "policy": backend.name,
        "seconds": round(time.time() - t0, 1),
        **speed,
    }
