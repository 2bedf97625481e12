"""`cai rl`'s settings (docs/ARCHITECTURE.md "Stages")."""

from __future__ import annotations

from dataclasses import dataclass


from ...config import opt


@dataclass
class Config:
    policy: str = opt("auto", "the policy to train: auto (this run's SL-CAI model, else the starting model), a model directory, a hub id or embedded")
    reward_model: str = opt("", "preference model directory ('' = this run's train-pm/model)")
    feedback_model: str = opt("auto", "judge of the RL-CAI vs SL-CAI win rate: auto (the model this run's label stage used), embedded, a directory or hub id")
    prompts: str = opt("builtin:redteam", "red-team prompts; join sets with '+', run:redteam = this run's generated prompts")
    helpful_prompts: str = opt("builtin:helpful", "helpful prompts mixed in ('' = none)")
    helpful_ratio: float = opt(1.0, "helpful prompts per red-team prompt in the training mix (fewer if not available; 0 = none)")
    split: str = opt("train", "which split to train on: train, test or all (the evaluation always uses test)")
    limit: int = opt(0, "prompts per prompt set (0 = all)")
    algorithm: str = opt("rloo", "rloo (REINFORCE, leave-one-out baseline, KL in the reward) or grpo (group-normalised advantages, KL in the loss)")
    num_generations: int = opt(4, "samples per prompt (>= 2), the group each baseline is computed from")
    max_steps: int = opt(50, "optimizer steps (one generation batch each)")
    learning_rate: float = opt(1e-5, "peak learning rate, linear decay (LoRA usually wants ~10x more)")
    batch_size: int = opt(2, "prompts per step, each sampled num_generations times")
    beta: float = opt(0.05, "KL coefficient β (0 = no KL penalty and no reference model)")
    temperature: float = opt(1.0, "sampling temperature, in training and in the evaluation (paper: 1)")
    max_new_tokens: int = opt(64, "tokens per completion")
    normalize_reward: bool = opt(True, "whiten the PM score over each generation batch (mean 0, std 1) before the length penalty")
    length_penalty: float = opt(0.0, "reward units subtracted per 100 completion tokens (0 = none)")
    max_kl: float = opt(0.0, "stop once the logged KL to the reference passes this many nats per token (0 = no bound; needs beta > 0)")
    lora: bool = opt(False, "train a LoRA adapter (merged into the weights at the end) instead of all weights")
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA scale numerator (scale = alpha / r)")
    dtype: str = opt("auto", "auto (bf16 autocast where the hardware has it, else float32), bfloat16 or float32")
    rollouts: str = opt("backend", "who samples the completions: backend (the hf backend's batched decoder) or trl (TRL's HF generate)")
    gradient_checkpointing: str = opt("auto", "recompute activations in the backward pass (less memory, slower): auto (only when a batch would not fit in memory), on or off")
    memory_mb: int = opt(0, "memory this process may use, MB: a step's completions are trained in micro-batches (same steps and gradients), then checkpointed, until a step fits (0 = the machine's free memory)")
    save_steps: int = opt(10, "steps between checkpoints (a rerun resumes from the newest)")
    eval_prompts: int = opt(8, "held-out (test split) prompts per prompt set for RL-CAI vs SL-CAI (0 = skip the evaluation)")
    report_to: str = opt("none", "experiment tracking: none, tensorboard (<run>/rl/logs), wandb or tensorboard,wandb")
    seed: int = opt(0, "random seed (helpful-prompt draw, data order, sampling, LoRA init)")
