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
#include <stdexcept>
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

// One host array registered under a key.
struct Registration {
  int64_t token = 0;
  const void* data = nullptr;  // Python's array (nullptr once unregistered)
  // Held shared while a handler copies from `data`; unregistering takes it
  // exclusively, so Python frees the memory only after every such copy is done.
  std::shared_mutex readers;
};

struct KeyEntry {
  size_t bytes = 0;
  std::vector<std::shared_ptr<Registration>> registrations;  // same content
  std::map<CUdevice, std::unique_ptr<DeviceCopy>> copies;
};

// Separate from the core's lock: an `mv` must not wait for an AmgX setup running in
// another thread. Never held together with core_mutex().
struct Registry {
  std::mutex mutex;
  std::map<int64_t, KeyEntry> keys;
  int64_t next_token = 1;
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
    if (!poisoned().empty() || api().cuCtxPushCurrent_v2 == nullptr ||
        api().cuCtxPushCurrent_v2(c->ctx) != 0) {
      c->buffer.ptr = 0;  // leak
      continue;
    }
    api().cuCtxSynchronize();
    c->buffer.reset();
    CUcontext popped;
    api().cuCtxPopCurrent_v2(&popped);
  }
  copies.clear();
}

void take_copies(KeyEntry& k, Copies& out) {
  for (auto& [device, copy] : k.copies) out.push_back(std::move(copy));
  k.copies.clear();
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
         " is not registered (internal: a compiled program outlived the structure "
         "array it reads).";
}

std::string wrong_size(int64_t key, size_t want, size_t got) {
  return "internal: runtime array " + std::to_string(key) + " holds " +
         std::to_string(want) + " bytes, its result buffer " + std::to_string(got);
}

// ---- The handlers ----------------------------------------------------------------

ffi::Error CpuImpl(ffi::Result<ffi::AnyBuffer> out, int64_t key) {
  std::shared_ptr<Registration> reg;
  size_t bytes = 0;
  {
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    auto it = r.keys.find(key);
    if (it != r.keys.end() && !it->second.registrations.empty()) {
      reg = it->second.registrations.front();
      bytes = it->second.bytes;
    }
  }
  if (!reg) return ffi::Error(ffi::ErrorCode::kFailedPrecondition, not_registered(key));
  if (out->size_bytes() != bytes)
    return ffi::Error(ffi::ErrorCode::kInternal, wrong_size(key, bytes, out->size_bytes()));
  std::shared_lock<std::shared_mutex> reading(reg->readers);
  if (reg->data == nullptr)
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition, not_registered(key));
  if (bytes) std::memcpy(out->untyped_data(), reg->data, bytes);
  return ffi::Error::Success();
}

ffi::Error CudaImpl(void* stream_ptr, ffi::Result<ffi::AnyBuffer> out, int64_t key) {
  try {
    ensure_driver();
    CUstream stream = reinterpret_cast<CUstream>(stream_ptr);
    ContextScope scope(stream);
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    auto it = r.keys.find(key);
    if (it == r.keys.end() || it->second.registrations.empty())
      return ffi::Error(ffi::ErrorCode::kFailedPrecondition, not_registered(key));
    KeyEntry& k = it->second;
    if (out->size_bytes() != k.bytes)
      return ffi::Error(ffi::ErrorCode::kInternal,
                        wrong_size(key, k.bytes, out->size_bytes()));
    if (k.bytes == 0) return ffi::Error::Success();
    std::unique_ptr<DeviceCopy>& copy = k.copies[scope.device];
    if (!copy) {
      // First use on this device: upload once, on XLA's stream (a plain
      // cuMemcpyHtoD runs on the legacy stream, which XLA's does not wait for).
      // The registry's lock keeps the registration (and so its memory) alive.
      auto fresh = std::make_unique<DeviceCopy>();
      fresh->ctx = scope.ctx;
      fresh->buffer.allocate(k.bytes);
      LXA_CU(cuMemcpyHtoDAsync_v2(fresh->buffer.ptr, k.registrations.front()->data,
                                  k.bytes, stream));
      LXA_CU(cuStreamSynchronize(stream));
      copy = std::move(fresh);
      ++r.uploads;
    }
    // Ordered on XLA's stream; the registry's lock keeps the copy alive until it
    // is queued, and freeing synchronises the context first.
    LXA_CU(cuMemcpyDtoDAsync_v2(reinterpret_cast<CUdeviceptr>(out->untyped_data()),
                                copy->buffer.ptr, k.bytes, stream));
    return ffi::Error::Success();
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, e.what());
  }
}

}  // namespace

// ---- The registry ------------------------------------------------------------------

int64_t register_runtime_array(int64_t key, const void* data, size_t bytes) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  KeyEntry& k = r.keys[key];
  if (!k.registrations.empty() && k.bytes != bytes)
    throw std::invalid_argument("internal: runtime array " + std::to_string(key) +
                                " registered with two sizes");
  k.bytes = bytes;
  auto reg = std::make_shared<Registration>();
  reg->token = r.next_token++;
  reg->data = data;
  k.registrations.push_back(reg);
  return reg->token;
}

void unregister_runtime_array(int64_t key, int64_t token) {
  Registry& r = registry();
  std::shared_ptr<Registration> reg;
  Copies copies;
  {
    std::lock_guard<std::mutex> lock(r.mutex);
    auto it = r.keys.find(key);
    if (it == r.keys.end()) return;
    auto& regs = it->second.registrations;
    for (auto i = regs.begin(); i != regs.end(); ++i) {
      if ((*i)->token == token) {
        reg = *i;
        regs.erase(i);
        break;
      }
    }
    if (!reg) return;
    if (regs.empty()) {
      take_copies(it->second, copies);
      r.keys.erase(it);
    }
  }
  {
    std::unique_lock<std::shared_mutex> writing(reg->readers);  // readers done
    reg->data = nullptr;
  }
  free_copies(copies);
}

void release_runtime_array_copies() {
  Registry& r = registry();
  Copies copies;
  {
    std::lock_guard<std::mutex> lock(r.mutex);
    for (auto& [key, k] : r.keys) take_copies(k, copies);
  }
  free_copies(copies);
}

RuntimeArrayStats runtime_array_stats() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  RuntimeArrayStats s;
  s.arrays = r.keys.size();
  s.uploads = r.uploads;
  for (const auto& [key, k] : r.keys) {
    s.registrations += k.registrations.size();
    s.host_bytes += k.bytes * k.registrations.size();
    for (const auto& [device, copy] : k.copies) {
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
