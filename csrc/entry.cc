// Copyright 2026 The lineax-amgx authors. Licensed under the Apache License, Version 2.0.
//
// AmgX operations shared by both caches (see entry.h).

#include "entry.h"

#include <algorithm>

namespace lxa {

size_t element_size(int32_t mode, bool matrix) {
  if (const ModeInfo* m = find_mode(mode))
    return matrix ? m->matrix_bytes : m->vector_bytes;
  throw Failure("unsupported AmgX mode " + std::to_string(mode));
}

double run_amgx_solve(AMGX_solver_handle solver, AMGX_vector_handle rhs,
                      AMGX_vector_handle sol, int n, int bs, const void* b, const void* x0,
                      void* x, int32_t* status, int32_t* iterations, double* residual) {
  auto t0 = std::chrono::steady_clock::now();
  LXA_AMGX(AMGX_vector_upload(rhs, n, bs, b));
  if (x0 != nullptr) {
    LXA_AMGX(AMGX_vector_upload(sol, n, bs, x0));
    LXA_AMGX(AMGX_solver_solve(solver, rhs, sol));
  } else {
    LXA_AMGX(AMGX_vector_set_zero(sol, n, bs));
    LXA_AMGX(AMGX_solver_solve_with_0_initial_guess(solver, rhs, sol));
  }
  int st = 0, its = 0;
  LXA_AMGX(AMGX_solver_get_status(solver, &st));
  LXA_AMGX(AMGX_solver_get_iterations_number(solver, &its));
  double res = -1.0;
  if (api().AMGX_solver_get_iteration_residual(solver, std::max(its, 0), 0, &res) !=
      AMGX_RC_OK) {
    res = -1.0;  // residual history unavailable (e.g. monitoring off)
  }
  LXA_AMGX(AMGX_vector_download(sol, x));
  LXA_CU(cuCtxSynchronize());
  *status = st;
  *iterations = its;
  *residual = res;
  return seconds_since(t0);
}

}  // namespace lxa
