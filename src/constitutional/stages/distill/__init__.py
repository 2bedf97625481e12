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
4. Training: our own loop (AdamW, torch's fused kernel as the TRL stages use, linear decay, gradient clipping at 1), full fine-tuning or LoRA
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

Layout: `teacher.py` (steps 1 to 3 and the top-k targets of step 5), `student.py` (the loss,
checkpoints and data order of step 4), this module (the training loop and the stage), `config.py`.

Departures: the paper distilled on pretraining-style text with a 52B model; we distill on the
teacher's own samples to chat prompts (docs/ARCHITECTURE.md "Training"). The teacher is the `hf` backend's
copy of the model (in the backend's dtype: bf16 where the hardware has it) held beside the student,
so training holds two copies of the weights. Single process only.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

from tqdm import tqdm

from ...backends import load_backend
from ...backends.prompted import PromptedBackend
from ...config import to_dict
from ...context import load_context
from ...data.loaders import load_mc
from ...errors import UserError
from ...run import RecordShard, RunDir, atomic_write_json, atomic_write_text, now
from ...training import LoopLogger, checkpointing_setting, lora_config, plan_step, report_targets, save_model, speed, tracking, training_dtype
from .. import load_prompt_sets
from .config import Config
from .student import batch_loss, epoch_batches, epoch_order, heldout_kl, load_checkpoint, save_checkpoint
from .teacher import Example, Teacher, encode_examples, precompute_topk, response_logits, sample_teacher

__all__ = ["Config", "run", "train", "train_step", "load_student", "sample_teacher", "encode_examples", "response_logits", "Teacher",
           "epoch_order", "epoch_batches", "PromptedBackend", "load_context"]


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
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.learning_rate, fused=True)  # benchmarks/bench_adamw.py
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
            if (step + 1) % cfg.save_steps == 0 or step + 1 == total:  # the last one without the optimizer: nothing trains after it
                save_checkpoint(ckpt_dir, step + 1, student, optimizer if step + 1 < total else None, {"curve": curve, "fingerprint": fingerprint})
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
    from ...backends.hf import HFBackend

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
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})  # transformers 5 name
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
        student.activation_checkpointing_disable()
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
