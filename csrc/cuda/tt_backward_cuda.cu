// Backward kernels of torchrec_tt::tt_embedding_bag (tt_embedding_bag_backward) on the GPU and
// their launcher.
//
// grt (variant 1), given the forward's plan (g_b = grad_output[b] viewed N' x n_l):
//   grt_prefix_kernel (store_all)  A_0..A_{d-2} of every slot (distinct group), once per batch;
//   grt_bwd_bag_kernel   block per bag, warp per segment: S_s and dS_s = Q^T g_b in shared memory,
//                        psw_grad[j] = scale_b <core_last[last_j], dS_s>, and (default mode) the
//                        segment's contributions accumulated directly with atomics:
//                        dcore_last[last_j] += c_j dS_s, dQ_slot += g_b S_s^T;
//   grt_bwd_slot_kernel  block per slot: back through the prefix chain once per distinct group;
//                        default mode: dcore_k[i_k] += A_{k-1}^T dA_k' with atomics.
// That is 4 launches (+ memsets) in the default mode. The deterministic mode (no float atomics,
// bit-identical run to run) keeps sorted segmented reductions: the bag kernel stores S_s and dS_s,
// the slot kernel sums its dQ over the plan's slot_segment list in order and stores dA_k, then the
// lookups are sorted by last digit and the slots by each digit i_k (k >= 1; slots ascend by group,
// so digit i_0 is already sorted) and one block per destination slice sums its run in order.
//
// tt (variant 0): default mode, one block per lookup runs its chain forward and back and adds every
// core's gradient with atomics; deterministic mode, lookups sorted by each digit and one block per
// destination slice recomputes its lookups' chains in order (the TT-Rec baseline).

#include "tt_cuda_common.cuh"

namespace torchrec_tt::gpu {
namespace {

// ---------------------------------------------------------------------------------------------
// grt
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t, typename index_t, bool kDet>
__global__ void __launch_bounds__(kBagThreads) grt_bwd_bag_kernel(
    KernelShape t,
    const scalar_t* __restrict__ core_last,
    const acc_t* __restrict__ act,
    int64_t U_ub,
    PlanView<const int64_t> v,
    const scalar_t* __restrict__ psw,
    const index_t* __restrict__ offsets,
    const scalar_t* __restrict__ grad_out,
    int64_t B,
    int64_t nnz,
    int mean,
    bool vec,
    bool gvec,
    scalar_t* __restrict__ psw_grad,
    acc_t* __restrict__ dcore_last, // default mode
    acc_t* __restrict__ dact, // default mode: dQ of slot u at u * act_size + act_off[d-2]
    acc_t* __restrict__ seg_S, // deterministic mode: S_s, R' x n_l per segment
    acc_t* __restrict__ seg_dS) { // deterministic mode: dS_s
  TORCHREC_TT_DYNAMIC_SMEM(acc_t, smem);
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int N = t.N;
  const int Np = t.Np;
  const int Rp = t.Rp;
  const int nl = t.nl;
  const int Rn = t.Rn;
  acc_t* const gs = smem;
  acc_t* const sw = smem + N + warp * 2 * Rn;
  acc_t* const dsw = sw + Rn;
  const int S = plan_count(v.header, PlanHeader::kNumSegments, nnz);
  const int U = plan_count(v.header, PlanHeader::kNumSlots, U_ub); // records [0, U) were written
  const int q_off = t.act_off[t.d - 2];
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const int s_begin = static_cast<int>(tt_min<int64_t>(tt_max<int64_t>(v.bag_segment_start[b], 0), S));
    const int s_end = static_cast<int>(tt_min<int64_t>(tt_max<int64_t>(v.bag_segment_start[b + 1], s_begin), S));
    if (s_begin >= s_end) { // block-uniform
      continue;
    }
    const acc_t scale = bag_scale<acc_t>(offsets, b, nnz, mean);
    block_load_row<VecWidth<scalar_t>::value>(grad_out + b * N, N, gvec, gs);
    __syncthreads();
    for (int s = s_begin + warp; s < s_end; s += kBagWarps) {
      const int64_t u = v.segment_slot[s];
      const bool has_q = u >= 0 && u < U; // warp-uniform
      const int p0 = static_cast<int>(tt_min<int64_t>(tt_max<int64_t>(v.segment_start[s], 0), nnz));
      const int p1 = static_cast<int>(tt_min<int64_t>(tt_max<int64_t>(v.segment_start[s + 1], p0), nnz));
      constexpr int V = VecWidth<scalar_t>::value;
      warp_segment_sum<V>(t, core_last, v.sorted_lookup, v.sorted_last, p0, p1, psw, scale, nnz, vec, sw);
      const acc_t* q = has_q ? act + u * t.act_size + q_off : nullptr;
      for (int e = lane; e < Rn; e += kWarpSize) {
        const int a = e / nl;
        const int c = e - a * nl;
        acc_t ds = acc_t(0);
        if (has_q) {
          for (int r = 0; r < Np; ++r) {
            ds += q[r * Rp + a] * gs[r * nl + c];
          }
        }
        dsw[e] = ds;
        if (kDet) {
          seg_dS[static_cast<int64_t>(s) * Rn + e] = ds;
          seg_S[static_cast<int64_t>(s) * Rn + e] = sw[e];
        }
      }
      __syncwarp();
      for (int p = p0; p < p1; ++p) {
        const int64_t j = v.sorted_lookup[p];
        const int64_t last = v.sorted_last[p];
        if (j < 0 || j >= nnz || last < 0 || last >= t.m_last) { // warp-uniform
          continue;
        }
        const int row = static_cast<int>(last) * Rn;
        if (psw_grad != nullptr) {
          acc_t part = acc_t(0);
          for (int e = lane; e < Rn; e += kWarpSize) {
            part += to_acc(core_last[row + e]) * dsw[e];
          }
          part = warp_sum(part);
          if (lane == 0) {
            psw_grad[j] = from_acc<scalar_t>(scale * part);
          }
        }
        if (!kDet && has_q) {
          const acc_t cj = (psw != nullptr ? to_acc(psw[j]) : acc_t(1)) * scale;
          for (int e = lane; e < Rn; e += kWarpSize) {
            atomicAdd(dcore_last + row + e, cj * dsw[e]);
          }
        }
      }
      if (!kDet && has_q) { // dQ_u += g_b S_s^T (N' x R')
        acc_t* dq = dact + u * t.act_size + q_off;
        for (int e = lane; e < Np * Rp; e += kWarpSize) {
          const int r = e / Rp;
          const int a = e - r * Rp;
          acc_t x = acc_t(0);
          for (int c = 0; c < nl; ++c) {
            x += gs[r * nl + c] * sw[a * nl + c];
          }
          atomicAdd(dq + e, x);
        }
      }
      __syncwarp(); // before the next segment overwrites sw / dsw
    }
    __syncthreads(); // before the next bag overwrites g_b
  }
}

// One block per slot u: dA_{d-2} = dQ_u (default: accumulated by the bag kernel in dact;
// deterministic: summed here over the slot's segments in plan order), then back through the prefix
// chain. Default: dcore_k[i_k] += A_{k-1}^T dA_k' with atomics. Deterministic: every dA_k is stored
// in the slot's dact record for the sorted reductions.
template <typename scalar_t, typename acc_t, bool kDet>
__global__ void __launch_bounds__(kPrefixThreads) grt_bwd_slot_kernel(
    KernelShape t,
    CorePtrs<scalar_t> cores,
    const acc_t* __restrict__ act,
    int64_t U_ub,
    PlanView<const int64_t> v,
    const scalar_t* __restrict__ grad_out,
    bool gvec,
    const acc_t* __restrict__ seg_S,
    int64_t B,
    int64_t nnz,
    acc_t* __restrict__ dact,
    GradPtrs<acc_t> grads) {
  TORCHREC_TT_DYNAMIC_SMEM(acc_t, smem);
  const int N = t.N;
  const int Np = t.Np;
  const int Rp = t.Rp;
  const int nl = t.nl;
  acc_t* const dq = smem; // N' x R'
  acc_t* const gs = dq + Np * Rp;
  acc_t* const ss = gs + N;
  acc_t* const buf0 = ss + t.Rn;
  acc_t* const buf1 = buf0 + t.max_chain;
  const int U = plan_count(v.header, PlanHeader::kNumSlots, U_ub);
  const int S = plan_count(v.header, PlanHeader::kNumSegments, nnz);
  const int q_off = t.act_off[t.d - 2];
  for (int u = blockIdx.x; u < U; u += gridDim.x) {
    const int64_t group = v.slot_group[u];
    if (group < 0 || group >= t.num_groups) { // block-uniform
      continue;
    }
    int64_t digits[kMaxCores] = {};
    group_digits(t.L, group, digits);
    const acc_t* rec = act + static_cast<int64_t>(u) * t.act_size;
    acc_t* const drec = dact + static_cast<int64_t>(u) * t.act_size;
    const acc_t* dcur = drec + q_off;
    if (kDet) {
      for (int e = threadIdx.x; e < Np * Rp; e += blockDim.x) {
        dq[e] = acc_t(0);
      }
      const int q0 = static_cast<int>(tt_min<int64_t>(tt_max<int64_t>(v.slot_segment_start[u], 0), S));
      const int q1 = static_cast<int>(tt_min<int64_t>(tt_max<int64_t>(v.slot_segment_start[u + 1], q0), S));
      for (int qq = q0; qq < q1; ++qq) {
        const int64_t s = v.slot_segment[qq];
        const int64_t b = (s >= 0 && s < S) ? v.segment_bag[s] : -1;
        if (b < 0 || b >= B) { // block-uniform
          continue;
        }
        __syncthreads(); // previous segment's reads of gs / ss are done
        block_load_row<VecWidth<scalar_t>::value>(grad_out + b * N, N, gvec, gs);
        for (int e = threadIdx.x; e < t.Rn; e += blockDim.x) {
          ss[e] = seg_S[s * t.Rn + e];
        }
        __syncthreads();
        for (int e = threadIdx.x; e < Np * Rp; e += blockDim.x) {
          const int r = e / Rp;
          const int a = e - r * Rp;
          acc_t x = acc_t(0);
          for (int c = 0; c < nl; ++c) {
            x += gs[r * nl + c] * ss[a * nl + c];
          }
          dq[e] += x;
        }
      }
      for (int e = threadIdx.x; e < Np * Rp; e += blockDim.x) {
        drec[q_off + e] = dq[e];
      }
      __syncthreads();
    }
    acc_t* nxt = buf0;
    for (int k = t.d - 2; k >= 0; --k) {
      const int Rk = t.R(k);
      const int L = t.cols(k);
      const int Nprev = k > 0 ? t.chain[k - 1] : 1;
      if (!kDet) {
        const acc_t* Aprev = k > 0 ? rec + t.act_off[k - 1] : nullptr;
        acc_t* dst = grads.p[k] + digits[k] * t.slice[k];
        for (int e = threadIdx.x; e < t.slice[k]; e += blockDim.x) {
          const int a = e / L;
          atomicAdd(dst + e, core_grad_elem(Aprev, dcur, Nprev, Rk, L, a, e - a * L));
        }
      }
      if (k >= 1) {
        acc_t* const out = kDet ? drec + t.act_off[k - 1] : nxt;
        block_chain_step_back(dcur, cores.p[k] + digits[k] * t.slice[k], Nprev, Rk, L, out);
        __syncthreads();
        dcur = out;
        nxt = nxt == buf0 ? buf1 : buf0;
      }
    }
    __syncthreads(); // before the next slot reuses the buffers
  }
}

// Deterministic mode: a lookup's contribution to the last core, c_j dS_seg, sorted with its key.
template <typename acc_t>
struct SegCoef {
  int32_t seg;
  acc_t coef;
};

// Deterministic mode, keys of the sorted reductions (n = nnz >= U_ub entries):
//   last core: key = last digit of sorted position p < segment_start[S] (m_last otherwise), value =
//              (segment, c_j), so that the reduction reads one value per item;
//   prefix core k: key = digit i_k of slot u's group (m_k for no / invalid slot).
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void grt_det_keys_kernel(
    KernelShape t,
    PlanView<const int64_t> v,
    const scalar_t* __restrict__ psw,
    const index_t* __restrict__ offsets,
    int64_t B,
    int64_t nnz,
    int mean,
    int64_t U_ub,
    uint32_t* __restrict__ last_keys,
    SegCoef<acc_t>* __restrict__ last_vals,
    int32_t* __restrict__ iota,
    uint32_t* __restrict__ k0,
    uint32_t* __restrict__ k1,
    uint32_t* __restrict__ k2) {
  const int S = plan_count(v.header, PlanHeader::kNumSegments, nnz);
  const int U = plan_count(v.header, PlanHeader::kNumSlots, U_ub);
  const int64_t nvalid = tt_min<int64_t>(tt_max<int64_t>(v.segment_start[S], 0), nnz);
  uint32_t* keys[3] = {k0, k1, k2};
  TORCHREC_TT_GRID_STRIDE(i, nnz) {
    const int64_t last = i < nvalid ? v.sorted_last[i] : -1;
    const int64_t j = i < nvalid ? v.sorted_lookup[i] : -1;
    const int64_t s = (j >= 0 && j < nnz) ? v.lookup_segment[j] : -1;
    const int64_t b = (s >= 0 && s < S) ? v.segment_bag[s] : -1;
    const bool ok = last >= 0 && last < t.m_last && b >= 0 && b < B;
    last_keys[i] = ok ? static_cast<uint32_t>(last) : static_cast<uint32_t>(t.m_last);
    last_vals[i] = ok
        ? SegCoef<acc_t>{static_cast<int32_t>(s),
                         (psw != nullptr ? to_acc(psw[j]) : acc_t(1)) * bag_scale<acc_t>(offsets, b, nnz, mean)}
        : SegCoef<acc_t>{-1, acc_t(0)};
    iota[i] = static_cast<int32_t>(i);
    if (i < U_ub) {
      const int64_t g = i < U ? v.slot_group[i] : -1;
      const bool valid = g >= 0 && g < t.num_groups;
      for (int k = 0; k + 1 < t.d; ++k) {
        keys[k][i] = valid ? static_cast<uint32_t>(mixed_radix_digit(t.L, g, k, t.d - 1))
                           : static_cast<uint32_t>(t.L.m[k]);
      }
    }
  }
}

// First position in [0, n) with keys[pos] >= value.
__device__ __forceinline__ int lower_bound_u32(const uint32_t* keys, int n, uint32_t value) {
  int lo = 0;
  int hi = n;
  while (lo < hi) {
    const int mid = lo + ((hi - lo) >> 1);
    if (keys[mid] < value) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Deterministic last-core gradient: block (row v of core d-1, element tiles) sums c_j dS_seg(j) over
// the lookups whose last digit is v, in sorted (plan) order.
template <typename acc_t>
__global__ void __launch_bounds__(kReduceThreads) grt_det_last_kernel(
    KernelShape t,
    const uint32_t* __restrict__ keys,
    const SegCoef<acc_t>* __restrict__ vals,
    int n,
    const acc_t* __restrict__ seg_dS,
    acc_t* __restrict__ dcore_last) {
  const int Rn = t.Rn;
  for (int64_t row = blockIdx.x; row < t.m_last; row += gridDim.x) {
    const int lo = lower_bound_u32(keys, n, static_cast<uint32_t>(row));
    const int hi = lower_bound_u32(keys, n, static_cast<uint32_t>(row) + 1u);
    for (int e = blockIdx.y * blockDim.x + threadIdx.x; e < Rn && hi > lo; e += gridDim.y * blockDim.x) {
      acc_t sum = acc_t(0);
      for (int q = lo; q < hi; ++q) {
        const SegCoef<acc_t> sc = vals[q];
        sum += sc.coef * seg_dS[static_cast<int64_t>(sc.seg) * Rn + e];
      }
      dcore_last[row * Rn + e] = sum;
    }
  }
}

// Sorted slots per prefix core k (deterministic mode).
struct PrefixRuns {
  const uint32_t* keys[kMaxCores] = {};
  const int32_t* items[kMaxCores] = {};
  int64_t row_start[kMaxCores + 1] = {}; // block rows of core k: [row_start[k], row_start[k+1])
};

// Deterministic prefix-core gradients, every core k <= d-2 in one launch: block (row of core k,
// element tile y) sums A_{k-1}^T dA_k' over the slots whose digit i_k is that row, in order.
template <typename acc_t>
__global__ void __launch_bounds__(kReduceThreads) grt_det_prefix_kernel(
    KernelShape t,
    PrefixRuns runs,
    int n,
    const acc_t* __restrict__ act,
    const acc_t* __restrict__ dact,
    GradPtrs<acc_t> grads) {
  for (int64_t r = blockIdx.x; r < runs.row_start[t.d - 1]; r += gridDim.x) {
    int k = 0;
    while (r >= runs.row_start[k + 1]) {
      ++k;
    }
    const int64_t row = r - runs.row_start[k];
    const int lo = lower_bound_u32(runs.keys[k], n, static_cast<uint32_t>(row));
    const int hi = lower_bound_u32(runs.keys[k], n, static_cast<uint32_t>(row) + 1u);
    const int L = t.cols(k);
    const int Nprev = k > 0 ? t.chain[k - 1] : 1;
    for (int e = blockIdx.y * blockDim.x + threadIdx.x; e < t.slice[k] && hi > lo; e += gridDim.y * blockDim.x) {
      const int a = e / L;
      const int rem = e - a * L;
      acc_t sum = acc_t(0);
      for (int q = lo; q < hi; ++q) {
        const int64_t u = runs.items[k][q];
        const acc_t* Aprev = k > 0 ? act + u * t.act_size + t.act_off[k - 1] : nullptr;
        sum += core_grad_elem(Aprev, dact + u * t.act_size + t.act_off[k], Nprev, t.R(k), L, a, rem);
      }
      grads.p[k][row * t.slice[k] + e] = sum;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// tt
// ---------------------------------------------------------------------------------------------

// One block per lookup j: chain forward (every A_k kept in shared memory), psw_grad[j] =
// scale_b <W[idx_j], g_b>, and with kCoreGrads the chain backward from c_j g_b, adding
// A_{k-1}^T dA_k' to every core's slice with atomics.
template <typename scalar_t, typename acc_t, typename index_t, bool kCoreGrads>
__global__ void __launch_bounds__(kTTThreads) tt_lookup_grad_kernel(
    KernelShape t,
    CorePtrs<scalar_t> cores,
    const index_t* __restrict__ indices,
    const index_t* __restrict__ offsets,
    const scalar_t* __restrict__ psw,
    const scalar_t* __restrict__ grad_out,
    int64_t B,
    int64_t nnz,
    int mean,
    scalar_t* __restrict__ psw_grad,
    GradPtrs<acc_t> grads) {
  TORCHREC_TT_DYNAMIC_SMEM(acc_t, smem);
  const int N = t.N;
  acc_t* const acts = smem; // A_k at act_off[k] (k <= d-2), the row A_{d-1} at act_size
  acc_t* const d0 = acts + t.act_size + N;
  acc_t* const d1 = d0 + t.max_chain_all;
  acc_t* const red = d1 + t.max_chain_all;
  const int64_t num_rows = t.num_groups * t.m_last;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int nwarps = (blockDim.x + kWarpSize - 1) / kWarpSize;
  for (int64_t j = blockIdx.x; j < nnz; j += gridDim.x) {
    const int64_t b = lookup_bag_of(offsets, B, nnz, j);
    const int64_t idx = static_cast<int64_t>(indices[j]);
    if (b < 0 || idx < 0 || idx >= num_rows) { // block-uniform
      continue;
    }
    const acc_t scale = bag_scale<acc_t>(offsets, b, nnz, mean);
    int64_t digits[kMaxCores] = {};
    row_digits(t.L, idx, digits);
    auto act_at = [&](int k) { return k + 1 < t.d ? acts + t.act_off[k] : acts + t.act_size; };
    block_chain_first(
        cores.p[0] + digits[0] * t.slice[0], t.cols(0), act_at(0), static_cast<acc_t*>(nullptr),
        static_cast<acc_t*>(nullptr), 0);
    __syncthreads();
    for (int k = 1; k < t.d; ++k) {
      block_chain_step(
          static_cast<const acc_t*>(act_at(k - 1)), cores.p[k] + digits[k] * t.slice[k], t.chain[k - 1],
          t.R(k), t.cols(k), act_at(k), static_cast<acc_t*>(nullptr), static_cast<acc_t*>(nullptr), 0);
      __syncthreads();
    }
    const acc_t* row = act_at(t.d - 1);
    if (psw_grad != nullptr) {
      acc_t part = acc_t(0);
      for (int o = threadIdx.x; o < N; o += blockDim.x) {
        part += row[o] * to_acc(grad_out[b * N + o]);
      }
      part = warp_sum(part);
      if (lane == 0) {
        red[warp] = part;
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        acc_t x = acc_t(0);
        for (int w = 0; w < nwarps; ++w) {
          x += red[w];
        }
        psw_grad[j] = from_acc<scalar_t>(scale * x);
      }
    }
    if (kCoreGrads) {
      const acc_t c = (psw != nullptr ? to_acc(psw[j]) : acc_t(1)) * scale;
      for (int o = threadIdx.x; o < N; o += blockDim.x) {
        d0[o] = c * to_acc(grad_out[b * N + o]);
      }
      __syncthreads();
      acc_t* dcur = d0;
      acc_t* dnxt = d1;
      for (int k = t.d - 1; k >= 0; --k) {
        const int L = t.cols(k);
        const int Nprev = k > 0 ? t.chain[k - 1] : 1;
        const acc_t* Aprev = k > 0 ? act_at(k - 1) : nullptr;
        acc_t* dst = grads.p[k] + digits[k] * t.slice[k];
        for (int e = threadIdx.x; e < t.slice[k]; e += blockDim.x) {
          const int a = e / L;
          atomicAdd(dst + e, core_grad_elem(Aprev, dcur, Nprev, t.R(k), L, a, e - a * L));
        }
        if (k >= 1) {
          block_chain_step_back(dcur, cores.p[k] + digits[k] * t.slice[k], Nprev, t.R(k), L, dnxt);
        }
        __syncthreads();
        acc_t* const tmp = dcur;
        dcur = dnxt;
        dnxt = tmp;
      }
    }
    __syncthreads(); // before the next lookup overwrites the buffers
  }
}

// Deterministic tt: key_k[j] = digit i_k of valid lookups (m_k otherwise), every k; iota[j] = j.
template <typename index_t>
__global__ void tt_det_keys_kernel(
    KernelShape t,
    const index_t* __restrict__ indices,
    const index_t* __restrict__ offsets,
    int64_t B,
    int64_t nnz,
    uint32_t* __restrict__ k0,
    uint32_t* __restrict__ k1,
    uint32_t* __restrict__ k2,
    uint32_t* __restrict__ k3,
    int32_t* __restrict__ iota) {
  uint32_t* keys[4] = {k0, k1, k2, k3};
  const int64_t num_rows = t.num_groups * t.m_last;
  TORCHREC_TT_GRID_STRIDE(j, nnz) {
    const int64_t idx = static_cast<int64_t>(indices[j]);
    const bool ok = idx >= 0 && idx < num_rows && lookup_bag_of(offsets, B, nnz, j) >= 0;
    for (int k = 0; k < t.d; ++k) {
      keys[k][j] = ok ? static_cast<uint32_t>(mixed_radix_digit(t.L, idx, k, t.d))
                      : static_cast<uint32_t>(t.L.m[k]);
    }
    iota[j] = static_cast<int32_t>(j);
  }
}

// Deterministic tt core gradients, every core in one launch: block (row of core k, tile y of EPT *
// blockDim elements) recomputes the chain of each lookup in its run (forward to A_{k-1}, backward
// from c_j g_b to dA_k) in shared memory and sums A_{k-1}^T dA_k' in order.
template <typename scalar_t, typename acc_t, typename index_t, int EPT>
__global__ void __launch_bounds__(kReduceThreads) tt_det_core_kernel(
    KernelShape t,
    CorePtrs<scalar_t> cores,
    PrefixRuns runs,
    const index_t* __restrict__ indices,
    const index_t* __restrict__ offsets,
    const scalar_t* __restrict__ psw,
    const scalar_t* __restrict__ grad_out,
    int64_t B,
    int64_t nnz,
    int mean,
    GradPtrs<acc_t> grads) {
  TORCHREC_TT_DYNAMIC_SMEM(acc_t, smem);
  const int M = t.max_chain_all;
  acc_t* const a0 = smem;
  acc_t* const a1 = smem + M;
  acc_t* const d0 = smem + 2 * M;
  const int n = static_cast<int>(nnz);
  const int tile_elems = static_cast<int>(blockDim.x) * EPT;
  for (int64_t r = blockIdx.x; r < runs.row_start[t.d]; r += gridDim.x) {
    int k = 0;
    while (r >= runs.row_start[k + 1]) {
      ++k;
    }
    const int64_t row = r - runs.row_start[k];
    const int lo = lower_bound_u32(runs.keys[k], n, static_cast<uint32_t>(row));
    const int hi = lower_bound_u32(runs.keys[k], n, static_cast<uint32_t>(row) + 1u);
    for (int tile = blockIdx.y; hi > lo && tile * tile_elems < t.slice[k]; tile += gridDim.y) { // block-uniform
      const int base = tile * tile_elems + threadIdx.x;
      const int L = t.cols(k);
      const int Nprev = k > 0 ? t.chain[k - 1] : 1;
      acc_t acc[EPT];
  #pragma unroll
      for (int i = 0; i < EPT; ++i) {
        acc[i] = acc_t(0);
      }
      for (int q = lo; q < hi; ++q) {
        const int64_t j = runs.items[k][q];
        const int64_t b = lookup_bag_of(offsets, B, nnz, j);
        int64_t digits[kMaxCores] = {};
        row_digits(t.L, static_cast<int64_t>(indices[j]), digits);
        const acc_t* Aprev = nullptr;
        acc_t* d1 = a1; // free unless it ends up holding A_{k-1}
        if (k >= 1) {
          block_chain_first(
              cores.p[0] + digits[0] * t.slice[0], t.cols(0), a0, static_cast<acc_t*>(nullptr),
              static_cast<acc_t*>(nullptr), 0);
          __syncthreads();
          acc_t* cur = a0;
          acc_t* nxt = a1;
          for (int kk = 1; kk <= k - 1; ++kk) {
            block_chain_step(
                cur, cores.p[kk] + digits[kk] * t.slice[kk], t.chain[kk - 1], t.R(kk), t.cols(kk), nxt,
                static_cast<acc_t*>(nullptr), static_cast<acc_t*>(nullptr), 0);
            __syncthreads();
            acc_t* const tmp = cur;
            cur = nxt;
            nxt = tmp;
          }
          Aprev = cur;
          d1 = nxt;
        }
        const acc_t c = (psw != nullptr ? to_acc(psw[j]) : acc_t(1)) * bag_scale<acc_t>(offsets, b, nnz, mean);
        for (int o = threadIdx.x; o < t.N; o += blockDim.x) {
          d0[o] = c * to_acc(grad_out[b * t.N + o]);
        }
        __syncthreads();
        acc_t* dcur = d0;
        acc_t* dnxt = d1;
        for (int kk = t.d - 1; kk > k; --kk) {
          block_chain_step_back(
              dcur, cores.p[kk] + digits[kk] * t.slice[kk], t.chain[kk - 1], t.R(kk), t.cols(kk), dnxt);
          __syncthreads();
          acc_t* const tmp = dcur;
          dcur = dnxt;
          dnxt = tmp;
        }
  #pragma unroll
        for (int i = 0; i < EPT; ++i) {
          const int e = base + i * static_cast<int>(blockDim.x);
          if (e < t.slice[k]) {
            const int a = e / L;
            acc[i] += core_grad_elem(Aprev, dcur, Nprev, t.R(k), L, a, e - a * L);
          }
        }
        __syncthreads(); // before the next lookup overwrites the buffers
      }
  #pragma unroll
      for (int i = 0; i < EPT; ++i) {
        const int e = base + i * static_cast<int>(blockDim.x);
        if (e < t.slice[k]) {
          grads.p[k][row * t.slice[k] + e] = acc[i];
        }
      }
    }
  }
}

constexpr int kTTDetEPT = 4;

// zeros: the output buffers to zero first (this adds the dQ accumulators of the default mode).
template <typename scalar_t, typename index_t>
void grt_backward(
    LaunchCtx& ctx,
    const LookupBatch<scalar_t, index_t>& in,
    const KernelShape& t,
    const int64_t* plan,
    const scalar_t* grad_out,
    const GradPtrs<acc_type<scalar_t>>& grads,
    scalar_t* psw_grad,
    bool deterministic,
    ZeroList zeros) {
  using acc_t = acc_type<scalar_t>;
  const int d = t.d;
  if (plan == nullptr) {
    int64_t* built = ctx.alloc_n<int64_t>(PlanLayout::make(in.nnz, in.B).numel);
    build_group_plan(ctx, in.indices, in.offsets, in.B, in.nnz, t.m_last, t.num_groups, built);
    plan = built;
  }
  const PlanView<const int64_t> v = PlanView<const int64_t>::make(plan, in.nnz, in.B);
  const int64_t U_ub = tt_min<int64_t>(in.nnz, t.num_groups);
  acc_t* act = ctx.alloc_n<acc_t>(U_ub * t.act_size);
  acc_t* dact = ctx.alloc_n<acc_t>(U_ub * t.act_size);
  acc_t* seg_S = deterministic ? ctx.alloc_n<acc_t>(in.nnz * t.Rn) : nullptr;
  acc_t* seg_dS = deterministic ? ctx.alloc_n<acc_t>(in.nnz * t.Rn) : nullptr;
  if (!deterministic) {
    zeros.add(dact, U_ub * t.act_size * static_cast<int64_t>(sizeof(acc_t)));
  }
  zero_async(ctx, zeros);
  launch_grt_prefix(ctx, t, in.cores, plan, in.nnz, in.B, U_ub, act, /*store_all=*/1);
  const scalar_t* core_last = in.cores.p[d - 1];
  const bool vec = vec_aligned<VecWidth<scalar_t>::value>(core_last, t.Rn);
  const bool gvec = vec_aligned<VecWidth<scalar_t>::value>(grad_out, t.N);
  {
    const size_t smem = smem_grt_bwd_bag(t, sizeof(acc_t));
    const auto launch = [&](auto det) {
      const auto kernel = &grt_bwd_bag_kernel<scalar_t, acc_t, index_t, decltype(det)::value>;
      ensure_dynamic_smem(ctx, kernel, smem);
      TORCHREC_TT_LAUNCH(
          ctx, kernel, grid_for_items(in.B), kBagThreads, smem, t, core_last,
          static_cast<const acc_t*>(act), U_ub, v, in.psw, in.offsets, grad_out, in.B, in.nnz,
          in.pooling_mode, vec, gvec, psw_grad, grads.p[d - 1], dact, seg_S, seg_dS);
    };
    if (deterministic) {
      launch(std::true_type{});
    } else {
      launch(std::false_type{});
    }
  }
  {
    const size_t smem = smem_grt_slot(t, sizeof(acc_t));
    const auto launch = [&](auto det) {
      const auto kernel = &grt_bwd_slot_kernel<scalar_t, acc_t, decltype(det)::value>;
      ensure_dynamic_smem(ctx, kernel, smem);
      TORCHREC_TT_LAUNCH(
          ctx, kernel, grid_for_items(U_ub), kPrefixThreads, smem, t, in.cores,
          static_cast<const acc_t*>(act), U_ub, v, grad_out, gvec, static_cast<const acc_t*>(seg_S), in.B,
          in.nnz, dact, grads);
    };
    if (deterministic) {
      launch(std::true_type{});
    } else {
      launch(std::false_type{});
    }
  }
  if (!deterministic) {
    return;
  }
  // Sorted reductions: keys, sorts, one last-core and one prefix-core reduction.
  const int n = static_cast<int>(in.nnz);
  uint32_t* last_keys = ctx.alloc_n<uint32_t>(in.nnz);
  uint32_t* last_keys_sorted = ctx.alloc_n<uint32_t>(in.nnz);
  SegCoef<acc_t>* last_vals = ctx.alloc_n<SegCoef<acc_t>>(in.nnz);
  SegCoef<acc_t>* last_vals_sorted = ctx.alloc_n<SegCoef<acc_t>>(in.nnz);
  int32_t* iota = ctx.alloc_n<int32_t>(in.nnz);
  uint32_t* pkeys[3] = {};
  for (int k = 0; k + 1 < d; ++k) {
    pkeys[k] = ctx.alloc_n<uint32_t>(U_ub);
  }
  launch_elems(
      ctx, &grt_det_keys_kernel<scalar_t, acc_t, index_t>, in.nnz, t, v, in.psw, in.offsets, in.B,
      in.nnz, in.pooling_mode, U_ub, last_keys, last_vals, iota, pkeys[0], pkeys[1], pkeys[2]);
  radix_sort_pairs(
      ctx, static_cast<const uint32_t*>(last_keys), last_keys_sorted,
      static_cast<const SegCoef<acc_t>*>(last_vals), last_vals_sorted, n,
      bit_width_u64(static_cast<uint64_t>(t.m_last)));
  PrefixRuns runs;
  runs.keys[0] = pkeys[0];
  runs.items[0] = iota; // digit i_0 ascends with the group: slots are already in order
  for (int k = 1; k + 1 < d; ++k) {
    uint32_t* sorted = ctx.alloc_n<uint32_t>(U_ub);
    int32_t* items = ctx.alloc_n<int32_t>(U_ub);
    radix_sort_pairs(
        ctx, static_cast<const uint32_t*>(pkeys[k]), sorted, static_cast<const int32_t*>(iota), items,
        static_cast<int>(U_ub), bit_width_u64(static_cast<uint64_t>(in.layout.m[k])));
    runs.keys[k] = sorted;
    runs.items[k] = items;
  }
  for (int k = 0; k + 1 < d; ++k) {
    runs.row_start[k + 1] = runs.row_start[k] + in.layout.m[k];
  }
  {
    const dim3 grid(grid_for_items(t.m_last), grid_y_for_tiles(ceil_div_i64(t.Rn, kReduceThreads)));
    const auto kernel = &grt_det_last_kernel<acc_t>;
    TORCHREC_TT_LAUNCH(
        ctx, kernel, grid, kReduceThreads, 0, t, static_cast<const uint32_t*>(last_keys_sorted),
        static_cast<const SegCoef<acc_t>*>(last_vals_sorted), n, static_cast<const acc_t*>(seg_dS),
        grads.p[d - 1]);
  }
  if (U_ub > 0) {
    int max_slice = 0;
    for (int k = 0; k + 1 < d; ++k) {
      max_slice = tt_max(max_slice, t.slice[k]);
    }
    const dim3 grid(
        grid_for_items(runs.row_start[d - 1]), grid_y_for_tiles(ceil_div_i64(max_slice, kReduceThreads)));
    const auto kernel = &grt_det_prefix_kernel<acc_t>;
    TORCHREC_TT_LAUNCH(
        ctx, kernel, grid, kReduceThreads, 0, t, runs, static_cast<int>(U_ub),
        static_cast<const acc_t*>(act), static_cast<const acc_t*>(dact), grads);
  }
}

template <typename scalar_t, typename index_t>
void tt_backward_tt(
    LaunchCtx& ctx,
    const LookupBatch<scalar_t, index_t>& in,
    const KernelShape& t,
    const scalar_t* grad_out,
    const GradPtrs<acc_type<scalar_t>>& grads,
    scalar_t* psw_grad,
    bool deterministic,
    const ZeroList& zeros) {
  using acc_t = acc_type<scalar_t>;
  const int d = t.d;
  zero_async(ctx, zeros);
  const size_t smem = smem_tt_lookup_grad(t, sizeof(acc_t));
  if (!deterministic || psw_grad != nullptr) {
    const auto launch = [&](auto core_grads) {
      const auto kernel = &tt_lookup_grad_kernel<scalar_t, acc_t, index_t, decltype(core_grads)::value>;
      ensure_dynamic_smem(ctx, kernel, smem);
      TORCHREC_TT_LAUNCH(
          ctx, kernel, grid_for_items(in.nnz), kTTThreads, smem, t, in.cores, in.indices, in.offsets,
          in.psw, grad_out, in.B, in.nnz, in.pooling_mode, psw_grad, grads);
    };
    if (deterministic) {
      launch(std::false_type{});
    } else {
      launch(std::true_type{});
    }
  }
  if (!deterministic) {
    return;
  }
  const int n = static_cast<int>(in.nnz);
  uint32_t* keys[kMaxCores] = {};
  for (int k = 0; k < d; ++k) {
    keys[k] = ctx.alloc_n<uint32_t>(in.nnz);
  }
  int32_t* iota = ctx.alloc_n<int32_t>(in.nnz);
  launch_elems(
      ctx, &tt_det_keys_kernel<index_t>, in.nnz, t, in.indices, in.offsets, in.B, in.nnz, keys[0],
      keys[1], keys[2], keys[3], iota);
  PrefixRuns runs;
  int max_slice = 0;
  for (int k = 0; k < d; ++k) {
    uint32_t* sorted = ctx.alloc_n<uint32_t>(in.nnz);
    int32_t* items = ctx.alloc_n<int32_t>(in.nnz);
    radix_sort_pairs(
        ctx, static_cast<const uint32_t*>(keys[k]), sorted, static_cast<const int32_t*>(iota), items, n,
        bit_width_u64(static_cast<uint64_t>(in.layout.m[k])));
    runs.keys[k] = sorted;
    runs.items[k] = items;
    runs.row_start[k + 1] = runs.row_start[k] + in.layout.m[k];
    max_slice = tt_max(max_slice, t.slice[k]);
  }
  const size_t rsmem = smem_tt_core_reduce(t, sizeof(acc_t));
  const auto kernel = &tt_det_core_kernel<scalar_t, acc_t, index_t, kTTDetEPT>;
  ensure_dynamic_smem(ctx, kernel, rsmem);
  const dim3 grid(
      grid_for_items(runs.row_start[d]),
      grid_y_for_tiles(ceil_div_i64(max_slice, static_cast<int64_t>(kReduceThreads) * kTTDetEPT)));
  TORCHREC_TT_LAUNCH(
      ctx, kernel, grid, kReduceThreads, rsmem, t, in.cores, runs, in.indices, in.offsets, in.psw,
      grad_out, in.B, in.nnz, in.pooling_mode, grads);
}

} // namespace

template <typename scalar_t, typename index_t>
void tt_backward(
    LaunchCtx& ctx,
    const LookupBatch<scalar_t, index_t>& in,
    int variant,
    const int64_t* plan,
    const scalar_t* grad_out,
    const GradPtrs<acc_type<scalar_t>>& grads,
    scalar_t* psw_grad,
    bool deterministic) {
  using acc_t = acc_type<scalar_t>;
  const KernelShape t = make_kernel_shape(in.layout);
  // Every output is zeroed (one launch, with the grt default mode's dQ accumulators): rows no lookup
  // touches and weights of invalid lookups stay 0.
  ZeroList zeros;
  for (int k = 0; k < t.d; ++k) {
    zeros.add(grads.p[k], in.layout.core_numel(k) * static_cast<int64_t>(sizeof(acc_t)));
  }
  if (psw_grad != nullptr) {
    zeros.add(psw_grad, in.nnz * static_cast<int64_t>(sizeof(scalar_t)));
  }
  if (in.B <= 0 || in.nnz <= 0) {
    zero_async(ctx, zeros);
    return;
  }
  if (static_cast<Variant>(variant) == Variant::kTT) {
    tt_backward_tt(ctx, in, t, grad_out, grads, psw_grad, deterministic, zeros);
  } else {
    grt_backward(ctx, in, t, plan, grad_out, grads, psw_grad, deterministic, zeros);
  }
}

size_t max_smem_bytes(const TTLayout& layout, int variant, bool backward, size_t acc_bytes) {
  const KernelShape t = make_kernel_shape(layout);
  size_t s = 0;
  if (static_cast<Variant>(variant) == Variant::kGRT) {
    s = tt_max(smem_grt_prefix(t, acc_bytes), smem_grt_fwd_bag(t, acc_bytes));
    if (backward) {
      s = tt_max(s, tt_max(smem_grt_bwd_bag(t, acc_bytes), smem_grt_slot(t, acc_bytes)));
    }
  } else {
    s = smem_tt_fwd(t, acc_bytes);
    if (backward) {
      s = tt_max(s, tt_max(smem_tt_lookup_grad(t, acc_bytes), smem_tt_core_reduce(t, acc_bytes)));
    }
  }
  return s;
}

#define TORCHREC_TT_INSTANTIATE_BACKWARD(scalar_t, index_t)                                      \
  template void tt_backward<scalar_t, index_t>(                                                  \
      LaunchCtx&, const LookupBatch<scalar_t, index_t>&, int, const int64_t*, const scalar_t*,    \
      const GradPtrs<acc_type<scalar_t>>&, scalar_t*, bool);
TORCHREC_TT_INSTANTIATE_SCALAR_INDEX(TORCHREC_TT_INSTANTIATE_BACKWARD)
#undef TORCHREC_TT_INSTANTIATE_BACKWARD

} // namespace torchrec_tt::gpu
