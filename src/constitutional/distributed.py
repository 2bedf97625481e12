"""Several training processes on one run directory: `cai sft`, `cai train-pm` and `cai rl` under
`accelerate launch` (or `torchrun`), on several GPUs or, for tests, several CPU processes (gloo).

The trainers (TRL on `accelerate`) already split the batches, all-reduce the gradients and save
checkpoints from the main process. What this module adds is the run directory's side of it:

- only the main process (rank 0) takes the run directory's lock, decides whether the stage runs
  (it may be done already, or its folder stale) and writes the manifest; the outcome, or the error,
  reaches the other ranks by a broadcast (`on_main`), so that they never disagree about running,
  skipping or stopping;
- inside a stage, files outside the trainer (datasets, stamps, metrics, the saved model, the
  evaluation) are written by the main process only, with barriers where the other ranks must see
  them (`main_first`, `barrier`);
- generation stages (revise, label, eval, ...) are single-process by design: at scale they send
  their requests to an inference server (`openai:URL#model`), so under a multi-process launch they
  refuse to start instead of writing every record once per rank.

Ranks come from the launcher's environment (`RANK`, `WORLD_SIZE`). The process group is created by
`accelerate.PartialState` with the same device choice as the trainers (`use_cpu` when there is no
GPU: gloo), so the trainer reuses it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator

from .errors import UserError

# The stages that train with a TRL trainer and know how to share a run directory between ranks.
TRAINING_STAGES = ("sft", "train-pm", "rl")


def world_size() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def is_main() -> bool:
    return rank() == 0


def _state():
    """The process group (created once; the trainers' `accelerate` state reuses it)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def barrier() -> None:
    """Wait until every rank reaches this point (a no-op in a single process)."""
    if world_size() > 1:
        _state().wait_for_everyone()


def broadcast(obj: Any) -> Any:
    """The main process's `obj` on every rank (a no-op in a single process)."""
    if world_size() == 1:
        return obj
    import torch.distributed as dist

    _state()
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], Any]) -> Any:
    """`fn()` run by the main process; its result, or its `UserError`, reaches every rank (so that
    no rank goes on while another stops). In a single process: `fn()`."""
    if world_size() == 1:
        return fn()
    outcome = None
    if is_main():
        try:
            outcome = ("ok", fn())
        except UserError as e:
            outcome = ("error", str(e))
    kind, value = broadcast(outcome)
    if kind == "error":
        raise UserError(value)
    return value


@contextlib.contextmanager
def main_first() -> Iterator[bool]:
    """The main process runs the block first (and writes), the others after it; yields is_main()."""
    if not is_main():
        barrier()
    try:
        yield is_main()
    finally:
        if is_main():
            barrier()
