// Copyright 2026 The lineax-amgx authors. Licensed under the Apache License, Version 2.0.
//
// What the single-process cache (cache.h) and the distributed cache
// (dist_cache.h) share: the key of an entry, its counters, and the AmgX
// operations on an entry's handles (create, set up, reset up, solve, dispose).
// An entry type E has `key`, `cfg`, `matrix`, `rhs`, `sol` and `solver`.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "amgx_api.h"
#include "codes.h"
#include "loader.h"
#include "resources.h"

namespace lxa {

struct Key {
  CUdevice device;
  int64_t fingerprint;
  int32_t block_size;
  int32_t mode;
  std::string config;
  bool transposed;
  int64_t comm;  // 0: no communicator (single process)
  bool operator==(const Key& o) const {
    return device == o.device && fingerprint == o.fingerprint &&
           block_size == o.block_size && mode == o.mode && transposed == o.transposed &&
           comm == o.comm && config == o.config;
  }
};

// Block sizes AmgX cannot take (see kMaxGpuBlockSize) are refused before AmgX
// sees them: single-process (handlers.cc) and distributed (dist_cache.cc) setups.
inline void check_gpu_block_size(int32_t block_size) {
  if (block_size >= 1 && block_size <= kMaxGpuBlockSize) return;
  const std::string b = std::to_string(block_size);
  throw Failure("AmgX cannot solve " + b + "x" + b +
                " block systems here: lineax-amgx passes block sizes 1 to " +
                std::to_string(kMaxGpuBlockSize) +
                " to AmgX (6 and 8 crash AmgX 2.5 with an illegal memory access, 7 "
                "has no aggregation kernel). Use the scalar form of the operator "
                "(block_size=1) on the GPU, or the CPU backend (pyamg), which takes "
                "blocks up to 8.");
}

struct Counters {
#define LXA_COUNTER_FIELD(name) int64_t name = 0;
  LXA_COUNTERS(LXA_COUNTER_FIELD)
#undef LXA_COUNTER_FIELD
};

// The bytes of one matrix value (`matrix`) or one vector element in AmgX `mode`;
// refuses a mode the core does not know.
size_t element_size(int32_t mode, bool matrix);

// Destroys an entry (single-process or distributed), or leaks it when its
// device's context is broken (destroying AmgX objects then throws from
// destructors and aborts the process).
template <typename E>
void dispose(std::unique_ptr<E>& e) {
  if (!e) return;
  if (context_healthy(e->key.device)) {
    e.reset();
  } else {
    (void)e.release();
  }
}

// One AmgX solve of a bound (rhs, sol) pair: upload `b` (and `x0`, or start from
// zero), solve, read status / iterations / last residual, download into `x` and
// wait for the device. Pointers may be host or device memory (AmgX copies).
// Returns the seconds it took.
double run_amgx_solve(AMGX_solver_handle solver, AMGX_vector_handle rhs,
                      AMGX_vector_handle sol, int n, int bs, const void* b, const void* x0,
                      void* x, int32_t* status, int32_t* iterations, double* residual);

enum class ResetupMode { kResetup, kSetup };

// The AmgX objects of an entry (single-process or distributed): its config from
// the key, a matrix, two vectors and a solver on `rsrc`.
template <typename E>
void create_handles(E& e, AMGX_resources_handle rsrc) {
  LXA_AMGX(AMGX_config_create(&e.cfg.h, e.key.config.c_str()));
  LXA_AMGX(AMGX_matrix_create(&e.matrix.h, rsrc, e.key.mode));
  LXA_AMGX(AMGX_vector_create(&e.rhs.h, rsrc, e.key.mode));
  LXA_AMGX(AMGX_vector_create(&e.sol.h, rsrc, e.key.mode));
  LXA_AMGX(AMGX_solver_create(&e.solver.h, rsrc, e.key.mode, e.cfg.h));
}

// After the matrix upload: bind the vectors to it, set the solver up, wait.
template <typename E>
void bind_and_setup(E& e) {
  LXA_AMGX(AMGX_vector_bind(e.rhs.h, e.matrix.h));
  LXA_AMGX(AMGX_vector_bind(e.sol.h, e.matrix.h));
  LXA_AMGX(AMGX_solver_setup(e.solver.h, e.matrix.h));
  LXA_CU(cuCtxSynchronize());
}

// New values on the same structure: replace the coefficients and set the solver
// up again (AMGX_solver_resetup while the library has it and `mode` asks for it).
// Returns the seconds it took.
template <typename E>
double run_amgx_resetup(E& e, int n, int nnz, const void* values, ResetupMode mode) {
  auto t0 = std::chrono::steady_clock::now();
  LXA_AMGX(AMGX_matrix_replace_coefficients(e.matrix.h, n, nnz, values, nullptr));
  if (mode == ResetupMode::kResetup && api().AMGX_solver_resetup) {
    LXA_AMGX(AMGX_solver_resetup(e.solver.h, e.matrix.h));
  } else {
    LXA_AMGX(AMGX_solver_setup(e.solver.h, e.matrix.h));
  }
  LXA_CU(cuCtxSynchronize());
  return seconds_since(t0);
}

}  // namespace lxa
