// Host interface between the ATen-facing CUDA ops (tt_ops_cuda.cu) and the kernel files
// (group_plan_cuda.cu, tt_forward_cuda.cu, tt_backward_cuda.cu): the launch context and the
// launchers, explicitly instantiated in the kernel files for every (scalar, index) pair.
//
// Why a separate, ATen-free header: the kernel files include only CUDA and project headers, so the
// same sources compile with nvcc for the extension and as plain C++ (with csrc/cuda_check/cuda_emu.h
// forced in) for the CPU-thread emulation test. Only the registration file touches ATen.
//
// Every launcher runs twice per op call: first with LaunchCtx::measure set (it only adds up its
// scratch allocations and launches nothing), then for real on one workspace of that size. So an op
// call makes one scratch allocation, sizes nothing by device values (no host sync) and is
// CUDA-graph capturable.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(TORCHREC_TT_CUDA_EMULATION)
#if !defined(TORCHREC_TT_CUDA_EMU_H)
#error "TORCHREC_TT_CUDA_EMULATION: include csrc/cuda_check/cuda_emu.h first"
#endif
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#endif

#include "torchrec_tt/enums.h"
#include "torchrec_tt/plan_layout.h"
#include "torchrec_tt/tt_layout.h"

namespace torchrec_tt::gpu {

// Accumulation type of the kernels: float for float/half/bfloat16 cores, double for double.
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type = typename AccType<scalar_t>::type;

// Launch context: stream, scratch workspace, cached device limits, error and launch accounting.
struct LaunchCtx {
  cudaStream_t stream = nullptr;
  int device = 0;
  size_t smem_optin = 48 * 1024; // cached cudaDevAttrMaxSharedMemoryPerBlockOptin
  bool measure = false; // sizing pass: allocations are counted, nothing is launched
  char* base = nullptr; // workspace of the real pass
  size_t capacity = 0;
  size_t used = 0;
  int launches = 0; // kernels, memsets and cub calls of the real pass
  cudaError_t error = cudaSuccess; // first error; later launches are skipped

  // Device scratch (256-byte aligned), valid until the op returns. In the sizing pass the pointer is
  // a placeholder that is never dereferenced.
  void* alloc(size_t bytes) {
    const size_t at = (used + 255) & ~static_cast<size_t>(255);
    used = at + (bytes > 0 ? bytes : 1);
    if (measure) {
      return reinterpret_cast<void*>(static_cast<uintptr_t>(at + 256));
    }
    if (used > capacity) { // cannot happen: the sizing pass made the same calls
      error = error == cudaSuccess ? cudaErrorMemoryAllocation : error;
      return base;
    }
    return base + at;
  }
  template <typename T>
  T* alloc_n(int64_t n) {
    return static_cast<T*>(alloc(static_cast<size_t>(n > 0 ? n : 1) * sizeof(T)));
  }
  // True when a launch should happen now (counted); false in the sizing pass or after an error.
  bool begin_launch() {
    if (measure || error != cudaSuccess) {
      return false;
    }
    ++launches;
    return true;
  }
  void check(cudaError_t err) {
    if (err != cudaSuccess && error == cudaSuccess) {
      error = err;
    }
  }
};

// One table's batch: TT layout, cores and the lookups (device pointers, contiguous; psw nullable),
// B bags and nnz lookups (< 2^31, checked by the caller), pooling_mode a PoolingMode value (enums.h).
template <typename scalar_t, typename index_t>
struct LookupBatch {
  TTLayout layout;
  CorePtrs<scalar_t> cores;
  const index_t* indices = nullptr;
  const index_t* offsets = nullptr;
  const scalar_t* psw = nullptr;
  int64_t B = 0;
  int64_t nnz = 0;
  int pooling_mode = 0;
};

// Gradient buffers of the d cores (acc_type, shapes of the cores), by value into kernels.
template <typename acc_t>
struct GradPtrs {
  acc_t* p[kMaxCores] = {};
};

// Builds the packed plan (plan_layout.h, PlanLayout::make(nnz, B).numel int64 entries) of a batch.
// num_groups > 0: lookups whose group is >= num_groups are invalid (the table's bound); otherwise
// every index >= 0 is valid up to the key width (group < 2^(64 - bit_width(B))). Invalid lookups and
// lookups outside every bag belong to no segment (lookup_segment = -1).
template <typename index_t>
void build_group_plan(
    LaunchCtx& ctx,
    const index_t* indices,
    const index_t* offsets,
    int64_t B,
    int64_t nnz,
    int64_t last_rows,
    int64_t num_groups,
    int64_t* plan);

// Forward: out (B, N) in the cores' dtype. plan: a packed plan of this batch (grt; nullptr = build
// one in the workspace). variant 0 = tt, 1 = grt.
template <typename scalar_t, typename index_t>
void tt_forward(
    LaunchCtx& ctx,
    const LookupBatch<scalar_t, index_t>& in,
    int variant,
    const int64_t* plan,
    scalar_t* out);

// Backward: grads.p[k] = core k's gradient in acc_type (zeroed here); psw_grad (nullable): nnz
// entries (zeroed here). deterministic: sorted reductions, no float atomics.
template <typename scalar_t, typename index_t>
void tt_backward(
    LaunchCtx& ctx,
    const LookupBatch<scalar_t, index_t>& in,
    int variant,
    const int64_t* plan,
    const scalar_t* grad_out,
    const GradPtrs<acc_type<scalar_t>>& grads,
    scalar_t* psw_grad,
    bool deterministic);

// Opt-in value checks (TORCHREC_TT_CHECK_BOUNDS=1): err (3 x uint64 = {0, ~0, ~0}) records
//   err[0] |= 1 some index < 0 or >= num_rows (num_rows < 0: only < 0); err[1] = its first position
//   err[0] |= 2 offsets[0] != 0;  |= 4 offsets[B] != nnz;  |= 8 offsets decrease (err[2] = first b).
template <typename index_t>
void check_index_values(
    LaunchCtx& ctx,
    const index_t* indices,
    const index_t* offsets,
    int64_t B,
    int64_t nnz,
    int64_t num_rows,
    unsigned long long* err);

// Largest dynamic shared memory (bytes) a kernel of (variant, direction) needs for this layout.
size_t max_smem_bytes(const TTLayout& layout, int variant, bool backward, size_t acc_bytes);

// Largest embedding dim the kernels support (register tiles of the bag kernels).
constexpr int64_t kMaxEmbeddingDimGpu = 1024;

} // namespace torchrec_tt::gpu
