// Copyright 2026 The lineax-amgx authors. Licensed under the Apache License, Version 2.0.
//
// The distributed cache: one rank's rows of a matrix partitioned over MPI ranks,
// uploaded through AmgX's distribution API. Called from Python host callbacks that
// the package's sequencer runs in the same order on every rank, or from the
// distributed FFI handlers after the ranks agreed (dist_handlers.cc); every
// function here that touches AmgX is collective over the communicator.
#pragma once

#include <cstddef>
#include <cstdint>
#include <list>
#include <memory>
#include <vector>

#include "amgx_api.h"
#include "codes.h"
#include "device.h"
#include "entry.h"
#include "resources.h"

namespace lxa {

struct DistEntry {
  int32_t id = 0;
  int32_t generation = 0;
  Key key;
  int n_local = 0, nnz = 0, block_size = 1;
  int64_t n_global = 0;
  // An exact copy of the values the setup used: on the host (host-callback path)
  // or on the device (FFI path: compared there).
  std::vector<unsigned char> values;
  DeviceBuffer dvalues;
  ConfigOwner cfg;
  DistributionOwner dist;
  MatrixOwner matrix;
  VectorOwner rhs, sol;
  SolverOwner solver;
  Counters counters;
  double last_setup_seconds = 0, last_solve_seconds = 0;
  double total_setup_seconds = 0, total_solve_seconds = 0;
  ~DistEntry() {
    dvalues.reset();
    solver.reset();
    sol.reset();
    rhs.reset();
    matrix.reset();
    dist.reset();
    cfg.reset();
  }
};

// The distributed cache. One entry per key (every rank must act on the same
// logical entry in a collective resetup); least recently used first out. Every
// change happens inside a collective call, in the same order on every rank, so
// the ranks' caches stay identical (eviction included). Leaked at exit.
class DistCache {
 public:
  static DistCache& get();
  Counters totals;

  // kProbeHit: an entry with `key` holds exactly `values` (or is the token's
  // entry); kProbeResetup: an entry with `key` exists; kProbeSetup: no entry.
  int probe(const Key& key, const void* values, size_t bytes, int32_t id, int32_t gen,
            int32_t* out_id, int32_t* out_gen);

  // `probe` for values on the device (the FFI path; `stream` is XLA's).
  int probe_device(const Key& key, CUdeviceptr values, size_t bytes, int32_t id,
                   int32_t gen, CUstream stream);

  // The entry (id, generation), or nullptr.
  DistEntry* find(int32_t id, int32_t gen);

  // Collective. `action` is the ranks' agreed probe result (the maximum).
  DistEntry* acquire(int action, const Key& key, uintptr_t comm_ptr,
                     int64_t n_global, const int64_t* offsets, int n_local,
                     const int32_t* indptr, const int64_t* gcols, int nnz, int block_size,
                     const void* values, size_t bytes, size_t capacity,
                     ResetupMode resetup_mode, CUdeviceptr dev_values = 0,
                     CUstream stream = nullptr);

  // Collective.
  void solve(DistEntry& e, const void* b, const void* x0, void* x, int32_t* status,
             int32_t* iterations, double* residual);

  // Collective over the entry's communicator (AmgX destroys its objects with
  // MPI); with `destroy` false the entry is leaked instead (its communicator is
  // out of step: a collective destroy could never complete). Counted as an
  // eviction. Every rank removes its part of the same entry (a failed solve,
  // isolated mode), after the ranks agreed.
  void remove(const DistEntry* e, bool destroy = true);

  // Collective over every communicator that has entries (`comm` < 0), or over
  // the communicator `comm` (its entries only).
  void clear(int64_t comm = -1);

  // Leaks every entry and the distributed resources (finalize with live entries).
  void abandon();

  const std::list<std::unique_ptr<DistEntry>>& entries() const { return entries_; }

 private:
  static void keep_values(DistEntry& e, const void* values, size_t bytes,
                          CUdeviceptr dev_values, CUstream stream);
  void touch(std::list<std::unique_ptr<DistEntry>>::iterator it) {
    entries_.splice(entries_.begin(), entries_, it);
  }
  std::list<std::unique_ptr<DistEntry>> entries_;
  int32_t next_id_ = 1;
};

}  // namespace lxa
