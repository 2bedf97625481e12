"""Unit tests run torch on one thread: their tensors are tiny, and on a busy 2-core machine every
small operation otherwise waits on the OpenMP pool (measured ~7x slower); integration tests keep
the default thread count."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
