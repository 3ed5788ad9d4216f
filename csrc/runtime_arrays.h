// Copyright 2026 The lineax-amgx authors. Licensed under the Apache License, Version 2.0.
//
// Runtime arrays: the host arrays of static structure (a pattern's column indices and
// row ids, transposition permutations, coloring tables, halo plans) that compiled
// programs read at run time instead of holding them as HLO constants (see
// lineax_amgx/_runtime_arrays.py and docs/development/architecture.md, "Runtime
// arrays").
//
// Python registers a host array under a 64-bit key (derived from the content) and
// keeps the array alive until it unregisters it; the registry holds its address,
// not a copy. The XLA FFI target `lineax_amgx_runtime_array` (no operands, one
// result, attribute `key`) writes the array into its result: on the CPU a memcpy; on
// a CUDA device a device-to-device copy, on XLA's stream, from a device copy made
// once per (key, device) at first use. Needs neither AmgX nor a CUDA toolkit (the
// driver is loaded at run time, on first use on a GPU).
#pragma once

#include <cstddef>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace lxa {

// Registers `bytes` bytes at `data` (host memory that the caller keeps alive and
// unchanged until unregister_runtime_array(key) has returned). A key registered
// already keeps its first registration (keys name contents). Returns whether this
// call registered it.
bool register_runtime_array(int64_t key, const void* data, size_t bytes);

// Removes `key`: waits until no handler reads its host memory, then frees its device
// copies (after the work queued on their devices is done). A key that is not
// registered is ignored.
void unregister_runtime_array(int64_t key);

// Frees every device copy (clear_cache, finalize); host registrations stay, and the
// next use uploads again.
void release_runtime_array_copies();

struct RuntimeArrayStats {
  size_t arrays = 0;         // registered keys
  size_t host_bytes = 0;     // their host bytes (held by Python, not copied)
  size_t device_copies = 0;  // resident device copies
  size_t device_bytes = 0;   // their bytes
  size_t uploads = 0;        // host-to-device uploads since the start
};
RuntimeArrayStats runtime_array_stats();

}  // namespace lxa

XLA_FFI_DECLARE_HANDLER_SYMBOL(LxaRuntimeArrayCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LxaRuntimeArrayCuda);
