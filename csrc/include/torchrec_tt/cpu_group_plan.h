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

// A lookup of a bag with its TT split: group = index / last_rows, last = index % last_rows.
struct BagLookup {
  int64_t group;
  int64_t last;
  int64_t lookup; // position j in indices
};

// keys = the lookups [lo, hi) of one bag ordered by (group, position): the order of the plan's
// segments and of the lookups within a segment.
template <typename index_t>
inline void sort_bag_by_group(
    const index_t* indices,
    int64_t lo,
    int64_t hi,
    const FastDivmod& divmod,
    std::vector<BagLookup>& keys) {
  keys.clear();
  bool sorted = true;
  int64_t prev = -1;
  for (int64_t j = lo; j < hi; ++j) {
    int64_t last = 0;
    const int64_t group = divmod.divmod(static_cast<int64_t>(indices[j]), &last);
    sorted &= group >= prev;
    prev = group;
    keys.push_back({group, last, j});
  }
  if (!sorted) {
    std::sort(keys.begin(), keys.end(), [](const BagLookup& a, const BagLookup& b) {
      return a.group < b.group || (a.group == b.group && a.lookup < b.lookup);
    });
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
