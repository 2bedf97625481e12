"""Shared pieces of the training stages (`sft`, `rl`, `distill`): the model to train, LoRA, the
training dtype, checkpoints, and the atomic save of the trained model."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from .errors import UserError


def load_causal_lm(spec: str, setting: str):
    """(model in float32, tokenizer) of a model string to train; `setting` (e.g. "sft.model") names
    the config field in the one-line errors. The tokenizer must have a chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .backends.base import model_path

    path = model_path(spec)
    if path.startswith(("/", ".", "~")) and not Path(path).expanduser().is_dir():
        raise UserError(f"{setting} {spec!r}: directory not found; give a local model directory, a hub id or embedded")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"{setting} {spec!r}: cannot load {path} ({first}); "
                        "give a local model directory with safetensors weights, a hub id or embedded") from None
    if not tokenizer.chat_template:
        raise UserError(f"{setting} {spec!r}: the tokenizer has no chat template; training on chat prompts needs one")
    return model, tokenizer


def trainer_args(checkpoint_dir, dtype: str, save_steps: int, seed: int) -> dict:
    """The TRL/transformers training arguments `sft` and `rl` share: float32 weights with bf16
    autocast when `dtype` (a `training_dtype`) is bfloat16, a log line per step, no trackers, one
    checkpoint kept every `save_steps`, seeded data order."""
    import torch

    return dict(
        output_dir=str(checkpoint_dir),
        bf16=dtype == "bfloat16",
        fp16=False,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=1,
        report_to=[],
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=1,
        seed=seed,
        data_seed=seed,
    )


def lora_config(r: int, alpha: int):
    """LoRA on all linear layers of the blocks (peft leaves out the output head, which TRL requires)."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def training_dtype(spec: str) -> str:
    """`auto` -> bfloat16 where the GPU or CPU computes in bf16 natively, else float32."""
    import torch

    if spec in ("bfloat16", "float32"):
        return spec
    if spec != "auto":
        raise UserError(f"dtype {spec!r}: use auto, bfloat16 or float32")
    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    from .backends.hf import cpu_supports_bf16

    return "bfloat16" if cpu_supports_bf16() else "float32"


def last_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint (its trainer_state.json is written last), or None."""
    done = []
    for d in checkpoint_dir.glob("checkpoint-*"):
        try:
            step = int(d.name.split("-", 1)[1])
            json.loads((d / "trainer_state.json").read_text(encoding="utf-8"))
        except (ValueError, OSError):
            continue
        done.append((step, d))
    return max(done)[1] if done else None


def keep_matching_checkpoints(out: Path, stamp: Path, fingerprint: str, stage: str, what: str) -> None:
    """Before training into `out`: drop the temp folder of a save killed half-way, and the checkpoints
    (the folder holding `stamp`) when they were trained on other inputs than `fingerprint` says
    (`what` names those inputs in the message); then stamp the checkpoints with `fingerprint`.
    Called by the main process only (distributed.main_first)."""
    from .run import atomic_write_text

    for stale in out.glob(".model.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    checkpoint_dir = stamp.parent
    if checkpoint_dir.exists() and (not stamp.is_file() or stamp.read_text().strip() != fingerprint):
        print(f"[{stage}] {checkpoint_dir} belongs to other {what}; starting over", file=sys.stderr)
        shutil.rmtree(checkpoint_dir)
    atomic_write_text(stamp, fingerprint + "\n")


def save_model(trainer, target: Path, card: str) -> None:
    """Write the trained (LoRA-merged) model, tokenizer and card to `target` via a temp dir + rename.

    Under several processes every rank must call this: `trainer.save_model` gathers sharded weights
    (FSDP, DeepSpeed ZeRO-3) and only the main process writes; the rename happens on the main one.
    """
    from . import distributed

    tmp = target.parent / f".{target.name}.tmp-save"
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save killed half-way
    distributed.barrier()
    try:
        peft = hasattr(trainer.model, "merge_and_unload")
        if peft or not hasattr(trainer, "save_model"):  # a LoRA adapter to merge, or our own loop (distill)
            model = trainer.model.merge_and_unload() if peft else trainer.model
            if distributed.is_main():
                model.save_pretrained(str(tmp))
                trainer.processing_class.save_pretrained(str(tmp))
        else:
            trainer.save_model(str(tmp))  # model and tokenizer; every rank takes part, the main one writes
        if distributed.is_main():
            (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the model directory holds safetensors and JSON
            (tmp / "README.md").write_text(card, encoding="utf-8")
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
    except BaseException:
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    distributed.barrier()
