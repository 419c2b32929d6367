// CUDA implementation of torchrec_tt::group_plan (kernels: tt_group_plan.cuh). Outputs are sized by
// the upper bound nnz and the counts [S, U] stay on the device: no host sync. Index values are not
// checked unless TORCHREC_TT_CHECK_BOUNDS=1; a negative index, or a lookup outside every bag, belongs
// to no segment (lookup_segment = -1).

#include <torch/library.h>

#include <limits>
#include <tuple>

#include "tt_group_plan.cuh"
#include "tt_torch_cuda.h"

namespace torchrec_tt::gpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_plan_cuda(
    const at::Tensor& indices_in,
    const at::Tensor& offsets_in,
    int64_t last_rows) {
  constexpr const char* op = "group_plan";
  check_indices_offsets(op, indices_in, offsets_in, indices_in.device());
  TORCH_CHECK(
      indices_in.is_cuda(), op, ": expected CUDA tensors, got indices on ", indices_in.device());
  TORCH_CHECK(last_rows >= 1, op, ": last_rows must be >= 1, got ", last_rows);
  const c10::cuda::CUDAGuard guard(indices_in.device());
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const int64_t nnz = indices.numel();
  const int64_t batch_size = offsets.numel() - 1;
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(nnz < kIntMax, op, ": the CUDA kernels support fewer than 2^31 - 1 indices, got ", nnz);
  TORCH_CHECK(
      batch_size < kIntMax, op, ": the CUDA kernels support fewer than 2^31 - 1 bags, got ",
      batch_size);
  if (check_bounds_mode()) {
    check_index_values_cuda(op, indices, offsets, batch_size, nnz, /*num_rows=*/-1);
  }
  const auto long_opts = indices.options().dtype(at::kLong);
  at::Tensor lookup_segment = at::empty({nnz}, long_opts);
  at::Tensor segment_bag = at::empty({nnz}, long_opts);
  at::Tensor segment_group = at::empty({nnz}, long_opts);
  at::Tensor segment_slot = at::empty({nnz}, long_opts);
  at::Tensor slot_group = at::empty({nnz}, long_opts);
  at::Tensor counts = at::empty({2}, long_opts);
  PlanOutputs out;
  out.lookup_segment = lookup_segment.data_ptr<int64_t>();
  out.segment_bag = segment_bag.data_ptr<int64_t>();
  out.segment_group = segment_group.data_ptr<int64_t>();
  out.segment_slot = segment_slot.data_ptr<int64_t>();
  out.slot_group = slot_group.data_ptr<int64_t>();
  out.counts = counts.data_ptr<int64_t>();
  TorchCudaCtx ctx(indices.device());
  TORCHREC_TT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "group_plan_cuda", [&] {
    group_plan_op<index_t>(
        ctx, indices.data_ptr<index_t>(), offsets.data_ptr<index_t>(), batch_size, nnz, last_rows,
        out);
  });
  return {lookup_segment, segment_bag, segment_group, segment_slot, slot_group, counts};
}

} // namespace
} // namespace torchrec_tt::gpu

TORCH_LIBRARY_IMPL(torchrec_tt, CUDA, m) {
  m.impl("group_plan", &torchrec_tt::gpu::group_plan_cuda);
}
