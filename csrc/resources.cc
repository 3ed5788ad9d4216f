// Copyright 2026 The lineax-amgx authors. Licensed under the Apache License, Version 2.0.
//
// AmgX's resources objects (see resources.h).

#include "resources.h"

namespace lxa {

std::map<std::pair<CUdevice, int64_t>, std::unique_ptr<AmgxResources>>& resources() {
  static auto* r =
      new std::map<std::pair<CUdevice, int64_t>, std::unique_ptr<AmgxResources>>();
  return *r;
}

AMGX_resources_handle resources_for(CUdevice device, int64_t comm_key,
                                    uintptr_t comm_ptr) {
  auto& all = resources();
  auto k = std::make_pair(device, comm_key);
  auto it = all.find(k);
  if (it != all.end()) return it->second->rsrc.h;
  auto r = std::make_unique<AmgxResources>();
  // exception_handling=0: AmgX returns error codes (1 would make it exit()).
  LXA_AMGX(AMGX_config_create(&r->cfg.h, "config_version=2, exception_handling=0"));
  int dev = device;
  void* comm = comm_key != 0 ? reinterpret_cast<void*>(comm_ptr) : nullptr;
  LXA_AMGX(AMGX_resources_create(&r->rsrc.h, r->cfg.h, comm, 1, &dev));
  AMGX_resources_handle h = r->rsrc.h;
  all.emplace(k, std::move(r));
  return h;
}

// Resources taken out of use but not yet destroyed. Destroying *any* AmgX
// resources object destroys process-wide state that every other one shares:
// AmgX 2.5's `~Resources` frees all device and pinned memory pools and the
// cuBLAS/cuSPARSE handles. Entries on another resources object (a distributed
// entry next to single-process ones) would keep running on freed pool memory
// ("detected some memory leaks ... trying to free non-empty temporary device
// pool", 2 x H200, 2026-11-28). So resources are destroyed only when no entry is
// left anywhere; until then they wait here.
std::vector<std::pair<CUdevice, std::unique_ptr<AmgxResources>>>& retired_resources() {
  static auto* r = new std::vector<std::pair<CUdevice, std::unique_ptr<AmgxResources>>>();
  return *r;
}

namespace {

// Destroys the retired resources once no entry is left (leaks those whose
// device's context is broken: AmgX's destructors would then throw).
void collect_resources() {
  if (amgx_objects_alive()) return;
  for (auto& [device, r] : retired_resources()) {
    if (context_healthy(device))
      r.reset();
    else
      (void)r.release();
  }
  retired_resources().clear();
}

}  // namespace

void release_resources(bool distributed, bool leak, int device) {
  auto& all = resources();
  for (auto it = all.begin(); it != all.end();) {
    if ((it->first.second != 0) != distributed ||
        (device >= 0 && it->first.first != device)) {
      ++it;
      continue;
    }
    if (leak)
      (void)it->second.release();
    else
      retired_resources().emplace_back(it->first.first, std::move(it->second));
    it = all.erase(it);
  }
  if (!leak) collect_resources();
}

}  // namespace lxa
