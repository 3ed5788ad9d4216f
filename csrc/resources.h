// Copyright 2026 The lineax-amgx authors. Licensed under the Apache License, Version 2.0.
//
// RAII owners of AmgX handles, and AmgX's resources objects: one per (device,
// communicator), shared by the cache entries on them, destroyed only when no entry
// of either cache is left.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "amgx_api.h"
#include "loader.h"

namespace lxa {

template <typename H, AMGX_RC (*Api::*Destroy)(H)>
struct Owned {
  H h = nullptr;
  Owned() = default;
  Owned(const Owned&) = delete;
  Owned& operator=(const Owned&) = delete;
  ~Owned() { reset(); }
  void reset() {
    if (h && api().initialized) (api().*Destroy)(h);
    h = nullptr;
  }
};

using ConfigOwner = Owned<AMGX_config_handle, &Api::AMGX_config_destroy>;
using ResourcesOwner = Owned<AMGX_resources_handle, &Api::AMGX_resources_destroy>;
using MatrixOwner = Owned<AMGX_matrix_handle, &Api::AMGX_matrix_destroy>;
using VectorOwner = Owned<AMGX_vector_handle, &Api::AMGX_vector_destroy>;
using SolverOwner = Owned<AMGX_solver_handle, &Api::AMGX_solver_destroy>;
using DistributionOwner =
    Owned<AMGX_distribution_handle, &Api::AMGX_distribution_destroy>;

// One set of AmgX resources per (device, communicator), shared by the entries on
// them. `comm_key` 0: a single process (no communicator). A distributed set keeps
// the MPI_Comm* it was given: the Python side passes the address of a
// communicator it keeps alive (its own Dup of the user's).
struct AmgxResources {
  ConfigOwner cfg;
  ResourcesOwner rsrc;
};

// The resources of (device, communicator); `comm_key` 0: a single process.
std::map<std::pair<CUdevice, int64_t>, std::unique_ptr<AmgxResources>>& resources();

// The resources of (device, `comm_key`), created on first use (a distributed set
// on the communicator at `comm_ptr`).
AMGX_resources_handle resources_for(CUdevice device, int64_t comm_key = 0,
                                    uintptr_t comm_ptr = 0);

// Resources taken out of use, waiting for the last entry to go (see resources.cc).
std::vector<std::pair<CUdevice, std::unique_ptr<AmgxResources>>>& retired_resources();

// Takes the single-process (`distributed` false) or the distributed resources (of
// every device, or of `device`) out of use: retired, and destroyed as soon as no
// entry is left; or leaked when `leak` (their entries were abandoned).
void release_resources(bool distributed, bool leak = false, int device = -1);

// Whether either cache holds an entry (defined with the caches, in dist_cache.cc).
bool amgx_objects_alive();

}  // namespace lxa
