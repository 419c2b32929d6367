// Forward kernels of torchrec_tt::tt_embedding_bag on the GPU and their launcher.
//
// grt (variant 1), two launches given the batch's plan (group_plan_cuda.cu builds one in five when
// the caller passes none):
//   grt_prefix_kernel   (tt_cuda_common.cuh) one block per slot: Q^T of each distinct group, once
//                       per batch, not once per bag;
//   grt_fwd_bag_kernel  one block per bag, one warp per segment of the bag (bag_segment_start: no
//                       search): S_s = sum_j c_j core_last[last_j] (vector loads) in the warp's
//                       shared memory, y += Q_slot(s) @ S_s in registers, then a fixed-order sum over
//                       the warps. No atomics: the forward is deterministic.
// tt (variant 0): tt_fwd_bag_kernel, one block per bag, a full chain per lookup (the TT-Rec baseline).

#include "tt_cuda_common.cuh"

namespace torchrec_tt::gpu {
namespace {

// One block per bag b < B; warps over the bag's segments. OT = outputs per lane (32 * OT >= N).
template <typename scalar_t, typename acc_t, typename index_t, int OT>
__global__ void __launch_bounds__(kBagThreads) grt_fwd_bag_kernel(
    KernelShape t,
    const scalar_t* __restrict__ core_last,
    const acc_t* __restrict__ qt,
    int64_t U_ub,
    PlanView<const int64_t> v,
    const scalar_t* __restrict__ psw,
    const index_t* __restrict__ offsets,
    int64_t B,
    int64_t nnz,
    int mean,
    bool vec,
    scalar_t* __restrict__ out) {
  TORCHREC_TT_DYNAMIC_SMEM(acc_t, smem);
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int N = t.N;
  const int Np = t.Np;
  const int Rp = t.Rp;
  const int nl = t.nl;
  acc_t* const sw = smem + warp * t.Rn; // this warp's S_s (R' x n_l)
  acc_t* const red = smem + kBagWarps * t.Rn; // [kBagWarps][N]
  const int S = plan_count(v.header, PlanHeader::kNumSegments, nnz);
  const int U = plan_count(v.header, PlanHeader::kNumSlots, U_ub); // records [0, U) were written
  int ro[OT];
  int co[OT];
  thread_output_coords(lane, kWarpSize, nl, ro, co);
  const int q_stride = Np * Rp;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const int s_begin = static_cast<int>(tt_min<int64_t>(tt_max<int64_t>(v.bag_segment_start[b], 0), S));
    const int s_end = static_cast<int>(tt_min<int64_t>(tt_max<int64_t>(v.bag_segment_start[b + 1], s_begin), S));
    const acc_t scale = bag_scale<acc_t>(offsets, b, nnz, mean);
    acc_t acc[OT];
#pragma unroll
    for (int i = 0; i < OT; ++i) {
      acc[i] = acc_t(0);
    }
    for (int s = s_begin + warp; s < s_end; s += kBagWarps) {
      const int64_t u = v.segment_slot[s];
      if (u < 0 || u >= U) { // warp-uniform: a slot beyond the table's groups contributes 0
        continue;
      }
      const int p0 = static_cast<int>(tt_min<int64_t>(tt_max<int64_t>(v.segment_start[s], 0), nnz));
      const int p1 = static_cast<int>(tt_min<int64_t>(tt_max<int64_t>(v.segment_start[s + 1], p0), nnz));
      constexpr int V = VecWidth<scalar_t>::value;
      warp_segment_sum<V>(t, core_last, v.sorted_lookup, v.sorted_last, p0, p1, psw, scale, nnz, vec, sw);
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
      __syncwarp(); // before the next segment overwrites sw
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
      acc_t y = acc_t(0);
      for (int w = 0; w < kBagWarps; ++w) {
        y += red[w * N + o];
      }
      out[b * N + o] = from_acc<scalar_t>(y);
    }
    __syncthreads();
  }
}

// A_{d-2} (N' x R') of a row's digits, computed in buf0/buf1; returns the buffer that holds it.
// Ends with a barrier.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ const acc_t* block_row_prefix(
    const KernelShape& t,
    const CorePtrs<scalar_t>& cores,
    const int64_t* digits,
    acc_t* buf0,
    acc_t* buf1) {
  block_chain_first(
      cores.p[0] + digits[0] * t.slice[0], t.cols(0), buf0, static_cast<acc_t*>(nullptr),
      static_cast<acc_t*>(nullptr), 0);
  __syncthreads();
  acc_t* cur = buf0;
  acc_t* nxt = buf1;
  for (int k = 1; k <= t.d - 2; ++k) {
    block_chain_step(
        cur, cores.p[k] + digits[k] * t.slice[k], t.chain[k - 1], t.R(k), t.cols(k), nxt,
        static_cast<acc_t*>(nullptr), static_cast<acc_t*>(nullptr), 0);
    __syncthreads();
    acc_t* const tmp = cur;
    cur = nxt;
    nxt = tmp;
  }
  return cur;
}

// One block per bag; lookups of the bag in order, each with its own full chain. OPT = outputs per
// thread (kTTThreads * OPT >= N). A lookup outside the bag (bad offsets) or out of range adds 0.
template <typename scalar_t, typename acc_t, typename index_t, int OPT>
__global__ void __launch_bounds__(kTTThreads) tt_fwd_bag_kernel(
    KernelShape t,
    CorePtrs<scalar_t> cores,
    const index_t* __restrict__ indices,
    const index_t* __restrict__ offsets,
    const scalar_t* __restrict__ psw,
    int64_t B,
    int64_t nnz,
    int mean,
    scalar_t* __restrict__ out) {
  TORCHREC_TT_DYNAMIC_SMEM(acc_t, smem);
  acc_t* const buf0 = smem;
  acc_t* const buf1 = smem + t.max_chain;
  const int N = t.N;
  const int Rp = t.Rp;
  const int nl = t.nl;
  const int64_t num_rows = t.num_groups * t.m_last;
  int ro[OPT];
  int co[OPT];
  thread_output_coords(static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x), nl, ro, co);
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const acc_t scale = bag_scale<acc_t>(offsets, b, nnz, mean);
    acc_t acc[OPT];
#pragma unroll
    for (int i = 0; i < OPT; ++i) {
      acc[i] = acc_t(0);
    }
    const int64_t lo = offset_clamped(offsets, b, nnz);
    const int64_t hi = offset_clamped(offsets, b + 1, nnz);
    for (int64_t j = lo; j < hi; ++j) {
      const int64_t idx = static_cast<int64_t>(indices[j]);
      if (idx < 0 || idx >= num_rows || lookup_bag_of(offsets, B, nnz, j) != b) { // block-uniform
        continue;
      }
      int64_t digits[kMaxCores] = {};
      row_digits(t.L, idx, digits);
      const acc_t* q = block_row_prefix(t, cores, digits, buf0, buf1);
      const scalar_t* cl = cores.p[t.d - 1] + digits[t.d - 1] * t.slice[t.d - 1];
      const acc_t c = (psw != nullptr ? to_acc(psw[j]) : acc_t(1)) * scale;
#pragma unroll
      for (int i = 0; i < OPT; ++i) {
        if (threadIdx.x + i * blockDim.x < N) {
          const acc_t* qr = q + ro[i] * Rp;
          acc_t w = acc_t(0);
          for (int a = 0; a < Rp; ++a) {
            w += qr[a] * to_acc(cl[a * nl + co[i]]);
          }
          acc[i] += c * w;
        }
      }
      __syncthreads(); // the next lookup overwrites the chain buffers
    }
#pragma unroll
    for (int i = 0; i < OPT; ++i) {
      const int o = threadIdx.x + i * blockDim.x;
      if (o < N) {
        out[b * N + o] = from_acc<scalar_t>(acc[i]);
      }
    }
  }
}

} // namespace

template <typename scalar_t, typename index_t>
void tt_forward(
    LaunchCtx& ctx,
    const LookupBatch<scalar_t, index_t>& in,
    int variant,
    const int64_t* plan,
    scalar_t* out) {
  using acc_t = acc_type<scalar_t>;
  const KernelShape t = make_kernel_shape(in.layout);
  if (in.B <= 0) {
    return;
  }
  if (in.nnz <= 0) {
    memset_async(ctx, out, 0, static_cast<size_t>(in.B) * t.N * sizeof(scalar_t));
    return;
  }
  if (static_cast<Variant>(variant) == Variant::kTT) {
    const size_t smem = smem_tt_fwd(t, sizeof(acc_t));
    dispatch_pow2<8>((t.N + kTTThreads - 1) / kTTThreads, [&](auto opt) {
      constexpr int OPT = decltype(opt)::value;
      const auto kernel = &tt_fwd_bag_kernel<scalar_t, acc_t, index_t, OPT>;
      ensure_dynamic_smem(ctx, kernel, smem);
      TORCHREC_TT_LAUNCH(
          ctx, kernel, grid_for_items(in.B), kTTThreads, smem, t, in.cores, in.indices, in.offsets,
          in.psw, in.B, in.nnz, in.pooling_mode, out);
    });
    return;
  }
  if (plan == nullptr) {
    int64_t* built = ctx.alloc_n<int64_t>(PlanLayout::make(in.nnz, in.B).numel);
    build_group_plan(ctx, in.indices, in.offsets, in.B, in.nnz, t.m_last, t.num_groups, built);
    plan = built;
  }
  // Valid slots (group < num_groups) come first (slots ascend by group): later ones add nothing.
  const int64_t U_ub = tt_min<int64_t>(in.nnz, t.num_groups);
  acc_t* qt = ctx.alloc_n<acc_t>(U_ub * t.Np * t.Rp);
  launch_grt_prefix(ctx, t, in.cores, plan, in.nnz, in.B, U_ub, qt, /*store_all=*/0);
  const scalar_t* core_last = in.cores.p[t.d - 1];
  const bool vec = vec_aligned<VecWidth<scalar_t>::value>(core_last, t.Rn);
  const PlanView<const int64_t> v = PlanView<const int64_t>::make(plan, in.nnz, in.B);
  const size_t smem = smem_grt_fwd_bag(t, sizeof(acc_t));
  dispatch_pow2<32>((t.N + kWarpSize - 1) / kWarpSize, [&](auto ot) {
    constexpr int OT = decltype(ot)::value;
    const auto kernel = &grt_fwd_bag_kernel<scalar_t, acc_t, index_t, OT>;
    ensure_dynamic_smem(ctx, kernel, smem);
    TORCHREC_TT_LAUNCH(
        ctx, kernel, grid_for_items(in.B), kBagThreads, smem, t, core_last,
        static_cast<const acc_t*>(qt), U_ub, v, in.psw, in.offsets, in.B, in.nnz, in.pooling_mode,
        vec, out);
  });
}

#define TORCHREC_TT_INSTANTIATE_FORWARD(scalar_t, index_t)                                  \
  template void tt_forward<scalar_t, index_t>(                                              \
      LaunchCtx&, const LookupBatch<scalar_t, index_t>&, int, const int64_t*, scalar_t*);
TORCHREC_TT_INSTANTIATE_SCALAR_INDEX(TORCHREC_TT_INSTANTIATE_FORWARD)
#undef TORCHREC_TT_INSTANTIATE_FORWARD

} // namespace torchrec_tt::gpu
