# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""AmgX's complex modes (`dZZI`: complex128, `dCCI`: complex64) are not called.

Measured on an H200 with AmgX 2.5.0 built with CUDA 13 (2026-12-03,
`benchmarks/complex_probe.py`, 100^2 unknowns, rtol 1e-8; the GPU validation
log, docs/development/gpu-validation.md): in `dZZI` AmgX refuses FGMRES, PCG,
PBICGSTAB and DENSE_LU_SOLVER ("SolverFactory '...' has not been registered");
GMRES is accepted (with Jacobi or SIZE_8 aggregation AMG) and converged on none
of the three problems (500 iterations, relative residual 0.43-1.0, a Hermitian
positive definite one included). In `dCCI` every one of the 21 combinations
killed the process with a segmentation fault, which no exception can report.

So a complex operator never reaches AmgX by default: `backend="amgx"` is refused
at trace time, and the AmgX branch of `backend="auto"` (traced on every machine,
lowered only for arrays on a CUDA device) carries an operand-free primitive whose
lowering raises the same error: a complex solve of GPU arrays fails when it is
compiled, before anything runs, while a complex solve of CPU arrays (pyamg) is
unaffected on the same machine.

`LINEAX_AMGX_EXPERIMENTAL_COMPLEX=1` (read when a solve is traced) lets the
complex modes through, for re-measuring another AmgX build with the probe: at
the risk of a crash of the process.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import mlir

from ..contract import vector_dtype

ENV = "LINEAX_AMGX_EXPERIMENTAL_COMPLEX"


def enabled() -> bool:
    """Whether the experimental opt-in is set (`LINEAX_AMGX_EXPERIMENTAL_COMPLEX=1`)."""
    return os.environ.get(ENV, "") == "1"


def refusal(mode: str) -> str | None:
    """The error message for a solve in AmgX `mode`, or `None` where AmgX may be
    called (real modes; complex ones with the opt-in)."""
    dtype = jnp.dtype(vector_dtype(mode))
    if not jnp.issubdtype(dtype, jnp.complexfloating) or enabled():
        return None
    return (
        f"AmgX cannot solve complex systems ({dtype.name}, AmgX mode {mode}), so "
        "lineax-amgx does not call it. Measured with AmgX 2.5.0 (CUDA 13 build): "
        "for complex128 (dZZI) AmgX registers GMRES but not FGMRES, PCG, "
        "PBICGSTAB or DENSE_LU_SOLVER, and GMRES (with Jacobi or aggregation AMG) "
        "did not converge on any test problem, Hermitian positive definite ones "
        "included; for complex64 (dCCI) every solver tried crashed the process "
        "(segmentation fault). Use backend='pyamg' (lineax_amgx.AMGX(..., "
        "backend='pyamg'), AMGXPreconditioner(..., backend='pyamg')): it solves "
        "complex systems on the CPU, also for JAX arrays on a GPU (copied to the "
        "host and back); or solve the equivalent real system "
        "[[Re A, -Im A], [Im A, Re A]] [Re x; Im x] = [Re b; Im b] on the GPU. "
        f"(Experimental: {ENV}=1 lets complex modes through to AmgX, for testing "
        "another AmgX build, at the risk of a crash of the process.)"
    )


def check(mode: str) -> None:
    """Trace time (`backend="amgx"`): a `TypeError` for a refused `mode`."""
    message = refusal(mode)
    if message is not None:
        raise TypeError(message)


# An operand-free primitive standing for the AmgX call of a refused mode: its
# abstract value is the call's results; its lowering (reached only when the AmgX
# branch is compiled, i.e. for arrays on a CUDA device) and its eager evaluation
# (`lax.platform_dependent` outside `jit` calls the branch of the default
# backend's platform directly: an eager `AMGXPreconditioner` on a GPU) raise the
# refusal.
refused_p = Primitive("lineax_amgx_refused_mode")
refused_p.multiple_results = True


@refused_p.def_abstract_eval
def _(*, shapes, message):
    del message
    return [jax.core.ShapedArray(shape, dtype) for shape, dtype in shapes]


@refused_p.def_impl
def _(*, shapes, message):
    del shapes
    raise TypeError(message)


def _lowering(ctx, *, shapes, message):
    del ctx, shapes
    raise TypeError(message)


mlir.register_lowering(refused_p, _lowering)


def refused(mode: str, results):
    """Stand-ins for the results (`jax.ShapeDtypeStruct`s, one or a tuple) of an
    AmgX call in `mode` when `mode` is refused (else `None`): compiling them
    raises the refusal."""
    message = refusal(mode)
    if message is None:
        return None
    single = isinstance(results, jax.ShapeDtypeStruct)
    specs = (results,) if single else tuple(results)
    shapes = tuple((tuple(s.shape), jnp.dtype(s.dtype)) for s in specs)
    out = refused_p.bind(shapes=shapes, message=message)
    return out[0] if single else tuple(out)
