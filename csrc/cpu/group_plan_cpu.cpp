// CPU implementation of torchrec_tt::group_plan: groups the lookups of a batch by (bag, group).
//
//   segments = distinct (bag, group) pairs, ordered by (bag asc, group asc)
//   slots    = distinct groups of the batch, ascending
//
// Two parallel passes over bags (sort each bag's lookups by group and count its segments; then
// number the segments) around a prefix sum, then a slot pass (a dense marker array when the group
// range is small compared with the batch, sort + unique otherwise).

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#include "torchrec_tt/checks.h"
#include "torchrec_tt/cpu_group_plan.h"
#include "torchrec_tt/dispatch.h"

namespace torchrec_tt::cpu {

namespace {

constexpr int64_t kBagGrain = 64;
constexpr int64_t kSegmentGrain = 16384;

void zero_tail(at::Tensor& t, int64_t from) {
  int64_t* p = t.data_ptr<int64_t>();
  std::fill(p + from, p + t.numel(), int64_t{0});
}

} // namespace

template <typename index_t>
GroupPlan build_group_plan_cpu(
    const index_t* indices,
    const index_t* offsets,
    int64_t batch_size,
    int64_t nnz,
    int64_t last_rows,
    int64_t num_groups) {
  const auto opts = at::TensorOptions().dtype(at::kLong).device(at::kCPU);
  GroupPlan plan;
  plan.lookup_segment = at::empty({nnz}, opts);
  plan.segment_bag = at::empty({nnz}, opts);
  plan.segment_group = at::empty({nnz}, opts);
  plan.segment_slot = at::empty({nnz}, opts);
  plan.slot_group = at::empty({nnz}, opts);
  plan.sorted_lookups = at::empty({nnz}, opts);
  plan.sorted_last = at::empty({nnz}, opts);
  plan.segment_start = at::empty({nnz + 1}, opts);
  plan.bag_segment_start = at::empty({batch_size + 1}, opts);
  at::Tensor sorted_groups = at::empty({nnz}, opts);

  int64_t* const perm = plan.sorted_lookups.data_ptr<int64_t>();
  int64_t* const slast = plan.sorted_last.data_ptr<int64_t>();
  int64_t* const sgroup = sorted_groups.data_ptr<int64_t>();
  int64_t* const bag_seg = plan.bag_segment_start.data_ptr<int64_t>();
  int64_t* const lookup_seg = plan.lookup_segment.data_ptr<int64_t>();
  int64_t* const seg_bag = plan.segment_bag.data_ptr<int64_t>();
  int64_t* const seg_group = plan.segment_group.data_ptr<int64_t>();
  int64_t* const seg_slot = plan.segment_slot.data_ptr<int64_t>();
  int64_t* const seg_start = plan.segment_start.data_ptr<int64_t>();
  int64_t* const slot_group = plan.slot_group.data_ptr<int64_t>();

  // Pass 1: order each bag's lookups by (group, j); bag_seg[b + 1] = number of distinct groups.
  const FastDivmod divmod(last_rows);
  at::parallel_for(0, batch_size, kBagGrain, [&](int64_t b_begin, int64_t b_end) {
    std::vector<BagLookup> keys;
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t lo = static_cast<int64_t>(offsets[b]);
      const int64_t hi = static_cast<int64_t>(offsets[b + 1]);
      sort_bag_by_group(indices, lo, hi, divmod, keys);
      int64_t count = 0;
      for (int64_t k = 0; k < hi - lo; ++k) {
        perm[lo + k] = keys[k].lookup;
        sgroup[lo + k] = keys[k].group;
        slast[lo + k] = keys[k].last;
        count += (k == 0 || keys[k].group != keys[k - 1].group) ? 1 : 0;
      }
      bag_seg[b + 1] = count;
    }
  });
  bag_seg[0] = 0;
  for (int64_t b = 0; b < batch_size; ++b) {
    bag_seg[b + 1] += bag_seg[b];
  }
  const int64_t S = bag_seg[batch_size];

  // Pass 2: number the segments.
  at::parallel_for(0, batch_size, kBagGrain, [&](int64_t b_begin, int64_t b_end) {
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t lo = static_cast<int64_t>(offsets[b]);
      const int64_t hi = static_cast<int64_t>(offsets[b + 1]);
      int64_t s = bag_seg[b] - 1;
      for (int64_t k = lo; k < hi; ++k) {
        if (k == lo || sgroup[k] != sgroup[k - 1]) {
          ++s;
          seg_bag[s] = b;
          seg_group[s] = sgroup[k];
          seg_start[s] = k;
        }
        lookup_seg[perm[k]] = s;
      }
    }
  });
  seg_start[S] = nnz;

  // Slots: distinct groups, ascending.
  int64_t U = 0;
  if (num_groups <= 8 * S + 4096) {
    std::vector<int64_t> slot_of(static_cast<size_t>(num_groups), 0);
    for (int64_t s = 0; s < S; ++s) {
      slot_of[seg_group[s]] = 1;
    }
    for (int64_t g = 0; g < num_groups; ++g) {
      if (slot_of[g] != 0) {
        slot_group[U] = g;
        slot_of[g] = U++;
      }
    }
    for (int64_t s = 0; s < S; ++s) {
      seg_slot[s] = slot_of[seg_group[s]];
    }
  } else {
    std::vector<int64_t> groups(seg_group, seg_group + S);
    std::sort(groups.begin(), groups.end());
    groups.erase(std::unique(groups.begin(), groups.end()), groups.end());
    U = static_cast<int64_t>(groups.size());
    std::copy(groups.begin(), groups.end(), slot_group);
    at::parallel_for(0, S, kSegmentGrain, [&](int64_t s_begin, int64_t s_end) {
      for (int64_t s = s_begin; s < s_end; ++s) {
        seg_slot[s] = std::lower_bound(groups.begin(), groups.end(), seg_group[s]) - groups.begin();
      }
    });
  }
  plan.num_segments = S;
  plan.num_slots = U;

  zero_tail(plan.segment_bag, S);
  zero_tail(plan.segment_group, S);
  zero_tail(plan.segment_slot, S);
  zero_tail(plan.slot_group, U);
  return plan;
}

template GroupPlan build_group_plan_cpu<int32_t>(
    const int32_t*, const int32_t*, int64_t, int64_t, int64_t, int64_t);
template GroupPlan build_group_plan_cpu<int64_t>(
    const int64_t*, const int64_t*, int64_t, int64_t, int64_t, int64_t);

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_plan_cpu(
    const at::Tensor& indices_in,
    const at::Tensor& offsets_in,
    int64_t last_rows) {
  constexpr const char* op = "group_plan";
  check_indices_offsets(op, indices_in, offsets_in, indices_in.device());
  TORCH_CHECK(indices_in.is_cpu(), op, ": expected CPU tensors, got indices on ", indices_in.device());
  TORCH_CHECK(last_rows >= 1, op, ": last_rows must be >= 1, got ", last_rows);
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const int64_t nnz = indices.numel();
  const int64_t batch_size = offsets.numel() - 1;

  GroupPlan plan;
  TORCHREC_TT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "group_plan_cpu", [&] {
    const index_t* idx = indices.data_ptr<index_t>();
    const index_t* off = offsets.data_ptr<index_t>();
    check_offsets_values_cpu(op, off, batch_size, nnz);
    check_indices_range_cpu(op, idx, nnz, /*num_rows=*/-1);
    int64_t max_index = -1;
    for (int64_t j = 0; j < nnz; ++j) {
      max_index = std::max<int64_t>(max_index, static_cast<int64_t>(idx[j]));
    }
    const int64_t num_groups = max_index < 0 ? 0 : max_index / last_rows + 1;
    plan = build_group_plan_cpu<index_t>(idx, off, batch_size, nnz, last_rows, num_groups);
  });
  at::Tensor counts = at::empty({2}, indices.options().dtype(at::kLong));
  counts.data_ptr<int64_t>()[0] = plan.num_segments;
  counts.data_ptr<int64_t>()[1] = plan.num_slots;
  return {
      plan.lookup_segment,
      plan.segment_bag,
      plan.segment_group,
      plan.segment_slot,
      plan.slot_group,
      counts};
}

} // namespace

} // namespace torchrec_tt::cpu

TORCH_LIBRARY_IMPL(torchrec_tt, CPU, m) {
  m.impl("group_plan", &torchrec_tt::cpu::group_plan_cpu);
}
