// Copyright 2026 The lineax-amgx authors. Licensed under the Apache License, Version 2.0.
//
// The four XLA FFI handlers (handlers.cc): AmgX setup and solve, single-process
// and distributed. bindings.cc hands them to Python as capsules.
#pragma once

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(LxaSetup);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LxaSolve);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LxaDistSetup);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LxaDistSolve);
