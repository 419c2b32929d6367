// (bag, group) plan of a batch on CPU: the host-side implementation behind torchrec_tt::group_plan,
// also used by the CPU grt kernels (csrc/cpu/tt_embedding_bag_cpu.cpp) when no plan is passed in.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) || defined(__clang__)
#define TORCHREC_TT_PLAN_INLINE __attribute__((always_inline))
#else
#define TORCHREC_TT_PLAN_INLINE
#endif

namespace torchrec_tt::cpu {

// (index / divisor, index % divisor) for 0 <= index without a hardware 64-bit division (25-40
// cycles, once per lookup): a double-precision reciprocal and one correction step, exact for
// index < 2^52 (larger indices take the division).
class FastDivmod {
 public:
  explicit FastDivmod(int64_t divisor)
      : divisor_(divisor), inverse_(1.0 / static_cast<double>(divisor)) {}

  // Inlined: called once per lookup (gcc left it out of line in one of order_bag_by_group's loops).
  TORCHREC_TT_PLAN_INLINE int64_t divmod(int64_t x, int64_t* remainder) const {
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

// The hot-row cache of a plan (docs/design.md section 10): the rows it holds and the slot that serves
// each lookup, given per lookup or, with each row's group and last digit, per table row.
struct PlanCache {
  int64_t rows = 0; // K (0: no cache)
  const int32_t* slot = nullptr; // (nnz,) cache slot of each lookup, -1 when not cached; or
  const int64_t* row_code = nullptr; // (num_rows,) each table row's code (cache_row_codes_cpu)

  bool has_slots() const {
    return slot != nullptr || row_code != nullptr;
  }
};

// A table row's code: its group and last digit, or for a cached row num_groups (after every real
// group) and its cache slot, packed as group << 32 | last. Both fit 32 bits when num_rows does
// (row_codes_fit).
constexpr int kRowCodeShift = 32;
constexpr int64_t kRowCodeLowMask = (int64_t{1} << kRowCodeShift) - 1;

// order_bag_by_group's source of lookups without a cache (a tag: never read).
struct NoCache {};

// Per-thread scratch of order_bag_by_group.
struct BagOrderScratch {
  std::vector<int64_t> key;
  std::vector<int32_t> key32;
  std::vector<int32_t> rank;
  std::vector<int64_t> group;
  std::vector<int64_t> last;
  std::vector<int32_t> hit_at;
};

// Bags up to this many (uncached) lookups are ordered by counting ranks (n^2 compares, branch-free
// and vectorized), larger ones by std::sort: a comparison sort is dominated by mispredicted branches
// (MovieLens history bags, a third of whose lookups are in bags of 97-250: the plan took 0.75 ms
// per 22k lookups with the switch at 96, 0.69 ms at 192; later, one thread, in-process alternation,
// 314 us at 192, 294 at 256 (every bag with 32-bit keys), 295-297 at 384 and 512).
constexpr int64_t kRankSortMaxLookups = 256;

// Orders the lookups [lo, hi) of one bag by (group, position), the order of the plan's segments and
// of the lookups within a segment, writing for each rank k in [lo, hi): perm[k] (the lookup),
// group[k] = indices[perm[k]] / last_rows and last[k] = indices[perm[k]] % last_rows. With cache
// slots (cache.has_slots()), a cached lookup takes group num_groups (after every real group: the
// bag's cached lookups come last, in position order) and last = its cache slot; group[k] may be left
// unwritten for them. Returns the bag's number of cached lookups. Keys are
// (group << 20 | position): distinct, so a key's rank is its place; bags of up to 256 lookups whose
// groups fit 23 bits use 32-bit keys (group << 8 | position). Bags of 2^20 or more lookups, or
// groups past 2^43, sort (group, position) pairs instead (never, in practice).
template <typename index_t>
inline int64_t order_bag_by_group(
    const index_t* indices,
    const PlanCache& cache,
    int64_t lo,
    int64_t hi,
    const FastDivmod& divmod,
    int64_t num_groups,
    BagOrderScratch& scratch,
    int64_t* perm,
    int64_t* group,
    int64_t* last) {
  constexpr int kPositionBits = 20;
  constexpr int kShortPositionBits = 8;
  typedef int32_t Lanes __attribute__((vector_size(32)));
  constexpr int64_t kLanes = 8;
  constexpr int64_t kBlock = 2 * kLanes; // keys ranked per pass over the bag: two independent sums
  const int64_t n = hi - lo;
  const bool short_keys =
      n <= (int64_t{1} << kShortPositionBits) && num_groups < (int64_t{1} << (31 - kShortPositionBits));
  scratch.group.resize(static_cast<size_t>(n));
  scratch.last.resize(static_cast<size_t>(n));
  scratch.key32.resize(static_cast<size_t>(short_keys ? (n + kBlock - 1) / kBlock * kBlock : 0));
  int64_t* const g = scratch.group.data();
  int64_t* const r = scratch.last.data();
  int32_t* const key32 = scratch.key32.data();
  // Positions of the cached lookups: lookup t writes at its count of hits so far (t - ranked),
  // which only a hit advances.
  const bool cached = cache.has_slots();
  scratch.hit_at.resize(static_cast<size_t>(cached ? n : 0));
  int32_t* const hit_at = scratch.hit_at.data();
  // Groups and last digits, the 32-bit keys of the uncached lookups (in position order), and
  // whether the bag is already in order. One loop per source: the table rows' codes (one load per
  // lookup, no division and no hit test), the lookups' cache slots (slot[j], -1 if not cached), or
  // no cache (NoCache). By value, its state local and returned (captured by reference: the same
  // time without a cache, and 13-17 against 8-13 us of cache cost, three in-process runs).
  struct KeyPass {
    int64_t ranked; // uncached lookups
    bool sorted;
  };
  const auto order_keys = [=, &divmod](const auto* source) TORCHREC_TT_PLAN_INLINE {
    using Source = std::remove_cv_t<std::remove_pointer_t<decltype(source)>>;
    bool sorted = true;
    int64_t prev = -1;
    int64_t ranked = 0;
    for (int64_t t = 0; t < n; ++t) {
      const int64_t index = static_cast<int64_t>(indices[lo + t]);
      int64_t q;
      int64_t rem;
      if constexpr (std::is_same_v<Source, int64_t>) {
        const int64_t code = source[index];
        q = code >> kRowCodeShift;
        rem = code & kRowCodeLowMask;
      } else {
        q = divmod.divmod(index, &rem);
      }
      if constexpr (std::is_same_v<Source, int32_t>) {
        // Masks, not branches: hits are scattered through a bag, so a branch on them mispredicts
        // about as often as they occur. Written as selects, gcc compiled a branch: the 1 % cache
        // made the plan of a MovieLens history batch 70-80 us slower (of ~370).
        const int64_t slot = source[lo + t];
        const int64_t hit = ~(slot >> 63); // all ones when cached (slot >= 0), else 0
        q = (q & ~hit) | (num_groups & hit);
        rem = (rem & ~hit) | (slot & hit);
      }
      if constexpr (!std::is_same_v<Source, NoCache>) {
        hit_at[t - ranked] = static_cast<int32_t>(t);
      }
      g[t] = q;
      r[t] = rem;
      if (short_keys) {
        key32[ranked] = static_cast<int32_t>((q << kShortPositionBits) | t);
      }
      ranked += q < num_groups ? 1 : 0;
      sorted &= q >= prev;
      prev = q;
    }
    return KeyPass{ranked, sorted};
  };
  KeyPass keys;
  if (cache.row_code != nullptr) {
    keys = order_keys(cache.row_code);
  } else if (cache.slot != nullptr) {
    keys = order_keys(cache.slot);
  } else {
    keys = order_keys(static_cast<const NoCache*>(nullptr));
  }
  int64_t ranked = keys.ranked;
  const bool sorted = keys.sorted;
  const int64_t hits = n - ranked;
  // By value: captured by reference, the pointers were reloaded after every store.
  const auto place = [=](int64_t k, int64_t t) TORCHREC_TT_PLAN_INLINE {
    perm[lo + k] = lo + t;
    group[lo + k] = g[t];
    last[lo + k] = r[t];
  };
  if (sorted) {
    for (int64_t t = 0; t < n; ++t) {
      place(t, t);
    }
    return hits;
  }
  if (short_keys && ranked <= kRankSortMaxLookups) {
    // Sixteen keys' ranks per pass, each compared with every key (broadcast), as two independent
    // vector sums: no horizontal sum per key, and two dependency chains instead of one. The last
    // block is padded with the largest key, whose ranks are not used.
    const int64_t padded = (ranked + kBlock - 1) / kBlock * kBlock;
    std::fill(key32 + ranked, key32 + padded, std::numeric_limits<int32_t>::max());
    scratch.rank.resize(static_cast<size_t>(padded));
    int32_t* const rank = scratch.rank.data();
    for (int64_t block = 0; block < padded; block += kBlock) {
      Lanes mine0, mine1;
      std::memcpy(&mine0, key32 + block, sizeof(mine0));
      std::memcpy(&mine1, key32 + block + kLanes, sizeof(mine1));
      Lanes below0 = {}, below1 = {};
      for (int64_t u = 0; u < ranked; ++u) {
        const Lanes key = Lanes{} + key32[u];
        below0 -= key < mine0; // true lanes are -1
        below1 -= key < mine1;
      }
      std::memcpy(rank + block, &below0, sizeof(below0));
      std::memcpy(rank + block + kLanes, &below1, sizeof(below1));
    }
    for (int64_t i = 0; i < ranked; ++i) {
      place(rank[i], key32[i] & ((1 << kShortPositionBits) - 1));
    }
  } else if (n < (int64_t{1} << kPositionBits) && num_groups + 1 < (int64_t{1} << (62 - kPositionBits))) {
    scratch.key.resize(static_cast<size_t>(n));
    int64_t* const key = scratch.key.data();
    ranked = 0;
    for (int64_t t = 0; t < n; ++t) {
      key[ranked] = (g[t] << kPositionBits) | t;
      ranked += g[t] < num_groups ? 1 : 0;
    }
    if (ranked <= kRankSortMaxLookups) {
      for (int64_t t = 0; t < ranked; ++t) {
        const int64_t mine = key[t];
        int64_t below = 0;
        for (int64_t u = 0; u < ranked; ++u) {
          below += key[u] < mine ? 1 : 0;
        }
        place(below, mine & ((int64_t{1} << kPositionBits) - 1));
      }
    } else {
      std::sort(key, key + ranked);
      for (int64_t k = 0; k < ranked; ++k) {
        place(k, key[k] & ((int64_t{1} << kPositionBits) - 1));
      }
    }
  } else {
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
    return hits;
  }
  // The cached lookups after the others, in position order (their group, num_groups, is not
  // written: the plan's passes know a bag's hits from the count returned).
  for (int64_t h = 0; h < hits; ++h) {
    perm[lo + ranked + h] = lo + hit_at[h];
    last[lo + ranked + h] = r[hit_at[h]];
  }
  return hits;
}

// Up to this many table rows per lookup, a map over the table's rows (the cache slots below, the
// distinct rows of a plan-free forward) is cheaper than searching: filling and scanning it costs
// about as much as the batch's own pass. torchrec_tt/cache.py (_SLOT_MAP_ROWS_PER_LOOKUP) follows
// the same rule.
constexpr int64_t kRowMapRowsPerLookup = 16;

// Whether a map over the table's rows is affordable for a batch of nnz lookups.
inline bool row_map_fits(int64_t nnz, int64_t num_rows) {
  return num_rows > 0 && num_rows <= kRowMapRowsPerLookup * nnz;
}

// Whether a cached plan reads its lookups' groups, last digits and cache slots from the table
// rows' codes (cache_row_codes_cpu): the map is affordable and a row's group and last digit fit
// 32 bits each.
inline bool row_codes_fit(int64_t nnz, int64_t num_rows) {
  return row_map_fits(nnz, num_rows) && num_rows <= std::numeric_limits<int32_t>::max();
}

// The distinct rows that a batch reads: the uncached ones numbered 0 .. D - 1 in ascending row
// order, so that the rows of one group are consecutive, then the cached ones (docs/design.md section
// 3.4): all that the grt forward needs when no backward will read a (bag, group) plan.
struct DistinctRows {
  std::vector<int32_t> id; // (num_rows,) id[r] = number of row r among the distinct rows (read only
                           // for rows the batch uses)
  std::vector<int64_t> row; // (D,) the distinct uncached rows, ascending
  std::vector<int32_t> cached_slot; // cache slot of distinct row D + i (ascending)
  std::vector<int64_t> group; // (G,) the distinct groups, ascending
  std::vector<int64_t> group_row_start; // (G + 1,) group[i]'s rows are row[group_row_start[i] .. [i + 1])
  int64_t num_segments = 0; // S, the distinct (bag, group) pairs of the uncached lookups, estimated
                            // from a sample of the bags

  int64_t count() const {
    return static_cast<int64_t>(row.size());
  }
  int64_t num_groups() const {
    return static_cast<int64_t>(group.size());
  }
};

// Whether distinct_rows_cpu applies: a map of num_rows entries is affordable (row_map_fits)
// and row numbers fit its int32 ids.
inline bool distinct_rows_fit(int64_t nnz, int64_t num_rows) {
  return row_map_fits(nnz, num_rows) && nnz < (int64_t{1} << 31);
}

// The distinct rows of a validated batch (indices in [0, num_rows)) and its segment count (an
// estimate); the used rows among the cache's (cache_ids: cache_rows distinct ascending ids, nullable)
// are numbered after the computed ones, in slot order. The cache is matched once per distinct row
// (O(K) over the row map), not per lookup. Requires distinct_rows_fit(nnz, num_rows).
template <typename index_t>
DistinctRows distinct_rows_cpu(
    const index_t* indices,
    const index_t* offsets,
    const int64_t* cache_ids,
    int64_t cache_rows,
    int64_t batch_size,
    int64_t nnz,
    int64_t num_rows,
    int64_t last_rows);

// One lookup of a batch bucketed by group (LookupsByGroup).
struct GroupedLookup {
  int32_t group;
  int32_t bag;
  int32_t last; // last digit (row % last_rows)
  int32_t lookup; // position j in the batch
};

// The uncached lookups of a batch ordered by (group, position) (a stable radix sort; docs/design.md
// section 3.4): what the slot-major grt forward needs when no backward will read a (bag, group)
// plan and the table is too large for distinct_rows_cpu.
struct LookupsByGroup {
  std::vector<int64_t> group; // (G,) the distinct groups, ascending
  std::vector<int64_t> start; // (G + 1,) group[i]'s lookups are lookups[start[i] .. start[i + 1])
  const GroupedLookup* lookups = nullptr; // in the calling thread's arena (csrc/cpu/cpu_scratch.h):
                                          // valid until its next lookups_by_group_cpu call

  int64_t num_groups() const {
    return static_cast<int64_t>(group.size());
  }
};

// Whether lookups_by_group_cpu applies: groups (and the cached lookups' num_groups), positions,
// bags and last digits fit int32.
inline bool lookups_by_group_fit(int64_t nnz, int64_t batch_size, int64_t num_groups, int64_t last_rows) {
  constexpr int64_t kInt32Max = (int64_t{1} << 31) - 1;
  return num_groups < kInt32Max && nnz <= kInt32Max && batch_size <= kInt32Max && last_rows <= kInt32Max;
}

// The lookups of a validated batch (indices in [0, num_groups * last_rows)) by group; lookups with
// cache_slot[j] >= 0 (nullable) are left out. Requires lookups_by_group_fit.
template <typename index_t>
LookupsByGroup lookups_by_group_cpu(
    const index_t* indices,
    const index_t* offsets,
    const int32_t* cache_slot,
    int64_t batch_size,
    int64_t nnz,
    int64_t last_rows,
    int64_t num_groups);

// Cache slot of every table row (num_rows; -1: not cached) from the sorted distinct ids `cache_ids`
// (K; empty slots hold ids >= num_rows).
std::vector<int32_t> cache_row_slots_cpu(const int64_t* cache_ids, int64_t cache_rows, int64_t num_rows);

// Writes every table row's code (kRowCodeShift; num_rows entries) to `code`: group << 32 | last
// digit, and for the rows in `cache_ids` (K sorted distinct ids; empty slots hold ids >= num_rows)
// num_groups << 32 | slot, num_groups being the plan's (the group after every real one, which
// order_bag_by_group reads as cached). Requires row_codes_fit.
void cache_row_codes_cpu(
    const int64_t* cache_ids,
    int64_t cache_rows,
    int64_t num_rows,
    int64_t last_rows,
    int64_t num_groups,
    int64_t* code);

// Cache slot of every lookup (-1: not cached) against the sorted distinct ids `cache_ids` (K; empty
// slots hold ids >= num_rows). Through the slot map of the table's rows when row_map_fits
// (one load per lookup), else a binary search per lookup. indices are validated (non-negative,
// below num_rows when num_rows >= 0).
template <typename index_t>
std::vector<int32_t> cache_slots_cpu(
    const index_t* indices,
    int64_t nnz,
    const int64_t* cache_ids,
    int64_t cache_rows,
    int64_t num_rows);

// Checks cache_ids of an op on CPU: a 1-D int64 CPU tensor of distinct ids in ascending order (K
// below 2^31). Returns it contiguous.
at::Tensor check_cache_ids_cpu(const char* op, const at::Tensor& cache_ids);

// Fills the packed plan of a batch (layout: plan_layout.h) at `plan` (PlanLayout::make(nnz,
// batch_size).numel entries). indices / offsets are the raw contiguous CPU data, already validated:
// offsets[0] = 0, offsets[B] = nnz, non-decreasing, indices in [0, num_groups * last_rows).
// Lookups whose cache slot (cache.slot[j] or cache.row_slot[indices[j]]) is >= 0 go to their bag's
// cache segment. Entries past the counts are
// filled with 0.
template <typename index_t>
void build_group_plan_cpu(
    const index_t* indices,
    const index_t* offsets,
    int64_t batch_size,
    int64_t nnz,
    int64_t last_rows,
    int64_t num_groups,
    const PlanCache& cache,
    int64_t* plan);

// Checks a plan passed to tt_embedding_bag(_backward) against the batch: an int64 CPU tensor of the
// packed size whose header matches (nnz, B, last_rows, cache rows K). Returns it contiguous.
at::Tensor check_plan_cpu(
    const char* op,
    const at::Tensor& plan,
    int64_t nnz,
    int64_t batch_size,
    int64_t last_rows,
    int64_t cache_rows);

// The plan of a validated batch: `plan` when given (checked), else built here (with `cache`).
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
    const PlanCache& cache);

} // namespace torchrec_tt::cpu
