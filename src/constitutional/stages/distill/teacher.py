"""The teacher of context distillation: the model with the context C (`PromptedBackend`). Its samples
y ~ p0(. | C, x) (`sample_teacher`, stored once in `<run>/distill/teacher.jsonl`), the token layout
of each example for teacher and student (`encode_examples`), and its next-token distributions on
them (`Teacher`: the frozen model, C's KV cache shared by every example; `precompute_topk` for
`top_k > 0`). Steps 1 to 3 of the stage's docstring.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Sequence

from tqdm import tqdm

from ...backends import GenerationParams
from ...backends.base import Request, run_queue
from ...backends.prompted import PromptedBackend
from ...distill_math import topk_targets
from ...errors import UserError
from ...run import RecordShard
from .config import Config


def sample_teacher(teacher, items: Sequence[dict], cfg: Config, shard: RecordShard) -> None:
    """Sample `teacher_samples` responses per item (`{"prompt": loaders.Prompt, "split": "train" or
    "eval"}`) from the prompted model and append them to `shard`; samples already there are skipped."""
    params = GenerationParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, n=cfg.teacher_samples, seed=cfg.seed)
    todo = [it for it in items if any(f"{it['prompt'].id}#{j}" not in shard.done for j in range(cfg.teacher_samples))]
    bar = tqdm(total=len(todo), desc="distill: teacher samples", unit="prompt", file=sys.stderr)

    def sampled(req: Request, texts: list) -> None:
        it = req.key
        p = it["prompt"]
        for j, text in enumerate(texts):
            if f"{p.id}#{j}" not in shard.done:
                shard.append({
                    "id": f"{p.id}#{j}", "prompt_id": p.id, "split": it["split"], "prompt": p.prompt, "messages": p.messages,
                    "response": str(text), "truncated": bool(getattr(text, "truncated", False)),
                })
        bar.update(1)

    with bar:
        run_queue(teacher, [Request(it["prompt"].messages, params, key=it) for it in todo], sampled)


@dataclass
class Example:
    """One teacher sample as token ids. `*_ids` = prompt ids + the shared response ids; `*_start` =
    where the response begins (the loss covers `ids[start:]`)."""

    id: str
    split: str
    teacher_ids: list[int]
    teacher_start: int
    student_ids: list[int]
    student_start: int

    @property
    def response_len(self) -> int:
        return len(self.student_ids) - self.student_start


def response_ids(backend, messages: list[dict], response: str, ended: bool) -> list[int]:
    """The response's token ids as the chat template writes an assistant turn, plus the template's
    end-of-turn token when the sample ended by itself (not cut by max_new_tokens)."""
    tok = backend.tokenizer
    ids = tok(response, add_special_tokens=False)["input_ids"]
    if ended:
        prompt = backend.render_chat(messages)
        full = backend.render_chat(messages + [{"role": "assistant", "content": response}], add_generation_prompt=False)
        tail = full[len(prompt) + len(response):] if full.startswith(prompt + response) else ""
        tail_ids = tok(tail, add_special_tokens=False)["input_ids"]
        stop = next((i for i, t in enumerate(tail_ids) if t in backend.eos_ids), None)
        if stop is not None:
            ids += tail_ids[: stop + 1]
        elif tok.eos_token_id is not None:  # no chat template (transcript form): the tokenizer's eos
            ids.append(tok.eos_token_id)
    return ids


def encode_examples(backend, teacher: PromptedBackend, records: Sequence[dict]) -> list[Example]:
    """Token ids for each teacher sample: the student's input never contains C (plain rendering)."""
    tok, out = backend.tokenizer, []
    for r in records:
        y = response_ids(backend, r["messages"], r["response"], not r["truncated"])
        if not y:
            continue
        s = tok(backend.render_chat(r["messages"]), add_special_tokens=False)["input_ids"]
        t = tok(teacher.render_chat(r["messages"]), add_special_tokens=False)["input_ids"]
        if len(t) + len(y) > backend.max_positions:
            raise UserError(
                f"distill: prompt {r['prompt_id']!r} with the context and its response is {len(t) + len(y)} tokens, more than "
                f"the {backend.max_positions} of {backend.name}; use a shorter context, shorter prompts or a smaller max_new_tokens"
            )
        out.append(Example(r["id"], r["split"], t + y, len(t), s + y, len(s)))
    return out


def response_logits(model, seqs: Sequence[Sequence[int]], starts: Sequence[int], pad_id: int, cache=None, prefix_len: int = 0):
    """Logits predicting each response token: row b's response is `seqs[b][starts[b]:]`.

    seqs: B token-id lists, following `prefix_len` tokens held in `cache` (a KV cache for a batch
    of B, or None); starts[b] >= 1. Right padding; logits are kept only from the first position
    that predicts a response token. Returns (logits (B, R, V), mask (B, R) bool), R = the longest
    response; row b's entries past its response are padding (mask False).
    """
    import torch

    dev = next(model.parameters()).device
    B, T = len(seqs), max(len(s) for s in seqs)
    R = max(len(s) - st for s, st in zip(seqs, starts))
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, prefix_len + T), dtype=torch.long)
    attn[:, :prefix_len] = 1
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        attn[b, prefix_len : prefix_len + len(s)] = 1
    first = min(starts) - 1
    out = model(
        input_ids=ids.to(dev), attention_mask=attn.to(dev), position_ids=(prefix_len + torch.arange(T)).expand(B, T).to(dev),
        cache=cache, use_cache=False, logits_to_keep=T - first,
    )
    r = torch.arange(R)
    idx = (torch.tensor(starts)[:, None] - 1 - first + r[None, :]).clamp(max=T - first - 1)
    mask = r[None, :] < torch.tensor([len(s) - st for s, st in zip(seqs, starts)])[:, None]
    logits = out.logits.gather(1, idx.to(dev)[:, :, None].expand(B, R, out.logits.shape[-1]))
    return logits, mask.to(dev)


class Teacher:
    """p0(· | C, x, y<t) from the frozen model; the prefix shared by all teacher inputs (C) is
    encoded once and its KV cache reused by every batch."""

    def __init__(self, model, examples: Sequence[Example], pad_id: int):
        import torch

        from ...backends.hf_cache import lcp

        self.model, self.pad_id = model, pad_id
        prompts = [e.teacher_ids[: e.teacher_start] for e in examples]
        self.prefix = list(prompts[0][: min(lcp(prompts), min(len(p) for p in prompts) - 1)])
        self.cache = None
        if self.prefix:
            with torch.no_grad():
                dev = next(model.parameters()).device
                self.cache = model(input_ids=torch.tensor([self.prefix], device=dev), use_cache=True, logits_to_keep=1).cache

    def logits(self, batch: Sequence[Example]):
        """(logits (B, R, V), mask (B, R)) of the teacher on the batch's response tokens."""
        import torch

        P = len(self.prefix)
        cache = None
        if self.cache is not None:
            cache = copy.deepcopy(self.cache)  # the forward appends to the cache it is given
            cache.batch_repeat_interleave(len(batch))
        with torch.no_grad():
            return response_logits(self.model, [e.teacher_ids[P:] for e in batch], [e.teacher_start - P for e in batch], self.pad_id, cache, P)


def precompute_topk(teacher: Teacher, examples: Sequence[Example], k: int, batch_size: int) -> dict[str, tuple]:
    """The teacher's top-k targets ((T_i, k) log-probs, (T_i, k) ids, (T_i,) rest) per example id."""
    import torch

    out = {}
    chunks = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    for chunk in tqdm(chunks, desc="distill: teacher top-k", unit="batch", file=sys.stderr):
        logits, _ = teacher.logits(chunk)
        values, indices, rest = topk_targets(logits, k)
        for b, e in enumerate(chunk):
            n = e.response_len
            out[e.id] = (values[b, :n].cpu(), indices[b, :n].to(torch.int32).cpu(), rest[b, :n].cpu())
    return out
