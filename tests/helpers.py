"""Problem factories and reference helpers shared by the tests."""

import math
import re

import lineax as lx
import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

SPD = (lx.symmetric_tag, lx.positive_semidefinite_tag)


def gpu_array(x):
    """`x` as a JAX array on the first CUDA device (GPU tests)."""
    import jax
    import jax.numpy as jnp

    return jax.device_put(jnp.asarray(x), jax.devices("cuda")[0])


def poisson2d(n: int) -> sp.csr_array:
    import pyamg

    return sp.csr_array(pyamg.gallery.poisson((n, n), format="csr"))


def poisson3d(n: int) -> sp.csr_array:
    import pyamg

    return sp.csr_array(pyamg.gallery.poisson((n, n, n), format="csr"))


def anisotropic2d(n: int, eps: float = 1e-3, theta: float = np.pi / 8) -> sp.csr_array:
    import pyamg

    stencil = pyamg.gallery.diffusion_stencil_2d(epsilon=eps, theta=theta, type="FD")
    return sp.csr_array(pyamg.gallery.stencil_grid(stencil, (n, n), format="csr"))


def elasticity2d(n: int, *, block: bool = False):
    """pyamg's 2-D linear elasticity (2 unknowns per node): scalar CSR, or the
    2 x 2 BSR matrix with `block=True`."""
    import pyamg

    a, _ = pyamg.gallery.linear_elasticity((n, n), format="bsr")
    a = sp.bsr_array(a)
    return a if block else sp.csr_array(a.tocsr())


def convection_diffusion2d(n: int, peclet: float = 100.0) -> sp.csr_array:
    """Upwind first-order convection (velocity (1, 0.5)) + 5-point diffusion on the
    unit square, Dirichlet boundaries: non-symmetric, an M-matrix."""
    h = 1.0 / (n + 1)
    eye = sp.eye(n)
    d2 = sp.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(n, n)) / h**2
    d1 = sp.diags([-1.0, 1.0], [-1, 0], shape=(n, n)) / h  # backward difference
    lap = sp.kron(eye, d2) + sp.kron(d2, eye)
    conv = peclet * (sp.kron(eye, d1) + 0.5 * sp.kron(d1, eye))
    return sp.csr_array((lap + conv) * h**2)


def random_nonsymmetric(n: int, rng, density: float = 0.05) -> sp.csr_array:
    """A random diagonally dominant non-symmetric matrix."""
    a = sp.random(n, n, density=density, random_state=rng, format="csr")
    a = a - sp.diags(a.diagonal())
    rowsum = np.asarray(np.abs(a).sum(axis=1)).ravel()
    return sp.csr_array(a + sp.diags(rowsum + 1.0 + rng.random(n)))


def rel_err(x, ref) -> float:
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def rel_residual(a, x, b) -> float:
    x = np.asarray(x, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(b - a @ x) / np.linalg.norm(b))


def true_residual(a, x, b) -> float:
    """`||b - A x||_2` in float64."""
    x = np.asarray(x, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(b - sp.csr_array(a, dtype=np.float64) @ x))


def reference(a, b) -> np.ndarray:
    """Float64 direct solve."""
    a64 = sp.csc_array(a, dtype=np.float64)
    return spla.spsolve(a64, np.asarray(b, dtype=np.float64))


def dense_solve_fn(pattern):
    """`(values, b) -> x` by a dense float64 solve: the reference for gradients."""
    import jax.numpy as jnp

    def fn(values, b):
        m = jnp.zeros(pattern.shape, values.dtype)
        m = m.at[pattern.row_ids, pattern.indices].add(values)
        return jnp.linalg.solve(m, b)

    return fn


def jacobian_nonzeros(fn, x, points=2, seed=0) -> np.ndarray:
    """The nonzero pattern (dense bool) of `jax.jacfwd(fn)` at `points` random
    points near `x`, united: a reference for sparsity detection from a different
    method (differentiation, not index-set propagation)."""
    import jax
    import jax.flatten_util

    rng = np.random.default_rng(seed)
    flat, unravel = jax.flatten_util.ravel_pytree(x)
    xps = flat + rng.standard_normal((points,) + flat.shape)
    J = jax.jit(jax.vmap(jax.jacfwd(
        lambda v: jax.flatten_util.ravel_pytree(fn(unravel(v)))[0])))(xps)
    return np.any(np.asarray(J) != 0, axis=0)


def import_asdex():
    """`asdex`, or skip the calling test saying why: asdex is not installed, or it
    is installed but does not import with this JAX (asdex 0.5.2 imports
    `jax._src.core.ClosedJaxpr`, which jax 0.12 removed)."""
    from importlib.metadata import version

    import jax
    import pytest

    try:
        import asdex
    except ModuleNotFoundError as e:
        if e.name != "asdex":
            raise
        pytest.skip("asdex is not installed")
    except ImportError as e:
        pytest.skip(
            f"asdex {version('asdex')} does not import with jax {jax.__version__}: "
            f"{e}"
        )
    return asdex


# ---- Array constants in lowered (StableHLO) and compiled (HLO) text: the
# detector of tests/test_first_call.py and tests/test_gpu_first_call.py. ----

LIMIT = 1000  # elements: the largest array constant a program may hold


def _closing(text: str, i: int) -> int:
    """The index just past the `>` that closes the `<` before `i` (quotes and
    nested brackets skipped)."""
    depth = 1
    while depth:
        c = text[i]
        if c == '"':
            i = text.index('"', i + 1)
        elif c == "<":
            depth += 1
        elif c == ">":
            depth -= 1
        i += 1
    return i


def lowered_constants(text: str) -> list[tuple[int, str]]:
    """`(elements, excerpt)` of every array literal in StableHLO text: `dense<...>`
    (a list, a hex blob or a splat) and `dense_resource<...>`, counted by the
    tensor type that follows (a splat of a large tensor counts as large), or by
    what the literal stores where no type follows."""
    out = []
    for m in re.finditer(r"\bdense(_resource)?<", text):
        end = _closing(text, m.end())
        body = text[m.end():end - 1]
        t = re.match(
            r"\s*:\s*tensor<((?:\d+x)*)([^>]*(?:<[^>]*>)?)>", text[end:end + 400]
        )
        if t:
            dims = [int(d) for d in t.group(1).split("x") if d]
            count = math.prod(dims)
        elif m.group(1):
            count = LIMIT + 1  # a resource of unknown size: flag it
        elif body.startswith('"0x'):
            count = (len(body) - 4) // 2  # bytes: at least the elements of i8
        else:
            count = max(1, len(re.findall(r"[^\s,\[\]()]+", body)))
        out.append((count, text[m.start():m.start() + 120]))
    return out


_HLO_CONSTANT = re.compile(r"=\s*(.+?)\s+constant\(")


def compiled_constants(text: str) -> list[tuple[int, str]]:
    """`(elements, excerpt)` of every `constant(...)` instruction in HLO text, by
    its shape (XLA elides large literals as `{...}`; tuple shapes are summed)."""
    out = []
    for line in text.splitlines():
        m = _HLO_CONSTANT.search(line)
        if m:
            shapes = re.findall(r"\b[a-z]+\d*\[([\d,]*)\]", m.group(1))
            count = sum(math.prod(int(d) for d in s.split(",") if d) for s in shapes)
            out.append((count, line.strip()[:120]))
    return out


def large(constants) -> list[tuple[int, str]]:
    return [c for c in constants if c[0] > LIMIT]


def convected_poisson3d(n: int) -> sp.csr_array:
    """3D Poisson plus upwind convection along the fastest axis (non-symmetric,
    diagonally dominant), indices sorted."""
    a = poisson3d(n)
    m = a.shape[0]
    shift = sp.diags([np.ones(m - 1)], [-1], shape=(m, m))
    out = sp.csr_array(a + 0.8 * (sp.eye(m) - shift))
    out.sort_indices()
    return out
