"""`cai distill`'s settings (docs/ARCHITECTURE.md "Stages")."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import opt


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
