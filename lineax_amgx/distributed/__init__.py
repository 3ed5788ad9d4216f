# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""Distributed operators: one process per GPU, rows partitioned contiguously, MPI.

Every process (*rank*) of an MPI communicator holds a contiguous block of rows of
one square global matrix, with *global* column indices, and the same rows of every
vector. [`lineax_amgx.distributed.DistributedCSROperator`][] is the Lineax operator
of one rank: `lx.linear_solve(op, b_local, solver=lineax_amgx.AMGX())` returns the
local part of the global solution when every rank makes the same call (SPMD, as
with `mpirun`). See `docs/guide/distributed.md`.

```python
import lineax_amgx.distributed as lxd
op = lxd.DistributedCSROperator.from_global_scipy(A if rank == 0 else None)
b = jnp.asarray(lxd.scatter_vector(b_global if rank == 0 else None, op.layout))
x = lx.linear_solve(op, b, solver=lineax_amgx.AMGX()).value
x_global = lxd.gather_vector(x, op.layout)
```

mpi4py is imported lazily: the package imports without MPI.

Collective calls: every function documented as *collective* must be called by
every rank of the communicator, in the same order. Host callbacks inside `jit`
(the halo exchange, the CPU solve, `allreduce_sum`) are collective too: every rank
must run the same program. A rank-local error found before communicating is
agreed on first, so that it is raised on every rank instead of leaving the others
waiting.

Modules (private): `_sequencer` (one order of MPI calls on every rank), `_comm`
(mpi4py, agreed errors, the communicator registry), `_layout`, `_pattern`,
`_collectives` (halo exchange, reductions, `after`), `_vectors`, `_operator`,
`_shard_map`, `_amgx` / `_pyamg` (the backends for distributed patterns),
`_cache` and `_sparsify` (matrix-free Jacobians: detected, colored and assembled
per rank).
"""

from .._backends import contract as _contract
from . import _amgx, _pyamg
from ._amgx import (
    amgx_mpi_library as amgx_mpi_library,
    native_distribution_args as native_distribution_args,
)
from ._cache import (
    cache_info as cache_info,
    clear_cache as clear_cache,
)
from ._collectives import (
    after as after,
    allreduce_sum as allreduce_sum,
    global_dot as global_dot,
    global_norm as global_norm,
)
from ._comm import (
    DistributedError as DistributedError,
    agree as agree,
    check_mpi_library as check_mpi_library,
    local_rank as local_rank,
    mpi_library as mpi_library,
)
from ._layout import (
    Layout as Layout,
    balanced_offsets as balanced_offsets,
)
from ._operator import (
    DistributedCSROperator as DistributedCSROperator,
)
from ._pattern import (
    DistributedPattern as DistributedPattern,
)
from ._sequencer import (
    DistributedOrderError as DistributedOrderError,
    DistributedTimeoutError as DistributedTimeoutError,
)
from ._shard_map import (
    check_jax_distributed as check_jax_distributed,
    pad_values as pad_values,
    pad_vector as pad_vector,
    unpad_values as unpad_values,
    unpad_vector as unpad_vector,
)
from ._sparsify import (
    DistributedJacobianOperator as DistributedJacobianOperator,
)
from ._vectors import (
    gather_vector as gather_vector,
    scatter_vector as scatter_vector,
)

# This package's backends serve distributed patterns (the router finds them by
# the pattern's type).
_contract.register("amgx", DistributedPattern, _amgx.gpu_backend)
_contract.register("pyamg", DistributedPattern, _pyamg)

__all__ = [
    "DistributedCSROperator",
    "DistributedError",
    "DistributedJacobianOperator",
    "DistributedOrderError",
    "DistributedPattern",
    "DistributedTimeoutError",
    "Layout",
    "after",
    "agree",
    "allreduce_sum",
    "amgx_mpi_library",
    "balanced_offsets",
    "cache_info",
    "check_jax_distributed",
    "check_mpi_library",
    "clear_cache",
    "gather_vector",
    "global_dot",
    "global_norm",
    "local_rank",
    "mpi_library",
    "native_distribution_args",
    "pad_values",
    "pad_vector",
    "scatter_vector",
    "unpad_values",
    "unpad_vector",
]
