// Layout of the packed (bag, group) plan of a batch: one int64 tensor, built once per batch by
// torchrec_tt::group_plan and read by the forward and backward ops of both devices (the autograd
// wrapper saves it for backward, so backward never rebuilds it). docs/design.md section 3.
//
// Plain C++ only (no ATen/c10) so that CUDA kernel headers can use it. torchrec_tt/grouping.py
// (PLAN_FIELDS) mirrors the field order for the Python view; a test checks that they agree.
//
// With L = nnz (lookups) and B = bags, every field has a size fixed by (L, B), so the plan's size is
// known without reading values (no host sync on CUDA; static shapes for fake kernels). Fields
// indexed by segment or slot are sized by the upper bound L; their first S / U entries are valid.
//
//   header             [kHeaderSize]  S (segments), U (slots), L, B, last_rows, K (cache rows the
//                                     plan was built with, 0: none), H (cache hits), then 0s
//   lookup_segment     [L]      segment of lookup j
//   sorted_lookup      [L]      lookups ordered by (bag, group, j): segment s holds
//                               sorted_lookup[segment_start[s] .. segment_start[s + 1])
//   sorted_last        [L]      last digit (index % last_rows) of sorted_lookup[k]
//   segment_start      [L + 1]
//   segment_bag        [L]      bag of segment s (non-decreasing)
//   segment_group      [L]      group of segment s (ascending within a bag)
//   segment_slot       [L]      slot of segment s
//   bag_segment_start  [B + 1]  bag b owns segments [bag_segment_start[b], bag_segment_start[b + 1])
//   slot_group         [L]      group of slot u (ascending)
//   slot_segment_start [L + 1]  slot u is used by slot_segment[slot_segment_start[u] .. [u + 1])
//   slot_segment       [L]      segments bucketed by slot, ascending segment id within a slot
//   bag_hits           [B]      bag b's cached lookups: the last bag_hits[b] of its sorted lookups
//                               (0 in a plan without a cache)
//
// Hot-row cache (a plan built with cache_ids; docs/design.md section 10): a bag's cached lookups
// form one extra segment, the bag's last, with segment_group = kCacheGroup and no slot (it is in no
// slot's list); its sorted_last entries hold the lookups' cache slots instead of last digits. A bag's
// lookups fill [offsets[b], offsets[b + 1]) of the sorted fields, so its cache segment is the last
// bag_hits[b] of them: found from the offsets and bag_hits alone, which the backward's cache gradient
// reads in bag order without the segment fields (cold by then).
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TORCHREC_TT_PLAN_HD __host__ __device__
#else
#define TORCHREC_TT_PLAN_HD
#endif

namespace torchrec_tt {

enum class PlanHeader : int64_t {
  kNumSegments = 0,
  kNumSlots = 1,
  kNumLookups = 2,
  kNumBags = 3,
  kLastRows = 4,
  kCacheRows = 5,
  kNumHits = 6,
};

// segment_group (and segment_slot) of a bag's cache segment: the lookups served by the hot-row cache.
constexpr int64_t kCacheGroup = -1;
constexpr int64_t kPlanHeaderSize = 8;

// Field offsets (in int64 elements) within the packed plan of a batch of L lookups and B bags.
struct PlanLayout {
  int64_t lookup_segment = 0;
  int64_t sorted_lookup = 0;
  int64_t sorted_last = 0;
  int64_t segment_start = 0;
  int64_t segment_bag = 0;
  int64_t segment_group = 0;
  int64_t segment_slot = 0;
  int64_t bag_segment_start = 0;
  int64_t slot_group = 0;
  int64_t slot_segment_start = 0;
  int64_t slot_segment = 0;
  int64_t bag_hits = 0;
  int64_t numel = 0; // total size of the plan tensor

  TORCHREC_TT_PLAN_HD static PlanLayout make(int64_t nnz, int64_t batch_size) {
    PlanLayout p;
    int64_t at = kPlanHeaderSize;
    p.lookup_segment = at, at += nnz;
    p.sorted_lookup = at, at += nnz;
    p.sorted_last = at, at += nnz;
    p.segment_start = at, at += nnz + 1;
    p.segment_bag = at, at += nnz;
    p.segment_group = at, at += nnz;
    p.segment_slot = at, at += nnz;
    p.bag_segment_start = at, at += batch_size + 1;
    p.slot_group = at, at += nnz;
    p.slot_segment_start = at, at += nnz + 1;
    p.slot_segment = at, at += nnz;
    p.bag_hits = at, at += batch_size;
    p.numel = at;
    return p;
  }
};

// Raw pointers into one packed plan (host or device memory).
template <typename T>
struct PlanView {
  T* header;
  T* lookup_segment;
  T* sorted_lookup;
  T* sorted_last;
  T* segment_start;
  T* segment_bag;
  T* segment_group;
  T* segment_slot;
  T* bag_segment_start;
  T* slot_group;
  T* slot_segment_start;
  T* slot_segment;
  T* bag_hits;

  TORCHREC_TT_PLAN_HD static PlanView make(T* base, int64_t nnz, int64_t batch_size) {
    const PlanLayout p = PlanLayout::make(nnz, batch_size);
    return PlanView{
        base,
        base + p.lookup_segment,
        base + p.sorted_lookup,
        base + p.sorted_last,
        base + p.segment_start,
        base + p.segment_bag,
        base + p.segment_group,
        base + p.segment_slot,
        base + p.bag_segment_start,
        base + p.slot_group,
        base + p.slot_segment_start,
        base + p.slot_segment,
        base + p.bag_hits};
  }
};

} // namespace torchrec_tt
