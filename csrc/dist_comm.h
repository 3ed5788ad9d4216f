// Copyright 2026 The lineax-amgx authors. Licensed under the Apache License, Version 2.0.
//
// The device-resident distributed path, below its FFI handlers: the XLA FFI
// handlers (handlers.cc) read values and vectors where XLA keeps them (on the
// GPU), and agree with the other ranks through small MPI allreduces made here.
//
// MPI is reached through the library AmgX was built with (the Python side checks
// that mpi4py uses the same one and hands us, once, the addresses of three of its
// functions and two handles): the package builds without MPI. Handles travel as
// integers: pointers in Open MPI, `int`s in MPICH; the x86-64 and aarch64 calling
// conventions read an `int` argument from the low half of its register, so one
// signature serves both.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "amgx_api.h"
#include "dist_cache.h"
#include "loader.h"

namespace lxa {

struct MpiApi {
  int (*iallreduce)(const void*, void*, int, uintptr_t, uintptr_t, uintptr_t,
                    void*) = nullptr;
  int (*test)(void*, int*, void*) = nullptr;
  int (*comm_dup)(uintptr_t, void*) = nullptr;
  uintptr_t int64_type = 0, max_op = 0;
  double timeout = 600;  // seconds (LINEAX_AMGX_MPI_TIMEOUT); 0 waits forever
};

MpiApi& mpi_api();

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

// The communicators registered by dist_register_pattern, by key.
std::map<int64_t, DistComm>& dist_comms();

// The local structure of a distributed pattern, registered at trace time.
struct DistPattern {
  int64_t n_global = 0;
  std::vector<int64_t> offsets, gcols;
  std::vector<int32_t> indptr;
  int32_t block_size = 1;
  int n_local() const { return static_cast<int>(indptr.size()) - 1; }
  int nnz() const { return static_cast<int>(gcols.size()); }
};

// Registered distributed patterns, by (communicator key, fingerprint).
std::map<std::pair<int64_t, int64_t>, std::shared_ptr<const DistPattern>>&
dist_patterns();

// The registered communicator `comm_key`, its duplicates made on first use
// (collective); refused once the ranks fell out of step.
DistComm& dist_comm(int64_t comm_key);

// After a step that may have failed on some ranks: every rank learns whether any
// did, and raises (the failing rank with its own message). Collective.
void agree_no_error(DistComm& c, const std::string& err, const char* what);

// Collective. Reads `ok` and the token from the device, agrees with the other
// ranks (every rank's cache probe: the worst wins; non-finite input anywhere;
// errors; and that all run the same call, by `signature`), then sets up or resets
// up together. Returns nullptr when some rank has non-finite input (AmgX is not
// called on any rank). `*isolated` (when given) is whether some rank's cache is
// in isolated mode (capacity 0), agreed with the rest: then a setup call
// (`setup_only`) keeps nothing and returns nullptr, and the caller of a solve
// removes the entry afterwards, on every rank.
DistEntry* dist_acquire(const ContextScope& scope, CUstream stream, int64_t comm_key,
                        int64_t fingerprint, int64_t signature, int64_t site,
                        std::string_view config, int32_t mode, int32_t transposed,
                        CUdeviceptr values, size_t bytes, CUdeviceptr ok_ptr,
                        CUdeviceptr token_ptr, const char* what,
                        bool* isolated = nullptr, bool setup_only = false);

// After a solve with `e` that may have failed on some ranks (`err` non-empty
// here): every rank learns whether any did; if so (or when `evict`, isolated
// mode) every rank removes its part of the entry, and on failure raises.
// Collective.
void finish_dist_solve(DistComm& c, const DistEntry* e, const std::string& err,
                       bool evict);

}  // namespace lxa
