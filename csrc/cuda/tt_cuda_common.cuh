// Device helpers shared by every torchrec_tt kernel file (group_plan_cuda.cu, tt_forward_cuda.cu,
// tt_backward_cuda.cu): launch macro with launch accounting, dtype conversion, kernel geometry
// derived from torchrec_tt::TTLayout, vector loads, the block-cooperative TT chain steps and the
// device-wide primitives (cub radix sort; a scan whose output functor writes the plan directly, so
// numbering runs costs one launch, not flags + scan + write).
//
// Includes only CUDA and project headers: under TORCHREC_TT_CUDA_EMULATION (cuda_emu.h forced in)
// the kernel files compile as C++ and run on CPU threads, with cub replaced by std algorithms.
// Kernels are templates (or in one .cu only), host helpers inline: a header may be included by
// several translation units.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "tt_launch.h"

#if defined(TORCHREC_TT_CUDA_EMULATION)
#include <algorithm>
#include <numeric>
#include <vector>
#else
#include <mutex>
#include <set>
// cub/thrust in the project's own namespace (as FBGEMM does), so that its instantiations never
// collide with those of torch (at_cuda_detail) or of another extension. These files include no
// ATen header, hence not ATen/cuda/cub.cuh.
#ifndef CUB_WRAPPED_NAMESPACE
#define CUB_WRAPPED_NAMESPACE torchrec_tt_cub
#endif
#ifndef THRUST_WRAPPED_NAMESPACE
#define THRUST_WRAPPED_NAMESPACE torchrec_tt_thrust
#endif
// GCC's -Wmaybe-uninitialized misfires inside cub's scan dispatch (CUDA 13.0) once its iterators are
// not raw pointers; the build treats warnings as errors.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/iterator/tabulate_output_iterator.h>
#include <thrust/iterator/transform_iterator.h>
namespace torchrec_tt::gpu {
namespace cub = ::CUB_WRAPPED_NAMESPACE::cub;
namespace thrust = ::THRUST_WRAPPED_NAMESPACE::thrust;
} // namespace torchrec_tt::gpu
#endif

// Kernel launch on ctx's stream; counted in ctx.launches, skipped in the sizing pass. `kernel` must
// be a plain name (use a local function pointer for template ids).
#if defined(TORCHREC_TT_CUDA_EMULATION)
#define TORCHREC_TT_LAUNCH(ctx, kernel, grid, block, smem, ...) \
  do {                                                          \
    if ((ctx).begin_launch()) {                                 \
      ::tt_emu::launch(kernel, grid, block, smem, __VA_ARGS__); \
    }                                                           \
  } while (0)
#define TORCHREC_TT_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::tt_emu::dynamic_smem())
#else
#define TORCHREC_TT_LAUNCH(ctx, kernel, grid, block, smem, ...)     \
  do {                                                              \
    if ((ctx).begin_launch()) {                                     \
      kernel<<<grid, block, smem, (ctx).stream>>>(__VA_ARGS__);     \
      (ctx).check(cudaGetLastError());                              \
    }                                                               \
  } while (0)
// One untyped extern array for every kernel (typed extern __shared__ arrays of different types
// conflict between template instantiations).
#define TORCHREC_TT_DYNAMIC_SMEM(T, name)                                  \
  extern __shared__ __align__(16) unsigned char torchrec_tt_dynamic_smem[]; \
  T* name = reinterpret_cast<T*>(torchrec_tt_dynamic_smem)
#endif

#define TORCHREC_TT_GRID_STRIDE(i, n)                                                    \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

// Explicit instantiation of a launcher for every (core dtype, index dtype) pair.
#define TORCHREC_TT_INSTANTIATE_SCALAR_INDEX(M) \
  M(float, int32_t)                             \
  M(float, int64_t)                             \
  M(double, int32_t)                            \
  M(double, int64_t)                            \
  M(__half, int32_t)                            \
  M(__half, int64_t)                            \
  M(__nv_bfloat16, int32_t)                     \
  M(__nv_bfloat16, int64_t)

namespace torchrec_tt::gpu {

constexpr int kWarpSize = 32;
constexpr int kElemThreads = 256;
// Cap on the grid of block-per-item and element kernels; they loop (grid-stride) over the rest.
// (Overridable so that the emulation test can exercise those loops with tiny grids.)
#ifndef TORCHREC_TT_MAX_GRID_BLOCKS
#define TORCHREC_TT_MAX_GRID_BLOCKS 65536
#endif
constexpr int64_t kMaxGridBlocks = TORCHREC_TT_MAX_GRID_BLOCKS;
constexpr int64_t kMaxGridY = kMaxGridBlocks < 65535 ? kMaxGridBlocks : 65535; // tiles loop past it

// ---------------------------------------------------------------------------------------------
// dtype conversion (explicit intrinsics: extensions build with __CUDA_NO_HALF_CONVERSIONS__ etc.)
// ---------------------------------------------------------------------------------------------

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
// Vector loads: kVec elements of scalar_t in one 8- or 16-byte load where the address is aligned.
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
struct VecWidth {
  static constexpr int value = sizeof(scalar_t) >= 8 ? 2 : 4; // 16 bytes (fp32/fp64), 8 (fp16)
};

template <typename scalar_t, int V>
struct alignas(sizeof(scalar_t) * V) Vec {
  scalar_t v[V];
};

template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_vec(const scalar_t* __restrict__ p, acc_t (&out)[V]) {
  const Vec<scalar_t, V> x = *reinterpret_cast<const Vec<scalar_t, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) {
    out[i] = to_acc(x.v[i]);
  }
}

// True when n elements from p can be read as whole vectors of V (address and length aligned).
template <int V, typename scalar_t>
inline bool vec_aligned(const scalar_t* p, int64_t row_len) {
  return row_len % V == 0 && reinterpret_cast<uintptr_t>(p) % (sizeof(scalar_t) * V) == 0;
}

// ---------------------------------------------------------------------------------------------
// Kernel geometry, derived once on the host from the shared TTLayout and passed by value.
// ---------------------------------------------------------------------------------------------

// The chain after core k is an (N_k x R[k+1]) matrix with N_k = n_0 ... n_k (chain[k]); the prefix Q
// of a group is the chain after core d-2 (N' x R'); a row is Q @ core_{d-1}[last] viewed (R' x n_l).
// Per-slot activation record (backward): A_k (N_k x R[k+1], row-major) for k = 0..d-2 at act_off[k].
// All sizes fit in int (checked at the op boundary): inner loops use 32-bit index math.
struct KernelShape {
  TTLayout L;
  int d = 0;
  int N = 0; // embedding dim
  int Np = 0; // N'
  int Rp = 0; // R'
  int nl = 0; // n_{d-1}
  int Rn = 0; // R' * n_l: one slice of the last core
  int chain[kMaxCores] = {};
  int slice[kMaxCores] = {}; // R[k] n_k R[k+1]
  int act_off[kMaxCores] = {};
  int act_size = 0;
  int max_chain_prefix = 0; // max_{k <= d-3} N_k R[k+1]
  int max_chain = 0; // max_{k <= d-2} N_k R[k+1]
  int max_chain_all = 0; // max_{k <= d-1} N_k R[k+1]
  int64_t num_groups = 0;
  int64_t m_last = 0;
  __host__ __device__ __forceinline__ int n(int k) const {
    return static_cast<int>(L.n[k]);
  }
  __host__ __device__ __forceinline__ int R(int k) const {
    return static_cast<int>(L.R[k]);
  }
  // Columns of core k's slice viewed R[k] x (n_k R[k+1]).
  __host__ __device__ __forceinline__ int cols(int k) const {
    return static_cast<int>(L.n[k] * L.R[k + 1]);
  }
};

inline KernelShape make_kernel_shape(const TTLayout& L) {
  KernelShape t;
  t.L = L;
  t.d = static_cast<int>(L.d);
  int off = 0;
  for (int k = 0; k < t.d; ++k) {
    t.chain[k] = static_cast<int>(L.chain_rows(k));
    t.slice[k] = static_cast<int>(L.slice_numel(k));
    const int inter = t.chain[k] * static_cast<int>(L.R[k + 1]);
    if (k + 1 < t.d) {
      t.act_off[k] = off;
      off += inter;
      t.max_chain = inter > t.max_chain ? inter : t.max_chain;
    }
    if (k + 2 < t.d) {
      t.max_chain_prefix = inter > t.max_chain_prefix ? inter : t.max_chain_prefix;
    }
    t.max_chain_all = inter > t.max_chain_all ? inter : t.max_chain_all;
  }
  t.act_size = off;
  t.N = static_cast<int>(L.embedding_dim());
  t.Np = static_cast<int>(L.prefix_dim());
  t.Rp = static_cast<int>(L.prefix_rank());
  t.nl = static_cast<int>(L.last_dim());
  t.Rn = t.Rp * t.nl;
  t.num_groups = L.num_groups();
  t.m_last = L.last_rows();
  return t;
}

// ---------------------------------------------------------------------------------------------
// Small device helpers
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

// offsets[b] clamped into [0, nnz] (device values never address memory unchecked).
template <typename index_t>
__host__ __device__ __forceinline__ int64_t offset_clamped(
    const index_t* offsets,
    int64_t b,
    int64_t nnz) {
  const int64_t o = static_cast<int64_t>(offsets[b]);
  return o < 0 ? 0 : (o > nnz ? nnz : o);
}

// The bag of lookup j: b with offsets[b] <= j < offsets[b+1] (clamped offsets, upper bound), or -1.
// Per lookup (not per bag), in the plan builder and the tt kernels only.
template <typename index_t>
__host__ __device__ __forceinline__ int64_t lookup_bag_of(
    const index_t* offsets,
    int64_t B,
    int64_t nnz,
    int64_t j) {
  int64_t lo = 0;
  int64_t hi = B + 1;
  while (lo < hi) {
    const int64_t mid = lo + ((hi - lo) >> 1);
    if (offset_clamped(offsets, mid, nnz) <= j) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  const int64_t b = lo - 1;
  const bool ok = b >= 0 && b < B && j >= offset_clamped(offsets, b, nnz) &&
      j < offset_clamped(offsets, b + 1, nnz);
  return ok ? b : -1;
}

// Pooling scale of bag b: 1 / L_b for mean pooling with L_b > 0, else 1. pooling_mode: a
// PoolingMode value (enums.h).
template <typename acc_t, typename index_t>
__device__ __forceinline__ acc_t bag_scale(
    const index_t* offsets,
    int64_t b,
    int64_t nnz,
    int pooling_mode) {
  const int64_t len = offset_clamped(offsets, b + 1, nnz) - offset_clamped(offsets, b, nnz);
  const bool mean = static_cast<PoolingMode>(pooling_mode) == PoolingMode::kMean;
  return (mean && len > 0) ? acc_t(1) / static_cast<acc_t>(len) : acc_t(1);
}

// A plan header count clamped into [0, hi].
__device__ __forceinline__ int plan_count(const int64_t* header, PlanHeader field, int64_t hi) {
  const int64_t v = header[static_cast<int64_t>(field)];
  return static_cast<int>(v < 0 ? 0 : (v > hi ? hi : v));
}

// ---------------------------------------------------------------------------------------------
// Block-cooperative TT chain steps (all threads of a 1-D block call them with the same arguments;
// none contains a barrier -- callers separate dependent steps with __syncthreads()).
//
// With A_{-1} = [1] the chain is A_k = A_{k-1} @ core_k[i_k].view(R[k], n_k R[k+1]), viewed
// (N_k x R[k+1]). Backward through one step: dA_{k-1} = dA_k' @ C_k^T, dC_k += A_{k-1}^T @ dA_k'
// (dA_k' = dA_k viewed N_{k-1} x n_k R[k+1]).
// ---------------------------------------------------------------------------------------------

// Entry e of a step's result: written to out and out_copy (each may be null) and, with out_t,
// transposed into the (t_cols x total / t_cols) matrix out_t.
template <typename acc_t>
__device__ __forceinline__ void store_chain_entry(
    int e,
    acc_t v,
    int total,
    acc_t* out,
    acc_t* out_copy,
    acc_t* out_t,
    int t_cols) {
  if (out != nullptr) {
    out[e] = v;
  }
  if (out_copy != nullptr) {
    out_copy[e] = v;
  }
  if (out_t != nullptr) {
    const int rows = total / t_cols;
    const int row = e / t_cols;
    out_t[(e - row * t_cols) * rows + row] = v;
  }
}

// out = A (Nprev x Rk, acc_t) @ C (Rk x L, scalar_t, global). Each thread computes 4 adjacent
// columns of one row when L % 4 == 0 (one A load per 4 FMAs; C read as a vector when aligned).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void block_chain_step(
    const acc_t* A,
    const scalar_t* __restrict__ C,
    int Nprev,
    int Rk,
    int L,
    acc_t* out,
    acc_t* out_copy,
    acc_t* out_t,
    int t_cols) {
  const int total = Nprev * L;
  if ((L & 3) == 0) {
    const bool vec = VecWidth<scalar_t>::value == 4 &&
        reinterpret_cast<uintptr_t>(C) % (4 * sizeof(scalar_t)) == 0;
    const int L4 = L >> 2;
    for (int e4 = threadIdx.x; e4 < Nprev * L4; e4 += blockDim.x) {
      const int p = e4 / L4;
      const int c0 = (e4 - p * L4) << 2;
      const acc_t* a_row = A + p * Rk;
      acc_t acc[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
      for (int a = 0; a < Rk; ++a) {
        const acc_t x = a_row[a];
        const scalar_t* c = C + a * L + c0;
        acc_t cv[4];
        if (vec) {
          load_vec<4>(c, cv);
        } else {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            cv[i] = to_acc(c[i]);
          }
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          acc[i] += x * cv[i];
        }
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        store_chain_entry(p * L + c0 + i, acc[i], total, out, out_copy, out_t, t_cols);
      }
    }
    return;
  }
  for (int e = threadIdx.x; e < total; e += blockDim.x) {
    const int p = e / L;
    const int rem = e - p * L;
    const acc_t* a_row = A + p * Rk;
    acc_t acc = acc_t(0);
    for (int a = 0; a < Rk; ++a) {
      acc += a_row[a] * to_acc(C[a * L + rem]);
    }
    store_chain_entry(e, acc, total, out, out_copy, out_t, t_cols);
  }
}

// First step: A_0 = core_0[i_0] viewed (n_0 x R[1]); same outputs as block_chain_step.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void block_chain_first(
    const scalar_t* __restrict__ C,
    int total,
    acc_t* out,
    acc_t* out_copy,
    acc_t* out_t,
    int t_cols) {
  for (int e = threadIdx.x; e < total; e += blockDim.x) {
    store_chain_entry(e, to_acc(C[e]), total, out, out_copy, out_t, t_cols);
  }
}

// dAprev (Nprev x Rk) = dA (Nprev x L) @ C^T, C (Rk x L, global).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void block_chain_step_back(
    const acc_t* dA,
    const scalar_t* __restrict__ C,
    int Nprev,
    int Rk,
    int L,
    acc_t* dAprev) {
  const int total = Nprev * Rk;
  for (int e = threadIdx.x; e < total; e += blockDim.x) {
    const int p = e / Rk;
    const int a = e - p * Rk;
    const acc_t* d_row = dA + p * L;
    const scalar_t* c_row = C + a * L;
    acc_t acc = acc_t(0);
    for (int r = 0; r < L; ++r) {
      acc += d_row[r] * to_acc(c_row[r]);
    }
    dAprev[e] = acc;
  }
}

// Element (a, rem) of A_{k-1}^T @ dA_k' (the gradient of core_k[i_k], R[k] x L): sum over the
// Nprev rows; Aprev == nullptr means A_{-1} = [1] (k = 0: the gradient is dA_0 itself).
template <typename acc_t>
__device__ __forceinline__ acc_t core_grad_elem(
    const acc_t* Aprev,
    const acc_t* dA,
    int Nprev,
    int Rk,
    int L,
    int a,
    int rem) {
  if (Aprev == nullptr) {
    return dA[rem];
  }
  acc_t acc = acc_t(0);
  for (int p = 0; p < Nprev; ++p) {
    acc += Aprev[p * Rk + a] * dA[p * L + rem];
  }
  return acc;
}

// ---------------------------------------------------------------------------------------------
// Host helpers: grids, memsets, dynamic shared memory, device-wide primitives
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

// grid.y for a loop over `tiles` element tiles (the kernels loop past kMaxGridY).
inline unsigned int grid_y_for_tiles(int64_t tiles) {
  return static_cast<unsigned int>(tiles < 1 ? 1 : (tiles > kMaxGridY ? kMaxGridY : tiles));
}

template <typename Kernel, typename... Args>
void launch_elems(LaunchCtx& ctx, Kernel kernel, int64_t n, Args... args) {
  if (n <= 0) {
    return;
  }
  TORCHREC_TT_LAUNCH(ctx, kernel, grid_for_elems(n, kElemThreads), kElemThreads, 0, args...);
}

inline void memset_async(LaunchCtx& ctx, void* ptr, int value, size_t bytes) {
  if (bytes == 0 || !ctx.begin_launch()) {
    return;
  }
#if defined(TORCHREC_TT_CUDA_EMULATION)
  std::memset(ptr, value, bytes);
#else
  ctx.check(cudaMemsetAsync(ptr, value, bytes, ctx.stream));
#endif
}

// Buffers zeroed together by one launch (a backward would otherwise issue one memset per core
// gradient, per-sample-weight gradient and accumulation buffer). Pointers must be 4-byte aligned.
struct ZeroList {
  static constexpr int kMax = 8;
  void* ptr[kMax] = {};
  int64_t bytes[kMax] = {};
  int n = 0;
  void add(void* p, int64_t b) {
    if (b > 0 && n < kMax) {
      ptr[n] = p;
      bytes[n] = b;
      ++n;
    }
  }
};

template <typename Unused = void>
__global__ void zero_kernel(ZeroList z) {
  for (int i = 0; i < z.n; ++i) {
    uint32_t* const words = static_cast<uint32_t*>(z.ptr[i]);
    const int64_t nwords = z.bytes[i] / 4;
    TORCHREC_TT_GRID_STRIDE(w, nwords) {
      words[w] = 0u;
    }
    const int64_t tail = z.bytes[i] - 4 * nwords;
    if (blockIdx.x == 0 && threadIdx.x < tail) {
      static_cast<unsigned char*>(z.ptr[i])[4 * nwords + threadIdx.x] = 0;
    }
  }
}

inline void zero_async(LaunchCtx& ctx, const ZeroList& z) {
  int64_t most = 0;
  for (int i = 0; i < z.n; ++i) {
    most = tt_max<int64_t>(most, z.bytes[i] / 4 + 1);
  }
  if (z.n > 0) {
    launch_elems(ctx, &zero_kernel<>, most, z);
  }
}

// Lets `kernel` use up to the device's opt-in dynamic shared memory, once per (kernel, device) and
// process: the attribute is cached by the driver, so later calls only look up a host set.
template <typename Kernel>
void ensure_dynamic_smem(LaunchCtx& ctx, Kernel kernel, size_t bytes) {
#if !defined(TORCHREC_TT_CUDA_EMULATION)
  if (bytes <= 48 * 1024 || ctx.measure) {
    return;
  }
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> done;
  const std::lock_guard<std::mutex> lock(mu);
  if (done.insert({reinterpret_cast<const void*>(kernel), ctx.device}).second) {
    ctx.check(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(ctx.smem_optin)));
  }
#else
  (void)ctx;
  (void)kernel;
  (void)bytes;
#endif
}

// Stable sort of n (key, value) pairs by key bits [0, end_bit).
template <typename key_t, typename val_t>
void radix_sort_pairs(
    LaunchCtx& ctx,
    const key_t* keys_in,
    key_t* keys_out,
    const val_t* vals_in,
    val_t* vals_out,
    int n,
    int end_bit) {
  if (n <= 0) {
    return;
  }
  end_bit = end_bit < 1 ? 1 : end_bit;
  end_bit = end_bit > static_cast<int>(8 * sizeof(key_t)) ? static_cast<int>(8 * sizeof(key_t)) : end_bit;
#if defined(TORCHREC_TT_CUDA_EMULATION)
  if (!ctx.begin_launch()) {
    return;
  }
  std::vector<int> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  const key_t mask = end_bit >= static_cast<int>(8 * sizeof(key_t))
      ? static_cast<key_t>(~key_t{0})
      : static_cast<key_t>((key_t{1} << end_bit) - 1);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    return (keys_in[a] & mask) < (keys_in[b] & mask);
  });
  std::vector<key_t> k(static_cast<size_t>(n));
  std::vector<val_t> v(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    k[i] = keys_in[order[i]];
    v[i] = vals_in[order[i]];
  }
  std::copy(k.begin(), k.end(), keys_out);
  std::copy(v.begin(), v.end(), vals_out);
#else
  size_t bytes = 0;
  ctx.check(cub::DeviceRadixSort::SortPairs(
      nullptr, bytes, keys_in, keys_out, vals_in, vals_out, n, 0, end_bit, ctx.stream));
  void* temp = ctx.alloc(bytes);
  if (ctx.begin_launch()) {
    ctx.check(cub::DeviceRadixSort::SortPairs(
        temp, bytes, keys_in, keys_out, vals_in, vals_out, n, 0, end_bit, ctx.stream));
  }
#endif
}

// Numbers runs in one device-wide scan: c_p = head(0) + ... + head(p) (int), then write(p, c_p) for
// every p < n. head and write are __host__ __device__ functors; write may store anywhere, so the
// consumer of a run count needs no separate flags, scan and write kernels.
template <typename Head, typename Write>
void scan_heads(LaunchCtx& ctx, int n, const Head& head, const Write& write) {
  if (n <= 0) {
    return;
  }
#if defined(TORCHREC_TT_CUDA_EMULATION)
  if (!ctx.begin_launch()) {
    return;
  }
  // All counts first, then the writes in reverse order: a writer that depends on another position's
  // write (no order is guaranteed on the device) shows up as a wrong plan.
  std::vector<int> counts(static_cast<size_t>(n));
  int c = 0;
  for (int p = 0; p < n; ++p) {
    c += head(p);
    counts[p] = c;
  }
  for (int p = n - 1; p >= 0; --p) {
    write(p, counts[p]);
  }
#else
  const thrust::transform_iterator<Head, thrust::counting_iterator<int>> in(
      thrust::counting_iterator<int>(0), head);
  const thrust::tabulate_output_iterator<Write> out(write);
  size_t bytes = 0;
  ctx.check(cub::DeviceScan::InclusiveSum(nullptr, bytes, in, out, n, ctx.stream));
  void* temp = ctx.alloc(bytes);
  if (ctx.begin_launch()) {
    ctx.check(cub::DeviceScan::InclusiveSum(temp, bytes, in, out, n, ctx.stream));
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// Block sizes and shared-memory budgets of every kernel (the op boundary checks the largest one
// against the device's opt-in limit: max_smem_bytes).
// ---------------------------------------------------------------------------------------------

constexpr int kPrefixThreads = 128;
constexpr int kBagThreads = 128;
constexpr int kBagWarps = kBagThreads / kWarpSize;
constexpr int kTTThreads = 128;
constexpr int kReduceThreads = 256;

inline size_t smem_grt_prefix(const KernelShape& t, size_t acc_bytes) {
  return 2 * static_cast<size_t>(t.max_chain_prefix) * acc_bytes;
}
inline size_t smem_grt_fwd_bag(const KernelShape& t, size_t acc_bytes) {
  return static_cast<size_t>(kBagWarps) * (t.Rn + t.N) * acc_bytes;
}
inline size_t smem_tt_fwd(const KernelShape& t, size_t acc_bytes) {
  return 2 * static_cast<size_t>(t.max_chain) * acc_bytes;
}
// g_b (N), then per warp: S_s and dS_s (R' x n_l each).
inline size_t smem_grt_bwd_bag(const KernelShape& t, size_t acc_bytes) {
  return (static_cast<size_t>(t.N) + 2 * static_cast<size_t>(kBagWarps) * t.Rn) * acc_bytes;
}
// Deterministic: dQ (N' R') + g_b (N) + S_s (R' n_l); both: two chain buffers.
inline size_t smem_grt_slot(const KernelShape& t, size_t acc_bytes) {
  return (static_cast<size_t>(t.Np) * t.Rp + t.N + t.Rn + 2 * static_cast<size_t>(t.max_chain)) *
      acc_bytes;
}
// Every activation of one chain (act_size + N), two gradient buffers, warp partials.
inline size_t smem_tt_lookup_grad(const KernelShape& t, size_t acc_bytes) {
  return (static_cast<size_t>(t.act_size) + t.N + 2 * static_cast<size_t>(t.max_chain_all) +
          kTTThreads / kWarpSize) *
      acc_bytes;
}
inline size_t smem_tt_core_reduce(const KernelShape& t, size_t acc_bytes) {
  return 3 * static_cast<size_t>(t.max_chain_all) * acc_bytes;
}

// Calls fn(std::integral_constant<int, P>{}) with P the smallest power of two >= v, capped at Max
// (a power of two): kernels are instantiated for these few per-thread output counts only.
template <int Max, int P = 1, typename Fn>
void dispatch_pow2(int v, Fn&& fn) {
  if constexpr (P >= Max) {
    fn(std::integral_constant<int, Max>{});
  } else if (v <= P) {
    fn(std::integral_constant<int, P>{});
  } else {
    dispatch_pow2<Max, 2 * P>(v, std::forward<Fn>(fn));
  }
}

// ---------------------------------------------------------------------------------------------
// Kernels and warp helpers shared by the forward and the backward
// ---------------------------------------------------------------------------------------------

// Prefix chain of every slot u < min(U, U_ub) (group slot_group[u]); one block per slot. Slots whose
// group is not a row group of the table (a plan built without the table's bound) get a zero record.
// store_all == 0: out + u * (N' R') holds Q^T (R' x N') (the forward's bag kernel reads it by rows).
// store_all == 1: out + u * act_size holds A_k (row-major) at act_off[k], k = 0..d-2.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kPrefixThreads) grt_prefix_kernel(
    KernelShape t,
    CorePtrs<scalar_t> cores,
    const int64_t* __restrict__ header,
    const int64_t* __restrict__ slot_group,
    int64_t U_ub,
    acc_t* __restrict__ out,
    int store_all) {
  TORCHREC_TT_DYNAMIC_SMEM(acc_t, smem);
  acc_t* const buf0 = smem;
  acc_t* const buf1 = smem + t.max_chain_prefix;
  const int U = plan_count(header, PlanHeader::kNumSlots, U_ub);
  const int last = t.d - 2;
  const int rec = store_all ? t.act_size : t.Np * t.Rp;
  for (int u = blockIdx.x; u < U; u += gridDim.x) {
    acc_t* const r = out + static_cast<int64_t>(u) * rec;
    const int64_t group = slot_group[u];
    if (group < 0 || group >= t.num_groups) { // block-uniform
      for (int e = threadIdx.x; e < rec; e += blockDim.x) {
        r[e] = acc_t(0);
      }
      continue;
    }
    int64_t digits[kMaxCores] = {};
    group_digits(t.L, group, digits);
    {
      const scalar_t* c0 = cores.p[0] + digits[0] * t.slice[0];
      const int total = t.cols(0);
      acc_t* const copy = store_all ? r + t.act_off[0] : nullptr;
      if (last == 0) {
        block_chain_first(c0, total, static_cast<acc_t*>(nullptr), copy, store_all ? nullptr : r, t.R(1));
      } else {
        block_chain_first(c0, total, buf0, copy, static_cast<acc_t*>(nullptr), 0);
      }
      __syncthreads();
    }
    acc_t* cur = buf0;
    acc_t* nxt = buf1;
    for (int k = 1; k <= last; ++k) {
      const scalar_t* ck = cores.p[k] + digits[k] * t.slice[k];
      acc_t* const copy = store_all ? r + t.act_off[k] : nullptr;
      if (k == last) {
        block_chain_step(
            cur, ck, t.chain[k - 1], t.R(k), t.cols(k), static_cast<acc_t*>(nullptr), copy,
            store_all ? nullptr : r, t.R(k + 1));
      } else {
        block_chain_step(cur, ck, t.chain[k - 1], t.R(k), t.cols(k), nxt, copy, static_cast<acc_t*>(nullptr), 0);
      }
      __syncthreads();
      acc_t* const tmp = cur;
      cur = nxt;
      nxt = tmp;
    }
  }
}

template <typename scalar_t>
void launch_grt_prefix(
    LaunchCtx& ctx,
    const KernelShape& t,
    const CorePtrs<scalar_t>& cores,
    const int64_t* plan,
    int64_t nnz,
    int64_t B,
    int64_t U_ub,
    acc_type<scalar_t>* out,
    int store_all) {
  using acc_t = acc_type<scalar_t>;
  if (U_ub <= 0) {
    return;
  }
  const PlanView<const int64_t> v = PlanView<const int64_t>::make(plan, nnz, B);
  const auto kernel = &grt_prefix_kernel<scalar_t, acc_t>;
  const size_t smem = smem_grt_prefix(t, sizeof(acc_t));
  ensure_dynamic_smem(ctx, kernel, smem);
  TORCHREC_TT_LAUNCH(
      ctx, kernel, grid_for_items(U_ub), kPrefixThreads, smem, t, cores, v.header, v.slot_group,
      U_ub, out, store_all);
}

// Warp-cooperative: sw (R' x n_l, shared) = sum over the segment's sorted positions [p0, p1) of
// c_j core_last[last_j], c_j = psw[j] (1 if null) * scale. Lookups whose last digit or position is
// out of range (a plan of another table or batch) are skipped. vec: core_last rows are read as
// vectors of V. Ends with __syncwarp().
template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void warp_segment_sum(
    const KernelShape& t,
    const scalar_t* __restrict__ core_last,
    const int64_t* __restrict__ sorted_lookup,
    const int64_t* __restrict__ sorted_last,
    int p0,
    int p1,
    const scalar_t* __restrict__ psw,
    acc_t scale,
    int64_t nnz,
    bool vec,
    acc_t* sw) {
  const int lane = threadIdx.x % kWarpSize;
  const int Rn = t.Rn;
  for (int e = lane; e < Rn; e += kWarpSize) {
    sw[e] = acc_t(0);
  }
  __syncwarp();
  for (int p = p0; p < p1; ++p) {
    const int64_t j = sorted_lookup[p];
    const int64_t last = sorted_last[p];
    if (j < 0 || j >= nnz || last < 0 || last >= t.m_last) { // warp-uniform
      continue;
    }
    const acc_t c = (psw != nullptr ? to_acc(psw[j]) : acc_t(1)) * scale;
    const scalar_t* row = core_last + static_cast<int>(last) * Rn;
    if (vec) {
      for (int e = lane * V; e < Rn; e += kWarpSize * V) {
        acc_t x[V];
        load_vec<V>(row + e, x);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          sw[e + i] += c * x[i];
        }
      }
    } else {
      for (int e = lane; e < Rn; e += kWarpSize) {
        sw[e] += c * to_acc(row[e]);
      }
    }
  }
  __syncwarp();
}

// Block-cooperative: dst[0, n) = src[0, n) in acc_t, read as vectors of V when vec (src aligned and
// n % V == 0).
template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void block_load_row(const scalar_t* __restrict__ src, int n, bool vec, acc_t* dst) {
  if (vec) {
    for (int e = threadIdx.x * V; e < n; e += blockDim.x * V) {
      acc_t x[V];
      load_vec<V>(src + e, x);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        dst[e + i] = x[i];
      }
    }
  } else {
    for (int e = threadIdx.x; e < n; e += blockDim.x) {
      dst[e] = to_acc(src[e]);
    }
  }
}

// Row and column (o / nl, o % nl) of the outputs o = first + i * stride (i < OPT) of this thread.
template <int OPT>
__device__ __forceinline__ void thread_output_coords(
    int first,
    int stride,
    int nl,
    int (&ro)[OPT],
    int (&co)[OPT]) {
#pragma unroll
  for (int i = 0; i < OPT; ++i) {
    const int o = first + i * stride;
    ro[i] = o / nl;
    co[i] = o - ro[i] * nl;
  }
}

} // namespace torchrec_tt::gpu
