// Copyright 2026 The lineax-amgx authors. Licensed under the Apache License, Version 2.0.
//
// The ranks' agreements of the device-resident distributed path (see dist_comm.h).

#include "dist_comm.h"

#include <chrono>
#include <thread>

#include "cache.h"
#include "codes.h"
#include "entry.h"

namespace lxa {

MpiApi& mpi_api() {
  static auto* m = new MpiApi();
  return *m;
}

std::map<int64_t, DistComm>& dist_comms() {
  static auto* c = new std::map<int64_t, DistComm>();
  return *c;
}

std::map<std::pair<int64_t, int64_t>, std::shared_ptr<const DistPattern>>&
dist_patterns() {
  static auto* p =
      new std::map<std::pair<int64_t, int64_t>, std::shared_ptr<const DistPattern>>();
  return *p;
}

DistComm& dist_comm(int64_t comm_key) {
  auto it = dist_comms().find(comm_key);
  if (it == dist_comms().end())
    throw Failure("internal: communicator " + std::to_string(comm_key) +
                  " is not registered with the native core");
  DistComm& c = it->second;
  if (!c.broken.empty()) throw Failure(c.broken);
  if (c.amgx == nullptr) {
    MpiApi& m = mpi_api();
    uint64_t agree = 0;
    auto* amgx = new uint64_t(0);
    int rc = m.comm_dup(c.user, &agree);
    if (rc == 0) rc = m.comm_dup(c.user, amgx);
    if (rc != 0) {
      delete amgx;
      throw Failure("MPI_Comm_dup failed with error code " + std::to_string(rc));
    }
    c.agree = static_cast<uintptr_t>(agree);
    c.amgx = amgx;
  }
  return c;
}

namespace {

// A 64-bit mix (splitmix64's finaliser) for call signatures.
uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Collective over the agreement communicator: `out` = element-wise maximum over
// the ranks of `in` (`n` int64). Polls, so that a rank whose partners never come
// raises after the timeout instead of waiting forever.
void agree_max(DistComm& c, const int64_t* in, int64_t* out, int n,
               const char* what) {
  MpiApi& m = mpi_api();
  alignas(16) unsigned char request[64] = {};  // MPI_Request: a pointer or an int
  alignas(16) unsigned char status[256];       // MPI_Status: 20-24 bytes
  int rc = m.iallreduce(in, out, n, m.int64_type, m.max_op, c.agree, request);
  if (rc != 0) throw Failure("MPI_Iallreduce failed with error code " + std::to_string(rc));
  auto t0 = std::chrono::steady_clock::now();
  for (int spins = 0;; ++spins) {
    int flag = 0;
    rc = m.test(request, &flag, status);
    if (rc != 0) throw Failure("MPI_Test failed with error code " + std::to_string(rc));
    if (flag) return;
    if (m.timeout > 0 && seconds_since(t0) > m.timeout) {
      // The allreduce stays pending: this communicator is out of step for good.
      c.broken = "waited " + std::to_string(static_cast<int>(m.timeout)) +
                 " s for the other ranks in a distributed AmgX " + what +
                 " (LINEAX_AMGX_MPI_TIMEOUT): the ranks do not run the same "
                 "distributed operations in the same order, or one of them failed "
                 "or stopped. Distributed AmgX solves on this communicator are "
                 "disabled in this process.";
      throw Failure(c.broken);
    }
    if (spins > 1000) std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

// Raised on every rank once the ranks agree that some rank failed: the failing
// rank's own message, or on the others a pointer to it.
[[noreturn]] void raise_agreed_failure(const std::string& err, const char* what) {
  throw Failure(err.empty() ? std::string("distributed AmgX ") + what +
                                  " failed on another rank (see its error)"
                            : err);
}

}  // namespace

void agree_no_error(DistComm& c, const std::string& err, const char* what) {
  int64_t mine = err.empty() ? 0 : 1, any = 0;
  agree_max(c, &mine, &any, 1, what);
  if (any) raise_agreed_failure(err, what);
}

DistEntry* dist_acquire(const ContextScope& scope, CUstream stream, int64_t comm_key,
                        int64_t fingerprint, int64_t signature, int64_t site,
                        std::string_view config, int32_t mode, int32_t transposed,
                        CUdeviceptr values, size_t bytes, CUdeviceptr ok_ptr,
                        CUdeviceptr token_ptr, const char* what, bool* isolated,
                        bool setup_only) {
  DistComm& c = dist_comm(comm_key);
  std::shared_ptr<const DistPattern> p;
  Key key{};
  // What this call is, the same on every rank for the same call: the operator,
  // configuration and direction (`signature`), the program point (`site`) and
  // how many times this rank has run it. Ranks that reach different calls fail
  // here, together, instead of letting AmgX mix two solves.
  int64_t count = c.executions[site]++;
  int64_t sig = static_cast<int64_t>(
      mix(mix(static_cast<uint64_t>(signature)) ^ mix(static_cast<uint64_t>(site) + 1) ^
          mix(static_cast<uint64_t>(count) + 2)) >> 2);
  // (probe, non-finite, error, signature, -signature, isolated mode)
  int64_t mine[6] = {kProbeSetup, 0, 0, sig, -sig,
                     Cache::get().isolated() ? 1 : 0};
  std::string err;
  try {
    if (!poisoned().empty()) throw Failure(poisoned());
    auto it = dist_patterns().find({comm_key, fingerprint});
    if (it == dist_patterns().end())
      throw Failure("internal: distributed pattern " + std::to_string(fingerprint) +
                    " is not registered with the native core");
    p = it->second;
    key = Key{scope.device, fingerprint, p->block_size, mode, std::string(config),
              transposed != 0, comm_key};
    size_t want = static_cast<size_t>(p->nnz()) * p->block_size * p->block_size *
                  element_size(mode, true);
    if (bytes != want)
      throw Failure("values buffer has " + std::to_string(bytes) + " bytes, expected " +
                    std::to_string(want));
    int32_t host[3] = {0, -1, -1};  // ok, token id, token generation
    LXA_CU(cuMemcpyDtoH_v2(&host[0], ok_ptr, sizeof(int32_t)));
    if (token_ptr != 0) LXA_CU(cuMemcpyDtoH_v2(&host[1], token_ptr, 2 * sizeof(int32_t)));
    mine[1] = host[0] == 0 ? 1 : 0;
    if (host[0] != 0)
      mine[0] = DistCache::get().probe_device(key, values, bytes, host[1], host[2], stream);
  } catch (const std::exception& e) {
    err = e.what();
    mine[2] = 1;
  }
  int64_t all[6];
  agree_max(c, mine, all, 6, what);
  if (all[2]) raise_agreed_failure(err, what);
  if (all[3] != -all[4])
    throw Failure(std::string("the ranks reached different distributed AmgX calls "
                              "(this rank: a ") + what +
                  "; another rank: a call from another program point, or with another "
                  "operator, configuration or transposition). Every rank must make the "
                  "same distributed solves in the same order. On GPUs XLA runs a "
                  "program's independent operations in an order fixed per rank at "
                  "compile time, which can differ between ranks whose programs differ "
                  "(uneven row counts): chain independent distributed operations with "
                  "lineax_amgx._distributed.after.");
  if (isolated != nullptr) *isolated = all[5] != 0;
  if (all[1]) return nullptr;
  // Isolated mode on some rank: a setup keeps nothing (the solve sets up and
  // removes its own entry), as in the single-process cache.
  if (all[5] && setup_only) return nullptr;
  DistEntry* e = nullptr;
  try {
    // A fresh setup goes through AmgX's distributed upload, which copies the
    // values with a host-side thrust::copy: stage them on the host. A resetup
    // (AMGX_matrix_replace_coefficients) reads device memory.
    std::vector<unsigned char> staged;
    const void* v = reinterpret_cast<const void*>(values);
    if (all[0] == kProbeSetup) {
      staged.resize(bytes);
      LXA_CU(cuMemcpyDtoH_v2(staged.data(), values, bytes));
      v = staged.data();
    }
    Cache& cache = Cache::get();
    e = DistCache::get().acquire(static_cast<int>(all[0]), key,
                                 reinterpret_cast<uintptr_t>(c.amgx), p->n_global,
                                 p->offsets.data(), p->n_local(), p->indptr.data(),
                                 p->gcols.data(), p->nnz(), p->block_size, v, bytes,
                                 cache.capacity, cache.resetup_mode, values, stream);
  } catch (const std::exception& ex) {
    err = std::string("AmgX distributed setup failed: ") + ex.what();
  }
  agree_no_error(c, err, what);
  return e;
}

void finish_dist_solve(DistComm& c, const DistEntry* e, const std::string& err,
                       bool evict) {
  int64_t mine = err.empty() ? 0 : 1, any = 0;
  try {
    agree_max(c, &mine, &any, 1, "solve");
  } catch (...) {
    // Out of step (a timeout): a collective destroy could never complete, so
    // the entry is leaked, not destroyed; the communicator is refused from now.
    if (e != nullptr) DistCache::get().remove(e, /*destroy=*/false);
    throw;
  }
  // AmgX's state after a failed solve is unknown (as in the single-process
  // cache): every rank drops its part of the entry, together (a collective
  // destroy); the next solve sets up afresh.
  if ((any || evict) && e != nullptr) DistCache::get().remove(e);
  if (any) raise_agreed_failure(err, "solve");
}

}  // namespace lxa
