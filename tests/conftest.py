"""Shared pytest set-up. Fixtures live in tests/fixtures_*.py modules, one per area, loaded here."""

import os

import pytest

# Two cores on CI: keep torch from oversubscribing when several processes run.
os.environ.setdefault("OMP_NUM_THREADS", "1")

pytest_plugins = [
    p for p in ("tests.fixtures_data", "tests.fixtures_model", "tests.fixtures_pipeline")
    if os.path.exists(os.path.join(os.path.dirname(__file__), p.split(".")[1] + ".py"))
]


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Tests that run CLIs in-process (e.g. `jowa bench --threads 2`) must not change the thread count of the
    tests after them: bit-exact comparisons across processes depend on it."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
