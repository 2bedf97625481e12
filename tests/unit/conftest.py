"""Unit tests run torch on one thread: their tensors are tiny, and on a busy 2-core machine every
small operation otherwise waits on the OpenMP pool (measured ~7x slower); integration tests keep
the default thread count. `first_step_gradient`: a helper for the micro-batch tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def first_step_gradient(trainer):
    """Train a transformers `trainer` for its steps; the flattened gradient of its first optimizer
    step, as the optimizer applies it (after clipping)."""
    import torch
    from transformers import TrainerCallback

    seen = []

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if not seen:
                seen.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone())

    trainer.add_callback(Grab())
    trainer.train()
    return seen[0]
