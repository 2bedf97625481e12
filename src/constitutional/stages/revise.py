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
first, so the backend encodes it once per batch and reuses its KV cache; with `fewshot_match` each
prompt gets the examples whose topics best match its first principle (a few distinct blocks, each
still cached once). The initial response is
generated from the prompt alone, as the model answers users (no few-shot, no constitution).

Departures (off by default, levers for small models): `revision_samples: n` samples n revisions
per request and keeps the usable one that `selector.py`'s harmlessness guideline makes most likely
(best-of-n; the paper keeps its single sample); `cut_truncated` cuts a text that hit
`max_new_tokens` after its last sentence instead of dropping it; `revision_temperature` samples the
revisions at their own temperature. Every summary has `quality` (`revision_quality.py`).

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
from dataclasses import dataclass, replace

from tqdm import tqdm

from ..backends import GenerationParams, load_backend
from ..backends.base import Request, generation_meter, run_queues
from .. import revision_quality, selector
from ..cleaning import Cleaned, clean, cut_to_sentence, words
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
    batch_size: int = opt(64, "most sequences decoded together (the backend's token budget may allow fewer)")
    prompts: str = opt("builtin:redteam", "red-team prompts; join several sets with '+', run:redteam = this run's generated prompts")
    split: str = opt("train", "which split of the prompts to use: train, test or all (keep test for evaluation)")
    limit: int = opt(0, "red-team prompts per prompt set (0 = all)")
    helpful_prompts: str = opt("builtin:helpful", "helpful prompts answered for the SFT mixture ('' = none)")
    helpful_limit: int = opt(0, "helpful prompts per prompt set (0 = all in the split)")
    helpful_samples: int = opt(2, "samples per helpful prompt (paper: 2)")
    rounds: int = opt(4, "critique/revision rounds per prompt (paper: 4)")
    critique: bool = opt(True, "false = revision without critique (the paper's ablation)")
    constitution: str = opt("default", "constitution: default or a YAML/JSON file")
    fewshot: str = opt("default", "few-shot critique/revision examples: default or a YAML/JSON file")
    fewshot_count: int = opt(3, "few-shot examples placed before each dialogue (0 = none)")
    fewshot_match: bool = opt(False, "per prompt, the few-shot examples whose topics best match its first round's principle (false = the file's first fewshot_count)")
    temperature: float = opt(1.0, "sampling temperature (paper: 1; 0 = greedy)")
    revision_temperature: float = opt(-1.0, "sampling temperature of the revisions alone (-1 = temperature; 0 = greedy revisions of sampled answers)")
    top_p: float = opt(1.0, "nucleus sampling mass")
    repetition_penalty: float = opt(1.0, "penalty on tokens a sample already generated (1 = none, the paper's setting)")
    max_new_tokens: int = opt(128, "tokens per response or revision")
    critique_max_new_tokens: int = opt(96, "tokens per critique")
    cut_truncated: bool = opt(False, "a response or revision that hits max_new_tokens is cut after its last complete sentence (12+ words) instead of dropped")
    retries: int = opt(2, "resamples of a critique or revision that fails cleaning before the round is dropped")
    revision_samples: int = opt(1, "candidates per revision; above 1 the usable one a harmlessness guideline makes most likely is kept (best-of-n, constitutional/selector.py)")
    system_prompt: str = opt("", "system prompt for the model ('' = the chat template's own default)")
    seed: int = opt(0, "random seed (principle draws and sampling)")


def principles_for(cfg: Config, prompt_id: str, constitution) -> list[CritiquePrinciple]:
    """The principle of each round for one prompt: seeded by (seed, prompt id), so independent of
    batching and of resumes."""
    rng = random.Random(f"{cfg.seed}:{prompt_id}")
    return [constitution.sample_critique(rng) for _ in range(cfg.rounds)]


def match_fewshot(examples: list, principle: CritiquePrinciple, count: int) -> list:
    """The `count` examples sharing the most topics with `principle` (ties: file order); raw text
    blocks have no topics and come last."""
    def overlap(e) -> int:
        return len(set(e.get("topics") or ()) & set(principle.topics)) if isinstance(e, dict) else -1

    ranked = sorted(range(len(examples)), key=lambda i: (-overlap(examples[i]), i))
    return [examples[i] for i in sorted(ranked[:count])]  # in file order, as without matching


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

    def __init__(self, prompt: dict, principles: list[CritiquePrinciple], prefix: list[dict], fewshot: str = ""):
        self.prompt = prompt
        self.principles = principles
        self.prefix = prefix  # few-shot turns
        self.fewshot = fewshot  # their texts, which a critique or revision must not copy
        self.turns: list[dict] = []  # the prompt's own turns after the few-shot block
        self.initial = ""  # the model's own first answer
        self.response = ""  # the last good response (initial, then each good revision)
        self.rounds: list[dict] = []
        self.critique: Cleaned | None = None  # this round's critique, once it is in
        self.critique_retries = 0

    def messages(self, *extra: dict) -> list[dict]:
        return self.prefix + self.turns + list(extra)


class _Driver:
    """Runs every chain as a sequence of requests in one generation queue (`backends.run_queues`):
    initial answer, then per round a critique and a revision, each resampled up to `retries` times
    when it fails cleaning. A finished request immediately submits the chain's next one, so the
    backend's running batch stays full; a finished chain is written out at once (resumable)."""

    def __init__(self, cfg, backend, critic, params, crit_params, counts, on_chain):
        self.cfg, self.backend, self.critic = cfg, backend, critic
        self.params, self.crit_params, self.counts, self.on_chain = params, crit_params, counts, on_chain

    # each request's seed is a function of (seed, round, attempt) only: the same samples whatever the
    # batching, the order chains finish in, or a resume
    def _seed(self, r: int, revision: bool, attempt: int) -> int:
        return self.cfg.seed * 1_000_003 + 101 * r + int(revision) + 7919 * attempt

    def initial(self, c: _Chain) -> tuple:
        return self.backend, Request(c.prompt["messages"], self.params, key=(c, "initial", 0, 0))

    def _critique(self, c: _Chain, r: int, attempt: int) -> tuple:
        conv = c.messages({"role": "user", "content": c.principles[r].critique})
        params = replace(self.crit_params, seed=self._seed(r, False, attempt))
        return self.critic, Request(conv, params, key=(c, "critique", r, attempt))

    def _revision(self, c: _Chain, r: int, attempt: int) -> tuple:
        pr = c.principles[r]
        extra = [{"role": "user", "content": pr.critique}, {"role": "assistant", "content": c.critique.text}] if self.cfg.critique else []
        temperature = self.cfg.revision_temperature if self.cfg.revision_temperature >= 0 else self.params.temperature
        params = replace(self.params, seed=self._seed(r, True, attempt), temperature=temperature, n=self.cfg.revision_samples)
        return self.backend, Request(c.messages(*extra, {"role": "user", "content": pr.revision}), params, key=(c, "revision", r, attempt))

    def _round_start(self, c: _Chain, r: int) -> list:
        if r >= self.cfg.rounds:
            self.on_chain(c)
            return []
        c.critique, c.critique_retries = None, 0
        return [self._critique(c, r, 0) if self.cfg.critique else self._revision(c, r, 0)]

    def _clean(self, text, kind: str, **checks) -> Cleaned:
        truncated = bool(getattr(text, "truncated", False))
        cl = clean(text, truncated, kind=kind, cut_truncated=self.cfg.cut_truncated, **checks)
        if kind == "critique":  # a truncated critique is kept (cleaning.py); count how often
            self.counts["critique/truncated_kept"] += truncated and cl.problem is None
        for rep in cl.repairs:
            self.counts[f"{kind}/{rep}"] += 1
        if cl.problem:
            self.counts[f"{kind}/{cl.problem}"] += 1
        return cl

    def _best(self, c: _Chain, r: int, texts: list, critique_text: str) -> Cleaned:
        """The revision kept of this attempt's candidates: the only one, or among the usable ones
        the selector's best (the first candidate's problem when none is usable)."""
        pr = c.principles[r]
        cleaned = [self._clean(t, "revision", requests=(pr.critique, pr.revision), critique=critique_text, prompt=c.prompt["prompt"],
                               fewshot=c.fewshot) for t in texts]
        usable = [x for x in cleaned if not x.problem]
        if len(usable) <= 1:
            return usable[0] if usable else cleaned[0]
        scores = selector.pmi_scores(self.backend, c.prompt["messages"], [x.text for x in usable])
        self.counts["revision/selected_from"] += len(usable)
        return usable[selector.pick(scores)]

    def on_done(self, req: Request, texts: list) -> list:
        c, phase, r, attempt = req.key
        text = texts[0]
        if phase == "initial":
            truncated = bool(getattr(text, "truncated", False))
            self.counts["initial/truncated"] += truncated
            c.response = c.initial = ((cut_to_sentence(str(text).strip()) if truncated and self.cfg.cut_truncated else None)
                                      or str(text).strip())
            c.turns = [*c.prompt["messages"], {"role": "assistant", "content": c.response}]
            return self._round_start(c, 0)
        pr = c.principles[r]
        if phase == "critique":
            cl = self._clean(text, "critique", requests=(pr.critique, pr.revision), prompt="", fewshot=c.fewshot)
            if cl.problem and attempt < self.cfg.retries:
                self.counts["critique/retries"] += 1
                return [self._critique(c, r, attempt + 1)]
            c.critique, c.critique_retries = cl, attempt
            if cl.problem:
                c.rounds.append(_round(pr, cl.text, "", f"dropped:critique_{cl.problem}", attempt, True))
                return self._round_start(c, r + 1)
            return [self._revision(c, r, 0)]
        critique_text = c.critique.text if self.cfg.critique else ""
        cl = self._best(c, r, texts, critique_text)
        if cl.problem and attempt < self.cfg.retries:
            self.counts["revision/retries"] += 1
            return [self._revision(c, r, attempt + 1)]
        c.rounds.append(_round(pr, critique_text, cl.text, f"dropped:{cl.problem}" if cl.problem else "ok", attempt + c.critique_retries, self.cfg.critique))
        if not cl.problem:
            self.counts["revision/unchanged"] += cl.text == c.response
            if self.cfg.critique:
                c.turns += [{"role": "user", "content": pr.critique}, {"role": "assistant", "content": critique_text}]
            c.turns += [{"role": "user", "content": pr.revision}, {"role": "assistant", "content": cl.text}]
            c.response = cl.text
        return self._round_start(c, r + 1)


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


def _helpful_requests(cfg, backend, params, shard: RecordShard, prompts, counts, bar) -> list:
    """Helpful prompts answered `helpful_samples` times each into `helpful.jsonl` (the SFT mixture), as
    requests in the same queue as the chains."""
    p = replace(params, n=cfg.helpful_samples)

    def on_done(req: Request, texts: list) -> None:
        x, kept = req.key[1], []
        for text in texts:
            cl = clean(text, getattr(text, "truncated", False), kind="response", cut_truncated=cfg.cut_truncated)
            counts[f"helpful/{cl.problem}" if cl.problem else "helpful/ok"] += 1
            if not cl.problem:
                kept.append(cl.text)
        shard.append({"id": x["id"], "prompt": x["prompt"], "messages": x["messages"], "category": x.get("category"),
                      "split": x.get("split"), "responses": kept, "model": backend.name})
        bar.update(1)

    return [(backend, Request(x["messages"], p, key=(on_done, x))) for x in shard.todo([x.to_dict() for x in prompts])]


def run(cfg: Config, run_dir: RunDir) -> dict:
    if cfg.rounds < 1 or cfg.helpful_samples < 0 or cfg.retries < 0 or cfg.fewshot_count < 0:
        raise UserError("revise: rounds must be >= 1 and helpful_samples, retries, fewshot_count >= 0")
    if cfg.revision_samples < 1:
        raise UserError(f"revise.revision_samples = {cfg.revision_samples}: must be >= 1 (1 = no selection)")
    if cfg.revision_temperature < 0 and cfg.revision_temperature != -1:
        raise UserError(f"revise.revision_temperature = {cfg.revision_temperature}: use -1 (the same as temperature), 0 (greedy) or more")
    t0 = time.time()
    constitution = load_constitution(cfg.constitution)
    all_examples = load_fewshot(cfg.fewshot, "critique")
    examples = all_examples[: cfg.fewshot_count]
    prompts = load_prompt_sets(cfg.prompts, run_dir, split=cfg.split, limit=cfg.limit)
    helpful = load_prompt_sets(cfg.helpful_prompts, run_dir, split=cfg.split, limit=cfg.helpful_limit) if cfg.helpful_prompts and cfg.helpful_samples else []
    opts = dict(dtype=cfg.dtype, max_rows=cfg.batch_size)
    if cfg.system_prompt:
        opts["system_prompt"] = cfg.system_prompt
    backend = load_backend(cfg.model, **opts)
    critic = load_backend(cfg.critique_model, **opts) if cfg.critique_model else backend
    sampling = dict(temperature=cfg.temperature, top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty, seed=cfg.seed)
    params = GenerationParams(max_new_tokens=cfg.max_new_tokens, **sampling)
    crit_params = GenerationParams(max_new_tokens=cfg.critique_max_new_tokens, **sampling)
    blocks: dict[tuple, tuple[list[dict], str]] = {}  # the few-shot examples' ids -> (turns, texts)

    def fewshot_for(principles: list[CritiquePrinciple]) -> tuple[list[dict], str]:
        chosen = match_fewshot(all_examples, principles[0], cfg.fewshot_count) if cfg.fewshot_match else examples
        key = tuple(id(e) for e in chosen)
        if key not in blocks:
            blocks[key] = (fewshot_messages(chosen, cfg.critique), revision_quality.fewshot_text(chosen))
        return blocks[key]

    counts: Counter = Counter()
    out = run_dir.stage_dir("revise")
    with RecordShard(out / "revisions.jsonl") as shard, RecordShard(out / "helpful.jsonl") as helpful_shard:
        todo = shard.todo([p.to_dict() for p in prompts])
        done_before = len(shard.records) + len(helpful_shard.records)
        bar = tqdm(total=len(prompts) + len(helpful), initial=done_before, desc="revise: chains + helpful samples", unit="prompt")

        def on_chain(c: _Chain) -> None:
            shard.append(_record(c, backend.name, critic.name if cfg.critique else None))
            bar.update(1)

        driver = _Driver(cfg, backend, critic, params, crit_params, counts, on_chain)
        chains = [_Chain(p, pr, *fewshot_for(pr)) for p in todo for pr in [principles_for(cfg, p["id"], constitution)]]
        work = [driver.initial(c) for c in chains] + _helpful_requests(cfg, backend, params, helpful_shard, helpful, counts, bar)

        def on_done(req: Request, texts: list):
            if callable(req.key[0]):  # a helpful prompt
                return req.key[0](req, texts)
            return driver.on_done(req, texts)

        gen = generation_meter(backend, critic)
        with bar:
            run_queues(work, on_done)
        records, helpful_records = shard.records, helpful_shard.records
    seconds = time.time() - t0
    summary = _summary(records, sum(len(r["responses"]) for r in helpful_records), counts, seconds, len(todo))
    shown = all_examples if cfg.fewshot_match else examples  # what a revision may have copied
    summary["quality"] = revision_quality.summarise(records, revision_quality.fewshot_text(shown))
    summary.update(gen())
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
        "seconds": round(seconds, 1),
        "seconds_per_prompt": round(seconds / processed, 2) if processed else None,
    }
