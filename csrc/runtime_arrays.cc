// Copyright 2026 The lineax-amgx authors. Licensed under the Apache License, Version 2.0.
//
// Runtime arrays (see runtime_arrays.h): the registry and the two FFI handlers.

#include "runtime_arrays.h"

#include <atomic>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <utility>
#include <vector>

#include "amgx_api.h"
#include "device.h"
#include "loader.h"

namespace ffi = xla::ffi;

namespace lxa {
namespace {

// A copy of one array on one device, in the context XLA runs on there.
struct DeviceCopy {
  CUcontext ctx = nullptr;
  DeviceBuffer buffer;
};

struct HostArray {
  const void* data = nullptr;  // Python's array (nullptr once unregistered)
  size_t bytes = 0;
  // Held shared while a CPU handler copies from `data`; unregistering takes it
  // exclusively, so Python frees the memory only after every such copy is done.
  std::shared_mutex readers;
  // Guarded by the registry's mutex.
  std::map<CUdevice, std::unique_ptr<DeviceCopy>> copies;
};

// Separate from the core's lock: an `mv` must not wait for an AmgX setup running in
// another thread. Never held together with core_mutex().
struct Registry {
  std::mutex mutex;
  std::map<int64_t, std::shared_ptr<HostArray>> arrays;
  size_t uploads = 0;
};

Registry& registry() {
  static auto* r = new Registry();  // leaked: no CUDA calls at exit
  return *r;
}

using Copies = std::vector<std::unique_ptr<DeviceCopy>>;

// Frees device copies, each after the work queued in its context is done (a
// copy from it may still be queued on XLA's stream). Call without the registry's
// lock (the synchronisation may wait for host callbacks). After a CUDA fault the
// memory is leaked (the context is unusable; the driver reclaims it at exit).
void free_copies(Copies& copies) {
  for (auto& c : copies) {
    if (!poisoned().empty() || api().cuCtxPushCurrent_v2 == nullptr) {
      c->buffer.ptr = 0;  // leak
      continue;
    }
    if (api().cuCtxPushCurrent_v2(c->ctx) != 0) {
      c->buffer.ptr = 0;
      continue;
    }
    api().cuCtxSynchronize();
    c->buffer.reset();
    CUcontext popped;
    api().cuCtxPopCurrent_v2(&popped);
  }
  copies.clear();
}

void take_copies(HostArray& a, Copies& out) {
  for (auto& [device, copy] : a.copies) out.push_back(std::move(copy));
  a.copies.clear();
}

// The CUDA driver, loaded once (under the core's lock, which guards the api table).
void ensure_driver() {
  static std::atomic<bool> ready{false};
  if (ready.load(std::memory_order_acquire)) return;
  std::lock_guard<std::recursive_mutex> lock(core_mutex());
  load_cuda_driver();
  ready.store(true, std::memory_order_release);
}

std::string not_registered(int64_t key) {
  return "lineax-amgx: runtime array " + std::to_string(key) +
         " is not registered: the sparsity pattern (or coloring, or halo plan) it "
         "belongs to was garbage-collected while a compiled program that reads it "
         "was still in use. Keep the operator alive while its compiled programs run.";
}

std::string wrong_size(int64_t key, size_t want, size_t got) {
  return "internal: runtime array " + std::to_string(key) + " holds " +
         std::to_string(want) + " bytes, its result buffer " + std::to_string(got);
}

std::shared_ptr<HostArray> find(int64_t key) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  auto it = r.arrays.find(key);
  return it == r.arrays.end() ? nullptr : it->second;
}

// ---- The handlers ----------------------------------------------------------------

ffi::Error CpuImpl(ffi::Result<ffi::AnyBuffer> out, int64_t key) {
  std::shared_ptr<HostArray> a = find(key);
  if (!a) return ffi::Error(ffi::ErrorCode::kFailedPrecondition, not_registered(key));
  if (out->size_bytes() != a->bytes)
    return ffi::Error(ffi::ErrorCode::kInternal, wrong_size(key, a->bytes, out->size_bytes()));
  std::shared_lock<std::shared_mutex> reading(a->readers);
  if (a->data == nullptr)
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition, not_registered(key));
  if (a->bytes) std::memcpy(out->untyped_data(), a->data, a->bytes);
  return ffi::Error::Success();
}

ffi::Error CudaImpl(void* stream_ptr, ffi::Result<ffi::AnyBuffer> out, int64_t key) {
  try {
    ensure_driver();
    CUstream stream = reinterpret_cast<CUstream>(stream_ptr);
    ContextScope scope(stream);
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    auto it = r.arrays.find(key);
    if (it == r.arrays.end() || it->second->data == nullptr)
      return ffi::Error(ffi::ErrorCode::kFailedPrecondition, not_registered(key));
    HostArray& a = *it->second;
    if (out->size_bytes() != a.bytes)
      return ffi::Error(ffi::ErrorCode::kInternal,
                        wrong_size(key, a.bytes, out->size_bytes()));
    if (a.bytes == 0) return ffi::Error::Success();
    std::unique_ptr<DeviceCopy>& copy = a.copies[scope.device];
    if (!copy) {
      // First use on this device: upload once, on XLA's stream (a plain
      // cuMemcpyHtoD runs on the legacy stream, which XLA's does not wait for),
      // complete before `data` may be read again by anyone.
      auto fresh = std::make_unique<DeviceCopy>();
      fresh->ctx = scope.ctx;
      fresh->buffer.allocate(a.bytes);
      LXA_CU(cuMemcpyHtoDAsync_v2(fresh->buffer.ptr, a.data, a.bytes, stream));
      LXA_CU(cuStreamSynchronize(stream));
      copy = std::move(fresh);
      ++r.uploads;
    }
    // Ordered on XLA's stream; the registry's lock keeps the copy alive until it
    // is queued, and freeing synchronises the context first.
    LXA_CU(cuMemcpyDtoDAsync_v2(reinterpret_cast<CUdeviceptr>(out->untyped_data()),
                                copy->buffer.ptr, a.bytes, stream));
    return ffi::Error::Success();
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, e.what());
  }
}

}  // namespace

// ---- The registry ------------------------------------------------------------------

bool register_runtime_array(int64_t key, const void* data, size_t bytes) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  if (r.arrays.count(key)) return false;
  auto a = std::make_shared<HostArray>();
  a->data = data;
  a->bytes = bytes;
  r.arrays.emplace(key, std::move(a));
  return true;
}

void unregister_runtime_array(int64_t key) {
  Registry& r = registry();
  std::shared_ptr<HostArray> a;
  Copies copies;
  {
    std::lock_guard<std::mutex> lock(r.mutex);
    auto it = r.arrays.find(key);
    if (it == r.arrays.end()) return;
    a = it->second;
    r.arrays.erase(it);
    take_copies(*a, copies);
  }
  {
    std::unique_lock<std::shared_mutex> writing(a->readers);  // readers done
    a->data = nullptr;
  }
  free_copies(copies);
}

void release_runtime_array_copies() {
  Registry& r = registry();
  Copies copies;
  {
    std::lock_guard<std::mutex> lock(r.mutex);
    for (auto& [key, a] : r.arrays) take_copies(*a, copies);
  }
  free_copies(copies);
}

RuntimeArrayStats runtime_array_stats() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  RuntimeArrayStats s;
  s.arrays = r.arrays.size();
  s.uploads = r.uploads;
  for (const auto& [key, a] : r.arrays) {
    s.host_bytes += a->bytes;
    for (const auto& [device, copy] : a->copies) {
      ++s.device_copies;
      s.device_bytes += copy->buffer.bytes;
    }
  }
  return s;
}

}  // namespace lxa

XLA_FFI_DEFINE_HANDLER_SYMBOL(LxaRuntimeArrayCpu, lxa::CpuImpl,
                              ffi::Ffi::Bind().Ret<ffi::AnyBuffer>().Attr<int64_t>("key"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LxaRuntimeArrayCuda, lxa::CudaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<void*>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("key"));
