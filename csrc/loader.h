// Copyright 2026 The lineax-amgx authors. Licensed under the Apache License, Version 2.0.
//
// Run-time loading of AmgX (libamgxsh.so) and of the CUDA driver (libcuda.so.1),
// the core's lock, AmgX's captured output, error helpers, CUDA context scopes and
// the "poisoned" state of a CUDA context broken by a fault inside AmgX.
// Nothing of AmgX or CUDA is linked: the package builds and imports without them.
#pragma once

#include <chrono>
#include <mutex>
#include <stdexcept>
#include <string>

#include "amgx_api.h"

namespace lxa {

// An error that becomes an ffi::Error (or a Python RuntimeError) with its message.
struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The functions of AmgX and of the CUDA driver, resolved with dlsym.
struct Api {
#define LXA_DECLARE(name, ret, args) ret(*name) args = nullptr;
  LXA_AMGX_FUNCTIONS(LXA_DECLARE)
  LXA_AMGX_OPTIONAL_FUNCTIONS(LXA_DECLARE)
  LXA_CUDA_FUNCTIONS(LXA_DECLARE)
#undef LXA_DECLARE
  void* amgx_handle = nullptr;
  void* cuda_handle = nullptr;
  std::string amgx_path;
  std::string load_error;  // why AmgX could not be loaded (empty when loaded)
  bool initialized = false;  // AMGX_initialize has run (and finalize has not)
  bool error_output_hooked = false;  // AmgX's error printer routed to us
};

// Process-lifetime state is heap-allocated and never destroyed: at interpreter exit
// no destructor may call into AmgX or CUDA (either may already be torn down). The
// Python side calls finalize() from an atexit hook instead.
Api& api();

// Everything that touches the caches, AmgX or the api table holds this lock.
std::recursive_mutex& core_mutex();

// AmgX prints through a callback: captured (for error messages) and shown only
// while a verbose call runs.
struct PrintState {
  bool verbose = false;
  std::string captured;
};
PrintState& print_state();

// Takes (and clears) what AmgX printed since the last call.
std::string take_captured();

// The message of a failed AmgX call: AmgX's error string and what it printed.
std::string amgx_error(const char* what, AMGX_RC rc);

#define LXA_AMGX(call)                                            \
  do {                                                            \
    AMGX_RC _rc = api().call;                                     \
    if (_rc != AMGX_RC_OK) throw Failure(amgx_error(#call, _rc)); \
  } while (0)

std::string cuda_error_string(CUresult rc);

#define LXA_CU(call)                                                                \
  do {                                                                              \
    CUresult _rc = api().call;                                                      \
    if (_rc != 0)                                                                   \
      throw Failure(std::string("CUDA call ") + #call + " failed: " +               \
                    cuda_error_string(_rc));                                        \
  } while (0)

void load_cuda_driver();

// Loads libamgxsh.so from `path` (resolved by the Python side: LINEAX_AMGX_LIBRARY,
// then AMGX_DIR, then the loader path) and checks every symbol we need.
void load_amgx(const std::string& path);

// Loads the CUDA driver and initialises AmgX (once), or says why it cannot.
void ensure_initialized();

// From now on the process exits without running AmgX's destructors.
void skip_amgx_teardown();

// Why the CUDA context is unusable ("" while it is fine). After an asynchronous
// CUDA fault (an illegal address inside AmgX, say) the context is unusable: every
// later CUDA call fails, and AmgX's destructors would throw from destructors
// (std::terminate). The core then refuses further work with a clear error and
// leaks, rather than destroys, what it holds.
std::string& poisoned();

// Records why the context is unusable (and makes the process exit without AmgX's
// teardown).
void mark_poisoned(const std::string& why);

// Whether `device`'s context is healthy (and records why not).
bool context_healthy(CUdevice device);

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Makes the context of an XLA stream current for the scope (AmgX's runtime and our
// driver calls then work on the stream's device).
struct ContextScope {
  CUcontext ctx = nullptr;
  CUdevice device = 0;
  explicit ContextScope(CUstream stream) {
    LXA_CU(cuStreamGetCtx(stream, &ctx));
    LXA_CU(cuCtxPushCurrent_v2(ctx));
    CUresult rc = api().cuCtxGetDevice(&device);
    if (rc != 0) {
      CUcontext popped;
      api().cuCtxPopCurrent_v2(&popped);
      throw Failure("cuCtxGetDevice failed: " + cuda_error_string(rc));
    }
  }
  ~ContextScope() {
    CUcontext popped;
    api().cuCtxPopCurrent_v2(&popped);
  }
  ContextScope(const ContextScope&) = delete;
  ContextScope& operator=(const ContextScope&) = delete;
};

// Makes `device`'s primary context current for the scope.
struct PrimaryContextScope {
  CUdevice device = 0;
  CUcontext ctx = nullptr;
  explicit PrimaryContextScope(int ordinal) {
    LXA_CU(cuDeviceGet(&device, ordinal));
    LXA_CU(cuDevicePrimaryCtxRetain(&ctx, device));
    CUresult rc = api().cuCtxPushCurrent_v2(ctx);
    if (rc != 0) {
      api().cuDevicePrimaryCtxRelease_v2(device);
      throw Failure("cuCtxPushCurrent failed: " + cuda_error_string(rc));
    }
  }
  ~PrimaryContextScope() {
    CUcontext popped;
    api().cuCtxPopCurrent_v2(&popped);
    api().cuDevicePrimaryCtxRelease_v2(device);
  }
  PrimaryContextScope(const PrimaryContextScope&) = delete;
  PrimaryContextScope& operator=(const PrimaryContextScope&) = delete;
};

}  // namespace lxa
