// Copyright 2026 The lineax-amgx authors. Licensed under the Apache License, Version 2.0.
//
// Run-time loading of AmgX and of the CUDA driver; AmgX's output; the exit hook;
// the poisoned-context state. See loader.h.

#include "loader.h"

#include <dlfcn.h>
#include <stdlib.h>  // on_exit (glibc)
#include <unistd.h>  // _exit

#include <cstdio>
#include <utility>

namespace lxa {

Api& api() {
  static Api* a = new Api();
  return *a;
}

std::recursive_mutex& core_mutex() {
  static std::recursive_mutex* m = new std::recursive_mutex();
  return *m;
}

PrintState& print_state() {
  static PrintState* s = new PrintState();
  return *s;
}

namespace {

// AmgX prints through this callback (its banner, its messages).
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

}  // namespace

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

std::string cuda_error_string(CUresult rc) {
  const char* s = nullptr;
  if (api().cuGetErrorString && api().cuGetErrorString(rc, &s) == 0 && s) return s;
  return "CUDA driver error " + std::to_string(rc);
}

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

namespace {

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

}  // namespace

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

}  // namespace lxa
