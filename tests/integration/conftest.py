import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def embedded_fp32():
    from constitutional.backends import load_backend

    return load_backend("embedded", dtype="float32", batch_size=8)
