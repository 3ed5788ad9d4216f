// Copyright 2026 The lineax-amgx authors. Licensed under the Apache License, Version 2.0.
//
// Device kernels of the native core. They are compiled to PTX once, by a developer,
// with `python tools/gen_ptx.py` (nvcc -ptx -arch=compute_75), and the PTX is
// embedded in kernels_ptx.h: the package itself builds with a plain C++ compiler and
// the CUDA driver JIT-compiles the PTX for the GPU at run time.

// Sets *flag to 1 if the two byte ranges differ anywhere (bitwise comparison, so
// equality is exact: no tolerance and no hash). n16 16-byte words, then n4 trailing
// 4-byte words (buffers from cudaMalloc/XLA are at least 16-byte aligned).
extern "C" __global__ void lxa_differs(const uint4* __restrict__ a,
                                       const uint4* __restrict__ b,
                                       unsigned long long n16,
                                       unsigned long long n4,
                                       unsigned int* flag) {
  unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
  const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
  unsigned int diff = 0;
  for (unsigned long long k = i; k < n16; k += stride) {
    uint4 x = a[k];
    uint4 y = b[k];
    diff |= (x.x ^ y.x) | (x.y ^ y.y) | (x.z ^ y.z) | (x.w ^ y.w);
  }
  const unsigned int* a4 = reinterpret_cast<const unsigned int*>(a + n16);
  const unsigned int* b4 = reinterpret_cast<const unsigned int*>(b + n16);
  for (unsigned long long k = i; k < n4; k += stride) diff |= a4[k] ^ b4[k];
  if (__syncthreads_or(diff != 0) && threadIdx.x == 0) *flag = 1u;
}
