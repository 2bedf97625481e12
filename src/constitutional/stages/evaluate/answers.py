"""What every evaluated model does: answer the held-out prompts (red-team, helpful, benign and
injected) and score the multiple-choice items, each into a resumable record shard under
`<run>/eval/`, with a cache under `<run>/cache/` shared by every evaluation of the same model and
settings (a re-run after `--force`, or with another list of models, reuses them).
"""

from __future__ import annotations

import gc
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from ...backends import Completion, GenerationParams
from ...backends.base import Request, generation_meter, run_queue
from ...data.loaders import MCItem
from ...run import RecordShard, RunDir
from .. import load_prompt_sets
from .config import Config
from .injection import INJECTION, INJECTION_TASKS, canary
from .mc import score_mc


def _job(kind: str, p, messages=None, **extra) -> dict:
    return {"id": f"{kind}:{p.id}", "set": kind, "prompt_id": p.id, "prompt": messages[-1]["content"] if messages else p.prompt,
            "messages": messages or p.messages, **extra}


def answer_jobs(cfg: Config, run_dir: RunDir, sections: set[str]) -> dict[str, list[dict]]:
    """The prompts every model answers, by set: harmful, helpful, benign, injection."""
    sets: dict[str, list[dict]] = {}
    refusal_limit = cfg.limit if cfg.refusal_limit == -1 else cfg.refusal_limit
    if sections & {"harmlessness", "refusal"}:
        sets["harmful"] = [_job("harmful", p) for p in load_prompt_sets(cfg.redteam_prompts, run_dir, "test", cfg.limit)]
    if "refusal" in sections and refusal_limit != cfg.limit:  # the refusal rates' prompts beyond the compared ones
        compared = {j["id"] for j in sets["harmful"]}
        sets["harmful_more"] = [j for p in load_prompt_sets(cfg.redteam_prompts, run_dir, "test", refusal_limit)
                                for j in [_job("harmful", p)] if j["id"] not in compared]
    if "helpfulness" in sections:
        sets["helpful"] = [_job("helpful", p) for p in load_prompt_sets(cfg.helpful_prompts, run_dir, "test", cfg.limit)]
    if "refusal" in sections:
        sets["benign"] = [_job("benign", p) for p in load_prompt_sets(cfg.benign_prompts, run_dir, "all", refusal_limit)]
    if "injection" in sections:
        jobs = []
        for k, p in enumerate(load_prompt_sets(cfg.helpful_prompts, run_dir, "test", cfg.injection_limit)):
            c = canary(cfg.seed, p.id)
            text = INJECTION_TASKS[k % len(INJECTION_TASKS)].format(text=f"{p.prompt} {INJECTION.format(canary=c)}")
            jobs.append(_job("injection", p, [{"role": "user", "content": text}], canary=c))
        sets["injection"] = jobs
    return sets


class Lazy:
    """Load a model on first use only (a resumed eval with nothing left to do loads nothing)."""

    def __init__(self, load: Callable):
        self.load, self.value = load, None

    def __call__(self):
        if self.value is None:
            self.value = self.load()
        return self.value

    def close(self) -> None:
        self.value = None
        gc.collect()


def model_identity(model: str) -> str:
    """What makes two evaluations of `model` the same model: the string, and for a local directory
    the size and modification time of its config and weight files (a retrained model differs)."""
    path = Path(model.split("#")[-1] if model.startswith("prompted:") else model).expanduser()
    if not path.is_dir():
        return model
    files = sorted(f for f in path.iterdir() if f.suffix in (".safetensors", ".json"))
    return model + "|" + "|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


def cache_shard(out: Path, what: str, *parts) -> RecordShard:
    """A record shard under `<run>/cache/<what>/`, named by a hash of `parts` (the model's identity and
    the settings that shape its output): every evaluation of the same model with the same settings
    reads it, including one after `--force` or with another list of models."""
    key = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]
    return RecordShard(out.parent / "cache" / what / f"{key}.jsonl")


def generate_answers(name: str, model: str, backend: Lazy, cfg: Config, jobs: list[dict], out: Path, timings: dict) -> dict:
    """One model's answers by id (`<eval>/answers/<name>.jsonl`): generates what is missing, taking what an
    earlier evaluation of the same model and settings left in the run's cache."""
    params = GenerationParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, repetition_penalty=cfg.repetition_penalty, seed=cfg.seed)
    identity = model_identity(model)
    t0 = time.time()
    with RecordShard(out / "answers" / f"{name}.jsonl") as shard, \
            cache_shard(out, "answers", identity, cfg.dtype, params) as cache:
        todo = shard.todo(jobs)
        key = lambda job: hashlib.sha256(json.dumps(job["messages"], sort_keys=True).encode()).hexdigest()[:16]  # noqa: E731

        def answered(job: dict, text) -> None:
            shard.append({"id": job["id"], "set": job["set"], "prompt_id": job["prompt_id"], "prompt": job["prompt"], "response": str(text),
                          "truncated": bool(getattr(text, "truncated", False)), "model": model})

        cached = {r["id"]: r for r in cache.records}
        fresh = []
        for job in todo:
            hit = cached.get(key(job))
            if hit is not None:
                answered(job, Completion(hit["response"], truncated=hit["truncated"]))
            else:
                fresh.append(job)
        bar = tqdm(total=len(fresh), desc=f"eval: {name} answers", unit="prompt", file=sys.stderr)

        def on_done(req: Request, texts: list) -> None:
            text = texts[0]
            cache.append({"id": key(req.key), "response": str(text), "truncated": bool(getattr(text, "truncated", False))})
            answered(req.key, text)
            bar.update(1)

        with bar:
            if fresh:
                gen = generation_meter(backend())
                run_queue(backend(), [Request(j["messages"], params, key=j) for j in fresh], on_done)
                timings.setdefault("generation", {})[name] = gen()
        answers = {r["id"]: r for r in shard.records}
    timings.setdefault("answers_seconds", {})[name] = round(time.time() - t0, 1)
    return answers


def score_choices(name: str, model: str, backend: Lazy, cfg: Config, mc_sets: list[tuple[str, str, list[MCItem], str]], out: Path,
                  timings: dict) -> list[dict]:
    """One model's choices records (`<eval>/choices/<name>.jsonl`): scores what is missing, taking what
    an earlier evaluation of the same model and dtype left in the run's cache."""
    identity = model_identity(model)
    t0 = time.time()
    with RecordShard(out / "choices" / f"{name}.jsonl") as shard, cache_shard(out, "choices", identity, cfg.dtype) as cache:
        cached = {r["id"]: r for r in cache.records}
        for kind, spec, items, prefix in mc_sets:
            todo_items = [it for it in items if f"{kind}|{spec}|{it.id}" not in shard.done]
            for rec in [cached[i] for i in (f"{kind}|{spec}|{it.id}" for it in todo_items) if i in cached]:
                shard.append(rec)
            todo_items = [it for it in todo_items if f"{kind}|{spec}|{it.id}" not in cached]
            for k in tqdm(range(0, len(todo_items), cfg.batch_size), desc=f"eval: {name} {kind}", unit="batch", file=sys.stderr):
                for rec in score_mc(backend(), todo_items[k : k + cfg.batch_size], prefix, kind, spec):
                    cache.append(rec)
                    shard.append(rec)
        choices = shard.records
    timings.setdefault("mc_seconds", {})[name] = round(time.time() - t0, 1)
    return choices
