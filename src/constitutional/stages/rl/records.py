"""Helpers `cai rl` and `cai dpo` share around their trainers: forwarding TRL's logs to our
callbacks, and fingerprints that tell a resumable run from a changed one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def on_log_callback(handler):
    """A `transformers.TrainerCallback` that forwards `on_log` to `handler` (imported here, not at the
    top, so that `cai --help` does not load transformers)."""
    from transformers import TrainerCallback

    class OnLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            handler.on_log(args, state, control, logs)

    return OnLog()


def mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 4) if values else None


def inputs_fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_stamp(model: str | Path) -> object:
    """What identifies a model's weights: its files' names, sizes and mtimes for a local directory (a
    retrained model is a new directory), else the model string."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return str(model)
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.iterdir()) if f.is_file()]
