// Copyright 2026 The lineax-amgx authors. Licensed under the Apache License, Version 2.0.
//
// The codes and names that the native core and the Python package share, defined
// here once. bindings.cc exports every table below as an attribute of
// lineax_amgx._native (see _native.pyi); the Python side reads them from there.
#pragma once

#include <cstddef>
#include <cstdint>

namespace lxa {

// A solve's status (info[0] of the FFI solve, the first value of dist_solve):
// AmgX's AMGX_SOLVE_STATUS (0-3) and one of ours (4: AmgX was not called because
// an input held NaN or Inf; the output is NaN).
enum SolveStatus : int32_t {
  kStatusSuccess = 0,
  kStatusFailed = 1,
  kStatusDiverged = 2,
  kStatusNotConverged = 3,
  kStatusNonFinite = 4,
};

struct NamedCode {
  const char* name;
  int32_t code;
};

// Exported as STATUS_<name>.
inline constexpr NamedCode kStatuses[] = {
    {"SUCCESS", kStatusSuccess},
    {"FAILED", kStatusFailed},
    {"DIVERGED", kStatusDiverged},
    {"NOT_CONVERGED", kStatusNotConverged},
    {"NONFINITE", kStatusNonFinite},
};

// The AmgX modes lineax-amgx uses (AmgX's AMGX_Mode values; "d": on the device,
// then the vector, matrix and index precisions: D double, F float, Z double
// complex, C float complex) and their element sizes in bytes. dDFI (float64
// vectors, float32 matrix) is refused by CUDA >= 10.1 builds of AmgX for most
// configs; the core still accepts it. A complex element is two reals, real part
// first (XLA's complex128/complex64 layout, and AmgX's cuDoubleComplex/cuComplex).
struct ModeInfo {
  const char* name;
  int32_t id;
  size_t matrix_bytes;
  size_t vector_bytes;
};

// Exported as MODES (name -> id), MODE_MATRIX_BYTES and MODE_VECTOR_BYTES.
inline constexpr ModeInfo kModes[] = {
    {"dDDI", 8193, 8, 8},
    {"dDFI", 8449, 4, 8},
    {"dFFI", 8465, 4, 4},
    {"dZZI", 9009, 16, 16},
    {"dCCI", 9281, 8, 8},
};

// The mode with AmgX id `id`, or nullptr.
inline const ModeInfo* find_mode(int32_t id) {
  for (const ModeInfo& m : kModes)
    if (m.id == id) return &m;
  return nullptr;
}

// Square blocks of 1 to kMaxGpuBlockSize unknowns reach AmgX (exported as
// MAX_GPU_BLOCK_SIZE). AmgX 2.5 (checked on an H200 with the aggregation presets):
// block sizes 6 and 8 end in an illegal memory access that ruins the CUDA context,
// 7 has no aggregation (LOW_DEG) kernel.
inline constexpr int32_t kMaxGpuBlockSize = 5;

// A distributed cache probe's outcome, and the action the ranks agree on (the
// maximum over the ranks). Exported as PROBE_HIT, PROBE_RESETUP, PROBE_SETUP.
enum ProbeResult : int32_t {
  kProbeHit = 0,      // an entry with the key holds exactly these values
  kProbeResetup = 1,  // an entry with the key exists: new values, resetup
  kProbeSetup = 2,    // no entry with the key: a full setup
};

// The XLA FFI targets (registrations() maps these names to the handlers).
// Exported as FFI_TARGETS (kind -> target name).
struct FfiTarget {
  const char* kind;
  const char* name;
};
inline constexpr FfiTarget kFfiSetup{"setup", "lineax_amgx_setup"};
inline constexpr FfiTarget kFfiSolve{"solve", "lineax_amgx_solve"};
inline constexpr FfiTarget kFfiDistSetup{"dist_setup", "lineax_amgx_dist_setup"};
inline constexpr FfiTarget kFfiDistSolve{"dist_solve", "lineax_amgx_dist_solve"};
// The runtime-array target (runtime_arrays.h), registered for the CPU and for CUDA
// (runtime_array_handlers() maps platforms to its handlers). Exported as
// RUNTIME_ARRAY_TARGET.
inline constexpr const char* kFfiRuntimeArray = "lineax_amgx_runtime_array";

// The counters of a cache and of each entry, in cache_info()'s order (exported as
// COUNTER_NAMES). X(name)
#define LXA_COUNTERS(X) X(hits) X(misses) X(setups) X(resetups) X(solves) X(evictions)

// How new values on a resident structure are set up (set_resetup_mode): AmgX's
// resetup (the default, reusing the hierarchy's structure) or a full setup.
// Exported as RESETUP_MODES.
inline constexpr const char* kResetupModeNames[] = {"resetup", "setup"};

}  // namespace lxa
