// CPU grouping of a batch: torchrec_tt::group_plan, which groups the lookups by (bag, group) into
// the packed plan of plan_layout.h, and the two lighter groupings of the forward without a plan
// (docs/design.md section 3.4): the batch's distinct rows, and its lookups sorted by group.
//
//   segments = distinct (bag, group) pairs, ordered by (bag asc, group asc)
//   slots    = distinct groups of the batch, ascending
//
// Two parallel passes over bags (sort each bag's lookups by group and count its segments; then
// number the segments) around a prefix sum, then a slot pass (a dense marker array when the group
// range is small compared with the batch, sort + unique otherwise) and a counting sort of the
// segments by slot (the order the grt kernels walk them in).

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#include "cpu_scratch.h"
#include "cpu_threads.h"
#include "torchrec_tt/checks.h"
#include "torchrec_tt/cpu_group_plan.h"
#include "torchrec_tt/dispatch.h"
#include "torchrec_tt/plan_layout.h"

namespace torchrec_tt::cpu {

namespace {

constexpr int64_t kBagGrain = 64;
constexpr int64_t kSegmentGrain = 16384;

// distinct_rows_cpu's row marks: one byte per row and marking thread.
constexpr uint8_t kRowUsed = 1;
constexpr uint8_t kRowCached = 2; // used, and in the cache
// Lookups per marking thread at least, and the marks' bytes per lookup at most.
constexpr int64_t kRowMarkGrain = 4096;
constexpr int64_t kRowMarkBytesPerLookup = 4;
// Rows numbered per step: the marks of kMaskLanes rows as one 64-bit word, bit 0 of each byte
// (kRowUsed, and not kRowCached) gathered into a mask by one multiplication (bit i of the top byte
// is byte i's bit 0).
constexpr int64_t kMaskLanes = 8;
constexpr uint64_t kRowUsedLanes = 0x0101010101010101ULL;
constexpr uint64_t kLaneBitsToMask = 0x0102040810204080ULL;

// Per 8-bit mask: below[m][i], its set bits below bit i; set[m][k], the position of its k-th set bit
// (0 past the last).
struct MaskTables {
  uint8_t below[256][kMaskLanes] = {};
  uint8_t set[256][kMaskLanes] = {};
  constexpr MaskTables() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int i = 0; i < kMaskLanes; ++i) {
        below[m][i] = static_cast<uint8_t>(k);
        if ((m >> i) & 1) {
          set[m][k++] = static_cast<uint8_t>(i);
        }
      }
    }
  }
};
constexpr MaskTables kMaskTables{};

} // namespace

template <typename index_t>
void build_group_plan_cpu(
    const index_t* indices,
    const index_t* offsets,
    int64_t batch_size,
    int64_t nnz,
    int64_t last_rows,
    int64_t num_groups,
    const PlanCache& cache,
    int64_t* plan_data) {
  const PlanLayout layout = PlanLayout::make(nnz, batch_size);
  std::fill(plan_data, plan_data + kPlanHeaderSize, int64_t{0});
  const PlanView<int64_t> plan = PlanView<int64_t>::make(plan_data, nnz, batch_size);
  // Each lookup's group in plan order (a cached lookup's is not written).
  int64_t* const sgroup = arena<int64_t>(Arena::kPlanSortedGroups, nnz);
  int64_t* const bag_hits = plan.bag_hits;

  int64_t* const perm = plan.sorted_lookup;
  int64_t* const slast = plan.sorted_last;
  int64_t* const bag_seg = plan.bag_segment_start;
  int64_t* const lookup_seg = plan.lookup_segment;
  int64_t* const seg_bag = plan.segment_bag;
  int64_t* const seg_group = plan.segment_group;
  int64_t* const seg_slot = plan.segment_slot;
  int64_t* const seg_start = plan.segment_start;
  int64_t* const slot_group = plan.slot_group;

  // Pass 1: order each bag's lookups by (group, j); bag_seg[b + 1] = number of distinct groups.
  const FastDivmod divmod(last_rows);
  at::parallel_for(0, batch_size, kBagGrain, [=, &divmod, &cache](int64_t b_begin, int64_t b_end) {
    BagOrderScratch scratch;
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t lo = static_cast<int64_t>(offsets[b]);
      const int64_t hi = static_cast<int64_t>(offsets[b + 1]);
      const int64_t hits = order_bag_by_group(indices, cache, lo, hi, divmod, num_groups, scratch, perm, sgroup, slast);
      // The groups of the uncached lookups, and the cache segment.
      int64_t count = hits > 0 ? 1 : 0;
      for (int64_t k = lo; k < hi - hits; ++k) {
        count += (k == lo || sgroup[k] != sgroup[k - 1]) ? 1 : 0;
      }
      bag_seg[b + 1] = count;
      bag_hits[b] = hits;
    }
  });
  bag_seg[0] = 0;
  for (int64_t b = 0; b < batch_size; ++b) {
    bag_seg[b + 1] += bag_seg[b];
  }
  const int64_t S = bag_seg[batch_size];

  // Pass 2: number the segments (a bag's cached lookups form its last segment, the cache segment).
  // Captures by value: by reference, every store made the compiler reload the array pointers.
  // Without a branch: every uncached lookup writes its segment's bag and group, and the start of
  // the segment after it (the last write wins: its end; a bag's first segment starts where the
  // previous bag's last one ends, written by whichever worker has that bag). A new segment at 60 %
  // of the MovieLens history lookups made the branch mispredict: 357 -> 314 us per group_plan
  // call, one thread.
  at::parallel_for(0, batch_size, kBagGrain, [=](int64_t b_begin, int64_t b_end) {
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t lo = static_cast<int64_t>(offsets[b]);
      const int64_t hi = static_cast<int64_t>(offsets[b + 1]);
      const int64_t ranked_end = hi - bag_hits[b];
      int64_t s = bag_seg[b] - 1;
      int64_t prev = -1;
      for (int64_t k = lo; k < ranked_end; ++k) {
        const int64_t g = sgroup[k];
        s += g != prev ? 1 : 0;
        prev = g;
        seg_bag[s] = b;
        seg_group[s] = g;
        seg_start[s + 1] = k + 1;
        lookup_seg[perm[k]] = s;
      }
      // The cache segment: its fields written once, not per hit, and its hits' groups neither
      // written nor read. Per hit the fields cost as much as an uncached lookup's: the cached plan
      // of a MovieLens history batch (1 % cache, 25 % hits, one thread, timed alone, in-process
      // alternation, five runs each) took a median 0.9 % longer than the uncached one before, and
      // 4.5 % less after (the 5,600 hits 23 and 19 % on top of the plan of the misses alone).
      if (ranked_end < hi) {
        ++s;
        seg_bag[s] = b;
        seg_group[s] = kCacheGroup;
        seg_start[s + 1] = hi;
        for (int64_t k = ranked_end; k < hi; ++k) {
          lookup_seg[perm[k]] = s;
        }
      }
    }
  });
  seg_start[0] = 0;
  seg_start[S] = nnz;
  // Hits and cache segments (each bag's last, if any).
  int64_t num_hits = 0;
  int64_t num_cache_segments = 0;
  for (int64_t b = 0; cache.has_slots() && b < batch_size; ++b) {
    num_hits += bag_hits[b];
    num_cache_segments += bag_hits[b] > 0 ? 1 : 0;
  }

  // Slots: distinct groups, ascending (cache segments have none: kCacheGroup).
  int64_t U = 0;
  if (num_groups <= 8 * S + 4096) {
    std::vector<int64_t> slot_of(static_cast<size_t>(num_groups), 0);
    for (int64_t s = 0; s < S; ++s) {
      if (seg_group[s] != kCacheGroup) {
        slot_of[seg_group[s]] = 1;
      }
    }
    for (int64_t g = 0; g < num_groups; ++g) {
      if (slot_of[g] != 0) {
        slot_group[U] = g;
        slot_of[g] = U++;
      }
    }
    for (int64_t s = 0; s < S; ++s) {
      seg_slot[s] = seg_group[s] == kCacheGroup ? kCacheGroup : slot_of[seg_group[s]];
    }
  } else {
    std::vector<int64_t> groups;
    groups.reserve(static_cast<size_t>(S));
    for (int64_t s = 0; s < S; ++s) {
      if (seg_group[s] != kCacheGroup) {
        groups.push_back(seg_group[s]);
      }
    }
    std::sort(groups.begin(), groups.end());
    groups.erase(std::unique(groups.begin(), groups.end()), groups.end());
    U = static_cast<int64_t>(groups.size());
    std::copy(groups.begin(), groups.end(), slot_group);
    at::parallel_for(0, S, kSegmentGrain, [&](int64_t s_begin, int64_t s_end) {
      for (int64_t s = s_begin; s < s_end; ++s) {
        seg_slot[s] = seg_group[s] == kCacheGroup
            ? kCacheGroup
            : std::lower_bound(groups.begin(), groups.end(), seg_group[s]) - groups.begin();
      }
    });
  }

  // Segments bucketed by slot: a counting sort (ascending segment id within a slot) over contiguous
  // ranges of segments, each with its own histogram, so that the scatter (random writes, the
  // costliest step on large batches) runs on every thread.
  int64_t* const slot_start = plan.slot_segment_start;
  const int64_t ranges = std::max<int64_t>(1, std::min<int64_t>(available_threads(), S / kSegmentGrain));
  std::vector<int64_t> cursor(static_cast<size_t>(ranges * U), 0); // [range][slot]
  const auto range_begin = [&](int64_t r) { return S * r / ranges; };
  at::parallel_for(0, ranges, 1, [&](int64_t r_begin, int64_t r_end) {
    for (int64_t r = r_begin; r < r_end; ++r) {
      int64_t* count = cursor.data() + r * U;
      // Bounds hoisted: the writes through count may alias what range_begin reads, so the compiler
      // re-evaluated its 64-bit division every iteration.
      const int64_t s_end = range_begin(r + 1);
      for (int64_t s = range_begin(r); s < s_end; ++s) {
        if (seg_slot[s] != kCacheGroup) {
          ++count[seg_slot[s]];
        }
      }
    }
  });
  int64_t running = 0;
  for (int64_t u = 0; u < U; ++u) {
    slot_start[u] = running;
    for (int64_t r = 0; r < ranges; ++r) {
      const int64_t count = cursor[r * U + u];
      cursor[r * U + u] = running;
      running += count;
    }
  }
  const int64_t slotted = S - num_cache_segments;
  slot_start[U] = slotted;
  at::parallel_for(0, ranges, 1, [&](int64_t r_begin, int64_t r_end) {
    for (int64_t r = r_begin; r < r_end; ++r) {
      int64_t* next = cursor.data() + r * U;
      const int64_t s_end = range_begin(r + 1);
      for (int64_t s = range_begin(r); s < s_end; ++s) {
        if (seg_slot[s] != kCacheGroup) {
          plan.slot_segment[next[seg_slot[s]]++] = s;
        }
      }
    }
  });

  // Deterministic contents past the counts.
  std::fill(seg_start + S + 1, seg_start + nnz + 1, int64_t{nnz});
  std::fill(seg_bag + S, seg_bag + nnz, int64_t{0});
  std::fill(seg_group + S, seg_group + nnz, int64_t{0});
  std::fill(seg_slot + S, seg_slot + nnz, int64_t{0});
  std::fill(slot_group + U, slot_group + nnz, int64_t{0});
  std::fill(slot_start + U + 1, slot_start + nnz + 1, slotted);
  std::fill(plan.slot_segment + slotted, plan.slot_segment + nnz, int64_t{0});

  plan.header[static_cast<int64_t>(PlanHeader::kNumSegments)] = S;
  plan.header[static_cast<int64_t>(PlanHeader::kNumSlots)] = U;
  plan.header[static_cast<int64_t>(PlanHeader::kNumLookups)] = nnz;
  plan.header[static_cast<int64_t>(PlanHeader::kNumBags)] = batch_size;
  plan.header[static_cast<int64_t>(PlanHeader::kLastRows)] = last_rows;
  plan.header[static_cast<int64_t>(PlanHeader::kCacheRows)] = cache.rows;
  plan.header[static_cast<int64_t>(PlanHeader::kNumHits)] = num_hits;
  (void)layout;
}

template void build_group_plan_cpu<int32_t>(
    const int32_t*, const int32_t*, int64_t, int64_t, int64_t, int64_t, const PlanCache&, int64_t*);
template void build_group_plan_cpu<int64_t>(
    const int64_t*, const int64_t*, int64_t, int64_t, int64_t, int64_t, const PlanCache&, int64_t*);

template <typename index_t>
DistinctRows distinct_rows_cpu(
    const index_t* indices,
    const index_t* offsets,
    const int64_t* cache_ids,
    int64_t cache_rows,
    int64_t batch_size,
    int64_t nnz,
    int64_t num_rows,
    int64_t last_rows) {
  RECORD_FUNCTION("torchrec_tt::grt::distinct_rows", std::vector<c10::IValue>());
  DistinctRows rows;
  // The used rows, marked by `parts` threads over contiguous ranges of lookups, each into its own
  // byte per row (marks + p * num_rows, folded into the first part's below), so that no line moves
  // between the cores while they mark (one shared map, split by row range, took 215-290 us instead
  // of 72-81 on the paper table). A part per thread while that costs at most
  // kRowMarkBytesPerLookup bytes per lookup. Captured by value: the byte stores may alias
  // anything, and through references the compiler reloaded every pointer after each store.
  const int64_t parts = std::max<int64_t>(
      1, std::min<int64_t>({available_threads(), nnz / kRowMarkGrain, kRowMarkBytesPerLookup * nnz / num_rows}));
  uint8_t* const marks = arena<uint8_t>(Arena::kRowMarks, parts * num_rows + kMaskLanes);
  at::parallel_for(0, parts, 1, [=](int64_t p_begin, int64_t p_end) {
    for (int64_t p = p_begin; p < p_end; ++p) {
      uint8_t* const mark = marks + p * num_rows;
      std::memset(mark, 0, static_cast<size_t>(num_rows));
      const int64_t j_end = nnz * (p + 1) / parts;
      for (int64_t j = nnz * p / parts; j < j_end; ++j) {
        mark[static_cast<int64_t>(indices[j])] = kRowUsed;
      }
    }
  });
  for (int64_t q = 1; q < parts; ++q) {
    const uint8_t* const other = marks + q * num_rows;
    for (int64_t r = 0; r < num_rows; ++r) {
      marks[r] |= other[r];
    }
  }
  // The used cached rows: the cache is matched per distinct row, O(K), where a per-lookup slot test
  // cost as much as the marking itself.
  for (int64_t s = 0; s < cache_rows && cache_ids[s] < num_rows; ++s) {
    uint8_t& mark = marks[cache_ids[s]];
    mark = mark != 0 ? kRowCached : 0;
  }
  // The (bag, group) segment count of the uncached lookups, estimated from a sample of about
  // kSampledBags evenly spaced bags (exact up to that many bags): the kernel only compares it with
  // the row count to pick a path, and counting every bag's groups cost twice the marking above
  // (paper table: 0.17 ms). A group's stamp is the last sampled bag that touched it.
  constexpr int64_t kSampledBags = 64;
  const FastDivmod divmod(last_rows);
  const int64_t num_groups = (num_rows + last_rows - 1) / last_rows;
  std::vector<int64_t> stamp(static_cast<size_t>(num_groups), -1);
  const int64_t stride = std::max<int64_t>(1, batch_size / kSampledBags);
  int64_t sampled_segments = 0;
  int64_t sampled_lookups = 0;
  for (int64_t b = 0; b < batch_size; b += stride) {
    const int64_t j0 = static_cast<int64_t>(offsets[b]);
    const int64_t j1 = static_cast<int64_t>(offsets[b + 1]);
    sampled_lookups += j1 - j0;
    // Without a branch on hits (a quarter of the MovieLens history lookups with a 1 % cache, at
    // random): a hit leaves its group's stamp as it was and counts nothing.
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t r = static_cast<int64_t>(indices[j]);
      const bool miss = marks[r] != kRowCached;
      int64_t rem;
      const int64_t g = divmod.divmod(r, &rem);
      const int64_t last = stamp[g];
      sampled_segments += (miss && last != b) ? 1 : 0;
      stamp[g] = miss ? b : last;
    }
  }
  rows.num_segments = sampled_lookups == 0
      ? 0
      : static_cast<int64_t>(static_cast<double>(sampled_segments) * nnz / sampled_lookups);
  // Number the used uncached rows in row order, kMaskLanes rows at a time without a branch: their
  // marks as a bit mask, whose tables give each row's number (the count so far plus the used rows
  // below it in the block) and the used rows' offsets in the block. Every row's id and the
  // kMaskLanes entries of row[] from the count on are written; only the used rows keep theirs. (A
  // loop over single rows carried the count from row to row: 27 us on the paper table's 23,100.)
  rows.id.resize(static_cast<size_t>(num_rows));
  int32_t* const id = rows.id.data();
  rows.row.resize(static_cast<size_t>(std::min(nnz, num_rows) + kMaskLanes));
  int64_t* const row = rows.row.data();
  int64_t count = 0;
  for (int64_t r = 0; r < num_rows; r += kMaskLanes) {
    // The last block's bytes past num_rows (padding, or the next part's marks) are masked off.
    uint64_t block;
    std::memcpy(&block, marks + r, sizeof(block));
    if (r + kMaskLanes > num_rows) {
      block &= (uint64_t{1} << (8 * (num_rows - r))) - 1;
    }
    const unsigned used = static_cast<unsigned>(((block & kRowUsedLanes) * kLaneBitsToMask) >> 56);
    const uint8_t* const below = kMaskTables.below[used];
    const uint8_t* const set = kMaskTables.set[used];
    const int64_t lanes = std::min<int64_t>(kMaskLanes, num_rows - r);
    for (int64_t i = 0; i < lanes; ++i) {
      id[r + i] = static_cast<int32_t>(count + below[i]);
    }
    for (int64_t i = 0; i < kMaskLanes; ++i) {
      row[count + i] = r + set[i];
    }
    count += below[kMaskLanes - 1] + (used >> (kMaskLanes - 1));
  }
  rows.row.resize(static_cast<size_t>(count));
  // The groups with a used uncached row: group g's rows are numbered from id[g * last_rows] on.
  for (int64_t g = 0; g < num_groups; ++g) {
    const int64_t first = id[g * last_rows];
    const int64_t end = (g + 1) * last_rows < num_rows ? id[(g + 1) * last_rows] : count;
    if (end > first) {
      rows.group.push_back(g);
      rows.group_row_start.push_back(first);
    }
  }
  rows.group_row_start.push_back(count);
  // The used cached rows after them, in slot order.
  for (int64_t s = 0; s < cache_rows && cache_ids[s] < num_rows; ++s) {
    if (marks[cache_ids[s]] == kRowCached) {
      id[cache_ids[s]] = static_cast<int32_t>(count + static_cast<int64_t>(rows.cached_slot.size()));
      rows.cached_slot.push_back(static_cast<int32_t>(s));
    }
  }
  return rows;
}

template DistinctRows distinct_rows_cpu<int32_t>(
    const int32_t*, const int32_t*, const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t);
template DistinctRows distinct_rows_cpu<int64_t>(
    const int64_t*, const int64_t*, const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t);

template <typename index_t>
LookupsByGroup lookups_by_group_cpu(
    const index_t* indices,
    const index_t* offsets,
    const int32_t* cache_slot,
    int64_t batch_size,
    int64_t nnz,
    int64_t last_rows,
    int64_t num_groups) {
  RECORD_FUNCTION("torchrec_tt::grt::lookups_by_group", std::vector<c10::IValue>());
  // Records in lookup order (a cached lookup takes group num_groups, after every real one), then
  // a least-significant-digit radix sort on the group, 8 bits per pass: each pass writes 256
  // sequential streams per worker, where a one-pass counting sort over the table's groups would
  // scatter every record to a random line (docs/design.md section 3.4).
  GroupedLookup* const records = arena<GroupedLookup>(Arena::kGroupedLookups, nnz);
  GroupedLookup* const swap = arena<GroupedLookup>(Arena::kGroupedLookupsSwap, nnz);
  const FastDivmod divmod(last_rows);
  at::parallel_for(0, batch_size, kBagGrain, [&](int64_t b_begin, int64_t b_end) {
    for (int64_t b = b_begin; b < b_end; ++b) {
      for (int64_t j = static_cast<int64_t>(offsets[b]); j < static_cast<int64_t>(offsets[b + 1]); ++j) {
        int64_t rem;
        const int64_t g = divmod.divmod(static_cast<int64_t>(indices[j]), &rem);
        const bool cached = cache_slot != nullptr && cache_slot[j] >= 0;
        records[j] = {
            static_cast<int32_t>(cached ? num_groups : g), static_cast<int32_t>(b), static_cast<int32_t>(rem),
            static_cast<int32_t>(j)};
      }
    }
  });
  constexpr int kDigitBits = 8;
  constexpr int64_t kBuckets = int64_t{1} << kDigitBits;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(available_threads(), nnz / kSegmentGrain));
  // [part][digit]: each worker's counters on its own cache lines (a [digit][part] layout put both
  // workers' counters of a digit on one line: 23.8 instead of ~2.5 ms for the 10M table's passes).
  std::vector<int64_t> next(static_cast<size_t>(kBuckets * parts));
  GroupedLookup* src = records;
  GroupedLookup* dst = swap;
  for (int shift = 0; (num_groups >> shift) > 0; shift += kDigitBits) {
    const auto digit = [shift](const GroupedLookup& r) {
      return (static_cast<uint32_t>(r.group) >> shift) & (kBuckets - 1);
    };
    std::fill(next.begin(), next.end(), int64_t{0});
    at::parallel_for(0, parts, 1, [&](int64_t p_begin, int64_t p_end) {
      for (int64_t p = p_begin; p < p_end; ++p) {
        for (int64_t k = nnz * p / parts, k_end = nnz * (p + 1) / parts; k < k_end; ++k) {
          ++next[p * kBuckets + digit(src[k])];
        }
      }
    });
    for (int64_t d = 0, running = 0; d < kBuckets; ++d) { // digit-major: stable across workers
      for (int64_t p = 0; p < parts; ++p) {
        const int64_t count = next[p * kBuckets + d];
        next[p * kBuckets + d] = running;
        running += count;
      }
    }
    at::parallel_for(0, parts, 1, [&](int64_t p_begin, int64_t p_end) {
      for (int64_t p = p_begin; p < p_end; ++p) {
        for (int64_t k = nnz * p / parts, k_end = nnz * (p + 1) / parts; k < k_end; ++k) {
          dst[next[p * kBuckets + digit(src[k])]++] = src[k];
        }
      }
    });
    std::swap(src, dst);
  }
  LookupsByGroup out;
  int64_t n = 0;
  for (; n < nnz && src[n].group < num_groups; ++n) {
    if (n == 0 || src[n].group != src[n - 1].group) {
      out.group.push_back(src[n].group);
      out.start.push_back(n);
    }
  }
  out.start.push_back(n);
  out.lookups = src;
  return out;
}

template LookupsByGroup lookups_by_group_cpu<int32_t>(
    const int32_t*, const int32_t*, const int32_t*, int64_t, int64_t, int64_t, int64_t);
template LookupsByGroup lookups_by_group_cpu<int64_t>(
    const int64_t*, const int64_t*, const int32_t*, int64_t, int64_t, int64_t, int64_t);

std::vector<int32_t> cache_row_slots_cpu(const int64_t* cache_ids, int64_t cache_rows, int64_t num_rows) {
  std::vector<int32_t> slot_of(static_cast<size_t>(num_rows), -1);
  for (int64_t s = 0; s < cache_rows && cache_ids[s] < num_rows; ++s) {
    slot_of[cache_ids[s]] = static_cast<int32_t>(s);
  }
  return slot_of;
}

void cache_row_codes_cpu(
    const int64_t* cache_ids,
    int64_t cache_rows,
    int64_t num_rows,
    int64_t last_rows,
    int64_t num_groups,
    int64_t* code) {
  // One simple loop per group (vectorized; a single loop over the rows with the group and the last
  // digit as two counters was not, 2.4 cycles a row).
  for (int64_t group = 0; group * last_rows < num_rows; ++group) {
    int64_t* const group_codes = code + group * last_rows;
    const int64_t group_code = group << kRowCodeShift;
    const int64_t digits = std::min(last_rows, num_rows - group * last_rows);
    for (int64_t last = 0; last < digits; ++last) {
      group_codes[last] = group_code | last;
    }
  }
  const int64_t cached_code = num_groups << kRowCodeShift;
  for (int64_t s = 0; s < cache_rows && cache_ids[s] < num_rows; ++s) {
    code[cache_ids[s]] = cached_code | s;
  }
}

template <typename index_t>
std::vector<int32_t> cache_slots_cpu(
    const index_t* indices,
    int64_t nnz,
    const int64_t* cache_ids,
    int64_t cache_rows,
    int64_t num_rows) {
  std::vector<int32_t> slot(static_cast<size_t>(nnz));
  if (row_map_fits(nnz, num_rows)) {
    const std::vector<int32_t> slot_of = cache_row_slots_cpu(cache_ids, cache_rows, num_rows);
    at::parallel_for(0, nnz, kSegmentGrain, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        slot[j] = slot_of[static_cast<int64_t>(indices[j])];
      }
    });
    return slot;
  }
  at::parallel_for(0, nnz, kSegmentGrain, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t id = static_cast<int64_t>(indices[j]);
      const int64_t* at_ = std::lower_bound(cache_ids, cache_ids + cache_rows, id);
      slot[j] = at_ != cache_ids + cache_rows && *at_ == id ? static_cast<int32_t>(at_ - cache_ids) : -1;
    }
  });
  return slot;
}

template std::vector<int32_t> cache_slots_cpu<int32_t>(const int32_t*, int64_t, const int64_t*, int64_t, int64_t);
template std::vector<int32_t> cache_slots_cpu<int64_t>(const int64_t*, int64_t, const int64_t*, int64_t, int64_t);

at::Tensor check_cache_ids_cpu(const char* op, const at::Tensor& cache_ids) {
  TORCH_CHECK_VALUE(
      cache_ids.dim() == 1 && cache_ids.scalar_type() == at::kLong && cache_ids.device().is_cpu(),
      op, ": cache_ids must be a 1-D int64 CPU tensor, got ", cache_ids.scalar_type(), " of shape ",
      cache_ids.sizes(), " on ", cache_ids.device());
  TORCH_CHECK_VALUE(
      cache_ids.numel() < (int64_t{1} << 31), op, ": cache_ids holds ", cache_ids.numel(),
      " rows; at most 2^31 - 1 are supported");
  at::Tensor ids = cache_ids.contiguous();
  const int64_t* p = ids.data_ptr<int64_t>();
  for (int64_t s = 0; s < ids.numel(); ++s) {
    TORCH_CHECK_VALUE(p[s] >= 0, op, ": cache_ids[", s, "] = ", p[s], " is negative");
    TORCH_CHECK_VALUE(
        s == 0 || p[s] > p[s - 1], op, ": cache_ids must be distinct and ascending, got cache_ids[",
        s - 1, "] = ", p[s - 1], " then cache_ids[", s, "] = ", p[s]);
  }
  return ids;
}

at::Tensor check_plan_cpu(
    const char* op,
    const at::Tensor& plan,
    int64_t nnz,
    int64_t batch_size,
    int64_t last_rows,
    int64_t cache_rows) {
  at::Tensor p = check_plan_shape(op, plan, nnz, batch_size, c10::Device(c10::kCPU));
  const int64_t* h = p.data_ptr<int64_t>();
  const auto at_ = [&](PlanHeader f) { return h[static_cast<int64_t>(f)]; };
  TORCH_CHECK_VALUE(
      at_(PlanHeader::kNumLookups) == nnz && at_(PlanHeader::kNumBags) == batch_size &&
          at_(PlanHeader::kLastRows) == last_rows && at_(PlanHeader::kCacheRows) == cache_rows,
      op, ": plan was built for another batch or table (nnz ", at_(PlanHeader::kNumLookups),
      ", B ", at_(PlanHeader::kNumBags), ", last_rows ", at_(PlanHeader::kLastRows), ", cache rows ",
      at_(PlanHeader::kCacheRows), "); this call has nnz ", nnz, ", B ", batch_size, ", last_rows ",
      last_rows, ", cache rows ", cache_rows);
  return p;
}

template <typename index_t>
at::Tensor plan_for_batch_cpu(
    const char* op,
    const std::optional<at::Tensor>& plan,
    const index_t* indices,
    const index_t* offsets,
    int64_t batch_size,
    int64_t nnz,
    int64_t last_rows,
    int64_t num_groups,
    const PlanCache& cache) {
  if (plan.has_value()) {
    return check_plan_cpu(op, *plan, nnz, batch_size, last_rows, cache.rows);
  }
  RECORD_FUNCTION("torchrec_tt::grt::build_plan", std::vector<c10::IValue>());
  at::Tensor built =
      at::empty({PlanLayout::make(nnz, batch_size).numel}, at::TensorOptions().dtype(at::kLong));
  build_group_plan_cpu<index_t>(
      indices, offsets, batch_size, nnz, last_rows, num_groups, cache, built.data_ptr<int64_t>());
  return built;
}

template at::Tensor plan_for_batch_cpu<int32_t>(
    const char*, const std::optional<at::Tensor>&, const int32_t*, const int32_t*, int64_t, int64_t,
    int64_t, int64_t, const PlanCache&);
template at::Tensor plan_for_batch_cpu<int64_t>(
    const char*, const std::optional<at::Tensor>&, const int64_t*, const int64_t*, int64_t, int64_t,
    int64_t, int64_t, const PlanCache&);

namespace {

at::Tensor group_plan_cpu(
    const at::Tensor& indices_in,
    const at::Tensor& offsets_in,
    int64_t last_rows,
    int64_t num_rows,
    const std::optional<at::Tensor>& cache_ids_in) {
  constexpr const char* op = "group_plan";
  check_group_plan_inputs(op, indices_in, offsets_in, last_rows, c10::DeviceType::CPU);
  const std::optional<at::Tensor> cache_ids =
      cache_ids_in.has_value() ? std::optional<at::Tensor>(check_cache_ids_cpu(op, *cache_ids_in)) : std::nullopt;
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const int64_t nnz = indices.numel();
  const int64_t batch_size = offsets.numel() - 1;
  at::Tensor plan = at::empty(
      {PlanLayout::make(nnz, batch_size).numel}, indices.options().dtype(at::kLong));
  TORCHREC_TT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "group_plan_cpu", [&] {
    const index_t* idx = indices.data_ptr<index_t>();
    const index_t* off = offsets.data_ptr<index_t>();
    check_offsets_values_cpu(op, off, batch_size, nnz);
    check_indices_range_cpu(op, idx, nnz, num_rows);
    // Groups of the table when its size is known (indices are checked against it), else of the
    // largest index.
    int64_t num_groups = (num_rows + last_rows - 1) / last_rows;
    if (num_rows < 0) {
      int64_t max_index = -1;
      for (int64_t j = 0; j < nnz; ++j) {
        max_index = std::max<int64_t>(max_index, static_cast<int64_t>(idx[j]));
      }
      num_groups = max_index < 0 ? 0 : max_index / last_rows + 1;
    }
    // With a cache, each table row's code (its group and last digit, or the cache's group and
    // slot) when that map is affordable, read where the bags are ordered (order_bag_by_group): one
    // load per lookup, where the division and a slot map's hit test made the plan of a MovieLens
    // history batch (1 % cache, one thread, in-process alternation) 23-55 us slower than without a
    // cache, against -53 to +9 us with the codes (hits are not ranked). Else the slot per lookup,
    // in a pass of its own. The codes live in the calling thread's grow-only arena: in a fresh
    // vector (164 KB there) every call mapped and faulted in its pages. Without a cache the plan
    // divides: filling the codes cost as much as the divisions they save (1-3 % slower on one
    // thread, 7 % on two).
    std::vector<int32_t> slots;
    PlanCache cache;
    if (cache_ids.has_value()) {
      cache.rows = cache_ids->numel();
      const int64_t* ids = cache_ids->data_ptr<int64_t>();
      if (row_codes_fit(nnz, num_rows)) {
        int64_t* const code = arena<int64_t>(Arena::kRowCodes, num_rows);
        cache_row_codes_cpu(ids, cache.rows, num_rows, last_rows, num_groups, code);
        cache.row_code = code;
      } else {
        slots = cache_slots_cpu<index_t>(idx, nnz, ids, cache.rows, num_rows);
        cache.slot = slots.data();
      }
    }
    build_group_plan_cpu<index_t>(
        idx, off, batch_size, nnz, last_rows, num_groups, cache, plan.data_ptr<int64_t>());
  });
  return plan;
}

} // namespace

} // namespace torchrec_tt::cpu

TORCH_LIBRARY_IMPL(torchrec_tt, CPU, m) {
  m.impl("group_plan", &torchrec_tt::cpu::group_plan_cpu);
}
