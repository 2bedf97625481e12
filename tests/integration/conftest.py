import pytest


@pytest.fixture(scope="session")
def embedded_fp32():
    from constitutional.backends import load_backend

    return load_backend("embedded", dtype="float32", batch_size=8)
