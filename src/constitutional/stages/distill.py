"""`cai distill`: context distillation: fine-tune the model without the context C to act as if C were there.

Seeds: "Dialogue prompting versus Fine-Tuning on Instructions/Context" and "Context distillation";
paper: Askell et al. 2021 (arXiv 2112.00861), context distillation (p. 10) and Figure 2 (p. 5: no
intervention vs prompted vs context distilled on HHH evaluations). The teacher is the model with C (`backends.prompted.PromptedBackend`), p0(y | C, x); the student starts
as the same model and sees the prompt x only. The loss is the token-level KL over the full
vocabulary, teacher first, on the response tokens only (prompt and padding masked):

    L(θ) = mean over response tokens t of KL( p0(· | C, x, y<t) ‖ pθ(· | x, y<t) )

1. Teacher samples y ~ p0(· | C, x) (`teacher_samples` per prompt, `temperature`) for the training
   prompts and for held-out prompts, generated once and stored in `<run>/distill/teacher.jsonl`
   (`id, prompt_id, split: train|eval, prompt, messages, response, truncated`); a rerun resumes.
2. Tokens: the student's input is the plain model's chat rendering of x (with the template's
   default system prompt, as the `hf` backend serves every model, and so the distilled model);
   the teacher's is the prompted model's (C's instructions as the system message, its examples as
   earlier turns; see context.py). Both are followed by the same response tokens: the response as
   the chat template writes it, plus the end-of-turn token when the sample ended by itself (so the
   student also learns when to stop).
3. Teacher log-probs come from the frozen model. C is shared by every example, so its tokens (the
   longest prefix shared by all teacher inputs) are encoded once and their KV cache is reused by
   every batch: the teacher forward runs on x and y only. Measured on the tiny test Llama (2 layers,
   width 32) with the built-in C, which is 4,582 tokens in its 400-token vocabulary, batches of 4
   examples of ~50 own tokens, float32, one thread: 0.029 s per batch with the cache (copying it
   included) vs 1.91 s encoding C every time (66x; identical logits to 2e-7). With SmolLM2's
   tokenizer C is ~1,450 tokens against ~100-200 of prompt and response, so expect a smaller
   factor, roughly the ratio of the token counts; not measured on the 135M model.
4. Training: our own loop (AdamW, linear decay, gradient clipping at 1), full fine-tuning or LoRA
   (peft, merged at save); float32 master weights, bf16 autocast where the hardware has it. A
   checkpoint (trainable weights, optimizer, loss curve) every `save_steps` and at the end, under
   `checkpoints/`; a rerun resumes from the newest one. The data order per epoch is a function of
   (seed, epoch), so a resumed run trains on the same batches as an uninterrupted one.
5. `top_k > 0`: the teacher's top-k log-probs per response token (and the log of the mass of all
   other tokens) are computed once before training, N x T x (2k + 1) numbers, instead of a teacher
   forward over the full vocabulary at every step. The loss is then the KL between teacher and
   student coarsened to k + 1 categories: the teacher's top-k tokens and one bucket for all other
   tokens, holding the remaining mass of each distribution. That is a true KL (at most the full one, by the data-processing inequality; equal
   at k = vocabulary size) and it still penalises the student for mass outside the teacher's top-k,
   which renormalising both over the top-k would ignore. The teacher's weights stay loaded for the
   held-out KL, which is always over the full vocabulary.

Measurements (`eval.json`, the summary): on held-out prompts (the test split of `eval_prompts`),
the per-token KL(p0(·|C) ‖ p) before and after training and the fraction of the gap closed
(1 - after/before); the prompt tokens saved per request (the teacher's input minus the student's:
C's tokens, less the default system prompt C replaces); multiple-choice accuracy (`mc`) of the plain,
prompted and distilled models (the paper's three bars). `loss.json`: the training loss per step,
also sent to TensorBoard (`logs/`) and/or W&B with `report_to` (transformers' callbacks, training.py).
`model/`: the distilled model (safetensors, tokenizer, README.md card), written atomically.

Run: `cai distill --run-dir runs/x` (`--set context=my_context.yaml --set lora=true`).

Departures: the paper distilled on pretraining-style text with a 52B model; we distill on the
teacher's own samples to chat prompts (ARCHITECTURE.md "Training"). The teacher is the `hf` backend's
copy of the model (in the backend's dtype: bf16 where the hardware has it) held beside the student,
so training holds two copies of the weights. Single process only.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

from tqdm import tqdm

from ..backends import GenerationParams, load_backend
from ..backends.base import Request, run_queue
from ..config import opt, to_dict
from ..backends.prompted import PromptedBackend
from ..context import load_context
from ..data.loaders import load_mc
from ..errors import UserError
from ..run import RecordShard, RunDir, atomic_write_json, atomic_write_text, now
from . import load_prompt_sets
from ..training import LoopLogger, checkpointing_setting, lora_config, plan_step, report_targets, save_model, speed, tracking, training_dtype


@dataclass
class Config:
    model: str = opt("embedded", "the model: the teacher is it with the context C, the student starts as it without C (embedded, a local model directory or a hub id)")
    context: str = opt("builtin", "the context C: builtin (the HHH context) or a .yaml/.json/.txt file")
    prompts: str = opt("builtin:helpful+builtin:redteam", "prompt sets the teacher answers for training, joined by '+'")
    split: str = opt("train", "which split of `prompts` to train on: train, test or all")
    limit: int = opt(0, "training prompts per prompt set (0 = all)")
    eval_prompts: str = opt("", "held-out prompt sets, their test split ('' = the `prompts` sets); prompts trained on are left out")
    eval_limit: int = opt(16, "held-out prompts per prompt set (0 = all)")
    teacher_samples: int = opt(1, "teacher samples y ~ p0(.|C, x) per prompt")
    temperature: float = opt(1.0, "teacher sampling temperature (1 = samples from p0 itself, 0 = greedy)")
    max_new_tokens: int = opt(96, "tokens per teacher sample")
    epochs: float = opt(1.0, "passes over the teacher samples (ignored when max_steps > 0)")
    max_steps: int = opt(0, "optimizer steps (0 = use epochs)")
    learning_rate: float = opt(2e-5, "peak learning rate, linear decay to 0 (LoRA usually wants ~10x more)")
    batch_size: int = opt(4, "examples per optimizer step; also the generation and scoring batch")
    top_k: int = opt(0, "0 = KL over the full vocabulary; k > 0 = over the teacher's top-k tokens plus one bucket for the rest, precomputed once")
    lora: bool = opt(False, "train a LoRA adapter (merged into the weights at the end) instead of all weights")
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA scale numerator (scale = alpha / r)")
    dtype: str = opt("auto", "auto (bf16 where the hardware has it, else float32), bfloat16 or float32")
    gradient_checkpointing: str = opt("auto", "recompute the student's activations in the backward pass (less memory, slower): auto (only when a batch would not fit in memory), on or off")
    group_by_length: bool = opt(True, "batch teacher samples of similar length together (less padding; batches still in random order)")
    memory_mb: int = opt(0, "memory this process may use, MB: a batch is split into micro-batches (same steps and gradients), then checkpointed, until a step fits (0 = the machine's free memory)")
    save_steps: int = opt(50, "steps between checkpoints (a rerun resumes from the newest)")
    mc: str = opt("builtin:mc", "multiple-choice set for the plain / prompted / distilled accuracies ('' = skip)")
    mc_limit: int = opt(0, "multiple-choice items to score (0 = all)")
    report_to: str = opt("none", "experiment tracking: none, tensorboard (<run>/distill/logs), wandb or tensorboard,wandb")
    seed: int = opt(0, "random seed (teacher samples, data order)")


from ..distill_math import kl_per_token, token_kl, topk_targets, topk_token_kl


# ----------------------------------------------------------------------------------- teacher samples


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


# -------------------------------------------------------------------------------------------- tokens


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

        from ..backends.hf_cache import lcp

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


def student_logits(student, batch: Sequence[Example], pad_id: int, bf16: bool):
    """(logits (B, R, V), mask (B, R)) of the student (input without C) on the response tokens."""
    import torch

    dev = next(student.parameters()).device
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        return response_logits(student, [e.student_ids for e in batch], [e.student_start for e in batch], pad_id)


def _pad_targets(targets: Sequence[tuple], R: int):
    """Stack per-example top-k targets ((T_i, k) log-probs, (T_i, k) ids, (T_i,) rest) into
    (B, R, k), (B, R, k) and (B, R) tensors (padding: zeros, masked out by the loss)."""
    import torch

    k = targets[0][0].shape[-1]
    lp, ix, rest = torch.zeros((len(targets), R, k)), torch.zeros((len(targets), R, k), dtype=torch.long), torch.zeros((len(targets), R))
    for b, (v, i, r) in enumerate(targets):
        lp[b, : len(v)], ix[b, : len(i)], rest[b, : len(r)] = v, i, r
    return lp, ix, rest


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


def batch_loss(student, teacher: Teacher, batch: Sequence[Example], pad_id: int, bf16: bool, targets: dict | None = None):
    """The distillation loss of one batch (scalar; full-vocabulary KL, or top-k when `targets`)."""
    s_logits, mask = student_logits(student, batch, pad_id, bf16)
    if targets is None:
        t_logits, _ = teacher.logits(batch)
        return token_kl(t_logits, s_logits, mask)
    lp, ix, rest = (t.to(s_logits.device) for t in _pad_targets([targets[e.id] for e in batch], s_logits.shape[1]))
    return topk_token_kl(lp, ix, rest, s_logits, mask)


def heldout_kl(student, teacher: Teacher, examples: Sequence[Example], pad_id: int, bf16: bool, batch_size: int, desc: str) -> dict:
    """Per-token full-vocabulary KL(p0(·|C, x, y<t) ‖ p(·|x, y<t)) over all response tokens of `examples`."""
    import torch

    total, tokens = 0.0, 0
    was_training = student.training
    student.eval()
    chunks = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    with torch.no_grad():
        for chunk in tqdm(chunks, desc=f"distill: held-out KL {desc}", unit="batch", file=sys.stderr):
            s_logits, mask = student_logits(student, chunk, pad_id, bf16)
            t_logits, _ = teacher.logits(chunk)
            kl = kl_per_token(t_logits, s_logits)
            total += float(torch.where(mask, kl, torch.zeros_like(kl)).sum())
            tokens += int(mask.sum())
    student.train(was_training)
    return {"kl_per_token": total / max(1, tokens), "tokens": tokens, "examples": len(examples)}


# ------------------------------------------------------------------------------------------ training


def _checkpoints(directory: Path) -> list[tuple[int, Path]]:
    out = []
    for d in directory.glob("step-*"):
        try:
            out.append((int(d.name.split("-", 1)[1]), d))
        except ValueError:
            continue
    return sorted(out)


def save_checkpoint(directory: Path, step: int, student, optimizer, state: dict) -> None:
    """Trainable weights, optimizer and `state` into `directory/step-<step>` (temp dir + rename);
    older checkpoints are removed afterwards."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save({n: p.detach().cpu() for n, p in student.named_parameters() if p.requires_grad}, tmp / "trainable.pt")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    atomic_write_json(tmp / "state.json", {**state, "step": step})
    target = directory / f"step-{step}"
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    for s, d in _checkpoints(directory):
        if s != step:
            shutil.rmtree(d, ignore_errors=True)


def load_checkpoint(directory: Path, fingerprint: str, student, optimizer) -> dict | None:
    """Restore the newest checkpoint made for these examples (`fingerprint`); its state, or None."""
    import torch

    for _, d in reversed(_checkpoints(directory)):
        try:
            state = json.loads((d / "state.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if state.get("fingerprint") != fingerprint:
            return None
        student.load_state_dict(torch.load(d / "trainable.pt", weights_only=True), strict=False)
        optimizer.load_state_dict(torch.load(d / "optimizer.pt", weights_only=True))
        return state
    return None


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a function of (seed, epoch) only, so resume replays it."""
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


GROUP = 16  # batches per length-sorted group


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group: bool) -> list[list[int]]:
    """The batches (example indices) of one epoch, a function of (seed, epoch) only (resume replays it).

    Without `group`: `epoch_order` cut into batches. With it: that order is cut into groups of
    GROUP batches, each group sorted by length (longest first) and cut into batches, and the batches
    are shuffled: a batch's examples have similar lengths, so it carries little padding, while the
    batches still come in random order (transformers' LengthGroupedSampler does the same).
    """
    order = epoch_order(len(lengths), seed, epoch)
    if not group:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    span = GROUP * batch_size
    batches = []
    for g in range(0, len(order), span):
        ranked = sorted(order[g : g + span], key=lambda i: -lengths[i])
        batches += [ranked[i : i + batch_size] for i in range(0, len(ranked), batch_size)]
    random.Random(f"{seed}:{epoch}:batches").shuffle(batches)
    return batches


def train_step(student, optimizer, teacher: Teacher, batch, pad_id: int, bf16: bool, lr: float, targets: dict | None,
               micro_batches: int = 1) -> float:
    """One optimizer step on `batch`; returns the loss. The batch's gradient is accumulated over
    `micro_batches` parts, each part's mean KL weighted by its share of the batch's response
    tokens, so it is the gradient of the batch's token mean (less activation memory at once)."""
    import torch

    for g in optimizer.param_groups:
        g["lr"] = lr
    total, size, loss = sum(e.response_len for e in batch), math.ceil(len(batch) / micro_batches), 0.0
    for i in range(0, len(batch), size):
        part = batch[i : i + size]
        part_loss = batch_loss(student, teacher, part, pad_id, bf16, targets) * (sum(e.response_len for e in part) / total)
        part_loss.backward()
        loss += float(part_loss.detach())
    torch.nn.utils.clip_grad_norm_([p for p in student.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def train(cfg: Config, student, teacher: Teacher, examples: list[Example], pad_id: int, bf16: bool, ckpt_dir: Path, fingerprint: str,
          micro_batches: int = 1) -> dict:
    """The training loop with checkpoints and resume. Returns {steps, resumed_from_step, curve,
    seconds, tokens: the student tokens trained on in this run}."""
    import torch

    per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * per_epoch))
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.learning_rate)
    state = load_checkpoint(ckpt_dir, fingerprint, student, optimizer) or {"step": 0, "curve": []}
    start, curve = state["step"], state["curve"]
    if start:
        print(f"[distill] resuming from step {start}", file=sys.stderr)
    targets = precompute_topk(teacher, examples, cfg.top_k, cfg.batch_size) if cfg.top_k and start < total else None
    student.train()
    t0, tokens = time.time(), 0
    lengths = [len(e.student_ids) for e in examples]
    bar = tqdm(range(start, total), desc="distill: training", unit="step", file=sys.stderr, initial=start, total=total)
    with tracking(cfg.report_to, ckpt_dir.parent, "distill.report_to") as trackers:
        logger = LoopLogger(trackers, ckpt_dir.parent, student)  # the trainers' TensorBoard / W&B callbacks
        for step in bar:
            epoch, k = divmod(step, per_epoch)
            batch = [examples[i] for i in epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length)[k]]
            tokens += sum(len(e.student_ids) for e in batch)
            lr = cfg.learning_rate * (1 - step / total)
            torch.manual_seed(cfg.seed + step)  # dropout, if the model has any, replays on resume
            loss = train_step(student, optimizer, teacher, batch, pad_id, bf16, lr, targets, micro_batches)
            curve.append({"step": step + 1, "loss": loss, "learning_rate": lr, "epoch": round((step + 1) / per_epoch, 4)})
            logger.log(step + 1, {key: v for key, v in curve[-1].items() if key != "step"})
            bar.set_postfix(loss=f"{loss:.4f}")
            if (step + 1) % cfg.save_steps == 0 or step + 1 == total:
                save_checkpoint(ckpt_dir, step + 1, student, optimizer, {"curve": curve, "fingerprint": fingerprint})
        logger.close()
    return {"steps": total, "resumed_from_step": start, "curve": curve, "seconds": time.time() - t0, "tokens": tokens}


# ------------------------------------------------------------------------------------------ the stage


def _check(cfg: Config) -> None:
    for name in ("batch_size", "save_steps", "lora_r", "lora_alpha", "teacher_samples", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise UserError(f"distill.{name} {getattr(cfg, name)}: must be >= 1")
    for name in ("limit", "eval_limit", "mc_limit", "top_k", "max_steps"):
        if getattr(cfg, name) < 0:
            raise UserError(f"distill.{name} {getattr(cfg, name)}: must be >= 0")
    if cfg.max_steps == 0 and cfg.epochs <= 0:
        raise UserError("distill: set max_steps > 0 or epochs > 0")
    if cfg.learning_rate <= 0 or cfg.temperature < 0:
        raise UserError(f"distill: learning_rate must be > 0 and temperature >= 0 (got {cfg.learning_rate}, {cfg.temperature})")
    if cfg.dtype not in ("auto", "bfloat16", "float32"):
        raise UserError(f"distill.dtype {cfg.dtype!r}: use auto, bfloat16 or float32")
    report_targets(cfg.report_to, "distill.report_to")
    checkpointing_setting(cfg.gradient_checkpointing, "distill.gradient_checkpointing")
    if cfg.model.strip().startswith(("prompted:", "openai:")):
        raise UserError(f"distill.model {cfg.model!r}: give the plain model (embedded, a local model directory or a hub id); "
                        "the teacher is it with distill.context, and the student is trained from its weights")


def load_student(cfg: Config, path: str, device):
    """The student: the model's weights in float32 (optionally wrapped with a LoRA adapter)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).to(device)
    if cfg.lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(cfg.lora_r, cfg.lora_alpha))
    return model


def mc_accuracy(backend, items, batch_size: int, desc: str) -> dict:
    """Multiple-choice accuracy of `backend` (the highest log-probability option is its answer)."""
    correct, by_subset = [], {}
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    for chunk in tqdm(chunks, desc=f"distill: multiple choice ({desc})", unit="batch", file=sys.stderr):
        for it, lp in zip(chunk, backend.option_logprobs([it.prompt for it in chunk], [it.options for it in chunk])):
            ok = max(range(len(lp)), key=lambda j: lp[j]) in it.correct
            correct.append(ok)
            by_subset.setdefault(it.subset or "all", []).append(ok)
    return {"accuracy": round(sum(correct) / len(correct), 4),
            "by_subset": {k: round(sum(v) / len(v), 4) for k, v in sorted(by_subset.items())}}


def model_card(cfg: Config, summary: dict) -> str:
    settings = "\n".join(f"| {k} | {v} |" for k, v in to_dict(cfg).items())
    mc = summary.get("mc_accuracy") or {}
    mc_line = ", ".join(f"{k} {v}" for k, v in mc.items()) + f" on {summary['mc']}" if mc else "not measured (mc = '')"
    return f"""---
library_name: transformers
tags: [constitutional-ai, context-distillation]
---
# Context-distilled model

Trained by `cai distill` (constitutional) from `{summary['base_model']}` to match, without the context,
what the model does with the context C `{summary['context']}` ({summary['prompt_tokens_saved_per_request']} prompt
tokens saved per request): loss = per-token KL(p0(·|C, x, y<t) ‖ pθ(·|x, y<t)) over
{"the teacher's top-" + str(cfg.top_k) + " tokens plus a bucket for the rest" if cfg.top_k else "the full vocabulary"},
on {summary['train_examples']} teacher samples; {"LoRA adapter merged into the weights" if cfg.lora else "all weights trained"}.
Serve it as a plain model (no context): the chat template's own default system prompt, if any, stays.

## Results (held-out prompts)
- per-token KL to the prompted model: {summary['kl_before']} before, {summary['kl_after']} after
  (gap closed: {summary['gap_closed']})
- multiple-choice accuracy: {mc_line}

## Training
| setting | value |
|---|---|
{settings}

- steps: {summary['steps']} (resumed from step {summary['resumed_from_step']}), {summary['seconds_per_step']} s/step, dtype {summary['dtype']}
- date: {now()}
"""


def _fingerprint(examples: Sequence[Example], cfg: Config) -> str:
    blob = json.dumps([[e.id, e.teacher_ids, e.student_ids] for e in examples] + [to_dict(cfg)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def split_prompts(cfg: Config, run_dir: RunDir) -> tuple[list, list]:
    """(training prompts, held-out prompts): the test split of `eval_prompts`, less any trained on."""
    train_prompts = load_prompt_sets(cfg.prompts, run_dir, cfg.split, cfg.limit)
    seen = {p.id for p in train_prompts}
    eval_prompts = [p for p in load_prompt_sets(cfg.eval_prompts or cfg.prompts, run_dir, "test", cfg.eval_limit) if p.id not in seen]
    if not eval_prompts:
        raise UserError(f"distill: no held-out prompts left in the test split of {cfg.eval_prompts or cfg.prompts!r} "
                        "after leaving out the training prompts; set distill.split=train or give other eval_prompts")
    return train_prompts, eval_prompts


def run(cfg: Config, run_dir: RunDir) -> dict:
    _check(cfg)
    from ..backends.hf import HFBackend

    context = load_context(cfg.context)
    train_prompts, eval_prompts = split_prompts(cfg, run_dir)
    items = load_mc(cfg.mc)[: cfg.mc_limit or None] if cfg.mc else []
    out = run_dir.stage_dir("distill")
    for stale in out.glob(".model.tmp-*"):  # a save killed half-way
        shutil.rmtree(stale, ignore_errors=True)

    backend = load_backend(cfg.model, dtype=cfg.dtype, batch_size=cfg.batch_size)
    if not isinstance(backend, HFBackend):
        raise UserError(f"distill.model {cfg.model!r}: context distillation needs a local model (embedded, a model directory or a hub id)")
    teacher_backend = PromptedBackend(backend, context)
    wanted = [{"prompt": p, "split": "train"} for p in train_prompts] + [{"prompt": p, "split": "eval"} for p in eval_prompts]
    with RecordShard(out / "teacher.jsonl") as shard:
        sample_teacher(teacher_backend, wanted, cfg, shard)
        ids = {f"{it['prompt'].id}#{j}" for it in wanted for j in range(cfg.teacher_samples)}
        records = [r for r in shard.records if r["id"] in ids]
    examples = encode_examples(backend, teacher_backend, records)
    train_ex = [e for e in examples if e.split == "train"]
    eval_ex = [e for e in examples if e.split == "eval"]
    if not train_ex or not eval_ex:
        raise UserError(f"distill: the teacher produced no usable samples ({len(train_ex)} train, {len(eval_ex)} held out); "
                        "check the prompts and max_new_tokens")
    vocab = backend.model.get_output_embeddings().weight.shape[0]
    if cfg.top_k >= vocab:
        raise UserError(f"distill.top_k {cfg.top_k}: the vocabulary has only {vocab} tokens; use 0 for the full vocabulary")

    dtype = training_dtype(cfg.dtype)
    bf16 = dtype == "bfloat16"
    teacher = Teacher(backend.model, examples, backend.pad_id)
    student = load_student(cfg, backend.path, backend.device)
    plan = plan_step(cfg.gradient_checkpointing, student.config, [len(e.student_ids) for e in train_ex], min(cfg.batch_size, len(train_ex)), True, bf16,
                     sum(p.numel() for p in student.parameters()), sum(p.numel() for p in student.parameters() if p.requires_grad),
                     "distill.gradient_checkpointing", held=sum(4 * p.numel() for p in student.parameters()), limit_mb=cfg.memory_mb)
    checkpointing, speed_facts = plan.checkpointing, plan.facts
    if checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fingerprint = _fingerprint(examples, cfg)
    before_path = out / "eval_before.json"
    before = json.loads(before_path.read_text(encoding="utf-8")) if before_path.is_file() else None
    if not before or before.get("fingerprint") != fingerprint:
        before = {**heldout_kl(student, teacher, eval_ex, backend.pad_id, bf16, cfg.batch_size, "before"), "fingerprint": fingerprint}
        atomic_write_json(before_path, before)
    trained = train(cfg, student, teacher, train_ex, backend.pad_id, bf16, out / "checkpoints", fingerprint, plan.micro_batches)
    after = heldout_kl(student, teacher, eval_ex, backend.pad_id, bf16, cfg.batch_size, "after")
    atomic_write_json(out / "loss.json", trained["curve"])

    losses = [c["loss"] for c in trained["curve"]]
    saved = [e.teacher_start - e.student_start for e in eval_ex]
    done_now = trained["steps"] - trained["resumed_from_step"]
    summary = {
        "base_model": backend.name,
        "context": context.name if context.source == "builtin" else context.source,
        "prompt_tokens_saved_per_request": round(sum(saved) / len(saved), 1),
        "context_text_tokens": len(backend.tokenizer(context.text(), add_special_tokens=False)["input_ids"]),
        "teacher_prefix_tokens_cached": len(teacher.prefix),
        "train_prompts": len(train_prompts),
        "eval_prompts": len(eval_prompts),
        "train_examples": len(train_ex),
        "eval_examples": len(eval_ex),
        "truncated_samples": sum(r["truncated"] for r in records),
        "eval_tokens": after["tokens"],
        "kl_before": round(before["kl_per_token"], 5),
        "kl_after": round(after["kl_per_token"], 5),
        "gap_closed": round(1 - after["kl_per_token"] / before["kl_per_token"], 4) if before["kl_per_token"] > 0 else None,
        "steps": trained["steps"],
        "resumed_from_step": trained["resumed_from_step"],
        "first_loss": round(losses[0], 5) if losses else None,
        "final_loss": round(losses[-1], 5) if losses else None,
        "seconds_train": round(trained["seconds"], 1),
        **speed(trained["seconds"], done_now, trained["tokens"]),
        **speed_facts,
        "top_k": cfg.top_k,
        "lora": cfg.lora,
        "dtype": dtype,
        "model": str(out / "model"),
    }
    if checkpointing:
        student.gradient_checkpointing_disable()
    distilled_model = student.merge_and_unload() if cfg.lora else student
    save_model(SimpleNamespace(model=distilled_model, processing_class=backend.tokenizer), out / "model", model_card(cfg, summary))
    if items:  # the paper's three bars: no intervention, prompted, context distilled
        # the saved model, still in memory, in the backend's dtype (as loading out/model with it would give)
        distilled = HFBackend.from_model(distilled_model.to(backend.dtype), backend.tokenizer, name="distilled", batch_size=cfg.batch_size)
        mc = {name: mc_accuracy(b, items, cfg.batch_size, name)
              for name, b in (("plain", backend), ("prompted", teacher_backend), ("distilled", distilled))}
        summary["mc"] = cfg.mc
        summary["mc_items"] = len(items)
        summary["mc_accuracy"] = {name: m["accuracy"] for name, m in mc.items()}
        atomic_write_text(out / "model" / "README.md", model_card(cfg, summary))  # now with the accuracies
    atomic_write_json(out / "eval.json", {
        **summary,
        "models": {"plain": backend.name, "prompted": teacher_backend.name, "distilled": str(out / "model")},
        "context_source": context.source,
        "prompts": cfg.prompts, "eval_prompts_spec": cfg.eval_prompts or cfg.prompts,
        "heldout_before": before, "heldout_after": after,
        "mc_by_subset": {name: m["by_subset"] for name, m in mc.items()} if items else None,
    })
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return summary
