// Copyright 2026 The lineax-amgx authors. Licensed under the Apache License, Version 2.0.
//
// The XLA FFI handlers `lineax_amgx_setup` / `lineax_amgx_solve` (single process:
// the resource cache) and `lineax_amgx_dist_setup` / `lineax_amgx_dist_solve`
// (one rank of a distributed operator: the distributed cache, after the ranks
// agree), with their bindings (operands, results and attributes).

#include "handlers.h"

#include <cstdint>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>

#include "amgx_api.h"
#include "cache.h"
#include "codes.h"
#include "dist_cache.h"
#include "dist_comm.h"
#include "entry.h"
#include "loader.h"

namespace ffi = xla::ffi;

namespace lxa {
namespace {

// ------------------------------------------------------------------------------
// What the handlers share.
// ------------------------------------------------------------------------------

Key make_key(CUdevice device, int64_t fingerprint, int32_t block_size, int32_t mode,
             std::string_view config, int32_t transposed) {
  return Key{device, fingerprint, block_size, mode, std::string(config),
             transposed != 0, 0};
}

// The XLA element type of a matrix value (`matrix`) or a vector element in AmgX
// `mode`: the precision letter of its name (vector second, matrix third).
ffi::DataType mode_type(int32_t mode, bool matrix) {
  const ModeInfo* m = find_mode(mode);
  if (m == nullptr) throw Failure("unsupported AmgX mode " + std::to_string(mode));
  switch (m->name[matrix ? 2 : 1]) {
    case 'D': return ffi::DataType::F64;
    case 'F': return ffi::DataType::F32;
    case 'Z': return ffi::DataType::C128;
    case 'C': return ffi::DataType::C64;
    default: break;
  }
  throw Failure(std::string("internal: no element type for AmgX mode ") + m->name);
}

std::string type_name(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::F64: return "float64";
    case ffi::DataType::C64: return "complex64";
    case ffi::DataType::C128: return "complex128";
    default: return "XLA type " + std::to_string(static_cast<int>(t));
  }
}

// Refuses a buffer whose element type is not the one AmgX `mode` reads or writes
// (a complex mode takes complex buffers: two reals per element, real part first).
void check_type(const ffi::AnyBuffer& buf, int32_t mode, bool matrix, const char* what) {
  ffi::DataType want = mode_type(mode, matrix);
  if (buf.element_type() != want)
    throw Failure(std::string(what) + " buffer is " + type_name(buf.element_type()) +
                  ", AmgX mode " + find_mode(mode)->name + " takes " + type_name(want));
}

// The residual norm is real in every mode (float32 or float64).
void check_residual(const ffi::AnyBuffer& residual) {
  ffi::DataType t = residual.element_type();
  if (t != ffi::DataType::F64 && t != ffi::DataType::F32)
    throw Failure("residual buffer is " + type_name(t) + ", expected a real type");
}

// A quiet NaN in float32 and float64 alike (and so in both parts of a complex
// element): the fill of a solution that AmgX did not compute.
constexpr unsigned int kNaNWord = 0xffffffffu;

void check_values(const ffi::AnyBuffer& values, const Pattern& p, int32_t mode) {
  check_gpu_block_size(p.block_size);
  check_type(values, mode, true, "values");
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

// Writes a setup token (the entry's id and generation; -1, -1 without an entry)
// into XLA's output.
template <typename E>
void write_token(ffi::Result<ffi::Buffer<ffi::S32>>& token, const E* e,
                 CUstream stream) {
  int32_t out[2] = {-1, -1};
  if (e != nullptr) {
    out[0] = e->id;
    out[1] = e->generation;
  }
  write_host(reinterpret_cast<CUdeviceptr>(token->typed_data()), out, 2, stream);
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

// ------------------------------------------------------------------------------
// The single-process handlers: the resource cache (cache.h).
// ------------------------------------------------------------------------------

// `ok`: 1 sets up, 0 skips (non-finite values or a zero row: no entry), 2 refuses
// with `refusal` (the values break a promise the solver checked on the device,
// such as a symmetry tag; the contract's OK_* codes).
ffi::Error SetupImpl(void* stream_ptr, ffi::AnyBuffer values, ffi::Buffer<ffi::S32> ok,
                     ffi::Result<ffi::Buffer<ffi::S32>> token, int64_t fingerprint,
                     std::string_view config, int32_t mode, int32_t transposed,
                     int32_t verbose, std::string_view refusal) {
  return run_handler(stream_ptr, verbose, /*refuse_if_poisoned=*/true,
                     [&](CUstream stream, const ContextScope& scope) {
      auto pattern = find_pattern(fingerprint);
      check_values(values, *pattern, mode);
      int32_t ok_host = 0;
      LXA_CU(cuMemcpyDtoH_v2(&ok_host, reinterpret_cast<CUdeviceptr>(ok.typed_data()),
                             sizeof(int32_t)));
      if (ok_host == 2) throw Failure(std::string(refusal));
      Cache& cache = Cache::get();
      Entry* e = nullptr;
      if (ok_host != 0 && !cache.isolated()) {
        Key key = make_key(scope.device, fingerprint, pattern->block_size, mode, config,
                           transposed);
        e = cache.acquire(key, pattern,
                          reinterpret_cast<CUdeviceptr>(values.untyped_data()),
                          values.size_bytes(), stream);
      }
      write_token(token, e, stream);
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
      check_type(b, mode, false, "b");
      check_type(*x, mode, false, "x");
      if (has_x0) check_type(x0, mode, false, "x0");
      check_residual(*residual);
      if (b.size_bytes() != vec_bytes || x->size_bytes() != vec_bytes ||
          (has_x0 && x0.size_bytes() != vec_bytes))
        throw Failure("vector buffers do not match the operator's size");
      int32_t host[3] = {0, -1, -1};  // ok, token id, token generation
      LXA_CU(cuMemcpyDtoH_v2(&host[0], reinterpret_cast<CUdeviceptr>(ok.typed_data()),
                             sizeof(int32_t)));
      LXA_CU(cuMemcpyDtoH_v2(&host[1], reinterpret_cast<CUdeviceptr>(token.typed_data()),
                             2 * sizeof(int32_t)));
      int32_t info_host[2] = {kStatusNonFinite, 0};  // 0 iterations
      double res = std::numeric_limits<double>::quiet_NaN();
      CUdeviceptr x_ptr = reinterpret_cast<CUdeviceptr>(x->untyped_data());
      if (host[0] == 0) {
        // NaN/Inf input: AmgX is not called; the output is NaN, flagged by status.
        LXA_CU(cuMemsetD32Async(x_ptr, kNaNWord, vec_bytes / 4, stream));
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
// The distributed handlers: the ranks agree (dist_comm.h), then act together.
// ------------------------------------------------------------------------------

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
          reinterpret_cast<CUdeviceptr>(ok.typed_data()), 0, "setup", nullptr,
          /*setup_only=*/true);
      write_token(token, e, stream);
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
      // The same types on every rank (one program): all ranks refuse together,
      // before any collective call.
      check_type(b, mode, false, "b");
      check_type(*x, mode, false, "x");
      if (has_x0) check_type(x0, mode, false, "x0");
      check_residual(*residual);
      bool isolated = false;
      DistEntry* e = dist_acquire(
          scope, stream, comm_key, fingerprint, signature, site, config, mode, transposed,
          reinterpret_cast<CUdeviceptr>(values.untyped_data()), values.size_bytes(),
          reinterpret_cast<CUdeviceptr>(ok.typed_data()),
          reinterpret_cast<CUdeviceptr>(token.typed_data()), "solve", &isolated);
      CUdeviceptr x_ptr = reinterpret_cast<CUdeviceptr>(x->untyped_data());
      size_t vec_bytes = x->size_bytes();
      int32_t info_host[2] = {kStatusNonFinite, 0};  // 0 iterations
      double res = std::numeric_limits<double>::quiet_NaN();
      if (e == nullptr) {
        LXA_CU(cuMemsetD32Async(x_ptr, kNaNWord, vec_bytes / 4, stream));
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
        // A failure on any rank evicts the entry on every rank (then raises);
        // isolated mode removes it after every solve.
        finish_dist_solve(dist_comm(comm_key), e, err, isolated);
      }
      write_solve_info(*info, info_host, *residual, res, stream);
  });
}

// ------------------------------------------------------------------------------
// The bindings: operands, results and attributes. The distributed handlers take
// those of the single-process ones plus `comm_key`, `signature` and `site` (last).
// (Attributes are matched by name; their order is the handler's parameter order.)
// ------------------------------------------------------------------------------

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
auto refusing(B binding) {
  return std::move(binding).template Attr<std::string_view>("refusal");
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(LxaSetup, lxa::SetupImpl,
                              lxa::refusing(lxa::setup_binding()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LxaSolve, lxa::SolveImpl, lxa::solve_binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(LxaDistSetup, lxa::DistSetupImpl,
                              lxa::distributed(lxa::setup_binding()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LxaDistSolve, lxa::DistSolveImpl,
                              lxa::distributed(lxa::solve_binding()));
