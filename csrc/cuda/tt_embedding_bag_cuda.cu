// CUDA implementation of torchrec_tt::tt_embedding_bag and torchrec_tt::tt_embedding_bag_backward:
// boundary checks, dispatch, and the calls into the kernel headers (tt_forward.cuh, tt_backward.cuh).
//
// No host synchronization: buffers are sized by upper bounds, counts stay on the device. Index
// values are not checked unless TORCHREC_TT_CHECK_BOUNDS=1 (then with a sync); without it an index
// outside [0, prod(m)) or a lookup outside every bag contributes nothing and gets a zero weight
// gradient -- memory is never addressed with an unchecked value. The backward's reductions use
// float atomics by default; torch.use_deterministic_algorithms(True) or TORCHREC_TT_DETERMINISTIC=1
// selects sorted segmented reductions without float atomics (bit-identical gradients run to run).
// The forward is deterministic in both modes.

#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "tt_backward.cuh"
#include "tt_forward.cuh"
#include "tt_torch_cuda.h"

namespace torchrec_tt::gpu {
namespace {

template <typename cuda_t, typename scalar_t>
CorePtrs<cuda_t> core_ptrs(const std::vector<at::Tensor>& cores) {
  CorePtrs<cuda_t> p;
  for (const auto k : c10::irange(cores.size())) {
    p.p[k] = reinterpret_cast<const cuda_t*>(cores[k].data_ptr<scalar_t>());
  }
  return p;
}

at::Tensor tt_embedding_bag_cuda(
    at::TensorList cores,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    int64_t pooling_mode,
    int64_t variant) {
  constexpr const char* op = "tt_embedding_bag";
  TORCH_CHECK(
      indices.is_cuda(), op, ": expected CUDA tensors, got indices on ", indices.device());
  const c10::cuda::CUDAGuard guard(indices.device());
  const CudaInputs in = check_cuda_inputs(
      op, cores, indices, offsets, per_sample_weights, pooling_mode, variant, /*backward=*/false);
  if (check_bounds_mode()) {
    check_index_values_cuda(op, in.indices, in.offsets, in.batch_size, in.nnz, in.layout.num_rows());
  }
  at::Tensor out = at::empty({in.batch_size, in.layout.embedding_dim()}, in.cores[0].options());
  if (in.batch_size == 0) {
    return out;
  }
  TorchCudaCtx ctx(in.indices.device());
  TORCHREC_TT_DISPATCH_CUDA_FLOAT_TYPES(in.cores[0].scalar_type(), "tt_embedding_bag_cuda", [&] {
    using cuda_t = typename CudaScalar<scalar_t>::type;
    const CorePtrs<cuda_t> cp = core_ptrs<cuda_t, scalar_t>(in.cores);
    const cuda_t* psw =
        in.psw.has_value() ? reinterpret_cast<const cuda_t*>(in.psw->data_ptr<scalar_t>()) : nullptr;
    cuda_t* y = reinterpret_cast<cuda_t*>(out.data_ptr<scalar_t>());
    TORCHREC_TT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), "tt_embedding_bag_cuda_idx", [&] {
      const index_t* idx = in.indices.data_ptr<index_t>();
      const index_t* off = in.offsets.data_ptr<index_t>();
      const LookupBatch<cuda_t, index_t> batch{
          in.dims, cp, idx, off, psw, in.batch_size, in.nnz, static_cast<int>(pooling_mode)};
      if (variant == kVariantGRT) {
        grt_forward(ctx, batch, y);
      } else {
        tt_forward(ctx, batch, y);
      }
    });
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> tt_embedding_bag_backward_cuda(
    const at::Tensor& grad_output,
    at::TensorList cores,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    int64_t pooling_mode,
    int64_t variant,
    bool per_sample_weights_requires_grad) {
  constexpr const char* op = "tt_embedding_bag_backward";
  TORCH_CHECK(
      indices.is_cuda(), op, ": expected CUDA tensors, got indices on ", indices.device());
  const c10::cuda::CUDAGuard guard(indices.device());
  const CudaInputs in = check_cuda_inputs(
      op, cores, indices, offsets, per_sample_weights, pooling_mode, variant, /*backward=*/true);
  check_backward_inputs(op, grad_output, in, per_sample_weights_requires_grad);
  if (check_bounds_mode()) {
    check_index_values_cuda(op, in.indices, in.offsets, in.batch_size, in.nnz, in.layout.num_rows());
  }
  const at::Tensor grad_out = grad_output.contiguous();
  const bool deterministic = deterministic_mode();
  const at::ScalarType dtype = in.cores[0].scalar_type();
  // Gradients accumulate in float (double for double cores), then convert to the cores' dtype.
  const bool reduced = dtype == at::kHalf || dtype == at::kBFloat16;
  std::vector<at::Tensor> acc_grads;
  acc_grads.reserve(in.cores.size());
  for (const auto& c : in.cores) {
    acc_grads.push_back(at::zeros(c.sizes(), c.options().dtype(reduced ? at::kFloat : dtype)));
  }
  at::Tensor psw_grad = per_sample_weights_requires_grad
      ? at::zeros({in.nnz}, in.cores[0].options())
      : at::empty({0}, in.cores[0].options());

  if (in.batch_size > 0 && in.nnz > 0) {
    TorchCudaCtx ctx(in.indices.device());
    TORCHREC_TT_DISPATCH_CUDA_FLOAT_TYPES(dtype, "tt_embedding_bag_backward_cuda", [&] {
      using cuda_t = typename CudaScalar<scalar_t>::type;
      using acc_t = acc_type<cuda_t>;
      const CorePtrs<cuda_t> cp = core_ptrs<cuda_t, scalar_t>(in.cores);
      const cuda_t* psw = in.psw.has_value()
          ? reinterpret_cast<const cuda_t*>(in.psw->data_ptr<scalar_t>())
          : nullptr;
      const cuda_t* g = reinterpret_cast<const cuda_t*>(grad_out.data_ptr<scalar_t>());
      cuda_t* dpsw = per_sample_weights_requires_grad
          ? reinterpret_cast<cuda_t*>(psw_grad.data_ptr<scalar_t>())
          : nullptr;
      acc_t* grads[kMaxCoresGpu] = {};
      for (const auto k : c10::irange(acc_grads.size())) {
        grads[k] = acc_grads[k].data_ptr<acc_t>();
      }
      TORCHREC_TT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), "tt_embedding_bag_backward_cuda_idx", [&] {
        const index_t* idx = in.indices.data_ptr<index_t>();
        const index_t* off = in.offsets.data_ptr<index_t>();
        const LookupBatch<cuda_t, index_t> batch{
            in.dims, cp, idx, off, psw, in.batch_size, in.nnz, static_cast<int>(pooling_mode)};
        if (variant == kVariantGRT) {
          grt_backward(ctx, batch, g, grads, dpsw, deterministic);
        } else {
          tt_backward(ctx, batch, g, grads, dpsw, deterministic);
        }
      });
    });
  }
  std::vector<at::Tensor> core_grads;
  core_grads.reserve(acc_grads.size());
  for (auto& gk : acc_grads) {
    core_grads.push_back(reduced ? gk.to(dtype) : gk);
  }
  return {core_grads, psw_grad};
}

} // namespace
} // namespace torchrec_tt::gpu

TORCH_LIBRARY_IMPL(torchrec_tt, CUDA, m) {
  m.impl("tt_embedding_bag", &torchrec_tt::gpu::tt_embedding_bag_cuda);
  m.impl("tt_embedding_bag_backward", &torchrec_tt::gpu::tt_embedding_bag_backward_cuda);
}
