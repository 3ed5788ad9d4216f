"""Shared by the MPI test files (imported after mpi4py is known to be present)."""

import functools as ft
import traceback

import pytest
from mpi4py import MPI

COMM = MPI.COMM_WORLD
RANK = COMM.Get_rank()
SIZE = COMM.Get_size()


def collective(comm):
    """A decorator: fail the test on every rank of `comm` if it fails on any rank
    (each rank's outcome is allgathered, so no rank waits for one that has left)."""

    def decorate(fn):
        @ft.wraps(fn)
        def wrapper(*args, **kwargs):
            error = None
            try:
                fn(*args, **kwargs)
            except pytest.skip.Exception:
                raise
            except BaseException as e:  # noqa: BLE001 - reported on every rank
                error = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
            bad = [(r, e) for r, e in enumerate(comm.allgather(error)) if e is not None]
            if bad:
                pytest.fail(
                    "\n".join(
                        f"--- rank {r} of {comm.Get_size()} ---\n{e}" for r, e in bad
                    ),
                    pytrace=False,
                )

        return wrapper

    return decorate


def raises_everywhere(exc, fn, match: str | None = None) -> str:
    """Call `fn` (collective) and check that it raised `exc` on this rank."""
    with pytest.raises(exc, match=match) as info:
        fn()
    return str(info.value)


def global_matrix(kind: str = "poisson", n: int = 6):
    """The same global matrix on every rank (built locally: no communication)."""
    import numpy as np
    from helpers import poisson3d, random_nonsymmetric

    if kind == "poisson":
        return poisson3d(n)
    return random_nonsymmetric(n**3, np.random.default_rng(7))


@pytest.fixture(autouse=True)
def fresh_cpu_cache(request):
    """Every test but the GPU ones (whose `backend` fixture sees to the cache)
    starts from an empty single-process cache, every rank at the same point."""
    if request.node.get_closest_marker("gpu") is not None:
        yield
        return
    import lineax_amgx as lxa

    lxa.clear_cache()
    lxa.reset_counters()
    COMM.Barrier()
    yield
    COMM.Barrier()
