"""`cai sft`: the supervised stage's fine-tuning (SL-CAI): train the model on its own revisions.

Paper: Bai et al. 2022, Section 3.1; the seeds' "Supervised Stage": the helpful model is fine-tuned
on its revised responses to red-team prompts, creating the SL-CAI model, and (to keep it helpful)
on helpful samples from the same model mixed in. Inputs are `cai revise`'s records:

- `<run>/revise/revisions.jsonl`: one critique -> revision chain per red-team prompt; records with
  `usable: false` (no acceptable revision) are never trained on;
- `<run>/revise/helpful.jsonl`: sampled answers to helpful prompts, `helpful_ratio` of them per
  revision example, drawn with the seed (first one answer per prompt, then second answers, ...).

Each example is a TRL conversational prompt/completion pair: `prompt` = the record's chat messages,
`completion` = one assistant message. The loss is on the completion tokens only (TRL's
`completion_only_loss`). The prompt is rendered by the model's own chat template, including any
default system prompt the template injects (SmolLM2's), because that is how the `hf` backend
prompts the model at inference time. The dataset is written to `<run>/sft/dataset.jsonl` (with `id`
and `source`: revision / helpful) before training, for provenance.

Training is `trl.SFTTrainer` (optionally LoRA through `peft`, merged into the weights afterwards),
with float32 master weights and bf16 autocast where the hardware has bf16 (`dtype=auto`).
Checkpoints go to `<run>/sft/checkpoints/` every `save_steps`; a rerun resumes from the newest one.
`report_to` logs the training curve to TensorBoard (`<run>/sft/logs/`) and/or W&B (training.py).
The result, `<run>/sft/model/`, is a plain model directory (safetensors, tokenizer, chat template,
README.md model card) that appears by an atomic rename, so a crash never leaves a half model that a
later stage would trust. `loss.json` holds the logged loss per step (for the report).

Run: `cai sft --run-dir runs/x` after `cai revise`; e.g. `--set lora=true --set learning_rate=2e-4`.

Departures: by default only the final revision of each prompt is trained on (`all_revisions=true`
trains on every accepted round's revision, as the paper did); the paper fine-tuned a 52B model with
batch 1024 at half the pre-training learning rate, our defaults are sized for a small model on a CPU.
Several processes: `accelerate launch ... -m constitutional.cli sft ...` trains data-parallel (DDP,
FSDP or DeepSpeed, per the accelerate config; see configs/accelerate/); the main process writes
the files and the model (distributed.py). `batch_size` is per process.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .. import distributed
from ..config import opt, to_dict
from ..errors import UserError
from ..run import RunDir, atomic_write_json, atomic_write_text, now
from ..run import read_records as run_read_records
from ..training import (checkpointing_setting, skip_final_checkpoint, keep_matching_checkpoints, last_checkpoint, load_causal_lm, lora_config, plan_step,
                        report_targets, save_model, speed, tracking, trainer_args, training_dtype)


@dataclass
class Config:
    model: str = opt("embedded", "the model to fine-tune: embedded, a local model directory, or a hub id")
    revisions: str = opt("", "revision records ('' = this run's revise/revisions.jsonl)")
    helpful: str = opt("", "helpful samples to mix in ('' = this run's revise/helpful.jsonl if present; none = no mix)")
    all_revisions: bool = opt(False, "train on every accepted round's revision (as the paper) instead of the final one only")
    helpful_ratio: float = opt(1.0, "helpful examples per revision example (fewer if not available; 0 = none)")
    epochs: float = opt(1.0, "passes over the dataset (ignored when max_steps > 0)")
    max_steps: int = opt(0, "optimizer steps (0 = use epochs)")
    learning_rate: float = opt(2e-5, "peak learning rate, linear decay (LoRA usually wants ~10x more)")
    batch_size: int = opt(4, "examples per device per forward pass")
    grad_accum: int = opt(1, "forward passes per optimizer step")
    max_length: int = opt(512, "tokens per example (prompt + completion); longer ones are cut at the end")
    gradient_checkpointing: str = opt("auto", "recompute activations in the backward pass (less memory, slower): auto (only when a batch would not fit in memory), on or off")
    padding_free: bool = opt(True, "batch without padding: a batch's examples are concatenated into one row, each attending only to itself")
    memory_mb: int = opt(0, "memory this process may use, MB: a batch is split into micro-batches (same steps and gradients), then checkpointed, until a step fits (0 = the machine's free memory)")
    lora: bool = opt(False, "train a LoRA adapter (merged into the weights at the end) instead of all weights")
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA scale numerator (scale = alpha / r)")
    dtype: str = opt("auto", "auto (bf16 autocast where the hardware has it, else float32), bfloat16 or float32")
    save_steps: int = opt(50, "steps between checkpoints (a rerun resumes from the newest)")
    report_to: str = opt("none", "experiment tracking: none, tensorboard (<run>/sft/logs), wandb or tensorboard,wandb")
    seed: int = opt(0, "random seed (helpful-sample draw, data order, LoRA init)")


# ---------------------------------------------------------------------------------------------- data


def read_records(path: Path) -> list[tuple[int, dict]]:
    """Strict JSON Lines -> [(line number, record)]; a malformed line is a `UserError`."""
    records = []
    for rec, n in run_read_records(path, "fix or delete the line (a rerun of `cai revise` repairs a torn last line)"):
        if not isinstance(rec, dict):
            raise UserError(f"{path}:{n}: expected a JSON object per line")
        records.append((n, rec))
    return records


def prompt_messages(rec: dict, where: str) -> list[dict]:
    """The record's conversation up to the response: `messages`, else `prompt` as one user turn."""
    messages = rec.get("messages")
    if messages is None and isinstance(rec.get("prompt"), str):
        messages = [{"role": "user", "content": rec["prompt"]}]
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise UserError(f"{where} (messages): expected a non-empty list of {{role, content}} messages or a prompt string")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _example(id_: str, source: str, messages: list[dict], response: str) -> dict:
    return {"id": id_, "source": source, "prompt": messages, "completion": [{"role": "assistant", "content": response}]}


def revision_examples(path: Path, all_revisions: bool) -> tuple[list[dict], dict]:
    """Examples from revision records; returns (examples, info: records, usable, principle counts)."""
    examples, principles, usable, records = [], Counter(), 0, read_records(path)
    for line, rec in records:
        where = f"{path}:{line}"
        if not isinstance(rec.get("usable"), bool) or not isinstance(rec.get("rounds"), list):
            raise UserError(f"{where}: a revision record needs `usable` (true/false) and `rounds`; is this revise/revisions.jsonl?")
        if not rec["usable"]:
            continue
        rid, messages = str(rec.get("id", line)), prompt_messages(rec, where)
        ok = [(k, r) for k, r in enumerate(rec["rounds"])
              if isinstance(r, dict) and r.get("status") == "ok" and isinstance(r.get("revision"), str) and r["revision"].strip()]
        principles.update(str(r.get("principle_id")) for _, r in ok)
        if all_revisions:  # id <record>/r<round index>
            examples += [_example(f"{rid}/r{k}", "revision", messages, r["revision"]) for k, r in ok]
        elif isinstance(rec.get("final_response"), str) and rec["final_response"].strip():
            examples.append(_example(rid, "revision", messages, rec["final_response"]))
        else:
            raise UserError(f"{where} (final_response): a usable record needs a non-empty final_response")
        usable += 1
    return examples, {"records": len(records), "usable": usable, "principles": dict(sorted(principles.items()))}


def helpful_examples(path: Path, n: int, seed: int) -> tuple[list[dict], int]:
    """Up to `n` helpful examples, drawn with `seed`: one answer per prompt before any second answer.
    Returns (examples, how many were available)."""
    pool = []
    for line, rec in read_records(path):
        where = f"{path}:{line}"
        responses = rec.get("responses")
        if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
            raise UserError(f"{where} (responses): expected a list of strings; is this revise/helpful.jsonl?")
        messages = prompt_messages(rec, where)
        pool.append([(f"{rec.get('id', line)}/h{j}", messages, r) for j, r in enumerate(responses) if r.strip()])
    random.Random(seed).shuffle(pool)
    order = sorted(((j, i) for i, answers in enumerate(pool) for j in range(len(answers))))
    picked = [pool[i][j] for j, i in order[:n]]
    return [_example(id_, "helpful", messages, response) for id_, messages, response in picked], len(order)


def build_dataset(cfg: Config, run_dir: RunDir) -> tuple[list[dict], dict]:
    """The SFT examples (revisions first, then helpful samples) and facts about where they came from."""
    revise_dir = run_dir.path / "revise"
    rev_path = Path(cfg.revisions) if cfg.revisions else revise_dir / "revisions.jsonl"
    if not rev_path.is_file():
        raise UserError(f"{rev_path}: revisions file not found; run `cai revise` first or set sft.revisions")
    rows, info = revision_examples(rev_path, cfg.all_revisions)
    if not rows:
        raise UserError(f"{rev_path}: no usable revisions ({info['records']} records, {info['usable']} usable); "
                        "check the revise stage's output (rounds' status) or rerun `cai revise` with more prompts")
    info.update(revisions=str(rev_path), helpful=None, helpful_available=0)
    if cfg.helpful != "none" and cfg.helpful_ratio > 0:
        help_path = Path(cfg.helpful) if cfg.helpful else revise_dir / "helpful.jsonl"
        if help_path.is_file():
            helpful, info["helpful_available"] = helpful_examples(help_path, round(cfg.helpful_ratio * len(rows)), cfg.seed)
            rows += helpful
            info["helpful"] = str(help_path)
        elif cfg.helpful:
            raise UserError(f"{help_path}: helpful samples file not found; check sft.helpful, or set it to none")
        else:
            print(f"[sft] {help_path} not found: no helpful samples mixed in (set sft.helpful=none to silence this)", file=sys.stderr)
    return rows, info


# ------------------------------------------------------------------------------------------ training


def _check(cfg: Config) -> None:
    for name in ("batch_size", "grad_accum", "max_length", "save_steps", "lora_r", "lora_alpha"):
        if getattr(cfg, name) < 1:
            raise UserError(f"sft.{name} {getattr(cfg, name)}: must be >= 1")
    if cfg.max_steps < 0 or (cfg.max_steps == 0 and cfg.epochs <= 0):
        raise UserError("sft: set max_steps > 0 or epochs > 0")
    if cfg.learning_rate <= 0:
        raise UserError(f"sft.learning_rate {cfg.learning_rate}: must be > 0")
    if cfg.helpful_ratio < 0:
        raise UserError(f"sft.helpful_ratio {cfg.helpful_ratio}: must be >= 0")
    training_dtype(cfg.dtype)
    report_targets(cfg.report_to, "sft.report_to")
    checkpointing_setting(cfg.gradient_checkpointing, "sft.gradient_checkpointing")


def build_trainer(cfg: Config, rows: list[dict], checkpoint_dir: Path):
    """A `trl.SFTTrainer` on the prompt/completion `rows` (completion-only loss), checkpointing into
    `checkpoint_dir`. Weights are float32; `dtype` bfloat16 trains under bf16 autocast.

    `padding_free`: TRL's padding-free collator (one row per batch, position ids restarting at each
    example) in place of the padded one; the dataset (tokenisation, truncation at max_length, the
    examples TRL drops) is the padded trainer's. transformers' sdpa and eager attention read the
    restarting position ids as a block-diagonal causal mask, so the loss and gradients equal the
    padded batch's (tests/unit/test_sft.py). Micro-batches and gradient checkpointing follow
    `plan_step` for the longest examples (TRL's loss over a step's micro-batches is normalised by
    the step's token count, so the gradient is the whole batch's). `trainer.speed_facts` holds the
    decisions for the summary."""
    import dataclasses

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    _check(cfg)
    dtype = training_dtype(cfg.dtype)
    model, tokenizer = load_causal_lm(cfg.model, "sft.model")
    peft_config = lora_config(cfg.lora_r, cfg.lora_alpha) if cfg.lora else None
    padding_free = cfg.padding_free and model.config._attn_implementation in ("sdpa", "eager")
    lengths = [min(cfg.max_length, len(tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=True, return_dict=True)["input_ids"]))
               for r in rows]
    params = sum(p.numel() for p in model.parameters())
    plan = plan_step(cfg.gradient_checkpointing, model.config, lengths, cfg.batch_size, not padding_free, dtype == "bfloat16", params,
                     0 if cfg.lora else params, "sft.gradient_checkpointing", held=4 * params, limit_mb=cfg.memory_mb)
    args = SFTConfig(
        **trainer_args(checkpoint_dir, dtype, cfg.save_steps, cfg.seed, cfg.report_to),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size // plan.micro_batches,
        gradient_accumulation_steps=cfg.grad_accum * plan.micro_batches,
        max_length=cfg.max_length,
        completion_only_loss=True,
        # transformers 5's name for gradient_checkpointing (TRL's default: on)
        activation_checkpointing=plan.checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if plan.checkpointing else None,
    )
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft_config)
    skip_final_checkpoint(trainer)
    if len(trainer.train_dataset) == 0:  # TRL drops examples whose prompt alone fills max_length
        raise UserError(f"sft.max_length {cfg.max_length}: every prompt fills it, nothing left to train on; raise sft.max_length")
    if padding_free:
        trainer.data_collator = dataclasses.replace(trainer.data_collator, padding_free=True)
    trainer.speed_facts = {**plan.facts, "padding_free": padding_free}
    return trainer


def loss_curve(log_history: list[dict]) -> list[dict]:
    """The trainer's per-step training logs as [{step, loss, learning_rate, epoch}]."""
    keys = ("step", "loss", "learning_rate", "epoch")
    return [{k: h.get(k) for k in keys} for h in log_history if "loss" in h and "step" in h]


def model_card(cfg: Config, info: dict, summary: dict) -> str:
    principles = "\n".join(f"| {p} | {n} |" for p, n in info["principles"].items()) or "| (none recorded) | |"
    settings = "\n".join(f"| {k} | {v} |" for k, v in to_dict(cfg).items())
    base = cfg.model if cfg.model == summary["base_model"] else f"{cfg.model}` (`{summary['base_model']}"
    return f"""---
library_name: transformers
tags: [constitutional-ai, sl-cai, trl, sft]
---
# SL-CAI model

Fine-tuned by `cai sft` (constitutional) from `{base}` on its own revised
responses to red-team prompts{" mixed with helpful samples" if summary['helpful_examples'] else ""}
(Constitutional AI, supervised stage). Completion-only loss; {"LoRA adapter merged into the weights" if cfg.lora else "all weights trained"}.

## Data
- revisions: `{info['revisions']}`: {info['records']} records, {info['usable']} usable;
  {summary['revision_examples']} examples ({"every accepted round" if cfg.all_revisions else "final revision only"})
- helpful samples: `{info['helpful'] or 'none'}`: {summary['helpful_examples']} examples of {info['helpful_available']} available
  (ratio {cfg.helpful_ratio})
- total: {summary['examples']} examples ({summary['examples_dropped_too_long']} dropped: prompt longer than max_length); dataset: `../dataset.jsonl`

## Constitution principles used (accepted revision rounds)
| principle | rounds |
|---|---|
{principles}

## Training
| setting | value |
|---|---|
{settings}

## Results
- steps: {summary['steps']} (resumed from step {summary['resumed_from_step']})
- final loss: {summary['final_loss']}, mean loss over the last 10% of steps: {summary['mean_loss_last_10pct']}
- training time: {summary['seconds']} s ({summary['seconds_per_step']} s/step, {summary['tokens_per_second']} tokens/s), dtype {summary['dtype']}
- date: {now()}
"""


def _fingerprint(rows: list[dict]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def run(cfg: Config, run_dir: RunDir) -> dict:
    _check(cfg)
    out = run_dir.stage_dir("sft")
    rows, info = build_dataset(cfg, run_dir)
    checkpoint_dir = out / "checkpoints"
    # A checkpoint is only valid for the dataset it was trained on (the revise output may have changed).
    fingerprint, stamp = _fingerprint(rows), checkpoint_dir / "dataset.sha256"
    with distributed.main_first() as main:  # the main process cleans up and writes; the other ranks then read
        if main:
            keep_matching_checkpoints(out, stamp, fingerprint, "sft", "data")
            atomic_write_text(out / "dataset.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    with tracking(cfg.report_to, out, "sft.report_to"):
        trainer = build_trainer(cfg, rows, checkpoint_dir)
        resume = last_checkpoint(checkpoint_dir)
        resumed_from = int(resume.name.split("-", 1)[1]) if resume else 0
        if resume and distributed.is_main():
            print(f"[sft] resuming from {resume}", file=sys.stderr)
        t0 = time.time()
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        seconds = time.time() - t0

    curve = loss_curve(trainer.state.log_history)
    if distributed.is_main():
        atomic_write_json(out / "loss.json", curve)
    losses = [c["loss"] for c in curve]
    tail = losses[-max(1, math.ceil(len(losses) / 10)):] if losses else []
    steps = trainer.state.global_step
    n_rev = sum(r["source"] == "revision" for r in rows)
    summary = {
        "examples": len(rows),
        "revision_examples": n_rev,
        "helpful_examples": len(rows) - n_rev,
        "examples_dropped_too_long": len(rows) - len(trainer.train_dataset),
        "steps": steps,
        "resumed_from_step": resumed_from,
        "first_loss": round(losses[0], 4) if losses else None,
        "final_loss": round(losses[-1], 4) if losses else None,
        "mean_loss_last_10pct": round(sum(tail) / len(tail), 4) if tail else None,
        "seconds": round(seconds, 1),
        **speed(seconds, steps - resumed_from, getattr(trainer, "_total_train_tokens", 0)),  # TRL's count, all processes
        **trainer.speed_facts,
        "model": str(out / "model"),
        "base_model": trainer.processing_class.name_or_path,
        "lora": cfg.lora,
        "dtype": training_dtype(cfg.dtype),
        "principles": len(info["principles"]),
    }
    save_model(trainer, out / "model", model_card(cfg, info, summary))  # every rank takes part
    if not distributed.is_main():
        return {}
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return summary
