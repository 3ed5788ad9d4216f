"""Shared by the MPI test files (imported after mpi4py is known to be present)."""

import functools as ft
import traceback

import pytest


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
