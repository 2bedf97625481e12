"""RL-CAI's reward: the preference model's score of each sampled response (`PolicyReward`, what TRL
calls per generation batch), where that PM is, and the warning for a reward that climbed while the
PM is at chance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence


from ...errors import UserError
from ...feedback import CHANCE_MARGIN
from ...rl_math import apply_length_penalty, normalize_rewards
from ...run import RunDir

from .config import Config

ScoreFn = Callable[[Sequence, Sequence[str]], Sequence[float]]  # (conversations, responses) -> scores


def reward_model_dir(cfg: Config, run_dir: RunDir) -> Path:
    return Path(cfg.reward_model).expanduser() if cfg.reward_model else run_dir.path / "train-pm" / "model"


def read_pm_metrics(pm_dir: Path) -> dict | None:
    """`cai train-pm`'s metrics.json beside the PM directory (held-out and MC accuracy), if there is one."""
    path = pm_dir.parent / "metrics.json"
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: malformed JSON; rerun `cai train-pm --force` or delete the file") from None
    return metrics if isinstance(metrics, dict) else None


def pm_at_chance(metrics: dict | None) -> str | None:
    """'held-out accuracy 0.52, MC accuracy 0.49' for each PM accuracy within CHANCE_MARGIN of 0.5, else None."""
    found = []
    for label, key in (("held-out", "heldout"), ("MC", "mc")):
        acc = ((metrics or {}).get(key) or {}).get("accuracy")
        if acc is not None and abs(acc - 0.5) <= CHANCE_MARGIN:
            found.append(f"{label} accuracy {acc:.2f}")
    return ", ".join(found) or None


def chance_warning(metrics: dict | None, scores: Sequence[float]) -> str | None:
    """The warning for a reward that climbed (mean PM score of the last third of the steps above the
    first third's) while the PM is at chance; None otherwise."""
    chance = pm_at_chance(metrics)
    if not chance or len(scores) < 2:
        return None
    k = max(1, len(scores) // 3)
    first, last = sum(scores[:k]) / k, sum(scores[-k:]) / k
    if last <= first:
        return None
    return (f"the reward climbed (mean PM score {first:.3f} -> {last:.3f}, first vs last third of the steps) while the "
            f"preference model is at chance ({chance}): the reward has nothing to teach, so the policy learned the PM's "
            "noise, not the constitution; train a better PM (more or cleaner labels, a stronger feedback model) first")


class PolicyReward:
    """The reward function TRL calls once per generation batch (B prompts x G samples).

    TRL 1.16 passes `prompts` (the dataset's message lists, each repeated G times in a row),
    `completions` ([{"role": "assistant", "content": text}] per sample for conversational prompts),
    `completion_ids` (token ids, with the eos token when one was sampled), the dataset's other columns
    and `log_metric`. Returns one float per sample: the score, whitened over the batch if `normalize`,
    minus `length_penalty` per 100 completion tokens. The raw score is logged as `rl/score`.
    """

    __name__ = "preference_model"  # TRL names its reward metrics after it

    def __init__(self, score: ScoreFn, normalize: bool, length_penalty: float):
        self.score, self.normalize, self.length_penalty = score, normalize, length_penalty

    def __call__(self, prompts, completions, completion_ids, log_metric=None, **_):
        texts = [(c[-1]["content"] if isinstance(c, list) else c).strip() for c in completions]
        raw = [float(s) for s in self.score(prompts, texts)]
        shaped = normalize_rewards(raw) if self.normalize else raw
        if self.length_penalty:
            shaped = apply_length_penalty(shaped, [len(ids) for ids in completion_ids], self.length_penalty)
        if log_metric is not None:
            mean = sum(raw) / len(raw)
            log_metric("rl/score", mean)
            log_metric("rl/score_std", (sum((r - mean) ** 2 for r in raw) / len(raw)) ** 0.5)
        return shaped
