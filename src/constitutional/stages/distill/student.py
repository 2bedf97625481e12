"""The student of context distillation: its logits and the KL loss to the teacher (`batch_loss`,
`heldout_kl`), its checkpoints (model, optimizer and loop state under `<run>/distill/checkpoints/`)
and the order of the examples per epoch (`epoch_order`, `epoch_batches`). Steps 4 and 5 of the
stage's docstring; the loop itself is `train` in the stage module.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from ...distill_math import kl_per_token, token_kl, topk_token_kl
from ...run import atomic_write_json
from .teacher import Example, Teacher, response_logits


def student_logits(student, batch: Sequence[Example], pad_id: int, bf16: bool):
    """(logits (B, R, V), mask (B, R)) of the student (input without C) on the response tokens."""
    import torch

    dev = next(student.parameters()).device
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        return response_logits(student, [e.student_ids for e in batch], [e.student_start for e in batch], pad_id)


def _pad_targets(targets: Sequence[tuple], R: int):
    """Stack per-example top-k targets ((T_i, k) log-probs, (T_i, k) ids, (T_i,) rest) into
    (B, R, k), (B, R, k) and (B, R) tensors (padding: zeros, masked out by the loss)."""
    import torch

    k = targets[0][0].shape[-1]
    lp, ix, rest = torch.zeros((len(targets), R, k)), torch.zeros((len(targets), R, k), dtype=torch.long), torch.zeros((len(targets), R))
    for b, (v, i, r) in enumerate(targets):
        lp[b, : len(v)], ix[b, : len(i)], rest[b, : len(r)] = v, i, r
    return lp, ix, rest


def batch_loss(student, teacher: Teacher, batch: Sequence[Example], pad_id: int, bf16: bool, targets: dict | None = None):
    """The distillation loss of one batch (scalar; full-vocabulary KL, or top-k when `targets`)."""
    s_logits, mask = student_logits(student, batch, pad_id, bf16)
    if targets is None:
        t_logits, _ = teacher.logits(batch)
        return token_kl(t_logits, s_logits, mask)
    lp, ix, rest = (t.to(s_logits.device) for t in _pad_targets([targets[e.id] for e in batch], s_logits.shape[1]))
    return topk_token_kl(lp, ix, rest, s_logits, mask)


def heldout_kl(student, teacher: Teacher, examples: Sequence[Example], pad_id: int, bf16: bool, batch_size: int, desc: str) -> dict:
    """Per-token full-vocabulary KL(p0(·|C, x, y<t) ‖ p(·|x, y<t)) over all response tokens of `examples`."""
    import torch

    total, tokens = 0.0, 0
    was_training = student.training
    student.eval()
    chunks = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    with torch.no_grad():
        for chunk in tqdm(chunks, desc=f"distill: held-out KL {desc}", unit="batch", file=sys.stderr):
            s_logits, mask = student_logits(student, chunk, pad_id, bf16)
            t_logits, _ = teacher.logits(chunk)
            kl = kl_per_token(t_logits, s_logits)
            total += float(torch.where(mask, kl, torch.zeros_like(kl)).sum())
            tokens += int(mask.sum())
    student.train(was_training)
    return {"kl_per_token": total / max(1, tokens), "tokens": tokens, "examples": len(examples)}


def _checkpoints(directory: Path) -> list[tuple[int, Path]]:
    out = []
    for d in directory.glob("step-*"):
        try:
            out.append((int(d.name.split("-", 1)[1]), d))
        except ValueError:
            continue
    return sorted(out)


def save_checkpoint(directory: Path, step: int, student, optimizer, state: dict) -> None:
    """Trainable weights, optimizer and `state` into `directory/step-<step>` (temp dir + rename);
    older checkpoints are removed afterwards. `optimizer` None (the last step: nothing trains after
    it) writes no optimizer state, 2/3 of the bytes for AdamW, and marks the checkpoint final."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save({n: p.detach().cpu() for n, p in student.named_parameters() if p.requires_grad}, tmp / "trainable.pt")
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    atomic_write_json(tmp / "state.json", {**state, "step": step, "final": optimizer is None})
    target = directory / f"step-{step}"
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    for s, d in _checkpoints(directory):
        if s != step:
            shutil.rmtree(d, ignore_errors=True)


def load_checkpoint(directory: Path, fingerprint: str, student, optimizer) -> dict | None:
    """Restore the newest checkpoint made for these examples (`fingerprint`); its state, or None."""
    import torch

    for _, d in reversed(_checkpoints(directory)):
        try:
            state = json.loads((d / "state.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if state.get("fingerprint") != fingerprint:
            return None
        student.load_state_dict(torch.load(d / "trainable.pt", weights_only=True), strict=False)
        if not state.get("final"):  # a final checkpoint ends the training: no optimizer state to restore
            optimizer.load_state_dict(torch.load(d / "optimizer.pt", weights_only=True))
        return state
    return None


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a function of (seed, epoch) only, so resume replays it."""
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


GROUP = 16  # batches per length-sorted group


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group: bool) -> list[list[int]]:
    """The batches (example indices) of one epoch, a function of (seed, epoch) only (resume replays it).

    Without `group`: `epoch_order` cut into batches. With it: that order is cut into groups of
    GROUP batches, each group sorted by length (longest first) and cut into batches, and the batches
    are shuffled: a batch's examples have similar lengths, so it carries little padding, while the
    batches still come in random order (transformers' LengthGroupedSampler does the same).
    """
    order = epoch_order(len(lengths), seed, epoch)
    if not group:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    span = GROUP * batch_size
    batches = []
    for g in range(0, len(order), span):
        ranked = sorted(order[g : g + span], key=lambda i: -lengths[i])
        batches += [ranked[i : i + batch_size] for i in range(0, len(ranked), batch_size)]
    random.Random(f"{seed}:{epoch}:batches").shuffle(batches)
    return batches
