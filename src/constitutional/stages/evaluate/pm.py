"""Preference-model scores of the answers (each model's mean PM score with a bootstrap interval,
beside its Elo) and of the revise records by round (`revision_rounds.py`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from ... import eval_math
from ...errors import UserError
from ...run import RecordShard, RunDir
from .config import Config


def load_pm(path: Path, dtype: str, batch_size: int):
    from ...preference_model import PreferenceModel  # imports TRL: only when a PM is used

    return PreferenceModel.from_pretrained(path, dtype=dtype, batch_size=batch_size)


def pm_location(cfg: Config, run_dir: RunDir) -> Path | None:
    """The PM directory: `pm`, else this run's train-pm/model when it exists, else None."""
    if cfg.pm:
        path = Path(cfg.pm).expanduser()
        if not (path / "config.json").is_file():
            raise UserError(f"eval.pm = {cfg.pm}: no model directory there (no config.json); give a `cai train-pm` model directory, or leave pm empty")
        return path
    path = run_dir.path / "train-pm" / "model"
    return path if (path / "config.json").is_file() else None


def pm_score(pm: Callable, items: list[dict], cfg: Config, shard: RecordShard) -> dict[str, float]:
    todo = [it for it in items if it["id"] not in shard.done]
    for k in tqdm(range(0, len(todo), cfg.batch_size), desc="eval: PM scores", unit="batch", file=sys.stderr):
        chunk = todo[k : k + cfg.batch_size]
        for it, s in zip(chunk, pm().score([it["messages"] for it in chunk], [it["response"] for it in chunk])):
            shard.append({"id": it["id"], "score": s})
    return {r["id"]: r["score"] for r in shard.records}


def mean_ci(values: list[float], cfg: Config) -> dict:
    mean, lo, hi = eval_math.bootstrap_mean(values, cfg.bootstrap, cfg.seed)
    return {"mean": mean, "ci": [lo, hi], "n": len(values)}
