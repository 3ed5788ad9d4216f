import os
import sys

# Under an MPI launcher several ranks may share one GPU (the one-GPU test
# machine runs the distributed GPU tests so): none may take 75 % of its memory
# up front. Read by JAX when its GPU backend starts, after this file.
if int(os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("PMI_SIZE", "1"))) > 1:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)

# Tests run with --import-mode=importlib against the *installed* package (the
# repository root is not put on sys.path); shared helpers live beside this file.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def getkey():
    counter = iter(range(10**6))

    def _getkey():
        return jax.random.PRNGKey(next(counter) + 1234)

    return _getkey


@pytest.fixture
def rng():
    return np.random.default_rng(int(os.environ.get("LXA_TEST_SEED", "20261128")))


def pytest_collection_modifyitems(config, items):
    gpu_selected = "gpu" in (config.getoption("-m") or "")
    if not gpu_selected:
        return
    try:
        has_gpu = len(jax.devices("cuda")) > 0
    except RuntimeError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="no CUDA device visible to JAX")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_setup_cache(request):
    """GPU tests start from an empty setup cache of capacity 8 with zeroed
    counters, and leave it empty."""
    if request.node.get_closest_marker("gpu") is None:
        yield
        return
    import lineax_amgx as lxa

    lxa.set_cache_size(8)
    lxa.clear_cache()
    lxa.reset_counters()
    yield
    lxa.set_cache_size(8)
    lxa.clear_cache()
