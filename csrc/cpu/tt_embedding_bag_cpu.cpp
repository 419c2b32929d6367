// CPU kernels for torchrec_tt::tt_embedding_bag and torchrec_tt::tt_embedding_bag_backward.
//
// Notation (docs/design.md section 1): d cores, core k of shape (m_k, R[k], n_k, R[k+1]); the
// prefix of a group is Q (N' x R'), the last core's slice L = core_{d-1}[last] is (R' x n_l); a row
// is W = Q @ L (N' x n_l, i.e. N = N' * n_l values). c_j is the coefficient of lookup j (per-sample
// weight times 1/L_b for mean pooling).
//
//   variant tt : per lookup, the full chain, then y_b += c_j * W[idx_j].
//   variant grt: the backward is driven by the batch's packed plan (plan_layout.h; built once per
//                batch by the front-end when autograd records, saved by the autograd function;
//                docs/design.md section 3), slot-major: a slot's prefix Q (one per distinct group)
//                is computed once and used while it sits in L1 by every segment (bag) of that group:
//                per segment G_s = Q^T g_b and the last-core and per-sample-weight gradients, then
//                dQ = sum_s g_b S_s^T as one register-tiled product over the slot's segments, then
//                back through the chain. The forward takes one of three passes (section 3.4):
//                every distinct row of the batch once, then the bags over those rows (small tables,
//                with or without a plan); without a plan, slot-major over the lookups radix-sorted by
//                group; given a plan, slot-major over it. The slot-major forward computes per slot
//                its distinct rows (row path) or per segment S_s = sum_j c_j L_j and y_b += Q S_s
//                (segment path) into per-thread accumulators.
//
// Every product goes through the register-blocked micro-kernels of micro_gemm.h (docs/design.md
// section 3.2). Per-thread output and core-gradient buffers are summed in a fixed order:
// deterministic for a fixed thread count. CPU dtypes are float32/float64, whose accumulation type is the dtype itself.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/record_function.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_scratch.h"
#include "cpu_threads.h"
#include "micro_gemm.h"
#include "torchrec_tt/checks.h"
#include "torchrec_tt/cpu_group_plan.h"
#include "torchrec_tt/dispatch.h"
#include "torchrec_tt/plan_layout.h"
#include "torchrec_tt/tt_layout.h"

namespace torchrec_tt::cpu {
namespace {

// Upper bound on the large scratch buffers: the grt backward's per-slot chains and dOut blocks
// (processed in chunks of slots beyond it), and the per-thread output and gradient accumulators
// (fewer threads beyond it). 128 MiB; the environment variable TORCHREC_TT_CPU_SCRATCH_BUDGET_BYTES,
// read once per process, overrides it (tests set a tiny budget to exercise the chunked paths).
int64_t scratch_budget_bytes() {
  static const int64_t budget = [] {
    const char* env = std::getenv("TORCHREC_TT_CPU_SCRATCH_BUDGET_BYTES");
    const int64_t parsed = env == nullptr ? 0 : std::atoll(env);
    return parsed > 0 ? parsed : int64_t{128} << 20;
  }();
  return budget;
}

// ----------------------------------------------------------------------------------------------
// Work partitioning.
// ----------------------------------------------------------------------------------------------

// Below this total weight (about one lookup per unit) waking the thread pool costs more than
// the work, especially when several ranks share a few cores.
constexpr int64_t kMinParallelWeight = 512;

// Runs f(part, begin, end) on at most max_parts contiguous sub-ranges of [0, n) of about equal
// weight, one per thread. prefix(i) is the non-decreasing cumulative weight of items [0, i).
template <typename Prefix, typename F>
void weighted_parallel_for(int64_t n, int64_t max_parts, const Prefix& prefix, const F& f) {
  if (n <= 0) {
    return;
  }
  const int64_t base = prefix(0);
  const int64_t total = prefix(n) - base;
  const int64_t parts = total < kMinParallelWeight ? 1 : std::min<int64_t>(max_parts, n);
  if (parts <= 1) {
    f(int64_t{0}, int64_t{0}, n);
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
        f(p, bounds[p], bounds[p + 1]);
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

// Computes A_0..A_{d-2} for the prefix digits (i_0..i_{d-2}) into buf; returns Q (N' x R').
template <typename T>
inline const T* prefix_chain(
    const TTLayout& L,
    const ChainLayout& cl,
    const CorePtrs<T>& cores,
    const int64_t* digits,
    T* buf) {
  const int64_t s0 = L.slice_numel(0);
  std::copy(cores.p[0] + digits[0] * s0, cores.p[0] + (digits[0] + 1) * s0, buf + cl.offset[0]);
  for (int64_t k = 1; k + 1 < L.d; ++k) {
    const int64_t cols = L.n[k] * L.R[k + 1];
    // A_k (rows x cols) = A_{k-1} (rows x R[k]) @ slice_k (R[k] x cols)
    gemm</*kAccumulate=*/false>(
        L.chain_rows(k - 1), cols, L.R[k], T(1), buf + cl.offset[k - 1], /*a_row=*/L.R[k],
        /*a_col=*/1, cores.p[k] + digits[k] * L.slice_numel(k), /*ldb=*/cols, buf + cl.offset[k],
        /*ldc=*/cols);
  }
  return buf + cl.offset[L.d - 2];
}

// The middle cores k = 1..d-2 with every slice transposed, (m_k, n_k R[k+1], R[k]): the backward's
// dA_{k-1} = dOut @ slice_k^T then reads contiguous rows. Built once per backward call.
template <typename T>
struct TransposedCores {
  Scratch<T> data;
  CorePtrs<T> ptrs;

  TransposedCores(const TTLayout& L, const CorePtrs<T>& cores) {
    int64_t offset[kMaxCores] = {};
    int64_t total = 0;
    for (int64_t k = 1; k + 1 < L.d; ++k) {
      offset[k] = total;
      total += L.core_numel(k);
    }
    data.resize(total);
    for (int64_t k = 1; k + 1 < L.d; ++k) {
      const int64_t rows = L.R[k];
      const int64_t cols = L.n[k] * L.R[k + 1];
      const int64_t slice = L.slice_numel(k);
      T* dst = data.data() + offset[k];
      at::parallel_for(0, L.m[k], std::max<int64_t>(1, 16384 / slice), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          transpose(rows, cols, cores.p[k] + i * slice, dst + i * slice);
        }
      });
      ptrs.p[k] = dst;
    }
  }
};

// Back-propagates dQ (in dcur, N' x R'; clobbered) through the prefix chain held in buf and
// accumulates the slice gradients: dst[k] (R[k] x n_k x R[k+1]) += d core_k[i_k], k = 0..d-2.
// dcur and dnext hold cl.max_step elements each.
template <typename T>
inline void prefix_chain_backward(
    const TTLayout& L,
    const ChainLayout& cl,
    const CorePtrs<T>& cores_t,
    const int64_t* digits,
    const T* buf,
    T* dcur,
    T* dnext,
    T* const* dst) {
  for (int64_t k = L.d - 2; k >= 1; --k) {
    const int64_t rows = L.chain_rows(k - 1);
    const int64_t rk = L.R[k];
    const int64_t cols = L.n[k] * L.R[k + 1];
    const T* a_prev = buf + cl.offset[k - 1];
    // d slice_k (R[k] x cols) += A_{k-1}^T (R[k] x rows) @ dOut (rows x cols)
    gemm</*kAccumulate=*/true>(
        rk, cols, rows, T(1), a_prev, /*a_row=*/1, /*a_col=*/rk, dcur, /*ldb=*/cols, dst[k],
        /*ldc=*/cols);
    // dA_{k-1} (rows x R[k]) = dOut (rows x cols) @ slice_k^T (cols x R[k])
    gemm</*kAccumulate=*/false>(
        rows, rk, cols, T(1), dcur, /*a_row=*/cols, /*a_col=*/1,
        cores_t.p[k] + digits[k] * L.slice_numel(k), /*ldb=*/rk, dnext, /*ldc=*/rk);
    std::swap(dcur, dnext);
  }
  axpy(L.slice_numel(0), T(1), dcur, dst[0]);
}

template <typename scalar_t, typename index_t>
struct BagCoefficients {
  const index_t* offsets;
  const scalar_t* psw; // nullable
  bool mean;

  // 1 / L_b for mean pooling of a non-empty bag, 1 otherwise.
  scalar_t scale(int64_t b) const {
    const int64_t len = static_cast<int64_t>(offsets[b + 1]) - static_cast<int64_t>(offsets[b]);
    return (mean && len > 0) ? scalar_t(1) / static_cast<scalar_t>(len) : scalar_t(1);
  }
  scalar_t weight(int64_t j) const {
    return psw == nullptr ? scalar_t(1) : psw[j];
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
      bool mean,
      const scalar_t* cache_ = nullptr,
      const int32_t* cache_slot_ = nullptr)
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
        core_last(core_ptrs.p[layout.d - 1]),
        coef{offsets_, psw_, mean},
        cache(cache_),
        cache_slot(cache_slot_) {}

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
  BagCoefficients<scalar_t, index_t> coef;
  // Hot-row cache (docs/design.md section 10; nullable): its rows (K x N), and for the tt variant
  // each lookup's slot (-1: not cached; grt reads hits from the plan's cache segments).
  const scalar_t* cache;
  const int32_t* cache_slot;
};

// The plan's arrays as const pointers, with its counts.
struct PlanRef {
  PlanView<const int64_t> v;
  int64_t num_segments;
  int64_t num_slots;

  PlanRef(const at::Tensor& plan, int64_t nnz, int64_t batch_size)
      : v(PlanView<const int64_t>::make(plan.data_ptr<int64_t>(), nnz, batch_size)),
        num_segments(v.header[static_cast<int64_t>(PlanHeader::kNumSegments)]),
        num_slots(v.header[static_cast<int64_t>(PlanHeader::kNumSlots)]) {}

  // The range [*begin, *end) of the plan's sorted lookups in bag b's cache segment (empty if none):
  // the last bag_hits[b] of the bag's lookups, which end at bag_end = offsets[b + 1].
  void cache_lookups(int64_t b, int64_t bag_end, int64_t* begin, int64_t* end) const {
    *begin = bag_end - v.bag_hits[b];
    *end = bag_end;
  }
};

// out_b (N) += c_j * cache[slot] for a cached lookup j of bag b (coefficient scale_b * w_j).
template <typename scalar_t, typename index_t>
inline void add_cached_row(const Batch<scalar_t, index_t>& in, int64_t j, int64_t slot, scalar_t scale, scalar_t* out_b) {
  axpy(in.N, scale * in.coef.weight(j), in.cache + slot * in.N, out_b);
}

// The per-sample-weight gradient of a cached lookup of bag b: scale_b <cache[slot], g_b>.
template <typename scalar_t, typename index_t>
inline scalar_t cached_row_psw_grad(const Batch<scalar_t, index_t>& in, int64_t slot, scalar_t scale, const scalar_t* g_b) {
  return scale * dot(in.N, in.cache + slot * in.N, g_b);
}

// Backward of add_cached_row: dcache[slot] += c_j * g_b and psw_grad[j] (cached_row_psw_grad).
template <typename scalar_t, typename index_t>
inline void cached_row_backward(
    const Batch<scalar_t, index_t>& in,
    int64_t j,
    int64_t slot,
    scalar_t scale,
    const scalar_t* g_b,
    scalar_t* dcache,
    scalar_t* psw_grad) {
  axpy(in.N, scale * in.coef.weight(j), g_b, dcache + slot * in.N);
  if (psw_grad != nullptr) {
    psw_grad[j] = cached_row_psw_grad(in, slot, scale, g_b);
  }
}

// Per-worker accumulators (`parts` buffers of rows x row entries, zeroed, in the calling thread's
// arena `which`), summed in part order.
template <typename T>
class PartBuffers {
 public:
  PartBuffers(Arena which, int64_t parts, int64_t rows, int64_t row)
      : parts_(parts), size_(rows * row), data_(arena<T>(which, parts * size_)) {
    at::parallel_for(0, parts_ * size_, int64_t{1} << 16, [&](int64_t begin, int64_t end) {
      std::fill(data_ + begin, data_ + end, T(0));
    });
  }

  int64_t parts() const {
    return parts_;
  }
  T* part(int64_t p) {
    return data_ + p * size_;
  }
  // part(0)[i] += part(1)[i] + ... in a fixed order, over the rows [begin, end) of width `row`.
  void sum_into_first(int64_t begin, int64_t end, int64_t row) {
    for (int64_t p = 1; p < parts_; ++p) {
      const T* src = part(p);
      axpy((end - begin) * row, T(1), src + begin * row, part(0) + begin * row);
    }
  }

 private:
  int64_t parts_;
  int64_t size_;
  T* data_;
};

// The last core with every slice transposed, (m_l, n_l, R'): S^T, dQ's operands and the grt row
// path read rows.
template <typename T>
Scratch<T> transposed_last_core(const TTLayout& L, const T* core_last) {
  const int64_t slice = L.slice_numel(L.d - 1);
  Scratch<T> lt(L.core_numel(L.d - 1));
  at::parallel_for(0, L.last_rows(), std::max<int64_t>(1, 16384 / slice), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      transpose(L.prefix_rank(), L.last_dim(), core_last + i * slice, lt.data() + i * slice);
    }
  });
  return lt;
}

// ----------------------------------------------------------------------------------------------
// Forward.
// ----------------------------------------------------------------------------------------------

template <typename scalar_t, typename index_t>
void forward_tt(const Batch<scalar_t, index_t>& in, scalar_t* out) {
  using T = scalar_t;
  weighted_parallel_for(
      in.batch_size,
      available_threads(),
      [&](int64_t b) { return static_cast<int64_t>(in.offsets[b]) + b; },
      [&](int64_t, int64_t b_begin, int64_t b_end) {
        Scratch<T> scratch(in.cl.size + in.rp * in.np + in.N);
        T* chain = scratch.data();
        T* qT = chain + in.cl.size;
        T* yT = qT + in.rp * in.np;
        int64_t digits[kMaxCores];
        for (int64_t b = b_begin; b < b_end; ++b) {
          const T scale = in.coef.scale(b);
          std::fill(yT, yT + in.N, T(0));
          for (int64_t j = in.offsets[b]; j < static_cast<int64_t>(in.offsets[b + 1]); ++j) {
            if (in.cache_slot != nullptr && in.cache_slot[j] >= 0) {
              continue; // added below, in the output's layout
            }
            row_digits(in.L, static_cast<int64_t>(in.indices[j]), digits);
            const T* q = prefix_chain(in.L, in.cl, in.cores, digits, chain);
            transpose(in.np, in.rp, q, qT);
            // yT (n_l x N') += c_j * L^T (n_l x R') @ Q^T (R' x N')
            gemm</*kAccumulate=*/true>(
                in.nl, in.np, in.rp, scale * in.coef.weight(j),
                in.core_last + digits[in.L.d - 1] * in.last_numel, /*a_row=*/1, /*a_col=*/in.nl, qT,
                /*ldb=*/in.np, yT, /*ldc=*/in.np);
          }
          transpose(in.nl, in.np, yT, out + b * in.N);
          for (int64_t j = in.offsets[b]; in.cache_slot != nullptr && j < static_cast<int64_t>(in.offsets[b + 1]); ++j) {
            if (in.cache_slot[j] >= 0) {
              add_cached_row(in, j, in.cache_slot[j], scale, out + b * in.N);
            }
          }
        }
      });
}

// Slot chunks: ranges [lo, hi) of slots whose per-slot buffers (per_slot bytes each) fit the scratch
// budget together; f(lo, hi) per chunk, in order.
template <typename F>
void for_each_slot_chunk(const PlanRef& plan, int64_t per_slot, const F& f) {
  int64_t lo = 0;
  while (lo < plan.num_slots) {
    int64_t hi = lo + 1; // at least one slot, then as many as fit
    while (hi < plan.num_slots && (hi + 1 - lo) * per_slot <= scratch_budget_bytes()) {
      ++hi;
    }
    f(lo, hi);
    lo = hi;
  }
}

// The order in which the slot-major passes visit the slots [lo, hi) (docs/design.md section 3.2):
// by the digit of the last middle core, ascending slot within a digit (a stable counting sort).
// Consecutive slots then share that core's slice (R x n R', 16 KB at rank 32) while it sits in L1;
// in slot order (the last digit varies fastest) every slot read another slice of a core of MBs,
// from L3 or DRAM. weight_prefix holds the cumulative weight(u) along that order
// (weighted_parallel_for's prefix).
struct SlotOrder {
  std::vector<int64_t> slot; // visit position -> slot
  std::vector<int64_t> weight_prefix; // (hi - lo + 1)
};

// group[u]: the group of slot u (the plan's slot_group, or the distinct groups of a plan-free
// forward).
template <typename W>
SlotOrder slot_visit_order(const TTLayout& L, const int64_t* group, int64_t lo, int64_t hi, const W& weight) {
  SlotOrder order;
  const int64_t n = hi - lo;
  order.slot.resize(static_cast<size_t>(n));
  order.weight_prefix.resize(static_cast<size_t>(n + 1));
  if (L.d < 3) { // no middle core
    for (int64_t i = 0; i < n; ++i) {
      order.slot[i] = lo + i;
    }
  } else {
    const int64_t m = L.m[L.d - 2]; // group = (..., i_{d-2}) in radix m: its last digit is group % m
    std::vector<int64_t> next(static_cast<size_t>(m + 1), 0);
    for (int64_t u = lo; u < hi; ++u) {
      ++next[group[u] % m + 1];
    }
    for (int64_t i = 0; i < m; ++i) {
      next[i + 1] += next[i];
    }
    for (int64_t u = lo; u < hi; ++u) {
      order.slot[next[group[u] % m]++] = u;
    }
  }
  order.weight_prefix[0] = 0;
  for (int64_t i = 0; i < n; ++i) {
    order.weight_prefix[i + 1] = order.weight_prefix[i] + weight(order.slot[i]);
  }
  return order;
}

// Fills buf[i * cl.size ...] with the prefix chain of the slot order.slot[i], for the slots [lo, hi)
// (stored in visit order: the passes that read them back stream through the buffer).
template <typename scalar_t, typename index_t>
void chains_of_slots(
    const Batch<scalar_t, index_t>& in,
    const PlanRef& plan,
    int64_t lo,
    int64_t hi,
    const SlotOrder& order,
    scalar_t* buf) {
  at::parallel_for(0, hi - lo, 16, [&](int64_t i_begin, int64_t i_end) {
    int64_t digits[kMaxCores];
    for (int64_t i = i_begin; i < i_end; ++i) {
      const int64_t u = order.slot[i];
      group_digits(in.L, plan.v.slot_group[u], digits);
      prefix_chain(in.L, in.cl, in.cores, digits, buf + i * in.cl.size);
    }
  });
}

// What the slot-major passes need of one segment, read from the plan's per-segment and per-bag
// arrays.
template <typename T>
struct SlotSegment {
  int64_t bag;
  int64_t lookup_begin; // the segment's range of the plan's sorted lookups
  int64_t lookup_end;
  T scale;
};

// A slot's segments: a view of `count` consecutive entries of slot_segment_fields' array.
template <typename T>
struct SlotSegments {
  const SlotSegment<T>* first;
  int64_t count;

  const SlotSegment<T>* begin() const {
    return first;
  }
  const SlotSegment<T>* end() const {
    return first + count;
  }
  const SlotSegment<T>& operator[](int64_t i) const {
    return first[i];
  }
};

// Every slotted segment's fields, in the order of the plan's slot lists (slot_segment), read in one
// parallel pass per call. A slot's segments lie all over the plan (one per bag that touches the
// group), so these reads miss the cache on large batches: in a loop that does nothing else many of
// them are in flight at once, where the slot loops, gathering a slot's few segments between its
// products, waited on them (a fifth of the 10M forward's time).
template <typename scalar_t, typename index_t>
const SlotSegment<scalar_t>* slot_segment_fields(const Batch<scalar_t, index_t>& in, const PlanRef& plan) {
  const int64_t n = plan.v.slot_segment_start[plan.num_slots];
  SlotSegment<scalar_t>* fields = arena<SlotSegment<scalar_t>>(Arena::kSegments, n);
  at::parallel_for(0, n, 4096, [&](int64_t i_begin, int64_t i_end) {
    for (int64_t i = i_begin; i < i_end; ++i) {
      const int64_t s = plan.v.slot_segment[i];
      const int64_t bag = plan.v.segment_bag[s];
      fields[i] = {bag, plan.v.segment_start[s], plan.v.segment_start[s + 1], in.coef.scale(bag)};
    }
  });
  return fields;
}

// Slot u's segments, with what the slot's lookup loop reads next prefetched: the segments' sorted
// lookups and each segment's bag row of `rows` (row stride N: the incoming gradient in the backward,
// the output accumulator in the forward).
template <typename scalar_t, typename index_t>
SlotSegments<scalar_t> slot_segments(
    const Batch<scalar_t, index_t>& in,
    const PlanRef& plan,
    const SlotSegment<scalar_t>* fields,
    const scalar_t* rows,
    int64_t u) {
  const int64_t first = plan.v.slot_segment_start[u];
  const SlotSegments<scalar_t> segs{fields + first, plan.v.slot_segment_start[u + 1] - first};
  for (const SlotSegment<scalar_t>& seg : segs) {
    __builtin_prefetch(plan.v.sorted_lookup + seg.lookup_begin);
    __builtin_prefetch(plan.v.sorted_last + seg.lookup_begin);
    prefetch_row(rows + seg.bag * in.N, in.N);
  }
  return segs;
}

// The distinct last digits (rows of the group) used by a slot's segments: rows[i] for i < count, and
// pos[l] = i (pos is -1 elsewhere on entry; reset_row_positions restores that).
struct SlotRows {
  std::vector<int32_t> pos; // (m_l,)
  std::vector<int64_t> rows;

  explicit SlotRows(int64_t last_rows) : pos(static_cast<size_t>(last_rows), -1) {}

  template <typename T>
  void collect(const PlanRef& plan, const SlotSegments<T>& segs) {
    rows.clear();
    for (const SlotSegment<T>& seg : segs) {
      for (int64_t k = seg.lookup_begin; k < seg.lookup_end; ++k) {
        add(plan.v.sorted_last[k]);
      }
    }
  }
  // Adds row l if not yet collected.
  void add(int64_t l) {
    if (pos[l] < 0) {
      pos[l] = static_cast<int32_t>(rows.size());
      rows.push_back(l);
    }
  }
  void reset_row_positions() {
    for (const int64_t l : rows) {
      pos[l] = -1;
    }
  }
  int64_t count() const {
    return static_cast<int64_t>(rows.size());
  }
};

// A slot takes the row path when it uses at most this many distinct rows per segment: D rows cost
// D products R' x N' x n_l in one register-tiled GEMM (M = D n_l), the segment path one product of
// the same size per segment, each a tiny GEMM (M = n_l) plus a fill and a sum of slices. (0.5 and 2
// timed the same as 1 on the benchmark tables.) torchrec_tt/op_counts.py models the same rule
// (ROW_PATH_ROWS_PER_SEGMENT); docs/design.md section 3.2.
constexpr int64_t kRowPathRowsPerSegment = 1;

// A slot-major forward worker's state for its current slot (group): the chain and Q^T (R' x N'),
// the slot's distinct rows and their products, the segment sum S. Used by the plan-driven
// forward_grt and the plan-free forward_grt_groups, which differ only in where a slot's lookups
// come from, and for the per-group products of forward_grt_rows.
template <typename scalar_t, typename index_t>
struct SlotForwardWorker {
  using T = scalar_t;
  const Batch<T, index_t>& in;
  const T* last_t; // transposed_last_core
  Scratch<T> chain;
  Scratch<T> qT; // Q^T (R' x N')
  Scratch<T> s_buf; // S (R' x n_l)
  SlotRows rows;
  Scratch<T> w_t; // (D n_l x N')

  SlotForwardWorker(const Batch<T, index_t>& batch, const T* last_core_t)
      : in(batch),
        last_t(last_core_t),
        chain(batch.cl.size),
        qT(batch.rp * batch.np),
        s_buf(batch.last_numel),
        rows(batch.L.last_rows()) {}

  // Q^T of `group`, kept in L1 for the slot's products.
  void load_prefix(int64_t group) {
    int64_t digits[kMaxCores];
    group_digits(in.L, group, digits);
    transpose(in.np, in.rp, prefix_chain(in.L, in.cl, in.cores, digits, chain.data()), qT.data());
  }
  // dst (count n_l x N') = [L_l^T] (count n_l x R') @ Q^T (R' x N') for the last digits
  // l = last(0 .. count), the slices L_l^T read in place: rows [i n_l, (i + 1) n_l) of dst are
  // W_{last(i)}^T.
  template <typename Last>
  void row_products_into(int64_t count, const Last& last, T* dst) {
    gather_rows_gemm(
        count, in.nl, in.np, in.rp, [&](int64_t i) { return last_t + last(i) * in.last_numel; }, qT.data(),
        /*ldb=*/in.np, dst, /*ldc=*/in.np);
  }
  // Row path: the products of the collected rows; row rows.pos[l] of the result is W_l^T.
  const T* row_products() {
    w_t.resize(rows.count() * in.N);
    row_products_into(rows.count(), [&](int64_t i) { return rows.rows[i]; }, w_t.data());
    return w_t.data();
  }
  // Segment path: S = sum_t alpha(t) L_{last(t)} over `count` lookups, then yT_b (n_l x N') +=
  // S^T (n_l x R') @ Q^T (R' x N').
  template <typename Alpha, typename Last>
  void add_segment(int64_t count, const Alpha& alpha, const Last& last, T* y_b) {
    std::fill(s_buf.data(), s_buf.data() + in.last_numel, T(0));
    sum_rows_into(
        in.last_numel, count, alpha, [&](int64_t t) { return in.core_last + last(t) * in.last_numel; }, s_buf.data());
    gemm</*kAccumulate=*/true>(
        in.nl, in.np, in.rp, T(1), s_buf.data(), /*a_row=*/1, /*a_col=*/in.nl, qT.data(), /*ldb=*/in.np, y_b,
        /*ldc=*/in.np);
  }
};

// The slot-major forwards' output accumulators: one (B x N) buffer per worker, as many as the
// threads and the scratch budget allow, zeroed.
template <typename scalar_t, typename index_t>
PartBuffers<scalar_t> forward_output_parts(const Batch<scalar_t, index_t>& in) {
  const int64_t max_parts = std::max<int64_t>(
      1,
      std::min<int64_t>(
          available_threads(),
          scratch_budget_bytes() / std::max<int64_t>(1, in.batch_size * in.N * static_cast<int64_t>(sizeof(scalar_t)))));
  return PartBuffers<scalar_t>(Arena::kOutputs, max_parts, in.batch_size, in.N);
}

// The slot-major forward passes (forward_grt over the plan's slots, forward_grt_groups over the
// batch's groups, forward_grt_rows over its distinct groups): slots visited in slot_visit_order
// (weight(u): a slot's cost), split by weight over at most max_parts workers, each with its
// SlotForwardWorker; visit(worker, part, u) runs slot u on worker `part`.
template <typename scalar_t, typename index_t, typename Weight, typename Visit>
void slot_major_pass(
    const Batch<scalar_t, index_t>& in,
    int64_t max_parts,
    const int64_t* slot_group,
    int64_t num_slots,
    const Weight& weight,
    const Visit& visit) {
  const Scratch<scalar_t> last_t = transposed_last_core(in.L, in.core_last);
  const SlotOrder order = slot_visit_order(in.L, slot_group, 0, num_slots, weight);
  weighted_parallel_for(
      num_slots,
      max_parts,
      [&](int64_t i) { return order.weight_prefix[i]; },
      [&](int64_t part, int64_t i_begin, int64_t i_end) {
        SlotForwardWorker<scalar_t, index_t> worker(in, last_t.data());
        for (int64_t i = i_begin; i < i_end; ++i) {
          visit(worker, part, order.slot[i]);
        }
      });
}

// grt forward over the plan, slot-major: per slot u (parallel over slots, balanced by segment
// count) its chain, Q_u^T (R' x N') kept in the worker's L1, then either
//   segment path: per segment s of the slot (bag b) S_s = sum_j c_j L_j (R' x n_l) and
//                 yT_b (n_l x N') += S_s^T @ Q_u^T, or
//   row path (a slot whose segments use few distinct rows, e.g. a hot group shared by many bags):
//                 the slot's D distinct rows W_l^T = L_l^T @ Q_u^T (n_l x N') as one GEMM, then
//                 yT_b += c_j W_l^T per lookup (an embedding-bag over the slot's rows),
// into the worker's own output accumulator; the accumulators are summed in part order and transposed into the output. Nothing
// per slot goes through memory: a bag-major pass needs every slot's Q^T (2 KB each) stored and
// gathered again per segment, tens of MB from DRAM on large batches. Deterministic for a fixed
// thread count.
template <typename scalar_t, typename index_t>
void forward_grt(const Batch<scalar_t, index_t>& in, const PlanRef& plan, scalar_t* out) {
  using T = scalar_t;
  PartBuffers<T> partial = forward_output_parts(in);
  {
    RECORD_FUNCTION("torchrec_tt::grt_forward::slots", std::vector<c10::IValue>());
    const SlotSegment<T>* fields = slot_segment_fields(in, plan);
    slot_major_pass(
        in, partial.parts(), plan.v.slot_group, plan.num_slots,
        // Cost of a slot ~ its segments plus its chain (about 4 segments' worth).
        [&](int64_t u) { return 2 * (plan.v.slot_segment_start[u + 1] - plan.v.slot_segment_start[u]) + 8; },
        [&](SlotForwardWorker<T, index_t>& worker, int64_t part, int64_t u) {
          T* yT = partial.part(part);
          const SlotSegments<T> segs = slot_segments(in, plan, fields, yT, u);
          worker.load_prefix(plan.v.slot_group[u]);
          worker.rows.collect(plan, segs);
          if (worker.rows.count() <= kRowPathRowsPerSegment * segs.count) {
            const T* w_t = worker.row_products();
            for (const SlotSegment<T>& seg : segs) {
              T* y_b = yT + seg.bag * in.N;
              for (int64_t k = seg.lookup_begin; k < seg.lookup_end; ++k) {
                axpy(
                    in.N, seg.scale * in.coef.weight(plan.v.sorted_lookup[k]),
                    w_t + worker.rows.pos[plan.v.sorted_last[k]] * in.N, y_b);
              }
            }
            worker.rows.reset_row_positions();
            return;
          }
          worker.rows.reset_row_positions();
          for (const SlotSegment<T>& seg : segs) {
            const int64_t* lookup = plan.v.sorted_lookup + seg.lookup_begin;
            const int64_t* last = plan.v.sorted_last + seg.lookup_begin;
            worker.add_segment(
                seg.lookup_end - seg.lookup_begin, [&](int64_t t) { return seg.scale * in.coef.weight(lookup[t]); },
                [&](int64_t t) { return last[t]; }, yT + seg.bag * in.N);
          }
        });
  }
  RECORD_FUNCTION("torchrec_tt::grt_forward::reduce", std::vector<c10::IValue>());
  at::parallel_for(0, in.batch_size, 64, [&](int64_t b_begin, int64_t b_end) {
    partial.sum_into_first(b_begin, b_end, in.N);
    for (int64_t b = b_begin; b < b_end; ++b) {
      transpose(in.nl, in.np, partial.part(0) + b * in.N, out + b * in.N);
      int64_t k0 = 0, k1 = 0;
      plan.cache_lookups(b, static_cast<int64_t>(in.offsets[b + 1]), &k0, &k1);
      // The bag's cached rows (add_cached_row for each, one register-held sum).
      const T scale = in.coef.scale(b);
      const int64_t* lookup = plan.v.sorted_lookup + k0;
      const int64_t* slot = plan.v.sorted_last + k0;
      sum_rows_into(
          in.N, k1 - k0, [&](int64_t i) { return scale * in.coef.weight(lookup[i]); },
          [&](int64_t i) { return in.cache + slot[i] * in.N; }, out + b * in.N);
    }
  });
}

// grt forward without a plan when forward_grt_rows does not apply (inference; docs/design.md section
// 3.4), slot-major over the batch's lookups ordered by (group, position) (lookups_by_group_cpu): per
// group (parallel over groups, balanced by lookups) its chain and Q_g^T, then the plan-driven
// forward's per-slot choice (kRowPathRowsPerSegment) with the group's bag runs as its segments:
//   row path: its distinct rows W_l^T = L_l^T @ Q_g^T as one GEMM, then yT_b += c_j W_l^T per lookup;
//   segment path: per bag run S = sum_j c_j L_j and yT_b += S^T @ Q_g^T;
// into the worker's own output accumulator; the accumulators are summed in part order and
// transposed into the output, with the bags' cached rows. The same products as forward_grt without
// building the plan (5.4 of 35 ms on the 10M table). Deterministic for a fixed thread count.
template <typename scalar_t, typename index_t>
void forward_grt_groups(const Batch<scalar_t, index_t>& in, const LookupsByGroup& lookups, scalar_t* out) {
  using T = scalar_t;
  PartBuffers<T> partial = forward_output_parts(in);
  {
    RECORD_FUNCTION("torchrec_tt::grt_forward::groups", std::vector<c10::IValue>());
    const int64_t* const start = lookups.start.data();
    slot_major_pass(
        in, partial.parts(), lookups.group.data(), lookups.num_groups(),
        // Cost of a group ~ two units per lookup (its row's share of the products and its axpy)
        // plus its chain, the weights of the plan-driven forward.
        [&](int64_t u) { return 2 * (start[u + 1] - start[u]) + 8; },
        [&](SlotForwardWorker<T, index_t>& worker, int64_t part, int64_t u) {
          T* yT = partial.part(part);
          const GroupedLookup* group_lookups = lookups.lookups + start[u];
          const int64_t n = start[u + 1] - start[u];
          for (int64_t k = 0; k < n; ++k) { // the accumulator rows, while the products run
            prefetch_row(yT + static_cast<int64_t>(group_lookups[k].bag) * in.N, in.N);
          }
          worker.load_prefix(lookups.group[u]);
          worker.rows.rows.clear();
          int64_t segments = 0; // the group's lookups are in bag order: a segment per run of a bag
          for (int64_t k = 0; k < n; ++k) {
            worker.rows.add(group_lookups[k].last);
            segments += k == 0 || group_lookups[k].bag != group_lookups[k - 1].bag ? 1 : 0;
          }
          if (worker.rows.count() <= kRowPathRowsPerSegment * segments) {
            const T* w_t = worker.row_products();
            for (int64_t k = 0; k < n; ++k) {
              const GroupedLookup& r = group_lookups[k];
              axpy(
                  in.N, in.coef.scale(r.bag) * in.coef.weight(r.lookup), w_t + worker.rows.pos[r.last] * in.N,
                  yT + static_cast<int64_t>(r.bag) * in.N);
            }
            worker.rows.reset_row_positions();
            return;
          }
          worker.rows.reset_row_positions();
          for (int64_t k = 0, k_end = 0; k < n; k = k_end) { // per bag run
            const int64_t b = group_lookups[k].bag;
            for (k_end = k + 1; k_end < n && group_lookups[k_end].bag == b; ++k_end) {
            }
            const T scale = in.coef.scale(b);
            const GroupedLookup* run = group_lookups + k;
            worker.add_segment(
                k_end - k, [&](int64_t t) { return scale * in.coef.weight(run[t].lookup); },
                [&](int64_t t) { return static_cast<int64_t>(run[t].last); }, yT + b * in.N);
          }
        });
  }
  RECORD_FUNCTION("torchrec_tt::grt_forward::reduce", std::vector<c10::IValue>());
  const int32_t* const cache_slot = in.cache_slot;
  at::parallel_for(0, in.batch_size, 64, [&](int64_t b_begin, int64_t b_end) {
    partial.sum_into_first(b_begin, b_end, in.N);
    const std::vector<T> zero(static_cast<size_t>(cache_slot == nullptr ? 0 : in.N), T(0));
    for (int64_t b = b_begin; b < b_end; ++b) {
      transpose(in.nl, in.np, partial.part(0) + b * in.N, out + b * in.N);
      if (cache_slot == nullptr) {
        continue;
      }
      // The bag's cached rows; an uncached lookup adds a zero row with coefficient 0.
      const int64_t lo = static_cast<int64_t>(in.offsets[b]);
      const T scale = in.coef.scale(b);
      const int32_t* slot = cache_slot + lo;
      sum_rows_into(
          in.N, static_cast<int64_t>(in.offsets[b + 1]) - lo,
          [&](int64_t t) { return slot[t] >= 0 ? scale * in.coef.weight(lo + t) : T(0); },
          [&](int64_t t) { return slot[t] >= 0 ? in.cache + slot[t] * in.N : zero.data(); }, out + b * in.N);
    }
  });
}

// Lookups ahead whose row the plan-free forward's bag pass prefetches (paper table, in-process
// alternation: 0 / 4 / 8 / 16 / 32 ahead gave a 0.85 / 0.82 / 0.80 / 0.79 / 0.81 ms forward).
constexpr int64_t kRowPrefetchAhead = 16;

// Each lookup's row in the rows buffer, rows[j - j0] = id[indices[j]] for j in [j0, j1), padded with
// kRowPrefetchAhead copies of the last so that the bag pass prefetches without a bound check. The
// bag pass reads these instead of id[indices[j]]: the dependent id load in front of every prefetch
// stalled it (perf: half its samples), and the resolved rows made the paper table's bag pass about
// a fifth faster on one thread.
template <typename index_t>
const int32_t* lookup_rows(const index_t* indices, const int32_t* id, int64_t j0, int64_t j1) {
  int32_t* const rows = arena<int32_t>(Arena::kLookupRows, j1 - j0 + kRowPrefetchAhead);
  for (int64_t j = j0; j < j1; ++j) {
    rows[j - j0] = id[static_cast<int64_t>(indices[j])];
  }
  std::fill(rows + (j1 - j0), rows + (j1 - j0) + kRowPrefetchAhead, j1 > j0 ? rows[j1 - j0 - 1] : 0);
  return rows;
}

// grt forward without a plan, when no backward will read one (inference; docs/design.md section
// 3.4), over the batch's distinct rows (distinct_rows_cpu):
//   rows (parallel over the distinct groups, in slot visit order): per group its chain, Q_g^T, and
//        its D_g rows W_r^T = L_l^T @ Q_g^T as one GEMM (M = D_g n_l) into a rows buffer, each
//        distinct row once per batch;
//   bags (parallel over bags, balanced by lookups): y_b = sum_j c_j W_{r_j}, an embedding bag over
//        the rows buffer (the cached rows the batch reads are copied in after the computed ones)
//        with the bag's sum held in registers.
// No (bag, group) grouping at all: the plan costs as much as the products on small tables (0.5 of
// 1.7 ms on the paper table). Each output row is written once: deterministic for any thread count.
template <typename scalar_t, typename index_t>
void forward_grt_rows(const Batch<scalar_t, index_t>& in, const DistinctRows& rows, scalar_t* out) {
  using T = scalar_t;
  const int64_t num_groups = rows.num_groups();
  const int64_t* const group_start = rows.group_row_start.data();
  const int64_t num_cached = static_cast<int64_t>(rows.cached_slot.size());
  T* const w_t = arena<T>(Arena::kRows, (rows.count() + num_cached) * in.N); // (D + cached, n_l x N')
  {
    RECORD_FUNCTION("torchrec_tt::grt_forward::rows", std::vector<c10::IValue>());
    slot_major_pass(
        in, available_threads(), rows.group.data(), num_groups,
        // Cost of a group ~ its rows' products plus its chain (about 8 rows' worth at n_l = 4).
        [&](int64_t u) { return group_start[u + 1] - group_start[u] + 8; },
        [&](SlotForwardWorker<T, index_t>& worker, int64_t, int64_t u) {
          const int64_t g = rows.group[u];
          const int64_t first = group_start[u];
          const int64_t group_first_row = g * in.L.last_rows();
          worker.load_prefix(g);
          // The group's D_g rows W_r^T, in place in the rows buffer.
          worker.row_products_into(
              group_start[u + 1] - first, [&](int64_t c) { return rows.row[first + c] - group_first_row; },
              w_t + first * in.N);
        });
  }
  RECORD_FUNCTION("torchrec_tt::grt_forward::bags", std::vector<c10::IValue>());
  // The cached rows the batch reads, transposed into the rows buffer after the computed ones: the bag
  // sums then treat every lookup alike.
  for (int64_t c = 0; c < num_cached; ++c) {
    transpose(in.np, in.nl, in.cache + static_cast<int64_t>(rows.cached_slot[c]) * in.N, w_t + (rows.count() + c) * in.N);
  }
  weighted_parallel_for(
      in.batch_size,
      available_threads(),
      [&](int64_t b) { return static_cast<int64_t>(in.offsets[b]) + b; },
      [&](int64_t, int64_t b_begin, int64_t b_end) {
        Scratch<T> yT(in.N);
        const int64_t j0 = static_cast<int64_t>(in.offsets[b_begin]);
        const int32_t* const row_of =
            lookup_rows(in.indices, rows.id.data(), j0, static_cast<int64_t>(in.offsets[b_end]));
        for (int64_t b = b_begin; b < b_end; ++b) {
          const int64_t lo = static_cast<int64_t>(in.offsets[b]);
          const int64_t count = static_cast<int64_t>(in.offsets[b + 1]) - lo;
          const T scale = in.coef.scale(b);
          const int32_t* const row = row_of + (lo - j0);
          std::fill(yT.data(), yT.data() + in.N, T(0));
          sum_rows_into(
              in.N, count, [&](int64_t t) { return scale * in.coef.weight(lo + t); },
              [&](int64_t t) {
                // The rows were written by every worker: they come from L3 or another core.
                prefetch_row(w_t + static_cast<int64_t>(row[t + kRowPrefetchAhead]) * in.N, in.N);
                return w_t + static_cast<int64_t>(row[t]) * in.N;
              },
              yT.data());
          transpose(in.nl, in.np, yT.data(), out + b * in.N);
        }
      });
}

// ----------------------------------------------------------------------------------------------
// Backward.
// ----------------------------------------------------------------------------------------------

// Bags ahead whose cache hits (slots and lookups in the plan's sorted fields) the cache gradient
// prefetches: the plan is cold by the backward, and a bag's hits are a few lines at an address known
// from the offsets and bag_hits alone.
constexpr int64_t kCacheHitPrefetchBags = 4;

// tt: per lookup, the chain with its intermediates, then
//   G^T = g_b^T Q (n_l x R'); d core_last[last] += c_j G; dQ = c_j g_b L^T; back through the chain.
// psw_grad[j] = scale_b * <L, G> = scale_b * <W[idx_j], g_b>.
// Core gradients accumulate into per-thread dense buffers (grads for the first), reduced in order.
template <typename scalar_t, typename index_t>
void backward_tt(
    const Batch<scalar_t, index_t>& in,
    const scalar_t* grad_out,
    scalar_t* const* grads,
    scalar_t* psw_grad,
    scalar_t* dcache) {
  using T = scalar_t;
  const TransposedCores<T> cores_t(in.L, in.cores);
  const Scratch<T> last_t = transposed_last_core(in.L, in.core_last);

  int64_t core_offset[kMaxCores + 1] = {};
  for (int64_t k = 0; k < in.L.d; ++k) {
    core_offset[k + 1] = core_offset[k] + in.L.core_numel(k);
  }
  const int64_t total = core_offset[in.L.d];
  const int64_t max_buffers =
      std::max<int64_t>(1, scratch_budget_bytes() / static_cast<int64_t>(total * sizeof(T)));
  const int64_t num_parts = std::max<int64_t>(
      1, std::min<int64_t>({available_threads(), max_buffers, in.batch_size}));
  std::vector<T> extra(static_cast<size_t>((num_parts - 1) * total), T(0));

  at::parallel_for(0, num_parts, 1, [&](int64_t p_begin, int64_t p_end) {
    Scratch<T> scratch(in.cl.size + in.last_numel + 2 * in.cl.max_step);
    T* chain = scratch.data();
    T* gT = chain + in.cl.size; // (n_l x R')
    T* dcur = gT + in.last_numel;
    T* dnext = dcur + in.cl.max_step;
    int64_t digits[kMaxCores];
    T* dst[kMaxCores];
    for (int64_t p = p_begin; p < p_end; ++p) {
      T* base[kMaxCores];
      for (int64_t k = 0; k < in.L.d; ++k) {
        base[k] = p == 0 ? grads[k] : extra.data() + (p - 1) * total + core_offset[k];
      }
      const int64_t b_begin = in.batch_size * p / num_parts;
      const int64_t b_end = in.batch_size * (p + 1) / num_parts;
      for (int64_t b = b_begin; b < b_end; ++b) {
        const T scale = in.coef.scale(b);
        const T* g = grad_out + b * in.N; // (N' x n_l)
        for (int64_t j = in.offsets[b]; j < static_cast<int64_t>(in.offsets[b + 1]); ++j) {
          if (in.cache_slot != nullptr && in.cache_slot[j] >= 0) {
            continue; // cached_rows_backward
          }
          const T c = scale * in.coef.weight(j);
          row_digits(in.L, static_cast<int64_t>(in.indices[j]), digits);
          const int64_t last = digits[in.L.d - 1];
          const T* lT = last_t.data() + last * in.last_numel; // (n_l x R')
          const T* q = prefix_chain(in.L, in.cl, in.cores, digits, chain);
          // G^T (n_l x R') = g^T (n_l x N') @ Q (N' x R')
          gemm</*kAccumulate=*/false>(
              in.nl, in.rp, in.np, T(1), g, /*a_row=*/1, /*a_col=*/in.nl, q, /*ldb=*/in.rp, gT,
              /*ldc=*/in.rp);
          if (psw_grad != nullptr) {
            psw_grad[j] = scale * dot(in.last_numel, lT, gT);
          }
          T* dlast = base[in.L.d - 1] + last * in.last_numel; // (R' x n_l)
          for (int64_t r = 0; r < in.rp; ++r) {
            for (int64_t cc = 0; cc < in.nl; ++cc) {
              dlast[r * in.nl + cc] += c * gT[cc * in.rp + r];
            }
          }
          // dQ (N' x R') = c_j * g (N' x n_l) @ L^T (n_l x R')
          gemm</*kAccumulate=*/false>(
              in.np, in.rp, in.nl, c, g, /*a_row=*/in.nl, /*a_col=*/1, lT, /*ldb=*/in.rp, dcur,
              /*ldc=*/in.rp);
          for (int64_t k = 0; k + 1 < in.L.d; ++k) {
            dst[k] = base[k] + digits[k] * in.L.slice_numel(k);
          }
          prefix_chain_backward(in.L, in.cl, cores_t.ptrs, digits, chain, dcur, dnext, dst);
        }
      }
    }
  });

  if (num_parts > 1) {
    for (int64_t k = 0; k < in.L.d; ++k) {
      T* g0 = grads[k];
      at::parallel_for(0, in.L.core_numel(k), 4096, [&](int64_t e_begin, int64_t e_end) {
        for (int64_t p = 1; p < num_parts; ++p) {
          const T* src = extra.data() + (p - 1) * total + core_offset[k];
          axpy(e_end - e_begin, T(1), src + e_begin, g0 + e_begin);
        }
      });
    }
  }
  if (dcache != nullptr) {
    // One pass in lookup order (a cached row's gradient sums over bags: no race, deterministic).
    for (int64_t b = 0; b < in.batch_size; ++b) {
      const T scale = in.coef.scale(b);
      for (int64_t j = in.offsets[b]; j < static_cast<int64_t>(in.offsets[b + 1]); ++j) {
        if (in.cache_slot[j] >= 0) {
          cached_row_backward(in, j, in.cache_slot[j], scale, grad_out + b * in.N, dcache, psw_grad);
        }
      }
    }
  }
}

// grt backward over the plan, in chunks of slots (for_each_slot_chunk) whose chains and dOut
// blocks fit the scratch budget:
//   prefixes: the chain (A_0 .. A_{d-2} = Q) of every slot of the chunk;
//   slots (parallel over slots, balanced by segment count), everything that involves a slot's Q_u
//        while it sits in L1: per segment s of the slot (bag b), G_s^T = g_b^T Q_u (n_l x R'),
//        S_s^T = sum_j c_j L_j^T, and per lookup d core_last[l_j] += c_j G_s and
//        psw_grad[j] = scale_b <L_j, G_s>; then dQ_u = sum_s g_b S_s^T as one register-tiled
//        product over the slot's segments, and back through the chain (dOut_k kept per slot);
//   slices: middle-core slice gradients, one product per digit value.
// S_s^T lives only in the worker's scratch for the slot being processed: nothing per segment goes
// through memory (a bag-major pass that stored S_s^T for a slot-major pass to gather moved
// 2 x 512 bytes per segment through DRAM on large batches).
// Core gradients accumulate into each worker's own dense buffers (TT cores are small by design),
// summed in part order at the end: deterministic for a fixed thread count.
template <typename scalar_t, typename index_t>
void backward_grt(
    const Batch<scalar_t, index_t>& in,
    const PlanRef& plan,
    const scalar_t* grad_out,
    scalar_t* const* grads,
    scalar_t* psw_grad,
    scalar_t* dcache) {
  using T = scalar_t;
  if (dcache != nullptr) {
    // Bag by bag (a cached row's gradient sums over bags: no race, deterministic), each bag's output
    // gradient held in registers across its cached rows (add_into_rows; per-hit axpys were slower).
    // Bucketing the hits by slot instead, for register-held sums per cached row, measured slower
    // (100-130 against 80-97 us, MovieLens history table, 1 % cache): it reads each hit's
    // output-gradient row at random.
    RECORD_FUNCTION("torchrec_tt::grt_backward::cache", std::vector<c10::IValue>());
    for (int64_t b = 0; b < in.batch_size; ++b) {
      if (b + kCacheHitPrefetchBags < in.batch_size) {
        const int64_t ahead = b + kCacheHitPrefetchBags;
        int64_t a0 = 0, a1 = 0;
        plan.cache_lookups(ahead, static_cast<int64_t>(in.offsets[ahead + 1]), &a0, &a1);
        if (a1 > a0) {
          __builtin_prefetch(plan.v.sorted_last + a0);
          __builtin_prefetch(plan.v.sorted_last + a1 - 1);
        }
      }
      int64_t k0 = 0, k1 = 0;
      plan.cache_lookups(b, static_cast<int64_t>(in.offsets[b + 1]), &k0, &k1);
      const int64_t count = k1 - k0;
      const T scale = in.coef.scale(b);
      const int64_t* const slot = plan.v.sorted_last + k0; // a cached lookup's `last` is its slot
      const T* const g_b = grad_out + b * in.N;
      const auto row = [&](int64_t i) { return dcache + slot[i] * in.N; };
      if (in.psw == nullptr) {
        add_into_rows(in.N, count, [&](int64_t) { return scale; }, row, g_b);
        continue;
      }
      const int64_t* const lookup = plan.v.sorted_lookup + k0;
      add_into_rows(in.N, count, [&](int64_t i) { return scale * in.coef.weight(lookup[i]); }, row, g_b);
      for (int64_t i = 0; psw_grad != nullptr && i < count; ++i) {
        psw_grad[lookup[i]] = cached_row_psw_grad(in, slot[i], scale, g_b);
      }
    }
  }
  const int64_t S = plan.num_segments;
  if (S == 0) { // every bag is empty: all gradients are zero
    for (int64_t k = 0; k < in.L.d; ++k) {
      std::fill(grads[k], grads[k] + in.L.core_numel(k), T(0));
    }
    return;
  }
  const int64_t* sorted_lookups = plan.v.sorted_lookup;
  const int64_t* sorted_last = plan.v.sorted_last;
  const int64_t* slot_group = plan.v.slot_group;
  const int64_t* slot_seg_start = plan.v.slot_segment_start;

  const TransposedCores<T> cores_t(in.L, in.cores);
  const Scratch<T> last_t = transposed_last_core(in.L, in.core_last);
  const SlotSegment<T>* fields = slot_segment_fields(in, plan);

  // Per-part gradients: cores 0..d-2 as the cores, the last core transposed (m_l, n_l, R').
  int64_t core_offset[kMaxCores + 1] = {};
  for (int64_t k = 0; k < in.L.d; ++k) {
    core_offset[k + 1] = core_offset[k] + in.L.core_numel(k);
  }
  const int64_t total = core_offset[in.L.d];
  const int64_t max_parts = std::max<int64_t>(
      1,
      std::min<int64_t>(
          available_threads(), scratch_budget_bytes() / static_cast<int64_t>(total * sizeof(T))));
  PartBuffers<T> part_grads(Arena::kCoreGrads, max_parts, 1, total);

  T* chains = nullptr;
  // dOut_k (chain_rows(k-1) x n_k R[k+1]) of every slot for the middle cores k = 1..d-2: the slot
  // pass leaves them here and the slice pass turns them into slice gradients digit by digit.
  int64_t dout_offset[kMaxCores] = {};
  int64_t dout_size = 0;
  for (int64_t k = 1; k + 1 < in.L.d; ++k) {
    dout_offset[k] = dout_size;
    dout_size += in.L.chain_rows(k - 1) * in.L.n[k] * in.L.R[k + 1];
  }
  T* douts = nullptr;
  std::vector<int64_t> digit_start;
  std::vector<int64_t> digit_slots;
  const int64_t chain_bytes = (in.cl.size + dout_size) * static_cast<int64_t>(sizeof(T));
  for_each_slot_chunk(plan, chain_bytes, [&](int64_t u_lo, int64_t u_hi) {
    chains = arena<T>(Arena::kChains, (u_hi - u_lo) * in.cl.size);
    douts = arena<T>(Arena::kSliceGrads, (u_hi - u_lo) * dout_size);
    // Cost of a slot ~ its segments (two products each) plus its chain (about 8 segments' worth).
    const SlotOrder order = slot_visit_order(in.L, plan.v.slot_group, u_lo, u_hi, [&](int64_t u) {
      return 2 * (slot_seg_start[u + 1] - slot_seg_start[u]) + 8;
    });
    {
      RECORD_FUNCTION("torchrec_tt::grt_backward::prefixes", std::vector<c10::IValue>());
      chains_of_slots(in, plan, u_lo, u_hi, order, chains);
    }
    {
      RECORD_FUNCTION("torchrec_tt::grt_backward::slots", std::vector<c10::IValue>());
      weighted_parallel_for(
          u_hi - u_lo,
          max_parts,
          [&](int64_t i) { return order.weight_prefix[i]; },
          [&](int64_t part, int64_t i_begin, int64_t i_end) {
            T* dslice0 = part_grads.part(part) + core_offset[0];
            T* dlast_t = part_grads.part(part) + core_offset[in.L.d - 1];
            Scratch<T> dA0(in.L.slice_numel(0));
            Scratch<T> gT(in.last_numel); // G_s^T (n_l x R')
            Scratch<T> s_t; // S_s^T (n_l x R') per segment of the slot
            Scratch<T> dw; // dW_l (N' x n_l) per distinct row of the slot (row path)
            std::vector<GemmSegment<T>> operands;
            SlotRows slot_rows(in.L.last_rows());
            int64_t digits[kMaxCores];
            // Down the chain from dQ (in cur): dA_{k-1} (rows x R[k]) = dOut_k (rows x cols) @
            // slice_k^T; the slice gradients A_{k-1}^T dOut_k are left to the slice pass.
            const auto chain_down = [&](int64_t u, T* dout, T* cur) {
              group_digits(in.L, slot_group[u], digits);
              for (int64_t k = in.L.d - 2; k >= 1; --k) {
                const int64_t rows = in.L.chain_rows(k - 1);
                const int64_t cols = in.L.n[k] * in.L.R[k + 1];
                T* next = k > 1 ? dout + dout_offset[k - 1] : dA0.data();
                gemm</*kAccumulate=*/false>(
                    rows, in.L.R[k], cols, T(1), cur, /*a_row=*/cols, /*a_col=*/1,
                    cores_t.ptrs.p[k] + digits[k] * in.L.slice_numel(k), /*ldb=*/in.L.R[k], next,
                    /*ldc=*/in.L.R[k]);
                cur = next;
              }
              axpy(in.L.slice_numel(0), T(1), cur, dslice0 + digits[0] * in.L.slice_numel(0));
            };
            for (int64_t i = i_begin; i < i_end; ++i) {
              const int64_t u = order.slot[i];
              const SlotSegments<T> segs = slot_segments(in, plan, fields, grad_out, u);
              const int64_t count = segs.count;
              const T* q = chains + i * in.cl.size + in.cl.offset[in.L.d - 2];
              T* dout = douts + i * dout_size;
              // dQ (N' x R') is dOut of the last middle core (or dA_0 when d = 2).
              T* cur = in.L.d > 2 ? dout + dout_offset[in.L.d - 2] : dA0.data();
              slot_rows.collect(plan, segs);
              const int64_t num_rows = slot_rows.count();
              // The row path has no per-row <W_l, g_b> for weight gradients: those take segments.
              if (psw_grad == nullptr && num_rows <= kRowPathRowsPerSegment * count) {
                // dW_l = sum over the slot's lookups of row l of c_j g_b; then
                // d core_last[l] += Q^T dW_l and dQ = sum_l dW_l L_l^T (one tile pass, K = n_l D).
                dw.resize(num_rows * in.N);
                std::fill(dw.data(), dw.data() + num_rows * in.N, T(0));
                for (const SlotSegment<T>& seg : segs) {
                  const T* g = grad_out + seg.bag * in.N;
                  for (int64_t k = seg.lookup_begin; k < seg.lookup_end; ++k) {
                    axpy(
                        in.N, seg.scale * in.coef.weight(sorted_lookups[k]), g,
                        dw.data() + slot_rows.pos[sorted_last[k]] * in.N);
                  }
                }
                operands.resize(static_cast<size_t>(num_rows));
                for (int64_t i = 0; i < num_rows; ++i) {
                  const int64_t l = slot_rows.rows[i];
                  const T* dw_l = dw.data() + i * in.N; // (N' x n_l)
                  // d core_last[l]^T (n_l x R') += dW_l^T (n_l x N') @ Q (N' x R')
                  gemm</*kAccumulate=*/true>(
                      in.nl, in.rp, in.np, T(1), dw_l, /*a_row=*/1, /*a_col=*/in.nl, q, /*ldb=*/in.rp,
                      dlast_t + l * in.last_numel, /*ldc=*/in.rp);
                  operands[i] = {dw_l, last_t.data() + l * in.last_numel, in.nl};
                }
                multi_gemm</*kAccumulate=*/false, /*kPrefetchB=*/false>(
                    in.np, in.rp, [&](int64_t i) { return operands[i]; }, num_rows, T(1), /*a_row=*/in.nl,
                    /*a_col=*/1, /*ldb=*/in.rp, cur, /*ldc=*/in.rp);
                slot_rows.reset_row_positions();
                chain_down(u, dout, cur);
                continue;
              }
              slot_rows.reset_row_positions();
              operands.resize(static_cast<size_t>(count));
              s_t.resize(count * in.last_numel);
              for (int64_t i = 0; i < count; ++i) {
                const SlotSegment<T>& seg = segs[i];
                const T* g = grad_out + seg.bag * in.N; // (N' x n_l)
                // G^T (n_l x R') = g^T (n_l x N') @ Q (N' x R')
                gemm</*kAccumulate=*/false>(
                    in.nl, in.rp, in.np, T(1), g, /*a_row=*/1, /*a_col=*/in.nl, q, /*ldb=*/in.rp,
                    gT.data(), /*ldc=*/in.rp);
                T* st = s_t.data() + i * in.last_numel;
                std::fill(st, st + in.last_numel, T(0));
                const int64_t* seg_lookups = sorted_lookups + seg.lookup_begin;
                const int64_t* seg_last = sorted_last + seg.lookup_begin;
                sum_rows_into(
                    in.last_numel, seg.lookup_end - seg.lookup_begin,
                    [&](int64_t e) { return seg.scale * in.coef.weight(seg_lookups[e]); },
                    [&](int64_t e) { return last_t.data() + seg_last[e] * in.last_numel; }, st);
                for (int64_t k = seg.lookup_begin; k < seg.lookup_end; ++k) {
                  const int64_t j = sorted_lookups[k];
                  const T c = seg.scale * in.coef.weight(j);
                  const T* lt = last_t.data() + sorted_last[k] * in.last_numel;
                  axpy(in.last_numel, c, gT.data(), dlast_t + sorted_last[k] * in.last_numel);
                  if (psw_grad != nullptr) {
                    psw_grad[j] = seg.scale * dot(in.last_numel, lt, gT.data());
                  }
                }
                operands[i] = {g, st, in.nl};
              }
              // dQ (N' x R') = sum_s g_s (N' x n_l) @ S_s^T (n_l x R'): one tile pass over the slot's
              // segments, K = n_l * count.
              multi_gemm</*kAccumulate=*/false, /*kPrefetchB=*/false>(
                  in.np, in.rp, [&](int64_t i) { return operands[i]; }, count, T(1), /*a_row=*/in.nl,
                  /*a_col=*/1, /*ldb=*/in.rp, cur, /*ldc=*/in.rp);
              chain_down(u, dout, cur);
            }
          });
    }
    // Middle-core slice gradients, one digit value at a time: d core_k[i] = sum over the chunk's
    // slots u with digit_k(u) = i of A_{k-1,u}^T dOut_{k,u}, one register-tiled product per digit
    // (K = rows * slots) written once, instead of a read-modify-write of the slice per slot.
    RECORD_FUNCTION("torchrec_tt::grt_backward::slices", std::vector<c10::IValue>());
    for (int64_t k = 1; k + 1 < in.L.d; ++k) {
      const int64_t m = in.L.m[k];
      digit_start.assign(static_cast<size_t>(m + 1), 0);
      digit_slots.resize(static_cast<size_t>(u_hi - u_lo));
      int64_t digits[kMaxCores];
      for (int64_t u = u_lo; u < u_hi; ++u) {
        group_digits(in.L, slot_group[u], digits);
        ++digit_start[digits[k] + 1];
      }
      // digit_slots holds visit positions (where the chains and dOut blocks are stored).
      for (int64_t i = 0; i < m; ++i) {
        digit_start[i + 1] += digit_start[i];
      }
      {
        std::vector<int64_t> fill(digit_start.begin(), digit_start.end() - 1);
        for (int64_t i = 0; i < u_hi - u_lo; ++i) {
          group_digits(in.L, slot_group[order.slot[i]], digits);
          digit_slots[fill[digits[k]]++] = i;
        }
      }
      const int64_t rows = in.L.chain_rows(k - 1);
      const int64_t rk = in.L.R[k];
      const int64_t cols = in.L.n[k] * in.L.R[k + 1];
      T* dcore = part_grads.part(0) + core_offset[k];
      weighted_parallel_for(
          m,
          max_parts,
          [&](int64_t i) { return 16 * digit_start[i] + i; },
          [&](int64_t, int64_t i_begin, int64_t i_end) {
            for (int64_t i = i_begin; i < i_end; ++i) {
              const int64_t n = digit_start[i + 1] - digit_start[i];
              if (n == 0) {
                continue;
              }
              const int64_t* slots = digit_slots.data() + digit_start[i];
              const auto operands = [&](int64_t t) {
                return GemmSegment<T>{
                    chains + slots[t] * in.cl.size + in.cl.offset[k - 1],
                    douts + slots[t] * dout_size + dout_offset[k],
                    rows};
              };
              // d slice (R[k] x cols) += sum_t A_{k-1,t}^T (R[k] x rows) @ dOut_{k,t} (rows x cols)
              multi_gemm</*kAccumulate=*/true>(
                  rk, cols, operands, n, T(1), /*a_row=*/1, /*a_col=*/rk, /*ldb=*/cols,
                  dcore + i * in.L.slice_numel(k), /*ldc=*/cols);
            }
          });
    }
  });

  RECORD_FUNCTION("torchrec_tt::grt_backward::reduce", std::vector<c10::IValue>());
  at::parallel_for(0, total, 4096, [&](int64_t e_begin, int64_t e_end) {
    part_grads.sum_into_first(e_begin, e_end, 1);
  });
  const T* sum = part_grads.part(0);
  for (int64_t k = 0; k + 1 < in.L.d; ++k) {
    std::copy(sum + core_offset[k], sum + core_offset[k + 1], grads[k]);
  }
  const int64_t slice = in.last_numel;
  const T* dlast_t = sum + core_offset[in.L.d - 1];
  at::parallel_for(0, in.L.last_rows(), std::max<int64_t>(1, 16384 / slice), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      transpose(in.nl, in.rp, dlast_t + i * slice, grads[in.L.d - 1] + i * slice);
    }
  });
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

// The hot-row cache of one call (docs/design.md section 10), checked: its rows and ids, and the
// per-lookup slots (computed here for the tt variant and for a grt plan built here).
struct CallCache {
  at::Tensor weight; // (K, N), the cores' dtype, contiguous; undefined: no cache
  at::Tensor ids; // (K,) int64, distinct ascending
  std::vector<int32_t> slots; // (nnz,) or empty

  int64_t rows() const {
    return weight.defined() ? weight.size(0) : 0;
  }
  PlanCache plan_cache() const {
    return PlanCache{rows(), slots.empty() ? nullptr : slots.data()};
  }
};

// The cache's tensors, checked against the batch (no per-lookup work: see add_lookup_slots).
CallCache check_cache(
    const char* op,
    const TTInputs& in,
    const std::optional<at::Tensor>& cache_weight,
    const std::optional<at::Tensor>& cache_ids) {
  CallCache cache;
  TORCH_CHECK_VALUE(
      cache_weight.has_value() == cache_ids.has_value(), op,
      ": cache_weight and cache_ids go together, got ", cache_weight.has_value() ? "cache_weight" : "cache_ids",
      " alone");
  if (!cache_weight.has_value()) {
    return cache;
  }
  cache.ids = check_cache_ids_cpu(op, *cache_ids);
  const at::Tensor& w = *cache_weight;
  const int64_t k = cache.ids.numel();
  const int64_t n = in.layout.embedding_dim();
  TORCH_CHECK_VALUE(
      w.dim() == 2 && w.size(0) == k && w.size(1) == n, op, ": cache_weight must have shape (", k, ", ",
      n, ") (cache_ids' rows, the embedding dim), got ", w.sizes());
  TORCH_CHECK_VALUE(
      w.scalar_type() == in.cores[0].scalar_type() && w.device().is_cpu(), op,
      ": cache_weight must be a CPU tensor of the cores' dtype ", in.cores[0].scalar_type(), ", got ",
      w.scalar_type(), " on ", w.device());
  cache.weight = w.contiguous();
  return cache;
}

// Each lookup's cache slot, for the kernels that do not read the hits from a plan's cache segments
// or the distinct-row pass's row map, and to build a plan.
void add_lookup_slots(const TTInputs& in, CallCache* cache) {
  if (!cache->weight.defined()) {
    return;
  }
  TORCHREC_TT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), "tt_cache_slots_cpu", [&] {
    cache->slots = cache_slots_cpu<index_t>(
        in.indices.data_ptr<index_t>(), in.nnz, cache->ids.data_ptr<int64_t>(), cache->rows(),
        in.layout.num_rows());
  });
}

// The batch's plan: the one passed in (checked against the batch and the cache), else built here.
template <typename scalar_t, typename index_t>
at::Tensor grt_plan(
    const char* op,
    const std::optional<at::Tensor>& plan,
    const Batch<scalar_t, index_t>& batch,
    const CallCache& cache) {
  return plan_for_batch_cpu<index_t>(
      op, plan, batch.indices, batch.offsets, batch.batch_size, batch.nnz, batch.L.last_rows(),
      batch.L.num_groups(), cache.plan_cache());
}

template <typename scalar_t>
CorePtrs<scalar_t> core_ptrs(const std::vector<at::Tensor>& cores) {
  CorePtrs<scalar_t> p;
  for (const auto k : c10::irange(cores.size())) {
    p.p[k] = cores[k].data_ptr<scalar_t>();
  }
  return p;
}

template <typename scalar_t, typename index_t>
Batch<scalar_t, index_t> make_batch(const TTInputs& in, const CallCache& cache, bool mean) {
  return Batch<scalar_t, index_t>(
      in.layout, core_ptrs<scalar_t>(in.cores), in.indices.data_ptr<index_t>(),
      in.offsets.data_ptr<index_t>(), in.psw.has_value() ? in.psw->data_ptr<scalar_t>() : nullptr,
      in.batch_size, in.nnz, mean, cache.weight.defined() ? cache.weight.data_ptr<scalar_t>() : nullptr,
      cache.slots.empty() ? nullptr : cache.slots.data());
}

at::Tensor tt_embedding_bag_cpu(
    at::TensorList cores,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    int64_t pooling_mode,
    int64_t variant,
    const std::optional<at::Tensor>& plan,
    const std::optional<at::Tensor>& cache_weight,
    const std::optional<at::Tensor>& cache_ids) {
  constexpr const char* op = "tt_embedding_bag";
  const TTInputs in =
      check_inputs(op, cores, indices, offsets, per_sample_weights, pooling_mode, variant);
  CallCache cache = check_cache(op, in, cache_weight, cache_ids);
  const TTLayout& L = in.layout;
  const bool grt = static_cast<Variant>(variant) == Variant::kGRT;
  // A given plan is checked against the batch whichever pass runs.
  const std::optional<at::Tensor> given = grt && plan.has_value()
      ? std::optional<at::Tensor>(check_plan_cpu(op, *plan, in.nnz, in.batch_size, L.last_rows(), cache.rows()))
      : std::nullopt;
  // The passes over the batch's distinct rows or its lookups by group (docs/design.md section 3.4):
  // without a plan (no backward will read one; the front-end passes it when autograd records), and
  // the distinct-row pass also with one, which it does not need. Each distinct row once when that is
  // at most the plan path's products (the per-slot rule of forward_grt over the whole batch; a given
  // plan counts the segments exactly).
  std::optional<DistinctRows> rows;
  if (grt && distinct_rows_fit(in.nnz, L.num_rows())) {
    TORCHREC_TT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), "tt_distinct_rows_cpu", [&] {
      rows = distinct_rows_cpu(
          in.indices.data_ptr<index_t>(), in.offsets.data_ptr<index_t>(),
          cache.weight.defined() ? cache.ids.data_ptr<int64_t>() : nullptr, cache.rows(), in.batch_size,
          in.nnz, L.num_rows(), L.last_rows());
    });
    const int64_t segments = given.has_value() ? PlanRef(*given, in.nnz, in.batch_size).num_segments : rows->num_segments;
    if (rows->count() > kRowPathRowsPerSegment * segments) {
      rows.reset();
    }
  }
  // The other passes read each lookup's slot, or (given a plan) the plan's cache segments.
  if (!rows.has_value() && (!grt || !given.has_value())) {
    add_lookup_slots(in, &cache);
  }
  at::Tensor out = at::empty({in.batch_size, L.embedding_dim()}, in.cores[0].options());
  const bool mean = static_cast<PoolingMode>(pooling_mode) == PoolingMode::kMean;
  TORCHREC_TT_DISPATCH_CPU_FLOAT_TYPES(in.cores[0].scalar_type(), "tt_embedding_bag_cpu", [&] {
    scalar_t* y = out.data_ptr<scalar_t>();
    TORCHREC_TT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), "tt_embedding_bag_cpu_idx", [&] {
      const auto batch = make_batch<scalar_t, index_t>(in, cache, mean);
      if (rows.has_value()) {
        forward_grt_rows(batch, *rows, y);
      } else if (grt && !given.has_value() && lookups_by_group_fit(in.nnz, in.batch_size, L.num_groups(), L.last_rows())) {
        forward_grt_groups(
            batch,
            lookups_by_group_cpu(
                batch.indices, batch.offsets, batch.cache_slot, in.batch_size, in.nnz, L.last_rows(), L.num_groups()),
            y);
      } else if (grt) {
        const at::Tensor p = given.has_value() ? *given : grt_plan(op, plan, batch, cache);
        forward_grt(batch, PlanRef(p, in.nnz, in.batch_size), y);
      } else {
        forward_tt(batch, y);
      }
    });
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> tt_embedding_bag_backward_cpu(
    const at::Tensor& grad_output,
    at::TensorList cores,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    int64_t pooling_mode,
    int64_t variant,
    bool per_sample_weights_requires_grad,
    const std::optional<at::Tensor>& plan,
    const std::optional<at::Tensor>& cache_weight,
    const std::optional<at::Tensor>& cache_ids) {
  constexpr const char* op = "tt_embedding_bag_backward";
  const TTInputs in =
      check_inputs(op, cores, indices, offsets, per_sample_weights, pooling_mode, variant);
  check_backward_inputs(op, grad_output, in, per_sample_weights_requires_grad);
  CallCache cache = check_cache(op, in, cache_weight, cache_ids);
  if (static_cast<Variant>(variant) == Variant::kTT || !plan.has_value()) {
    add_lookup_slots(in, &cache);
  }
  const at::Tensor grad_out = grad_output.contiguous();
  const bool mean = static_cast<PoolingMode>(pooling_mode) == PoolingMode::kMean;

  std::vector<at::Tensor> core_grads;
  core_grads.reserve(in.cores.size());
  for (const auto& c : in.cores) {
    // grt writes every gradient entry once (from its per-thread sums); tt accumulates into them.
    core_grads.push_back(
        static_cast<Variant>(variant) == Variant::kGRT ? at::empty(c.sizes(), c.options()) : at::zeros(c.sizes(), c.options()));
  }
  at::Tensor psw_grad = at::empty(
      {per_sample_weights_requires_grad ? in.nnz : 0}, in.cores[0].options());
  at::Tensor cache_grad = cache.weight.defined() ? at::zeros_like(cache.weight) : at::empty({0}, in.cores[0].options());

  TORCHREC_TT_DISPATCH_CPU_FLOAT_TYPES(in.cores[0].scalar_type(), "tt_embedding_bag_backward_cpu", [&] {
    static_assert(
        std::is_same_v<acc_type_t<scalar_t>, scalar_t>,
        "CPU core gradients accumulate in place: the accumulation type must be the core dtype");
    scalar_t* grads[kMaxCores] = {};
    for (const auto k : c10::irange(core_grads.size())) {
      grads[k] = core_grads[k].data_ptr<scalar_t>();
    }
    scalar_t* dpsw = per_sample_weights_requires_grad ? psw_grad.data_ptr<scalar_t>() : nullptr;
    scalar_t* dcache = cache.weight.defined() ? cache_grad.data_ptr<scalar_t>() : nullptr;
    const scalar_t* g = grad_out.data_ptr<scalar_t>();
    TORCHREC_TT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), "tt_embedding_bag_backward_cpu_idx", [&] {
      const auto batch = make_batch<scalar_t, index_t>(in, cache, mean);
      if (static_cast<Variant>(variant) == Variant::kGRT) {
        const at::Tensor p = grt_plan(op, plan, batch, cache);
        backward_grt(batch, PlanRef(p, in.nnz, in.batch_size), g, grads, dpsw, dcache);
      } else {
        backward_tt(batch, g, grads, dpsw, dcache);
      }
    });
  });
  return {core_grads, psw_grad, cache_grad};
}

} // namespace
} // namespace torchrec_tt::cpu

TORCH_LIBRARY_IMPL(torchrec_tt, CPU, m) {
  m.impl("tt_embedding_bag", &torchrec_tt::cpu::tt_embedding_bag_cpu);
  m.impl("tt_embedding_bag_backward", &torchrec_tt::cpu::tt_embedding_bag_backward_cpu);
}
