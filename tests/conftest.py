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

import _backend  # noqa: E402


@pytest.fixture
def getkey():
    counter = iter(range(10**6))

    def _getkey():
        return jax.random.PRNGKey(next(counter) + 1234)

    return _getkey


@pytest.fixture
def rng():
    return np.random.default_rng(int(os.environ.get("LXA_TEST_SEED", "20261128")))


_HAS_CUDA = None


def _has_cuda() -> bool:
    global _HAS_CUDA
    if _HAS_CUDA is None:
        try:
            _HAS_CUDA = len(jax.devices("cuda")) > 0
        except RuntimeError:
            _HAS_CUDA = False
    return _HAS_CUDA


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """GPU tests skip, saying why, where JAX sees no CUDA device (whatever `-m`
    selected). Asked when the first GPU test runs, not at collection: a file that
    starts `jax.distributed` must do so before JAX's backends start."""
    if item.get_closest_marker("gpu") is not None and not _has_cuda():
        pytest.skip("no CUDA device visible to JAX")


@pytest.fixture(params=_backend.PARAMS)
def backend(request):
    """The backend a test runs on (see `_backend.py`): `cpu` (pyamg) and `gpu`
    (AmgX, marked `gpu`). Starts the test from an empty setup cache of capacity 8
    with zeroed counters and leaves it empty; CPU tests run with the CPU as JAX's
    default device."""
    with _backend.Backend(request.param).running() as b:
        yield b


@pytest.fixture
def on_cpu(request):
    """A CPU test without the `backend` fixture gets what `backend` gives its CPU
    case: an empty setup cache of capacity 8 with zeroed counters (left empty),
    and the CPU as JAX's default device (the backend follows where the data
    lives, so `AMGX()` runs pyamg even on a machine with a GPU). Modules use it
    through `pytestmark = pytest.mark.usefixtures("on_cpu")`; tests that take
    `backend`, and GPU tests, are left to `backend`."""
    if _backend.uses_backend(request) or _backend.on_gpu(request):
        yield
        return
    with _backend.Backend("cpu").running():
        yield


@pytest.fixture(autouse=True)
def _fresh_setup_cache(request):
    """GPU tests that do not take `backend` start from an empty setup cache of
    capacity 8 with zeroed counters, and leave it empty (as `backend` does)."""
    if not _backend.on_gpu(request) or _backend.uses_backend(request):
        yield
        return
    with _backend.Backend("gpu").running():
        yield
