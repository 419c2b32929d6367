// Common pieces of the torchrec_tt CUDA kernels: portability macros, dtype conversion, the TT sizes
// passed to kernels, small device helpers and the host-side launch context concept.
//
// Kernel headers (csrc/cuda/*.cuh) include only CUDA's own headers and plain C++ (no ATen/c10) so
// that they compile on machines whose torch wheel has no CUDA headers; the thin csrc/cuda/*.cu files
// include ATen, check inputs, dispatch and call the host functions defined here.
//
// Emulation: with TORCHREC_TT_CUDA_EMULATION defined (csrc/cuda_check/cuda_emu.h included first),
// the same kernel and host code compiles with a host C++ compiler and runs on CPU threads (one host
// thread per CUDA thread, real barriers for __syncthreads/__syncwarp); cub is replaced by std
// algorithms. It is only a test vehicle (.ci/compile_cuda.sh), never part of the extension.
//
// Every kernel defined in these headers is a template (kernels without a natural parameter take a
// defaulted `typename Unused = void`): a non-template __global__ function cannot be `inline`, so it
// would be defined twice once two .cu files include the header (.ci/compile_cuda.sh links two
// translation units to catch that). Host functions are templates or `inline`.
//
// Host "launch context" concept (Ctx), implemented by the .cu files (and by the emulation):
//   cudaStream_t stream;               // every kernel, memset and cub call runs on it
//   void* alloc(size_t bytes);         // device scratch, stream-ordered, valid until the op returns
//   void check_launch();               // called after every kernel launch
//   void check(cudaError_t err);       // called on the status of CUDA runtime / cub calls
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(TORCHREC_TT_CUDA_EMULATION)
#if !defined(TORCHREC_TT_CUDA_EMU_H)
#error "TORCHREC_TT_CUDA_EMULATION: include csrc/cuda_check/cuda_emu.h before the kernel headers"
#endif
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

// Kernel launch. `kernel` must be a plain name (use a local function pointer for template ids).
#if defined(TORCHREC_TT_CUDA_EMULATION)
#define TORCHREC_TT_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::tt_emu::launch(kernel, grid, block, smem, __VA_ARGS__)
#define TORCHREC_TT_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::tt_emu::dynamic_smem())
#else
#define TORCHREC_TT_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
// One untyped extern array for every kernel (typed extern __shared__ arrays of different types
// conflict between template instantiations).
#define TORCHREC_TT_DYNAMIC_SMEM(T, name)                                  \
  extern __shared__ __align__(16) unsigned char torchrec_tt_dynamic_smem[]; \
  T* name = reinterpret_cast<T*>(torchrec_tt_dynamic_smem)
#endif

namespace torchrec_tt::gpu {

constexpr int kWarpSize = 32;
constexpr int kMaxCoresGpu = 4;
// Largest embedding dim the kernels support (register tiles of the bag kernels).
constexpr int kMaxEmbeddingDimGpu = 1024;
// Cap on the grid of block-per-item and element kernels; they loop (grid-stride) over the rest.
// (Overridable so that the emulation test can exercise those loops with tiny grids.)
#ifndef TORCHREC_TT_MAX_GRID_BLOCKS
#define TORCHREC_TT_MAX_GRID_BLOCKS 65536
#endif
constexpr int64_t kMaxGridBlocks = TORCHREC_TT_MAX_GRID_BLOCKS;

// ---------------------------------------------------------------------------------------------
// dtype conversion (explicit intrinsics: extensions build with __CUDA_NO_HALF_CONVERSIONS__ etc.)
// ---------------------------------------------------------------------------------------------

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

__host__ __device__ __forceinline__ float to_acc(float x) {
  return x;
}
__host__ __device__ __forceinline__ double to_acc(double x) {
  return x;
}
__host__ __device__ __forceinline__ float to_acc(__half x) {
  return __half2float(x);
}
__host__ __device__ __forceinline__ float to_acc(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename scalar_t>
struct FromAcc;
template <>
struct FromAcc<float> {
  __host__ __device__ static __forceinline__ float cvt(float x) {
    return x;
  }
};
template <>
struct FromAcc<double> {
  __host__ __device__ static __forceinline__ double cvt(double x) {
    return x;
  }
};
template <>
struct FromAcc<__half> {
  __host__ __device__ static __forceinline__ __half cvt(float x) {
    return __float2half_rn(x);
  }
};
template <>
struct FromAcc<__nv_bfloat16> {
  __host__ __device__ static __forceinline__ __nv_bfloat16 cvt(float x) {
    return __float2bfloat16_rn(x);
  }
};
template <typename scalar_t, typename acc_t>
__host__ __device__ __forceinline__ scalar_t from_acc(acc_t x) {
  return FromAcc<scalar_t>::cvt(x);
}

// ---------------------------------------------------------------------------------------------
// TT sizes (derived once on the host, passed by value to kernels).
// ---------------------------------------------------------------------------------------------

// Core k is a contiguous (m_k, R[k], n_k, R[k+1]) tensor; the chain after core k is an
// (N_k x R[k+1]) matrix with N_k = n_0 ... n_k (chain[k]); the prefix Q of a group is the chain
// after core d-2 (N' x R'); a row is Q @ core_{d-1}[last] viewed (R' x n_l).
struct TTDims {
  int d = 0;
  int64_t m[kMaxCoresGpu] = {}; // row factors
  int n[kMaxCoresGpu] = {}; // dim factors
  int R[kMaxCoresGpu + 1] = {}; // full ranks, R[0] = R[d] = 1
  int64_t slice[kMaxCoresGpu] = {}; // R[k] * n_k * R[k+1]
  int chain[kMaxCoresGpu] = {}; // N_k = n_0 * ... * n_k
  int64_t num_rows = 0; // prod(m)
  int64_t num_groups = 0; // prod(m_0 .. m_{d-2})
  int N = 0; // embedding dim
  int Np = 0; // N' = chain[d-2]
  int Rp = 0; // R' = R[d-1]
  int nl = 0; // n_{d-1}
  int Rn = 0; // R' * n_l (one slice of the last core)
  // Per-slot activation record (backward): A_k (N_k x R[k+1], row-major) for k = 0..d-2 at
  // act_off[k]; A_{d-2} = Q. act_size = sum of their sizes.
  int act_off[kMaxCoresGpu] = {};
  int act_size = 0;
  int max_chain_prefix = 0; // max_{k <= d-3} N_k R[k+1] (smem intermediates of the prefix kernel)
  int max_chain = 0; // max_{k <= d-2} N_k R[k+1]
  int max_chain_all = 0; // max_{k <= d-1} N_k R[k+1] (includes the row, N x 1)
};

// Host: sizes from the core shapes (m_k, R[k], n_k, R[k+1]); the caller has validated ranges
// (every product below fits in int).
inline TTDims make_tt_dims(int d, const int64_t* m, const int64_t* n, const int64_t* R) {
  TTDims t;
  t.d = d;
  t.num_rows = 1;
  t.num_groups = 1;
  int chain = 1;
  for (int k = 0; k < d; ++k) {
    t.m[k] = m[k];
    t.n[k] = static_cast<int>(n[k]);
    t.num_rows *= m[k];
    if (k + 1 < d) {
      t.num_groups *= m[k];
    }
  }
  for (int k = 0; k <= d; ++k) {
    t.R[k] = static_cast<int>(R[k]);
  }
  int off = 0;
  for (int k = 0; k < d; ++k) {
    chain *= t.n[k];
    t.chain[k] = chain;
    t.slice[k] = static_cast<int64_t>(t.R[k]) * t.n[k] * t.R[k + 1];
    const int inter = chain * t.R[k + 1];
    if (k + 1 < d) {
      t.act_off[k] = off;
      off += inter;
      t.max_chain = inter > t.max_chain ? inter : t.max_chain;
    }
    if (k + 2 < d) {
      t.max_chain_prefix = inter > t.max_chain_prefix ? inter : t.max_chain_prefix;
    }
    t.max_chain_all = inter > t.max_chain_all ? inter : t.max_chain_all;
  }
  t.act_size = off;
  t.N = t.chain[d - 1];
  t.Np = t.chain[d - 2];
  t.Rp = t.R[d - 1];
  t.nl = t.n[d - 1];
  t.Rn = t.Rp * t.nl;
  return t;
}

template <typename scalar_t>
struct CorePtrs {
  const scalar_t* p[kMaxCoresGpu] = {};
};

// One table's batch for the host orchestration (tt/grt forward and backward): the TT sizes, the
// cores and the lookups (device pointers, contiguous; psw nullable), B bags and nnz lookups
// (< 2^31, checked by the caller), pooling_mode 0 = sum, 1 = mean.
template <typename scalar_t, typename index_t>
struct LookupBatch {
  TTDims t;
  CorePtrs<scalar_t> cores;
  const index_t* indices = nullptr;
  const index_t* offsets = nullptr;
  const scalar_t* psw = nullptr;
  int64_t B = 0;
  int64_t nnz = 0;
  int pooling_mode = 0;
};

// ---------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------

template <typename T>
__host__ __device__ __forceinline__ T tt_min(T a, T b) {
  return a < b ? a : b;
}
template <typename T>
__host__ __device__ __forceinline__ T tt_max(T a, T b) {
  return a < b ? b : a;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = kWarpSize / 2; o > 0; o >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  return v;
}

// First position in [0, n) of a non-decreasing array with a[pos] >= value (n if none).
__device__ __forceinline__ int64_t lower_bound_i64(const int64_t* a, int64_t n, int64_t value) {
  int64_t lo = 0;
  int64_t hi = n;
  while (lo < hi) {
    const int64_t mid = lo + ((hi - lo) >> 1);
    if (a[mid] < value) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Digits (i_0, ..., i_{d-2}) of a group id, i_0 most significant.
__device__ __forceinline__ void group_digits_dev(const TTDims& t, int64_t group, int64_t* digits) {
  for (int k = t.d - 2; k >= 0; --k) {
    digits[k] = group % t.m[k];
    group /= t.m[k];
  }
}

// Digits (i_0, ..., i_{d-1}) of a row id, i_0 most significant.
__device__ __forceinline__ void row_digits_dev(const TTDims& t, int64_t row, int64_t* digits) {
  for (int k = t.d - 1; k >= 0; --k) {
    digits[k] = row % t.m[k];
    row /= t.m[k];
  }
}

// offsets[b] clamped into [0, nnz] (never trusts device values for addressing).
template <typename index_t>
__device__ __forceinline__ int64_t offset_clamped(const index_t* offsets, int64_t b, int64_t nnz) {
  const int64_t o = static_cast<int64_t>(offsets[b]);
  return o < 0 ? 0 : (o > nnz ? nnz : o);
}

// ---------------------------------------------------------------------------------------------
// Host helpers
// ---------------------------------------------------------------------------------------------

// Bits needed to represent v (0 -> 0, 1 -> 1, 2..3 -> 2, ...).
inline int bit_width_u64(uint64_t v) {
  int b = 0;
  while (v != 0) {
    ++b;
    v >>= 1;
  }
  return b;
}

inline int64_t ceil_div_i64(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Grid for a grid-stride element loop over n items.
inline unsigned int grid_for_elems(int64_t n, int threads) {
  const int64_t blocks = ceil_div_i64(n, threads);
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > kMaxGridBlocks ? kMaxGridBlocks : blocks));
}

// Grid for a block-per-item loop over (at most) n items.
inline unsigned int grid_for_items(int64_t n) {
  return static_cast<unsigned int>(n < 1 ? 1 : (n > kMaxGridBlocks ? kMaxGridBlocks : n));
}

template <typename T, typename Ctx>
T* alloc_n(Ctx& ctx, int64_t n) {
  const size_t bytes = static_cast<size_t>(n > 0 ? n : 1) * sizeof(T);
  return static_cast<T*>(ctx.alloc(bytes));
}

template <typename Ctx>
void memset_async(Ctx& ctx, void* ptr, int value, size_t bytes) {
  if (bytes == 0) {
    return;
  }
#if defined(TORCHREC_TT_CUDA_EMULATION)
  std::memset(ptr, value, bytes);
#else
  ctx.check(cudaMemsetAsync(ptr, value, bytes, ctx.stream));
#endif
}

// Opt a kernel into more than 48 KiB of dynamic shared memory when needed (host-only call, no
// sync). The caller has checked `bytes` against the device's opt-in limit.
template <typename Ctx, typename Kernel>
void set_dynamic_smem(Ctx& ctx, Kernel kernel, size_t bytes) {
#if !defined(TORCHREC_TT_CUDA_EMULATION)
  if (bytes > 48 * 1024) {
    ctx.check(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
#else
  (void)ctx;
  (void)kernel;
  (void)bytes;
#endif
}

} // namespace torchrec_tt::gpu
