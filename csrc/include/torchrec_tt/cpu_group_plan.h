// (bag, group) plan of a batch on CPU: the host-side implementation behind torchrec_tt::group_plan,
// also used directly by the CPU grt kernels (csrc/cpu/tt_embedding_bag_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <algorithm>
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

// All tensors are int64 on CPU. Arrays indexed by segment or slot are sized by the upper bound nnz
// (their first S or U entries are valid); the group_plan op returns the first five of them.
struct GroupPlan {
  int64_t num_segments = 0; // S: distinct (bag, group) pairs
  int64_t num_slots = 0; // U: distinct groups in the batch
  at::Tensor lookup_segment; // [nnz] segment of lookup j
  at::Tensor segment_bag; // [nnz] bag of segment s (non-decreasing)
  at::Tensor segment_group; // [nnz] group of segment s (ascending within a bag)
  at::Tensor segment_slot; // [nnz] slot of segment s
  at::Tensor slot_group; // [nnz] group of slot u (ascending)
  // Kernel-side views of the same plan:
  at::Tensor sorted_lookups; // [nnz] lookups ordered by (bag, group, position j)
  at::Tensor sorted_last; // [nnz] last digit (index % last_rows) of sorted_lookups[k]
  at::Tensor segment_start; // [nnz + 1] segment s = sorted_lookups[segment_start[s], segment_start[s+1])
  at::Tensor bag_segment_start; // [B + 1] bag b = segments [bag_segment_start[b], bag_segment_start[b+1])
};

// Builds the plan for a batch. indices / offsets are the raw contiguous CPU data (already
// validated: offsets[0] = 0, offsets[B] = nnz, non-decreasing, indices in [0, num_groups * last_rows)).
// Entries past the counts are filled with 0.
template <typename index_t>
GroupPlan build_group_plan_cpu(
    const index_t* indices,
    const index_t* offsets,
    int64_t batch_size,
    int64_t nnz,
    int64_t last_rows,
    int64_t num_groups);

} // namespace torchrec_tt::cpu
