// Copyright 2026 The lineax-amgx authors. Licensed under the Apache License, Version 2.0.
//
// The value-comparison kernel (see device.h).

#include "device.h"

#include <cstdint>
#include <map>

#include "kernels_ptx.h"

namespace lxa {
namespace {

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

}  // namespace

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

}  // namespace lxa
