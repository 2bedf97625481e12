"""The arithmetic of `cai dpo` (Direct Preference Optimisation), as pure functions with brute-force tests.

DPO (Rafailov et al. 2023) trains the policy πθ on comparisons (x, chosen c, rejected r) directly,
without a preference model or RL: its implicit reward is β·log πθ(y|x)/πref(y|x), and the
Bradley–Terry probability that c beats r is σ(βΔ) with the log-ratio margin

    Δ = (log πθ(c|x) - log πref(c|x)) - (log πθ(r|x) - log πref(r|x)).

`soft_dpo_loss` is the cross-entropy between a per-example target p = P(c better) and σ(βΔ):

    loss = -[p·log σ(βΔ) + (1 - p)·log σ(-βΔ)]

p = 1 is standard DPO (TRL's `sigmoid` loss); p < 1 is conservative DPO (Mitchell 2023) with a
per-example label smoothing ε = 1 - p, and its optimum is βΔ = logit(p): a labeler that is 52%
sure asks for a small margin, not an unbounded one. This is the preference model's soft-label
loss (`preference_model.soft_preference_loss`) with the PM's score difference replaced by βΔ.

`completion_logps` is log π(y|x), summed over the response's tokens; `pair_metrics` the held-out
accuracy and margin of a ranking.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # torch is imported inside the functions: `cai --help` imports the stages, and this with them
    import torch


def soft_dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
                  reference_rejected: torch.Tensor, p_chosen: torch.Tensor, beta: float) -> torch.Tensor:
    """Mean soft-target DPO loss over a batch of B comparisons, in nats.

    policy_chosen, policy_rejected, reference_chosen, reference_rejected: (B,) sequence
    log-probabilities log π(y|x) of the chosen and rejected responses under the policy and the
    reference; p_chosen: (B,) targets in [0, 1]; beta > 0. Computed in float32 or wider;
    `logsigmoid` keeps it finite for any margin.
    """
    import torch
    import torch.nn.functional as F

    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    if margin.dtype in (torch.float16, torch.bfloat16):
        margin = margin.float()
    p = p_chosen.to(device=margin.device, dtype=margin.dtype)
    return -(p * F.logsigmoid(beta * margin) + (1 - p) * F.logsigmoid(-beta * margin)).mean()


def completion_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log π(y|x) per sequence: the log-softmax of `logits` at `labels`, summed where `mask` is True.

    logits: (N, T, V) next-token logits, position t predicting labels[:, t]; labels: (N, T) token
    ids; mask: (N, T) bool, True on the response's tokens. Returns (N,) float32 (nats). Only the
    masked positions are normalised over the vocabulary, so memory grows with the response tokens,
    not with N·T·V.
    """
    import torch

    rows = torch.nonzero(mask, as_tuple=True)[0]
    token_logps = torch.log_softmax(logits[mask].float(), dim=-1).gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)
    return torch.zeros(mask.size(0), dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps)


def pair_metrics(chosen: Sequence[float], rejected: Sequence[float]) -> dict:
    """How a score ranks N comparisons: accuracy = share with chosen > rejected (ties count as
    wrong), margin = mean(chosen - rejected). Scores are e.g. log π(y|x) or β-scaled log-ratios.
    Returns {count, accuracy, margin}; accuracy and margin are None when N = 0."""
    n = len(chosen)
    if len(rejected) != n:
        raise ValueError(f"pair_metrics: {n} chosen but {len(rejected)} rejected scores")
    if n == 0:
        return {"count": 0, "accuracy": None, "margin": None}
    return {"count": n, "accuracy": sum(c > r for c, r in zip(chosen, rejected)) / n,
            "margin": sum(c - r for c, r in zip(chosen, rejected)) / n}
