"""`cai dpo`'s settings and their check (docs/ARCHITECTURE.md "Stages")."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import opt
from ...errors import UserError
from ...training import checkpointing_setting, report_targets, training_dtype

SOURCES = ("preferences", "revisions")


@dataclass
class Config:
    policy: str = opt("auto", "the policy to train: auto (this run's SL-CAI model, else the starting model), a model directory, a hub id or embedded")
    reference: str = opt("", "the frozen reference: '' = the policy's starting weights (LoRA: the policy with its adapter off), else a model with the policy's tokenizer")
    data: str = opt("preferences", "comparisons, joined with '+': preferences (label/preferences.jsonl, soft labels), revisions (revise/revisions.jsonl: last revision vs initial response)")
    helpful: str = opt("", "helpfulness comparisons JSONL mixed into training (prompt, chosen, rejected, optional p_chosen, default 1); '' = none")
    loss: str = opt("soft", "soft (target p_chosen per example: -[p·log σ(βΔ) + (1-p)·log σ(-βΔ)]) or sigmoid (standard DPO on hard labels; ties dropped)")
    beta: float = opt(0.1, "β, the scale of the implicit reward β·log πθ/πref (larger: stay closer to the reference)")
    heldout: float = opt(0.2, "share of comparisons held out (by a hash of the id), besides those on test-split prompts")
    epochs: float = opt(1.0, "passes over the training comparisons (ignored when max_steps > 0)")
    max_steps: int = opt(0, "optimizer steps (0 = run `epochs` epochs)")
    learning_rate: float = opt(5e-6, "peak learning rate, linear decay (LoRA usually wants ~10x more)")
    batch_size: int = opt(2, "comparisons per optimizer step and device (each is two sequences); also the held-out scoring batch")
    grad_accum: int = opt(1, "forward passes per optimizer step")
    max_length: int = opt(512, "tokens per sequence (prompt + response), cut at the end; comparisons whose prompt fills it are dropped")
    lora: bool = opt(False, "train a LoRA adapter (merged into the weights at the end) instead of all weights")
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA scale numerator (scale = alpha / r)")
    dtype: str = opt("auto", "auto (bf16 autocast where the hardware has it, else float32), bfloat16 or float32")
    save_steps: int = opt(10, "steps between checkpoints (a rerun resumes from the newest)")
    reward_model: str = opt("", "preference model scoring DPO vs SL-CAI ('' = this run's train-pm/model if it exists, else no PM scores)")
    feedback_model: str = opt("auto", "judge of the DPO vs SL-CAI win rate: auto (the model this run's label stage used), embedded, a directory or hub id")
    prompts: str = opt("builtin:redteam", "red-team prompts of the DPO vs SL-CAI comparison (their test split); join sets with '+'")
    helpful_prompts: str = opt("builtin:helpful", "helpful prompts of that comparison (test split; '' = none)")
    eval_prompts: int = opt(8, "test-split prompts per set that DPO and SL-CAI answer (0 = skip that comparison)")
    temperature: float = opt(1.0, "sampling temperature of those answers")
    max_new_tokens: int = opt(64, "tokens per answer in that comparison")
    gradient_checkpointing: str = opt("auto", "auto (on only when the activations would not fit in memory), on or off")
    memory_mb: int = opt(0, "memory this process may use, MB: a batch is split into micro-batches (same steps and gradients), then checkpointed, until a step fits (0 = the machine's free memory)")
    report_to: str = opt("none", "experiment tracking: none, tensorboard (<run>/dpo/logs), wandb or tensorboard,wandb")
    seed: int = opt(0, "random seed (data order, LoRA init, sampling)")


def check_config(cfg: Config) -> list[str]:
    """The data sources named by `cfg.data`; every setting checked."""
    parts = [p.strip() for p in cfg.data.split("+") if p.strip()]
    if not parts or any(p not in SOURCES for p in parts) or len(set(parts)) < len(parts):
        raise UserError(f"dpo.data {cfg.data!r}: use preferences, revisions or preferences+revisions")
    if cfg.loss not in ("soft", "sigmoid"):
        raise UserError(f"dpo.loss {cfg.loss!r}: use soft or sigmoid")
    checkpointing_setting(cfg.gradient_checkpointing, "dpo.gradient_checkpointing")
    report_targets(cfg.report_to, "dpo.report_to")
    for name in ("batch_size", "grad_accum", "max_length", "save_steps", "lora_r", "lora_alpha", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise UserError(f"dpo.{name} {getattr(cfg, name)}: must be >= 1")
    for name in ("beta", "learning_rate", "temperature"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"dpo.{name} {getattr(cfg, name)}: must be > 0")
    if cfg.max_steps < 0 or cfg.eval_prompts < 0 or (cfg.max_steps == 0 and cfg.epochs <= 0):
        raise UserError("dpo: max_steps and eval_prompts must be >= 0, and epochs > 0 when max_steps is 0")
    if not 0 <= cfg.heldout < 1:
        raise UserError(f"dpo.heldout {cfg.heldout}: must be in [0, 1)")
    training_dtype(cfg.dtype)
    return parts
