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
// not a copy. The registration lives as long as anything that may run a program
// reading it: the pattern, the jaxprs and the compiled executables (whose
// keepalives hold the Python entry). The XLA FFI target `lineax_amgx_runtime_array` (no operands, one
// result, attribute `key`) writes the array into its result: on the CPU a memcpy; on
// a CUDA device a device-to-device copy, on XLA's stream, from a device copy made
// once per (key, device) at first use. Needs neither AmgX nor a CUDA toolkit (the
// driver is loaded at run time, on first use on a GPU).
#pragma once

#include <cstddef>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace lxa {

// Registers `bytes` bytes at `data` under `key` (host memory that the caller keeps
// alive and unchanged until unregister_runtime_array(key, token) has returned) and
// returns the registration's token. A key may hold several registrations at once
// (one per host array with that content: keys name contents); handlers read from
// any of them, and the key's device copies are shared.
int64_t register_runtime_array(int64_t key, const void* data, size_t bytes);

// Removes one registration: waits until no handler reads its host memory; the last
// registration of a key also frees the key's device copies (after the work queued
// on their devices is done). Unknown keys and tokens are ignored.
void unregister_runtime_array(int64_t key, int64_t token);

// Frees every device copy (clear_cache, finalize); host registrations stay, and the
// next use uploads again.
void release_runtime_array_copies();

struct RuntimeArrayStats {
  size_t arrays = 0;         // registered keys
  size_t registrations = 0;  // their registrations (host arrays)
  size_t host_bytes = 0;     // the registered host bytes (held by Python, not copied)
  size_t device_copies = 0;  // resident device copies
  size_t device_bytes = 0;   // their bytes
  size_t uploads = 0;        // host-to-device uploads since the start
};
RuntimeArrayStats runtime_array_stats();

}  // namespace lxa

XLA_FFI_DECLARE_HANDLER_SYMBOL(LxaRuntimeArrayCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LxaRuntimeArrayCuda);
