// Forward kernels of torchrec_tt::tt_embedding_bag on the GPU.
//
// grt (variant 1):
//   plan (tt_group_plan.cuh), then
//   grt_prefix_kernel   one block per slot (distinct group): the prefix chain Q = A_{d-2} in shared
//                       memory, written once to global memory (forward: transposed, R' x N', so the
//                       bag kernel's warp reads are contiguous; backward: every A_k row-major);
//   grt_fwd_bag_kernel  one block per bag, one warp per segment: S_s = sum_j c_j core_last[last_j]
//                       (R' x n_l, warp's shared memory), y += Q_slot(s) @ S_s in registers
//                       (each lane owns outputs lane + 32 t), then a fixed-order reduction over the
//                       warps. No atomics: the forward is deterministic.
// tt (variant 0):
//   tt_fwd_bag_kernel   one block per bag; for each lookup the full chain in shared memory, then
//                       y += c_j * W[idx_j] in registers.
#pragma once

#include <type_traits>
#include <utility>

#include "tt_chain.cuh"
#include "tt_cuda_common.cuh"
#include "tt_group_plan.cuh"

namespace torchrec_tt::gpu {

constexpr int kPrefixThreads = 128;
constexpr int kBagThreads = 128;
constexpr int kBagWarps = kBagThreads / kWarpSize;
constexpr int kTTThreads = 128;

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
// Shared-memory requirements (bytes), for the boundary check against the device's opt-in limit.
// ---------------------------------------------------------------------------------------------

inline size_t smem_grt_prefix(const TTDims& t, size_t acc_bytes) {
  return 2 * static_cast<size_t>(t.max_chain_prefix) * acc_bytes;
}
inline size_t smem_grt_fwd_bag(const TTDims& t, size_t acc_bytes) {
  return static_cast<size_t>(kBagWarps) * (t.Rn + t.N) * acc_bytes;
}
inline size_t smem_tt_fwd(const TTDims& t, size_t acc_bytes) {
  return 2 * static_cast<size_t>(t.max_chain) * acc_bytes;
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// Prefix chain of every slot u < U = counts[1] (group slot_group[u]).
// store_all == 0: out + u * (N' R') holds Q^T (R' x N').
// store_all == 1: out + u * act_size holds A_k (row-major) at act_off[k], k = 0..d-2.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kPrefixThreads) grt_prefix_kernel(
    TTDims t,
    CorePtrs<scalar_t> cores,
    const int64_t* __restrict__ slot_group,
    const int64_t* __restrict__ counts,
    acc_t* __restrict__ out,
    int store_all) {
  TORCHREC_TT_DYNAMIC_SMEM(acc_t, smem);
  acc_t* const buf0 = smem;
  acc_t* const buf1 = smem + t.max_chain_prefix;
  const int64_t U = counts[1];
  const int last = t.d - 2;
  const int64_t rec = store_all ? static_cast<int64_t>(t.act_size) : static_cast<int64_t>(t.Np) * t.Rp;
  for (int64_t u = blockIdx.x; u < U; u += gridDim.x) {
    int64_t digits[kMaxCoresGpu] = {};
    group_digits_dev(t, slot_group[u], digits);
    acc_t* const r = out + u * rec;
    {
      const scalar_t* c0 = cores.p[0] + digits[0] * t.slice[0];
      const int total = t.n[0] * t.R[1];
      acc_t* const copy = store_all ? r + t.act_off[0] : nullptr;
      if (last == 0) {
        block_chain_first(c0, total, static_cast<acc_t*>(nullptr), copy, store_all ? nullptr : r, t.R[1]);
      } else {
        block_chain_first(c0, total, buf0, copy, static_cast<acc_t*>(nullptr), 0);
      }
      __syncthreads();
    }
    acc_t* cur = buf0;
    acc_t* nxt = buf1;
    for (int k = 1; k <= last; ++k) {
      const scalar_t* ck = cores.p[k] + digits[k] * t.slice[k];
      const int Nprev = t.chain[k - 1];
      const int L = t.n[k] * t.R[k + 1];
      acc_t* const copy = store_all ? r + t.act_off[k] : nullptr;
      if (k == last) {
        block_chain_step(
            cur, ck, Nprev, t.R[k], L, static_cast<acc_t*>(nullptr), copy, store_all ? nullptr : r,
            t.R[k + 1]);
      } else {
        block_chain_step(cur, ck, Nprev, t.R[k], L, nxt, copy, static_cast<acc_t*>(nullptr), 0);
      }
      __syncthreads();
      acc_t* const tmp = cur;
      cur = nxt;
      nxt = tmp;
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

// One block per bag b < B; warps over the bag's segments [lower_bound(b), lower_bound(b + 1)) of
// segment_bag[0..S). OT = outputs per lane (32 * OT >= N).
template <typename scalar_t, typename acc_t, int OT>
__global__ void __launch_bounds__(kBagThreads) grt_fwd_bag_kernel(
    TTDims t,
    const scalar_t* __restrict__ core_last,
    const acc_t* __restrict__ qt,
    const int32_t* __restrict__ perm,
    const acc_t* __restrict__ coef,
    const int32_t* __restrict__ lookup_last,
    const int32_t* __restrict__ seg_start,
    const int64_t* __restrict__ segment_bag,
    const int64_t* __restrict__ segment_slot,
    const int64_t* __restrict__ counts,
    int64_t B,
    scalar_t* __restrict__ out) {
  TORCHREC_TT_DYNAMIC_SMEM(acc_t, smem);
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int N = t.N;
  const int Np = t.Np;
  const int Rp = t.Rp;
  const int nl = t.nl;
  const int Rn = t.Rn;
  acc_t* const sw = smem + warp * Rn; // this warp's S_s (R' x n_l)
  acc_t* const red = smem + kBagWarps * Rn; // [kBagWarps][N]
  const int64_t S = counts[0];
  int ro[OT];
  int co[OT];
  thread_output_coords(lane, kWarpSize, nl, ro, co);
  const int64_t q_stride = static_cast<int64_t>(Np) * Rp;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const int64_t s_begin = lower_bound_i64(segment_bag, S, b);
    const int64_t s_end = lower_bound_i64(segment_bag, S, b + 1);
    acc_t acc[OT];
#pragma unroll
    for (int i = 0; i < OT; ++i) {
      acc[i] = acc_t(0);
    }
    for (int64_t s = s_begin + warp; s < s_end; s += kBagWarps) {
      const int64_t u = segment_slot[s];
      const int p0 = seg_start[s];
      const int p1 = seg_start[s + 1];
      for (int e = lane; e < Rn; e += kWarpSize) {
        sw[e] = acc_t(0);
      }
      for (int p = p0; p < p1; ++p) {
        const int32_t j = perm[p];
        const acc_t c = coef[j];
        const scalar_t* row = core_last + static_cast<int64_t>(lookup_last[j]) * Rn;
        for (int e = lane; e < Rn; e += kWarpSize) {
          sw[e] += c * to_acc(row[e]);
        }
      }
      __syncwarp();
      const acc_t* q = qt + u * q_stride;
#pragma unroll 4
      for (int a = 0; a < Rp; ++a) {
        const acc_t* qa = q + a * Np;
        const acc_t* sa = sw + a * nl;
#pragma unroll
        for (int i = 0; i < OT; ++i) {
          if (lane + kWarpSize * i < N) {
            acc[i] += qa[ro[i]] * sa[co[i]];
          }
        }
      }
      __syncwarp();
    }
#pragma unroll
    for (int i = 0; i < OT; ++i) {
      const int o = lane + kWarpSize * i;
      if (o < N) {
        red[warp * N + o] = acc[i];
      }
    }
    __syncthreads();
    for (int o = threadIdx.x; o < N; o += blockDim.x) {
      acc_t v = acc_t(0);
      for (int w = 0; w < kBagWarps; ++w) {
        v += red[w * N + o];
      }
      out[b * N + o] = from_acc<scalar_t>(v);
    }
    __syncthreads();
  }
}

// A_{d-2} (N' x R') of a row's digits, computed in buf0/buf1 (each max_chain entries); returns the
// buffer that holds it. Ends with a barrier.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ const acc_t* block_row_prefix(
    const TTDims& t,
    const CorePtrs<scalar_t>& cores,
    const int64_t* digits,
    acc_t* buf0,
    acc_t* buf1) {
  block_chain_first(
      cores.p[0] + digits[0] * t.slice[0], t.n[0] * t.R[1], buf0, static_cast<acc_t*>(nullptr),
      static_cast<acc_t*>(nullptr), 0);
  __syncthreads();
  acc_t* cur = buf0;
  acc_t* nxt = buf1;
  for (int k = 1; k <= t.d - 2; ++k) {
    block_chain_step(
        cur, cores.p[k] + digits[k] * t.slice[k], t.chain[k - 1], t.R[k], t.n[k] * t.R[k + 1], nxt,
        static_cast<acc_t*>(nullptr), static_cast<acc_t*>(nullptr), 0);
    __syncthreads();
    acc_t* const tmp = cur;
    cur = nxt;
    nxt = tmp;
  }
  return cur;
}

// Entry (row, col) of a lookup's row W = Q @ L: sum_a qr[a] * cl[a, col], with qr = Q[row] (R')
// and cl = core_last[last] (R' x nl).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t row_entry(
    const acc_t* qr,
    const scalar_t* __restrict__ cl,
    int Rp,
    int nl,
    int col) {
  acc_t w = acc_t(0);
  for (int a = 0; a < Rp; ++a) {
    w += qr[a] * to_acc(cl[a * nl + col]);
  }
  return w;
}

// The lookups j of bag b in order, each with its own full chain: f(j, q, cl) with q = Q (N' x R',
// in buf0/buf1) and cl = core_last[last] (R' x nl). Lookups outside the bag (lookup_bag[j] != b,
// block-uniform) are skipped. A barrier follows every f: the next lookup overwrites the buffers.
template <typename scalar_t, typename acc_t, typename index_t, typename F>
__device__ __forceinline__ void for_each_bag_row(
    const TTDims& t,
    const CorePtrs<scalar_t>& cores,
    const index_t* __restrict__ indices,
    const index_t* __restrict__ offsets,
    const int32_t* __restrict__ lookup_bag,
    int64_t b,
    int64_t nnz,
    acc_t* buf0,
    acc_t* buf1,
    F&& f) {
  const int64_t lo = offset_clamped(offsets, b, nnz);
  const int64_t hi = offset_clamped(offsets, b + 1, nnz);
  for (int64_t j = lo; j < hi; ++j) {
    if (lookup_bag[j] != b) { // invalid lookup: contributes nothing (block-uniform)
      continue;
    }
    int64_t digits[kMaxCoresGpu] = {};
    row_digits_dev(t, static_cast<int64_t>(indices[j]), digits);
    const acc_t* q = block_row_prefix(t, cores, digits, buf0, buf1);
    f(j, q, cores.p[t.d - 1] + digits[t.d - 1] * t.slice[t.d - 1]);
    __syncthreads();
  }
}

// One block per bag; lookups of the bag in order, each with its own full chain. OPT = outputs per
// thread (kTTThreads * OPT >= N).
template <typename scalar_t, typename acc_t, typename index_t, int OPT>
__global__ void __launch_bounds__(kTTThreads) tt_fwd_bag_kernel(
    TTDims t,
    CorePtrs<scalar_t> cores,
    const index_t* __restrict__ indices,
    const index_t* __restrict__ offsets,
    const int32_t* __restrict__ lookup_bag,
    const acc_t* __restrict__ coef,
    int64_t B,
    int64_t nnz,
    scalar_t* __restrict__ out) {
  TORCHREC_TT_DYNAMIC_SMEM(acc_t, smem);
  acc_t* const buf0 = smem;
  acc_t* const buf1 = smem + t.max_chain;
  const int N = t.N;
  const int Rp = t.Rp;
  const int nl = t.nl;
  int ro[OPT];
  int co[OPT];
  thread_output_coords(static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x), nl, ro, co);
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    acc_t acc[OPT];
#pragma unroll
    for (int i = 0; i < OPT; ++i) {
      acc[i] = acc_t(0);
    }
    for_each_bag_row(
        t, cores, indices, offsets, lookup_bag, b, nnz, buf0, buf1,
        [&](int64_t j, const acc_t* q, const scalar_t* cl) {
          const acc_t c = coef[j];
#pragma unroll
          for (int i = 0; i < OPT; ++i) {
            if (threadIdx.x + i * blockDim.x < N) {
              acc[i] += c * row_entry(q + ro[i] * Rp, cl, Rp, nl, co[i]);
            }
          }
        });
#pragma unroll
    for (int i = 0; i < OPT; ++i) {
      const int o = threadIdx.x + i * blockDim.x;
      if (o < N) {
        out[b * N + o] = from_acc<scalar_t>(acc[i]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host orchestration
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, typename Ctx>
void launch_grt_prefix(
    Ctx& ctx,
    const TTDims& t,
    const CorePtrs<scalar_t>& cores,
    const DevicePlan& plan,
    acc_type<scalar_t>* out,
    int store_all) {
  using acc_t = acc_type<scalar_t>;
  if (plan.slots_ub <= 0) {
    return;
  }
  const auto kernel = &grt_prefix_kernel<scalar_t, acc_t>;
  const size_t smem = smem_grt_prefix(t, sizeof(acc_t));
  set_dynamic_smem(ctx, kernel, smem);
  TORCHREC_TT_LAUNCH(
      kernel, grid_for_items(plan.slots_ub), kPrefixThreads, smem, ctx.stream, t, cores,
      static_cast<const int64_t*>(plan.slot_group), static_cast<const int64_t*>(plan.counts), out,
      store_all);
  ctx.check_launch();
}

// The forward of a batch without bags (nothing to write) or without lookups (zero bags); returns
// false when the batch needs the kernels.
template <typename scalar_t, typename Ctx>
bool forward_without_lookups(Ctx& ctx, const TTDims& t, int64_t B, int64_t nnz, scalar_t* out) {
  if (B <= 0) {
    return true;
  }
  if (nnz <= 0) {
    memset_async(ctx, out, 0, static_cast<size_t>(B) * t.N * sizeof(scalar_t));
    return true;
  }
  return false;
}

// out: (B, N) in the cores' dtype. Requires B, nnz < 2^31 and the TT sizes validated by the caller.
template <typename scalar_t, typename index_t, typename Ctx>
void grt_forward(
    Ctx& ctx,
    const LookupBatch<scalar_t, index_t>& in,
    scalar_t* out) {
  using acc_t = acc_type<scalar_t>;
  const TTDims& t = in.t;
  if (forward_without_lookups(ctx, t, in.B, in.nnz, out)) {
    return;
  }
  const LookupInfo<acc_t> info = compute_lookup_info(ctx, in);
  const DevicePlan plan =
      build_plan(
          ctx, in.indices, info.bag, in.B, in.nnz, t.m[t.d - 1], t.num_groups, PlanOutputs{});
  acc_t* qt = alloc_n<acc_t>(ctx, plan.slots_ub * t.Np * t.Rp);
  launch_grt_prefix(ctx, t, in.cores, plan, qt, /*store_all=*/0);

  const size_t smem = smem_grt_fwd_bag(t, sizeof(acc_t));
  dispatch_pow2<32>((t.N + kWarpSize - 1) / kWarpSize, [&](auto ot) {
    constexpr int OT = decltype(ot)::value;
    const auto kernel = &grt_fwd_bag_kernel<scalar_t, acc_t, OT>;
    set_dynamic_smem(ctx, kernel, smem);
    TORCHREC_TT_LAUNCH(
        kernel, grid_for_items(in.B), kBagThreads, smem, ctx.stream, t, in.cores.p[t.d - 1],
        static_cast<const acc_t*>(qt), static_cast<const int32_t*>(plan.perm),
        static_cast<const acc_t*>(info.coef), static_cast<const int32_t*>(plan.lookup_last),
        static_cast<const int32_t*>(plan.seg_start), static_cast<const int64_t*>(plan.segment_bag),
        static_cast<const int64_t*>(plan.segment_slot), static_cast<const int64_t*>(plan.counts),
        in.B, out);
    ctx.check_launch();
  });
}

template <typename scalar_t, typename index_t, typename Ctx>
void tt_forward(
    Ctx& ctx,
    const LookupBatch<scalar_t, index_t>& in,
    scalar_t* out) {
  using acc_t = acc_type<scalar_t>;
  const TTDims& t = in.t;
  if (forward_without_lookups(ctx, t, in.B, in.nnz, out)) {
    return;
  }
  const LookupInfo<acc_t> info = compute_lookup_info(ctx, in);
  const size_t smem = smem_tt_fwd(t, sizeof(acc_t));
  dispatch_pow2<8>((t.N + kTTThreads - 1) / kTTThreads, [&](auto opt) {
    constexpr int OPT = decltype(opt)::value;
    const auto kernel = &tt_fwd_bag_kernel<scalar_t, acc_t, index_t, OPT>;
    set_dynamic_smem(ctx, kernel, smem);
    TORCHREC_TT_LAUNCH(
        kernel, grid_for_items(in.B), kTTThreads, smem, ctx.stream, t, in.cores, in.indices,
        in.offsets, static_cast<const int32_t*>(info.bag), static_cast<const acc_t*>(info.coef), in.B,
        in.nnz, out);
    ctx.check_launch();
  });
}

} // namespace torchrec_tt::gpu
