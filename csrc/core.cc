// Copyright 2026 The lineax-amgx authors. Licensed under the Apache License, Version 2.0.
//
// The native core of lineax-amgx: loads AmgX and the CUDA driver at run time, owns
// the AmgX resource cache, and implements the XLA FFI handlers `lineax_amgx_setup`
// and `lineax_amgx_solve`. Exposed to Python with nanobind as lineax_amgx._native.

#include <dlfcn.h>
#include <stdlib.h>  // on_exit (glibc)
#include <unistd.h>  // _exit

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "amgx_api.h"
#include "kernels_ptx.h"
#include "xla/ffi/api/ffi.h"

namespace nb = nanobind;
namespace ffi = xla::ffi;

namespace lxa {
namespace {

// An error that becomes an ffi::Error (or a Python RuntimeError) with its message.
struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ------------------------------------------------------------------------------
// Run-time loading of AmgX and of the CUDA driver.
// ------------------------------------------------------------------------------

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
Api& api() {
  static Api* a = new Api();
  return *a;
}

// Everything below that touches the cache, AmgX or the api table holds this lock.
std::recursive_mutex& core_mutex() {
  static std::recursive_mutex* m = new std::recursive_mutex();
  return *m;
}

// AmgX prints through this callback: captured (for error messages) and shown only
// while a verbose call runs.
struct PrintState {
  bool verbose = false;
  std::string captured;
};
PrintState& print_state() {
  static PrintState* s = new PrintState();
  return *s;
}

void print_callback(const char* msg, int length) {
  auto& ps = print_state();
  if (length <= 0 || msg == nullptr) return;
  ps.captured.append(msg, static_cast<size_t>(length));
  if (ps.captured.size() > 16384) ps.captured.erase(0, ps.captured.size() - 8192);
  if (ps.verbose) {
    std::fwrite(msg, 1, static_cast<size_t>(length), stderr);
    std::fflush(stderr);
  }
}

std::string take_captured() {
  std::string out;
  std::swap(out, print_state().captured);
  // Keep the message readable: trim and collapse blank lines.
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  return out;
}

std::string amgx_error(const char* what, AMGX_RC rc) {
  char buf[512] = {0};
  if (api().AMGX_get_error_string) api().AMGX_get_error_string(rc, buf, sizeof(buf));
  std::string msg = std::string("AmgX ") + what + " failed (error " +
                    std::to_string(rc) + ": " + buf + ")";
  std::string printed = take_captured();
  // Keep AmgX's message, drop its (long, mangled) stack trace.
  size_t cut = printed.find("Stack trace:");
  if (cut != std::string::npos) printed.erase(cut);
  while (!printed.empty() && (printed.back() == '\n' || printed.back() == ' '))
    printed.pop_back();
  if (!printed.empty()) msg += "\nAmgX said:\n" + printed;
  return msg;
}

#define LXA_AMGX(call)                                            \
  do {                                                            \
    AMGX_RC _rc = api().call;                                     \
    if (_rc != AMGX_RC_OK) throw Failure(amgx_error(#call, _rc)); \
  } while (0)

std::string cuda_error_string(CUresult rc) {
  const char* s = nullptr;
  if (api().cuGetErrorString && api().cuGetErrorString(rc, &s) == 0 && s) return s;
  return "CUDA driver error " + std::to_string(rc);
}

#define LXA_CU(call)                                                                \
  do {                                                                              \
    CUresult _rc = api().call;                                                      \
    if (_rc != 0)                                                                   \
      throw Failure(std::string("CUDA call ") + #call + " failed: " +               \
                    cuda_error_string(_rc));                                        \
  } while (0)

void load_cuda_driver() {
  Api& a = api();
  if (a.cuda_handle) return;
  void* h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!h)
    throw Failure(
        "No CUDA driver: libcuda.so.1 could not be loaded (is an NVIDIA driver "
        "installed?): " +
        std::string(dlerror()));
#define LXA_RESOLVE_CU(name, ret, args)                                          \
  a.name = reinterpret_cast<ret(*) args>(dlsym(h, #name));                       \
  if (!a.name) {                                                                 \
    dlclose(h);                                                                  \
    throw Failure("The CUDA driver lacks the symbol " #name " (driver too old?)"); \
  }
  LXA_CUDA_FUNCTIONS(LXA_RESOLVE_CU)
#undef LXA_RESOLVE_CU
  a.cuda_handle = h;
  CUresult rc = a.cuInit(0);
  if (rc != 0) throw Failure("cuInit failed: " + cuda_error_string(rc));
}

// Loads libamgxsh.so from `path` (resolved by the Python side: LINEAX_AMGX_LIBRARY,
// then AMGX_DIR, then the loader path) and checks every symbol we need.
std::string& poisoned();  // why the CUDA context is unusable ("" while it is fine)

// Runs at exit(), after Python has finalised and before the static destructors of
// libraries loaded earlier (AmgX's among them: on_exit handlers and those
// destructors run in reverse order of registration). After a CUDA fault inside
// AmgX those destructors free device memory, get an error, throw, and abort the
// process ("terminate called after throwing an instance of 'amgx::amgx_exception'").
// So when the context is known broken, leave now with the status the program
// exits with (glibc's on_exit passes it).
bool& teardown_skipped() {
  static bool skipped = false;
  return skipped;
}

void exit_without_amgx_teardown(int status, void*) {
  if (poisoned().empty() && !teardown_skipped()) return;
  if (!poisoned().empty())
    std::fprintf(stderr,
                 "lineax-amgx: exiting without AmgX's teardown (%s); exit status %d\n",
                 poisoned().c_str(), status);
  std::fflush(nullptr);
  _exit(status);
}

// From now on the process exits without running AmgX's destructors. Registers the
// exit hook again so that it runs before every destructor AmgX registered so far.
void skip_amgx_teardown() {
  if (teardown_skipped()) return;
  teardown_skipped() = true;
  on_exit(&exit_without_amgx_teardown, nullptr);
}

void load_amgx(const std::string& path) {
  std::lock_guard<std::recursive_mutex> lock(core_mutex());
  Api& a = api();
  if (a.amgx_handle) {
    if (path == a.amgx_path || path.empty()) return;
    throw Failure("AmgX is already loaded from " + a.amgx_path +
                  "; a process can load only one AmgX library.");
  }
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    a.load_error = "could not load the AmgX library " + path + ": " + dlerror();
    throw Failure(a.load_error);
  }
  // After the static destructors AmgX registers while loading. Those it
  // registers later (function-local statics built in AMGX_initialize or in a
  // first solve: its memory pools) would run before this hook, so mark_poisoned
  // registers it once more at the moment the context breaks.
  on_exit(&exit_without_amgx_teardown, nullptr);
#define LXA_RESOLVE(name, ret, args)                                             \
  a.name = reinterpret_cast<ret(*) args>(dlsym(h, #name));                       \
  if (!a.name) {                                                                 \
    dlclose(h);                                                                  \
    a.load_error = "the AmgX library " + path + " lacks the required symbol " #name \
                   " (an incompatible or truncated build?)";                     \
    throw Failure(a.load_error);                                                 \
  }
  LXA_AMGX_FUNCTIONS(LXA_RESOLVE)
#undef LXA_RESOLVE
#define LXA_RESOLVE_OPT(name, ret, args) \
  a.name = reinterpret_cast<ret(*) args>(dlsym(h, #name));
  LXA_AMGX_OPTIONAL_FUNCTIONS(LXA_RESOLVE_OPT)
#undef LXA_RESOLVE_OPT
  // AmgX prints its error messages ("Caught amgx exception: ...") through a
  // second, internal callback that AMGX_register_print_callback does not reach
  // and that defaults to stdout. Where the build exports it, route it through the
  // same capturing callback so that the messages end up in our exceptions.
  if (void* sym = dlsym(h, "_ZN4amgx12error_outputE")) {
    *reinterpret_cast<AMGX_print_callback*>(sym) = &print_callback;
    a.error_output_hooked = true;
  }
  a.amgx_handle = h;
  a.amgx_path = path;
  a.load_error.clear();
}

void ensure_initialized() {
  Api& a = api();
  if (!a.amgx_handle)
    throw Failure(
        a.load_error.empty()
            ? "AmgX is not loaded. Set LINEAX_AMGX_LIBRARY to the path of "
              "libamgxsh.so, or AMGX_DIR to AmgX's install or build directory, or "
              "put libamgxsh.so on the loader path (LD_LIBRARY_PATH)."
            : "AmgX is not available: " + a.load_error +
                  ". Set LINEAX_AMGX_LIBRARY to the path of libamgxsh.so or AMGX_DIR "
                  "to AmgX's install directory; lineax_amgx.info() lists every path "
                  "tried.");
  load_cuda_driver();
  if (!a.initialized) {
    // Register the print callback first so that AmgX's banner is captured, not
    // printed. AmgX's signal handlers are never installed.
    LXA_AMGX(AMGX_register_print_callback(&print_callback));
    LXA_AMGX(AMGX_initialize());
    take_captured();
    a.initialized = true;
  }
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

// After an asynchronous CUDA fault (an illegal address inside AmgX, say) the
// context is unusable: every later CUDA call fails, and AmgX's destructors would
// throw from destructors (std::terminate). The core then refuses further work with
// a clear error and leaks, rather than destroys, what it holds.
std::string& poisoned() {
  static auto* s = new std::string();
  return *s;
}

// Records why the context is unusable, and registers the exit hook again: glibc
// runs exit handlers in reverse order of registration, so this one runs before
// every destructor AmgX registered up to now (none are registered later, since
// nothing reaches AmgX after this).
void mark_poisoned(const std::string& why) {
  if (!poisoned().empty()) return;
  poisoned() = why;
  on_exit(&exit_without_amgx_teardown, nullptr);
}

// Whether `device`'s context is healthy (and records why not).
bool context_healthy(CUdevice device) {
  if (!poisoned().empty()) return false;
  Api& a = api();
  if (!a.cuda_handle) return true;
  CUcontext ctx;
  if (a.cuDevicePrimaryCtxRetain(&ctx, device) != 0) return true;
  a.cuCtxPushCurrent_v2(ctx);
  CUresult rc = a.cuCtxSynchronize();
  CUcontext popped;
  a.cuCtxPopCurrent_v2(&popped);
  a.cuDevicePrimaryCtxRelease_v2(device);
  if (rc != 0) {
    mark_poisoned("the CUDA context of device " + std::to_string(device) +
                  " hit an unrecoverable error (" + cuda_error_string(rc) +
                  "); AmgX cannot be used again in this process: restart it");
    return false;
  }
  return true;
}

// ------------------------------------------------------------------------------
// Patterns registered from Python (host CSR structure, by fingerprint).
// ------------------------------------------------------------------------------

struct Pattern {
  std::vector<int32_t> indptr, indices;
  int64_t block_rows = 0, block_cols = 0;
  int32_t block_size = 1;
};

std::map<int64_t, std::shared_ptr<const Pattern>>& patterns() {
  static auto* p = new std::map<int64_t, std::shared_ptr<const Pattern>>();
  return *p;
}

std::shared_ptr<const Pattern> find_pattern(int64_t fingerprint) {
  auto it = patterns().find(fingerprint);
  if (it == patterns().end())
    throw Failure("internal: sparsity pattern " + std::to_string(fingerprint) +
                  " is not registered with the native core");
  return it->second;
}

// ------------------------------------------------------------------------------
// The value-comparison kernel (PTX, JIT-compiled by the driver once per device).
// ------------------------------------------------------------------------------

struct DeviceKernels {
  CUmodule module = nullptr;
  CUfunction differs = nullptr;
  CUdeviceptr flag = 0;  // one uint32 scratch word
};

std::map<CUdevice, DeviceKernels>& device_kernels() {
  static auto* k = new std::map<CUdevice, DeviceKernels>();
  return *k;
}

// Call with the device's context current.
DeviceKernels& kernels_for(CUdevice device) {
  auto& per_device = device_kernels();
  auto it = per_device.find(device);
  if (it != per_device.end()) return it->second;
  DeviceKernels k;
  LXA_CU(cuModuleLoadData(&k.module, kLxaKernelsPtx));
  LXA_CU(cuModuleGetFunction(&k.differs, k.module, "lxa_differs"));
  LXA_CU(cuMemAlloc_v2(&k.flag, sizeof(uint32_t)));
  return per_device.emplace(device, k).first->second;
}

// Frees the kernels' modules and scratch memory (finalize).
void release_kernels() {
  for (auto& [device, k] : device_kernels()) {
    CUcontext ctx;
    if (api().cuDevicePrimaryCtxRetain(&ctx, device) != 0) continue;
    api().cuCtxPushCurrent_v2(ctx);
    if (k.flag) api().cuMemFree_v2(k.flag);
    if (k.module && api().cuModuleUnload) api().cuModuleUnload(k.module);
    CUcontext popped;
    api().cuCtxPopCurrent_v2(&popped);
  }
  device_kernels().clear();
}

// Exact (bitwise) comparison of two device arrays of `bytes` bytes.
bool device_equal(CUdevice device, CUdeviceptr a, CUdeviceptr b, size_t bytes,
                  CUstream stream) {
  DeviceKernels& k = kernels_for(device);
  LXA_CU(cuMemsetD32Async(k.flag, 0u, 1, stream));
  unsigned long long n16 = bytes / 16;
  unsigned long long n4 = (bytes - n16 * 16) / 4;
  unsigned threads = 256;
  unsigned long long want = (std::max(n16, n4) + threads - 1) / threads;
  unsigned blocks = static_cast<unsigned>(std::min<unsigned long long>(
      std::max<unsigned long long>(want, 1), 132 * 16));
  CUdeviceptr flag = k.flag;
  void* params[] = {&a, &b, &n16, &n4, &flag};
  LXA_CU(cuLaunchKernel(k.differs, blocks, 1, 1, threads, 1, 1, 0, stream, params,
                        nullptr));
  uint32_t differs = 1;
  LXA_CU(cuStreamSynchronize(stream));
  LXA_CU(cuMemcpyDtoH_v2(&differs, k.flag, sizeof(differs)));
  return differs == 0;
}

// ------------------------------------------------------------------------------
// RAII owners of AmgX handles.
// ------------------------------------------------------------------------------

template <typename H, AMGX_RC (*Api::*Destroy)(H)>
struct Owned {
  H h = nullptr;
  Owned() = default;
  Owned(const Owned&) = delete;
  Owned& operator=(const Owned&) = delete;
  ~Owned() { reset(); }
  void reset() {
    if (h && api().initialized) (api().*Destroy)(h);
    h = nullptr;
  }
};

using ConfigOwner = Owned<AMGX_config_handle, &Api::AMGX_config_destroy>;
using ResourcesOwner = Owned<AMGX_resources_handle, &Api::AMGX_resources_destroy>;
using MatrixOwner = Owned<AMGX_matrix_handle, &Api::AMGX_matrix_destroy>;
using VectorOwner = Owned<AMGX_vector_handle, &Api::AMGX_vector_destroy>;
using SolverOwner = Owned<AMGX_solver_handle, &Api::AMGX_solver_destroy>;

struct DeviceBuffer {
  CUdeviceptr ptr = 0;
  size_t bytes = 0;
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { reset(); }
  void allocate(size_t n) {
    reset();
    LXA_CU(cuMemAlloc_v2(&ptr, std::max<size_t>(n, 16)));
    bytes = n;
  }
  void reset() {
    if (ptr && api().cuMemFree_v2) api().cuMemFree_v2(ptr);
    ptr = 0;
    bytes = 0;
  }
};

// One set of AmgX resources per (device, communicator), shared by the entries on
// them. `comm_key` 0: a single process (no communicator). A distributed set keeps
// the MPI_Comm* it was given: the Python side passes the address of a
// communicator it keeps alive (its own Dup of the user's).
struct AmgxResources {
  ConfigOwner cfg;
  ResourcesOwner rsrc;
};

std::map<std::pair<CUdevice, int64_t>, std::unique_ptr<AmgxResources>>& resources() {
  static auto* r =
      new std::map<std::pair<CUdevice, int64_t>, std::unique_ptr<AmgxResources>>();
  return *r;
}

AMGX_resources_handle resources_for(CUdevice device, int64_t comm_key = 0,
                                    uintptr_t comm_ptr = 0) {
  auto& all = resources();
  auto k = std::make_pair(device, comm_key);
  auto it = all.find(k);
  if (it != all.end()) return it->second->rsrc.h;
  auto r = std::make_unique<AmgxResources>();
  // exception_handling=0: AmgX returns error codes (1 would make it exit()).
  LXA_AMGX(AMGX_config_create(&r->cfg.h, "config_version=2, exception_handling=0"));
  int dev = device;
  void* comm = comm_key != 0 ? reinterpret_cast<void*>(comm_ptr) : nullptr;
  LXA_AMGX(AMGX_resources_create(&r->rsrc.h, r->cfg.h, comm, 1, &dev));
  AMGX_resources_handle h = r->rsrc.h;
  all.emplace(k, std::move(r));
  return h;
}

bool context_healthy(CUdevice device);
bool amgx_objects_alive();  // whether either cache holds an entry (defined below)

// Resources taken out of use but not yet destroyed. Destroying *any* AmgX
// resources object destroys process-wide state that every other one shares:
// AmgX 2.5's `~Resources` frees all device and pinned memory pools and the
// cuBLAS/cuSPARSE handles. Entries on another resources object (a distributed
// entry next to single-process ones) would keep running on freed pool memory
// ("detected some memory leaks ... trying to free non-empty temporary device
// pool", 2 x H200, 2026-11-28). So resources are destroyed only when no entry is
// left anywhere; until then they wait here.
std::vector<std::pair<CUdevice, std::unique_ptr<AmgxResources>>>& retired_resources() {
  static auto* r = new std::vector<std::pair<CUdevice, std::unique_ptr<AmgxResources>>>();
  return *r;
}

// Destroys the retired resources once no entry is left (leaks those whose
// device's context is broken: AmgX's destructors would then throw).
void collect_resources() {
  if (amgx_objects_alive()) return;
  for (auto& [device, r] : retired_resources()) {
    if (context_healthy(device))
      r.reset();
    else
      (void)r.release();
  }
  retired_resources().clear();
}

// Takes the single-process (`distributed` false) or the distributed resources (of
// every device, or of `device`) out of use: retired, and destroyed as soon as no
// entry is left; or leaked when `leak` (their entries were abandoned).
void release_resources(bool distributed, bool leak = false, int device = -1) {
  auto& all = resources();
  for (auto it = all.begin(); it != all.end();) {
    if ((it->first.second != 0) != distributed ||
        (device >= 0 && it->first.first != device)) {
      ++it;
      continue;
    }
    if (leak)
      (void)it->second.release();
    else
      retired_resources().emplace_back(it->first.first, std::move(it->second));
    it = all.erase(it);
  }
  if (!leak) collect_resources();
}

// ------------------------------------------------------------------------------
// The cache.
// ------------------------------------------------------------------------------

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

struct Counters {
  int64_t hits = 0, misses = 0, setups = 0, resetups = 0, solves = 0, evictions = 0;
};

struct Entry {
  int32_t id = 0;
  int32_t generation = 0;
  Key key;
  std::shared_ptr<const Pattern> pattern;
  int n = 0, nnz = 0;
  size_t value_bytes = 0;
  // Destroyed in reverse order of declaration: solver, vectors, matrix, config.
  ConfigOwner cfg;
  MatrixOwner matrix;
  VectorOwner rhs, sol;
  SolverOwner solver;
  DeviceBuffer values;  // exact copy of the values the setup used
  Counters counters;
  double last_setup_seconds = 0, last_solve_seconds = 0;
  double total_setup_seconds = 0, total_solve_seconds = 0;
  int64_t gpu_bytes = 0;
  ~Entry() {
    // Explicit order: the solver references the matrix and vectors.
    solver.reset();
    sol.reset();
    rhs.reset();
    matrix.reset();
    cfg.reset();
  }
};

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

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// One AmgX solve of a bound (rhs, sol) pair: upload `b` (and `x0`, or start from
// zero), solve, read status / iterations / last residual, download into `x` and
// wait for the device. Pointers may be host or device memory (AmgX copies).
// Returns the seconds it took.
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

class Cache {
 public:
  static Cache& get() {
    static Cache* c = new Cache();  // leaked on purpose: no teardown at exit
    return *c;
  }

  size_t capacity = 8;
  size_t entries_per_key = 1;
  ResetupMode resetup_mode = ResetupMode::kResetup;
  Counters totals;

  bool isolated() const { return capacity == 0; }

  Entry* find_token(const Key& key, int32_t id, int32_t generation) {
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      Entry* e = it->get();
      if (e->id == id) {
        if (e->generation == generation && e->key == key) {
          touch(it);
          return e;
        }
        return nullptr;
      }
    }
    return nullptr;
  }

  // The entry for `key` holding exactly `values` (setting up or resetting up as
  // needed). Values are on the device; `stream` is XLA's stream (synchronised).
  Entry* acquire(const Key& key, std::shared_ptr<const Pattern> pattern,
                 CUdeviceptr values, size_t value_bytes, CUstream stream) {
    std::vector<std::list<std::unique_ptr<Entry>>::iterator> same_key;
    for (auto it = entries_.begin(); it != entries_.end(); ++it)
      if ((*it)->key == key) same_key.push_back(it);
    for (auto it : same_key) {
      Entry* e = it->get();
      if (e->value_bytes == value_bytes &&
          device_equal(key.device, e->values.ptr, values, value_bytes, stream)) {
        ++e->counters.hits;
        ++totals.hits;
        touch(it);
        return e;
      }
    }
    ++totals.misses;
    if (!same_key.empty() && same_key.size() >= entries_per_key) {
      auto it = same_key.back();  // least recently used of this key
      Entry* e = it->get();
      try {
        resetup(*e, values, stream);
      } catch (...) {
        ++totals.evictions;
        dispose(*it);  // unknown AmgX state: drop the entry
        entries_.erase(it);
        throw;
      }
      touch(it);
      return e;
    }
    std::unique_ptr<Entry> fresh = create(key, std::move(pattern), values, value_bytes,
                                          stream);
    ++fresh->counters.misses;
    entries_.push_front(std::move(fresh));
    evict_to(capacity == 0 ? 1 : capacity, entries_.front().get());
    return entries_.front().get();
  }

  std::unique_ptr<Entry> create(const Key& key, std::shared_ptr<const Pattern> pattern,
                                CUdeviceptr values, size_t value_bytes,
                                CUstream stream) {
    auto e = std::make_unique<Entry>();
    try {
      fill(*e, key, std::move(pattern), values, value_bytes, stream);
    } catch (...) {
      dispose(e);
      throw;
    }
    return e;
  }

  void fill(Entry& entry, const Key& key, std::shared_ptr<const Pattern> pattern,
            CUdeviceptr values, size_t value_bytes, CUstream stream) {
    Entry* e = &entry;
    e->id = next_id_++;
    e->key = key;
    e->pattern = std::move(pattern);
    const Pattern& p = *e->pattern;
    e->n = static_cast<int>(p.block_rows);
    e->nnz = static_cast<int>(p.indices.size());
    e->value_bytes = value_bytes;
    size_t free_before = 0, total = 0;
    api().cuMemGetInfo_v2(&free_before, &total);
    auto t0 = std::chrono::steady_clock::now();
    ensure_device(key.device);
    create_handles(*e, resources_for(key.device));
    LXA_AMGX(AMGX_matrix_upload_all(e->matrix.h, e->n, e->nnz, p.block_size,
                                    p.block_size, p.indptr.data(), p.indices.data(),
                                    reinterpret_cast<const void*>(values), nullptr));
    bind_and_setup(*e);
    e->last_setup_seconds = seconds_since(t0);
    e->total_setup_seconds += e->last_setup_seconds;
    e->values.allocate(value_bytes);
    LXA_CU(cuMemcpyDtoDAsync_v2(e->values.ptr, values, value_bytes, stream));
    LXA_CU(cuStreamSynchronize(stream));
    size_t free_after = 0;
    api().cuMemGetInfo_v2(&free_after, &total);
    e->gpu_bytes = static_cast<int64_t>(free_before) - static_cast<int64_t>(free_after);
    ++e->counters.setups;
    ++totals.setups;
    take_captured();
  }

  void resetup(Entry& e, CUdeviceptr values, CUstream stream) {
    e.last_setup_seconds = run_amgx_resetup(
        e, e.n, e.nnz, reinterpret_cast<const void*>(values), resetup_mode);
    e.total_setup_seconds += e.last_setup_seconds;
    LXA_CU(cuMemcpyDtoDAsync_v2(e.values.ptr, values, e.value_bytes, stream));
    LXA_CU(cuStreamSynchronize(stream));
    ++e.generation;
    ++e.counters.resetups;
    ++totals.resetups;
    take_captured();
  }

  void solve(Entry& e, CUdeviceptr b, CUdeviceptr x0, bool has_x0, CUdeviceptr x,
             int32_t* status, int32_t* iterations, double* residual) {
    e.last_solve_seconds = run_amgx_solve(
        e.solver.h, e.rhs.h, e.sol.h, e.n, e.pattern->block_size,
        reinterpret_cast<const void*>(b),
        has_x0 ? reinterpret_cast<const void*>(x0) : nullptr, reinterpret_cast<void*>(x),
        status, iterations, residual);
    e.total_solve_seconds += e.last_solve_seconds;
    ++e.counters.solves;
    ++totals.solves;
    take_captured();
  }

  // AmgX 2.5 keeps one cuBLAS and one cuSPARSE handle per process (static
  // singletons), created on the device current at their first use and destroyed
  // with any resources object. Entries on two devices at once would run one
  // device's work with the other's handle (CUBLAS_STATUS_INTERNAL_ERROR in the
  // first solve on the second device: 2 x H200, 2026-11-28). So the process uses
  // AmgX on one device at a time: a setup on another device first drops every
  // entry and the resources of the old one (the handles go with them, and AmgX
  // creates them again on the new device). Switching back and forth therefore
  // costs a setup each time (`device_switches` counts the switches).
  void ensure_device(CUdevice device) {
    std::vector<CUdevice> others;
    for (const auto& item : resources()) {
      if (item.first.first == device) continue;
      if (item.first.second != 0)
        throw Failure(
            "AmgX holds distributed setups on CUDA device " +
            std::to_string(item.first.first) + " of this process; AmgX 2.5 uses " +
            "one device per process (its cuBLAS/cuSPARSE handles are per process), so "
            "a single-process solve on device " + std::to_string(device) +
            " cannot run next to them. Use one device per process, or call "
            "lineax_amgx.finalize() first.");
      if (std::find(others.begin(), others.end(), item.first.first) == others.end())
        others.push_back(item.first.first);
    }
    if (others.empty()) return;
    Api& a = api();
    for (CUdevice old : others) {
      CUcontext ctx = nullptr;
      bool pushed = a.cuDevicePrimaryCtxRetain(&ctx, old) == 0;
      if (pushed) a.cuCtxPushCurrent_v2(ctx);
      for (auto it = entries_.begin(); it != entries_.end();) {
        if ((*it)->key.device == old) {
          dispose(*it);
          it = entries_.erase(it);
          ++totals.evictions;
        } else {
          ++it;
        }
      }
      release_resources(false, false, old);
      if (pushed) {
        CUcontext popped;
        a.cuCtxPopCurrent_v2(&popped);
        a.cuDevicePrimaryCtxRelease_v2(old);
      }
    }
    ++device_switches;
  }

  int64_t device_switches = 0;

  void remove(Entry* e) {
    for (auto it = entries_.begin(); it != entries_.end(); ++it)
      if (it->get() == e) {
        dispose(*it);
        entries_.erase(it);
        return;
      }
  }

  void evict_to(size_t n, Entry* keep = nullptr) {
    while (entries_.size() > n) {
      auto it = std::prev(entries_.end());
      if (it->get() == keep) {
        if (entries_.size() == 1) break;
        it = std::prev(it);
      }
      dispose(*it);
      entries_.erase(it);
      ++totals.evictions;
    }
  }

  void clear() {
    for (auto& e : entries_) dispose(e);
    entries_.clear();
    release_resources(false);
  }

  const std::list<std::unique_ptr<Entry>>& entries() const { return entries_; }

 private:
  void touch(std::list<std::unique_ptr<Entry>>::iterator it) {
    entries_.splice(entries_.begin(), entries_, it);
  }
  std::list<std::unique_ptr<Entry>> entries_;  // most recently used first
  int32_t next_id_ = 1;
};

// ------------------------------------------------------------------------------
// FFI handlers.
// ------------------------------------------------------------------------------

Key make_key(CUdevice device, int64_t fingerprint, int32_t block_size, int32_t mode,
             std::string_view config, int32_t transposed) {
  return Key{device, fingerprint, block_size, mode, std::string(config),
             transposed != 0, 0};
}

size_t element_size(int32_t mode, bool matrix) {
  // dDDI: double/double, dDFI: double vectors / float matrix, dFFI: float/float.
  if (mode == 8193) return 8;
  if (mode == 8449) return matrix ? 4 : 8;
  if (mode == 8465) return 4;
  throw Failure("unsupported AmgX mode " + std::to_string(mode));
}

void check_values(const ffi::AnyBuffer& values, const Pattern& p, int32_t mode) {
  // AmgX 2.5 (checked on an H200 with the aggregation presets): block sizes 6 and
  // 8 end in an illegal memory access that ruins the CUDA context, 7 has no
  // aggregation (LOW_DEG) kernel. Refuse them before AmgX sees them.
  if (p.block_size < 1 || p.block_size > 5) {
    const std::string b = std::to_string(p.block_size);
    throw Failure("AmgX cannot solve " + b + "x" + b +
                  " block systems here: lineax-amgx passes block sizes 1 to 5 to AmgX "
                  "(6 and 8 crash AmgX 2.5 with an illegal memory access, 7 has no "
                  "aggregation kernel). Use the scalar form of the operator (block_size=1) "
                  "on the GPU, or the CPU backend (pyamg), which takes blocks up to 8.");
  }
  size_t per = element_size(mode, true);
  size_t bs = static_cast<size_t>(p.block_size);
  size_t want = p.indices.size() * bs * bs * per;
  if (values.size_bytes() != want)
    throw Failure("values buffer has " + std::to_string(values.size_bytes()) +
                  " bytes, expected " + std::to_string(want));
}

ffi::Error to_ffi_error(const std::exception& e) {
  std::string msg = e.what();
  if (!poisoned().empty() && msg.find(poisoned()) == std::string::npos)
    msg += "\n(" + poisoned() + ")";
  return ffi::Error(ffi::ErrorCode::kInternal, msg);
}

// Writes a small host array into an XLA output buffer, ordered on XLA's stream and
// complete on return. (A plain cuMemcpyHtoD from pageable memory may return before
// its DMA lands, and on the legacy stream, which XLA's non-blocking stream does not
// wait for: XLA's next kernel could then read a stale status or token.)
template <typename T>
void write_host(CUdeviceptr dst, const T* src, size_t count, CUstream stream) {
  LXA_CU(cuMemcpyHtoDAsync_v2(dst, src, sizeof(T) * count, stream));
  LXA_CU(cuStreamSynchronize(stream));
}

// Runs the body of an FFI handler: under the core's lock, with AmgX initialised and
// the context of XLA's stream current (the stream synchronised first); AmgX's
// output is captured unless `verbose`; an exception becomes an ffi::Error. With
// `refuse_if_poisoned`, a broken CUDA context is refused first (the distributed
// handlers report it through their agreement with the other ranks instead).
template <typename Body>
ffi::Error run_handler(void* stream_ptr, int32_t verbose, bool refuse_if_poisoned,
                       Body&& body) {
  std::lock_guard<std::recursive_mutex> lock(core_mutex());
  print_state().verbose = verbose != 0;
  try {
    if (refuse_if_poisoned && !poisoned().empty()) throw Failure(poisoned());
    ensure_initialized();
    CUstream stream = reinterpret_cast<CUstream>(stream_ptr);
    ContextScope scope(stream);
    LXA_CU(cuStreamSynchronize(stream));
    body(stream, scope);
    print_state().verbose = false;
    return ffi::Error::Success();
  } catch (const std::exception& e) {
    print_state().verbose = false;
    return to_ffi_error(e);
  }
}

// Writes a solve's `info` (status, iterations) and residual norm (in the residual
// buffer's precision) into XLA's outputs.
void write_solve_info(ffi::Buffer<ffi::S32>& info, const int32_t* info_host,
                      ffi::AnyBuffer& residual, double res, CUstream stream) {
  write_host(reinterpret_cast<CUdeviceptr>(info.typed_data()), info_host, 2, stream);
  CUdeviceptr r_ptr = reinterpret_cast<CUdeviceptr>(residual.untyped_data());
  if (residual.element_type() == ffi::DataType::F64) {
    write_host(r_ptr, &res, 1, stream);
  } else {
    float r = static_cast<float>(res);
    write_host(r_ptr, &r, 1, stream);
  }
}

ffi::Error SetupImpl(void* stream_ptr, ffi::AnyBuffer values, ffi::Buffer<ffi::S32> ok,
                     ffi::Result<ffi::Buffer<ffi::S32>> token, int64_t fingerprint,
                     std::string_view config, int32_t mode, int32_t transposed,
                     int32_t verbose) {
  return run_handler(stream_ptr, verbose, /*refuse_if_poisoned=*/true,
                     [&](CUstream stream, const ContextScope& scope) {
      auto pattern = find_pattern(fingerprint);
      check_values(values, *pattern, mode);
      int32_t ok_host = 0;
      LXA_CU(cuMemcpyDtoH_v2(&ok_host, reinterpret_cast<CUdeviceptr>(ok.typed_data()),
                             sizeof(int32_t)));
      int32_t out[2] = {-1, -1};
      Cache& cache = Cache::get();
      if (ok_host != 0 && !cache.isolated()) {
        Key key = make_key(scope.device, fingerprint, pattern->block_size, mode, config,
                           transposed);
        Entry* e = cache.acquire(key, pattern,
                                 reinterpret_cast<CUdeviceptr>(values.untyped_data()),
                                 values.size_bytes(), stream);
        out[0] = e->id;
        out[1] = e->generation;
      }
      write_host(reinterpret_cast<CUdeviceptr>(token->typed_data()), out, 2, stream);
  });
}

ffi::Error SolveImpl(void* stream_ptr, ffi::AnyBuffer values, ffi::Buffer<ffi::S32> token,
                     ffi::AnyBuffer b, ffi::AnyBuffer x0, ffi::Buffer<ffi::S32> ok,
                     ffi::Result<ffi::AnyBuffer> x, ffi::Result<ffi::Buffer<ffi::S32>> info,
                     ffi::Result<ffi::AnyBuffer> residual, int64_t fingerprint,
                     std::string_view config, int32_t mode, int32_t transposed,
                     int32_t verbose, int32_t has_x0) {
  return run_handler(stream_ptr, verbose, /*refuse_if_poisoned=*/true,
                     [&](CUstream stream, const ContextScope& scope) {
      auto pattern = find_pattern(fingerprint);
      check_values(values, *pattern, mode);
      size_t vec_bytes = static_cast<size_t>(pattern->block_rows) * pattern->block_size *
                         element_size(mode, false);
      if (b.size_bytes() != vec_bytes || x->size_bytes() != vec_bytes ||
          (has_x0 && x0.size_bytes() != vec_bytes))
        throw Failure("vector buffers do not match the operator's size");
      int32_t host[3] = {0, -1, -1};  // ok, token id, token generation
      LXA_CU(cuMemcpyDtoH_v2(&host[0], reinterpret_cast<CUdeviceptr>(ok.typed_data()),
                             sizeof(int32_t)));
      LXA_CU(cuMemcpyDtoH_v2(&host[1], reinterpret_cast<CUdeviceptr>(token.typed_data()),
                             2 * sizeof(int32_t)));
      int32_t info_host[2] = {4, 0};  // STATUS_NONFINITE, 0 iterations
      double res = std::numeric_limits<double>::quiet_NaN();
      CUdeviceptr x_ptr = reinterpret_cast<CUdeviceptr>(x->untyped_data());
      if (host[0] == 0) {
        // NaN/Inf input: AmgX is not called; the output is NaN, flagged by status.
        LXA_CU(cuMemsetD32Async(x_ptr, 0x7fc00000u, vec_bytes / 4, stream));
        LXA_CU(cuStreamSynchronize(stream));
      } else {
        Cache& cache = Cache::get();
        Key key = make_key(scope.device, fingerprint, pattern->block_size, mode, config,
                           transposed);
        CUdeviceptr v = reinterpret_cast<CUdeviceptr>(values.untyped_data());
        std::unique_ptr<Entry> isolated;
        Entry* e = nullptr;
        if (cache.isolated()) {
          isolated = cache.create(key, pattern, v, values.size_bytes(), stream);
          e = isolated.get();
        } else {
          e = cache.find_token(key, host[1], host[2]);
          if (e == nullptr) e = cache.acquire(key, pattern, v, values.size_bytes(), stream);
        }
        int32_t st = 0, its = 0;
        try {
          cache.solve(*e, reinterpret_cast<CUdeviceptr>(b.untyped_data()),
                      reinterpret_cast<CUdeviceptr>(x0.untyped_data()), has_x0 != 0, x_ptr,
                      &st, &its, &res);
        } catch (...) {
          if (isolated)
            dispose(isolated);
          else
            cache.remove(e);  // unknown AmgX state: drop the entry
          throw;
        }
        info_host[0] = st;
        info_host[1] = its;
      }
      write_solve_info(*info, info_host, *residual, res, stream);
  });
}

// ------------------------------------------------------------------------------
// Distributed entries: one rank's rows of a matrix partitioned over MPI ranks,
// uploaded through AmgX's distribution API. Called from Python host callbacks that
// the package's sequencer runs in the same order on every rank (every function
// here that touches AmgX is collective over the communicator). Vectors and values
// are host arrays (AmgX copies them to its device).
// ------------------------------------------------------------------------------

using DistributionOwner =
    Owned<AMGX_distribution_handle, &Api::AMGX_distribution_destroy>;

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

struct DistEntry {
  int32_t id = 0;
  int32_t generation = 0;
  Key key;
  int n_local = 0, nnz = 0, block_size = 1;
  int64_t n_global = 0;
  // An exact copy of the values the setup used: on the host (host-callback path)
  // or on the device (FFI path: compared there).
  std::vector<unsigned char> values;
  DeviceBuffer dvalues;
  ConfigOwner cfg;
  DistributionOwner dist;
  MatrixOwner matrix;
  VectorOwner rhs, sol;
  SolverOwner solver;
  Counters counters;
  double last_setup_seconds = 0, last_solve_seconds = 0;
  double total_setup_seconds = 0, total_solve_seconds = 0;
  ~DistEntry() {
    dvalues.reset();
    solver.reset();
    sol.reset();
    rhs.reset();
    matrix.reset();
    dist.reset();
    cfg.reset();
  }
};

// The distributed cache. One entry per key (every rank must act on the same
// logical entry in a collective resetup); least recently used first out. Every
// change happens inside a collective call, in the same order on every rank, so
// the ranks' caches stay identical (eviction included).
class DistCache {
 public:
  static DistCache& get() {
    static DistCache* c = new DistCache();
    return *c;
  }
  Counters totals;

  // 0: an entry with `key` holds exactly `values` (or is the token's entry);
  // 1: an entry with `key` exists (resetup); 2: no entry (setup).
  int probe(const Key& key, const void* values, size_t bytes, int32_t id, int32_t gen,
            int32_t* out_id, int32_t* out_gen) {
    for (auto& e : entries_) {
      if (!(e->key == key)) continue;
      bool same = (id > 0 && e->id == id && e->generation == gen) ||
                  (values != nullptr && e->values.size() == bytes &&
                   std::memcmp(e->values.data(), values, bytes) == 0);
      *out_id = e->id;
      *out_gen = e->generation;
      return same ? 0 : 1;
    }
    *out_id = -1;
    *out_gen = -1;
    return 2;
  }

  // `probe` for values on the device (the FFI path; `stream` is XLA's).
  int probe_device(const Key& key, CUdeviceptr values, size_t bytes, int32_t id,
                   int32_t gen, CUstream stream) {
    for (auto& e : entries_) {
      if (!(e->key == key)) continue;
      bool same = (id > 0 && e->id == id && e->generation == gen) ||
                  (e->dvalues.ptr != 0 && e->dvalues.bytes == bytes &&
                   device_equal(key.device, e->dvalues.ptr, values, bytes, stream));
      return same ? 0 : 1;
    }
    return 2;
  }

  DistEntry* find(int32_t id, int32_t gen) {
    for (auto it = entries_.begin(); it != entries_.end(); ++it)
      if ((*it)->id == id && (*it)->generation == gen) {
        touch(it);
        return it->get();
      }
    return nullptr;
  }

  // Collective. `action` is the ranks' agreed probe result (the maximum).
  DistEntry* acquire(int action, const Key& key, uintptr_t comm_ptr,
                     int64_t n_global, const int64_t* offsets, int n_local,
                     const int32_t* indptr, const int64_t* gcols, int nnz, int block_size,
                     const void* values, size_t bytes, size_t capacity,
                     ResetupMode resetup_mode, CUdeviceptr dev_values = 0,
                     CUstream stream = nullptr) {
    auto it = entries_.begin();
    for (; it != entries_.end(); ++it)
      if ((*it)->key == key) break;
    if (!(action == 0 && it != entries_.end())) {
      // A (re)setup reads the values (a hit need not: the caller may pass none).
      size_t want = static_cast<size_t>(nnz) * block_size * block_size *
                    element_size(key.mode, true);
      if (bytes != want)
        throw Failure("internal: a distributed (re)setup got " + std::to_string(bytes) +
                      " bytes of values, expected " + std::to_string(want));
    }
    if (action == 0 && it != entries_.end()) {
      ++(*it)->counters.hits;
      ++totals.hits;
      touch(it);
      return entries_.front().get();
    }
    ++totals.misses;
    if (action == 1 && it != entries_.end()) {
      DistEntry& e = **it;
      try {
        e.last_setup_seconds = run_amgx_resetup(e, e.n_local, e.nnz, values, resetup_mode);
      } catch (...) {
        dispose(*it);
        entries_.erase(it);
        throw;
      }
      keep_values(e, values, bytes, dev_values, stream);
      e.total_setup_seconds += e.last_setup_seconds;
      ++e.generation;
      ++e.counters.misses;
      ++e.counters.resetups;
      ++totals.resetups;
      touch(it);
      take_captured();
      return entries_.front().get();
    }
    if (it != entries_.end()) {  // some rank had no entry: everyone starts afresh
      dispose(*it);
      entries_.erase(it);
    }
    Api& a = api();
    if (!a.AMGX_distribution_create || !a.AMGX_distribution_set_partition_data ||
        !a.AMGX_matrix_upload_distributed)
      throw Failure("this AmgX library has no distribution API "
                    "(AMGX_matrix_upload_distributed): distributed solves need AmgX "
                    ">= 2.2 built with MPI");
    auto e = std::make_unique<DistEntry>();
    e->id = next_id_++;
    e->key = key;
    e->n_local = n_local;
    e->nnz = nnz;
    e->block_size = block_size;
    e->n_global = n_global;
    auto t0 = std::chrono::steady_clock::now();
    try {
      create_handles(*e, resources_for(key.device, key.comm, comm_ptr));
      LXA_AMGX(AMGX_distribution_create(&e->dist.h, e->cfg.h));
      LXA_AMGX(AMGX_distribution_set_partition_data(e->dist.h, AMGX_DIST_PARTITION_OFFSETS,
                                                    offsets));
      LXA_AMGX(AMGX_matrix_upload_distributed(
          e->matrix.h, static_cast<int>(n_global), n_local, nnz, block_size, block_size,
          indptr, gcols, values, nullptr, e->dist.h));
      bind_and_setup(*e);
    } catch (...) {
      dispose(e);
      throw;
    }
    try {
      keep_values(*e, values, bytes, dev_values, stream);
    } catch (...) {
      dispose(e);
      throw;
    }
    e->last_setup_seconds = seconds_since(t0);
    e->total_setup_seconds += e->last_setup_seconds;
    ++e->counters.misses;
    ++e->counters.setups;
    ++totals.setups;
    entries_.push_front(std::move(e));
    size_t keep = std::max<size_t>(capacity, 1);
    while (entries_.size() > keep) {
      dispose(entries_.back());
      entries_.pop_back();
      ++totals.evictions;
    }
    take_captured();
    return entries_.front().get();
  }

  // Collective.
  void solve(DistEntry& e, const void* b, const void* x0, void* x, int32_t* status,
             int32_t* iterations, double* residual) {
    // A zero initial guess is uploaded, not set: AMGX_vector_set_zero sizes the
    // vector to the local rows and ignores the distributed manager, so the solve
    // then fails "Vector size too small: not enough space for halo elements"
    // (2 x H200, 2026-11-28); AMGX_vector_upload goes through the manager.
    std::vector<char> zeros;
    if (x0 == nullptr) {
      zeros.assign(static_cast<size_t>(e.n_local) * e.block_size *
                       element_size(e.key.mode, false),
                   0);
      x0 = zeros.data();
    }
    e.last_solve_seconds = run_amgx_solve(e.solver.h, e.rhs.h, e.sol.h, e.n_local,
                                          e.block_size, b, x0, x, status, iterations,
                                          residual);
    e.total_solve_seconds += e.last_solve_seconds;
    ++e.counters.solves;
    ++totals.solves;
    take_captured();
  }

  void clear() {
    for (auto& e : entries_) {
      // Its device's context current (the device copy of the values is freed).
      std::unique_ptr<PrimaryContextScope> scope;
      if (context_healthy(e->key.device))
        scope = std::make_unique<PrimaryContextScope>(static_cast<int>(e->key.device));
      dispose(e);
    }
    entries_.clear();
    release_resources(true);
  }

  void abandon() {
    for (auto& e : entries_) (void)e.release();
    entries_.clear();
    release_resources(true, /*leak=*/true);
  }

  const std::list<std::unique_ptr<DistEntry>>& entries() const { return entries_; }

 private:
  // Keeps the exact values of a (re)setup: a device copy when they came from the
  // device (`dev_values`, copied on `stream`), else a host copy.
  static void keep_values(DistEntry& e, const void* values, size_t bytes,
                          CUdeviceptr dev_values, CUstream stream) {
    if (dev_values != 0) {
      e.values.clear();
      e.values.shrink_to_fit();
      if (e.dvalues.bytes != bytes) e.dvalues.allocate(bytes);
      LXA_CU(cuMemcpyDtoDAsync_v2(e.dvalues.ptr, dev_values, bytes, stream));
      LXA_CU(cuStreamSynchronize(stream));
    } else {
      e.dvalues.reset();
      e.values.assign(static_cast<const unsigned char*>(values),
                      static_cast<const unsigned char*>(values) + bytes);
    }
  }

  void touch(std::list<std::unique_ptr<DistEntry>>::iterator it) {
    entries_.splice(entries_.begin(), entries_, it);
  }
  std::list<std::unique_ptr<DistEntry>> entries_;
  int32_t next_id_ = 1;
};

bool amgx_objects_alive() {
  return !Cache::get().entries().empty() || !DistCache::get().entries().empty();
}

// ------------------------------------------------------------------------------
// The device-resident distributed path: XLA FFI handlers that read values and
// vectors where XLA keeps them (on the GPU), and agree with the other ranks
// through small MPI allreduces made here, in the handler.
//
// MPI is reached through the library AmgX was built with (the Python side checks
// that mpi4py uses the same one and hands us, once, the addresses of three of its
// functions and two handles): the package builds without MPI. Handles travel as
// integers: pointers in Open MPI, `int`s in MPICH; the x86-64 and aarch64 calling
// conventions read an `int` argument from the low half of its register, so one
// signature serves both.
// ------------------------------------------------------------------------------

struct MpiApi {
  int (*iallreduce)(const void*, void*, int, uintptr_t, uintptr_t, uintptr_t,
                    void*) = nullptr;
  int (*test)(void*, int*, void*) = nullptr;
  int (*comm_dup)(uintptr_t, void*) = nullptr;
  uintptr_t int64_type = 0, max_op = 0;
  double timeout = 600;  // seconds (LINEAX_AMGX_MPI_TIMEOUT); 0 waits forever
};

MpiApi& mpi_api() {
  static auto* m = new MpiApi();
  return *m;
}

// A communicator of distributed operators: the user's, and two duplicates made
// in the first distributed FFI call on it (collective): one for our agreements,
// one for AmgX (which keeps the address of its handle: a slot that lives as long
// as the process).
struct DistComm {
  uintptr_t user = 0;
  uintptr_t agree = 0;
  uint64_t* amgx = nullptr;
  std::string broken;  // why the ranks fell out of step (a timeout): no more calls
  std::map<int64_t, int64_t> executions;  // per program point (site)
};

// A 64-bit mix (splitmix64's finaliser) for call signatures.
uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

std::map<int64_t, DistComm>& dist_comms() {
  static auto* c = new std::map<int64_t, DistComm>();
  return *c;
}

// The local structure of a distributed pattern, registered at trace time.
struct DistPattern {
  int64_t n_global = 0;
  std::vector<int64_t> offsets, gcols;
  std::vector<int32_t> indptr;
  int32_t block_size = 1;
  int n_local() const { return static_cast<int>(indptr.size()) - 1; }
  int nnz() const { return static_cast<int>(gcols.size()); }
};

std::map<std::pair<int64_t, int64_t>, std::shared_ptr<const DistPattern>>&
dist_patterns() {
  static auto* p =
      new std::map<std::pair<int64_t, int64_t>, std::shared_ptr<const DistPattern>>();
  return *p;
}

DistComm& dist_comm(int64_t comm_key) {
  auto it = dist_comms().find(comm_key);
  if (it == dist_comms().end())
    throw Failure("internal: communicator " + std::to_string(comm_key) +
                  " is not registered with the native core");
  DistComm& c = it->second;
  if (!c.broken.empty()) throw Failure(c.broken);
  if (c.amgx == nullptr) {
    MpiApi& m = mpi_api();
    uint64_t agree = 0;
    auto* amgx = new uint64_t(0);
    int rc = m.comm_dup(c.user, &agree);
    if (rc == 0) rc = m.comm_dup(c.user, amgx);
    if (rc != 0) {
      delete amgx;
      throw Failure("MPI_Comm_dup failed with error code " + std::to_string(rc));
    }
    c.agree = static_cast<uintptr_t>(agree);
    c.amgx = amgx;
  }
  return c;
}

// Collective over the agreement communicator: `out` = element-wise maximum over
// the ranks of `in` (`n` int64). Polls, so that a rank whose partners never come
// raises after the timeout instead of waiting forever.
void agree_max(DistComm& c, const int64_t* in, int64_t* out, int n,
               const char* what) {
  MpiApi& m = mpi_api();
  alignas(16) unsigned char request[64] = {};  // MPI_Request: a pointer or an int
  alignas(16) unsigned char status[256];       // MPI_Status: 20-24 bytes
  int rc = m.iallreduce(in, out, n, m.int64_type, m.max_op, c.agree, request);
  if (rc != 0) throw Failure("MPI_Iallreduce failed with error code " + std::to_string(rc));
  auto t0 = std::chrono::steady_clock::now();
  for (int spins = 0;; ++spins) {
    int flag = 0;
    rc = m.test(request, &flag, status);
    if (rc != 0) throw Failure("MPI_Test failed with error code " + std::to_string(rc));
    if (flag) return;
    if (m.timeout > 0 && seconds_since(t0) > m.timeout) {
      // The allreduce stays pending: this communicator is out of step for good.
      c.broken = "waited " + std::to_string(static_cast<int>(m.timeout)) +
                 " s for the other ranks in a distributed AmgX " + what +
                 " (LINEAX_AMGX_MPI_TIMEOUT): the ranks do not run the same "
                 "distributed operations in the same order, or one of them failed "
                 "or stopped. Distributed AmgX solves on this communicator are "
                 "disabled in this process.";
      throw Failure(c.broken);
    }
    if (spins > 1000) std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

// Raised on every rank once the ranks agree that some rank failed: the failing
// rank's own message, or on the others a pointer to it.
[[noreturn]] void raise_agreed_failure(const std::string& err, const char* what) {
  throw Failure(err.empty() ? std::string("distributed AmgX ") + what +
                                  " failed on another rank (see its error)"
                            : err);
}

// After a step that may have failed on some ranks: every rank learns whether any
// did, and raises (the failing rank with its own message).
void agree_no_error(DistComm& c, const std::string& err, const char* what) {
  int64_t mine = err.empty() ? 0 : 1, any = 0;
  agree_max(c, &mine, &any, 1, what);
  if (any) raise_agreed_failure(err, what);
}

// Collective. Reads `ok` and the token from the device, agrees with the other
// ranks (every rank's cache probe: the worst wins; non-finite input anywhere;
// errors; and that all run the same call, by `signature`), then sets up or resets
// up together. Returns nullptr when some rank has non-finite input (AmgX is not
// called on any rank).
DistEntry* dist_acquire(const ContextScope& scope, CUstream stream, int64_t comm_key,
                        int64_t fingerprint, int64_t signature, int64_t site,
                        std::string_view config, int32_t mode, int32_t transposed,
                        CUdeviceptr values, size_t bytes, CUdeviceptr ok_ptr,
                        CUdeviceptr token_ptr, const char* what) {
  DistComm& c = dist_comm(comm_key);
  std::shared_ptr<const DistPattern> p;
  Key key{};
  // What this call is, the same on every rank for the same call: the operator,
  // configuration and direction (`signature`), the program point (`site`) and
  // how many times this rank has run it. Ranks that reach different calls fail
  // here, together, instead of letting AmgX mix two solves.
  int64_t count = c.executions[site]++;
  int64_t sig = static_cast<int64_t>(
      mix(mix(static_cast<uint64_t>(signature)) ^ mix(static_cast<uint64_t>(site) + 1) ^
          mix(static_cast<uint64_t>(count) + 2)) >> 2);
  int64_t mine[5] = {2, 0, 0, sig, -sig};
  std::string err;
  try {
    if (!poisoned().empty()) throw Failure(poisoned());
    auto it = dist_patterns().find({comm_key, fingerprint});
    if (it == dist_patterns().end())
      throw Failure("internal: distributed pattern " + std::to_string(fingerprint) +
                    " is not registered with the native core");
    p = it->second;
    key = Key{scope.device, fingerprint, p->block_size, mode, std::string(config),
              transposed != 0, comm_key};
    size_t want = static_cast<size_t>(p->nnz()) * p->block_size * p->block_size *
                  element_size(mode, true);
    if (bytes != want)
      throw Failure("values buffer has " + std::to_string(bytes) + " bytes, expected " +
                    std::to_string(want));
    int32_t host[3] = {0, -1, -1};  // ok, token id, token generation
    LXA_CU(cuMemcpyDtoH_v2(&host[0], ok_ptr, sizeof(int32_t)));
    if (token_ptr != 0) LXA_CU(cuMemcpyDtoH_v2(&host[1], token_ptr, 2 * sizeof(int32_t)));
    mine[1] = host[0] == 0 ? 1 : 0;
    if (host[0] != 0)
      mine[0] = DistCache::get().probe_device(key, values, bytes, host[1], host[2], stream);
  } catch (const std::exception& e) {
    err = e.what();
    mine[2] = 1;
  }
  int64_t all[5];
  agree_max(c, mine, all, 5, what);
  if (all[2]) raise_agreed_failure(err, what);
  if (all[3] != -all[4])
    throw Failure(std::string("the ranks reached different distributed AmgX calls "
                              "(this rank: a ") + what +
                  "; another rank: a call from another program point, or with another "
                  "operator, configuration or transposition). Every rank must make the "
                  "same distributed solves in the same order. On GPUs XLA runs a "
                  "program's independent operations in an order fixed per rank at "
                  "compile time, which can differ between ranks whose programs differ "
                  "(uneven row counts): chain independent distributed operations with "
                  "lineax_amgx._distributed.after.");
  if (all[1]) return nullptr;
  DistEntry* e = nullptr;
  try {
    // A fresh setup goes through AmgX's distributed upload, which copies the
    // values with a host-side thrust::copy: stage them on the host. A resetup
    // (AMGX_matrix_replace_coefficients) reads device memory.
    std::vector<unsigned char> staged;
    const void* v = reinterpret_cast<const void*>(values);
    if (all[0] == 2) {
      staged.resize(bytes);
      LXA_CU(cuMemcpyDtoH_v2(staged.data(), values, bytes));
      v = staged.data();
    }
    Cache& cache = Cache::get();
    e = DistCache::get().acquire(static_cast<int>(all[0]), key,
                                 reinterpret_cast<uintptr_t>(c.amgx), p->n_global,
                                 p->offsets.data(), p->n_local(), p->indptr.data(),
                                 p->gcols.data(), p->nnz(), p->block_size, v, bytes,
                                 cache.capacity, cache.resetup_mode, values, stream);
  } catch (const std::exception& ex) {
    err = std::string("AmgX distributed setup failed: ") + ex.what();
  }
  agree_no_error(c, err, what);
  return e;
}

ffi::Error DistSetupImpl(void* stream_ptr, ffi::AnyBuffer values, ffi::Buffer<ffi::S32> ok,
                         ffi::Result<ffi::Buffer<ffi::S32>> token, int64_t fingerprint,
                         std::string_view config, int32_t mode, int32_t transposed,
                         int32_t verbose, int64_t comm_key, int64_t signature,
                         int64_t site) {
  return run_handler(stream_ptr, verbose, /*refuse_if_poisoned=*/false,
                     [&](CUstream stream, const ContextScope& scope) {
      DistEntry* e = dist_acquire(
          scope, stream, comm_key, fingerprint, signature, site, config, mode, transposed,
          reinterpret_cast<CUdeviceptr>(values.untyped_data()), values.size_bytes(),
          reinterpret_cast<CUdeviceptr>(ok.typed_data()), 0, "setup");
      int32_t out[2] = {-1, -1};
      if (e != nullptr) {
        out[0] = e->id;
        out[1] = e->generation;
      }
      write_host(reinterpret_cast<CUdeviceptr>(token->typed_data()), out, 2, stream);
  });
}

ffi::Error DistSolveImpl(void* stream_ptr, ffi::AnyBuffer values, ffi::Buffer<ffi::S32> token,
                         ffi::AnyBuffer b, ffi::AnyBuffer x0, ffi::Buffer<ffi::S32> ok,
                         ffi::Result<ffi::AnyBuffer> x, ffi::Result<ffi::Buffer<ffi::S32>> info,
                         ffi::Result<ffi::AnyBuffer> residual, int64_t fingerprint,
                         std::string_view config, int32_t mode, int32_t transposed,
                         int32_t verbose, int32_t has_x0, int64_t comm_key,
                         int64_t signature, int64_t site) {
  return run_handler(stream_ptr, verbose, /*refuse_if_poisoned=*/false,
                     [&](CUstream stream, const ContextScope& scope) {
      DistEntry* e = dist_acquire(
          scope, stream, comm_key, fingerprint, signature, site, config, mode, transposed,
          reinterpret_cast<CUdeviceptr>(values.untyped_data()), values.size_bytes(),
          reinterpret_cast<CUdeviceptr>(ok.typed_data()),
          reinterpret_cast<CUdeviceptr>(token.typed_data()), "solve");
      CUdeviceptr x_ptr = reinterpret_cast<CUdeviceptr>(x->untyped_data());
      size_t vec_bytes = x->size_bytes();
      int32_t info_host[2] = {4, 0};  // STATUS_NONFINITE, 0 iterations
      double res = std::numeric_limits<double>::quiet_NaN();
      if (e == nullptr) {
        LXA_CU(cuMemsetD32Async(x_ptr, 0x7fc00000u, vec_bytes / 4, stream));
        LXA_CU(cuStreamSynchronize(stream));
      } else {
        std::string err;
        try {
          size_t want = static_cast<size_t>(e->n_local) * e->block_size *
                        element_size(mode, false);
          if (b.size_bytes() != want || vec_bytes != want ||
              (has_x0 && x0.size_bytes() != want))
            throw Failure("vector buffers do not match the operator's local size");
          // The initial guess is uploaded, never set (see DistCache::solve): zero
          // the output buffer and upload that when there is no x0.
          CUdeviceptr start = reinterpret_cast<CUdeviceptr>(x0.untyped_data());
          if (!has_x0) {
            LXA_CU(cuMemsetD32Async(x_ptr, 0u, vec_bytes / 4, stream));
            LXA_CU(cuStreamSynchronize(stream));
            start = x_ptr;
          }
          DistCache::get().solve(*e, reinterpret_cast<const void*>(b.untyped_data()),
                                 reinterpret_cast<const void*>(start),
                                 reinterpret_cast<void*>(x_ptr), &info_host[0],
                                 &info_host[1], &res);
        } catch (const std::exception& ex) {
          err = std::string("AmgX distributed solve failed: ") + ex.what();
        }
        agree_no_error(dist_comm(comm_key), err, "solve");
      }
      write_solve_info(*info, info_host, *residual, res, stream);
  });
}

}  // namespace
}  // namespace lxa

// The bindings: operands, results and attributes. The distributed handlers take
// those of the single-process ones plus `comm_key`, `signature` and `site` (last).
// (Attributes are matched by name; their order is the handler's parameter order.)
namespace lxa {
namespace {

auto setup_binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::PlatformStream<void*>>()
      .Arg<ffi::AnyBuffer>()         // values
      .Arg<ffi::Buffer<ffi::S32>>()  // ok
      .Ret<ffi::Buffer<ffi::S32>>()  // token
      .Attr<int64_t>("fingerprint")
      .Attr<std::string_view>("config")
      .Attr<int32_t>("mode")
      .Attr<int32_t>("transposed")
      .Attr<int32_t>("verbose");
}

auto solve_binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::PlatformStream<void*>>()
      .Arg<ffi::AnyBuffer>()         // values
      .Arg<ffi::Buffer<ffi::S32>>()  // token
      .Arg<ffi::AnyBuffer>()         // b
      .Arg<ffi::AnyBuffer>()         // x0 (b if absent)
      .Arg<ffi::Buffer<ffi::S32>>()  // ok
      .Ret<ffi::AnyBuffer>()         // x
      .Ret<ffi::Buffer<ffi::S32>>()  // info
      .Ret<ffi::AnyBuffer>()         // residual
      .Attr<int64_t>("fingerprint")
      .Attr<std::string_view>("config")
      .Attr<int32_t>("mode")
      .Attr<int32_t>("transposed")
      .Attr<int32_t>("verbose")
      .Attr<int32_t>("has_x0");
}

template <typename B>
auto distributed(B binding) {
  return std::move(binding)
      .template Attr<int64_t>("comm_key")
      .template Attr<int64_t>("signature")
      .template Attr<int64_t>("site");
}

}  // namespace
}  // namespace lxa

XLA_FFI_DEFINE_HANDLER_SYMBOL(LxaSetup, lxa::SetupImpl, lxa::setup_binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(LxaSolve, lxa::SolveImpl, lxa::solve_binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(LxaDistSetup, lxa::DistSetupImpl,
                              lxa::distributed(lxa::setup_binding()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LxaDistSolve, lxa::DistSolveImpl,
                              lxa::distributed(lxa::solve_binding()));

// ------------------------------------------------------------------------------
// Python module.
// ------------------------------------------------------------------------------

namespace {

template <typename T>
nb::capsule make_capsule(T* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

nb::dict counters_dict(const lxa::Counters& c) {
  nb::dict d;
  d["hits"] = c.hits;
  d["misses"] = c.misses;
  d["setups"] = c.setups;
  d["resetups"] = c.resetups;
  d["solves"] = c.solves;
  d["evictions"] = c.evictions;
  return d;
}

std::string mode_name(int32_t mode) {
  switch (mode) {
    case 8193: return "dDDI";
    case 8449: return "dDFI";
    case 8465: return "dFFI";
    default: return std::to_string(mode);
  }
}

}  // namespace

NB_MODULE(_native, m) {
  using namespace lxa;
  m.doc() = "Native core of lineax-amgx (AmgX loaded at run time).";

  m.def("registrations", []() {
    nb::dict d;
    d["lineax_amgx_setup"] = make_capsule(LxaSetup);
    d["lineax_amgx_solve"] = make_capsule(LxaSolve);
    d["lineax_amgx_dist_setup"] = make_capsule(LxaDistSetup);
    d["lineax_amgx_dist_solve"] = make_capsule(LxaDistSolve);
    return d;
  });

  m.def(
      "register_pattern",
      [](int64_t fingerprint, nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig> indptr,
         nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig> indices, int64_t block_rows,
         int64_t block_cols, int32_t block_size) {
        std::lock_guard<std::recursive_mutex> lock(core_mutex());
        if (patterns().count(fingerprint)) return;
        auto p = std::make_shared<Pattern>();
        p->indptr.assign(indptr.data(), indptr.data() + indptr.shape(0));
        p->indices.assign(indices.data(), indices.data() + indices.shape(0));
        p->block_rows = block_rows;
        p->block_cols = block_cols;
        p->block_size = block_size;
        patterns().emplace(fingerprint, std::move(p));
      },
      nb::arg("fingerprint"), nb::arg("indptr"), nb::arg("indices"), nb::arg("block_rows"),
      nb::arg("block_cols"), nb::arg("block_size"));

  m.def("unregister_pattern", [](int64_t fingerprint) {
    std::lock_guard<std::recursive_mutex> lock(core_mutex());
    patterns().erase(fingerprint);  // entries keep their own reference
  });

  m.def("num_patterns", []() {
    std::lock_guard<std::recursive_mutex> lock(core_mutex());
    return patterns().size();
  });

  m.def("load", [](const std::string& path) {
    try {
      load_amgx(path);
    } catch (const Failure& e) {
      throw std::runtime_error(e.what());
    }
  });

  m.def("is_loaded", []() { return api().amgx_handle != nullptr; });
  m.def("is_initialized", []() { return api().initialized; });
  // Why the process can no longer use AmgX (a broken CUDA context), or "".
  m.def("poisoned", []() { return poisoned(); });
  // Tests only: mark the process as if a CUDA fault had broken AmgX's context.
  m.def("_poison_for_testing", [](const std::string& why) { mark_poisoned(why); });

  m.def("library_info", []() {
    std::lock_guard<std::recursive_mutex> lock(core_mutex());
    nb::dict d;
    Api& a = api();
    d["loaded"] = a.amgx_handle != nullptr;
    d["path"] = a.amgx_path;
    d["error"] = a.load_error;
    d["initialized"] = a.initialized;
    d["resetup_available"] = a.AMGX_solver_resetup != nullptr;
    d["error_output_captured"] = a.error_output_hooked;
    d["context_error"] = poisoned();
    if (a.amgx_handle) {
      int major = 0, minor = 0;
      a.AMGX_get_api_version(&major, &minor);
      d["api_version"] = std::to_string(major) + "." + std::to_string(minor);
      char *version = nullptr, *date = nullptr, *time = nullptr;
      if (a.AMGX_get_build_info_strings(&version, &date, &time) == AMGX_RC_OK) {
        d["version"] = version ? std::string(version) : std::string();
        d["build_date"] = std::string(date ? date : "") + " " + (time ? time : "");
      }
    }
    return d;
  });

  m.def("cuda_devices", []() {
    std::lock_guard<std::recursive_mutex> lock(core_mutex());
    nb::list out;
    try {
      load_cuda_driver();
    } catch (const Failure& e) {
      throw std::runtime_error(e.what());
    }
    int count = 0;
    if (api().cuDeviceGetCount(&count) != 0) count = 0;
    for (int i = 0; i < count; ++i) {
      CUdevice dev;
      char name[256] = {0};
      if (api().cuDeviceGet(&dev, i) == 0) api().cuDeviceGetName(name, sizeof(name), dev);
      out.append(nb::str(name));
    }
    return out;
  });

  m.def("cache_info", []() {
    std::lock_guard<std::recursive_mutex> lock(core_mutex());
    Cache& c = Cache::get();
    nb::dict d;
    d["capacity"] = c.capacity;
    d["entries_per_key"] = c.entries_per_key;
    d["isolated"] = c.isolated();
    d["size"] = c.entries().size();
    d["resetup_mode"] = c.resetup_mode == ResetupMode::kResetup ? "resetup" : "setup";
    d["device_switches"] = c.device_switches;
    nb::dict totals = counters_dict(c.totals);
    for (auto item : totals) d[item.first] = item.second;
    nb::list entries;
    for (const auto& e : c.entries()) {
      nb::dict s;
      s["id"] = e->id;
      s["generation"] = e->generation;
      s["device"] = e->key.device;
      s["fingerprint"] = e->key.fingerprint;
      s["shape"] = nb::make_tuple(e->pattern->block_rows * e->pattern->block_size,
                                  e->pattern->block_cols * e->pattern->block_size);
      s["nnz"] = e->nnz;
      s["block_size"] = e->pattern->block_size;
      s["mode"] = mode_name(e->key.mode);
      s["transposed"] = e->key.transposed;
      s["config_digest"] = std::hash<std::string>{}(e->key.config);
      s["gpu_bytes"] = e->gpu_bytes;
      s["last_setup_seconds"] = e->last_setup_seconds;
      s["last_solve_seconds"] = e->last_solve_seconds;
      s["total_setup_seconds"] = e->total_setup_seconds;
      s["total_solve_seconds"] = e->total_solve_seconds;
      nb::dict counters = counters_dict(e->counters);
      for (auto item : counters) s[item.first] = item.second;
      entries.append(s);
    }
    d["entries"] = entries;
    return d;
  });

  m.def("reset_counters", []() {
    std::lock_guard<std::recursive_mutex> lock(core_mutex());
    Cache::get().totals = Counters{};
  });

  m.def("clear_cache", []() {
    std::lock_guard<std::recursive_mutex> lock(core_mutex());
    Cache::get().clear();
  });

  // ---- Distributed (MPI) entries; see DistCache. Collective where noted. ----
  // Inputs are read-only (host-callback operands are read-only NumPy arrays, which
  // a writable ndarray parameter refuses); outputs are written.
  using HostArray = nb::ndarray<nb::ro, nb::c_contig, nb::device::cpu>;
  using HostOut = nb::ndarray<nb::c_contig, nb::device::cpu>;

  m.def(
      "dist_probe",
      [](int32_t ordinal, int64_t comm_key, int64_t fingerprint, const std::string& config,
         int32_t mode, int32_t transposed, int32_t block_size, HostArray values,
         int32_t id, int32_t gen) {
        std::lock_guard<std::recursive_mutex> lock(core_mutex());
        try {
          if (!poisoned().empty()) throw Failure(poisoned());
          ensure_initialized();
          PrimaryContextScope scope(ordinal);
          Key key{scope.device, fingerprint, block_size, mode, config, transposed != 0,
                  comm_key};
          int32_t out_id = -1, out_gen = -1;
          int state = DistCache::get().probe(key, values.data(), values.nbytes(), id, gen,
                                             &out_id, &out_gen);
          return nb::make_tuple(state, out_id, out_gen);
        } catch (const Failure& e) {
          throw std::runtime_error(e.what());
        }
      },
      nb::arg("ordinal"), nb::arg("comm_key"), nb::arg("fingerprint"), nb::arg("config"),
      nb::arg("mode"), nb::arg("transposed"), nb::arg("block_size"), nb::arg("values"),
      nb::arg("id"), nb::arg("gen"));

  m.def(
      "dist_setup",
      [](int32_t action, int32_t ordinal, int64_t comm_key, uintptr_t comm_ptr,
         int64_t fingerprint, const std::string& config, int32_t mode, int32_t transposed,
         int32_t block_size, int64_t n_global,
         nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> offsets,
         nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> indptr,
         nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> gcols,
         HostArray values) {
        std::lock_guard<std::recursive_mutex> lock(core_mutex());
        try {
          if (!poisoned().empty()) throw Failure(poisoned());
          ensure_initialized();
          if (n_global > INT32_MAX)
            throw Failure("AmgX's distributed upload takes a 32-bit global size; this "
                          "matrix has " + std::to_string(n_global) + " block rows");
          PrimaryContextScope scope(ordinal);
          Key key{scope.device, fingerprint, block_size, mode, config, transposed != 0,
                  comm_key};
          Cache& c = Cache::get();
          DistEntry* e = nullptr;
          {
            nb::gil_scoped_release release;
            e = DistCache::get().acquire(
                action, key, comm_ptr, n_global, offsets.data(),
                static_cast<int>(indptr.shape(0) - 1), indptr.data(), gcols.data(),
                static_cast<int>(gcols.shape(0)), block_size, values.data(),
                values.nbytes(), c.capacity, c.resetup_mode);
          }
          return nb::make_tuple(e->id, e->generation);
        } catch (const Failure& e) {
          throw std::runtime_error(e.what());
        }
      },
      nb::arg("action"), nb::arg("ordinal"), nb::arg("comm_key"), nb::arg("comm_ptr"),
      nb::arg("fingerprint"), nb::arg("config"), nb::arg("mode"), nb::arg("transposed"),
      nb::arg("block_size"), nb::arg("n_global"), nb::arg("offsets"), nb::arg("indptr"),
      nb::arg("global_indices"), nb::arg("values"));

  m.def(
      "dist_solve",
      [](int32_t ordinal, int32_t id, int32_t gen, HostArray b, nb::object x0,
         HostOut x) {
        std::lock_guard<std::recursive_mutex> lock(core_mutex());
        try {
          if (!poisoned().empty()) throw Failure(poisoned());
          ensure_initialized();
          PrimaryContextScope scope(ordinal);
          DistEntry* e = DistCache::get().find(id, gen);
          if (e == nullptr)
            throw Failure("internal: distributed entry " + std::to_string(id) + "/" +
                          std::to_string(gen) + " is not resident");
          const void* x0_ptr = nullptr;
          HostArray x0_arr;
          if (!x0.is_none()) {
            x0_arr = nb::cast<HostArray>(x0);
            x0_ptr = x0_arr.data();
          }
          int32_t st = 0, its = 0;
          double res = 0.0;
          {
            nb::gil_scoped_release release;
            DistCache::get().solve(*e, b.data(), x0_ptr, x.data(), &st, &its, &res);
          }
          return nb::make_tuple(st, its, res);
        } catch (const Failure& e) {
          throw std::runtime_error(e.what());
        }
      },
      nb::arg("ordinal"), nb::arg("id"), nb::arg("gen"), nb::arg("b"), nb::arg("x0").none(),
      nb::arg("x"));

  // The device-resident distributed path (FFI): MPI functions and handles of the
  // library AmgX uses (addresses from mpi4py's ctypes view of it), once.
  m.def(
      "dist_set_mpi",
      [](uintptr_t iallreduce, uintptr_t test, uintptr_t comm_dup, uintptr_t int64_type,
         uintptr_t max_op, double timeout) {
        std::lock_guard<std::recursive_mutex> lock(core_mutex());
        MpiApi& m = mpi_api();
        m.iallreduce = reinterpret_cast<decltype(m.iallreduce)>(iallreduce);
        m.test = reinterpret_cast<decltype(m.test)>(test);
        m.comm_dup = reinterpret_cast<decltype(m.comm_dup)>(comm_dup);
        m.int64_type = int64_type;
        m.max_op = max_op;
        m.timeout = timeout;
      },
      nb::arg("iallreduce"), nb::arg("test"), nb::arg("comm_dup"), nb::arg("int64_type"),
      nb::arg("max_op"), nb::arg("timeout"));

  // A distributed pattern's local structure, for the FFI handlers (trace time).
  m.def(
      "dist_register_pattern",
      [](int64_t comm_key, uintptr_t comm_handle, int64_t fingerprint, int64_t n_global,
         nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> offsets,
         nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> indptr,
         nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> gcols,
         int32_t block_size) {
        std::lock_guard<std::recursive_mutex> lock(core_mutex());
        if (n_global > INT32_MAX)
          throw std::invalid_argument(
              "AmgX's distributed upload takes a 32-bit global size; this matrix has " +
              std::to_string(n_global) + " block rows");
        if (mpi_api().iallreduce == nullptr)
          throw std::runtime_error("internal: dist_set_mpi was not called");
        auto& comms = dist_comms();
        auto c = comms.find(comm_key);
        if (c == comms.end())
          comms[comm_key].user = comm_handle;
        else if (c->second.user != comm_handle)
          throw std::runtime_error("internal: communicator key reused");
        auto k = std::make_pair(comm_key, fingerprint);
        if (dist_patterns().count(k)) return;
        auto p = std::make_shared<DistPattern>();
        p->n_global = n_global;
        p->offsets.assign(offsets.data(), offsets.data() + offsets.shape(0));
        p->indptr.assign(indptr.data(), indptr.data() + indptr.shape(0));
        p->gcols.assign(gcols.data(), gcols.data() + gcols.shape(0));
        p->block_size = block_size;
        dist_patterns().emplace(k, std::move(p));
      },
      nb::arg("comm_key"), nb::arg("comm_handle"), nb::arg("fingerprint"),
      nb::arg("n_global"), nb::arg("offsets"), nb::arg("indptr"),
      nb::arg("global_indices"), nb::arg("block_size"));

  m.def("dist_unregister_pattern", [](int64_t comm_key, int64_t fingerprint) {
    std::lock_guard<std::recursive_mutex> lock(core_mutex());
    dist_patterns().erase({comm_key, fingerprint});
  });

  m.def("dist_cache_info", []() {
    std::lock_guard<std::recursive_mutex> lock(core_mutex());
    DistCache& c = DistCache::get();
    nb::dict d = counters_dict(c.totals);
    d["size"] = c.entries().size();
    nb::list entries;
    for (const auto& e : c.entries()) {
      nb::dict s = counters_dict(e->counters);
      s["id"] = e->id;
      s["generation"] = e->generation;
      s["device"] = e->key.device;
      s["fingerprint"] = e->key.fingerprint;
      s["comm_key"] = e->key.comm;
      s["n_global"] = e->n_global;
      s["n_local"] = e->n_local;
      s["nnz"] = e->nnz;
      s["block_size"] = e->block_size;
      s["mode"] = mode_name(e->key.mode);
      s["transposed"] = e->key.transposed;
      s["last_setup_seconds"] = e->last_setup_seconds;
      s["last_solve_seconds"] = e->last_solve_seconds;
      s["total_setup_seconds"] = e->total_setup_seconds;
      s["total_solve_seconds"] = e->total_solve_seconds;
      entries.append(s);
    }
    d["entries"] = entries;
    return d;
  });

  // Collective over every communicator that has distributed entries.
  m.def("dist_clear_cache", []() {
    std::lock_guard<std::recursive_mutex> lock(core_mutex());
    DistCache::get().clear();
  });

  m.def(
      "set_cache_size",
      [](int64_t capacity, int64_t entries_per_key) {
        if (capacity < 0) throw std::invalid_argument("cache size must be >= 0");
        if (entries_per_key < 1)
          throw std::invalid_argument("entries_per_key must be >= 1");
        std::lock_guard<std::recursive_mutex> lock(core_mutex());
        Cache& c = Cache::get();
        c.capacity = static_cast<size_t>(capacity);
        c.entries_per_key = static_cast<size_t>(entries_per_key);
        c.evict_to(c.capacity);
      },
      nb::arg("capacity"), nb::arg("entries_per_key") = 1);

  m.def("set_resetup_mode", [](const std::string& mode) {
    std::lock_guard<std::recursive_mutex> lock(core_mutex());
    if (mode == "resetup")
      Cache::get().resetup_mode = ResetupMode::kResetup;
    else if (mode == "setup")
      Cache::get().resetup_mode = ResetupMode::kSetup;
    else
      throw std::invalid_argument("resetup mode must be 'resetup' or 'setup'");
  });

  m.def("finalize", []() {
    std::lock_guard<std::recursive_mutex> lock(core_mutex());
    Cache::get().clear();
    Api& a = api();
    if (!DistCache::get().entries().empty()) {
      // Distributed entries are leaked, not destroyed: destroying them is
      // collective (AmgX's MPI), and at exit MPI may already be finalized. Then
      // AmgX's own teardown is unsafe too (AMGX_finalize, and at exit the
      // destructors of its memory pools, which the leaked objects still use: an
      // abort, "Cuda failure: 'invalid argument'", 2 x H200, 2026-11-28). So AmgX
      // stays initialised, and the process exits without AmgX's teardown (the
      // driver reclaims the memory). `lineax_amgx._distributed.clear_cache(comm)`,
      // called on every rank before, avoids all of this.
      // The retired resources first: destroying any resources object frees the
      // memory pools that the abandoned entries still hold.
      for (auto& [device, r] : retired_resources()) (void)r.release();
      retired_resources().clear();
      DistCache::get().abandon();
      skip_amgx_teardown();
      return;
    }
    if (!poisoned().empty()) {
      // A broken CUDA context: AmgX's teardown (freeing its memory pools) throws
      // from destructors and aborts the process. Leak everything instead; the
      // driver reclaims it at exit.
      a.initialized = false;
      return;
    }
    if (a.cuda_handle) release_kernels();
    if (a.initialized) {
      a.initialized = false;
      AMGX_RC rc = a.AMGX_finalize();
      take_captured();
      if (rc != AMGX_RC_OK) throw std::runtime_error(amgx_error("AMGX_finalize", rc));
    }
  });

  m.def("free_device_memory", []() {
    std::lock_guard<std::recursive_mutex> lock(core_mutex());
    try {
      load_cuda_driver();
    } catch (const Failure& e) {
      throw std::runtime_error(e.what());
    }
    size_t free = 0, total = 0;
    // Needs a current context: use device 0's primary context.
    CUdevice dev;
    CUcontext ctx;
    if (api().cuDeviceGet(&dev, 0) != 0 || api().cuDevicePrimaryCtxRetain(&ctx, dev) != 0)
      throw std::runtime_error("no CUDA device");
    api().cuCtxPushCurrent_v2(ctx);
    api().cuMemGetInfo_v2(&free, &total);
    CUcontext popped;
    api().cuCtxPopCurrent_v2(&popped);
    return nb::make_tuple(free, total);
  });
}
