// Copyright 2026 The lineax-amgx authors. Licensed under the Apache License, Version 2.0.
//
// The single-process resource cache: an LRU of AmgX setups keyed by (device,
// pattern, block size, mode, config, direction), several entries per key when
// operators alternate; and the host CSR structures registered from Python that
// its entries are built from.
#pragma once

#include <cstddef>
#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <vector>

#include "amgx_api.h"
#include "device.h"
#include "entry.h"
#include "resources.h"

namespace lxa {

// ------------------------------------------------------------------------------
// Patterns registered from Python (host CSR structure, by fingerprint).
// ------------------------------------------------------------------------------

struct Pattern {
  std::vector<int32_t> indptr, indices;
  int64_t block_rows = 0, block_cols = 0;
  int32_t block_size = 1;
};

std::map<int64_t, std::shared_ptr<const Pattern>>& patterns();

// The registered pattern `fingerprint` (an internal error when there is none).
std::shared_ptr<const Pattern> find_pattern(int64_t fingerprint);

// ------------------------------------------------------------------------------
// The cache.
// ------------------------------------------------------------------------------

struct Entry {
  int32_t id = 0;
  int32_t generation = 0;
  Key key;
  std::shared_ptr<const Pattern> pattern;
  int n = 0, nnz = 0;
  size_t value_bytes = 0;
  // Destroyed in reverse order of declaration: solver, vectors, matrix, config.
  ConfigOwner cfg;
  MatrixOwner matrix;
  VectorOwner rhs, sol;
  SolverOwner solver;
  DeviceBuffer values;  // exact copy of the values the setup used
  Counters counters;
  double last_setup_seconds = 0, last_solve_seconds = 0;
  double total_setup_seconds = 0, total_solve_seconds = 0;
  int64_t gpu_bytes = 0;
  ~Entry() {
    // Explicit order: the solver references the matrix and vectors.
    solver.reset();
    sol.reset();
    rhs.reset();
    matrix.reset();
    cfg.reset();
  }
};

// Mutex-protected by core_mutex(); leaked at exit (no teardown).
class Cache {
 public:
  static Cache& get();

  size_t capacity = 8;
  size_t entries_per_key = 1;
  ResetupMode resetup_mode = ResetupMode::kResetup;
  Counters totals;
  int64_t device_switches = 0;

  bool isolated() const { return capacity == 0; }

  // The entry named by a setup token (id, generation) if it is still resident and
  // has `key`, else nullptr.
  Entry* find_token(const Key& key, int32_t id, int32_t generation);

  // The entry for `key` holding exactly `values` (setting up or resetting up as
  // needed). Values are on the device; `stream` is XLA's stream (synchronised).
  Entry* acquire(const Key& key, std::shared_ptr<const Pattern> pattern,
                 CUdeviceptr values, size_t value_bytes, CUstream stream);

  // A fresh entry, set up, not in the cache (isolated mode; `acquire` on a miss).
  std::unique_ptr<Entry> create(const Key& key, std::shared_ptr<const Pattern> pattern,
                                CUdeviceptr values, size_t value_bytes,
                                CUstream stream);

  void solve(Entry& e, CUdeviceptr b, CUdeviceptr x0, bool has_x0, CUdeviceptr x,
             int32_t* status, int32_t* iterations, double* residual);

  // Drops `e` (its AmgX state is unknown after a failure).
  void remove(Entry* e);

  // Evicts least recently used entries down to `n` (never `keep`).
  void evict_to(size_t n, Entry* keep = nullptr);

  void clear();

  const std::list<std::unique_ptr<Entry>>& entries() const { return entries_; }

 private:
  void fill(Entry& entry, const Key& key, std::shared_ptr<const Pattern> pattern,
            CUdeviceptr values, size_t value_bytes, CUstream stream);
  void resetup(Entry& e, CUdeviceptr values, CUstream stream);
  void ensure_device(CUdevice device);
  void touch(std::list<std::unique_ptr<Entry>>::iterator it) {
    entries_.splice(entries_.begin(), entries_, it);
  }
  std::list<std::unique_ptr<Entry>> entries_;  // most recently used first
  int32_t next_id_ = 1;
};

}  // namespace lxa
