"""The arithmetic of the RL stage (`cai rl`), as pure functions with brute-force tests.

Seed 002 ("REINFORCE on text"): sample N generations, weight the gradient of each one's log-probability
by its reward. Bai et al. 2022 (Constitutional AI) §4: the reward is the preference model's score and a
KL penalty to the starting policy keeps the policy near it. The pieces:

- `leave_one_out_baseline`, `rloo_advantages`: REINFORCE with a leave-one-out baseline (RLOO; Ahmadian et
  al. 2024): each of the G samples of a prompt is judged against the mean reward of the other G - 1,
  which removes the prompt's own difficulty from the signal without a learned value function. TRL's
  `RLOOTrainer` computes exactly this (the unit tests pin its output to these functions), after it
  subtracts β·KL(sequence) from each reward.
- `normalize_rewards`, `apply_length_penalty`: the reward shaping `cai rl` applies before TRL sees
  the rewards.
- `kl_estimate`: per-token estimators of KL(π ‖ π_ref) from samples of π: k1 = log π - log π_ref
  (unbiased, can be negative; TRL's RLOO penalty) and k3 = r - 1 - log r with r = π_ref / π (unbiased,
  never negative; TRL's GRPO penalty).
- `bootstrap_mean_ci`, `wilson_interval`: the intervals of the evaluation (a mean score difference
  over prompts; a win rate).
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # the functions only call tensor methods: importing this module stays free of torch
    import torch

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def leave_one_out_baseline(rewards: torch.Tensor) -> torch.Tensor:
    """rewards: (P, G), G >= 2 samples for each of P prompts. Returns (P, G): the mean reward of the
    other G - 1 samples of the same prompt, b_ij = (Σ_k r_ik - r_ij) / (G - 1)."""
    if rewards.dim() != 2 or rewards.size(1) < 2:
        raise ValueError(f"leave_one_out_baseline: expected (prompts, generations >= 2), got {tuple(rewards.shape)}")
    return (rewards.sum(dim=1, keepdim=True) - rewards) / (rewards.size(1) - 1)


def rloo_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """rewards: (P·G,) flat, grouped by prompt as TRL orders them (the G samples of a prompt are
    consecutive). Returns (P·G,) advantages r_ij - b_ij; each group's advantages sum to zero."""
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rloo_advantages: {rewards.numel()} rewards do not split into groups of {num_generations}")
    grouped = rewards.view(-1, num_generations)
    return (grouped - leave_one_out_baseline(grouped)).view(-1)


def normalize_rewards(rewards: Sequence[float]) -> list[float]:
    """(r - mean) / std over one generation batch (population std), so the reward is in units of its
    own spread whatever the PM's scale; a batch whose rewards are all equal is only centred."""
    n = len(rewards)
    if n == 0:
        return []
    mean = sum(rewards) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / n)
    return [(r - mean) / std if std > 1e-8 else r - mean for r in rewards]


def apply_length_penalty(rewards: Sequence[float], lengths: Sequence[int], coef: float) -> list[float]:
    """r - coef · tokens / 100: `coef` reward units per 100 completion tokens (lengths in tokens)."""
    if len(rewards) != len(lengths):
        raise ValueError(f"apply_length_penalty: {len(rewards)} rewards but {len(lengths)} lengths")
    return [r - coef * n / 100.0 for r, n in zip(rewards, lengths)]


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from tokens sampled from π.

    logp, ref_logp: (..., T) log π(x_t | x_<t) and log π_ref(x_t | x_<t) of the sampled tokens, nats.
    Returns (..., T), nats: k1 = logp - ref_logp, or k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1.
    Both have expectation KL(π(·|x_<t) ‖ π_ref(·|x_<t)) at each position; summed over a sequence,
    expectation KL between the sequence distributions (the chain rule).
    """
    log_ratio = ref_logp - logp
    if kind == "k1":
        return -log_ratio
    if kind == "k3":
        return log_ratio.exp() - log_ratio - 1
    raise ValueError(f"kl_estimate: kind {kind!r}; use k1 or k3")


def bootstrap_mean_ci(values: Sequence[float], level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float] | tuple[None, None]:
    """Percentile bootstrap interval of the mean: resample the values with replacement `n_boot`
    times (seeded), take the (1 - level)/2 and (1 + level)/2 quantiles of the resampled means.
    Returns (None, None) for no values."""
    n = len(values)
    if n == 0:
        return None, None
    rng = random.Random(seed)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    return _quantile(means, (1 - level) / 2), _quantile(means, (1 + level) / 2)


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float] | tuple[None, None]:
    """Wilson score interval for a proportion: the p with |p̂ - p| <= z·sqrt(p(1 - p)/n), p̂ = successes/n.
    `successes` may be fractional (a tie counted as half a win). Returns (None, None) for n = 0."""
    if n <= 0:
        return None, None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
