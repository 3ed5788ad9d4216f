// Copyright 2026 The lineax-amgx authors. Licensed under the Apache License, Version 2.0.
//
// The distributed cache (see dist_cache.h).

#include "dist_cache.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <string>

#include "cache.h"

namespace lxa {

DistCache& DistCache::get() {
  static DistCache* c = new DistCache();
  return *c;
}

int DistCache::probe(const Key& key, const void* values, size_t bytes, int32_t id,
                     int32_t gen, int32_t* out_id, int32_t* out_gen) {
  for (auto& e : entries_) {
    if (!(e->key == key)) continue;
    bool same = (id > 0 && e->id == id && e->generation == gen) ||
                (values != nullptr && e->values.size() == bytes &&
                 std::memcmp(e->values.data(), values, bytes) == 0);
    *out_id = e->id;
    *out_gen = e->generation;
    return same ? kProbeHit : kProbeResetup;
  }
  *out_id = -1;
  *out_gen = -1;
  return kProbeSetup;
}

int DistCache::probe_device(const Key& key, CUdeviceptr values, size_t bytes,
                            int32_t id, int32_t gen, CUstream stream) {
  for (auto& e : entries_) {
    if (!(e->key == key)) continue;
    bool same = (id > 0 && e->id == id && e->generation == gen) ||
                (e->dvalues.ptr != 0 && e->dvalues.bytes == bytes &&
                 device_equal(key.device, e->dvalues.ptr, values, bytes, stream));
    return same ? kProbeHit : kProbeResetup;
  }
  return kProbeSetup;
}

DistEntry* DistCache::find(int32_t id, int32_t gen) {
  for (auto it = entries_.begin(); it != entries_.end(); ++it)
    if ((*it)->id == id && (*it)->generation == gen) {
      touch(it);
      return it->get();
    }
  return nullptr;
}

DistEntry* DistCache::acquire(int action, const Key& key, uintptr_t comm_ptr,
                              int64_t n_global, const int64_t* offsets, int n_local,
                              const int32_t* indptr, const int64_t* gcols, int nnz,
                              int block_size, const void* values, size_t bytes,
                              size_t capacity, ResetupMode resetup_mode,
                              CUdeviceptr dev_values, CUstream stream) {
  // Every rank has the same block size (one global pattern): all refuse together.
  check_gpu_block_size(block_size);
  auto it = entries_.begin();
  for (; it != entries_.end(); ++it)
    if ((*it)->key == key) break;
  if (!(action == kProbeHit && it != entries_.end())) {
    // A (re)setup reads the values (a hit need not: the caller may pass none).
    size_t want = static_cast<size_t>(nnz) * block_size * block_size *
                  element_size(key.mode, true);
    if (bytes != want)
      throw Failure("internal: a distributed (re)setup got " + std::to_string(bytes) +
                    " bytes of values, expected " + std::to_string(want));
  }
  if (action == kProbeHit && it != entries_.end()) {
    ++(*it)->counters.hits;
    ++totals.hits;
    touch(it);
    return entries_.front().get();
  }
  ++totals.misses;
  if (action == kProbeResetup && it != entries_.end()) {
    DistEntry& e = **it;
    try {
      e.last_setup_seconds = run_amgx_resetup(e, e.n_local, e.nnz, values, resetup_mode);
    } catch (...) {
      dispose(*it);
      entries_.erase(it);
      throw;
    }
    keep_values(e, values, bytes, dev_values, stream);
    e.total_setup_seconds += e.last_setup_seconds;
    ++e.generation;
    ++e.counters.misses;
    ++e.counters.resetups;
    ++totals.resetups;
    touch(it);
    take_captured();
    return entries_.front().get();
  }
  if (it != entries_.end()) {  // some rank had no entry: everyone starts afresh
    dispose(*it);
    entries_.erase(it);
  }
  Api& a = api();
  if (!a.AMGX_distribution_create || !a.AMGX_distribution_set_partition_data ||
      !a.AMGX_matrix_upload_distributed)
    throw Failure("this AmgX library has no distribution API "
                  "(AMGX_matrix_upload_distributed): distributed solves need AmgX "
                  ">= 2.2 built with MPI");
  auto e = std::make_unique<DistEntry>();
  e->id = next_id_++;
  e->key = key;
  e->n_local = n_local;
  e->nnz = nnz;
  e->block_size = block_size;
  e->n_global = n_global;
  auto t0 = std::chrono::steady_clock::now();
  try {
    create_handles(*e, resources_for(key.device, key.comm, comm_ptr));
    LXA_AMGX(AMGX_distribution_create(&e->dist.h, e->cfg.h));
    LXA_AMGX(AMGX_distribution_set_partition_data(e->dist.h, AMGX_DIST_PARTITION_OFFSETS,
                                                  offsets));
    LXA_AMGX(AMGX_matrix_upload_distributed(
        e->matrix.h, static_cast<int>(n_global), n_local, nnz, block_size, block_size,
        indptr, gcols, values, nullptr, e->dist.h));
    bind_and_setup(*e);
  } catch (...) {
    dispose(e);
    throw;
  }
  try {
    keep_values(*e, values, bytes, dev_values, stream);
  } catch (...) {
    dispose(e);
    throw;
  }
  e->last_setup_seconds = seconds_since(t0);
  e->total_setup_seconds += e->last_setup_seconds;
  ++e->counters.misses;
  ++e->counters.setups;
  ++totals.setups;
  entries_.push_front(std::move(e));
  size_t keep = std::max<size_t>(capacity, 1);
  while (entries_.size() > keep) {
    dispose(entries_.back());
    entries_.pop_back();
    ++totals.evictions;
  }
  take_captured();
  return entries_.front().get();
}

void DistCache::solve(DistEntry& e, const void* b, const void* x0, void* x,
                      int32_t* status, int32_t* iterations, double* residual) {
  // A zero initial guess is uploaded, not set: AMGX_vector_set_zero sizes the
  // vector to the local rows and ignores the distributed manager, so the solve
  // then fails "Vector size too small: not enough space for halo elements"
  // (2 x H200, 2026-11-28); AMGX_vector_upload goes through the manager.
  std::vector<char> zeros;
  if (x0 == nullptr) {
    zeros.assign(static_cast<size_t>(e.n_local) * e.block_size *
                     element_size(e.key.mode, false),
                 0);
    x0 = zeros.data();
  }
  e.last_solve_seconds = run_amgx_solve(e.solver.h, e.rhs.h, e.sol.h, e.n_local,
                                        e.block_size, b, x0, x, status, iterations,
                                        residual);
  e.total_solve_seconds += e.last_solve_seconds;
  ++e.counters.solves;
  ++totals.solves;
  take_captured();
}

void DistCache::remove(const DistEntry* e, bool destroy) {
  for (auto it = entries_.begin(); it != entries_.end(); ++it) {
    if (it->get() != e) continue;
    if (destroy)
      dispose(*it);
    else
      (void)it->release();
    entries_.erase(it);
    ++totals.evictions;
    return;
  }
}

void DistCache::clear(int64_t comm) {
  for (auto it = entries_.begin(); it != entries_.end();) {
    if (comm >= 0 && (*it)->key.comm != comm) {
      ++it;
      continue;
    }
    // Its device's context current (the device copy of the values is freed).
    std::unique_ptr<PrimaryContextScope> scope;
    if (context_healthy((*it)->key.device))
      scope = std::make_unique<PrimaryContextScope>(static_cast<int>((*it)->key.device));
    dispose(*it);
    it = entries_.erase(it);
  }
  if (entries_.empty()) release_resources(true);
}

void DistCache::abandon() {
  for (auto& e : entries_) (void)e.release();
  entries_.clear();
  release_resources(true, /*leak=*/true);
}

// Keeps the exact values of a (re)setup: a device copy when they came from the
// device (`dev_values`, copied on `stream`), else a host copy.
void DistCache::keep_values(DistEntry& e, const void* values, size_t bytes,
                            CUdeviceptr dev_values, CUstream stream) {
  if (dev_values != 0) {
    e.values.clear();
    e.values.shrink_to_fit();
    if (e.dvalues.bytes != bytes) e.dvalues.allocate(bytes);
    LXA_CU(cuMemcpyDtoDAsync_v2(e.dvalues.ptr, dev_values, bytes, stream));
    LXA_CU(cuStreamSynchronize(stream));
  } else {
    e.dvalues.reset();
    e.values.assign(static_cast<const unsigned char*>(values),
                    static_cast<const unsigned char*>(values) + bytes);
  }
}

bool amgx_objects_alive() {
  return !Cache::get().entries().empty() || !DistCache::get().entries().empty();
}

}  // namespace lxa
