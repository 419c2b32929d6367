// Opt-in value checks of the CUDA ops (TORCHREC_TT_CHECK_BOUNDS=1). Checking index values on the
// device needs a host sync to report them, so by default the CUDA ops do not check values: they never
// address memory with an unchecked value (offsets are clamped into [0, nnz], every index is range-
// checked before use) and a lookup that is out of range, or outside every bag, contributes nothing.
//
// check_inputs_kernel records into err (3 x uint64, initialised to {0, ~0, ~0}):
//   err[0] |= 1 some index < 0 or >= num_rows (num_rows < 0: only < 0)   err[1] = its first position
//   err[0] |= 2 offsets[0] != 0
//   err[0] |= 4 offsets[B] != nnz
//   err[0] |= 8 offsets decrease somewhere                              err[2] = first b with
//                                                                        offsets[b + 1] < offsets[b]
#pragma once

#include "tt_cuda_common.cuh"
#include "tt_group_plan.cuh"

namespace torchrec_tt::gpu {

template <typename index_t>
__global__ void check_inputs_kernel(
    const index_t* __restrict__ indices,
    const index_t* __restrict__ offsets,
    int64_t B,
    int64_t nnz,
    int64_t num_rows,
    unsigned long long* err) {
  const int64_t n = nnz > B + 1 ? nnz : B + 1;
  TORCHREC_TT_GRID_STRIDE(i, n) {
    if (i < nnz) {
      const int64_t v = static_cast<int64_t>(indices[i]);
      if (v < 0 || (num_rows >= 0 && v >= num_rows)) {
        atomicOr(&err[0], 1ull);
        atomicMin(&err[1], static_cast<unsigned long long>(i));
      }
    }
    if (i <= B) {
      const int64_t o = static_cast<int64_t>(offsets[i]);
      if (i == 0 && o != 0) {
        atomicOr(&err[0], 2ull);
      }
      if (i == B && o != nnz) {
        atomicOr(&err[0], 4ull);
      }
      if (i < B && static_cast<int64_t>(offsets[i + 1]) < o) {
        atomicOr(&err[0], 8ull);
        atomicMin(&err[2], static_cast<unsigned long long>(i));
      }
    }
  }
}

template <typename index_t, typename Ctx>
void launch_check_inputs(
    Ctx& ctx,
    const index_t* indices,
    const index_t* offsets,
    int64_t B,
    int64_t nnz,
    int64_t num_rows,
    unsigned long long* err) {
  launch_elems(
      ctx, &check_inputs_kernel<index_t>, nnz > B + 1 ? nnz : B + 1, indices, offsets, B, nnz,
      num_rows, err);
}

} // namespace torchrec_tt::gpu
