"""The preference model (PM): a scalar score r(x, y) for a response y to a conversation x.

Bai et al. 2022 (Constitutional AI) §4.1: the AI-labelled harmlessness comparisons, mixed with
helpfulness comparisons, train a preference model whose score is then the RL reward. The PM is the
base model with a scalar head (`AutoModelForSequenceClassification`, `num_labels=1`, read at the
last non-pad token), trained on soft labels p = P(chosen preferred) from the feedback model:

    loss = -[p · log σ(r_c - r_r) + (1 - p) · log σ(r_r - r_c)]

which is the cross-entropy between the labeler's p and the PM's Bradley–Terry probability
σ(r_c - r_r); p = 1 is TRL's hard-label loss.

Contents: the loss (`soft_preference_loss`, a pure function), the `trl.RewardTrainer` subclass that
carries `p_chosen` through TRL's data pipeline (`SoftLabelRewardTrainer`), the row format shared by
training and scoring (`preference_row`, `encode`), and `PreferenceModel`, which loads a trained PM
and scores (prompt, response) pairs exactly as the trainer tokenized them.

Rendering: with a chat template, rows are TRL conversational rows (`prompt` = messages, `chosen` /
`rejected` = one assistant message) and the PM reads `apply_chat_template(prompt + [response])`,
including any default system prompt the template injects (SmolLM2's does), the same as the policy
sees. Without a chat template (base models) rows are text in the paper's transcript form,
`"\\n\\nHuman: ...\\n\\nAssistant:" + " " + response + eos`, as TRL does for standard rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from trl import RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from .backends.base import Conversation, as_messages
from .errors import UserError


def soft_preference_loss(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor, p_chosen: torch.Tensor) -> torch.Tensor:
    """Mean soft-label Bradley–Terry loss.

    rewards_chosen, rewards_rejected: (B,) PM scores r_c, r_r (any float dtype; computed in float32
    or wider). p_chosen: (B,) probability in [0, 1] that the chosen response is the better one.
    Returns a scalar: mean over the batch of -[p·log σ(m) + (1-p)·log σ(-m)], m = r_c - r_r, in nats.
    `logsigmoid` keeps it finite for any margin (no log(0) when σ(m) rounds to 0 or 1).
    """
    margin = rewards_chosen - rewards_rejected
    if margin.dtype in (torch.float16, torch.bfloat16):
        margin = margin.float()
    p = p_chosen.to(device=margin.device, dtype=margin.dtype)
    return -(p * F.logsigmoid(margin) + (1 - p) * F.logsigmoid(-margin)).mean()


def calibration(rewards_chosen: Sequence[float], rewards_rejected: Sequence[float], p_chosen: Sequence[float], bins: int = 5) -> dict:
    """Agreement with the labeler and calibration of the PM's probabilities on N comparisons.

    The PM's probability that the chosen response is better is q = σ(r_c - r_r). Each pair is
    oriented to the PM's pick (chosen when q >= 0.5): confidence c = max(q, 1 - q) in [0.5, 1], and
    the label's probability that the pick is better is p (or 1 - p). Returns
    - accuracy: share of pairs with r_c > r_r (agreement with the labeler's choice; ties count as wrong);
    - loss: mean soft-label loss (nats);
    - bins: `bins` equal-width confidence bins over [0.5, 1], each with count, mean confidence,
      mean label probability of the pick (`label_p`) and the share of picks the labeler also
      preferred (`agreement`; a p = 0.5 label counts half); empty bins have None;
    - ece: expected calibration error, Σ_b (n_b / N)·|confidence_b - label_p_b|.
    """
    n = len(p_chosen)
    if not (len(rewards_chosen) == len(rewards_rejected) == n) or n == 0:
        raise ValueError("calibration: needs equally many (>= 1) chosen rewards, rejected rewards and labels")
    rc = torch.tensor(rewards_chosen, dtype=torch.float64)
    rr = torch.tensor(rewards_rejected, dtype=torch.float64)
    p = torch.tensor(p_chosen, dtype=torch.float64)
    q = torch.sigmoid(rc - rr)
    picks_chosen = q >= 0.5
    conf = torch.where(picks_chosen, q, 1 - q)
    label = torch.where(picks_chosen, p, 1 - p)
    agree = torch.where(label > 0.5, 1.0, torch.where(label < 0.5, 0.0, 0.5)).to(torch.float64)
    index = ((conf - 0.5) / 0.5 * bins).long().clamp(0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        sel = index == b
        k = int(sel.sum())
        row = {"lo": 0.5 + 0.5 * b / bins, "hi": 0.5 + 0.5 * (b + 1) / bins, "count": k, "confidence": None, "label_p": None, "agreement": None}
        if k:
            row.update(confidence=float(conf[sel].mean()), label_p=float(label[sel].mean()), agreement=float(agree[sel].mean()))
            ece += k / n * abs(row["confidence"] - row["label_p"])
        table.append(row)
    return {
        "count": n,
        "accuracy": float((rc > rr).double().mean()),
        "loss": float(soft_preference_loss(rc, rr, p)),
        "ece": ece,
        "bins": table,
    }


# ---------------------------------------------------------------- rows and tokenization
def _completion(tokenizer, messages: list[dict], response: str) -> tuple[Any, Any]:
    """(prompt, completion) for one side of a comparison, in the form TRL's RewardTrainer consumes."""
    if getattr(tokenizer, "chat_template", None):
        return messages, [{"role": "assistant", "content": response}]
    from .data.loaders import to_transcript

    return "\n\n" + to_transcript(messages) + "\n\nAssistant:", " " + response


def preference_row(tokenizer, prompt: Conversation, chosen: str, rejected: str, p_chosen: float) -> dict:
    """One training row in TRL's preference format plus the soft label.

    `{"prompt": [messages], "chosen": [assistant message], "rejected": [...], "p_chosen": p}` with a chat
    template; text fields (transcript form) without one. `prompt` is a string (one user turn) or messages.
    """
    messages = as_messages(prompt)
    prompt_part, chosen_part = _completion(tokenizer, messages, chosen)
    _, rejected_part = _completion(tokenizer, messages, rejected)
    return {"prompt": prompt_part, "chosen": chosen_part, "rejected": rejected_part, "p_chosen": float(p_chosen)}


def encode(tokenizer, prompt: Conversation, response: str) -> list[int]:
    """Token ids of (prompt, response) exactly as `RewardTrainer` tokenizes a `preference_row` side."""
    return _encode(tokenizer, *_completion(tokenizer, as_messages(prompt), response))


def row_width(tokenizer, row: dict) -> int:
    """Tokens of a `preference_row` in a padded batch: its two sides, each as long as the longer."""
    return 2 * max(len(_encode(tokenizer, row["prompt"], row[side])) for side in ("chosen", "rejected"))


def _encode(tokenizer, prompt_part, completion) -> list[int]:
    if isinstance(prompt_part, list):
        return list(tokenizer.apply_chat_template(prompt_part + completion, tokenize=True, return_dict=True)["input_ids"])
    eos = tokenizer.eos_token or ""
    if not completion.endswith(eos):  # TRL appends EOS to standard (non-chat) rows
        completion += eos
    return list(tokenizer(text=prompt_part + completion)["input_ids"])


# ---------------------------------------------------------------- training
@dataclass
class SoftLabelCollator(DataCollatorForPreference):
    """TRL's preference collator plus `p_chosen`: (B,) float32 soft labels, in row order.

    Batch layout (from TRL): input_ids / attention_mask (2B, T), rows [0, B) chosen, [B, 2B) rejected.
    """

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().torch_call(examples)
        out["p_chosen"] = torch.tensor([float(e["p_chosen"]) for e in examples], dtype=torch.float32)
        return out


class SoftLabelRewardTrainer(RewardTrainer):
    """`trl.RewardTrainer` with the soft-label loss; rows carry a `p_chosen` column.

    TRL 1.16 drops every column but chosen_ids/rejected_ids/margin before collation and its collator
    ignores unknown keys, so this keeps `p_chosen` as a signature column, swaps in `SoftLabelCollator`,
    and replaces the loss in `compute_loss`. TRL's metrics (accuracy, margin, rewards) are kept. A
    `length` column, when the dataset has one, is kept for transformers' length-grouped sampler.
    """

    def __init__(self, *args, **kwargs):
        custom_collator = kwargs.get("data_collator") is not None
        super().__init__(*args, **kwargs)
        if not custom_collator:
            self.data_collator = SoftLabelCollator(
                pad_token_id=self.processing_class.pad_token_id, pad_to_multiple_of=self.args.pad_to_multiple_of
            )

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["chosen_ids", "rejected_ids", "p_chosen", "length"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        p_chosen = inputs.pop("p_chosen")
        # TRL's compute_loss runs the model and records its metrics; its hard-label loss is replaced.
        _, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        rewards_chosen, rewards_rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
        loss = soft_preference_loss(rewards_chosen, rewards_rejected, p_chosen)
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * torch.mean((rewards_chosen + rewards_rejected) ** 2)
        return (loss, outputs) if return_outputs else loss


# ---------------------------------------------------------------- inference
class PreferenceModel:
    """A trained PM: `score(prompts, responses)` -> one float per pair (higher = preferred).

    Sequences are right-padded like TRL's collator and scored in length-sorted batches, so a batched
    score equals the one-by-one score. A sequence longer than the model's context keeps its last
    tokens (the score is read at the end).
    """

    def __init__(self, model, tokenizer, batch_size: int = 16, name: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = max(1, int(batch_size))
        self.name = name or getattr(model.config, "_name_or_path", "pm")
        self.device = next(model.parameters()).device
        pad = model.config.get_text_config().pad_token_id
        self.pad_id = int(pad if pad is not None else tokenizer.pad_token_id)
        self.max_positions = int(getattr(model.config.get_text_config(), "max_position_embeddings", 0) or 1 << 30)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "float32", batch_size: int = 16, device: str = "auto") -> "PreferenceModel":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from .backends.hf import resolve_dtype

        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise UserError(f"preference model {path}: no such model directory (no config.json); run `cai train-pm` first or check the path")
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
            model = AutoModelForSequenceClassification.from_pretrained(
                str(path), dtype=resolve_dtype(dtype, dev), use_safetensors=True, trust_remote_code=False
            )
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"preference model {path}: cannot load it ({first[:200]}); point to a `cai train-pm` model directory") from None
        if model.config.num_labels != 1:
            raise UserError(f"preference model {path}: has {model.config.num_labels} labels, not a scalar head; point to a `cai train-pm` model directory")
        return cls(model.to(dev), tokenizer, batch_size=batch_size, name=str(path))

    def encode(self, prompt: Conversation, response: str) -> list[int]:
        ids = encode(self.tokenizer, prompt, response)
        return ids[-self.max_positions :]

    @torch.no_grad()
    def score(self, prompts: Sequence[Conversation], responses: Sequence[str]) -> list[float]:
        """Scores r(prompt_i, response_i); prompts are strings (one user turn) or chat-message lists."""
        if len(prompts) != len(responses):
            raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses")
        seqs = [self.encode(p, r) for p, r in zip(prompts, responses)]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = [0.0] * len(seqs)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            width = max(len(seqs[i]) for i in idx)
            input_ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                input_ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
                attention_mask[row, : len(seqs[i])] = 1
            logits = self.model(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device), use_cache=False
            ).logits
            for row, i in enumerate(idx):
                out[i] = float(logits[row, 0])
        return out
