// CUDA implementations of the torchrec_tt ops and their registration (the only CUDA file that
// includes ATen): boundary checks, dtype dispatch, the launch context over the current stream, and
// the calls into the launchers of group_plan_cuda.cu, tt_forward_cuda.cu and tt_backward_cuda.cu.
//
// CUDA-graph capturable on the default path: no host syncs (buffers are sized by upper bounds, the
// plan's counts stay on the device), one workspace allocation per op call (the launchers' sizing
// pass, tt_launch.h), and environment variables and device attributes read once per process /
// device. Index values are not checked unless TORCHREC_TT_CHECK_BOUNDS=1 (then with a sync); without
// it an index outside [0, prod(m)), or a lookup outside every bag, contributes nothing and gets a
// zero weight gradient -- memory is never addressed with an unchecked value. The backward uses float
// atomics by default; torch.use_deterministic_algorithms(True) or TORCHREC_TT_DETERMINISTIC=1 selects
// sorted reductions without float atomics (bit-identical gradients run to run). The forward is
// deterministic in both modes.

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include "torchrec_tt/checks.h"
#include "torchrec_tt/dispatch.h"
#include "torchrec_tt/plan_layout.h"
#include "torchrec_tt/tt_layout.h"

#include "tt_launch.h"

namespace torchrec_tt::gpu {
namespace {

// c10 scalar types -> CUDA's own types of the same layout (the kernels use CUDA intrinsics).
template <typename T>
struct CudaScalar {
  using type = T;
};
template <>
struct CudaScalar<c10::Half> {
  using type = __half;
};
template <>
struct CudaScalar<c10::BFloat16> {
  using type = __nv_bfloat16;
};
static_assert(sizeof(c10::Half) == sizeof(__half), "c10::Half / __half layout");
static_assert(sizeof(c10::BFloat16) == sizeof(__nv_bfloat16), "c10::BFloat16 / __nv_bfloat16 layout");

bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

// Environment switches, read once per process.
bool env_deterministic() {
  static const bool on = env_flag("TORCHREC_TT_DETERMINISTIC");
  return on;
}
bool check_bounds_mode() {
  static const bool on = env_flag("TORCHREC_TT_CHECK_BOUNDS");
  return on;
}

// Deterministic reductions in the backward: torch.use_deterministic_algorithms(True) (a flag read,
// it may change between calls) or TORCHREC_TT_DETERMINISTIC=1.
bool deterministic_mode() {
  return at::globalContext().deterministicAlgorithms() || env_deterministic();
}

// The device's opt-in shared memory per block, queried once per device.
size_t smem_optin(c10::DeviceIndex device) {
  constexpr int kMaxDevices = 64;
  static std::array<std::once_flag, kMaxDevices> once;
  static std::array<size_t, kMaxDevices> value{};
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "torchrec_tt: CUDA device index ", device, " >= ", kMaxDevices);
  std::call_once(once[device], [device] {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    value[device] = static_cast<size_t>(v);
  });
  return value[device];
}

// Runs a launcher twice: a sizing pass, then the real pass on one workspace from the caching
// allocator on the current stream (stream-ordered reuse after the op returns is safe).
template <typename Fn>
void run_on_device(const at::Device& device, Fn&& fn) {
  LaunchCtx sizing;
  sizing.measure = true;
  sizing.device = device.index();
  sizing.smem_optin = smem_optin(device.index());
  fn(sizing);
  const at::Tensor workspace = at::empty(
      {static_cast<int64_t>(sizing.used > 0 ? sizing.used : 1)},
      at::TensorOptions().dtype(at::kByte).device(device));
  LaunchCtx ctx;
  ctx.stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  ctx.device = device.index();
  ctx.smem_optin = sizing.smem_optin;
  ctx.base = static_cast<char*>(workspace.data_ptr());
  ctx.capacity = sizing.used;
  fn(ctx);
  C10_CUDA_CHECK(ctx.error);
}

constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();

void check_cuda_sizes(const char* op, int64_t nnz, int64_t batch_size) {
  TORCH_CHECK_VALUE(nnz < kIntMax, op, ": the CUDA kernels support fewer than 2^31 - 1 indices, got ", nnz);
  TORCH_CHECK_VALUE(
      batch_size < kIntMax, op, ": the CUDA kernels support fewer than 2^31 - 1 bags, got ", batch_size);
}

// Opt-in value checks, same messages as the CPU path. num_rows < 0: only indices >= 0.
void check_index_values_cuda(
    const char* op,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    int64_t B,
    int64_t nnz,
    int64_t num_rows) {
  at::Tensor err = at::empty({3}, indices.options().dtype(at::kLong));
  {
    const int64_t init[3] = {0, -1, -1}; // -1 == ~0ull for the unsigned atomicMin
    C10_CUDA_CHECK(cudaMemcpyAsync(
        err.data_ptr<int64_t>(), init, sizeof(init), cudaMemcpyHostToDevice,
        c10::cuda::getCurrentCUDAStream(indices.device().index()).stream()));
    TORCHREC_TT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "torchrec_tt_check_bounds", [&] {
      run_on_device(indices.device(), [&](LaunchCtx& ctx) {
        check_index_values<index_t>(
            ctx, indices.data_ptr<index_t>(), offsets.data_ptr<index_t>(), B, nnz, num_rows,
            reinterpret_cast<unsigned long long*>(err.data_ptr<int64_t>()));
      });
    });
  }
  const at::Tensor e = err.cpu(); // host sync (opt-in)
  const int64_t flags = e.data_ptr<int64_t>()[0];
  if (flags == 0) {
    return;
  }
  const at::Tensor off64 = offsets.cpu().to(at::kLong);
  const int64_t* o = off64.data_ptr<int64_t>();
  if ((flags & 2) != 0) {
    fail_offsets_first(op, o[0]);
  }
  if ((flags & 4) != 0) {
    fail_offsets_last(op, B, nnz, o[B]);
  }
  if ((flags & 8) != 0) {
    const int64_t b = e.data_ptr<int64_t>()[2];
    fail_offsets_decreasing(op, b, o[b], o[b + 1]);
  }
  if ((flags & 1) != 0) {
    const int64_t j = e.data_ptr<int64_t>()[1];
    fail_index_out_of_range(op, j, indices.select(0, j).item<int64_t>(), num_rows);
  }
}

// Inputs of tt_embedding_bag(_backward) on CUDA: the shared checks, the CUDA kernels' size limits
// (32-bit index math in inner loops) and the shared-memory budget, then contiguous tensors.
TTInputs check_cuda_inputs(
    const char* op,
    at::TensorList cores,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    int64_t pooling_mode,
    int64_t variant,
    bool backward) {
  TORCH_CHECK_VALUE(indices.is_cuda(), op, ": expected CUDA tensors, got indices on ", indices.device());
  TTInputs in = check_tt_inputs(
      op, cores, indices, offsets, per_sample_weights, pooling_mode, variant, c10::DeviceType::CUDA,
      /*allow_reduced_precision=*/true);
  const TTLayout& L = in.layout;
  check_cuda_sizes(op, in.nnz, in.batch_size);
  TORCH_CHECK_VALUE(
      L.embedding_dim() <= kMaxEmbeddingDimGpu, op, ": the CUDA kernels support embedding_dim = "
      "prod(n_k) <= ", kMaxEmbeddingDimGpu, ", got ", L.embedding_dim());
  int64_t chain = 1;
  int64_t act_size = 0; // a slot's activation record (sum of the prefix chain sizes)
  for (const auto k : c10::irange(L.d)) {
    TORCH_CHECK_VALUE(
        L.m[k] < kIntMax, op, ": the CUDA kernels support cores[k].size(0) < 2^31 - 1, got cores[",
        k, "].size(0) = ", L.m[k]);
    chain *= L.n[k];
    TORCH_CHECK_VALUE(
        chain * L.R[k + 1] <= kIntMax && L.slice_numel(k) <= kIntMax && L.core_numel(k) <= kIntMax,
        op, ": TT sizes too large for the CUDA kernels at cores[", k, "] (shape ", cores[k].sizes(), ")");
    if (k + 1 < L.d) {
      act_size += chain * L.R[k + 1];
    }
  }
  TORCH_CHECK_VALUE(
      act_size <= kIntMax, op, ": TT sizes too large for the CUDA kernels (prefix chain of ",
      act_size, " values)");
  const size_t acc_bytes = cores[0].scalar_type() == at::kDouble ? sizeof(double) : sizeof(float);
  const size_t smem = max_smem_bytes(L, static_cast<int>(variant), backward, acc_bytes);
  const size_t limit = smem_optin(cores[0].device().index());
  TORCH_CHECK_VALUE(
      smem <= limit, op, ": TT shapes too large for the CUDA kernels (variant ", variant, "): they need ",
      smem, " bytes of shared memory per block, the device allows ", limit,
      "; reduce the ranks or the dim factors n_k");
  make_tt_inputs_contiguous(in, cores, indices, offsets, per_sample_weights);
  return in;
}

// The plan argument (grt): an int64 CUDA tensor with the packed layout of this batch's sizes. Its
// values (built for this batch with last_rows = m_{d-1}) cannot be checked without a sync; the
// kernels clamp every count and index they read from it.
std::optional<at::Tensor> check_plan(
    const char* op,
    const std::optional<at::Tensor>& plan,
    const TTInputs& in,
    int64_t variant) {
  if (!plan.has_value() || static_cast<Variant>(variant) != Variant::kGRT) {
    return std::nullopt;
  }
  return check_plan_shape(op, *plan, in.nnz, in.batch_size, in.indices.device());
}

// The CUDA kernels take no hot-row cache: torchrec_tt.cache splits cached lookups off on CUDA
// (sync-free; docs/design.md section 10).
void reject_cache(const char* op, const std::optional<at::Tensor>& cache_arg) {
  TORCH_CHECK_NOT_IMPLEMENTED(
      !cache_arg.has_value(), op,
      ": the CUDA kernels take no cache arguments; call torchrec_tt.cache.cached_tt_embedding_bag, "
      "which serves cached rows outside the op on CUDA");
}

at::Tensor group_plan_cuda(
    const at::Tensor& indices_in,
    const at::Tensor& offsets_in,
    int64_t last_rows,
    int64_t num_rows,
    const std::optional<at::Tensor>& cache_ids) {
  constexpr const char* op = "group_plan";
  reject_cache(op, cache_ids);
  check_group_plan_inputs(op, indices_in, offsets_in, last_rows, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(indices_in.device());
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const int64_t nnz = indices.numel();
  const int64_t batch_size = offsets.numel() - 1;
  check_cuda_sizes(op, nnz, batch_size);
  if (check_bounds_mode()) {
    check_index_values_cuda(op, indices, offsets, batch_size, nnz, num_rows);
  }
  // The table's group count bounds the sort keys (0: unknown, full-width keys).
  const int64_t num_groups = num_rows >= 0 ? (num_rows + last_rows - 1) / last_rows : 0;
  at::Tensor plan = at::empty({PlanLayout::make(nnz, batch_size).numel}, indices.options().dtype(at::kLong));
  TORCHREC_TT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "group_plan_cuda", [&] {
    run_on_device(indices.device(), [&](LaunchCtx& ctx) {
      build_group_plan<index_t>(
          ctx, indices.data_ptr<index_t>(), offsets.data_ptr<index_t>(), batch_size, nnz, last_rows,
          num_groups, plan.data_ptr<int64_t>());
    });
  });
  return plan;
}

template <typename cuda_t, typename scalar_t>
CorePtrs<cuda_t> core_ptrs(const std::vector<at::Tensor>& cores) {
  CorePtrs<cuda_t> p;
  for (const auto k : c10::irange(cores.size())) {
    p.p[k] = reinterpret_cast<const cuda_t*>(cores[k].data_ptr<scalar_t>());
  }
  return p;
}

template <typename scalar_t, typename index_t>
LookupBatch<typename CudaScalar<scalar_t>::type, index_t> lookup_batch(const TTInputs& in, int64_t pooling_mode) {
  using cuda_t = typename CudaScalar<scalar_t>::type;
  LookupBatch<cuda_t, index_t> batch;
  batch.layout = in.layout;
  batch.cores = core_ptrs<cuda_t, scalar_t>(in.cores);
  batch.indices = in.indices.data_ptr<index_t>();
  batch.offsets = in.offsets.data_ptr<index_t>();
  batch.psw = in.psw.has_value() ? reinterpret_cast<const cuda_t*>(in.psw->data_ptr<scalar_t>()) : nullptr;
  batch.B = in.batch_size;
  batch.nnz = in.nnz;
  batch.pooling_mode = static_cast<int>(pooling_mode);
  return batch;
}

at::Tensor tt_embedding_bag_cuda(
    at::TensorList cores,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    int64_t pooling_mode,
    int64_t variant,
    const std::optional<at::Tensor>& plan_in,
    const std::optional<at::Tensor>& cache_weight,
    const std::optional<at::Tensor>& cache_ids) {
  constexpr const char* op = "tt_embedding_bag";
  reject_cache(op, cache_weight);
  reject_cache(op, cache_ids);
  const c10::cuda::CUDAGuard guard(indices.device());
  const TTInputs in = check_cuda_inputs(
      op, cores, indices, offsets, per_sample_weights, pooling_mode, variant, /*backward=*/false);
  const std::optional<at::Tensor> plan = check_plan(op, plan_in, in, variant);
  if (check_bounds_mode()) {
    check_index_values_cuda(op, in.indices, in.offsets, in.batch_size, in.nnz, in.layout.num_rows());
  }
  at::Tensor out = at::empty({in.batch_size, in.layout.embedding_dim()}, in.cores[0].options());
  TORCHREC_TT_DISPATCH_CUDA_FLOAT_TYPES(in.cores[0].scalar_type(), "tt_embedding_bag_cuda", [&] {
    using cuda_t = typename CudaScalar<scalar_t>::type;
    cuda_t* y = reinterpret_cast<cuda_t*>(out.data_ptr<scalar_t>());
    TORCHREC_TT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), "tt_embedding_bag_cuda_idx", [&] {
      const auto batch = lookup_batch<scalar_t, index_t>(in, pooling_mode);
      const int64_t* p = plan.has_value() ? plan->data_ptr<int64_t>() : nullptr;
      run_on_device(in.indices.device(), [&](LaunchCtx& ctx) {
        tt_forward(ctx, batch, static_cast<int>(variant), p, y);
      });
    });
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> tt_embedding_bag_backward_cuda(
    const at::Tensor& grad_output,
    at::TensorList cores,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    int64_t pooling_mode,
    int64_t variant,
    bool per_sample_weights_requires_grad,
    const std::optional<at::Tensor>& plan_in,
    const std::optional<at::Tensor>& cache_weight,
    const std::optional<at::Tensor>& cache_ids) {
  constexpr const char* op = "tt_embedding_bag_backward";
  reject_cache(op, cache_weight);
  reject_cache(op, cache_ids);
  const c10::cuda::CUDAGuard guard(indices.device());
  const TTInputs in = check_cuda_inputs(
      op, cores, indices, offsets, per_sample_weights, pooling_mode, variant, /*backward=*/true);
  check_backward_inputs(op, grad_output, in, per_sample_weights_requires_grad);
  const std::optional<at::Tensor> plan = check_plan(op, plan_in, in, variant);
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
    acc_grads.push_back(at::empty(c.sizes(), c.options().dtype(reduced ? at::kFloat : dtype)));
  }
  // Zeroed by the launcher (entries of invalid lookups stay 0).
  at::Tensor psw_grad = at::empty({per_sample_weights_requires_grad ? in.nnz : 0}, in.cores[0].options());
  TORCHREC_TT_DISPATCH_CUDA_FLOAT_TYPES(dtype, "tt_embedding_bag_backward_cuda", [&] {
    using cuda_t = typename CudaScalar<scalar_t>::type;
    using acc_t = acc_type<cuda_t>;
    const cuda_t* g = reinterpret_cast<const cuda_t*>(grad_out.data_ptr<scalar_t>());
    cuda_t* dpsw = per_sample_weights_requires_grad
        ? reinterpret_cast<cuda_t*>(psw_grad.data_ptr<scalar_t>())
        : nullptr;
    GradPtrs<acc_t> grads;
    for (const auto k : c10::irange(acc_grads.size())) {
      grads.p[k] = acc_grads[k].data_ptr<acc_t>();
    }
    TORCHREC_TT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), "tt_embedding_bag_backward_cuda_idx", [&] {
      const auto batch = lookup_batch<scalar_t, index_t>(in, pooling_mode);
      const int64_t* p = plan.has_value() ? plan->data_ptr<int64_t>() : nullptr;
      run_on_device(in.indices.device(), [&](LaunchCtx& ctx) {
        tt_backward(ctx, batch, static_cast<int>(variant), p, g, grads, dpsw, deterministic);
      });
    });
  });
  std::vector<at::Tensor> core_grads;
  core_grads.reserve(acc_grads.size());
  for (auto& gk : acc_grads) {
    core_grads.push_back(reduced ? gk.to(dtype) : gk);
  }
  return {core_grads, psw_grad, at::empty({0}, in.cores[0].options())};
}

} // namespace
} // namespace torchrec_tt::gpu

TORCH_LIBRARY_IMPL(torchrec_tt, CUDA, m) {
  m.impl("group_plan", &torchrec_tt::gpu::group_plan_cuda);
  m.impl("tt_embedding_bag", &torchrec_tt::gpu::tt_embedding_bag_cuda);
  m.impl("tt_embedding_bag_backward", &torchrec_tt::gpu::tt_embedding_bag_backward_cuda);
}
