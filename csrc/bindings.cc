// Copyright 2026 The lineax-amgx authors. Licensed under the Apache License, Version 2.0.
//
// The Python module lineax_amgx._native (nanobind): the FFI handlers as capsules,
// pattern registration, loading, cache control and introspection, the host-callback
// entry points of the distributed cache, and the shared codes of codes.h. Its
// type stub is lineax_amgx/_native.pyi (checked by mypy's stubtest in CI).

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "amgx_api.h"
#include "cache.h"
#include "codes.h"
#include "device.h"
#include "dist_cache.h"
#include "dist_comm.h"
#include "handlers.h"
#include "loader.h"
#include "resources.h"
#include "runtime_arrays.h"

namespace nb = nanobind;

namespace {

template <typename T>
nb::capsule make_capsule(T* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

nb::dict counters_dict(const lxa::Counters& c) {
  nb::dict d;
#define LXA_COUNTER_ITEM(name) d[#name] = c.name;
  LXA_COUNTERS(LXA_COUNTER_ITEM)
#undef LXA_COUNTER_ITEM
  return d;
}

std::string mode_name(int32_t mode) {
  const lxa::ModeInfo* m = lxa::find_mode(mode);
  return m != nullptr ? std::string(m->name) : std::to_string(mode);
}

const char* resetup_mode_name(lxa::ResetupMode mode) {
  return lxa::kResetupModeNames[static_cast<int>(mode)];
}

// The tables of codes.h as module attributes (read by the Python package).
void export_codes(nb::module_& m) {
  for (const lxa::NamedCode& s : lxa::kStatuses)
    m.attr((std::string("STATUS_") + s.name).c_str()) = s.code;
  nb::dict modes, matrix_bytes, vector_bytes;
  for (const lxa::ModeInfo& mode : lxa::kModes) {
    modes[mode.name] = mode.id;
    matrix_bytes[mode.name] = mode.matrix_bytes;
    vector_bytes[mode.name] = mode.vector_bytes;
  }
  m.attr("MODES") = modes;
  m.attr("MODE_MATRIX_BYTES") = matrix_bytes;
  m.attr("MODE_VECTOR_BYTES") = vector_bytes;
  m.attr("MAX_GPU_BLOCK_SIZE") = lxa::kMaxGpuBlockSize;
  m.attr("PROBE_HIT") = static_cast<int32_t>(lxa::kProbeHit);
  m.attr("PROBE_RESETUP") = static_cast<int32_t>(lxa::kProbeResetup);
  m.attr("PROBE_SETUP") = static_cast<int32_t>(lxa::kProbeSetup);
  nb::dict targets;
  for (const lxa::FfiTarget& t :
       {lxa::kFfiSetup, lxa::kFfiSolve, lxa::kFfiDistSetup, lxa::kFfiDistSolve})
    targets[t.kind] = t.name;
  m.attr("FFI_TARGETS") = targets;
  m.attr("RUNTIME_ARRAY_TARGET") = lxa::kFfiRuntimeArray;
  nb::list counters;
#define LXA_COUNTER_NAME(name) counters.append(#name);
  LXA_COUNTERS(LXA_COUNTER_NAME)
#undef LXA_COUNTER_NAME
  m.attr("COUNTER_NAMES") = nb::tuple(counters);
  nb::list resetup_modes;
  for (const char* name : lxa::kResetupModeNames) resetup_modes.append(name);
  m.attr("RESETUP_MODES") = nb::tuple(resetup_modes);
}

}  // namespace

NB_MODULE(_native, m) {
  using namespace lxa;
  m.doc() = "Native core of lineax-amgx (AmgX loaded at run time).";
  export_codes(m);

  m.def("registrations", []() {
    nb::dict d;
    d[kFfiSetup.name] = make_capsule(LxaSetup);
    d[kFfiSolve.name] = make_capsule(LxaSolve);
    d[kFfiDistSetup.name] = make_capsule(LxaDistSetup);
    d[kFfiDistSolve.name] = make_capsule(LxaDistSolve);
    return d;
  });

  // ---- Runtime arrays (runtime_arrays.h) ----
  m.def("runtime_array_handlers", []() {
    nb::dict d;
    d["cpu"] = make_capsule(LxaRuntimeArrayCpu);
    d["CUDA"] = make_capsule(LxaRuntimeArrayCuda);
    return d;
  });

  // The core keeps the array's address: the caller keeps the array alive and
  // unchanged until unregister_runtime_array(key, token) returns. No conversion
  // (a converted temporary would be freed on return): a C-contiguous host array.
  m.def(
      "register_runtime_array",
      [](int64_t key, nb::ndarray<nb::ro, nb::c_contig, nb::device::cpu> array) {
        return register_runtime_array(key, array.data(), array.nbytes());
      },
      nb::arg("key"), nb::arg("array").noconvert());

  // Both may wait for work queued on a GPU (which may wait for a host callback):
  // without the GIL.
  m.def(
      "unregister_runtime_array",
      [](int64_t key, int64_t token) {
        nb::gil_scoped_release release;
        unregister_runtime_array(key, token);
      },
      nb::arg("key"), nb::arg("token"));

  m.def("release_runtime_array_copies", []() {
    nb::gil_scoped_release release;
    release_runtime_array_copies();
  });

  m.def("runtime_array_info", []() {
    RuntimeArrayStats s = runtime_array_stats();
    nb::dict d;
    d["arrays"] = s.arrays;
    d["registrations"] = s.registrations;
    d["host_bytes"] = s.host_bytes;
    d["device_copies"] = s.device_copies;
    d["device_bytes"] = s.device_bytes;
    d["uploads"] = s.uploads;
    return d;
  });

  m.def(
      "register_pattern",
      [](int64_t fingerprint, nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig> indptr,
         nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig> indices, int64_t block_rows,
         int64_t block_cols, int32_t block_size) {
        std::lock_guard<std::recursive_mutex> lock(core_mutex());
        if (patterns().count(fingerprint)) return;
        auto p = std::make_shared<Pattern>();
        p->indptr.assign(indptr.data(), indptr.data() + indptr.shape(0));
        p->indices.assign(indices.data(), indices.data() + indices.shape(0));
        p->block_rows = block_rows;
        p->block_cols = block_cols;
        p->block_size = block_size;
        patterns().emplace(fingerprint, std::move(p));
      },
      nb::arg("fingerprint"), nb::arg("indptr"), nb::arg("indices"), nb::arg("block_rows"),
      nb::arg("block_cols"), nb::arg("block_size"));

  m.def(
      "unregister_pattern",
      [](int64_t fingerprint) {
        std::lock_guard<std::recursive_mutex> lock(core_mutex());
        patterns().erase(fingerprint);  // entries keep their own reference
      },
      nb::arg("fingerprint"));

  m.def("num_patterns", []() {
    std::lock_guard<std::recursive_mutex> lock(core_mutex());
    return patterns().size();
  });

  m.def(
      "load",
      [](const std::string& path) {
        try {
          load_amgx(path);
        } catch (const Failure& e) {
          throw std::runtime_error(e.what());
        }
      },
      nb::arg("path"));

  m.def("is_loaded", []() { return api().amgx_handle != nullptr; });
  m.def("is_initialized", []() { return api().initialized; });
  // Why the process can no longer use AmgX (a broken CUDA context), or "".
  m.def("poisoned", []() { return poisoned(); });
  // Tests only: mark the process as if a CUDA fault had broken AmgX's context.
  m.def(
      "_poison_for_testing", [](const std::string& why) { mark_poisoned(why); },
      nb::arg("why"));

  m.def("library_info", []() {
    std::lock_guard<std::recursive_mutex> lock(core_mutex());
    nb::dict d;
    Api& a = api();
    d["loaded"] = a.amgx_handle != nullptr;
    d["path"] = a.amgx_path;
    d["error"] = a.load_error;
    d["initialized"] = a.initialized;
    d["resetup_available"] = a.AMGX_solver_resetup != nullptr;
    d["error_output_captured"] = a.error_output_hooked;
    d["context_error"] = poisoned();
    if (a.amgx_handle) {
      int major = 0, minor = 0;
      a.AMGX_get_api_version(&major, &minor);
      d["api_version"] = std::to_string(major) + "." + std::to_string(minor);
      char *version = nullptr, *date = nullptr, *time = nullptr;
      if (a.AMGX_get_build_info_strings(&version, &date, &time) == AMGX_RC_OK) {
        d["version"] = version ? std::string(version) : std::string();
        d["build_date"] = std::string(date ? date : "") + " " + (time ? time : "");
      }
    }
    return d;
  });

  m.def("cuda_devices", []() {
    std::lock_guard<std::recursive_mutex> lock(core_mutex());
    nb::list out;
    try {
      load_cuda_driver();
    } catch (const Failure& e) {
      throw std::runtime_error(e.what());
    }
    int count = 0;
    if (api().cuDeviceGetCount(&count) != 0) count = 0;
    for (int i = 0; i < count; ++i) {
      CUdevice dev;
      char name[256] = {0};
      if (api().cuDeviceGet(&dev, i) == 0) api().cuDeviceGetName(name, sizeof(name), dev);
      out.append(nb::str(name));
    }
    return out;
  });

  m.def("cache_info", []() {
    std::lock_guard<std::recursive_mutex> lock(core_mutex());
    Cache& c = Cache::get();
    nb::dict d;
    d["capacity"] = c.capacity;
    d["entries_per_key"] = c.entries_per_key;
    d["isolated"] = c.isolated();
    d["size"] = c.entries().size();
    d["resetup_mode"] = resetup_mode_name(c.resetup_mode);
    d["device_switches"] = c.device_switches;
    nb::dict totals = counters_dict(c.totals);
    for (auto item : totals) d[item.first] = item.second;
    nb::list entries;
    for (const auto& e : c.entries()) {
      nb::dict s;
      s["id"] = e->id;
      s["generation"] = e->generation;
      s["device"] = e->key.device;
      s["fingerprint"] = e->key.fingerprint;
      s["shape"] = nb::make_tuple(e->pattern->block_rows * e->pattern->block_size,
                                  e->pattern->block_cols * e->pattern->block_size);
      s["nnz"] = e->nnz;
      s["block_size"] = e->pattern->block_size;
      s["mode"] = mode_name(e->key.mode);
      s["transposed"] = e->key.transposed;
      s["config_digest"] = std::hash<std::string>{}(e->key.config);
      s["gpu_bytes"] = e->gpu_bytes;
      s["last_setup_seconds"] = e->last_setup_seconds;
      s["last_solve_seconds"] = e->last_solve_seconds;
      s["total_setup_seconds"] = e->total_setup_seconds;
      s["total_solve_seconds"] = e->total_solve_seconds;
      nb::dict counters = counters_dict(e->counters);
      for (auto item : counters) s[item.first] = item.second;
      entries.append(s);
    }
    d["entries"] = entries;
    return d;
  });

  m.def("reset_counters", []() {
    std::lock_guard<std::recursive_mutex> lock(core_mutex());
    Cache::get().totals = Counters{};
  });

  m.def("clear_cache", []() {
    std::lock_guard<std::recursive_mutex> lock(core_mutex());
    Cache::get().clear();
  });

  // ---- Distributed (MPI) entries; see DistCache. Collective where noted. ----
  // Inputs are read-only (host-callback operands are read-only NumPy arrays, which
  // a writable ndarray parameter refuses); outputs are written.
  using HostArray = nb::ndarray<nb::ro, nb::c_contig, nb::device::cpu>;
  using HostOut = nb::ndarray<nb::c_contig, nb::device::cpu>;

  m.def(
      "dist_probe",
      [](int32_t ordinal, int64_t comm_key, int64_t fingerprint, const std::string& config,
         int32_t mode, int32_t transposed, int32_t block_size, HostArray values,
         int32_t id, int32_t gen) {
        std::lock_guard<std::recursive_mutex> lock(core_mutex());
        try {
          if (!poisoned().empty()) throw Failure(poisoned());
          ensure_initialized();
          PrimaryContextScope scope(ordinal);
          Key key{scope.device, fingerprint, block_size, mode, config, transposed != 0,
                  comm_key};
          int32_t out_id = -1, out_gen = -1;
          int state = DistCache::get().probe(key, values.data(), values.nbytes(), id, gen,
                                             &out_id, &out_gen);
          return nb::make_tuple(state, out_id, out_gen);
        } catch (const Failure& e) {
          throw std::runtime_error(e.what());
        }
      },
      nb::arg("ordinal"), nb::arg("comm_key"), nb::arg("fingerprint"), nb::arg("config"),
      nb::arg("mode"), nb::arg("transposed"), nb::arg("block_size"), nb::arg("values"),
      nb::arg("id"), nb::arg("gen"));

  m.def(
      "dist_setup",
      [](int32_t action, int32_t ordinal, int64_t comm_key, uintptr_t comm_ptr,
         int64_t fingerprint, const std::string& config, int32_t mode, int32_t transposed,
         int32_t block_size, int64_t n_global,
         nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> offsets,
         nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> indptr,
         nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> gcols,
         HostArray values) {
        std::lock_guard<std::recursive_mutex> lock(core_mutex());
        try {
          if (!poisoned().empty()) throw Failure(poisoned());
          ensure_initialized();
          if (n_global > INT32_MAX)
            throw Failure("AmgX's distributed upload takes a 32-bit global size; this "
                          "matrix has " + std::to_string(n_global) + " block rows");
          PrimaryContextScope scope(ordinal);
          Key key{scope.device, fingerprint, block_size, mode, config, transposed != 0,
                  comm_key};
          Cache& c = Cache::get();
          DistEntry* e = nullptr;
          {
            nb::gil_scoped_release release;
            e = DistCache::get().acquire(
                action, key, comm_ptr, n_global, offsets.data(),
                static_cast<int>(indptr.shape(0) - 1), indptr.data(), gcols.data(),
                static_cast<int>(gcols.shape(0)), block_size, values.data(),
                values.nbytes(), c.capacity, c.resetup_mode);
          }
          return nb::make_tuple(e->id, e->generation);
        } catch (const Failure& e) {
          throw std::runtime_error(e.what());
        }
      },
      nb::arg("action"), nb::arg("ordinal"), nb::arg("comm_key"), nb::arg("comm_ptr"),
      nb::arg("fingerprint"), nb::arg("config"), nb::arg("mode"), nb::arg("transposed"),
      nb::arg("block_size"), nb::arg("n_global"), nb::arg("offsets"), nb::arg("indptr"),
      nb::arg("global_indices"), nb::arg("values"));

  m.def(
      "dist_solve",
      [](int32_t ordinal, int32_t id, int32_t gen, HostArray b, nb::object x0,
         HostOut x) {
        std::lock_guard<std::recursive_mutex> lock(core_mutex());
        try {
          if (!poisoned().empty()) throw Failure(poisoned());
          ensure_initialized();
          PrimaryContextScope scope(ordinal);
          DistEntry* e = DistCache::get().find(id, gen);
          if (e == nullptr)
            throw Failure("internal: distributed entry " + std::to_string(id) + "/" +
                          std::to_string(gen) + " is not resident");
          const void* x0_ptr = nullptr;
          HostArray x0_arr;
          if (!x0.is_none()) {
            x0_arr = nb::cast<HostArray>(x0);
            x0_ptr = x0_arr.data();
          }
          int32_t st = 0, its = 0;
          double res = 0.0;
          {
            nb::gil_scoped_release release;
            DistCache::get().solve(*e, b.data(), x0_ptr, x.data(), &st, &its, &res);
          }
          return nb::make_tuple(st, its, res);
        } catch (const Failure& e) {
          throw std::runtime_error(e.what());
        }
      },
      nb::arg("ordinal"), nb::arg("id"), nb::arg("gen"), nb::arg("b"), nb::arg("x0").none(),
      nb::arg("x"));

  // The device-resident distributed path (FFI): MPI functions and handles of the
  // library AmgX uses (addresses from mpi4py's ctypes view of it), once.
  m.def(
      "dist_set_mpi",
      [](uintptr_t iallreduce, uintptr_t test, uintptr_t comm_dup, uintptr_t int64_type,
         uintptr_t max_op, double timeout) {
        std::lock_guard<std::recursive_mutex> lock(core_mutex());
        MpiApi& m = mpi_api();
        m.iallreduce = reinterpret_cast<decltype(m.iallreduce)>(iallreduce);
        m.test = reinterpret_cast<decltype(m.test)>(test);
        m.comm_dup = reinterpret_cast<decltype(m.comm_dup)>(comm_dup);
        m.int64_type = int64_type;
        m.max_op = max_op;
        m.timeout = timeout;
      },
      nb::arg("iallreduce"), nb::arg("test"), nb::arg("comm_dup"), nb::arg("int64_type"),
      nb::arg("max_op"), nb::arg("timeout"));

  // A distributed pattern's local structure, for the FFI handlers (trace time).
  m.def(
      "dist_register_pattern",
      [](int64_t comm_key, uintptr_t comm_handle, int64_t fingerprint, int64_t n_global,
         nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> offsets,
         nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> indptr,
         nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> gcols,
         int32_t block_size) {
        std::lock_guard<std::recursive_mutex> lock(core_mutex());
        if (n_global > INT32_MAX)
          throw std::invalid_argument(
              "AmgX's distributed upload takes a 32-bit global size; this matrix has " +
              std::to_string(n_global) + " block rows");
        if (mpi_api().iallreduce == nullptr)
          throw std::runtime_error("internal: dist_set_mpi was not called");
        auto& comms = dist_comms();
        auto c = comms.find(comm_key);
        if (c == comms.end())
          comms[comm_key].user = comm_handle;
        else if (c->second.user != comm_handle)
          throw std::runtime_error("internal: communicator key reused");
        auto k = std::make_pair(comm_key, fingerprint);
        if (dist_patterns().count(k)) return;
        auto p = std::make_shared<DistPattern>();
        p->n_global = n_global;
        p->offsets.assign(offsets.data(), offsets.data() + offsets.shape(0));
        p->indptr.assign(indptr.data(), indptr.data() + indptr.shape(0));
        p->gcols.assign(gcols.data(), gcols.data() + gcols.shape(0));
        p->block_size = block_size;
        dist_patterns().emplace(k, std::move(p));
      },
      nb::arg("comm_key"), nb::arg("comm_handle"), nb::arg("fingerprint"),
      nb::arg("n_global"), nb::arg("offsets"), nb::arg("indptr"),
      nb::arg("global_indices"), nb::arg("block_size"));

  m.def(
      "dist_unregister_pattern",
      [](int64_t comm_key, int64_t fingerprint) {
        std::lock_guard<std::recursive_mutex> lock(core_mutex());
        dist_patterns().erase({comm_key, fingerprint});
      },
      nb::arg("comm_key"), nb::arg("fingerprint"));

  m.def("dist_cache_info", []() {
    std::lock_guard<std::recursive_mutex> lock(core_mutex());
    DistCache& c = DistCache::get();
    nb::dict d = counters_dict(c.totals);
    d["size"] = c.entries().size();
    nb::list entries;
    for (const auto& e : c.entries()) {
      nb::dict s = counters_dict(e->counters);
      s["id"] = e->id;
      s["generation"] = e->generation;
      s["device"] = e->key.device;
      s["fingerprint"] = e->key.fingerprint;
      s["comm_key"] = e->key.comm;
      s["n_global"] = e->n_global;
      s["n_local"] = e->n_local;
      s["nnz"] = e->nnz;
      s["block_size"] = e->block_size;
      s["mode"] = mode_name(e->key.mode);
      s["transposed"] = e->key.transposed;
      s["last_setup_seconds"] = e->last_setup_seconds;
      s["last_solve_seconds"] = e->last_solve_seconds;
      s["total_setup_seconds"] = e->total_setup_seconds;
      s["total_solve_seconds"] = e->total_solve_seconds;
      entries.append(s);
    }
    d["entries"] = entries;
    return d;
  });

  // Collective over every communicator that has distributed entries.
  m.def("dist_clear_cache", []() {
    std::lock_guard<std::recursive_mutex> lock(core_mutex());
    DistCache::get().clear();
  });

  m.def(
      "set_cache_size",
      [](int64_t capacity, int64_t entries_per_key) {
        if (capacity < 0) throw std::invalid_argument("cache size must be >= 0");
        if (entries_per_key < 1)
          throw std::invalid_argument("entries_per_key must be >= 1");
        std::lock_guard<std::recursive_mutex> lock(core_mutex());
        Cache& c = Cache::get();
        c.capacity = static_cast<size_t>(capacity);
        c.entries_per_key = static_cast<size_t>(entries_per_key);
        c.evict_to(c.capacity);
      },
      nb::arg("capacity"), nb::arg("entries_per_key") = 1);

  m.def(
      "set_resetup_mode",
      [](const std::string& mode) {
        std::lock_guard<std::recursive_mutex> lock(core_mutex());
        for (ResetupMode r : {ResetupMode::kResetup, ResetupMode::kSetup}) {
          if (mode == resetup_mode_name(r)) {
            Cache::get().resetup_mode = r;
            return;
          }
        }
        throw std::invalid_argument(std::string("resetup mode must be '") +
                                    resetup_mode_name(ResetupMode::kResetup) + "' or '" +
                                    resetup_mode_name(ResetupMode::kSetup) + "'");
      },
      nb::arg("mode"));

  m.def("finalize", []() {
    std::lock_guard<std::recursive_mutex> lock(core_mutex());
    Cache::get().clear();
    Api& a = api();
    if (!DistCache::get().entries().empty()) {
      // Distributed entries are leaked, not destroyed: destroying them is
      // collective (AmgX's MPI), and at exit MPI may already be finalized. Then
      // AmgX's own teardown is unsafe too (AMGX_finalize, and at exit the
      // destructors of its memory pools, which the leaked objects still use: an
      // abort, "Cuda failure: 'invalid argument'", 2 x H200, 2026-11-28). So AmgX
      // stays initialised, and the process exits without AmgX's teardown (the
      // driver reclaims the memory). `lineax_amgx._distributed.clear_cache(comm)`,
      // called on every rank before, avoids all of this.
      // The retired resources first: destroying any resources object frees the
      // memory pools that the abandoned entries still hold.
      for (auto& [device, r] : retired_resources()) (void)r.release();
      retired_resources().clear();
      DistCache::get().abandon();
      skip_amgx_teardown();
      return;
    }
    if (!poisoned().empty()) {
      // A broken CUDA context: AmgX's teardown (freeing its memory pools) throws
      // from destructors and aborts the process. Leak everything instead; the
      // driver reclaims it at exit.
      a.initialized = false;
      return;
    }
    if (a.cuda_handle) release_kernels();
    if (a.initialized) {
      a.initialized = false;
      AMGX_RC rc = a.AMGX_finalize();
      take_captured();
      if (rc != AMGX_RC_OK) throw std::runtime_error(amgx_error("AMGX_finalize", rc));
    }
  });

  m.def("free_device_memory", []() {
    std::lock_guard<std::recursive_mutex> lock(core_mutex());
    try {
      load_cuda_driver();
    } catch (const Failure& e) {
      throw std::runtime_error(e.what());
    }
    size_t free = 0, total = 0;
    // Needs a current context: use device 0's primary context.
    CUdevice dev;
    CUcontext ctx;
    if (api().cuDeviceGet(&dev, 0) != 0 || api().cuDevicePrimaryCtxRetain(&ctx, dev) != 0)
      throw std::runtime_error("no CUDA device");
    api().cuCtxPushCurrent_v2(ctx);
    api().cuMemGetInfo_v2(&free, &total);
    CUcontext popped;
    api().cuCtxPopCurrent_v2(&popped);
    return nb::make_tuple(free, total);
  });
}
