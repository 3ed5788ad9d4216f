/* Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
 *
 * Raw AmgX, cold: the baseline of benchmarks/first_call.py (issue 20), through the
 * AmgX C API only.
 *
 * The CUDA context exists before the clock starts (the driver's primary context,
 * made current, as in an application that already uses the GPU; AmgX's runtime
 * calls attach to it). Then, timed with clock_gettime (CLOCK_MONOTONIC) from
 * AMGX_initialize to the end of the solve: initialize, config and resources,
 * matrix/vector/solver creation, upload of the host arrays, setup, solve (and a
 * context synchronisation, so that the GPU's work is inside the time). The matrix is
 * generated here: the 3D 7-point Poisson matrix on an n^3 grid, exactly the one of
 * benchmarks/_common.poisson3d (6 on the diagonal, -1 to the six neighbours, rows in
 * x-major order, columns sorted), b = ones, x0 = 0. One JSON line on stdout.
 *
 *   raw_amgx_cold N CONFIG_JSON_FILE
 *
 * Build (first_call.py does):
 *   gcc -O2 -I<amgx>/include raw_amgx_cold.c -L<dir> -lamgxsh -ldl \
 *       -Wl,-rpath,<dir> -o raw_amgx_cold
 */

#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "amgx_c.h"

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void silent(const char *msg, int length) {
  (void)msg;
  (void)length;
}

#define CHECK(call)                                                          \
  do {                                                                       \
    AMGX_RC rc_ = (call);                                                    \
    if (rc_ != AMGX_RC_OK) {                                                 \
      char buf_[4096];                                                       \
      AMGX_get_error_string(rc_, buf_, sizeof(buf_));                        \
      fprintf(stderr, "raw_amgx_cold: %s failed: %s\n", #call, buf_);        \
      exit(1);                                                               \
    }                                                                        \
  } while (0)

/* The CUDA driver, through dlopen (no CUDA headers or toolkit needed). */
typedef int (*cuInit_t)(unsigned);
typedef int (*cuDeviceGet_t)(int *, int);
typedef int (*cuDevicePrimaryCtxRetain_t)(void **, int);
typedef int (*cuCtxSetCurrent_t)(void *);
typedef int (*cuCtxSynchronize_t)(void);
static cuCtxSynchronize_t ctx_synchronize;

static void create_context(void) {
  void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    fprintf(stderr, "raw_amgx_cold: no CUDA driver: %s\n", dlerror());
    exit(1);
  }
  cuInit_t init = (cuInit_t)dlsym(h, "cuInit");
  cuDeviceGet_t get = (cuDeviceGet_t)dlsym(h, "cuDeviceGet");
  cuDevicePrimaryCtxRetain_t retain =
      (cuDevicePrimaryCtxRetain_t)dlsym(h, "cuDevicePrimaryCtxRetain");
  cuCtxSetCurrent_t set = (cuCtxSetCurrent_t)dlsym(h, "cuCtxSetCurrent");
  ctx_synchronize = (cuCtxSynchronize_t)dlsym(h, "cuCtxSynchronize");
  int device = 0;
  void *ctx = NULL;
  if (!init || !get || !retain || !set || !ctx_synchronize || init(0) != 0 ||
      get(&device, 0) != 0 || retain(&ctx, device) != 0 || set(ctx) != 0) {
    fprintf(stderr, "raw_amgx_cold: could not create the CUDA context\n");
    exit(1);
  }
}

static char *read_file(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    fprintf(stderr, "raw_amgx_cold: cannot open %s\n", path);
    exit(1);
  }
  fseek(f, 0, SEEK_END);
  long size = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *text = malloc((size_t)size + 1);
  if (fread(text, 1, (size_t)size, f) != (size_t)size) exit(1);
  text[size] = 0;
  fclose(f);
  return text;
}

/* 7-point Poisson on n^3 (row r = (x * n + y) * n + z), CSR with sorted columns. */
static void poisson3d(int n, int **indptr, int **indices, double **values, int *nnz) {
  int64_t rows = (int64_t)n * n * n;
  int *p = malloc(sizeof(int) * (size_t)(rows + 1));
  int *c = malloc(sizeof(int) * (size_t)(7 * rows));
  double *v = malloc(sizeof(double) * (size_t)(7 * rows));
  int64_t k = 0;
  int64_t n2 = (int64_t)n * n;
  for (int64_t r = 0; r < rows; ++r) {
    int64_t x = r / n2, y = (r / n) % n, z = r % n;
    p[r] = (int)k;
    if (x > 0) { c[k] = (int)(r - n2); v[k++] = -1.0; }
    if (y > 0) { c[k] = (int)(r - n); v[k++] = -1.0; }
    if (z > 0) { c[k] = (int)(r - 1); v[k++] = -1.0; }
    c[k] = (int)r; v[k++] = 6.0;
    if (z < n - 1) { c[k] = (int)(r + 1); v[k++] = -1.0; }
    if (y < n - 1) { c[k] = (int)(r + n); v[k++] = -1.0; }
    if (x < n - 1) { c[k] = (int)(r + n2); v[k++] = -1.0; }
  }
  p[rows] = (int)k;
  *indptr = p;
  *indices = c;
  *values = v;
  *nnz = (int)k;
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: raw_amgx_cold N CONFIG_JSON_FILE\n");
    return 2;
  }
  int n = atoi(argv[1]);
  char *config = read_file(argv[2]);
  int *indptr, *indices, nnz;
  double *values;
  poisson3d(n, &indptr, &indices, &values, &nnz);
  int rows = n * n * n;
  double *b = malloc(sizeof(double) * (size_t)rows);
  double *x = malloc(sizeof(double) * (size_t)rows);
  for (int i = 0; i < rows; ++i) b[i] = 1.0;

  double c0 = now();
  create_context();
  double context = now() - c0;

  AMGX_config_handle cfg;
  AMGX_resources_handle rsrc;
  AMGX_matrix_handle A;
  AMGX_vector_handle vb, vx;
  AMGX_solver_handle solver;
  double t0 = now();
  CHECK(AMGX_register_print_callback(&silent));
  CHECK(AMGX_initialize());
  double t1 = now();
  CHECK(AMGX_config_create(&cfg, config));
  CHECK(AMGX_resources_create_simple(&rsrc, cfg));
  CHECK(AMGX_matrix_create(&A, rsrc, AMGX_mode_dDDI));
  CHECK(AMGX_vector_create(&vb, rsrc, AMGX_mode_dDDI));
  CHECK(AMGX_vector_create(&vx, rsrc, AMGX_mode_dDDI));
  CHECK(AMGX_solver_create(&solver, rsrc, AMGX_mode_dDDI, cfg));
  double t2 = now();
  CHECK(AMGX_matrix_upload_all(A, rows, nnz, 1, 1, indptr, indices, values, NULL));
  CHECK(AMGX_vector_upload(vb, rows, 1, b));
  CHECK(AMGX_vector_set_zero(vx, rows, 1));
  double t3 = now();
  CHECK(AMGX_solver_setup(solver, A));
  ctx_synchronize();
  double t4 = now();
  CHECK(AMGX_solver_solve(solver, vb, vx));
  ctx_synchronize();
  double t5 = now();

  AMGX_SOLVE_STATUS status;
  int iterations = 0;
  CHECK(AMGX_solver_get_status(solver, &status));
  CHECK(AMGX_solver_get_iterations_number(solver, &iterations));
  CHECK(AMGX_vector_download(vx, x));
  /* The true relative residual ||b - A x|| / ||b||, on the host. */
  double rr = 0.0, bb = 0.0;
  for (int i = 0; i < rows; ++i) {
    double r = b[i];
    for (int k = indptr[i]; k < indptr[i + 1]; ++k) r -= values[k] * x[indices[k]];
    rr += r * r;
    bb += b[i] * b[i];
  }
  CHECK(AMGX_solver_destroy(solver));
  CHECK(AMGX_vector_destroy(vx));
  CHECK(AMGX_vector_destroy(vb));
  CHECK(AMGX_matrix_destroy(A));
  CHECK(AMGX_resources_destroy(rsrc));
  CHECK(AMGX_config_destroy(cfg));
  CHECK(AMGX_finalize());

  int major = 0, minor = 0;
  AMGX_get_api_version(&major, &minor);
  printf("{\"n\": %d, \"unknowns\": %d, \"nnz\": %d, \"amgx_api\": \"%d.%d\", "
         "\"context_seconds\": %.6f, \"initialize_seconds\": %.6f, "
         "\"create_seconds\": %.6f, \"upload_seconds\": %.6f, "
         "\"setup_seconds\": %.6f, \"solve_seconds\": %.6f, "
         "\"cold_seconds\": %.6f, \"status\": %d, \"iterations\": %d, "
         "\"relative_residual\": %.3e}\n",
         n, rows, nnz, major, minor, context, t1 - t0, t2 - t1, t3 - t2, t4 - t3,
         t5 - t4, t5 - t0, (int)status, iterations, sqrt(rr / bb));
  free(config);
  free(indptr);
  free(indices);
  free(values);
  free(b);
  free(x);
  return 0;
}
