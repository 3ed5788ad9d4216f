// Copyright 2026 The lineax-amgx authors. Licensed under the Apache License, Version 2.0.
//
// The part of AmgX's C API (amgx_c.h, BSD-3-Clause, NVIDIA) that lineax-amgx calls,
// declared as function-pointer types so that libamgxsh.so can be loaded at run time
// with dlopen. Nothing of AmgX is compiled into this package.
#pragma once

#include <cstdint>

namespace lxa {

using AMGX_RC = int;  // AMGX_RC_OK == 0
constexpr AMGX_RC AMGX_RC_OK = 0;
using AMGX_Mode = int;
using AMGX_SOLVE_STATUS = int;  // 0 success, 1 failed, 2 diverged, 3 not converged

using AMGX_config_handle = struct AMGX_config_opaque*;
using AMGX_resources_handle = struct AMGX_resources_opaque*;
using AMGX_matrix_handle = struct AMGX_matrix_opaque*;
using AMGX_vector_handle = struct AMGX_vector_opaque*;
using AMGX_solver_handle = struct AMGX_solver_opaque*;
using AMGX_distribution_handle = struct AMGX_distribution_opaque*;
constexpr int AMGX_DIST_PARTITION_OFFSETS = 1;
using AMGX_print_callback = void (*)(const char* msg, int length);

// X(name, return type, argument list)
#define LXA_AMGX_FUNCTIONS(X)                                                       \
  X(AMGX_get_api_version, AMGX_RC, (int* major, int* minor))                        \
  X(AMGX_get_build_info_strings, AMGX_RC, (char** version, char** date, char** time)) \
  X(AMGX_get_error_string, AMGX_RC, (AMGX_RC err, char* buf, int buf_len))         \
  X(AMGX_initialize, AMGX_RC, ())                                                   \
  X(AMGX_finalize, AMGX_RC, ())                                                     \
  X(AMGX_register_print_callback, AMGX_RC, (AMGX_print_callback func))              \
  X(AMGX_config_create, AMGX_RC, (AMGX_config_handle * cfg, const char* options))   \
  X(AMGX_config_destroy, AMGX_RC, (AMGX_config_handle cfg))                         \
  X(AMGX_resources_create, AMGX_RC,                                                 \
    (AMGX_resources_handle * rsc, AMGX_config_handle cfg, void* comm, int device_num, \
     const int* devices))                                                           \
  X(AMGX_resources_destroy, AMGX_RC, (AMGX_resources_handle rsc))                   \
  X(AMGX_matrix_create, AMGX_RC,                                                    \
    (AMGX_matrix_handle * mtx, AMGX_resources_handle rsc, AMGX_Mode mode))          \
  X(AMGX_matrix_destroy, AMGX_RC, (AMGX_matrix_handle mtx))                         \
  X(AMGX_matrix_upload_all, AMGX_RC,                                                \
    (AMGX_matrix_handle mtx, int n, int nnz, int block_dimx, int block_dimy,        \
     const int* row_ptrs, const int* col_indices, const void* data,                 \
     const void* diag_data))                                                        \
  X(AMGX_matrix_replace_coefficients, AMGX_RC,                                      \
    (AMGX_matrix_handle mtx, int n, int nnz, const void* data, const void* diag_data)) \
  X(AMGX_vector_create, AMGX_RC,                                                    \
    (AMGX_vector_handle * vec, AMGX_resources_handle rsc, AMGX_Mode mode))          \
  X(AMGX_vector_destroy, AMGX_RC, (AMGX_vector_handle vec))                         \
  X(AMGX_vector_upload, AMGX_RC,                                                    \
    (AMGX_vector_handle vec, int n, int block_dim, const void* data))               \
  X(AMGX_vector_set_zero, AMGX_RC, (AMGX_vector_handle vec, int n, int block_dim))  \
  X(AMGX_vector_download, AMGX_RC, (AMGX_vector_handle vec, void* data))            \
  X(AMGX_vector_bind, AMGX_RC, (AMGX_vector_handle vec, AMGX_matrix_handle mtx))    \
  X(AMGX_solver_create, AMGX_RC,                                                    \
    (AMGX_solver_handle * slv, AMGX_resources_handle rsc, AMGX_Mode mode,           \
     AMGX_config_handle cfg))                                                       \
  X(AMGX_solver_destroy, AMGX_RC, (AMGX_solver_handle slv))                         \
  X(AMGX_solver_setup, AMGX_RC, (AMGX_solver_handle slv, AMGX_matrix_handle mtx))   \
  X(AMGX_solver_solve, AMGX_RC,                                                     \
    (AMGX_solver_handle slv, AMGX_vector_handle rhs, AMGX_vector_handle sol))       \
  X(AMGX_solver_solve_with_0_initial_guess, AMGX_RC,                                \
    (AMGX_solver_handle slv, AMGX_vector_handle rhs, AMGX_vector_handle sol))       \
  X(AMGX_solver_get_iterations_number, AMGX_RC, (AMGX_solver_handle slv, int* n))   \
  X(AMGX_solver_get_iteration_residual, AMGX_RC,                                    \
    (AMGX_solver_handle slv, int it, int idx, double* res))                         \
  X(AMGX_solver_get_status, AMGX_RC, (AMGX_solver_handle slv, AMGX_SOLVE_STATUS * st))

// Optional. AMGX_solver_resetup: deprecated in amgx_c.h, used when present (see
// set_resetup_mode). The distribution API (AmgX >= 2.2): distributed solves only.
#define LXA_AMGX_OPTIONAL_FUNCTIONS(X)                                                \
  X(AMGX_solver_resetup, AMGX_RC, (AMGX_solver_handle slv, AMGX_matrix_handle mtx))    \
  X(AMGX_distribution_create, AMGX_RC,                                               \
    (AMGX_distribution_handle * dist, AMGX_config_handle cfg))                       \
  X(AMGX_distribution_destroy, AMGX_RC, (AMGX_distribution_handle dist))             \
  X(AMGX_distribution_set_partition_data, AMGX_RC,                                   \
    (AMGX_distribution_handle dist, int info, const void* partition_data))           \
  X(AMGX_matrix_upload_distributed, AMGX_RC,                                         \
    (AMGX_matrix_handle mtx, int n_global, int n, int nnz, int block_dimx,           \
     int block_dimy, const int* row_ptrs, const void* col_indices_global,            \
     const void* data, const void* diag_data, AMGX_distribution_handle distribution))

// ---- The CUDA driver API (libcuda.so.1, always installed with the driver). ----

using CUresult = int;
using CUdevice = int;
using CUdeviceptr = unsigned long long;
using CUcontext = struct CUctx_opaque*;
using CUstream = struct CUstream_opaque*;
using CUmodule = struct CUmod_opaque*;
using CUfunction = struct CUfunc_opaque*;

#define LXA_CUDA_FUNCTIONS(X)                                                        \
  X(cuInit, CUresult, (unsigned int flags))                                          \
  X(cuGetErrorString, CUresult, (CUresult error, const char** str))                  \
  X(cuDriverGetVersion, CUresult, (int* version))                                    \
  X(cuDeviceGetCount, CUresult, (int* count))                                        \
  X(cuDeviceGet, CUresult, (CUdevice * device, int ordinal))                         \
  X(cuDeviceGetName, CUresult, (char* name, int len, CUdevice dev))                  \
  X(cuDevicePrimaryCtxRetain, CUresult, (CUcontext * ctx, CUdevice dev))             \
  X(cuDevicePrimaryCtxRelease_v2, CUresult, (CUdevice dev))                          \
  X(cuStreamGetCtx, CUresult, (CUstream stream, CUcontext * ctx))                    \
  X(cuStreamSynchronize, CUresult, (CUstream stream))                                \
  X(cuCtxPushCurrent_v2, CUresult, (CUcontext ctx))                                  \
  X(cuCtxPopCurrent_v2, CUresult, (CUcontext * ctx))                                 \
  X(cuCtxGetDevice, CUresult, (CUdevice * device))                                   \
  X(cuCtxSynchronize, CUresult, ())                                                  \
  X(cuMemAlloc_v2, CUresult, (CUdeviceptr * dptr, size_t bytes))                     \
  X(cuMemFree_v2, CUresult, (CUdeviceptr dptr))                                      \
  X(cuMemGetInfo_v2, CUresult, (size_t * free, size_t * total))                      \
  X(cuMemcpyDtoH_v2, CUresult, (void* dst, CUdeviceptr src, size_t bytes))           \
  X(cuMemcpyHtoD_v2, CUresult, (CUdeviceptr dst, const void* src, size_t bytes))     \
  X(cuMemcpyHtoDAsync_v2, CUresult,                                                  \
    (CUdeviceptr dst, const void* src, size_t bytes, CUstream stream))               \
  X(cuMemcpyDtoDAsync_v2, CUresult,                                                  \
    (CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream stream))               \
  X(cuMemsetD32Async, CUresult,                                                      \
    (CUdeviceptr dst, unsigned int value, size_t n, CUstream stream))                \
  X(cuModuleLoadData, CUresult, (CUmodule * module, const void* image))              \
  X(cuModuleGetFunction, CUresult, (CUfunction * fn, CUmodule module, const char* name)) \
  X(cuModuleUnload, CUresult, (CUmodule module))                                     \
  X(cuLaunchKernel, CUresult,                                                        \
    (CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,  \
     unsigned bz, unsigned shmem, CUstream stream, void** params, void** extra))

}  // namespace lxa
