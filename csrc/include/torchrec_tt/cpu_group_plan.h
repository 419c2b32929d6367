// (bag, group) plan of a batch on CPU: the host-side implementation behind torchrec_tt::group_plan,
// also used by the CPU grt kernels (csrc/cpu/tt_embedding_bag_cpu.cpp) when no plan is passed in.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <optional>
#include <cstdint>
#include <vector>

namespace torchrec_tt::cpu {

// (index / divisor, index % divisor) for 0 <= index without a hardware 64-bit division (25-40
// cycles, once per lookup): a double-precision reciprocal and one correction step, exact for
// index < 2^52 (larger indices take the division).
class FastDivmod {
 public:
  explicit FastDivmod(int64_t divisor)
      : divisor_(divisor), inverse_(1.0 / static_cast<double>(divisor)) {}

  int64_t divmod(int64_t x, int64_t* remainder) const {
    if (C10_UNLIKELY(x >= (int64_t{1} << 52))) {
      *remainder = x % divisor_;
      return x / divisor_;
    }
    int64_t q = static_cast<int64_t>(static_cast<double>(x) * inverse_);
    int64_t r = x - q * divisor_;
    if (r < 0) {
      --q;
      r += divisor_;
    } else if (r >= divisor_) {
      ++q;
      r -= divisor_;
    }
    *remainder = r;
    return q;
  }

 private:
  int64_t divisor_;
  double inverse_;
};

// Per-thread scratch of order_bag_by_group.
struct BagOrderScratch {
  std::vector<int64_t> key;
  std::vector<int64_t> group;
  std::vector<int64_t> last;
};

// Bags up to this many lookups are ordered by counting ranks (n^2 compares, branch-free and
// vectorized; a comparison sort of ~45 keys is dominated by mispredicted branches), larger ones by
// std::sort.
constexpr int64_t kRankSortMaxLookups = 96;

// Orders the lookups [lo, hi) of one bag by (group, position), the order of the plan's segments and
// of the lookups within a segment, writing for each rank k in [lo, hi): perm[k] (the lookup),
// group[k] = indices[perm[k]] / last_rows and last[k] = indices[perm[k]] % last_rows. Keys are
// (group << 20 | position): distinct, so a key's rank is its place. Bags of 2^20 or more lookups, or
// groups past 2^43, sort (group, position) pairs instead (never, in practice).
template <typename index_t>
inline void order_bag_by_group(
    const index_t* indices,
    int64_t lo,
    int64_t hi,
    const FastDivmod& divmod,
    int64_t num_groups,
    BagOrderScratch& scratch,
    int64_t* perm,
    int64_t* group,
    int64_t* last) {
  constexpr int kPositionBits = 20;
  const int64_t n = hi - lo;
  bool sorted = true;
  int64_t prev = -1;
  for (int64_t j = lo; j < hi; ++j) {
    const int64_t g = divmod.divmod(static_cast<int64_t>(indices[j]), &last[j]);
    group[j] = g;
    perm[j] = j;
    sorted &= g >= prev;
    prev = g;
  }
  if (sorted) {
    return;
  }
  scratch.group.assign(group + lo, group + hi);
  scratch.last.assign(last + lo, last + hi);
  const int64_t* const g = scratch.group.data();
  const int64_t* const r = scratch.last.data();
  const auto place = [&](int64_t k, int64_t t) {
    perm[lo + k] = lo + t;
    group[lo + k] = g[t];
    last[lo + k] = r[t];
  };
  if (n < (int64_t{1} << kPositionBits) && num_groups < (int64_t{1} << (62 - kPositionBits))) {
    scratch.key.resize(static_cast<size_t>(n));
    int64_t* const key = scratch.key.data();
    for (int64_t t = 0; t < n; ++t) {
      key[t] = (g[t] << kPositionBits) | t;
    }
    if (n <= kRankSortMaxLookups) {
      for (int64_t t = 0; t < n; ++t) {
        const int64_t mine = key[t];
        int64_t below = 0;
        for (int64_t u = 0; u < n; ++u) {
          below += key[u] < mine ? 1 : 0;
        }
        place(below, t);
      }
      return;
    }
    std::sort(key, key + n);
    for (int64_t k = 0; k < n; ++k) {
      place(k, key[k] & ((int64_t{1} << kPositionBits) - 1));
    }
    return;
  }
  std::vector<int64_t> order(static_cast<size_t>(n));
  for (int64_t t = 0; t < n; ++t) {
    order[t] = t;
  }
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return g[a] < g[b] || (g[a] == g[b] && a < b);
  });
  for (int64_t k = 0; k < n; ++k) {
    place(k, order[k]);
  }
}

// Fills the packed plan of a batch (layout: plan_layout.h) at `plan` (PlanLayout::make(nnz,
// batch_size).numel entries). indices / offsets are the raw contiguous CPU data, already validated:
// offsets[0] = 0, offsets[B] = nnz, non-decreasing, indices in [0, num_groups * last_rows).
// Entries past the counts are filled with 0.
template <typename index_t>
void build_group_plan_cpu(
    const index_t* indices,
    const index_t* offsets,
    int64_t batch_size,
    int64_t nnz,
    int64_t last_rows,
    int64_t num_groups,
    int64_t* plan);

// Checks a plan passed to tt_embedding_bag(_backward) against the batch: an int64 CPU tensor of the
// packed size whose header matches (nnz, B, last_rows). Returns it contiguous.
at::Tensor check_plan_cpu(
    const char* op,
    const at::Tensor& plan,
    int64_t nnz,
    int64_t batch_size,
    int64_t last_rows);

// The plan of a validated batch: `plan` when given (checked), else built here.
template <typename index_t>
at::Tensor plan_for_batch_cpu(
    const char* op,
    const std::optional<at::Tensor>& plan,
    const index_t* indices,
    const index_t* offsets,
    int64_t batch_size,
    int64_t nnz,
    int64_t last_rows,
    int64_t num_groups);

} // namespace torchrec_tt::cpu
