// ATen glue of the CUDA ops (included only by csrc/cuda/*.cu, compiled when torch has CUDA):
// the launch context over the current stream and the caching allocator, the c10 -> CUDA scalar type
// mapping, the mode switches read from the environment, the op-boundary checks of the CUDA path and
// the opt-in value checks.
#pragma once

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/irange.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "torchrec_tt/checks.h"
#include "torchrec_tt/dispatch.h"
#include "torchrec_tt/tt_layout.h"

#include "tt_backward.cuh"
#include "tt_cuda_common.cuh"
#include "tt_input_checks.cuh"

namespace torchrec_tt::gpu {

// Launch context (see tt_cuda_common.cuh): scratch from the CUDA caching allocator on the current
// stream; the tensors live until the op returns (stream-ordered reuse is safe: one stream).
struct TorchCudaCtx {
  cudaStream_t stream;
  at::TensorOptions byte_options;
  std::vector<at::Tensor> buffers;

  explicit TorchCudaCtx(const at::Device& device)
      : stream(c10::cuda::getCurrentCUDAStream(device.index()).stream()),
        byte_options(at::TensorOptions().dtype(at::kByte).device(device)) {}

  void* alloc(size_t bytes) {
    buffers.push_back(at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, byte_options));
    return buffers.back().data_ptr();
  }
  void check_launch() {
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  void check(cudaError_t err) {
    C10_CUDA_CHECK(err);
  }
};

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

inline bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

// Deterministic reductions in the backward (bit-identical gradients run to run): requested by
// torch.use_deterministic_algorithms(True) or TORCHREC_TT_DETERMINISTIC=1.
inline bool deterministic_mode() {
  return at::globalContext().deterministicAlgorithms() || env_flag("TORCHREC_TT_DETERMINISTIC");
}

// Value checks of indices/offsets on the device (costs a host sync): TORCHREC_TT_CHECK_BOUNDS=1.
inline bool check_bounds_mode() {
  return env_flag("TORCHREC_TT_CHECK_BOUNDS");
}

// Opt-in value checks, same messages as the CPU path. num_rows < 0: only indices >= 0.
inline void check_index_values_cuda(
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
    TorchCudaCtx ctx(indices.device());
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "torchrec_tt_check_bounds", [&] {
      launch_check_inputs<index_t>(
          ctx, indices.data_ptr<index_t>(), offsets.data_ptr<index_t>(), B, nnz, num_rows,
          reinterpret_cast<unsigned long long*>(err.data_ptr<int64_t>()));
    });
  }
  const at::Tensor e = err.cpu(); // host sync (opt-in)
  const int64_t flags = e.data_ptr<int64_t>()[0];
  if (flags == 0) {
    return;
  }
  const at::Tensor off = offsets.cpu();
  const at::Tensor off64 = off.to(at::kLong);
  const int64_t* o = off64.data_ptr<int64_t>();
  TORCH_CHECK((flags & 2) == 0, op, ": offsets[0] must be 0, got ", o[0]);
  TORCH_CHECK(
      (flags & 4) == 0, op, ": offsets[-1] (offsets[", B, "]) must equal indices.numel() = ", nnz,
      ", got ", o[B]);
  if ((flags & 8) != 0) {
    const int64_t b = e.data_ptr<int64_t>()[2];
    TORCH_CHECK(
        false, op, ": offsets must be non-decreasing, but offsets[", b, "] = ", o[b], " > offsets[",
        b + 1, "] = ", o[b + 1]);
  }
  if ((flags & 1) != 0) {
    const int64_t j = e.data_ptr<int64_t>()[1];
    const int64_t v = indices.select(0, j).item<int64_t>();
    if (num_rows < 0) {
      TORCH_CHECK(false, op, ": indices[", j, "] = ", v, " is negative");
    }
    TORCH_CHECK(false, op, ": indices[", j, "] = ", v, " is out of range [0, ", num_rows, ")");
  }
}

// Inputs of tt_embedding_bag(_backward) on CUDA, checked and made contiguous.
struct CudaInputs : TTInputs {
  TTDims dims;
};

inline CudaInputs check_cuda_inputs(
    const char* op,
    at::TensorList cores,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    int64_t pooling_mode,
    int64_t variant,
    bool backward) {
  CudaInputs in;
  static_cast<TTInputs&>(in) = check_tt_inputs(
      op, cores, indices, offsets, per_sample_weights, pooling_mode, variant, c10::DeviceType::CUDA,
      /*allow_reduced_precision=*/true);
  const TTLayout& L = in.layout;
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(
      in.nnz < kIntMax, op, ": the CUDA kernels support fewer than 2^31 - 1 indices, got ", in.nnz);
  TORCH_CHECK(
      in.batch_size < kIntMax, op, ": the CUDA kernels support fewer than 2^31 - 1 bags, got ",
      in.batch_size);
  TORCH_CHECK(
      L.embedding_dim() <= kMaxEmbeddingDimGpu, op, ": the CUDA kernels support embedding_dim = "
      "prod(n_k) <= ", kMaxEmbeddingDimGpu, ", got ", L.embedding_dim());
  int64_t chain = 1;
  int64_t act_size = 0; // a slot's activation record (sum of the prefix chain sizes)
  for (const auto k : c10::irange(L.d)) {
    TORCH_CHECK(
        L.m[k] < kIntMax, op, ": the CUDA kernels support cores[k].size(0) < 2^31 - 1, got cores[",
        k, "].size(0) = ", L.m[k]);
    chain *= L.n[k];
    TORCH_CHECK(
        chain * L.R[k + 1] <= kIntMax && L.slice_numel(k) <= kIntMax, op,
        ": TT sizes too large for the CUDA kernels at cores[", k, "] (shape ", cores[k].sizes(), ")");
    if (k + 1 < L.d) {
      act_size += chain * L.R[k + 1];
    }
  }
  TORCH_CHECK(
      act_size <= kIntMax, op, ": TT sizes too large for the CUDA kernels (prefix chain of ",
      act_size, " values)");
  int64_t m[kMaxCoresGpu] = {};
  int64_t n[kMaxCoresGpu] = {};
  int64_t R[kMaxCoresGpu + 1] = {};
  for (const auto k : c10::irange(L.d)) {
    m[k] = L.m[k];
    n[k] = L.n[k];
  }
  for (const auto k : c10::irange(L.d + 1)) {
    R[k] = L.R[k];
  }
  in.dims = make_tt_dims(static_cast<int>(L.d), m, n, R);
  const size_t acc_bytes = cores[0].scalar_type() == at::kDouble ? sizeof(double) : sizeof(float);
  const size_t smem = max_smem_bytes(in.dims, static_cast<int>(variant), backward, acc_bytes);
  int smem_optin = 0; // host-side attribute query, no sync
  C10_CUDA_CHECK(cudaDeviceGetAttribute(
      &smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, cores[0].device().index()));
  const size_t smem_limit = static_cast<size_t>(smem_optin);
  TORCH_CHECK(
      smem <= smem_limit, op, ": TT shapes too large for the CUDA kernels (variant ", variant,
      "): they need ", smem, " bytes of shared memory per block, the device allows ", smem_limit,
      "; reduce the ranks or the dim factors n_k");
  make_tt_inputs_contiguous(in, cores, indices, offsets, per_sample_weights);
  return in;
}

} // namespace torchrec_tt::gpu
