// Compile-only check of the CUDA kernel headers (csrc/cuda/*.cuh), run by .ci/compile_cuda.sh:
//   nvcc -std=c++17 -arch=sm_90 -c csrc/cuda_check/compile_check.cu
// It instantiates every host entry point -- and through them every kernel template and dispatch
// branch -- for float/double/half/bfloat16 cores and int32/int64 indices. It needs no GPU and no
// torch headers, so a broken kernel fails CI on CPU machines. It lives outside csrc/cuda/ so that
// setup.py's csrc/cuda/*.cu glob does not build it into the extension. Nothing here is ever run.

#include <cstdlib>

#include "../cuda/tt_backward.cuh"
#include "../cuda/tt_forward.cuh"
#include "../cuda/tt_group_plan.cuh"
#include "../cuda/tt_input_checks.cuh"

namespace torchrec_tt::gpu::compile_check {

struct CheckCtx {
  cudaStream_t stream = nullptr;
  void* alloc(size_t bytes) {
    void* p = nullptr;
    check(cudaMallocAsync(&p, bytes, stream));
    return p;
  }
  void check_launch() {
    check(cudaGetLastError());
  }
  void check(cudaError_t err) {
    if (err != cudaSuccess) {
      std::abort();
    }
  }
};

template <typename scalar_t, typename index_t>
void instantiate(CheckCtx& ctx) {
  using acc_t = acc_type<scalar_t>;
  const int64_t m[4] = {3, 4, 5, 6};
  const int64_t n[4] = {2, 2, 2, 2};
  const int64_t R[5] = {1, 4, 4, 4, 1};
  const TTDims t = make_tt_dims(4, m, n, R);
  const CorePtrs<scalar_t> cores{};
  const index_t* idx = nullptr;
  const index_t* off = nullptr;
  const scalar_t* psw = nullptr;
  const scalar_t* grad = nullptr;
  scalar_t* out = nullptr;
  acc_t* grads[4] = {};
  const LookupBatch<scalar_t, index_t> batch{t, cores, idx, off, psw, 1, 1, 0};
  grt_forward(ctx, batch, out);
  tt_forward(ctx, batch, out);
  grt_backward(ctx, batch, grad, grads, out, true);
  tt_backward(ctx, batch, grad, grads, out, false);
  (void)max_smem_bytes(t, 1, true, sizeof(acc_t));
}

template <typename index_t>
void instantiate_index(CheckCtx& ctx) {
  group_plan_op<index_t>(ctx, nullptr, nullptr, 1, 1, 1, PlanOutputs{});
  launch_check_inputs<index_t>(ctx, nullptr, nullptr, 1, 1, -1, nullptr);
  instantiate<float, index_t>(ctx);
  instantiate<double, index_t>(ctx);
  instantiate<__half, index_t>(ctx);
  instantiate<__nv_bfloat16, index_t>(ctx);
}

void instantiate_all() {
  CheckCtx ctx;
  instantiate_index<int32_t>(ctx);
  instantiate_index<int64_t>(ctx);
}

} // namespace torchrec_tt::gpu::compile_check
