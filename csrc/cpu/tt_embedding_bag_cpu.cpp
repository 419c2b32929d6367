// CPU kernels for torchrec_tt::tt_embedding_bag and torchrec_tt::tt_embedding_bag_backward.
//
// Notation (DESIGN.md section 1): d cores, core k of shape (m_k, R[k], n_k, R[k+1]); the prefix of a
// group is Q (N' x R'), the last core's slice L = core_{d-1}[last] is (R' x n_l); a row is
// W = Q @ L (N' x n_l, i.e. N = N' * n_l values). c_j is the coefficient of lookup j (per-sample
// weight times 1/L_b for mean pooling).
//
//   variant tt  (0): per lookup, the full chain, then y_b += c_j * W[idx_j].
//   variant grt (1): distinct groups of the batch (slots) and Q once per slot; per bag, its lookups
//                    sorted by (group, position) form the (bag, group) segments:
//                    S_s = sum_{j in s} c_j L_j (intra-group), y_b += Q_slot(s) @ S_s (inter-group).
//                    The backward uses the full plan (build_group_plan_cpu) to work slot by slot.
//
// All matrix products are small hand-written loops on raw pointers (no per-bag ATen calls), with
// contiguous, vectorizable innermost loops and per-thread scratch allocated once per parallel range.
// Results do not depend on the number of threads, except for the tt backward (per-thread dense
// buffers reduced in a fixed order), which is still deterministic for a fixed thread count.
// CPU dtypes are float32/float64, whose accumulation type is the dtype itself.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "torchrec_tt/checks.h"
#include "torchrec_tt/cpu_group_plan.h"
#include "torchrec_tt/dispatch.h"
#include "torchrec_tt/tt_layout.h"

#if defined(__GNUC__) || defined(__clang__)
#define TORCHREC_TT_RESTRICT __restrict__
#else
#define TORCHREC_TT_RESTRICT
#endif

namespace torchrec_tt::cpu {
namespace {

// Upper bound on the large scratch buffers (grt: per-slot prefixes and per-segment gradients, processed
// in slot chunks beyond it; tt backward: per-thread dense gradient buffers). Overridable at build time
// (tests build with a tiny budget to exercise the chunked paths).
#ifndef TORCHREC_TT_CPU_SCRATCH_BUDGET_BYTES
#define TORCHREC_TT_CPU_SCRATCH_BUDGET_BYTES (int64_t{128} << 20)
#endif
constexpr int64_t kScratchBudgetBytes = TORCHREC_TT_CPU_SCRATCH_BUDGET_BYTES;

// ----------------------------------------------------------------------------------------------
// Micro kernels on row-major contiguous matrices.
// ----------------------------------------------------------------------------------------------

// C[M x N] (= or +=) alpha * sum_k A(i, k) * B[k, :] with A(i, k) = A[i * a_row + k * a_col] and B
// row-major [K x N]: rows of C are updated with axpys over contiguous rows of B, four k at a time
// (one load/store of C per four products; the innermost loop is contiguous and vectorizes).
template <bool kAccumulate, typename acc_t, typename a_t, typename b_t>
inline void gemm_strided_a(
    int64_t M,
    int64_t N,
    int64_t K,
    acc_t alpha,
    const a_t* TORCHREC_TT_RESTRICT A,
    int64_t a_row,
    int64_t a_col,
    const b_t* TORCHREC_TT_RESTRICT B,
    acc_t* TORCHREC_TT_RESTRICT C) {
  for (int64_t i = 0; i < M; ++i) {
    acc_t* TORCHREC_TT_RESTRICT c = C + i * N;
    const a_t* a = A + i * a_row;
    if constexpr (!kAccumulate) {
      std::fill(c, c + N, acc_t(0));
    }
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
      const acc_t a0 = alpha * static_cast<acc_t>(a[k * a_col]);
      const acc_t a1 = alpha * static_cast<acc_t>(a[(k + 1) * a_col]);
      const acc_t a2 = alpha * static_cast<acc_t>(a[(k + 2) * a_col]);
      const acc_t a3 = alpha * static_cast<acc_t>(a[(k + 3) * a_col]);
      const b_t* TORCHREC_TT_RESTRICT b0 = B + k * N;
      const b_t* TORCHREC_TT_RESTRICT b1 = b0 + N;
      const b_t* TORCHREC_TT_RESTRICT b2 = b1 + N;
      const b_t* TORCHREC_TT_RESTRICT b3 = b2 + N;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) {
        c[j] += (a0 * static_cast<acc_t>(b0[j]) + a1 * static_cast<acc_t>(b1[j])) +
            (a2 * static_cast<acc_t>(b2[j]) + a3 * static_cast<acc_t>(b3[j]));
      }
    }
    for (; k < K; ++k) {
      const acc_t a0 = alpha * static_cast<acc_t>(a[k * a_col]);
      const b_t* TORCHREC_TT_RESTRICT b0 = B + k * N;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) {
        c[j] += a0 * static_cast<acc_t>(b0[j]);
      }
    }
  }
}

// C[M x N] (= or +=) alpha * A[M x K] @ B[K x N].
template <bool kAccumulate, typename acc_t, typename a_t, typename b_t>
inline void gemm_nn(
    int64_t M,
    int64_t N,
    int64_t K,
    acc_t alpha,
    const a_t* A,
    const b_t* B,
    acc_t* C) {
  gemm_strided_a<kAccumulate>(M, N, K, alpha, A, /*a_row=*/K, /*a_col=*/1, B, C);
}

// C[M x N] (= or +=) alpha * A^T @ B with A stored [K x M] and B [K x N].
template <bool kAccumulate, typename acc_t, typename a_t, typename b_t>
inline void gemm_tn(
    int64_t M,
    int64_t N,
    int64_t K,
    acc_t alpha,
    const a_t* A,
    const b_t* B,
    acc_t* C) {
  gemm_strided_a<kAccumulate>(M, N, K, alpha, A, /*a_row=*/1, /*a_col=*/M, B, C);
}

// C[M x N] = A[M x K] @ B^T with B stored [N x K] (row dot products).
template <typename acc_t, typename a_t, typename b_t>
inline void gemm_nt(
    int64_t M,
    int64_t N,
    int64_t K,
    const a_t* TORCHREC_TT_RESTRICT A,
    const b_t* TORCHREC_TT_RESTRICT B,
    acc_t* TORCHREC_TT_RESTRICT C) {
  for (int64_t i = 0; i < M; ++i) {
    const a_t* TORCHREC_TT_RESTRICT a = A + i * K;
    for (int64_t j = 0; j < N; ++j) {
      const b_t* TORCHREC_TT_RESTRICT b = B + j * K;
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < K; ++k) {
        sum += static_cast<acc_t>(a[k]) * static_cast<acc_t>(b[k]);
      }
      C[i * N + j] = sum;
    }
  }
}

// dst[cols x rows] = src[rows x cols]^T.
template <typename dst_t, typename src_t>
inline void transpose(
    int64_t rows,
    int64_t cols,
    const src_t* TORCHREC_TT_RESTRICT src,
    dst_t* TORCHREC_TT_RESTRICT dst) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      dst[c * rows + r] = static_cast<dst_t>(src[r * cols + c]);
    }
  }
}

// y[0, n) += alpha * x[0, n).
template <typename acc_t, typename x_t>
inline void axpy(int64_t n, acc_t alpha, const x_t* TORCHREC_TT_RESTRICT x, acc_t* TORCHREC_TT_RESTRICT y) {
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) {
    y[t] += alpha * static_cast<acc_t>(x[t]);
  }
}

template <typename acc_t, typename x_t, typename y_t>
inline acc_t dot(int64_t n, const x_t* TORCHREC_TT_RESTRICT x, const y_t* TORCHREC_TT_RESTRICT y) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < n; ++t) {
    sum += static_cast<acc_t>(x[t]) * static_cast<acc_t>(y[t]);
  }
  return sum;
}

// ----------------------------------------------------------------------------------------------
// Work partitioning.
// ----------------------------------------------------------------------------------------------

// Below this total weight (about one lookup per unit) waking the thread pool costs more than
// the work, especially when several ranks share a few cores.
constexpr int64_t kMinParallelWeight = 512;

// Runs f(begin, end) on contiguous sub-ranges of [0, n) of about equal weight, one per thread.
// prefix(i) is the non-decreasing cumulative weight of items [0, i).
template <typename Prefix, typename F>
void weighted_parallel_for(int64_t n, const Prefix& prefix, const F& f) {
  if (n <= 0) {
    return;
  }
  const int64_t base = prefix(0);
  const int64_t total = prefix(n) - base;
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t parts = total < kMinParallelWeight ? 1 : std::min<int64_t>(threads, n);
  if (parts <= 1) {
    f(int64_t{0}, n);
    return;
  }
  std::vector<int64_t> bounds(parts + 1);
  bounds[0] = 0;
  bounds[parts] = n;
  for (int64_t p = 1; p < parts; ++p) {
    // First i with prefix(i) - base >= total * p / parts.
    const int64_t target = static_cast<int64_t>(static_cast<double>(total) * p / parts);
    int64_t lo = bounds[p - 1];
    int64_t hi = n;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (prefix(mid) - base >= target) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    bounds[p] = lo;
  }
  at::parallel_for(0, parts, 1, [&](int64_t p_begin, int64_t p_end) {
    for (int64_t p = p_begin; p < p_end; ++p) {
      if (bounds[p] < bounds[p + 1]) {
        f(bounds[p], bounds[p + 1]);
      }
    }
  });
}

// ----------------------------------------------------------------------------------------------
// TT prefix chain.
// ----------------------------------------------------------------------------------------------

// Where the running chain matrices A_k (chain_rows(k) x R[k+1]), k = 0..d-2, live in a chain buffer.
// A_0 = core_0[i_0] viewed (n_0 x R[1]); A_k = (A_{k-1} @ core_k[i_k] viewed (R[k] x n_k R[k+1]))
// viewed (chain_rows(k) x R[k+1]); Q = A_{d-2}.
struct ChainLayout {
  int64_t offset[kMaxCores] = {};
  int64_t size = 0; // elements of one chain buffer
  int64_t max_step = 0; // max_k chain_rows(k) * R[k+1] (gradient ping-pong buffers)
};

ChainLayout make_chain_layout(const TTLayout& L) {
  ChainLayout cl;
  for (int64_t k = 0; k + 1 < L.d; ++k) {
    const int64_t step = L.chain_rows(k) * L.R[k + 1];
    cl.offset[k] = cl.size;
    cl.size += step;
    cl.max_step = std::max(cl.max_step, step);
  }
  return cl;
}

template <typename scalar_t>
struct CorePtrs {
  const scalar_t* ptr[kMaxCores] = {};
};

// Computes A_0..A_{d-2} for the prefix digits (i_0..i_{d-2}) into buf; returns Q (N' x R').
template <typename acc_t, typename scalar_t>
inline const acc_t* prefix_chain(
    const TTLayout& L,
    const ChainLayout& cl,
    const CorePtrs<scalar_t>& cores,
    const int64_t* digits,
    acc_t* buf) {
  const int64_t s0 = L.slice_numel(0);
  const scalar_t* src = cores.ptr[0] + digits[0] * s0;
  acc_t* a0 = buf + cl.offset[0];
  for (int64_t t = 0; t < s0; ++t) {
    a0[t] = static_cast<acc_t>(src[t]);
  }
  for (int64_t k = 1; k + 1 < L.d; ++k) {
    gemm_nn</*kAccumulate=*/false>(
        L.chain_rows(k - 1),
        L.n[k] * L.R[k + 1],
        L.R[k],
        acc_t(1),
        buf + cl.offset[k - 1],
        cores.ptr[k] + digits[k] * L.slice_numel(k),
        buf + cl.offset[k]);
  }
  return buf + cl.offset[L.d - 2];
}

// Back-propagates dQ (in dcur, N' x R'; clobbered) through the prefix chain held in buf and
// accumulates the slice gradients: dst[k] (R[k] x n_k x R[k+1]) += d core_k[i_k], k = 0..d-2.
// dcur and dnext hold cl.max_step elements each.
template <typename acc_t, typename scalar_t>
inline void prefix_chain_backward(
    const TTLayout& L,
    const ChainLayout& cl,
    const CorePtrs<scalar_t>& cores,
    const int64_t* digits,
    const acc_t* buf,
    acc_t* dcur,
    acc_t* dnext,
    acc_t* const* dst) {
  for (int64_t k = L.d - 2; k >= 1; --k) {
    const int64_t rows = L.chain_rows(k - 1);
    const int64_t rk = L.R[k];
    const int64_t cols = L.n[k] * L.R[k + 1];
    const acc_t* a_prev = buf + cl.offset[k - 1];
    // d slice_k (R[k] x cols) += A_{k-1}^T (R[k] x rows) @ dOut (rows x cols)
    gemm_tn</*kAccumulate=*/true>(rk, cols, rows, acc_t(1), a_prev, dcur, dst[k]);
    // dA_{k-1} (rows x R[k]) = dOut (rows x cols) @ slice_k^T
    gemm_nt(rows, rk, cols, dcur, cores.ptr[k] + digits[k] * L.slice_numel(k), dnext);
    std::swap(dcur, dnext);
  }
  axpy(L.slice_numel(0), acc_t(1), dcur, dst[0]);
}

// y (N' x n_l, row-major, i.e. the output row) = yT^T, yT being (n_l x N').
template <typename scalar_t, typename acc_t>
inline void store_row(int64_t np, int64_t nl, const acc_t* yT, scalar_t* y) {
  transpose(nl, np, yT, y);
}

template <typename acc_t, typename scalar_t, typename index_t>
struct BagCoefficients {
  const index_t* offsets;
  const scalar_t* psw; // nullable
  bool mean;

  // 1 / L_b for mean pooling of a non-empty bag, 1 otherwise.
  acc_t scale(int64_t b) const {
    const int64_t len = static_cast<int64_t>(offsets[b + 1]) - static_cast<int64_t>(offsets[b]);
    return (mean && len > 0) ? acc_t(1) / static_cast<acc_t>(len) : acc_t(1);
  }
  acc_t weight(int64_t j) const {
    return psw == nullptr ? acc_t(1) : static_cast<acc_t>(psw[j]);
  }
};

// One table's batch as the kernels see it (checked, contiguous; psw nullable), with the sizes every
// kernel uses: Q is N' x R' (np x rp), a last-core slice R' x n_l (rp x nl, last_numel entries), a
// row N = N' n_l.
template <typename scalar_t, typename index_t>
struct Batch {
  Batch(
      const TTLayout& layout,
      const CorePtrs<scalar_t>& core_ptrs,
      const index_t* indices_,
      const index_t* offsets_,
      const scalar_t* psw_,
      int64_t batch_size_,
      int64_t nnz_,
      bool mean)
      : L(layout),
        cores(core_ptrs),
        indices(indices_),
        offsets(offsets_),
        psw(psw_),
        batch_size(batch_size_),
        nnz(nnz_),
        cl(make_chain_layout(layout)),
        np(layout.prefix_dim()),
        rp(layout.prefix_rank()),
        nl(layout.last_dim()),
        N(np * nl),
        last_numel(layout.slice_numel(layout.d - 1)),
        core_last(core_ptrs.ptr[layout.d - 1]),
        coef{offsets_, psw_, mean} {}

  const TTLayout& L;
  CorePtrs<scalar_t> cores;
  const index_t* indices;
  const index_t* offsets;
  const scalar_t* psw;
  int64_t batch_size;
  int64_t nnz;
  ChainLayout cl;
  int64_t np;
  int64_t rp;
  int64_t nl;
  int64_t N;
  int64_t last_numel;
  const scalar_t* core_last;
  BagCoefficients<acc_type_t<scalar_t>, scalar_t, index_t> coef;
};

// S (R' x n_l) = sum over the plan's sorted lookups [k0, k1) of scale * w_j * core_last[last_j].
template <typename acc_t, typename scalar_t, typename index_t>
inline void segment_reduce(
    int64_t k0,
    int64_t k1,
    const int64_t* sorted_lookups,
    const int64_t* sorted_last,
    const scalar_t* core_last,
    int64_t last_numel,
    const BagCoefficients<acc_t, scalar_t, index_t>& coef,
    acc_t scale,
    acc_t* S) {
  std::fill(S, S + last_numel, acc_t(0));
  for (int64_t k = k0; k < k1; ++k) {
    axpy(last_numel, scale * coef.weight(sorted_lookups[k]), core_last + sorted_last[k] * last_numel, S);
  }
}

// ----------------------------------------------------------------------------------------------
// Forward.
// ----------------------------------------------------------------------------------------------

template <typename scalar_t, typename index_t>
void forward_tt(const Batch<scalar_t, index_t>& in, scalar_t* out) {
  using acc_t = acc_type_t<scalar_t>;
  weighted_parallel_for(
      in.batch_size,
      [&](int64_t b) { return static_cast<int64_t>(in.offsets[b]) + b; },
      [&](int64_t b_begin, int64_t b_end) {
        std::vector<acc_t> scratch(in.cl.size + in.rp * in.np + in.N);
        acc_t* chain = scratch.data();
        acc_t* qT = chain + in.cl.size;
        acc_t* yT = qT + in.rp * in.np;
        int64_t digits[kMaxCores];
        for (int64_t b = b_begin; b < b_end; ++b) {
          const acc_t scale = in.coef.scale(b);
          std::fill(yT, yT + in.N, acc_t(0));
          for (int64_t j = in.offsets[b]; j < static_cast<int64_t>(in.offsets[b + 1]); ++j) {
            row_digits(in.L, static_cast<int64_t>(in.indices[j]), digits);
            const acc_t* q = prefix_chain(in.L, in.cl, in.cores, digits, chain);
            transpose(in.np, in.rp, q, qT);
            // yT (n_l x N') += c_j * L^T (n_l x R') @ Q^T (R' x N')
            gemm_tn</*kAccumulate=*/true>(
                in.nl, in.np, in.rp, scale * in.coef.weight(j),
                in.core_last + digits[in.L.d - 1] * in.last_numel, qT, yT);
          }
          store_row(in.np, in.nl, yT, out + b * in.N);
        }
      });
}

// Distinct groups of a batch (ascending: slot u holds group slot_group[u]) and the slot of a group.
struct SlotMap {
  std::vector<int64_t> slot_group;
  std::vector<int64_t> dense_slot; // slot of every group id when the group range is small, else empty

  int64_t num_slots() const {
    return static_cast<int64_t>(slot_group.size());
  }
  int64_t slot(int64_t group) const {
    if (!dense_slot.empty()) {
      return dense_slot[group];
    }
    return std::lower_bound(slot_group.begin(), slot_group.end(), group) - slot_group.begin();
  }
};

template <typename index_t>
SlotMap build_slot_map(
    const index_t* indices,
    int64_t nnz,
    const FastDivmod& divmod,
    int64_t num_groups) {
  SlotMap map;
  int64_t last = 0;
  if (num_groups <= 8 * nnz + 4096) {
    map.dense_slot.assign(static_cast<size_t>(num_groups), -1);
    for (int64_t j = 0; j < nnz; ++j) {
      map.dense_slot[divmod.divmod(static_cast<int64_t>(indices[j]), &last)] = 0;
    }
    for (int64_t g = 0; g < num_groups; ++g) {
      if (map.dense_slot[g] == 0) {
        map.dense_slot[g] = static_cast<int64_t>(map.slot_group.size());
        map.slot_group.push_back(g);
      }
    }
  } else {
    map.slot_group.resize(static_cast<size_t>(nnz));
    for (int64_t j = 0; j < nnz; ++j) {
      map.slot_group[j] = divmod.divmod(static_cast<int64_t>(indices[j]), &last);
    }
    std::sort(map.slot_group.begin(), map.slot_group.end());
    map.slot_group.erase(
        std::unique(map.slot_group.begin(), map.slot_group.end()), map.slot_group.end());
  }
  return map;
}

// grt forward. The (bag, group) segments are formed inside the bag loop (each bag's lookups sorted
// by (group, position), the plan's order), so the whole forward is a sequential pass over the
// indices (distinct groups) and two parallel regions: Q^T once per slot, then the bags.
template <typename scalar_t, typename index_t>
void forward_grt(const Batch<scalar_t, index_t>& in, scalar_t* out) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t q_numel = in.rp * in.np;
  const FastDivmod divmod(in.L.last_rows());

  const SlotMap slots = build_slot_map(in.indices, in.nnz, divmod, in.L.num_groups());
  const int64_t U = slots.num_slots();

  // Q^T of every slot, in chunks of slots if they would not fit the scratch budget.
  const int64_t slots_per_chunk = std::max<int64_t>(
      1, kScratchBudgetBytes / static_cast<int64_t>(q_numel * sizeof(acc_t)));
  const bool single_chunk = U <= slots_per_chunk;
  std::vector<acc_t> qT_buf(static_cast<size_t>(std::min(U, slots_per_chunk) * q_numel));
  // With several chunks, every chunk makes a pass over all bags (using only the segments whose slot
  // is in the chunk) and the bag accumulators persist across chunks.
  std::vector<acc_t> yT_all(single_chunk ? 0 : static_cast<size_t>(in.batch_size * in.N), acc_t(0));

  int64_t u_lo = 0;
  do {
    const int64_t u_hi = std::min(U, u_lo + slots_per_chunk);
    at::parallel_for(u_lo, u_hi, 8, [&](int64_t u_begin, int64_t u_end) {
      std::vector<acc_t> chain(in.cl.size);
      int64_t digits[kMaxCores];
      for (int64_t u = u_begin; u < u_end; ++u) {
        group_digits(in.L, slots.slot_group[u], digits);
        const acc_t* q = prefix_chain(in.L, in.cl, in.cores, digits, chain.data());
        transpose(in.np, in.rp, q, qT_buf.data() + (u - u_lo) * q_numel);
      }
    });
    // Per bag and segment (bag, group): intra-group reduce S, then y_b += Q_slot @ S.
    weighted_parallel_for(
        in.batch_size,
        [&](int64_t b) { return static_cast<int64_t>(in.offsets[b]) + 4 * b; },
        [&](int64_t b_begin, int64_t b_end) {
          std::vector<BagLookup> keys;
          std::vector<acc_t> scratch(in.last_numel + in.N);
          acc_t* S = scratch.data();
          acc_t* yT_local = S + in.last_numel;
          for (int64_t b = b_begin; b < b_end; ++b) {
            acc_t* yT = single_chunk ? yT_local : yT_all.data() + b * in.N;
            if (single_chunk) {
              std::fill(yT, yT + in.N, acc_t(0));
            }
            const acc_t scale = in.coef.scale(b);
            sort_bag_by_group(
                in.indices, static_cast<int64_t>(in.offsets[b]),
                static_cast<int64_t>(in.offsets[b + 1]),
                divmod, keys);
            const int64_t len = static_cast<int64_t>(keys.size());
            for (int64_t i = 0; i < len;) {
              const int64_t group = keys[i].group;
              int64_t end = i + 1;
              while (end < len && keys[end].group == group) {
                ++end;
              }
              const int64_t u = slots.slot(group);
              if (u >= u_lo && u < u_hi) {
                std::fill(S, S + in.last_numel, acc_t(0));
                for (int64_t t = i; t < end; ++t) {
                  axpy(
                      in.last_numel, scale * in.coef.weight(keys[t].lookup),
                      in.core_last + keys[t].last * in.last_numel, S);
                }
                // yT (n_l x N') += S^T (n_l x R') @ Q^T (R' x N')
                gemm_tn</*kAccumulate=*/true>(
                    in.nl, in.np, in.rp, acc_t(1), S, qT_buf.data() + (u - u_lo) * q_numel, yT);
              }
              i = end;
            }
            if (single_chunk) {
              store_row(in.np, in.nl, yT, out + b * in.N);
            }
          }
        });
    u_lo = u_hi;
  } while (u_lo < U);

  if (!single_chunk) {
    at::parallel_for(0, in.batch_size, 64, [&](int64_t b_begin, int64_t b_end) {
      for (int64_t b = b_begin; b < b_end; ++b) {
        store_row(in.np, in.nl, yT_all.data() + b * in.N, out + b * in.N);
      }
    });
  }
}

// ----------------------------------------------------------------------------------------------
// Backward.
// ----------------------------------------------------------------------------------------------

// tt: per lookup, the chain with its intermediates, then
//   G = Q^T g_b (R' x n_l); d core_last[last] += c_j G; dQ = c_j g_b L^T; back through the chain.
// psw_grad[j] = scale_b * <L, G> = scale_b * <W[idx_j], g_b>.
// Core gradients accumulate into per-thread dense buffers (grads for the first), reduced in order.
template <typename scalar_t, typename index_t>
void backward_tt(
    const Batch<scalar_t, index_t>& in,
    const scalar_t* grad_out,
    acc_type_t<scalar_t>* const* grads,
    scalar_t* psw_grad) {
  using acc_t = acc_type_t<scalar_t>;

  int64_t core_offset[kMaxCores + 1] = {};
  for (int64_t k = 0; k < in.L.d; ++k) {
    core_offset[k + 1] = core_offset[k] + in.L.core_numel(k);
  }
  const int64_t total = core_offset[in.L.d];
  const int64_t max_buffers =
      std::max<int64_t>(1, kScratchBudgetBytes / static_cast<int64_t>(total * sizeof(acc_t)));
  const int64_t num_parts = std::max<int64_t>(
      1,
      std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), max_buffers, in.batch_size}));
  std::vector<acc_t> extra(static_cast<size_t>((num_parts - 1) * total), acc_t(0));

  at::parallel_for(0, num_parts, 1, [&](int64_t p_begin, int64_t p_end) {
    std::vector<acc_t> scratch(in.cl.size + 2 * in.last_numel + 2 * in.cl.max_step);
    acc_t* chain = scratch.data();
    acc_t* gT = chain + in.cl.size; // (n_l x R')
    acc_t* lT = gT + in.last_numel; // (n_l x R')
    acc_t* dcur = lT + in.last_numel;
    acc_t* dnext = dcur + in.cl.max_step;
    int64_t digits[kMaxCores];
    acc_t* dst[kMaxCores];
    for (int64_t p = p_begin; p < p_end; ++p) {
      acc_t* base[kMaxCores];
      for (int64_t k = 0; k < in.L.d; ++k) {
        base[k] = p == 0 ? grads[k] : extra.data() + (p - 1) * total + core_offset[k];
      }
      const int64_t b_begin = in.batch_size * p / num_parts;
      const int64_t b_end = in.batch_size * (p + 1) / num_parts;
      for (int64_t b = b_begin; b < b_end; ++b) {
        const acc_t scale = in.coef.scale(b);
        const scalar_t* g = grad_out + b * in.N; // (N' x n_l)
        for (int64_t j = in.offsets[b]; j < static_cast<int64_t>(in.offsets[b + 1]); ++j) {
          const acc_t c = scale * in.coef.weight(j);
          row_digits(in.L, static_cast<int64_t>(in.indices[j]), digits);
          const int64_t last = digits[in.L.d - 1];
          const scalar_t* lslice = in.core_last + last * in.last_numel; // (R' x n_l)
          const acc_t* q = prefix_chain(in.L, in.cl, in.cores, digits, chain);
          // G^T (n_l x R') = g^T (n_l x N') @ Q (N' x R')
          gemm_tn</*kAccumulate=*/false>(in.nl, in.rp, in.np, acc_t(1), g, q, gT);
          if (psw_grad != nullptr) {
            acc_t sum = 0;
            for (int64_t r = 0; r < in.rp; ++r) {
              for (int64_t cc = 0; cc < in.nl; ++cc) {
                sum += static_cast<acc_t>(lslice[r * in.nl + cc]) * gT[cc * in.rp + r];
              }
            }
            psw_grad[j] = static_cast<scalar_t>(scale * sum);
          }
          acc_t* dlast = base[in.L.d - 1] + last * in.last_numel;
          for (int64_t r = 0; r < in.rp; ++r) {
            for (int64_t cc = 0; cc < in.nl; ++cc) {
              dlast[r * in.nl + cc] += c * gT[cc * in.rp + r];
            }
          }
          // dQ (N' x R') = c_j * g (N' x n_l) @ L^T (n_l x R')
          transpose(in.rp, in.nl, lslice, lT);
          gemm_nn</*kAccumulate=*/false>(in.np, in.rp, in.nl, c, g, lT, dcur);
          for (int64_t k = 0; k + 1 < in.L.d; ++k) {
            dst[k] = base[k] + digits[k] * in.L.slice_numel(k);
          }
          prefix_chain_backward(in.L, in.cl, in.cores, digits, chain, dcur, dnext, dst);
        }
      }
    }
  });

  if (num_parts > 1) {
    acc_t* g0 = nullptr;
    for (int64_t k = 0; k < in.L.d; ++k) {
      g0 = grads[k];
      at::parallel_for(0, in.L.core_numel(k), 4096, [&](int64_t e_begin, int64_t e_end) {
        for (int64_t p = 1; p < num_parts; ++p) {
          const acc_t* src = extra.data() + (p - 1) * total + core_offset[k];
          for (int64_t e = e_begin; e < e_end; ++e) {
            g0[e] += src[e];
          }
        }
      });
    }
  }
}

// grt (no per-lookup chains), processed in chunks of slots [u_lo, u_hi) bounded by the scratch
// budget. Per slot u (parallel, balanced by segment count): Q_u and its chain; for each segment s of
// the slot (bag b): G_s = Q_u^T g_b (R' x n_l, kept per segment), psw_grad[j] = scale_b <L_j, G_s>,
// dQ_u += g_b S_s^T; then back through the chain into a per-slot slice-gradient buffer.
// Then, deterministically: d core_last[l] += c_j G_s(j) over the chunk's lookups bucketed by last
// digit (ascending order), and d core_k[i] += slot grads over the chunk's slots bucketed by digit k.
template <typename scalar_t, typename index_t>
void backward_grt(
    const Batch<scalar_t, index_t>& in,
    const scalar_t* grad_out,
    acc_type_t<scalar_t>* const* grads,
    scalar_t* psw_grad) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t ml = in.L.last_rows();

  const GroupPlan plan =
      build_group_plan_cpu<index_t>(
          in.indices, in.offsets, in.batch_size, in.nnz, ml, in.L.num_groups());
  const int64_t S = plan.num_segments;
  const int64_t U = plan.num_slots;
  if (S == 0) {
    return; // every bag is empty: all gradients are zero
  }
  const int64_t* sorted_lookups = plan.sorted_lookups.data_ptr<int64_t>();
  const int64_t* sorted_last = plan.sorted_last.data_ptr<int64_t>();
  const int64_t* seg_start = plan.segment_start.data_ptr<int64_t>();
  const int64_t* seg_bag = plan.segment_bag.data_ptr<int64_t>();
  const int64_t* seg_slot = plan.segment_slot.data_ptr<int64_t>();
  const int64_t* slot_group = plan.slot_group.data_ptr<int64_t>();

  // Segments bucketed by slot (stable: ascending segment id within a slot).
  std::vector<int64_t> slot_seg_start(U + 1, 0);
  std::vector<int64_t> slot_segs(S);
  for (int64_t s = 0; s < S; ++s) {
    ++slot_seg_start[seg_slot[s] + 1];
  }
  for (int64_t u = 0; u < U; ++u) {
    slot_seg_start[u + 1] += slot_seg_start[u];
  }
  {
    std::vector<int64_t> fill(slot_seg_start.begin(), slot_seg_start.end() - 1);
    for (int64_t s = 0; s < S; ++s) {
      slot_segs[fill[seg_slot[s]]++] = s;
    }
  }

  // Per-slot slice gradients of the prefix cores 0..d-2.
  int64_t grad_offset[kMaxCores] = {};
  int64_t slot_grad_numel = 0;
  for (int64_t k = 0; k + 1 < in.L.d; ++k) {
    grad_offset[k] = slot_grad_numel;
    slot_grad_numel += in.L.slice_numel(k);
  }
  // Stride of digit k in a group id: prod(m_{k+1} .. m_{d-2}).
  int64_t digit_stride[kMaxCores] = {};
  {
    int64_t stride = 1;
    for (int64_t k = in.L.d - 2; k >= 0; --k) {
      digit_stride[k] = stride;
      stride *= in.L.m[k];
    }
  }

  const int64_t budget = kScratchBudgetBytes / static_cast<int64_t>(sizeof(acc_t));
  std::vector<acc_t> seg_g; // G_s (R' x n_l) per segment position of the chunk
  std::vector<acc_t> slot_grads; // slice gradients per slot of the chunk
  std::vector<int64_t> bucket_start;
  std::vector<int64_t> bucket_items;

  int64_t u_lo = 0;
  while (u_lo < U) {
    // Chunk [u_lo, u_hi): at least one slot, then as many as fit the budget.
    int64_t u_hi = u_lo + 1;
    while (u_hi < U &&
           (slot_seg_start[u_hi + 1] - slot_seg_start[u_lo]) * in.last_numel +
                   (u_hi + 1 - u_lo) * slot_grad_numel <=
               budget) {
      ++u_hi;
    }
    const int64_t pos_lo = slot_seg_start[u_lo];
    const int64_t pos_hi = slot_seg_start[u_hi];
    seg_g.resize(static_cast<size_t>((pos_hi - pos_lo) * in.last_numel));
    slot_grads.assign(static_cast<size_t>((u_hi - u_lo) * slot_grad_numel), acc_t(0));

    // Cost of a slot ~ its segments plus its chain (about 8 segments' worth).
    weighted_parallel_for(
        u_hi - u_lo,
        [&](int64_t i) { return slot_seg_start[u_lo + i] + 8 * (u_lo + i); },
        [&](int64_t i_begin, int64_t i_end) {
          std::vector<acc_t> scratch(in.cl.size + 3 * in.last_numel + 2 * in.cl.max_step);
          acc_t* chain = scratch.data();
          acc_t* gT = chain + in.cl.size; // (n_l x R')
          acc_t* sacc = gT + in.last_numel; // (R' x n_l)
          acc_t* sT = sacc + in.last_numel; // (n_l x R')
          acc_t* dcur = sT + in.last_numel;
          acc_t* dnext = dcur + in.cl.max_step;
          int64_t digits[kMaxCores];
          acc_t* dst[kMaxCores];
          for (int64_t u = u_lo + i_begin; u < u_lo + i_end; ++u) {
            group_digits(in.L, slot_group[u], digits);
            const acc_t* q = prefix_chain(in.L, in.cl, in.cores, digits, chain); // (N' x R')
            std::fill(dcur, dcur + in.np * in.rp, acc_t(0));
            for (int64_t pos = slot_seg_start[u]; pos < slot_seg_start[u + 1]; ++pos) {
              const int64_t s = slot_segs[pos];
              const int64_t b = seg_bag[s];
              const acc_t scale = in.coef.scale(b);
              const scalar_t* g = grad_out + b * in.N; // (N' x n_l)
              // G^T (n_l x R') = g^T @ Q; keep G (R' x n_l) for the last-core pass.
              gemm_tn</*kAccumulate=*/false>(in.nl, in.rp, in.np, acc_t(1), g, q, gT);
              acc_t* gs = seg_g.data() + (pos - pos_lo) * in.last_numel;
              transpose(in.nl, in.rp, gT, gs);
              segment_reduce(
                  seg_start[s], seg_start[s + 1], sorted_lookups, sorted_last, in.core_last,
                  in.last_numel,
                  in.coef, scale, sacc);
              if (psw_grad != nullptr) {
                for (int64_t k = seg_start[s]; k < seg_start[s + 1]; ++k) {
                  psw_grad[sorted_lookups[k]] = static_cast<scalar_t>(
                      scale *
                      dot<acc_t>(
                          in.last_numel, in.core_last + sorted_last[k] * in.last_numel, gs));
                }
              }
              // dQ (N' x R') += g (N' x n_l) @ S^T (n_l x R')
              transpose(in.rp, in.nl, sacc, sT);
              gemm_nn</*kAccumulate=*/true>(in.np, in.rp, in.nl, acc_t(1), g, sT, dcur);
            }
            acc_t* sg = slot_grads.data() + (u - u_lo) * slot_grad_numel;
            for (int64_t k = 0; k + 1 < in.L.d; ++k) {
              dst[k] = sg + grad_offset[k];
            }
            prefix_chain_backward(in.L, in.cl, in.cores, digits, chain, dcur, dnext, dst);
          }
        });

    // Dense gradients, deterministically, in one parallel region over the output slices:
    //   d core_last[l] += c_j G_s(j) over the chunk's lookups with last digit l (fixed order);
    //   d core_k[i] += slot grads over the chunk's slots with digit k equal to i (ascending slot).
    // Buckets: core c has m_c buckets; task t = task_base[c] + i is (core c, slice i).
    int64_t task_base[kMaxCores + 1] = {};
    for (int64_t c = 0; c < in.L.d; ++c) {
      task_base[c + 1] = task_base[c] + in.L.m[c];
    }
    const int64_t num_tasks = task_base[in.L.d];
    bucket_start.assign(static_cast<size_t>(num_tasks + in.L.d), 0); // core c: [task_base[c] + c, +m_c]
    auto bucket_of = [&](int64_t c) { return bucket_start.data() + task_base[c] + c; };
    // The chunk's lookups k (plan order) with their segment position pos: f(pos, k).
    auto for_each_chunk_lookup = [&](const auto& f) {
      for (int64_t pos = pos_lo; pos < pos_hi; ++pos) {
        const int64_t s = slot_segs[pos];
        for (int64_t k = seg_start[s]; k < seg_start[s + 1]; ++k) {
          f(pos, k);
        }
      }
    };
    // Digit c of slot u's group.
    auto slot_digit = [&](int64_t u, int64_t c) {
      return (slot_group[u] / digit_stride[c]) % in.L.m[c];
    };
    int64_t item_base[kMaxCores + 1] = {};
    {
      int64_t* last_count = bucket_of(in.L.d - 1);
      for_each_chunk_lookup([&](int64_t, int64_t k) { ++last_count[sorted_last[k] + 1]; });
      for (int64_t c = 0; c + 1 < in.L.d; ++c) {
        int64_t* count = bucket_of(c);
        for (int64_t u = u_lo; u < u_hi; ++u) {
          ++count[slot_digit(u, c) + 1];
        }
      }
      for (int64_t c = 0; c < in.L.d; ++c) {
        int64_t* start = bucket_of(c);
        for (int64_t i = 0; i < in.L.m[c]; ++i) {
          start[i + 1] += start[i];
        }
        // Last core: (lookup, segment position) pairs; prefix cores: slot ids.
        item_base[c + 1] = item_base[c] + start[in.L.m[c]] * (c + 1 == in.L.d ? 2 : 1);
      }
    }
    bucket_items.resize(static_cast<size_t>(item_base[in.L.d]));
    {
      std::vector<int64_t> fill;
      const int64_t* start = bucket_of(in.L.d - 1);
      fill.assign(start, start + in.L.m[in.L.d - 1]);
      int64_t* items = bucket_items.data() + item_base[in.L.d - 1];
      for_each_chunk_lookup([&](int64_t pos, int64_t k) {
        const int64_t at = fill[sorted_last[k]]++;
        items[2 * at] = sorted_lookups[k];
        items[2 * at + 1] = pos;
      });
      for (int64_t c = 0; c + 1 < in.L.d; ++c) {
        const int64_t* cstart = bucket_of(c);
        fill.assign(cstart, cstart + in.L.m[c]);
        int64_t* citems = bucket_items.data() + item_base[c];
        for (int64_t u = u_lo; u < u_hi; ++u) {
          citems[fill[slot_digit(u, c)]++] = u;
        }
      }
    }
    auto core_of_task = [&](int64_t t) {
      int64_t c = 0;
      while (t >= task_base[c + 1]) {
        ++c;
      }
      return c;
    };
    // Cost of task t ~ items in its bucket times the slice size.
    std::vector<int64_t> task_cost(static_cast<size_t>(num_tasks + 1), 0);
    for (int64_t t = 0; t < num_tasks; ++t) {
      const int64_t c = core_of_task(t);
      const int64_t* start = bucket_of(c);
      const int64_t i = t - task_base[c];
      task_cost[t + 1] = task_cost[t] + (start[i + 1] - start[i]) * in.L.slice_numel(c) + 1;
    }
    weighted_parallel_for(
        num_tasks,
        [&](int64_t t) { return task_cost[t]; },
        [&](int64_t t_begin, int64_t t_end) {
          for (int64_t t = t_begin; t < t_end; ++t) {
            const int64_t c = core_of_task(t);
            const int64_t i = t - task_base[c];
            const int64_t slice = in.L.slice_numel(c);
            const int64_t* start = bucket_of(c);
            acc_t* dst = grads[c] + i * slice;
            if (c + 1 == in.L.d) {
              const int64_t* items = bucket_items.data() + item_base[c];
              for (int64_t e = start[i]; e < start[i + 1]; ++e) {
                const int64_t j = items[2 * e];
                const int64_t pos = items[2 * e + 1];
                const acc_t w = in.coef.scale(seg_bag[slot_segs[pos]]) * in.coef.weight(j);
                axpy(slice, w, seg_g.data() + (pos - pos_lo) * slice, dst);
              }
            } else {
              const int64_t* items = bucket_items.data() + item_base[c];
              for (int64_t e = start[i]; e < start[i + 1]; ++e) {
                const int64_t u = items[e];
                axpy(
                    slice, acc_t(1),
                    slot_grads.data() + (u - u_lo) * slot_grad_numel + grad_offset[c], dst);
              }
            }
          }
        });
    u_lo = u_hi;
  }
}

// ----------------------------------------------------------------------------------------------
// Op entry points.
// ----------------------------------------------------------------------------------------------

TTInputs check_inputs(
    const char* op,
    at::TensorList cores,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    int64_t pooling_mode,
    int64_t variant) {
  TTInputs in = check_tt_inputs(
      op, cores, indices, offsets, per_sample_weights, pooling_mode, variant, c10::DeviceType::CPU,
      /*allow_reduced_precision=*/false);
  make_tt_inputs_contiguous(in, cores, indices, offsets, per_sample_weights);
  // Value checks (CPU reads).
  TORCHREC_TT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), "tt_embedding_bag_check_cpu", [&] {
    check_offsets_values_cpu(op, in.offsets.data_ptr<index_t>(), in.batch_size, in.nnz);
    check_indices_range_cpu(op, in.indices.data_ptr<index_t>(), in.nnz, in.layout.num_rows());
  });
  return in;
}

template <typename scalar_t>
CorePtrs<scalar_t> core_ptrs(const std::vector<at::Tensor>& cores) {
  CorePtrs<scalar_t> p;
  for (const auto k : c10::irange(cores.size())) {
    p.ptr[k] = cores[k].data_ptr<scalar_t>();
  }
  return p;
}

at::Tensor tt_embedding_bag_cpu(
    at::TensorList cores,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    int64_t pooling_mode,
    int64_t variant) {
  const TTInputs in = check_inputs(
      "tt_embedding_bag", cores, indices, offsets, per_sample_weights, pooling_mode, variant);
  const TTLayout& L = in.layout;
  at::Tensor out = at::empty({in.batch_size, L.embedding_dim()}, in.cores[0].options());
  const bool mean = pooling_mode == kPoolingMean;
  TORCHREC_TT_DISPATCH_CPU_FLOAT_TYPES(in.cores[0].scalar_type(), "tt_embedding_bag_cpu", [&] {
    const auto cp = core_ptrs<scalar_t>(in.cores);
    const scalar_t* psw = in.psw.has_value() ? in.psw->data_ptr<scalar_t>() : nullptr;
    scalar_t* y = out.data_ptr<scalar_t>();
    TORCHREC_TT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), "tt_embedding_bag_cpu_idx", [&] {
      const index_t* idx = in.indices.data_ptr<index_t>();
      const index_t* off = in.offsets.data_ptr<index_t>();
      const Batch<scalar_t, index_t> batch(L, cp, idx, off, psw, in.batch_size, in.nnz, mean);
      if (variant == kVariantGRT) {
        forward_grt(batch, y);
      } else {
        forward_tt(batch, y);
      }
    });
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> tt_embedding_bag_backward_cpu(
    const at::Tensor& grad_output,
    at::TensorList cores,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    int64_t pooling_mode,
    int64_t variant,
    bool per_sample_weights_requires_grad) {
  constexpr const char* op = "tt_embedding_bag_backward";
  const TTInputs in =
      check_inputs(op, cores, indices, offsets, per_sample_weights, pooling_mode, variant);
  const TTLayout& L = in.layout;
  check_backward_inputs(op, grad_output, in, per_sample_weights_requires_grad);
  const at::Tensor grad_out = grad_output.contiguous();
  const bool mean = pooling_mode == kPoolingMean;

  std::vector<at::Tensor> core_grads;
  core_grads.reserve(in.cores.size());
  for (const auto& c : in.cores) {
    core_grads.push_back(at::zeros(c.sizes(), c.options()));
  }
  at::Tensor psw_grad = at::empty(
      {per_sample_weights_requires_grad ? in.nnz : 0}, in.cores[0].options());

  TORCHREC_TT_DISPATCH_CPU_FLOAT_TYPES(in.cores[0].scalar_type(), "tt_embedding_bag_backward_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    static_assert(
        std::is_same_v<acc_t, scalar_t>,
        "CPU core gradients accumulate in place: the accumulation type must be the core dtype");
    const auto cp = core_ptrs<scalar_t>(in.cores);
    const scalar_t* psw = in.psw.has_value() ? in.psw->data_ptr<scalar_t>() : nullptr;
    acc_t* grads[kMaxCores] = {};
    for (const auto k : c10::irange(core_grads.size())) {
      grads[k] = core_grads[k].data_ptr<scalar_t>();
    }
    scalar_t* dpsw = per_sample_weights_requires_grad ? psw_grad.data_ptr<scalar_t>() : nullptr;
    const scalar_t* g = grad_out.data_ptr<scalar_t>();
    TORCHREC_TT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), "tt_embedding_bag_backward_cpu_idx", [&] {
      const index_t* idx = in.indices.data_ptr<index_t>();
      const index_t* off = in.offsets.data_ptr<index_t>();
      const Batch<scalar_t, index_t> batch(L, cp, idx, off, psw, in.batch_size, in.nnz, mean);
      if (variant == kVariantGRT) {
        backward_grt(batch, g, grads, dpsw);
      } else {
        backward_tt(batch, g, grads, dpsw);
      }
    });
  });
  return {core_grads, psw_grad};
}

} // namespace
} // namespace torchrec_tt::cpu

TORCH_LIBRARY_IMPL(torchrec_tt, CPU, m) {
  m.impl("tt_embedding_bag", &torchrec_tt::cpu::tt_embedding_bag_cpu);
  m.impl("tt_embedding_bag_backward", &torchrec_tt::cpu::tt_embedding_bag_backward_cpu);
}
