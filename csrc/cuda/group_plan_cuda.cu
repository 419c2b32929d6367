// (bag, group) plan of a batch on the GPU (torchrec_tt::group_plan; also built inside the forward
// when the caller passes no plan), packed as csrc/include/torchrec_tt/plan_layout.h, plus the
// opt-in index value check.
//
// Why this shape: the plan is the only data-dependent part of grt, so it must cost few launches and
// no host sync. Five device-wide steps, all sized by upper bounds (S, U <= nnz):
//   1. plan_keys_kernel   per lookup: bag (upper bound in the clamped offsets), validity, the key
//                         (bag << gbits | group), and the segment-sort keys preset to a sentinel;
//   2. radix sort         lookups by key -> sorted_lookup (stable: (bag, group, j) order);
//   3. scan_heads         numbers the segments and, in the scan's output functor, writes
//                         lookup_segment, sorted_last, segment_start/bag/group, bag_segment_start,
//                         bag_hits (0: the CUDA plan has no cache segments), S and the segments'
//                         groups (keys of step 4);
//   4. radix sort         segments by group (stable) -> slot_segment;
//   5. scan_heads         numbers the slots and writes segment_slot, slot_group, slot_segment_start, U.
// Invalid lookups (outside every bag, index < 0, group beyond the bound) get the largest key, sort
// last and belong to no segment (lookup_segment = -1). Entries past S / U are left unspecified.
// The counts stay in the header on the device; consumers clamp them before use.

#include "tt_cuda_common.cuh"

namespace torchrec_tt::gpu {
namespace {

// Step 1. keys[j] = (bag << gbits) | group for valid lookups, `invalid` (B << gbits) otherwise;
// vals[j] = j. Also presets the segment sort: slot_keys[i] = sentinel, slot_vals[i] = i.
template <typename index_t, typename key_t, typename skey_t>
__global__ void plan_keys_kernel(
    const index_t* __restrict__ indices,
    const index_t* __restrict__ offsets,
    int64_t B,
    int64_t nnz,
    int64_t last_rows,
    int64_t group_limit,
    int gbits,
    key_t invalid,
    key_t* __restrict__ keys,
    int64_t* __restrict__ vals,
    skey_t sentinel,
    skey_t* __restrict__ slot_keys,
    int64_t* __restrict__ slot_vals) {
  TORCHREC_TT_GRID_STRIDE(j, nnz) {
    const int64_t b = lookup_bag_of(offsets, B, nnz, j);
    const int64_t idx = static_cast<int64_t>(indices[j]);
    const int64_t g = idx / last_rows;
    const bool valid = b >= 0 && idx >= 0 && g < group_limit;
    keys[j] = valid ? static_cast<key_t>((static_cast<key_t>(b) << gbits) | static_cast<key_t>(g)) : invalid;
    vals[j] = j;
    slot_keys[j] = sentinel;
    slot_vals[j] = j;
  }
}

// A plan without valid lookups (nnz == 0 or B == 0): header, bag_segment_start = 0, every lookup
// in no segment.
template <typename Unused = void>
__global__ void plan_empty_kernel(
    int64_t nnz,
    int64_t B,
    int64_t last_rows,
    PlanView<int64_t> v) {
  const int64_t n = nnz > B + 1 ? nnz : B + 1;
  TORCHREC_TT_GRID_STRIDE(i, n) {
    if (i == 0) {
      for (int h = 0; h < kPlanHeaderSize; ++h) {
        v.header[h] = 0;
      }
      v.header[static_cast<int>(PlanHeader::kNumLookups)] = nnz;
      v.header[static_cast<int>(PlanHeader::kNumBags)] = B;
      v.header[static_cast<int>(PlanHeader::kLastRows)] = last_rows;
      v.segment_start[0] = 0;
      v.slot_segment_start[0] = 0;
    }
    if (i <= B) {
      v.bag_segment_start[i] = 0;
    }
    if (i < B) {
      v.bag_hits[i] = 0; // no cache on CUDA (torchrec_tt.cache splits the hits off)
    }
    if (i < nnz) {
      v.lookup_segment[i] = -1;
    }
  }
}

// Step 3: head(p) = 1 where sorted position p starts a segment.
template <typename key_t>
struct SegmentHead {
  const key_t* keys;
  key_t invalid;
  __host__ __device__ int operator()(int p) const {
    const key_t k = keys[p];
    return (k != invalid && (p == 0 || keys[p - 1] != k)) ? 1 : 0;
  }
};

// Step 3: position p of the sorted lookups with c = segments started in [0, p].
template <typename key_t, typename skey_t, typename index_t>
struct SegmentWriter {
  const key_t* keys; // sorted
  key_t invalid;
  int gbits;
  const index_t* indices;
  int64_t last_rows;
  int64_t nnz;
  int64_t B;
  PlanView<int64_t> v;
  skey_t* slot_keys;
  __host__ __device__ void operator()(int p, int c) const {
    const key_t k = keys[p];
    const int64_t j = v.sorted_lookup[p];
    if (p == 0) { // the counts (fields 0, 1) are written by the threads that know them
      for (int h = 2; h < kPlanHeaderSize; ++h) {
        v.header[h] = 0;
      }
      v.header[static_cast<int>(PlanHeader::kNumLookups)] = nnz;
      v.header[static_cast<int>(PlanHeader::kNumBags)] = B;
      v.header[static_cast<int>(PlanHeader::kLastRows)] = last_rows;
    }
    if (k == invalid) {
      v.lookup_segment[j] = -1;
      if (p == 0) { // no valid lookup at all
        v.segment_start[0] = 0;
        for (int64_t b = 0; b <= B; ++b) {
          v.bag_segment_start[b] = 0;
          if (b < B) {
            v.bag_hits[b] = 0;
          }
        }
      }
      return;
    }
    const int64_t s = c - 1;
    const int64_t bag = static_cast<int64_t>(k >> gbits);
    const int64_t g = static_cast<int64_t>(k - (static_cast<key_t>(bag) << gbits));
    v.lookup_segment[j] = s;
    v.sorted_last[p] = static_cast<int64_t>(indices[j]) - g * last_rows;
    if (p == 0 || keys[p - 1] != k) {
      v.segment_start[s] = p;
      v.segment_bag[s] = bag;
      v.segment_group[s] = g;
      slot_keys[s] = static_cast<skey_t>(g);
      const int64_t prev = p == 0 ? -1 : static_cast<int64_t>(keys[p - 1] >> gbits);
      for (int64_t b = prev + 1; b <= bag; ++b) {
        v.bag_segment_start[b] = s;
        v.bag_hits[b] = 0;
      }
    }
    if (p + 1 == nnz || keys[p + 1] == invalid) { // last valid lookup
      v.segment_start[s + 1] = p + 1;
      v.header[static_cast<int>(PlanHeader::kNumSegments)] = c;
      for (int64_t b = bag + 1; b <= B; ++b) {
        v.bag_segment_start[b] = c;
        if (b < B) {
          v.bag_hits[b] = 0;
        }
      }
    }
  }
};

// Step 5: position q of the segments sorted by group with c = slots started in [0, q].
template <typename skey_t>
struct SlotWriter {
  const skey_t* keys; // sorted
  skey_t sentinel;
  int64_t n;
  PlanView<int64_t> v;
  __host__ __device__ void operator()(int q, int c) const {
    const skey_t k = keys[q];
    if (k == sentinel) {
      if (q == 0) {
        v.header[static_cast<int>(PlanHeader::kNumSlots)] = 0;
        v.slot_segment_start[0] = 0;
      }
      return;
    }
    const int64_t u = c - 1;
    v.segment_slot[v.slot_segment[q]] = u;
    if (q == 0 || keys[q - 1] != k) {
      v.slot_group[u] = static_cast<int64_t>(k);
      v.slot_segment_start[u] = q;
    }
    if (q + 1 == n || keys[q + 1] == sentinel) {
      v.slot_segment_start[u + 1] = q + 1;
      v.header[static_cast<int>(PlanHeader::kNumSlots)] = c;
    }
  }
};

template <typename key_t, typename skey_t, typename index_t>
void build_plan_keys(
    LaunchCtx& ctx,
    const index_t* indices,
    const index_t* offsets,
    int64_t B,
    int64_t nnz,
    int64_t last_rows,
    int64_t group_limit,
    int gbits,
    int bbits,
    const PlanView<int64_t>& v) {
  const key_t invalid = static_cast<key_t>(static_cast<key_t>(B) << gbits);
  const skey_t sentinel = static_cast<skey_t>(skey_t{1} << gbits);
  key_t* keys = ctx.alloc_n<key_t>(nnz);
  key_t* keys_sorted = ctx.alloc_n<key_t>(nnz);
  int64_t* vals = ctx.alloc_n<int64_t>(nnz);
  skey_t* skeys = ctx.alloc_n<skey_t>(nnz);
  skey_t* skeys_sorted = ctx.alloc_n<skey_t>(nnz);
  int64_t* svals = ctx.alloc_n<int64_t>(nnz);
  const int n = static_cast<int>(nnz);
  launch_elems(
      ctx, &plan_keys_kernel<index_t, key_t, skey_t>, nnz, indices, offsets, B, nnz, last_rows,
      group_limit, gbits, invalid, keys, vals, sentinel, skeys, svals);
  radix_sort_pairs(ctx, static_cast<const key_t*>(keys), keys_sorted, static_cast<const int64_t*>(vals),
                   v.sorted_lookup, n, gbits + bbits);
  scan_heads(
      ctx, n, SegmentHead<key_t>{keys_sorted, invalid},
      SegmentWriter<key_t, skey_t, index_t>{
          keys_sorted, invalid, gbits, indices, last_rows, nnz, B, v, skeys});
  radix_sort_pairs(ctx, static_cast<const skey_t*>(skeys), skeys_sorted, static_cast<const int64_t*>(svals),
                   v.slot_segment, n, gbits + 1);
  scan_heads(
      ctx, n, SegmentHead<skey_t>{skeys_sorted, sentinel},
      SlotWriter<skey_t>{skeys_sorted, sentinel, nnz, v});
}

template <typename index_t>
__global__ void check_inputs_kernel(
    const index_t* __restrict__ indices,
    const index_t* __restrict__ offsets,
    int64_t B,
    int64_t nnz,
    int64_t num_rows,
    unsigned long long* err) {
  const int64_t n = nnz > B + 1 ? nnz : B + 1;
  TORCHREC_TT_GRID_STRIDE(i, n) {
    if (i < nnz) {
      const int64_t v = static_cast<int64_t>(indices[i]);
      if (v < 0 || (num_rows >= 0 && v >= num_rows)) {
        atomicOr(&err[0], 1ull);
        atomicMin(&err[1], static_cast<unsigned long long>(i));
      }
    }
    if (i <= B) {
      const int64_t o = static_cast<int64_t>(offsets[i]);
      if (i == 0 && o != 0) {
        atomicOr(&err[0], 2ull);
      }
      if (i == B && o != nnz) {
        atomicOr(&err[0], 4ull);
      }
      if (i < B && static_cast<int64_t>(offsets[i + 1]) < o) {
        atomicOr(&err[0], 8ull);
        atomicMin(&err[2], static_cast<unsigned long long>(i));
      }
    }
  }
}

} // namespace

template <typename index_t>
void build_group_plan(
    LaunchCtx& ctx,
    const index_t* indices,
    const index_t* offsets,
    int64_t B,
    int64_t nnz,
    int64_t last_rows,
    int64_t num_groups,
    int64_t* plan) {
  const PlanView<int64_t> v = PlanView<int64_t>::make(plan, nnz, B);
  if (nnz <= 0 || B <= 0) {
    launch_elems(ctx, &plan_empty_kernel<>, nnz > B + 1 ? nnz : B + 1, nnz, B, last_rows, v);
    return;
  }
  const int bbits = tt_max(1, bit_width_u64(static_cast<uint64_t>(B)));
  int gbits = 0;
  int64_t group_limit = 0;
  if (num_groups > 0) {
    gbits = bit_width_u64(static_cast<uint64_t>(num_groups - 1));
    group_limit = num_groups;
  } else {
    // No table bound: groups of every non-negative index of the dtype, up to the key width.
    const int64_t max_index = sizeof(index_t) <= 4 ? int64_t{0x7fffffff} : int64_t{0x7fffffffffffffff};
    gbits = tt_min(bit_width_u64(static_cast<uint64_t>(max_index / last_rows)), 64 - bbits);
    group_limit = gbits >= 63 ? int64_t{0x7fffffffffffffff} : (int64_t{1} << gbits);
  }
  if (gbits + bbits <= 32) {
    build_plan_keys<uint32_t, uint32_t>(ctx, indices, offsets, B, nnz, last_rows, group_limit, gbits, bbits, v);
  } else if (gbits + 1 <= 32) {
    build_plan_keys<uint64_t, uint32_t>(ctx, indices, offsets, B, nnz, last_rows, group_limit, gbits, bbits, v);
  } else {
    build_plan_keys<uint64_t, uint64_t>(ctx, indices, offsets, B, nnz, last_rows, group_limit, gbits, bbits, v);
  }
}

template <typename index_t>
void check_index_values(
    LaunchCtx& ctx,
    const index_t* indices,
    const index_t* offsets,
    int64_t B,
    int64_t nnz,
    int64_t num_rows,
    unsigned long long* err) {
  launch_elems(
      ctx, &check_inputs_kernel<index_t>, nnz > B + 1 ? nnz : B + 1, indices, offsets, B, nnz,
      num_rows, err);
}

#define TORCHREC_TT_INSTANTIATE_PLAN(index_t)                                                  \
  template void build_group_plan<index_t>(                                                     \
      LaunchCtx&, const index_t*, const index_t*, int64_t, int64_t, int64_t, int64_t, int64_t*); \
  template void check_index_values<index_t>(                                                   \
      LaunchCtx&, const index_t*, const index_t*, int64_t, int64_t, int64_t, unsigned long long*);
TORCHREC_TT_INSTANTIATE_PLAN(int32_t)
TORCHREC_TT_INSTANTIATE_PLAN(int64_t)
#undef TORCHREC_TT_INSTANTIATE_PLAN

} // namespace torchrec_tt::gpu
