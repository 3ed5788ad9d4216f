"""The backend a test runs on: the CPU (pyamg) or the GPU (AmgX).

A test that runs on both takes the `backend` fixture (conftest.py), parametrised
over `cpu` and `gpu`; the `gpu` parameter carries the `gpu` mark, so it is
deselected unless `pytest -m gpu` (on a machine with AmgX). `cases(...)` gives
each backend its own list of cases; `only("gpu")` / `only("cpu")` is a test that
makes sense on one backend alone (its id still says which). Per-backend sizes and
tolerances come from `backend.pick(cpu=..., gpu=...)`.

The fixture also starts each test from an empty setup cache of capacity 8 with
zeroed counters, and leaves it empty: one setup per key on the GPU (AmgX's
default), four on the CPU (pyamg's default). CPU tests run with the CPU as JAX's
default device, so that they exercise pyamg even on a machine with a GPU.

(lineax_amgx is imported where it is used: conftest.py imports this module, and
the package is not imported at collection.)
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

NAMES = ("cpu", "gpu")


def param(name: str, *values, id: str | None = None):
    """One case: the backend `name` and the values of the test's other arguments;
    a GPU case carries the `gpu` mark."""
    assert name in NAMES, name
    marks = [pytest.mark.gpu] if name == "gpu" else []
    return pytest.param(name, *values, marks=marks, id=id)


PARAMS = [param("cpu"), param("gpu")]


def cases(argnames: str, *, cpu=(), gpu=()):
    """Parametrise `backend` together with `argnames` (`"a"` or `"a, b"`), with a
    list of cases per backend: `cpu` and `gpu` hold the values (tuples for several
    names). Ids are `backend-value...`, as with the plain fixture."""
    names = [n.strip() for n in argnames.split(",")]

    def rows(name, values):
        for v in values:
            yield param(name, *(v if len(names) > 1 else (v,)))

    return pytest.mark.parametrize(
        ["backend", *names], [*rows("cpu", cpu), *rows("gpu", gpu)],
        indirect=["backend"],
    )


def only(name: str):
    """A test of one backend only: `@only("gpu")`."""
    return pytest.mark.parametrize("backend", [param(name)], indirect=True)


class Backend:
    """What a test needs to know about the backend it runs on."""

    def __init__(self, name: str):
        assert name in NAMES, name
        self.name = name
        self.gpu = name == "gpu"
        self.cache = "amgx" if self.gpu else "pyamg"  # lxa.cache_info(backend=...)

    def __repr__(self):
        return f"Backend({self.name!r})"

    @functools.cached_property
    def device(self):
        return jax.devices("cuda" if self.gpu else "cpu")[0]

    def pick(self, *, cpu, gpu):
        """This backend's value of a setting (a size, a tolerance, a limit)."""
        return gpu if self.gpu else cpu

    def put(self, x):
        """`x` as a JAX array on this backend's device."""
        return jax.device_put(jnp.asarray(x), self.device)

    def op(self, a, tags=(), dtype=np.float64, **kwargs):
        """The `CSROperator` of the scipy matrix `a`, on this backend's device."""
        import lineax_amgx as lxa

        op = lxa.CSROperator.from_scipy(a, tags=tags, dtype=dtype, **kwargs)
        return jax.device_put(op, self.device)

    def counts(self, *outputs, keys=("setups", "resetups", "solves", "size")):
        """This backend's cache counters, once `outputs` are computed (dispatch is
        asynchronous: counters read too early miss work still in flight)."""
        import lineax_amgx as lxa

        jax.block_until_ready(outputs)
        info = lxa.cache_info(self.cache)
        return {k: info[k] for k in keys}

    def fresh_cache(self):
        """An empty cache of capacity 8."""
        import lineax_amgx as lxa

        if self.gpu:
            lxa.set_cache_size(8)
        else:
            lxa.set_cache_size(8, entries_per_key=4)
        lxa.clear_cache()

    @contextlib.contextmanager
    def running(self):
        """The test's surroundings: a fresh cache, left empty; on the CPU, the CPU
        as JAX's default device."""
        import lineax_amgx as lxa

        self.fresh_cache()
        lxa.reset_counters()
        try:
            if self.gpu:
                yield self
            else:
                with jax.default_device(self.device):
                    yield self
        finally:
            self.fresh_cache()


def on_gpu(request) -> bool:
    """Whether the requesting test is a GPU test."""
    return request.node.get_closest_marker("gpu") is not None


def uses_backend(request) -> bool:
    """Whether the requesting test takes the `backend` fixture (which then sets up
    the cache and the device; a module's own cache fixture stays out of its way)."""
    return "backend" in request.fixturenames
