# Copyright 2026 The lineax-amgx authors. SPDX-License-Identifier: Apache-2.0
"""Check that merging the CPU/GPU twin test files lost no test (issue 19).

    python tools/compare_test_ids.py [--base REV] [--before DIR] [--show-added]

Collects the test ids of the tree at `--base` (exported with `git archive` into a
temporary folder; default: the commit before the merge, `BASE` below) or of a
folder given with `--before`, and of the working tree, each in three groups by
mark: `gpu`, `mpi` (not gpu) and `cpu` (neither). Every old id must have a new
counterpart in the same group:

- the same id (a test left as it was), or
- the id after the name and file changes of `NAMES` / `FILES` below, with the
  backend as the first parameter (`test_gpu_x.py::test_y[p]` ->
  `test_x.py::test_y[gpu-p]`; `test_x.py::test_y[p]` -> `test_x.py::test_y[cpu-p]`),
  or
- the ids listed for it in `IDS` (a test split in two, or parameters renamed).

Prints a summary per group and every old id without a counterpart; exits 1 if
there is one. Run from the repository root with the interpreter that runs the
tests (its `pytest` is called with `python -P -m pytest`, so that the installed
package, not the source tree, is imported).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tarfile
import tempfile

BASE = "1139104"  # main before the twin files were merged

GROUPS = {
    "gpu": "gpu",
    "mpi": "mpi and not gpu",
    "cpu": "not gpu and not mpi",
}

# Old file -> new file, for every test of the file (before NAMES applies).
FILES: dict[str, str] = {
    "tests/test_gpu_autodiff.py": "tests/test_autodiff.py",
    "tests/test_gpu_preconditioner.py": "tests/test_preconditioner.py",
    "tests/test_gpu_blocks.py": "tests/test_blocks.py",
    "tests/test_gpu.py": "tests/test_solve.py",
    "tests/test_cpu_backend.py": "tests/test_solve.py",  # (but see NAMES)
    "tests/test_gpu_failures.py": "tests/test_bad_input.py",
    "tests/test_gpu_distributed.py": "tests/test_distributed_solve.py",
}

# (old file, old name) -> new name, or "new file::new name": tests renamed or
# moved by the merge.
_GA, _GP = "tests/test_gpu_autodiff.py", "tests/test_gpu_preconditioner.py"
_GB = "tests/test_gpu_blocks.py"
_S, _C, _CB = "tests/test_solve.py", "tests/test_cache.py", "tests/test_cpu_backend.py"
_BI, _GF, _PR = ("tests/test_bad_input.py", "tests/test_gpu_failures.py",
                 "tests/test_process.py")
_D, _DS, _GD = ("tests/test_distributed.py", "tests/test_distributed_solve.py",
                 "tests/test_gpu_distributed.py")
NAMES: dict[tuple[str, str], str] = {
    **{(_D, n): f"{_DS}::{n}" for n in (
        "test_solve_matches_spsolve", "test_solve_nonsymmetric_and_warm_start",
        "test_solve_nonfinite_on_one_rank", "test_grad_wrt_b_matches_single_process",
        "test_grad_wrt_values_symmetric", "test_independent_operations_in_one_jit",
        "test_different_operations_on_the_ranks_time_out",
        "test_native_path_agrees_on_setup_hit_and_resetup",
        "test_native_path_refuses_ranks_in_different_calls",
        "test_distributed_clear_cache_is_collective",
        "test_native_path_checks_amgx_mpi", "test_native_path_selection",
        "test_ffi_path_traces_with_a_signature_every_rank_shares")},
    (_GD, "test_nonsymmetric_solve"): "test_solve_nonsymmetric_and_warm_start",
    (_GD, "test_nonfinite_input_on_one_rank"): "test_solve_nonfinite_on_one_rank",
    **{(_BI, n): f"{_PR}::{n}" for n in (
        "test_no_amgx_library", "test_process_exits_cleanly",
        "test_exit_after_a_lost_cuda_context_keeps_the_status")},
    **{(_GF, n): f"{_PR}::{n}" for n in (
        "test_lost_cuda_context_is_an_exception_and_a_clean_exit",
        "test_gpu_solve_without_amgx_library", "test_soak_quick")},
    (_GF, "test_zero_row_is_singular_amgx_not_called"): "test_zero_row_is_singular",
    (_GF, "test_not_converged_eager_and_jit"): "test_max_steps_reached",
    (_GF, "test_indefinite_matrix_flagged"):
        "test_indefinite_matrix_breakdown_or_divergence",
    **{(_CB, n): f"{_CB}::{n}" for n in (
        "test_classical_config", "test_every_preset_solves_poisson",
        "test_vcycle_preset_reports_max_steps", "test_user_config_dict_and_json",
        "test_native_relative_criterion_uses_initial_residual", "test_native_norms",
        "test_unsupported_key_warns_once", "test_dilu_smoother_warns",
        "test_unsupported_solver_raises",
        "test_translation_warning_comes_with_the_solve",
        "test_untranslatable_config_fails_with_the_solve",
        "test_unused_near_nullspace_warning_comes_with_the_solve",
        "test_config_variants")},
    ("tests/test_gpu.py", "test_gpu_solve_never_translates_for_pyamg"):
        f"{_CB}::test_gpu_solve_never_translates_for_pyamg",
    **{(_CB, n): f"{_C}::{n}" for n in (
        "test_reuse_same_values_then_resetup", "test_reused_state_skips_comparison",
        "test_stale_token_is_slow_not_wrong", "test_isolated_mode_and_eviction",
        "test_concurrent_solves_from_threads")},
    **{("tests/test_gpu.py", n): f"{_C}::{n}" for n in (
        "test_new_values_resetup_same_values_no_resetup",
        "test_capacity_one_alternating_patterns", "test_isolated_mode_keeps_nothing",
        "test_same_indptr_different_indices_no_wrong_reuse",
        "test_memory_returns_after_clear_and_finalize",
        "test_threads_solve_concurrently", "test_two_devices_one_at_a_time")},
    ("tests/test_gpu.py", "test_float64_matches_spsolve"):
        "test_gallery_matches_spsolve",
    ("tests/test_gpu.py", "test_float32_residual"): "test_single_precision_dffi",
    ("tests/test_gpu.py", "test_mixed_precision"): "test_mixed_precision_ddfi",
    ("tests/test_gpu.py", "test_jit_and_eager_agree"): "test_jit_matches_eager",
    ("tests/test_gpu.py", "test_warm_start_saves_iterations"):
        "test_warm_start_needs_fewer_iterations",
    (_GB, "test_default_block_preset_3d_elasticity"):
        "test_default_block_preset_solves_3d_elasticity",
    (_GB, "test_every_block_size"): "test_coupled_species_block_sizes",
    (_GB, "test_block_size_is_part_of_the_native_cache_key"):
        "test_block_size_is_part_of_the_cache_key",
    (_GA, "test_grad_jvp_and_jvp_of_grad"): "test_derivatives_jit",
    (_GA, "test_vmap_of_grad_over_rhs_one_setup"): "test_vmap_of_grad_over_b_one_setup",
    (_GA, "test_vmap_over_values_and_rhs"): "test_vmap_over_values_and_b",
    ("tests/test_autodiff.py", "test_warm_start_fewer_steps_same_answer_and_gradient"):
        "test_warm_start_same_answer_and_gradient",
    (_GP, "test_cg_one_cycle_per_iteration_no_setup"):
        "test_cg_applies_one_cycle_per_iteration",
    (_GP, "test_symmetric_cycle_is_spd"):
        "test_symmetric_cycle_is_spd_and_its_own_transpose",
    (_GP, "test_built_under_jit_and_resetup_for_new_values"):
        "test_built_and_applied_under_jit",
    (_GP, "test_nonsymmetric_transpose_has_its_own_entry"):
        "test_nonsymmetric_transpose_preconditions_the_transpose",
    (_GP, "test_mixed_precision"):
        "test_mixed_precision_preconditioner_of_a_float64_solve",
    (_GP, "test_float32"): "test_float32_cg_above_lineax_breakdown_threshold",
    (_GP, "test_gradient_through_preconditioned_solve"):
        "test_gradient_through_the_wrapper",
    (_GP, "test_newton_krylov_bratu_one_setup"): "test_optimistix_newton_bratu",
}

# Old id -> new ids (all must exist): splits and renamed parameters.
_A, _O = "tests/test_autodiff.py", "tests/test_optimistix.py"
_P, _B = "tests/test_preconditioner.py", "tests/test_blocks.py"
IDS: dict[str, list[str]] = {
    "tests/test_gpu_matrix_free.py::test_jacobian_operator_no_pattern_given": [
        "tests/test_sparsify.py::test_jacobian_operator_no_pattern_given[gpu-200]"],
    **{f"{_GF}::test_nonfinite_input_through_amgx[{v}-{w}]": [
        f"{_BI}::test_nonfinite_input[gpu-{w}-{v}]"]
       for v in ("nan", "inf") for w in ("values", "b", "y0")},
    **{f"{_GF}::test_singular_matrix_through_amgx[{c}]": [
        f"{_BI}::test_singular_matrix_is_flagged[gpu-{c}]",
        f"{_BI}::test_consistent_singular_system_never_wrong[gpu-{c}]"]
       for c in ("None", "FGMRES_AGGREGATION", "PBICGSTAB_AGGREGATION",
                 "AMG_AGGREGATION")},
    f"{_GF}::test_structural_errors_before_amgx": [
        f"{_BI}::test_structurally_empty_row_or_column[gpu-row]"],
    "tests/test_gpu.py::test_float64_matches_spsolve[convdiff2d]": [
        f"{_S}::test_gallery_matches_spsolve[gpu-convection_diffusion2d]"],
    f"{_CB}::test_poisson_256_iteration_count": [
        f"{_S}::test_large_poisson2d[cpu-256]"],
    "tests/test_gpu.py::test_million_unknowns_2d_poisson": [
        f"{_S}::test_large_poisson2d[gpu-1000]"],
    f"{_CB}::test_single_precision_dffi": [
        f"{_S}::test_single_precision_dffi[cpu-poisson2d]"],
    f"{_CB}::test_not_converged_and_nonfinite": [
        f"{_S}::test_not_converged_reports_max_steps[cpu]",
        f"{_S}::test_nonfinite_rhs_is_flagged"],
    f"{_B}::test_elasticity2d_block_beats_scalar": [
        f"{_B}::test_elasticity2d_block_beats_scalar[cpu-24]",
        f"{_B}::test_block_size_is_part_of_the_cache_key[cpu]"],
    f"{_GB}::test_elasticity2d_200k_matches_spsolve": [
        f"{_B}::test_elasticity2d_block_beats_scalar[gpu-316]"],
    f"{_GB}::test_elasticity2d_million_residual": [
        f"{_B}::test_elasticity2d_block_beats_scalar[gpu-708]"],
    f"{_B}::test_elasticity3d_block_beats_scalar": [
        f"{_B}::test_elasticity3d_block_beats_scalar[cpu-8]"],
    f"{_GB}::test_elasticity3d_matches_spsolve": [
        f"{_B}::test_elasticity3d_block_beats_scalar[gpu-20]"],
    f"{_GB}::test_elasticity3d_large_residual": [
        f"{_B}::test_elasticity3d_block_beats_scalar[gpu-48]"],
    f"{_P}::test_gradients_through_preconditioned_solves": [
        f"{_P}::test_gradients_through_preconditioned_solves",
        f"{_P}::test_gradient_through_the_wrapper[cpu]"],
    "tests/test_gpu_autodiff.py::test_symmetric_gradient_one_setup_two_solves": [
        f"{_A}::test_symmetric_gradient_one_setup_two_solves[gpu-jit]"],
    "tests/test_gpu_autodiff.py::test_vmap_over_8_rhs_one_setup": [
        f"{_A}::test_vmap_over_b_one_setup[gpu-poisson_tagged]"],
    f"{_A}::test_vmap_over_values_and_b": [f"{_A}::test_vmap_over_values_and_b[cpu-4]"],
    "tests/test_gpu_autodiff.py::test_newton_and_chord": [
        f"{_O}::test_newton_matches_dense_newton[gpu]",
        f"{_O}::test_chord_reuses_one_setup[gpu]"],
    **{f"tests/test_gpu_autodiff.py::test_implicit_adjoint_gradient[{k}]": [
        f"{_O}::test_implicit_adjoint_gradient_wrt_lambda[gpu-{k}]"]
       for k in ("symmetric", "nonsymmetric")},
}

_ID = re.compile(r"^(?P<file>[^:]+)::(?P<name>[^\[]+)(?:\[(?P<params>.*)\])?$")


def collect(root: str, marks: str) -> list[str]:
    cmd = [sys.executable, "-P", "-m", "pytest", "--collect-only", "-q",
           "-p", "no:cacheprovider", "-m", marks, "tests"]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    ids = [ln.strip() for ln in out.stdout.splitlines() if "::" in ln]
    if out.returncode not in (0, 5) or not ids and out.returncode != 5:
        sys.exit(f"collection failed in {root} ({marks}):\n{out.stdout}{out.stderr}")
    return ids


def collect_groups(root: str) -> dict[str, list[str]]:
    return {group: collect(root, marks) for group, marks in GROUPS.items()}


def candidates(old: str, group: str) -> list[list[str]]:
    """The ways `old` may live on: each a list of ids that must all exist."""
    if old in IDS:
        return [IDS[old]]
    m = _ID.match(old)
    file, name, params = m["file"], m["name"], m["params"]
    new = NAMES.get((file, name), name)
    file = FILES.get(file, file)
    file, _, name = new.rpartition("::") if "::" in new else (file, "", new)
    backend = "gpu" if group == "gpu" else "cpu"
    with_backend = backend if params is None else f"{backend}-{params}"
    out = [[f"{file}::{name}[{with_backend}]"]]
    same = f"{file}::{name}" + ("" if params is None else f"[{params}]")
    return [[old], [same], *out]


def export(rev: str, into: str) -> None:
    data = subprocess.run(["git", "archive", "--format=tar", rev],
                          capture_output=True, check=True).stdout
    path = os.path.join(into, "tree.tar")
    with open(path, "wb") as f:
        f.write(data)
    with tarfile.open(path) as t:
        t.extractall(into, filter="data")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=BASE, help="the revision before the merge")
    ap.add_argument("--before", help="a folder holding the tree before the merge")
    ap.add_argument("--show-added", action="store_true",
                    help="also list the new ids that no old id maps to")
    args = ap.parse_args()
    if args.before:
        before = collect_groups(args.before)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            export(args.base, tmp)
            before = collect_groups(tmp)
    after = collect_groups(os.getcwd())
    missing = []
    for group in GROUPS:
        new = set(after[group])
        used: set[str] = set()
        lost = []
        for old in before[group]:
            for ids in candidates(old, group):
                if all(i in new for i in ids):
                    used.update(ids)
                    break
            else:
                lost.append(old)
        added = sorted(new - used)
        print(f"{group}: {len(before[group])} ids before, {len(new)} after; "
              f"{len(before[group]) - len(lost)} found again, {len(lost)} lost, "
              f"{len(added)} new")
        for old in lost:
            print(f"  LOST {old}")
        if args.show_added:
            for i in added:
                print(f"  new  {i}")
        missing += lost
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
