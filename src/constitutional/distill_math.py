"""Context distillation maths (pure functions): the per-token KL between the teacher with context C
and the student without it, over the full vocabulary or the teacher's top k plus one bucket.

Direction: teacher first, KL(p0(·|C,x,y<t) ‖ pθ(·|x,y<t)) (seed 000, "context distillation"): the
student is pushed to cover what the teacher puts mass on. Used by `stages/distill/`.
"""

from __future__ import annotations

# torch is imported inside each function: `cai --help` imports every stage module, and this one
# with it, so importing torch here would slow every command's start-up.


def kl_per_token(teacher_logits, student_logits):
    """KL(p ‖ q) per position, p = softmax(teacher_logits), q = softmax(student_logits), in nats.

    teacher_logits, student_logits: (..., V) -> (...), computed in float32. Tokens the teacher
    gives probability 0 (logit -inf) add nothing.
    """
    import torch

    p_log = torch.log_softmax(teacher_logits.float(), dim=-1)
    q_log = torch.log_softmax(student_logits.float(), dim=-1)
    terms = p_log.exp() * (p_log - q_log)
    return torch.where(torch.isneginf(p_log), torch.zeros_like(terms), terms).sum(-1)


def masked_mean(values, mask):
    """Mean of `values` (B, T) where `mask` (B, T) is True; masked entries (even NaN) are ignored."""
    import torch

    return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum().clamp(min=1)


def token_kl(teacher_logits, student_logits, mask):
    """The distillation loss: mean over unmasked tokens of KL(teacher ‖ student).

    teacher_logits, student_logits: (B, T, V); mask: (B, T) bool, True on response tokens. -> scalar.
    """
    return masked_mean(kl_per_token(teacher_logits, student_logits), mask)


def outside_logmass(logprobs, indices):
    """log of the probability mass outside `indices`: logprobs (..., V), indices (..., k) -> (...).

    Summed directly over the other tokens, not as 1 - the top-k mass, which rounding can push to 0
    or below. Nothing outside (k = V) gives about -3.4e38 rather than -inf, so gradients stay finite.
    """
    import torch

    return logprobs.scatter(-1, indices.long(), torch.finfo(logprobs.dtype).min).logsumexp(-1)


def topk_targets(teacher_logits, k: int):
    """The teacher's k most likely tokens per position and the mass of all others.

    teacher_logits: (..., V) -> (log-probs (..., k) float32, token ids (..., k), log of the rest (...)).
    """
    import torch

    logp = torch.log_softmax(teacher_logits.float(), dim=-1)
    values, indices = logp.topk(k, dim=-1)
    return values, indices, outside_logmass(logp, indices)


def topk_kl_per_token(teacher_logprobs, teacher_indices, teacher_rest, student_logits):
    """KL(p ‖ q) over k + 1 categories: the teacher's top-k tokens and one bucket for all others.

    teacher_logprobs, teacher_indices: (..., k) and teacher_rest: (...) from `topk_targets`;
    student_logits: (..., V). -> (...), nats. At k = V this is the full KL.
    """
    import torch

    q_log = torch.log_softmax(student_logits.float(), dim=-1)
    q_k = q_log.gather(-1, teacher_indices.long())
    p_k = teacher_logprobs.float()
    head = (p_k.exp() * (p_k - q_k)).sum(-1)
    p_rest, q_rest = teacher_rest.float(), outside_logmass(q_log, teacher_indices)
    rest = p_rest.exp() * (p_rest - q_rest)
    return head + torch.where(p_rest.exp() > 0, rest, torch.zeros_like(rest))


def topk_token_kl(teacher_logprobs, teacher_indices, teacher_rest, student_logits, mask):
    """`token_kl` with the teacher reduced to its top-k (`topk_kl_per_token`); mask: (B, T) bool."""
    return masked_mean(topk_kl_per_token(teacher_logprobs, teacher_indices, teacher_rest, student_logits), mask)
