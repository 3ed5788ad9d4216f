"""Complex systems: complex64/complex128 operators solved with pyamg on the CPU
(also for arrays on a GPU, `backend="pyamg"`), with JAX's complex autodiff; on
the GPU, AmgX's complex modes (dCCI, dZZI) are refused with a clear error before
AmgX is called (measured not to converge, or to crash the process:
lineax_amgx/_backends/amgx/_complex.py).

The solve tests run on the CPU. The refusal is tested here on the CPU (a
pretended CUDA backend, and programs lowered for CUDA with `jax.export`) and
on the device with `-m gpu` (`python3 -m pytest -m gpu tests/test_complex.py`).
References come from scipy's `spsolve`, a dense solve or finite differences."""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
import scipy.sparse as sp
from _complex_helpers import (
    complex_vector,
    fem_helmholtz2d,
    helmholtz2d,
    magnetic_laplacian2d,
    nonsymmetric_complex,
    reference,
    rel_err,
    rel_residual,
)
from helpers import gpu_array, poisson2d

import lineax_amgx as lxa
from lineax_amgx import _config
from lineax_amgx._backends import contract
from lineax_amgx._backends.amgx import _complex, _library

SYM = lx.symmetric_tag
HPD = lx.positive_semidefinite_tag  # complex: Hermitian positive semidefinite

# CPU tests: an empty setup cache, the CPU as JAX's default device (conftest).
pytestmark = pytest.mark.usefixtures("on_cpu")

REFUSED = "AmgX cannot solve complex systems"
CG_LIKE = frozenset({"CG", "PCG", "PCGF"})  # AmgX's conjugate gradient solvers


class _Device:
    """Places arrays on the CPU (pyamg): where complex systems are solved."""

    cache = "pyamg"  # its cache_info name

    def __call__(self, x):
        return jax.device_put(jnp.asarray(x), jax.devices("cpu")[0])


@pytest.fixture
def put():
    return _Device()


def _op(a, put, tags=(), dtype=None, block_size=None):
    op = lxa.CSROperator.from_scipy(a, tags=tags, dtype=dtype, block_size=block_size)
    return op.with_values(put(op.values))


def _solve(op, b, **kw):
    options = kw.pop("options", {})
    sol = lx.linear_solve(op, b, solver=lxa.AMGX(**kw), options=options, throw=False)
    return sol


def _assert_solved(sol):
    assert sol.result == lx.RESULTS.successful, (sol.result, sol.stats)


# -----------------------------------------------------------------------------
# Modes, dtypes and the operator.
# -----------------------------------------------------------------------------


def test_modes_for_complex_dtypes():
    mode_for = contract.mode_for
    assert mode_for(None, jnp.complex128) == "dZZI"
    assert mode_for(None, jnp.complex64) == "dCCI"
    assert mode_for("double", jnp.complex64) == "dZZI"
    assert mode_for("single", jnp.complex128) == "dCCI"
    assert mode_for("mixed", jnp.complex128) == "dCCI"
    # Real operators keep theirs.
    assert mode_for(None, jnp.float64) == "dDDI"
    assert mode_for(None, jnp.float32) == "dFFI"
    assert mode_for("mixed", jnp.float64) == "dFFI"
    for mode, dtype in (("dZZI", jnp.complex128), ("dCCI", jnp.complex64)):
        assert mode in contract.MODES
        assert contract.matrix_dtype(mode) == dtype
        assert contract.vector_dtype(mode) == dtype
        assert contract.real_dtype(dtype) == jnp.finfo(dtype).dtype
    assert contract.double_dtype("dCCI") == jnp.complex128
    assert contract.double_dtype("dFFI") == jnp.float64
    # The residual of a complex solve is real.
    shapes = contract.solve_result_shapes(jnp.zeros(3, jnp.complex64))
    assert shapes[0].dtype == jnp.complex64 and shapes[2].dtype == jnp.float32


def test_operator_mv_transpose_conj(rng):
    a = nonsymmetric_complex(6, rng)
    dense = a.toarray()
    op = lxa.CSROperator.from_scipy(a)
    assert op.values.dtype == jnp.complex128
    x = complex_vector(rng, a.shape[0])
    np.testing.assert_allclose(op.mv(jnp.asarray(x)), dense @ x, rtol=1e-13)
    np.testing.assert_array_equal(op.as_matrix(), dense)
    # Lineax's transpose is the plain transpose, conj conjugates.
    np.testing.assert_array_equal(op.transpose().as_matrix(), dense.T)
    np.testing.assert_array_equal(lx.conj(op).as_matrix(), dense.conj())
    np.testing.assert_array_equal(lx.conj(op).transpose().as_matrix(), dense.conj().T)
    np.testing.assert_allclose(
        op.transpose().mv(jnp.asarray(x)), dense.T @ x, rtol=1e-13
    )
    assert lxa.CSROperator.from_scipy(a, dtype=np.complex64).values.dtype == (
        jnp.complex64
    )


def test_tags_are_lineax_s(rng):
    sym = lxa.CSROperator.from_scipy(helmholtz2d(5, 3.0, 0.5), tags=SYM)
    assert lx.is_symmetric(sym) and not lx.is_positive_semidefinite(sym)
    # A complex symmetric operator's transpose is itself (no conjugation).
    assert sym.transpose() is sym
    herm = lxa.CSROperator.from_scipy(magnetic_laplacian2d(4, rng), tags=HPD)
    assert lx.is_positive_semidefinite(herm) and not lx.is_symmetric(herm)
    # Hermitian is not symmetric: its transpose is its conjugate.
    np.testing.assert_array_equal(
        herm.transpose().as_matrix(), herm.as_matrix().conj()
    )
    assert lx.is_symmetric(lx.conj(sym)) and lx.is_positive_semidefinite(
        lx.conj(herm)
    )


def test_default_presets_never_give_cg_to_a_complex_symmetric_operator(rng):
    """The default preset table: only Hermitian (definite-tagged) complex
    operators may get a CG preset; a complex symmetric one never does."""
    def outer(name):
        return _config.configs[name]["solver"]["solver"]

    for (kind, _), name in _config._COMPLEX_DEFAULTS.items():
        assert name in _config.configs
        if kind != "hermitian":
            assert outer(name) not in CG_LIKE, (kind, name)
    solver = lxa.AMGX()
    sym = lxa.CSROperator.from_scipy(helmholtz2d(5, 3.0, 0.5), tags=SYM)
    herm = lxa.CSROperator.from_scipy(magnetic_laplacian2d(4, rng), tags=HPD)
    # (Both tags: A = Aᵀ = Aᴴ, real values in a complex dtype.)
    both = lxa.CSROperator.from_scipy(helmholtz2d(5, 3.0, 0.0), tags=(SYM, HPD))
    plain = lxa.CSROperator.from_scipy(nonsymmetric_complex(4, rng))
    for op, kind in ((sym, "general"), (plain, "general"), (herm, "hermitian"),
                     (both, "hermitian")):
        assert solver._resolve(op, op).text == _config._COMPLEX_DEFAULTS[
            (kind, False)
        ]
        assert outer(solver._resolve(op, op).text) not in CG_LIKE or (
            kind == "hermitian"
        )
    blocked = lxa.CSROperator.from_scipy(helmholtz2d(4, 3.0, 0.5), block_size=2)
    assert solver._resolve(blocked, blocked).text == _config._COMPLEX_DEFAULTS[
        ("general", True)
    ]
    # Real operators keep their presets.
    real = lxa.CSROperator.from_scipy(sp.csr_array(helmholtz2d(5, 1.0, 0).real),
                                      tags=(SYM, HPD))
    assert solver._resolve(real, real).text == "PCG_AGGREGATION"


def test_complex_preset_translates_without_warnings(rng):
    """The CPU backend runs the complex preset without a translation warning:
    aggregation, Jacobi smoothing and, for `coarse_solver: NOSOLVER`, the CPU
    backend's translation (a pseudo-inverse of a coarsest level of up to 2000
    rows; `coarsest_sweeps` smoother sweeps above)."""
    import warnings

    from lineax_amgx._backends.pyamg import _build, _translate

    final = _config.preset("GMRES_AGGREGATION_COMPLEX").finalise(
        None, max_steps=None, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = _translate.translate(final)
    amg = plan.precond
    assert plan.method == "fgmres" and plan.restart == 100
    assert amg.algorithm == "sa" and amg.coarsest_sweeps == 4
    assert amg.presmoother.kind == "jacobi"
    a = helmholtz2d(40, 8.0, 0.5)
    _, ml, _ = _build._build_amg(amg, a, 1)
    coarse = ml.levels[-1].A
    assert coarse.shape[0] <= _build._PINV_ROWS
    r = complex_vector(rng, coarse.shape[0])
    np.testing.assert_allclose(ml.coarse_solver(coarse, r),
                               np.linalg.solve(coarse.toarray(), r), rtol=1e-8)


def test_classical_amg_is_refused_for_complex(rng):
    op = lxa.CSROperator.from_scipy(helmholtz2d(6, 3.0, 0.5), tags=SYM)
    b = jnp.asarray(complex_vector(rng, 36))
    with pytest.raises(ValueError, match="classical AMG .* complex systems"):
        lx.linear_solve(op, b, solver=lxa.AMGX("PCG_CLASSICAL"))
    with pytest.raises(ValueError, match="classical AMG .* complex systems"):
        lxa.AMGXPreconditioner(op, lxa.configs["PCG_CLASSICAL"])


# -----------------------------------------------------------------------------
# Solves, against spsolve.
# -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "problem, tags",
    [
        ("helmholtz", SYM),
        ("helmholtz", ()),
        ("fem", SYM),
        ("hermitian", HPD),
        ("nonsymmetric", ()),
    ],
)
def test_solves_complex128(put, rng, problem, tags):
    a = {
        "helmholtz": lambda: helmholtz2d(24, 8.0, 0.5),
        "fem": lambda: fem_helmholtz2d(24, 8.0, rng),
        "hermitian": lambda: magnetic_laplacian2d(24, rng),
        "nonsymmetric": lambda: nonsymmetric_complex(24, rng),
    }[problem]()
    b = complex_vector(rng, a.shape[0])
    sol = _solve(_op(a, put, tags), put(b), rtol=1e-11, atol=0.0)
    _assert_solved(sol)
    assert sol.value.dtype == jnp.complex128
    assert sol.stats["residual_norm"].dtype == jnp.float64
    assert rel_err(sol.value, reference(a, b)) < 1e-8
    assert int(sol.stats["num_steps"]) > 0


def test_solves_complex64(put, rng):
    a = helmholtz2d(24, 8.0, 0.5)
    b = complex_vector(rng, a.shape[0]).astype(np.complex64)
    sol = _solve(_op(a, put, SYM, dtype=np.complex64), put(b))
    _assert_solved(sol)
    assert sol.value.dtype == jnp.complex64
    assert sol.stats["residual_norm"].dtype == jnp.float32
    assert rel_err(sol.value, reference(a, b)) < 1e-4


def test_precision_mixed_and_single(put, rng):
    """`precision="mixed"`: complex64 AmgX solves in complex128 refinement reach a
    complex128 tolerance; `"single"` solves a complex128 system in dCCI."""
    a = helmholtz2d(24, 8.0, 0.5)
    b = complex_vector(rng, a.shape[0])
    op = _op(a, put, SYM)
    sol = _solve(op, put(b), precision="mixed", rtol=1e-11, atol=0.0)
    _assert_solved(sol)
    assert sol.value.dtype == jnp.complex128
    assert rel_residual(a, sol.value, b) < 1e-10
    sol = _solve(op, put(b), precision="single", rtol=1e-5)
    _assert_solved(sol)
    assert sol.value.dtype == jnp.complex128
    assert 1e-12 < rel_err(sol.value, reference(a, b)) < 1e-4


def test_warm_start_and_vmap(put, rng):
    a = helmholtz2d(16, 6.0, 0.5)
    op = _op(a, put, SYM)
    bs = np.stack([complex_vector(rng, a.shape[0]) for _ in range(3)])
    solver = lxa.AMGX(rtol=1e-10, atol=0.0)
    xs = jax.vmap(lambda b: lx.linear_solve(op, b, solver=solver).value)(put(bs))
    for b, x in zip(bs, np.asarray(xs)):
        assert rel_err(x, reference(a, b)) < 1e-8
    ref = reference(a, bs[0])
    noise = complex_vector(rng, a.shape[0])
    y0 = put(ref + 1e-7 * np.linalg.norm(ref) / np.linalg.norm(noise) * noise)
    cold = _solve(op, put(bs[0]), rtol=1e-10, atol=0.0)
    warm = _solve(op, put(bs[0]), rtol=1e-10, atol=0.0, options={"y0": y0})
    _assert_solved(warm)
    assert rel_err(warm.value, ref) < 1e-8
    assert int(warm.stats["num_steps"]) < int(cold.stats["num_steps"])


def test_nonfinite_complex_values_are_reported(put, rng):
    a = helmholtz2d(8, 3.0, 0.5)
    op = _op(a, put, SYM)
    values = op.values.at[3].set(jnp.nan + 1j)
    sol = _solve(op.with_values(values), put(complex_vector(rng, 64)))
    assert sol.result == lx.RESULTS.nonfinite_input


def test_real_and_complex_operators_on_one_pattern_have_their_own_setups(put, rng):
    a = helmholtz2d(12, 4.0, 0.5)
    real = sp.csr_array(a.real)
    b = complex_vector(rng, a.shape[0])
    lxa.clear_cache()
    op_c = _op(a, put, SYM)
    op_r = _op(real, put, (SYM, HPD))  # (positive definite: -Δ - 16, h = 1/13)
    assert op_c.pattern.fingerprint == op_r.pattern.fingerprint
    xc = _solve(op_c, put(b), rtol=1e-10, atol=0.0).value
    xr = _solve(op_r, put(b.real), rtol=1e-10, atol=0.0).value
    assert rel_err(xc, reference(a, b)) < 1e-8
    assert rel_err(xr, reference(real, b.real)) < 1e-8
    info = lxa.cache_info(put.cache)
    modes = [e["mode"] for e in info["entries"] if e["block_size"] == 1
             and e.get("shape", a.shape) == a.shape]
    assert sorted(modes) == ["dDDI", "dZZI"], info["entries"]


# -----------------------------------------------------------------------------
# Acceptance: ~40k unknowns against spsolve.
# -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["helmholtz", "fem"])
def test_acceptance_40k(put, rng, problem):
    if problem == "helmholtz":
        a = helmholtz2d(200, 20.0, 0.5)  # kh = 0.1, ε = 0.5
    else:
        a = fem_helmholtz2d(200, 20.0, rng)
    assert a.shape == (40000, 40000)
    b = complex_vector(rng, a.shape[0])
    ref = reference(a, b)
    sol = _solve(_op(a, put, SYM), put(b), rtol=1e-11, atol=0.0)
    _assert_solved(sol)
    assert rel_err(sol.value, ref) < 1e-8
    # complex64: a relative residual of 3e-6 (measured on the FEM matrix: the
    # default 1e-5 leaves an error of 1.4e-4, 3e-6 one of 3.7e-5; 1e-6 is below
    # what complex64 arithmetic reaches there).
    sol32 = _solve(_op(a, put, SYM, dtype=np.complex64),
                   put(b.astype(np.complex64)), rtol=3e-6)
    _assert_solved(sol32)
    assert rel_err(sol32.value, ref) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["helmholtz", "fem"])
def test_acceptance_40k_gradients(put, rng, problem):
    """Gradients of a real loss w.r.t. the values and b of the 40k-unknown
    problems against central finite differences, in a real and an imaginary
    direction each (JAX's convention: see below)."""
    if problem == "helmholtz":
        a = helmholtz2d(200, 20.0, 0.5)
    else:
        a = fem_helmholtz2d(200, 20.0, rng)
    op = _op(a, put, SYM)
    b = put(complex_vector(rng, a.shape[0]))
    c = put(complex_vector(rng, a.shape[0]))
    solver = lxa.AMGX(rtol=1e-12, atol=0.0)

    @jax.jit
    def loss(values, b):
        x = lx.linear_solve(op.with_values(values), b, solver=solver).value
        return jnp.real(jnp.vdot(c, x)) + 0.5 * jnp.sum(jnp.abs(x) ** 2)

    g_values, g_b = jax.jit(jax.grad(loss, argnums=(0, 1)))(op.values, b)
    for z, g, f in ((op.values, g_values, lambda v: loss(v, b)),
                    (b, g_b, lambda bb: loss(op.values, bb))):
        d = _direction(rng, z, op if z is op.values else None)
        d = put(d * (np.linalg.norm(z) / np.linalg.norm(d)))
        for direction in (d + 0j, 1j * d):
            fd = float(_fd(f, z, direction, h=1e-6))
            ad = float(jnp.real(jnp.sum(g * direction)))
            assert abs(ad - fd) <= 1e-5 * abs(fd), (ad, fd)


# -----------------------------------------------------------------------------
# Autodiff: JAX's convention for complex inputs. For a real loss L and
# g = jax.grad(L)(z): dL = Re(sum(g * dz)), so a real direction d gives
# Re(g . d) and an imaginary one i d gives -Im(g . d).
# -----------------------------------------------------------------------------


def _direction(rng, z, symmetric_op=None):
    """A random real direction of `z`'s shape; for the values of a
    symmetric-tagged operator a symmetric one (`d[k] = d[mirror[k]]`: the
    perturbed values keep the tag's promise, which the solver checks)."""
    d = rng.standard_normal(z.shape)
    if symmetric_op is not None:
        d = d + d[symmetric_op.pattern.mirror]
    return d


def _fd(f, z, d, h=1e-6):
    return (f(z + h * d) - f(z - h * d)) / (2 * h)


@pytest.mark.parametrize("tags", [SYM, ()])
def test_grad_matches_finite_differences(put, rng, tags):
    a = helmholtz2d(8, 4.0, 0.5) + sp.random(64, 64, 0.05, random_state=1) * (
        0.0 if tags else 1j
    )
    a = sp.csr_array(a)
    op = _op(a, put, tags)
    b = put(complex_vector(rng, 64))
    c = put(complex_vector(rng, 64))
    solver = lxa.AMGX(rtol=1e-13, atol=0.0)

    def loss(values, b):
        x = lx.linear_solve(op.with_values(values), b, solver=solver).value
        return jnp.sum(jnp.abs(x) ** 2) + jnp.real(jnp.vdot(c, x))

    g_values, g_b = jax.grad(loss, argnums=(0, 1))(op.values, b)
    assert g_values.dtype == jnp.complex128 and g_b.dtype == jnp.complex128
    for name, z, g, f in (
        ("values", op.values, g_values, lambda v: loss(v, b)),
        ("b", b, g_b, lambda bb: loss(op.values, bb)),
    ):
        d = put(_direction(rng, z, op if name == "values" and tags else None))
        for direction in (d + 0j, 1j * d):
            fd = float(_fd(f, z, direction))
            ad = float(jnp.real(jnp.sum(g * direction)))
            assert abs(ad - fd) <= 1e-5 * max(abs(fd), 1e-3), (name, ad, fd)

    # And against a dense solve (the same convention through jnp.linalg.solve).
    def loss_dense(values, b):
        x = jnp.linalg.solve(op.with_values(values).as_matrix(), b)
        return jnp.sum(jnp.abs(x) ** 2) + jnp.real(jnp.vdot(c, x))

    gv_ref, gb_ref = jax.grad(loss_dense, argnums=(0, 1))(op.values, b)
    assert rel_err(g_values, gv_ref) < 1e-8 and rel_err(g_b, gb_ref) < 1e-8


def test_jvp_matches_finite_differences(put, rng):
    a = nonsymmetric_complex(8, rng)
    op = _op(a, put)
    b = put(complex_vector(rng, 64))
    solver = lxa.AMGX(rtol=1e-13, atol=0.0)

    def solve(values, b):
        return lx.linear_solve(op.with_values(values), b, solver=solver).value

    dv = put(complex_vector(rng, op.values.shape[0]))
    db = put(complex_vector(rng, 64))
    _, tangent = jax.jvp(solve, (op.values, b), (dv, db))
    h = 1e-6
    fd = (solve(op.values + h * dv, b + h * db)
          - solve(op.values - h * dv, b - h * db)) / (2 * h)
    assert rel_err(tangent, fd) < 1e-6


def test_adjoint_solve_uses_the_transpose(put, rng):
    """Lineax's reverse mode solves with the plain transpose (the linear
    transpose); `vjp` of `b -> A⁻¹ b` is `ct -> A⁻ᵀ ct`."""
    a = nonsymmetric_complex(8, rng)
    op = _op(a, put)
    solver = lxa.AMGX(rtol=1e-13, atol=0.0)
    _, vjp = jax.vjp(lambda b: lx.linear_solve(op, b, solver=solver).value,
                     put(complex_vector(rng, 64)))
    ct = complex_vector(rng, 64)
    (got,) = vjp(put(ct))
    assert rel_err(got, reference(sp.csr_array(a.T), ct)) < 1e-9


def test_conj_state(put, rng):
    a = nonsymmetric_complex(8, rng)
    op = _op(a, put)
    b = complex_vector(rng, 64)
    solver = lxa.AMGX(rtol=1e-12, atol=0.0)
    state = solver.init(op, {})
    y0 = put(complex_vector(rng, 64))
    state_c, options_c = solver.conj(state, {"y0": y0})
    np.testing.assert_array_equal(options_c["y0"], np.conj(np.asarray(y0)))
    x, result, _ = solver.compute(state_c, put(b), {})
    assert result == lx.RESULTS.successful
    assert rel_err(x, reference(sp.csr_array(a.conj()), b)) < 1e-9
    # The conjugate transpose (Lineax's adjoint): conj, then transpose.
    state_h, _ = solver.transpose(state_c, {})
    x, result, _ = solver.compute(state_h, put(b), {})
    assert rel_err(x, reference(sp.csr_array(a.conj().T), b)) < 1e-9
    # Real operators: conjugation is the identity.
    real = _op(sp.csr_array(a.real), put)
    real_solver = lxa.AMGX("GMRES_AGGREGATION")
    real_state = real_solver.init(real, {})
    assert real_solver.conj(real_state, {})[0] is real_state


# -----------------------------------------------------------------------------
# Blocks, matrix-free operators, the preconditioner, distributed operators.
# -----------------------------------------------------------------------------


def test_block_operator(put, rng):
    a = helmholtz2d(16, 6.0, 0.5)
    op = _op(a, put, SYM, block_size=2)
    assert op.pattern.block_size == 2 and op.values.dtype == jnp.complex128
    b = complex_vector(rng, a.shape[0])
    sol = _solve(op, put(b), rtol=1e-10, atol=0.0)
    _assert_solved(sol)
    assert rel_err(sol.value, reference(a, b)) < 1e-8


def test_matrix_free_operators(put, rng):
    a = nonsymmetric_complex(8, rng)
    dense = put(a.toarray())
    b = complex_vector(rng, 64)
    struct = jax.ShapeDtypeStruct((64,), jnp.complex128)
    fn_op = lx.FunctionLinearOperator(lambda x: dense @ x, struct)
    # The sparsified operator keeps the complex values exactly.
    csr = lxa.sparsify(fn_op).to_csr()
    assert csr.values.dtype == jnp.complex128
    np.testing.assert_allclose(csr.as_matrix(), a.toarray(), rtol=1e-14)
    x0 = put(complex_vector(rng, 64))
    jac_op = lx.JacobianLinearOperator(lambda x, _: dense @ x + 0.1 * x**2, x0)
    jac = a.toarray() + np.diag(0.2 * np.asarray(x0))
    for op, ref in ((fn_op, a.toarray()), (jac_op, jac),
                    (lx.MatrixLinearOperator(dense), a.toarray())):
        sol = _solve(op, put(b), rtol=1e-11, atol=0.0)
        _assert_solved(sol)
        assert rel_err(sol.value, np.linalg.solve(ref, b)) < 1e-9


def test_preconditioner_with_lineax_krylov(put, rng):
    a = helmholtz2d(24, 8.0, 0.5)
    op = _op(a, put, SYM)
    P = lxa.AMGXPreconditioner(op)
    # Complex symmetric matrix, symmetric cycle: Pᵀ = P, not Hermitian.
    assert lx.is_symmetric(P) and not lx.is_positive_semidefinite(P)
    b = complex_vector(rng, a.shape[0])
    plain = lx.linear_solve(op, put(b), lx.GMRES(rtol=1e-10, atol=1e-10),
                            throw=False)
    sol = lx.linear_solve(op, put(b), lx.GMRES(rtol=1e-10, atol=1e-10),
                          options={"preconditioner": P}, throw=False)
    _assert_solved(sol)
    assert rel_err(sol.value, reference(a, b)) < 1e-7
    assert int(sol.stats["num_steps"]) < int(plain.stats["num_steps"])
    wrapped = lx.linear_solve(
        op, put(b), lxa.AMGXPreconditioned(lx.BiCGStab(rtol=1e-10, atol=1e-10)),
        throw=False)
    _assert_solved(wrapped)
    assert rel_err(wrapped.value, reference(a, b)) < 1e-7


def test_preconditioner_conj_and_tags(rng):
    a = helmholtz2d(8, 4.0, 0.5)
    P = lxa.AMGXPreconditioner(lxa.CSROperator.from_scipy(a, tags=SYM))
    r = jnp.asarray(complex_vector(rng, 64))
    Pc = lx.conj(P)
    np.testing.assert_allclose(Pc.mv(r), jnp.conj(P.mv(jnp.conj(r))), rtol=1e-12)
    np.testing.assert_allclose(Pc.as_matrix(), jnp.conj(P.as_matrix()), rtol=1e-12)
    assert lx.conj(Pc).mv(r).dtype == jnp.complex128
    np.testing.assert_allclose(lx.conj(Pc).mv(r), P.mv(r), rtol=1e-12)
    # Hermitian positive definite matrix: a Hermitian (PSD-tagged) cycle, not a
    # symmetric one.
    h = lxa.CSROperator.from_scipy(magnetic_laplacian2d(8, rng), tags=HPD)
    Ph = lxa.AMGXPreconditioner(h)
    assert lx.is_positive_semidefinite(Ph) and not lx.is_symmetric(Ph)
    m = np.asarray(Ph.as_matrix())
    np.testing.assert_allclose(m, m.conj().T, atol=1e-10 * np.abs(m).max())
    assert np.linalg.eigvalsh(m).min() > 0
    # Given tags: no symmetric tag is added to a Hermitian one.
    assert lxa.AMGXPreconditioner(h, tags=HPD).tags == frozenset([HPD])
    # Dtypes of the acted-on vectors.
    with pytest.raises(TypeError, match="acts on complex vectors"):
        lxa.AMGXPreconditioner(
            h, structure=jax.ShapeDtypeStruct((64,), jnp.float64)
        )
    real = lxa.AMGXPreconditioner(lxa.CSROperator.from_scipy(sp.csr_array(a.real)))
    assert lx.conj(real) is real
    with pytest.raises(TypeError, match="acts on real vectors"):
        lxa.AMGXPreconditioner(
            lxa.CSROperator.from_scipy(sp.csr_array(a.real)),
            structure=jax.ShapeDtypeStruct((64,), jnp.complex128),
        )


def test_hermitian_preconditioner_with_lineax_cg(rng):
    a = magnetic_laplacian2d(16, rng)
    op = lxa.CSROperator.from_scipy(a, tags=HPD)
    b = complex_vector(rng, a.shape[0])
    sol = lx.linear_solve(op, jnp.asarray(b),
                          lxa.AMGXPreconditioned(lx.CG(rtol=1e-10, atol=1e-10)),
                          throw=False)
    _assert_solved(sol)
    assert rel_err(sol.value, reference(a, b)) < 1e-7


def test_near_nullspace_may_be_complex_for_complex_operators(rng):
    a = helmholtz2d(12, 4.0, 0.5)
    op = lxa.CSROperator.from_scipy(a, tags=SYM)
    b = complex_vector(rng, 144)
    B = np.exp(1j * np.linspace(0, 1, 144))[:, None]
    sol = _solve(op, jnp.asarray(b), rtol=1e-10, atol=0.0,
                 options={"near_nullspace": B})
    _assert_solved(sol)
    assert rel_err(sol.value, reference(a, b)) < 1e-8


def test_distributed_operators_refuse_complex_values():
    MPI = pytest.importorskip("mpi4py.MPI")
    a = helmholtz2d(6, 3.0, 0.5)
    for dtype in (None, np.float64):  # (a real dtype does not drop Im A)
        with pytest.raises(TypeError, match="Complex values .* not supported by "
                           "distributed operators"):
            lxa.DistributedCSROperator.from_global_scipy(a, MPI.COMM_SELF,
                                                         dtype=dtype)


# -----------------------------------------------------------------------------
# The GPU: AmgX's complex modes are refused before AmgX is called (measured in
# AmgX 2.5 / CUDA 13 builds: not registered, not converging, or a crash).
# -----------------------------------------------------------------------------


def test_refusal_names_the_limitation_and_the_fix(monkeypatch):
    monkeypatch.delenv(_complex.ENV, raising=False)
    for mode, dtype in (("dZZI", "complex128"), ("dCCI", "complex64")):
        message = _complex.refusal(mode)
        assert message.startswith(f"{REFUSED} ({dtype}, AmgX mode {mode})")
        for part in ("AmgX 2.5.0", "CUDA 13", "FGMRES, PCG", "did not converge",
                     "segmentation fault", "backend='pyamg'",
                     "[[Re A, -Im A], [Im A, Re A]]", f"{_complex.ENV}=1"):
            assert part in message, part
    for mode in ("dDDI", "dFFI", "dDFI"):
        assert _complex.refusal(mode) is None
    # Where the AmgX branch would run eagerly (lax.platform_dependent outside
    # jit calls the default backend's branch: an eager AMGXPreconditioner on a
    # GPU), the stand-in of the refused call raises too.
    token = jax.ShapeDtypeStruct((2,), jnp.int32)
    assert _complex.refused("dDDI", token) is None
    with pytest.raises(TypeError, match=REFUSED):
        _complex.refused("dZZI", token)
    monkeypatch.setenv(_complex.ENV, "yes")  # only "1" opts in
    assert _complex.refusal("dZZI") is not None
    monkeypatch.setenv(_complex.ENV, "1")
    assert _complex.refusal("dZZI") is None and _complex.refusal("dCCI") is None


@pytest.fixture
def pretend_cuda(monkeypatch):
    """A machine whose JAX has a CUDA backend, as far as the up-front checks
    know, and whose AmgX must not be reached: registering its FFI targets or a
    pattern, or loading it, fails the test."""
    from lineax_amgx._backends.amgx import _runtime_arrays

    _runtime_arrays._register_targets()  # (the CPU handler, before pretending)
    monkeypatch.delenv(_complex.ENV, raising=False)
    monkeypatch.setattr(_library, "has_cuda_backend", lambda: True)

    def reached(*args, **kwargs):
        raise AssertionError("AmgX was reached")

    for name in ("register_ffi_targets", "register_pattern", "native"):
        monkeypatch.setattr(_library, name, reached)


@pytest.mark.parametrize("dtype, precision", [
    (np.complex128, None), (np.complex64, None), (np.complex128, "mixed"),
    (np.complex128, "single"), (np.complex64, "double"),
])
def test_backend_amgx_refuses_complex_when_traced(pretend_cuda, rng, dtype,
                                                  precision):
    a = helmholtz2d(6, 3.0, 0.5)
    op = lxa.CSROperator.from_scipy(a, tags=SYM, dtype=dtype)
    b = jnp.asarray(complex_vector(rng, 36).astype(dtype))
    solver = lxa.AMGX(backend="amgx", precision=precision)
    with pytest.raises(TypeError, match=REFUSED):
        lx.linear_solve(op, b, solver=solver)
    with pytest.raises(TypeError, match=REFUSED):
        jax.jit(lambda o, v: lx.linear_solve(o, v, solver=solver).value)(op, b)
    with pytest.raises(TypeError, match=REFUSED):
        lxa.AMGXPreconditioner(op, backend="amgx", precision=precision)
    with pytest.raises(TypeError, match=REFUSED):
        lx.linear_solve(op, b, lxa.AMGXPreconditioned(lx.GMRES(rtol=1e-6, atol=0.0),
                                                      backend="amgx"))
    # The CPU backend solves the same system (of the values as stored).
    wide = precision in ("double", "mixed") or (
        precision is None and dtype == np.complex128)
    rtol = 1e-10 if wide else 1e-5
    x = lx.linear_solve(op, b, solver=lxa.AMGX(backend="pyamg", rtol=rtol,
                                               precision=precision)).value
    assert rel_err(x, reference(a.astype(dtype), np.asarray(b))) < 1e3 * rtol


def test_pretended_cuda_reaches_amgx_for_real_operators_and_the_opt_in(
        pretend_cuda, monkeypatch, rng):
    """The negative controls of the test above: with the same pretence a real
    operator, and a complex one with LINEAX_AMGX_EXPERIMENTAL_COMPLEX=1, do
    reach AmgX."""
    a = helmholtz2d(6, 3.0, 0.5)
    real = lxa.CSROperator.from_scipy(sp.csr_array(a.real), tags=SYM)
    with pytest.raises(AssertionError, match="AmgX was reached"):
        lx.linear_solve(real, jnp.asarray(rng.standard_normal(36)),
                        solver=lxa.AMGX(backend="amgx"))
    monkeypatch.setenv(_complex.ENV, "1")
    op = lxa.CSROperator.from_scipy(a, tags=SYM)
    with pytest.raises(AssertionError, match="AmgX was reached"):
        lx.linear_solve(op, jnp.asarray(complex_vector(rng, 36)),
                        solver=lxa.AMGX(backend="amgx"))


def _export_for_cuda(fn, *args):
    """Lower `fn` for CUDA on this machine (no GPU needed): what happens when a
    program is compiled for arrays on a GPU."""
    return jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)


@pytest.mark.parametrize("kwargs", [{}, {"precision": "mixed"},
                                    {"config": "FGMRES_AGGREGATION"}])
@pytest.mark.filterwarnings("ignore::lineax_amgx.PyamgTranslationWarning")
def test_auto_backend_refuses_complex_when_compiled_for_a_gpu(monkeypatch, rng,
                                                              kwargs):
    """backend="auto": the AmgX branch of a complex solve is traced everywhere
    but refuses only when lowered for CUDA (arrays on a GPU); the same program
    lowered for the CPU runs pyamg."""
    monkeypatch.delenv(_complex.ENV, raising=False)
    a = helmholtz2d(6, 3.0, 0.5)
    op = lxa.CSROperator.from_scipy(a)
    b = jnp.asarray(complex_vector(rng, 36))
    config = kwargs.pop("config", None)
    solver = lxa.AMGX(config, rtol=1e-10, atol=0.0, **kwargs)

    def solve(op, b):
        return lx.linear_solve(op, b, solver=solver).value

    assert rel_err(jax.jit(solve)(op, b), reference(a, np.asarray(b))) < 1e-8
    with pytest.raises(TypeError, match=REFUSED):
        _export_for_cuda(solve, op, b)

    def preconditioned(op, b):
        P = lxa.AMGXPreconditioner(op)
        return lx.linear_solve(op, b, lx.GMRES(rtol=1e-8, atol=0.0),
                               options={"preconditioner": P}).value

    with pytest.raises(TypeError, match=REFUSED):
        _export_for_cuda(preconditioned, op, b)


def test_opt_in_lets_complex_modes_through_to_the_cuda_lowering(monkeypatch, rng):
    """The negative control of the export test: with the opt-in the lowering
    for CUDA meets no refusal (whatever else it meets on a machine without a
    GPU), and a real operator never does."""
    a = helmholtz2d(6, 3.0, 0.5)
    b = jnp.asarray(complex_vector(rng, 36))

    def solve(op, b):
        return lx.linear_solve(op, b, solver=lxa.AMGX()).value

    def refused(op, b):
        try:
            _export_for_cuda(solve, op, b)
        except TypeError as e:
            return REFUSED in str(e)
        except Exception:  # noqa: BLE001 - anything but the refusal
            pass
        return False

    monkeypatch.delenv(_complex.ENV, raising=False)
    assert refused(lxa.CSROperator.from_scipy(a), b)
    real = lxa.CSROperator.from_scipy(sp.csr_array(a.real))
    assert not refused(real, b.real)
    # (The variable is read when a solve is traced: a new operator shape, so
    # that no program traced above is reused.)
    monkeypatch.setenv(_complex.ENV, "1")
    a = helmholtz2d(7, 3.0, 0.5)
    assert not refused(lxa.CSROperator.from_scipy(a),
                       jnp.asarray(complex_vector(rng, 49)))


def _gpu_op(a, tags=(), dtype=None):
    op = lxa.CSROperator.from_scipy(a, tags=tags, dtype=dtype)
    return jax.device_put(op, jax.devices("cuda")[0])


@pytest.mark.gpu
def test_gpu_complex_solves_are_refused_not_crashed(monkeypatch, rng):
    """On the device: every way of reaching AmgX with a complex operator is a
    TypeError naming the limitation, AmgX sets nothing up, and the process (and
    AmgX) go on: a real solve after them succeeds."""
    monkeypatch.delenv(_complex.ENV, raising=False)
    a = helmholtz2d(24, 8.0, 0.5)
    b = complex_vector(rng, a.shape[0])
    for dtype in (np.complex128, np.complex64):
        op = _gpu_op(a, SYM, dtype)
        gb = gpu_array(b.astype(dtype))
        for kwargs in ({}, {"precision": "mixed"}, {"backend": "amgx"},
                       {"config": "FGMRES_AGGREGATION"}):
            solver = lxa.AMGX(**kwargs)
            with pytest.raises(TypeError, match=REFUSED):
                jax.block_until_ready(lx.linear_solve(op, gb, solver=solver).value)
            with pytest.raises(TypeError, match=REFUSED):
                jax.block_until_ready(jax.jit(
                    lambda o, v, s=solver: lx.linear_solve(o, v, solver=s).value
                )(op, gb))
        with pytest.raises(TypeError, match=REFUSED):
            lxa.AMGXPreconditioner(op)
        with pytest.raises(TypeError, match=REFUSED):
            jax.block_until_ready(lx.linear_solve(
                op, gb, lxa.AMGXPreconditioned(lx.GMRES(rtol=1e-6, atol=0.0))
            ).value)
    assert lxa.cache_info("amgx")["setups"] == 0
    real = sp.csr_array(poisson2d(24))
    rb = rng.standard_normal(real.shape[0])
    x = lx.linear_solve(_gpu_op(real, (SYM, HPD)), gpu_array(rb),
                        solver=lxa.AMGX(rtol=1e-10, atol=0.0)).value
    assert rel_err(x, reference(real, rb)) < 1e-8
    assert lxa.cache_info("amgx")["setups"] == 1


@pytest.mark.gpu
def test_gpu_arrays_solve_complex_with_backend_pyamg(rng):
    """`backend="pyamg"` solves complex systems held on a GPU (a host callback
    copies them): plain, jitted, a gradient against a dense solve, complex64,
    and the CPU backend's preconditioner inside lx.GMRES."""
    gpu = jax.devices("cuda")[0]
    a = helmholtz2d(32, 10.0, 0.5)
    b = complex_vector(rng, a.shape[0])
    op, gb = _gpu_op(a, SYM), gpu_array(b)
    solver = lxa.AMGX(backend="pyamg", rtol=1e-11, atol=0.0)
    sol = lx.linear_solve(op, gb, solver=solver)
    assert sol.value.dtype == jnp.complex128 and sol.value.devices() == {gpu}
    assert rel_err(sol.value, reference(a, b)) < 1e-8
    x = jax.jit(lambda v, bb: lx.linear_solve(op.with_values(v), bb,
                                              solver=solver).value)(op.values, gb)
    assert rel_err(x, reference(a, b)) < 1e-8

    g = jax.grad(lambda bb: jnp.sum(
        jnp.abs(lx.linear_solve(op, bb, solver=solver).value) ** 2))(gb)
    cpu = jax.devices("cpu")[0]
    dense = jax.device_put(jnp.asarray(a.toarray()), cpu)
    g_ref = jax.grad(lambda bb: jnp.sum(jnp.abs(jnp.linalg.solve(dense, bb)) ** 2))(
        jax.device_put(jnp.asarray(b), cpu))
    assert rel_err(g, g_ref) < 1e-7
    a24 = helmholtz2d(24, 8.0, 0.5)  # (as in test_solves_complex64)
    b24 = complex_vector(rng, a24.shape[0])
    x32 = lx.linear_solve(_gpu_op(a24, SYM, np.complex64),
                          gpu_array(b24.astype(np.complex64)),
                          solver=lxa.AMGX(backend="pyamg")).value
    assert x32.dtype == jnp.complex64 and rel_err(x32, reference(a24, b24)) < 1e-4
    P = lxa.AMGXPreconditioner(op, backend="pyamg")
    sol = lx.linear_solve(op, gb, lx.GMRES(rtol=1e-10, atol=1e-10),
                          options={"preconditioner": P}, throw=False)
    _assert_solved(sol)
    assert rel_err(sol.value, reference(a, b)) < 1e-7
    assert lxa.cache_info("amgx")["setups"] == 0
