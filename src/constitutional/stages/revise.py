"""`cai revise`: the supervised stage's data (SL-CAI): critique -> revision chains on red-team prompts.

Paper: Bai et al. 2022, Section 3.1; the seeds' "Supervised Stage" and "Self Critique and Revision".
For each red-team prompt the model to improve answers; then, for `rounds` rounds (paper: 4), a
critique/revision principle is drawn at random (seeded per prompt, recorded), the model critiques
its last response against the principle's critique request, and rewrites the response following
the revision request. Few-shot examples come first. Helpful prompts are answered too
(`helpful_samples` per prompt, paper: 2) and kept as the helpfulness mixture for `cai sft`.

How the seeds' dialogue pattern meets a chat model's template. The pattern is
Human / Assistant / CritiqueRequest / Critique / RevisionRequest / Revision. We map every turn onto
the chat roles: Human, CritiqueRequest and RevisionRequest are `user` turns (the requests are
instructions, which is what an instruction-tuned model follows best), Assistant, Critique and
Revision are `assistant` turns, without "Critique:"/"Revision:" labels. The few-shot examples are
earlier turns of the same conversation, exactly as the paper stacks them in one transcript, and
later rounds continue the conversation (the critique request is about "the last response", which is
then the previous revision). Why roles rather than one user message holding the whole transcript:
(1) the model generates each critique and revision as its own reply, so it stops at its
end-of-turn token instead of running on into the next "CritiqueRequest:" line; (2) the revision is
generated in the same assistant voice that SFT will train, without a label to strip; (3) for base
models without a chat template the backend renders the same messages as the paper's
"Human: ... Assistant: ..." transcript. The few-shot block is the same for every prompt and comes
first, so the backend encodes it once per batch and reuses its KV cache. The initial response is
generated from the prompt alone, as the model answers users (no few-shot, no constitution).

Departures: few-shot examples given as raw text blocks (the paper's JSON form) go into one system
message instead of chat turns. A round whose critique or revision is still unusable after
`retries` resamples is dropped (`status: dropped:<problem>`) and the next round critiques the last
good response; a prompt with no good revision is kept with `usable: false` and `cai sft` skips it
(cleaning rules: `constitutional/cleaning.py`).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass

from tqdm import tqdm

from ..backends import GenerationParams, load_backend
from ..cleaning import Cleaned, clean, words
from ..config import opt
from ..constitution import CritiquePrinciple, load_constitution, load_fewshot
from ..errors import UserError
from ..run import RecordShard, RunDir
from . import load_prompt_sets


@dataclass
class Config:
    model: str = opt("embedded", "the model to improve: it answers, critiques and revises")
    critique_model: str = opt("", "a separate model for the critiques (empty = the same model)")
    dtype: str = opt("auto", "auto (bf16 where the hardware has it), bfloat16 or float32")
    batch_size: int = opt(8, "prompts processed together")
    prompts: str = opt("builtin:redteam", "red-team prompts; join several sets with '+', run:redteam = this run's generated prompts")
    split: str = opt("train", "which split of the prompts to use: train, test or all (keep test for evaluation)")
    limit: int = opt(0, "red-team prompts per prompt set (0 = all)")
    helpful_prompts: str = opt("builtin:helpful", "helpful prompts answered for the SFT mixture ('' = none)")
    helpful_limit: int = opt(0, "helpful prompts (0 = all in the split)")
    helpful_samples: int = opt(2, "samples per helpful prompt (paper: 2)")
    rounds: int = opt(4, "critique/revision rounds per prompt (paper: 4)")
    critique: bool = opt(True, "false = revision without critique (the paper's ablation)")
    constitution: str = opt("default", "constitution: default or a YAML/JSON file")
    fewshot: str = opt("default", "few-shot critique/revision examples: default or a YAML/JSON file")
    fewshot_count: int = opt(3, "few-shot examples placed before each dialogue (0 = none)")
    temperature: float = opt(1.0, "sampling temperature (paper: 1; 0 = greedy)")
    top_p: float = opt(1.0, "nucleus sampling mass")
    repetition_penalty: float = opt(1.0, "penalty on tokens a sample already generated (1 = none, the paper's setting)")
    max_new_tokens: int = opt(128, "tokens per response or revision")
    critique_max_new_tokens: int = opt(96, "tokens per critique")
    retries: int = opt(2, "resamples of a critique or revision that fails cleaning before the round is dropped")
    system_prompt: str = opt("", "system prompt for the model ('' = the chat template's own default)")
    seed: int = opt(0, "random seed (principle draws and sampling)")


def principles_for(cfg: Config, prompt_id: str, constitution) -> list[CritiquePrinciple]:
    """The principle of each round for one prompt: seeded by (seed, prompt id), so independent of
    batching and of resumes."""
    rng = random.Random(f"{cfg.seed}:{prompt_id}")
    return [constitution.sample_critique(rng) for _ in range(cfg.rounds)]


def fewshot_messages(examples: list, with_critique: bool) -> list[dict]:
    """The few-shot block as chat turns (see the module docstring)."""
    blocks = [e for e in examples if isinstance(e, str)]
    out = [{"role": "system", "content": "\n\n".join(blocks)}] if blocks else []
    for e in examples:
        if isinstance(e, str):
            continue
        out += [{"role": "user", "content": e["prompt"]}, {"role": "assistant", "content": e["response"]}]
        if with_critique:
            out += [{"role": "user", "content": e["critique_request"]}, {"role": "assistant", "content": e["critique"]}]
        out += [{"role": "user", "content": e["revision_request"]}, {"role": "assistant", "content": e["revision"]}]
    return out


class _Chain:
    """One prompt's dialogue as it grows round by round."""

    def __init__(self, prompt: dict, principles: list[CritiquePrinciple], prefix: list[dict]):
        self.prompt = prompt
        self.principles = principles
        self.prefix = prefix  # few-shot turns
        self.turns: list[dict] = []  # the prompt's own turns after the few-shot block
        self.initial = ""  # the model's own first answer
        self.response = ""  # the last good response (initial, then each good revision)
        self.rounds: list[dict] = []

    def messages(self, *extra: dict) -> list[dict]:
        return self.prefix + self.turns + list(extra)


def _generate_clean(backend, convs, params, retries, counts, kind, checks) -> list[tuple[Cleaned, int]]:
    """Generate one text per conversation; resample the ones that fail cleaning up to `retries` times.

    checks[i] = dict(requests=..., critique=..., prompt=...) for `clean`. Counts repairs and
    problems (of every attempt) under `<kind>/<name>`. Returns (cleaned, retries used) per conversation.
    """
    results: list[tuple[Cleaned, int] | None] = [None] * len(convs)
    todo = list(range(len(convs)))
    for attempt in range(retries + 1):
        p = GenerationParams(**{**params.__dict__, "seed": params.seed + 7919 * attempt})
        texts = backend.generate([convs[i] for i in todo], p)
        again = []
        for i, text in zip(todo, texts):
            truncated = bool(getattr(text, "truncated", False))
            c = clean(text, truncated, kind=kind, **checks[i])
            if kind == "critique":  # a truncated critique is kept (cleaning.py); count how often
                counts["critique/truncated_kept"] += truncated and c.problem is None
            for r in c.repairs:
                counts[f"{kind}/{r}"] += 1
            if c.problem:
                counts[f"{kind}/{c.problem}"] += 1
            results[i] = (c, attempt)
            if c.problem:
                again.append(i)
        if attempt < retries and again:
            counts[f"{kind}/retries"] += len(again)
        todo = again
        if not todo:
            break
    return results  # type: ignore[return-value]


def _revise_batch(cfg, chains: list[_Chain], backend, critic, params, crit_params, counts) -> None:
    initial = backend.generate([c.prompt["messages"] for c in chains], params)
    for c, text in zip(chains, initial):
        counts["initial/truncated"] += bool(getattr(text, "truncated", False))
        c.response = str(text).strip()
        c.initial = c.response
        c.turns = [*c.prompt["messages"], {"role": "assistant", "content": c.response}]
    for r in range(cfg.rounds):
        seed = cfg.seed * 1_000_003 + 101 * r
        live = list(chains)
        crit: list[Cleaned | None] = [None] * len(live)
        crit_retries = [0] * len(live)
        if cfg.critique:
            convs = [c.messages({"role": "user", "content": c.principles[r].critique}) for c in live]
            checks = [dict(requests=(c.principles[r].critique, c.principles[r].revision), prompt="") for c in live]
            out = _generate_clean(critic, convs, GenerationParams(**{**crit_params.__dict__, "seed": seed}), cfg.retries, counts, "critique", checks)
            crit = [o[0] for o in out]
            crit_retries = [o[1] for o in out]
        convs, checks, idx = [], [], []
        for k, c in enumerate(live):
            pr = c.principles[r]
            if crit[k] is not None and crit[k].problem:
                c.rounds.append(_round(pr, crit[k].text, "", f"dropped:critique_{crit[k].problem}", crit_retries[k], cfg.critique))
                continue
            extra = [{"role": "user", "content": pr.critique}, {"role": "assistant", "content": crit[k].text}] if cfg.critique else []
            convs.append(c.messages(*extra, {"role": "user", "content": pr.revision}))
            checks.append(dict(requests=(pr.critique, pr.revision), critique=crit[k].text if cfg.critique else "", prompt=c.prompt["prompt"]))
            idx.append(k)
        out = _generate_clean(backend, convs, GenerationParams(**{**params.__dict__, "seed": seed + 1}), cfg.retries, counts, "revision", checks)
        for k, (rev, tries) in zip(idx, out):
            c, pr = live[k], live[k].principles[r]
            critique_text = crit[k].text if cfg.critique else ""
            status = f"dropped:{rev.problem}" if rev.problem else "ok"
            c.rounds.append(_round(pr, critique_text, rev.text, status, tries + crit_retries[k], cfg.critique))
            if rev.problem:
                continue
            counts["revision/unchanged"] += rev.text == c.response
            if cfg.critique:
                c.turns += [{"role": "user", "content": pr.critique}, {"role": "assistant", "content": critique_text}]
            c.turns += [{"role": "user", "content": pr.revision}, {"role": "assistant", "content": rev.text}]
            c.response = rev.text


def _round(pr: CritiquePrinciple, critique: str, revision: str, status: str, retries: int, with_critique: bool) -> dict:
    return {
        "principle_id": pr.id,
        "critique_request": pr.critique if with_critique else None,
        "critique": critique if with_critique else None,
        "revision_request": pr.revision,
        "revision": revision,
        "status": status,
        "retries": retries,
    }


def _chunks(items, n):
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _answer_helpful(cfg, backend, params, run_dir: RunDir, counts) -> int:
    prompts = load_prompt_sets(cfg.helpful_prompts, run_dir, split=cfg.split, limit=cfg.helpful_limit)
    p = GenerationParams(**{**params.__dict__, "n": cfg.helpful_samples})
    with RecordShard(run_dir.stage_dir("revise") / "helpful.jsonl") as shard:
        todo = shard.todo([x.to_dict() for x in prompts])
        for chunk in tqdm(list(_chunks(todo, cfg.batch_size)), desc="revise: helpful samples", unit="batch"):
            texts = backend.generate([x["messages"] for x in chunk], p)
            for i, x in enumerate(chunk):
                kept = []
                for text in texts[i * cfg.helpful_samples : (i + 1) * cfg.helpful_samples]:
                    c = clean(text, getattr(text, "truncated", False), kind="response")
                    counts[f"helpful/{c.problem}" if c.problem else "helpful/ok"] += 1
                    if not c.problem:
                        kept.append(c.text)
                shard.append({"id": x["id"], "prompt": x["prompt"], "messages": x["messages"], "category": x.get("category"),
                              "split": x.get("split"), "responses": kept, "model": backend.name})
        return sum(len(r["responses"]) for r in shard.records)


def run(cfg: Config, run_dir: RunDir) -> dict:
    if cfg.rounds < 1 or cfg.helpful_samples < 0 or cfg.retries < 0 or cfg.fewshot_count < 0:
        raise UserError("revise: rounds must be >= 1 and helpful_samples, retries, fewshot_count >= 0")
    t0 = time.time()
    constitution = load_constitution(cfg.constitution)
    examples = load_fewshot(cfg.fewshot, "critique")[: cfg.fewshot_count]
    prompts = load_prompt_sets(cfg.prompts, run_dir, split=cfg.split, limit=cfg.limit)
    opts = dict(dtype=cfg.dtype, batch_size=cfg.batch_size)
    if cfg.system_prompt:
        opts["system_prompt"] = cfg.system_prompt
    backend = load_backend(cfg.model, **opts)
    critic = load_backend(cfg.critique_model, **opts) if cfg.critique_model else backend
    sampling = dict(temperature=cfg.temperature, top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty, seed=cfg.seed)
    params = GenerationParams(max_new_tokens=cfg.max_new_tokens, **sampling)
    crit_params = GenerationParams(max_new_tokens=cfg.critique_max_new_tokens, **sampling)
    prefix = fewshot_messages(examples, cfg.critique)
    counts: Counter = Counter()
    out = run_dir.stage_dir("revise")
    with RecordShard(out / "revisions.jsonl") as shard:
        todo = shard.todo([p.to_dict() for p in prompts])
        done_before = len(shard.records)
        bar = tqdm(total=len(prompts), initial=done_before, desc="revise: critique -> revision", unit="prompt")
        for chunk in _chunks(todo, cfg.batch_size):
            chains = [_Chain(p, principles_for(cfg, p["id"], constitution), prefix) for p in chunk]
            _revise_batch(cfg, chains, backend, critic, params, crit_params, counts)
            for c in chains:
                shard.append(_record(c, backend.name, critic.name if cfg.critique else None))
            bar.update(len(chunk))
        bar.close()
        records = shard.records
    seconds = time.time() - t0
    helpful = _answer_helpful(cfg, backend, params, run_dir, counts) if cfg.helpful_prompts and cfg.helpful_samples else 0
    summary = _summary(records, helpful, counts, seconds, len(todo))
    summary["seconds"] = round(time.time() - t0, 1)
    return summary


def _record(c: _Chain, model: str, critique_model: str | None) -> dict:
    ok = [r for r in c.rounds if r["status"] == "ok"]
    p = c.prompt
    return {
        "id": p["id"], "prompt": p["prompt"], "messages": p["messages"], "category": p.get("category"), "split": p.get("split"),
        "initial_response": c.initial, "rounds": c.rounds, "final_response": ok[-1]["revision"] if ok else c.initial,
        "usable": bool(ok), "model": model, "critique_model": critique_model,
    }


def _summary(records: list[dict], helpful: int, counts: Counter, seconds: float, processed: int) -> dict:
    rounds = [r for rec in records for r in rec["rounds"]]
    status = Counter(r["status"] for r in rounds)
    mean = lambda xs: round(sum(xs) / len(xs), 1) if xs else None  # noqa: E731
    return {
        "prompts": len(records),
        "processed_now": processed,
        "usable": sum(r["usable"] for r in records),
        "rounds": len(rounds),
        "rounds_ok": status.get("ok", 0),
        "rounds_dropped": {k.split(":", 1)[1]: v for k, v in sorted(status.items()) if k != "ok"},
        "principles_used": dict(Counter(r["principle_id"] for r in rounds).most_common()),
        "helpful_responses": helpful,
        "words_initial": mean([len(words(r["initial_response"])) for r in records]),
        "words_final": mean([len(words(r["final_response"])) for r in records if r["usable"]]),
        "words_critique": mean([len(words(r["critique"])) for r in rounds if r["critique"]]),
        "cleaning": {k: counts[k] for k in sorted(counts)},
        "seconds_revise": round(seconds, 1),
        "seconds_per_prompt": round(seconds / processed, 2) if processed else None,
    }
