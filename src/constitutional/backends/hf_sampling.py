"""One decode step's token choice for the `hf` backend, shared by its decode paths (the running
batch of `hf_decode.py` and the static-cache batches of `hf_static.py`).

Each row samples with its own generator seeded from (seed, prompt, sample index) (`row_seed`), so
results do not depend on batch composition or order (reproducible with a seed, also after a
resume). Departure: the repetition penalty is CTRL-style over the generated tokens only.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from .base import GenerationParams


def row_seed(seed: int, ids: Sequence[int], sample: int) -> int:
    h = hashlib.sha256(f"{seed}:{sample}:".encode() + bytes(str(list(ids)), "utf-8")).digest()
    return int.from_bytes(h[:8], "big") & ((1 << 63) - 1)


def penalise_repeats(logits: torch.Tensor, generated: list[list[int]], penalty: float) -> torch.Tensor:
    """logits: (rows, vocab); each row's already generated tokens get the repetition penalty."""
    logits = logits.clone()
    for k, ids in enumerate(generated):
        if ids:
            idx = torch.tensor(sorted(set(ids)), device=logits.device)
            vals = logits[k, idx]
            logits[k, idx] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


NUCLEUS_TOP_K = 256


def nucleus_sorted(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p filtering by a full sort of the vocabulary: the reference `nucleus` must equal.
    Keeps the smallest set of most probable tokens whose mass reaches top_p; the rest get 0."""
    sorted_p, sorted_i = probs.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p > top_p
    sorted_p[drop] = 0
    return torch.zeros_like(probs).scatter_(-1, sorted_i, sorted_p)


def nucleus(probs: torch.Tensor, top_p: float, k: int = NUCLEUS_TOP_K) -> torch.Tensor:
    """`nucleus_sorted` without sorting the whole vocabulary: the `k` most probable tokens first
    (`topk`), and a full sort only for the rows whose top-k mass does not exceed top_p (their
    nucleus may reach past the k-th token). The kept set and its values are the same as the full
    sort's (up to the order of exactly tied probabilities), so the sampled tokens are too."""
    k = min(k, probs.shape[-1])
    top_p_vals, top_i = probs.topk(k, dim=-1)
    cum = top_p_vals.cumsum(-1)
    # token j (0-based, in descending order) is dropped iff the mass before it exceeds top_p; the
    # first token past the top k is then dropped iff the top-k mass exceeds top_p
    inside = cum[:, -1] > top_p
    top_p_vals[cum - top_p_vals > top_p] = 0
    out = torch.zeros_like(probs).scatter_(-1, top_i, top_p_vals)
    if not bool(inside.all()):
        rest = (~inside).nonzero().flatten()
        out[rest] = nucleus_sorted(probs[rest], top_p)
    return out


def draw(probs: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """One token per row of `probs` (rows, vocab: non-negative weights, e.g. a nucleus), row k drawn
    with its own generator `gens[k]` by inverting the row's cumulative distribution at one uniform
    number: a categorical draw from one random number per row, where `torch.multinomial` draws one
    exponential per vocabulary entry (0.9 ms a row for 49,152 tokens on a 2-core CPU). The sums run in
    float64 (exact to ~1e-12 over 49,152 terms); a token of weight 0 is never drawn."""
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in gens])
    cum = probs.double().cumsum(-1)
    tokens = torch.searchsorted(cum, (u * cum[:, -1]).unsqueeze(1), right=True).squeeze(1)  # first token whose cum passes u·total
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).to(torch.int8).argmax(-1)  # u·total can round up to the total
    return torch.minimum(tokens, last)


class Sampling:
    """`HFBackend`'s per-step bookkeeping: sample, record, stop at eos or a stop string, count."""

    def _step(self, logits, active: list[int], generated: list[list[int]], ended: list[bool], gens, params: GenerationParams):
        """One decode step's bookkeeping, shared by both decode paths: penalise repeats, sample a token
        for each active row (logits: one row per active row), record it or mark the row ended (eos or
        a stop string). Returns (tokens, keep: positions in `active` of the rows still generating)."""
        if params.repetition_penalty != 1.0:
            logits = penalise_repeats(logits, [generated[r] for r in active], params.repetition_penalty)
        tokens = self._sample(logits, [gens[r] for r in active], params)
        keep = []
        for k, r in enumerate(active):
            t = int(tokens[k])
            if t in self.eos_ids:
                ended[r] = True
                continue
            generated[r].append(t)
            if params.stop and self._hit_stop(generated[r], params.stop):
                ended[r] = True
                continue
            keep.append(k)
        self.stats["generated_tokens"] += len(active)
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(active)
        return tokens, keep

    def _hit_stop(self, ids: list[int], stops: list[str]) -> bool:
        tail = self.tokenizer.decode(ids[-32:], skip_special_tokens=True)
        return any(s in tail for s in stops)

    @staticmethod
    def _sample(logits: torch.Tensor, gens: list[torch.Generator], params: GenerationParams) -> torch.Tensor:
        """One token per row. logits: (rows, vocab) float32 on the model device."""
        if params.temperature == 0:
            return logits.argmax(-1).cpu()
        probs = torch.softmax(logits / params.temperature, dim=-1).cpu()
        if params.top_p < 1.0:
            probs = nucleus(probs, params.top_p)
        return draw(probs, gens)
