"""TRL's `DPOTrainer` with a per-example soft target and the per-token KL to the reference.

The loss is `dpo_math.soft_dpo_loss`: each row carries `p_chosen`, the target probability that
its chosen response is the better one (the AI labeler's soft label, 1 for a revision pair). With
`hard=True` every target is 1, which is TRL's own `sigmoid` loss (the unit tests pin the two
together). TRL 1.16 keeps only prompt_ids/chosen_ids/rejected_ids for its collator and has no
per-example target, so, as `preference_model.SoftLabelRewardTrainer` does for the reward trainer,
this keeps `p_chosen` as a signature column, adds it in the collator, and replaces `compute_loss`.
TRL still does the rest: tokenising the conversational prompt/chosen/rejected rows, truncation,
the reference model (a separate frozen model, or with LoRA the policy with its adapter switched
off), dropout off, the training loop, checkpoints and the averaging of logged metrics.

Departure from TRL's computation: the policy's and the reference's full next-token logits are
computed (TRL's fused LM head returns only the log-probability of each label), because the logged
KL to the reference, KL(πθ(·|x, y<t) ‖ πref(·|x, y<t)) over the vocabulary at every response
token (chosen and rejected), needs both distributions. This costs the memory of (2B, T, V) logits,
as supervised fine-tuning with a batch of 2B does. The log-probabilities are the same as TRL's
(tested to 1e-5 in float32).

Logged per step (TRL's names; the stage maps them to dpo/...): rewards/chosen and rewards/rejected
(β·log πθ/πref, mean over the batch), rewards/margins (β·Δ), rewards/accuracies (share with Δ > 0),
kl (nats per response token), logps/chosen and logps/rejected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from trl import DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import use_adapter

from .distill_math import kl_per_token
from .dpo_math import completion_logps, soft_dpo_loss


@dataclass
class SoftTargetCollator(DataCollatorForPreference):
    """TRL's preference collator plus `p_chosen`: (B,) float32 targets, in row order.

    Batch layout (from TRL): input_ids / attention_mask / completion_mask (2B, T), rows [0, B)
    prompt + chosen, [B, 2B) prompt + rejected, right-padded.
    """

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().torch_call(examples)
        out["p_chosen"] = torch.tensor([float(e["p_chosen"]) for e in examples], dtype=torch.float32)
        return out


class SoftDPOTrainer(DPOTrainer):
    """`trl.DPOTrainer` whose rows carry a `p_chosen` column (see the module docstring)."""

    def __init__(self, *args, hard: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.hard = hard
        c = self.data_collator
        self.data_collator = SoftTargetCollator(pad_token_id=c.pad_token_id, max_length=c.max_length,
                                                truncation_mode=c.truncation_mode, pad_to_multiple_of=c.pad_to_multiple_of)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "p_chosen" not in self._signature_columns:
            self._signature_columns.append("p_chosen")

    def _reference_logits(self, inputs) -> torch.Tensor:
        with torch.no_grad():
            if self.ref_model is not None:
                return next_token_logits(self.ref_model, inputs)
            unwrapped = self.accelerator.unwrap_model(self.model)  # LoRA: the policy with its adapter off
            with use_adapter(unwrapped, adapter_name=None):
                return next_token_logits(self.model, inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        labels, mask = inputs["input_ids"][:, 1:], inputs["completion_mask"][:, 1:].bool()
        logits, ref_logits = next_token_logits(model, inputs), self._reference_logits(inputs)
        policy_chosen, policy_rejected = completion_logps(logits, labels, mask).chunk(2)
        ref_chosen, ref_rejected = completion_logps(ref_logits, labels, mask).chunk(2)
        p = torch.ones_like(policy_chosen) if self.hard else inputs["p_chosen"]
        loss = soft_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, p, self.beta)

        with torch.no_grad():
            gather = self.accelerator.gather_for_metrics
            kl_sum, tokens = kl_per_token(logits[mask], ref_logits[mask]).sum(), mask.sum()
            kl = gather(kl_sum).sum() / gather(tokens).sum().clamp(min=1)
            chosen_rewards = gather(self.beta * (policy_chosen - ref_chosen).detach())
            rejected_rewards = gather(self.beta * (policy_rejected - ref_rejected).detach())
            metrics = self._metrics[mode]
            metrics["rewards/chosen"].append(chosen_rewards.mean().item())
            metrics["rewards/rejected"].append(rejected_rewards.mean().item())
            metrics["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
            metrics["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
            metrics["kl"].append(kl.item())
            metrics["logps/chosen"].append(gather(policy_chosen.detach()).mean().item())
            metrics["logps/rejected"].append(gather(policy_rejected.detach()).mean().item())
            if mode == "train":  # the real tokens trained on, as TRL's own compute_loss counts them (the summary's tokens/s)
                self._total_train_tokens += int(gather(inputs["attention_mask"].sum()).sum().item()) // self._tp_size
            metrics["num_tokens"] = [self._total_train_tokens]
        if return_outputs:
            return loss, {"policy_chosen": policy_chosen, "policy_rejected": policy_rejected,
                          "reference_chosen": ref_chosen, "reference_rejected": ref_rejected}
        return loss


def next_token_logits(model, inputs) -> torch.Tensor:
    """(2B, T - 1, V) for a collated batch: position t predicts token t + 1."""
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).logits[:, :-1]


@torch.no_grad()
def sequence_logps(model, dataset, collator, batch_size: int = 8) -> tuple[list[float], list[float]]:
    """log π(chosen|x) and log π(rejected|x) of each row of a prepared (tokenized) `dataset`, in row
    order, under a plain model (no trainer, no autocast: computed in the weights' dtype), batched by
    `collator` as in training."""
    device = next(model.parameters()).device
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        logps = completion_logps(next_token_logits(model, batch), batch["input_ids"][:, 1:], batch["completion_mask"][:, 1:].bool())
        c, r = logps.chunk(2)
        chosen += c.tolist()
        rejected += r.tolist()
    return chosen, rejected
