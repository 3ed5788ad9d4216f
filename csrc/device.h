// Copyright 2026 The lineax-amgx authors. Licensed under the Apache License, Version 2.0.
//
// Device memory of our own: an owned buffer, and the exact comparison of two device
// arrays (a PTX kernel, JIT-compiled by the driver once per device) that tells a
// cache hit (the resident values) from new values, without a hash.
#pragma once

#include <algorithm>
#include <cstddef>

#include "amgx_api.h"
#include "loader.h"

namespace lxa {

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

// Exact (bitwise) comparison of two device arrays of `bytes` bytes, ordered on
// `stream` (synchronised). Call with the device's context current.
bool device_equal(CUdevice device, CUdeviceptr a, CUdeviceptr b, size_t bytes,
                  CUstream stream);

// Frees the kernels' modules and scratch memory (finalize).
void release_kernels();

}  // namespace lxa
