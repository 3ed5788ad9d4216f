// Copyright 2026 The lineax-amgx authors. Licensed under the Apache License, Version 2.0.
//
// The single-process resource cache (see cache.h).

#include "cache.h"

#include <algorithm>
#include <chrono>
#include <iterator>
#include <string>

namespace lxa {

std::map<int64_t, std::shared_ptr<const Pattern>>& patterns() {
  static auto* p = new std::map<int64_t, std::shared_ptr<const Pattern>>();
  return *p;
}

std::shared_ptr<const Pattern> find_pattern(int64_t fingerprint) {
  auto it = patterns().find(fingerprint);
  if (it == patterns().end())
    throw Failure("internal: sparsity pattern " + std::to_string(fingerprint) +
                  " is not registered with the native core");
  return it->second;
}

Cache& Cache::get() {
  static Cache* c = new Cache();  // leaked on purpose: no teardown at exit
  return *c;
}

Entry* Cache::find_token(const Key& key, int32_t id, int32_t generation) {
  for (auto it = entries_.begin(); it != entries_.end(); ++it) {
    Entry* e = it->get();
    if (e->id == id) {
      if (e->generation == generation && e->key == key) {
        touch(it);
        return e;
      }
      return nullptr;
    }
  }
  return nullptr;
}

Entry* Cache::acquire(const Key& key, std::shared_ptr<const Pattern> pattern,
                      CUdeviceptr values, size_t value_bytes, CUstream stream) {
  std::vector<std::list<std::unique_ptr<Entry>>::iterator> same_key;
  for (auto it = entries_.begin(); it != entries_.end(); ++it)
    if ((*it)->key == key) same_key.push_back(it);
  for (auto it : same_key) {
    Entry* e = it->get();
    if (e->value_bytes == value_bytes &&
        device_equal(key.device, e->values.ptr, values, value_bytes, stream)) {
      ++e->counters.hits;
      ++totals.hits;
      touch(it);
      return e;
    }
  }
  ++totals.misses;
  if (!same_key.empty() && same_key.size() >= entries_per_key) {
    auto it = same_key.back();  // least recently used of this key
    Entry* e = it->get();
    try {
      resetup(*e, values, stream);
    } catch (...) {
      ++totals.evictions;
      dispose(*it);  // unknown AmgX state: drop the entry
      entries_.erase(it);
      throw;
    }
    touch(it);
    return e;
  }
  std::unique_ptr<Entry> fresh = create(key, std::move(pattern), values, value_bytes,
                                        stream);
  ++fresh->counters.misses;
  entries_.push_front(std::move(fresh));
  evict_to(capacity == 0 ? 1 : capacity, entries_.front().get());
  return entries_.front().get();
}

std::unique_ptr<Entry> Cache::create(const Key& key,
                                     std::shared_ptr<const Pattern> pattern,
                                     CUdeviceptr values, size_t value_bytes,
                                     CUstream stream) {
  auto e = std::make_unique<Entry>();
  try {
    fill(*e, key, std::move(pattern), values, value_bytes, stream);
  } catch (...) {
    dispose(e);
    throw;
  }
  return e;
}

void Cache::fill(Entry& entry, const Key& key, std::shared_ptr<const Pattern> pattern,
                 CUdeviceptr values, size_t value_bytes, CUstream stream) {
  Entry* e = &entry;
  e->id = next_id_++;
  e->key = key;
  e->pattern = std::move(pattern);
  const Pattern& p = *e->pattern;
  e->n = static_cast<int>(p.block_rows);
  e->nnz = static_cast<int>(p.indices.size());
  e->value_bytes = value_bytes;
  size_t free_before = 0, total = 0;
  api().cuMemGetInfo_v2(&free_before, &total);
  auto t0 = std::chrono::steady_clock::now();
  ensure_device(key.device);
  create_handles(*e, resources_for(key.device));
  LXA_AMGX(AMGX_matrix_upload_all(e->matrix.h, e->n, e->nnz, p.block_size,
                                  p.block_size, p.indptr.data(), p.indices.data(),
                                  reinterpret_cast<const void*>(values), nullptr));
  bind_and_setup(*e);
  e->last_setup_seconds = seconds_since(t0);
  e->total_setup_seconds += e->last_setup_seconds;
  e->values.allocate(value_bytes);
  LXA_CU(cuMemcpyDtoDAsync_v2(e->values.ptr, values, value_bytes, stream));
  LXA_CU(cuStreamSynchronize(stream));
  size_t free_after = 0;
  api().cuMemGetInfo_v2(&free_after, &total);
  e->gpu_bytes = static_cast<int64_t>(free_before) - static_cast<int64_t>(free_after);
  ++e->counters.setups;
  ++totals.setups;
  take_captured();
}

void Cache::resetup(Entry& e, CUdeviceptr values, CUstream stream) {
  e.last_setup_seconds = run_amgx_resetup(
      e, e.n, e.nnz, reinterpret_cast<const void*>(values), resetup_mode);
  e.total_setup_seconds += e.last_setup_seconds;
  LXA_CU(cuMemcpyDtoDAsync_v2(e.values.ptr, values, e.value_bytes, stream));
  LXA_CU(cuStreamSynchronize(stream));
  ++e.generation;
  ++e.counters.resetups;
  ++totals.resetups;
  take_captured();
}

void Cache::solve(Entry& e, CUdeviceptr b, CUdeviceptr x0, bool has_x0, CUdeviceptr x,
                  int32_t* status, int32_t* iterations, double* residual) {
  e.last_solve_seconds = run_amgx_solve(
      e.solver.h, e.rhs.h, e.sol.h, e.n, e.pattern->block_size,
      reinterpret_cast<const void*>(b),
      has_x0 ? reinterpret_cast<const void*>(x0) : nullptr, reinterpret_cast<void*>(x),
      status, iterations, residual);
  e.total_solve_seconds += e.last_solve_seconds;
  ++e.counters.solves;
  ++totals.solves;
  take_captured();
}

// AmgX 2.5 keeps one cuBLAS and one cuSPARSE handle per process (static
// singletons), created on the device current at their first use and destroyed
// with any resources object. Entries on two devices at once would run one
// device's work with the other's handle (CUBLAS_STATUS_INTERNAL_ERROR in the
// first solve on the second device: 2 x H200, 2026-11-28). So the process uses
// AmgX on one device at a time: a setup on another device first drops every
// entry and the resources of the old one (the handles go with them, and AmgX
// creates them again on the new device). Switching back and forth therefore
// costs a setup each time (`device_switches` counts the switches).
void Cache::ensure_device(CUdevice device) {
  std::vector<CUdevice> others;
  for (const auto& item : resources()) {
    if (item.first.first == device) continue;
    if (item.first.second != 0)
      throw Failure(
          "AmgX holds distributed setups on CUDA device " +
          std::to_string(item.first.first) + " of this process; AmgX 2.5 uses " +
          "one device per process (its cuBLAS/cuSPARSE handles are per process), so "
          "a single-process solve on device " + std::to_string(device) +
          " cannot run next to them. Use one device per process, or call "
          "lineax_amgx.finalize() first.");
    if (std::find(others.begin(), others.end(), item.first.first) == others.end())
      others.push_back(item.first.first);
  }
  if (others.empty()) return;
  Api& a = api();
  for (CUdevice old : others) {
    CUcontext ctx = nullptr;
    bool pushed = a.cuDevicePrimaryCtxRetain(&ctx, old) == 0;
    if (pushed) a.cuCtxPushCurrent_v2(ctx);
    for (auto it = entries_.begin(); it != entries_.end();) {
      if ((*it)->key.device == old) {
        dispose(*it);
        it = entries_.erase(it);
        ++totals.evictions;
      } else {
        ++it;
      }
    }
    release_resources(false, false, old);
    if (pushed) {
      CUcontext popped;
      a.cuCtxPopCurrent_v2(&popped);
      a.cuDevicePrimaryCtxRelease_v2(old);
    }
  }
  ++device_switches;
}

void Cache::remove(Entry* e) {
  for (auto it = entries_.begin(); it != entries_.end(); ++it)
    if (it->get() == e) {
      dispose(*it);
      entries_.erase(it);
      return;
    }
}

void Cache::evict_to(size_t n, Entry* keep) {
  while (entries_.size() > n) {
    auto it = std::prev(entries_.end());
    if (it->get() == keep) {
      if (entries_.size() == 1) break;
      it = std::prev(it);
    }
    dispose(*it);
    entries_.erase(it);
    ++totals.evictions;
  }
}

void Cache::clear() {
  for (auto& e : entries_) dispose(e);
  entries_.clear();
  release_resources(false);
}

}  // namespace lxa
