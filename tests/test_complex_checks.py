"""Complex values and the package's checks: the symmetry-tag check follows
Lineax's meaning of the tags for complex values (`lx.symmetric_tag`: `A = Aᵀ`,
compared without conjugation; the semidefinite tags: `A = Aᴴ`, compared with the
conjugate mirror, so a diagonal must be real), concrete and traced; a null space
with a complex operator is refused. (The complex solves: test_complex.py.)"""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
import scipy.sparse as sp
from _complex_helpers import (
    complex_vector,
    helmholtz2d,
    magnetic_laplacian2d,
    reference,
    rel_err,
)

import lineax_amgx as lxa

SYM = lx.symmetric_tag
HPD = lx.positive_semidefinite_tag  # complex: Hermitian positive semidefinite
RUNTIME = (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError)

# CPU tests: an empty setup cache, the CPU as JAX's default device (conftest).
pytestmark = pytest.mark.usefixtures("on_cpu")


# -----------------------------------------------------------------------------
# Symmetry tags on complex values (the check of lineax_amgx/_checks.py): as in
# Lineax, lx.symmetric_tag means A = A^T, the semidefinite tags A = A^H.
# -----------------------------------------------------------------------------

def test_symmetry_tags_are_checked_as_lineax_means_them(rng):
    sym = helmholtz2d(6, 3.0, 0.5)  # A = A^T, not Hermitian
    herm = magnetic_laplacian2d(6, rng)  # A = A^H, not symmetric
    lxa.CSROperator.from_scipy(sym, tags=SYM)
    lxa.CSROperator.from_scipy(herm, tags=HPD)
    with pytest.raises(ValueError, match=r"tagged lx.positive_semidefinite_tag, "
                       r"but its complex values are not Hermitian: the largest "
                       r"\|A\[i, j\] - conj\(A\[j, i\]\)\|"):
        lxa.CSROperator.from_scipy(sym, tags=HPD)
    with pytest.raises(ValueError, match="tagged lx.symmetric_tag, but its values "
                       "are not symmetric"):
        lxa.CSROperator.from_scipy(herm, tags=SYM)
    with pytest.raises(ValueError, match="not Hermitian"):
        lxa.CSROperator.from_scipy(sym, tags=(SYM, HPD))
    # Both tags: real values (in a complex dtype) pass both checks.
    lxa.CSROperator.from_scipy(helmholtz2d(6, 3.0, 0.0), tags=(SYM, HPD))
    # A diagonal is symmetric whatever its values, Hermitian only if it is real.
    d = np.full(8, 4.0 + 0j)
    d[2] = 4.0 + 0.5j
    diag = sp.csr_array(sp.diags(d))
    lxa.CSROperator.from_scipy(diag, tags=SYM)
    with pytest.raises(ValueError, match=r"not Hermitian: .* at A\[2, 2\]"):
        lxa.CSROperator.from_scipy(diag, tags=HPD)
    lxa.CSROperator.from_scipy(sp.csr_array(sp.diags(d.real + 0j)), tags=HPD)


def test_traced_complex_values_are_checked_as_lineax_means_them(rng):
    """Under jit: the same checks through eqx.error_if; the accepted cases solve
    (against spsolve)."""
    sym, herm = helmholtz2d(6, 3.0, 0.5), magnetic_laplacian2d(6, rng)
    b = complex_vector(rng, 36)
    solver = lxa.AMGX(rtol=1e-11, atol=0.0)

    def solver_of(a, tags):
        p = lxa.CSROperator.from_scipy(a).pattern

        @jax.jit
        def solve(values, b):
            op = lxa.CSROperator(p, values, tags)
            return lx.linear_solve(op, b, solver=solver).value

        return lambda: solve(jnp.asarray(a.data), jnp.asarray(b))

    for a, good, bad, message in ((sym, SYM, HPD, "not Hermitian"),
                                  (herm, HPD, SYM, "not symmetric")):
        assert rel_err(solver_of(a, good)(), reference(a, b)) < 1e-8
        with pytest.raises(RUNTIME, match=message):
            jax.block_until_ready(solver_of(a, bad)())
    # The preconditioner's tags are checked the same way.
    with pytest.raises(ValueError, match="not Hermitian"):
        lxa.AMGXPreconditioner(lxa.CSROperator.from_scipy(sym), tags=HPD)


def test_null_space_with_a_complex_operator_is_refused(rng):
    a = helmholtz2d(6, 3.0, 0.5)
    op = lxa.CSROperator.from_scipy(a, tags=SYM)
    b = jnp.asarray(complex_vector(rng, 36))
    n = np.ones((36, 1))
    message = r"null space was given for a complex operator \(complex128\)"
    with pytest.raises(TypeError, match=message):
        lx.linear_solve(op, b, solver=lxa.AMGX(), options={"null_space": n})
    with pytest.raises(TypeError, match=message):
        lx.linear_solve(op, b, solver=lxa.AMGX(null_space=n))
    # (and without one, the same system solves)
    x = lx.linear_solve(op, b, solver=lxa.AMGX(rtol=1e-10, atol=0.0)).value
    assert rel_err(x, reference(a, np.asarray(b))) < 1e-8
