// (bag, group) plan of a batch on the GPU, without host syncs.
//
//   segments = distinct (bag, group) pairs of the valid lookups, ordered by (bag, group)
//   slots    = distinct groups, ascending
//
// Steps (all on the context's stream, sized by upper bounds: S <= nnz, U <= min(nnz, #groups)):
//   1. per lookup: bag (binary search in the clamped offsets), validity, group, last digit and a sort
//      key; one stable radix sort of (bag << gbits | group) -- or two stable sorts (group, then bag)
//      when the key does not fit in 64 bits -- gives `perm`, the lookups in (bag, group, j) order;
//   2. head flags + inclusive scan number the segments; a write pass fills lookup_segment,
//      segment_bag/group, seg_start and counts[0] = S;
//   3. a stable radix sort of the segments' groups, head flags + scan number the slots; a write pass
//      fills segment_slot, slot_group and counts[1] = U.
// Invalid lookups (no bag, index < 0 or >= num_rows) get the largest key, sort last and belong to no
// segment (lookup_segment = -1). Kernels that consume the plan read S and U from `counts`.
#pragma once

#include "tt_cuda_common.cuh"
#include "tt_device_primitives.cuh"

namespace torchrec_tt::gpu {

constexpr int kElemThreads = 256;

template <typename Ctx, typename Kernel, typename... Args>
void launch_elems(Ctx& ctx, Kernel kernel, int64_t n, Args... args) {
  if (n <= 0) {
    return;
  }
  TORCHREC_TT_LAUNCH(kernel, grid_for_elems(n, kElemThreads), kElemThreads, 0, ctx.stream, args...);
  ctx.check_launch();
}

#define TORCHREC_TT_GRID_STRIDE(i, n)                                            \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

// ---------------------------------------------------------------------------------------------
// Per-lookup information shared by all variants
// ---------------------------------------------------------------------------------------------

// lookup_bag[j] = the bag b with offsets[b] <= j < offsets[b+1] (offsets clamped into [0, nnz]), or -1
// when j lies in no bag or its index is outside [0, num_rows) (num_rows < 0: only index >= 0).
template <typename index_t>
__global__ void lookup_bag_kernel(
    const index_t* __restrict__ indices,
    const index_t* __restrict__ offsets,
    int64_t B,
    int64_t nnz,
    int64_t num_rows,
    int32_t* __restrict__ lookup_bag) {
  TORCHREC_TT_GRID_STRIDE(j, nnz) {
    int64_t lo = 0;
    int64_t hi = B + 1; // upper_bound of j in offsets[0..B]
    while (lo < hi) {
      const int64_t mid = lo + ((hi - lo) >> 1);
      if (offset_clamped(offsets, mid, nnz) <= j) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    const int64_t b = lo - 1;
    bool ok = b >= 0 && b < B && j >= offset_clamped(offsets, b, nnz) &&
        j < offset_clamped(offsets, b + 1, nnz);
    const int64_t idx = static_cast<int64_t>(indices[j]);
    ok = ok && idx >= 0 && (num_rows < 0 || idx < num_rows);
    lookup_bag[j] = ok ? static_cast<int32_t>(b) : -1;
  }
}

// bag_scale[b] = 1 / L_b for mean pooling with L_b > 0, else 1.
template <typename acc_t, typename index_t>
__global__ void bag_scale_kernel(
    const index_t* __restrict__ offsets,
    int64_t B,
    int64_t nnz,
    int mean,
    acc_t* __restrict__ bag_scale) {
  TORCHREC_TT_GRID_STRIDE(b, B) {
    const int64_t len = offset_clamped(offsets, b + 1, nnz) - offset_clamped(offsets, b, nnz);
    bag_scale[b] = (mean != 0 && len > 0) ? acc_t(1) / static_cast<acc_t>(len) : acc_t(1);
  }
}

// coef[j] = psw[j] (1 if absent) * bag_scale[bag(j)], 0 for invalid lookups.
template <typename scalar_t, typename acc_t>
__global__ void lookup_coef_kernel(
    const int32_t* __restrict__ lookup_bag,
    const scalar_t* __restrict__ psw,
    const acc_t* __restrict__ bag_scale,
    int64_t nnz,
    acc_t* __restrict__ coef) {
  TORCHREC_TT_GRID_STRIDE(j, nnz) {
    const int32_t b = lookup_bag[j];
    const acc_t w = psw != nullptr ? to_acc(psw[j]) : acc_t(1);
    coef[j] = b < 0 ? acc_t(0) : w * bag_scale[b];
  }
}

template <typename acc_t>
struct LookupInfo {
  int32_t* bag = nullptr; // [nnz]
  acc_t* coef = nullptr; // [nnz]
  acc_t* bag_scale = nullptr; // [B]
};

template <typename scalar_t, typename index_t, typename Ctx>
LookupInfo<acc_type<scalar_t>> compute_lookup_info(
    Ctx& ctx,
    const index_t* indices,
    const index_t* offsets,
    const scalar_t* psw,
    int64_t B,
    int64_t nnz,
    int64_t num_rows,
    int pooling_mode) {
  using acc_t = acc_type<scalar_t>;
  LookupInfo<acc_t> info;
  info.bag = alloc_n<int32_t>(ctx, nnz);
  info.coef = alloc_n<acc_t>(ctx, nnz);
  info.bag_scale = alloc_n<acc_t>(ctx, B);
  launch_elems(ctx, &lookup_bag_kernel<index_t>, nnz, indices, offsets, B, nnz, num_rows, info.bag);
  launch_elems(ctx, &bag_scale_kernel<acc_t, index_t>, B, offsets, B, nnz, pooling_mode, info.bag_scale);
  launch_elems(
      ctx, &lookup_coef_kernel<scalar_t, acc_t>, nnz, static_cast<const int32_t*>(info.bag), psw,
      static_cast<const acc_t*>(info.bag_scale), nnz, info.coef);
  return info;
}

template <typename scalar_t, typename index_t, typename Ctx>
LookupInfo<acc_type<scalar_t>> compute_lookup_info(
    Ctx& ctx,
    const LookupBatch<scalar_t, index_t>& in) {
  return compute_lookup_info(
      ctx, in.indices, in.offsets, in.psw, in.B, in.nnz, in.t.num_rows, in.pooling_mode);
}

// ---------------------------------------------------------------------------------------------
// Plan kernels
// ---------------------------------------------------------------------------------------------

// mode 0: key = (bag << gbits) | group, invalid -> B << gbits (the largest).
// mode 1: key = group (first of two sorts), invalid -> 0 (the bag sort puts them last).
template <typename index_t, typename key_t>
__global__ void plan_lookup_kernel(
    const index_t* __restrict__ indices,
    const int32_t* __restrict__ lookup_bag,
    int64_t nnz,
    int64_t last_rows,
    int64_t B,
    int gbits,
    int mode,
    key_t* __restrict__ keys,
    int32_t* __restrict__ vals,
    int32_t* __restrict__ lookup_last,
    int64_t* __restrict__ lookup_group) {
  TORCHREC_TT_GRID_STRIDE(j, nnz) {
    const int32_t b = lookup_bag[j];
    const bool valid = b >= 0;
    const int64_t idx = valid ? static_cast<int64_t>(indices[j]) : 0;
    const int64_t g = idx / last_rows;
    lookup_last[j] = static_cast<int32_t>(idx - g * last_rows);
    lookup_group[j] = valid ? g : -1;
    if (mode == 0) {
      keys[j] = valid ? static_cast<key_t>((static_cast<key_t>(b) << gbits) | static_cast<key_t>(g))
                      : static_cast<key_t>(static_cast<key_t>(B) << gbits);
    } else {
      keys[j] = valid ? static_cast<key_t>(g) : key_t(0);
    }
    vals[j] = static_cast<int32_t>(j);
  }
}

// Second sort of the two-pass path: key = bag (B for invalid lookups), in the group-sorted order.
template <typename Unused = void>
__global__ void plan_bag_keys_kernel(
    const int32_t* __restrict__ order,
    const int32_t* __restrict__ lookup_bag,
    int64_t nnz,
    int64_t B,
    uint32_t* __restrict__ keys,
    int32_t* __restrict__ vals) {
  TORCHREC_TT_GRID_STRIDE(p, nnz) {
    const int32_t j = order[p];
    const int32_t b = lookup_bag[j];
    keys[p] = b >= 0 ? static_cast<uint32_t>(b) : static_cast<uint32_t>(B);
    vals[p] = j;
  }
}

// flags[p] = 1 where sorted position p starts a segment (a new (bag, group) among valid lookups).
template <typename Unused = void>
__global__ void plan_segment_flags_kernel(
    const int32_t* __restrict__ perm,
    const int32_t* __restrict__ lookup_bag,
    const int64_t* __restrict__ lookup_group,
    int64_t nnz,
    int32_t* __restrict__ flags) {
  TORCHREC_TT_GRID_STRIDE(p, nnz) {
    const int32_t j = perm[p];
    const int32_t b = lookup_bag[j];
    int32_t head = 0;
    if (b >= 0) {
      if (p == 0) {
        head = 1;
      } else {
        const int32_t jp = perm[p - 1];
        head = (lookup_bag[jp] != b || lookup_group[jp] != lookup_group[j]) ? 1 : 0;
      }
    }
    flags[p] = head;
  }
}

template <typename key_t>
__global__ void plan_fill_slot_keys_kernel(
    int64_t n,
    key_t sentinel,
    key_t* __restrict__ keys,
    int32_t* __restrict__ vals) {
  TORCHREC_TT_GRID_STRIDE(s, n) {
    keys[s] = sentinel;
    vals[s] = static_cast<int32_t>(s);
  }
}

template <typename key_t>
__global__ void plan_segment_write_kernel(
    const int32_t* __restrict__ perm,
    const int32_t* __restrict__ lookup_bag,
    const int64_t* __restrict__ lookup_group,
    const int32_t* __restrict__ segpos,
    int64_t nnz,
    int64_t* __restrict__ lookup_segment,
    int64_t* __restrict__ segment_bag,
    int64_t* __restrict__ segment_group,
    int32_t* __restrict__ seg_start,
    int64_t* __restrict__ counts,
    key_t* __restrict__ slot_keys) {
  TORCHREC_TT_GRID_STRIDE(p, nnz) {
    const int32_t j = perm[p];
    const int32_t b = lookup_bag[j];
    if (b < 0) {
      lookup_segment[j] = -1;
      continue;
    }
    const int32_t s = segpos[p] - 1;
    lookup_segment[j] = s;
    if (p == 0 || segpos[p - 1] != segpos[p]) {
      const int64_t g = lookup_group[j];
      segment_bag[s] = b;
      segment_group[s] = g;
      seg_start[s] = static_cast<int32_t>(p);
      slot_keys[s] = static_cast<key_t>(g);
    }
    if (p + 1 == nnz || lookup_bag[perm[p + 1]] < 0) { // last valid lookup
      seg_start[s + 1] = static_cast<int32_t>(p + 1);
      counts[0] = s + 1;
    }
  }
}

template <typename key_t>
__global__ void plan_slot_flags_kernel(
    const key_t* __restrict__ keys,
    int64_t n,
    key_t sentinel,
    int32_t* __restrict__ flags) {
  TORCHREC_TT_GRID_STRIDE(q, n) {
    const key_t k = keys[q];
    flags[q] = (k != sentinel && (q == 0 || keys[q - 1] != k)) ? 1 : 0;
  }
}

// keys: the segments' groups sorted (sentinel past S); segs: the segment at each sorted position.
template <typename key_t>
__global__ void plan_slot_write_kernel(
    const key_t* __restrict__ keys,
    const int32_t* __restrict__ segs,
    const int32_t* __restrict__ slotpos,
    int64_t n,
    key_t sentinel,
    int64_t* __restrict__ segment_slot,
    int64_t* __restrict__ slot_group,
    int64_t* __restrict__ counts,
    uint32_t* __restrict__ slot_run_keys) {
  TORCHREC_TT_GRID_STRIDE(q, n) {
    const key_t k = keys[q];
    if (k == sentinel) {
      slot_run_keys[q] = 0xffffffffu;
      continue;
    }
    const int32_t u = slotpos[q] - 1;
    segment_slot[segs[q]] = u;
    slot_run_keys[q] = static_cast<uint32_t>(u);
    if (q == 0 || keys[q - 1] != k) {
      slot_group[u] = static_cast<int64_t>(k);
    }
    if (q + 1 == n || keys[q + 1] == sentinel) {
      counts[1] = u + 1;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host orchestration
// ---------------------------------------------------------------------------------------------

// The op's outputs (int64, nnz entries each; counts: 2). Null pointers are allocated from the context.
struct PlanOutputs {
  int64_t* lookup_segment = nullptr;
  int64_t* segment_bag = nullptr;
  int64_t* segment_group = nullptr;
  int64_t* segment_slot = nullptr;
  int64_t* slot_group = nullptr;
  int64_t* counts = nullptr; // [S, U]
};

struct DevicePlan : PlanOutputs {
  int32_t* perm = nullptr; // [nnz] lookups in (bag, group, j) order; invalid ones last
  int32_t* lookup_last = nullptr; // [nnz] last TT digit of lookup j
  int64_t* lookup_group = nullptr; // [nnz] group of lookup j (-1 invalid)
  int32_t* seg_start = nullptr; // [nnz + 1] segment s = perm[seg_start[s] .. seg_start[s+1])
  int32_t* segs_by_slot = nullptr; // [nnz] segments in (group, bag) order
  uint32_t* slot_run_keys = nullptr; // [nnz] slot of segs_by_slot[q]; 0xffffffff past S
  int64_t slots_ub = 0; // upper bound on U
};

namespace detail {

template <typename key_t, typename index_t, typename Ctx>
void plan_sort_single(
    Ctx& ctx,
    DevicePlan& p,
    const index_t* indices,
    const int32_t* lookup_bag,
    int64_t B,
    int64_t nnz,
    int64_t last_rows,
    int gbits,
    int bbits) {
  key_t* keys = alloc_n<key_t>(ctx, nnz);
  key_t* keys_sorted = alloc_n<key_t>(ctx, nnz);
  int32_t* vals = alloc_n<int32_t>(ctx, nnz);
  launch_elems(
      ctx, &plan_lookup_kernel<index_t, key_t>, nnz, indices, lookup_bag, nnz, last_rows, B, gbits,
      0, keys, vals, p.lookup_last, p.lookup_group);
  radix_sort_pairs(ctx, keys, keys_sorted, vals, p.perm, static_cast<int>(nnz), gbits + bbits);
}

template <typename index_t, typename Ctx>
void plan_sort_two_pass(
    Ctx& ctx,
    DevicePlan& p,
    const index_t* indices,
    const int32_t* lookup_bag,
    int64_t B,
    int64_t nnz,
    int64_t last_rows,
    int gbits,
    int bbits) {
  uint64_t* gkeys = alloc_n<uint64_t>(ctx, nnz);
  uint64_t* gkeys_sorted = alloc_n<uint64_t>(ctx, nnz);
  int32_t* vals = alloc_n<int32_t>(ctx, nnz);
  int32_t* vals_sorted = alloc_n<int32_t>(ctx, nnz);
  launch_elems(
      ctx, &plan_lookup_kernel<index_t, uint64_t>, nnz, indices, lookup_bag, nnz, last_rows, B,
      gbits, 1, gkeys, vals, p.lookup_last, p.lookup_group);
  radix_sort_pairs(ctx, gkeys, gkeys_sorted, vals, vals_sorted, static_cast<int>(nnz), gbits);
  uint32_t* bkeys = alloc_n<uint32_t>(ctx, nnz);
  uint32_t* bkeys_sorted = alloc_n<uint32_t>(ctx, nnz);
  launch_elems(
      ctx, &plan_bag_keys_kernel<>, nnz, static_cast<const int32_t*>(vals_sorted), lookup_bag, nnz, B,
      bkeys, vals);
  radix_sort_pairs(ctx, bkeys, bkeys_sorted, vals, p.perm, static_cast<int>(nnz), bbits);
}

template <typename key_t, typename Ctx>
void plan_segments_and_slots(
    Ctx& ctx,
    DevicePlan& p,
    const int32_t* lookup_bag,
    int64_t nnz,
    int gbits) {
  int32_t* flags = alloc_n<int32_t>(ctx, nnz);
  int32_t* pos = alloc_n<int32_t>(ctx, nnz);
  launch_elems(
      ctx, &plan_segment_flags_kernel<>, nnz, static_cast<const int32_t*>(p.perm), lookup_bag,
      static_cast<const int64_t*>(p.lookup_group), nnz, flags);
  inclusive_sum(ctx, flags, pos, static_cast<int>(nnz));

  const key_t sentinel = static_cast<key_t>(key_t{1} << gbits); // > every group < 2^gbits
  key_t* skeys = alloc_n<key_t>(ctx, nnz);
  key_t* skeys_sorted = alloc_n<key_t>(ctx, nnz);
  int32_t* svals = alloc_n<int32_t>(ctx, nnz);
  launch_elems(ctx, &plan_fill_slot_keys_kernel<key_t>, nnz, nnz, sentinel, skeys, svals);
  launch_elems(
      ctx, &plan_segment_write_kernel<key_t>, nnz, static_cast<const int32_t*>(p.perm), lookup_bag,
      static_cast<const int64_t*>(p.lookup_group), static_cast<const int32_t*>(pos), nnz,
      p.lookup_segment, p.segment_bag, p.segment_group, p.seg_start, p.counts, skeys);
  radix_sort_pairs(ctx, skeys, skeys_sorted, svals, p.segs_by_slot, static_cast<int>(nnz), gbits + 1);
  launch_elems(
      ctx, &plan_slot_flags_kernel<key_t>, nnz, static_cast<const key_t*>(skeys_sorted), nnz,
      sentinel, flags);
  inclusive_sum(ctx, flags, pos, static_cast<int>(nnz));
  launch_elems(
      ctx, &plan_slot_write_kernel<key_t>, nnz, static_cast<const key_t*>(skeys_sorted),
      static_cast<const int32_t*>(p.segs_by_slot), static_cast<const int32_t*>(pos), nnz, sentinel,
      p.segment_slot, p.slot_group, p.counts, p.slot_run_keys);
}

} // namespace detail

// Builds the plan. lookup_bag from lookup_bag_kernel (-1 = invalid lookup). Every valid lookup's
// group must be < max_groups (fwd/bwd: the table's number of groups; the standalone op: a bound
// from the index dtype). Requires 1 <= B, nnz < 2^31 (checked by the caller).
template <typename index_t, typename Ctx>
DevicePlan build_plan(
    Ctx& ctx,
    const index_t* indices,
    const int32_t* lookup_bag,
    int64_t B,
    int64_t nnz,
    int64_t last_rows,
    int64_t max_groups,
    const PlanOutputs& outputs) {
  DevicePlan p;
  static_cast<PlanOutputs&>(p) = outputs;
  if (p.lookup_segment == nullptr) {
    p.lookup_segment = alloc_n<int64_t>(ctx, nnz);
  }
  if (p.segment_bag == nullptr) {
    p.segment_bag = alloc_n<int64_t>(ctx, nnz);
  }
  if (p.segment_group == nullptr) {
    p.segment_group = alloc_n<int64_t>(ctx, nnz);
  }
  if (p.segment_slot == nullptr) {
    p.segment_slot = alloc_n<int64_t>(ctx, nnz);
  }
  if (p.slot_group == nullptr) {
    p.slot_group = alloc_n<int64_t>(ctx, nnz);
  }
  if (p.counts == nullptr) {
    p.counts = alloc_n<int64_t>(ctx, 2);
  }
  memset_async(ctx, p.counts, 0, 2 * sizeof(int64_t));
  p.slots_ub = tt_min<int64_t>(nnz, max_groups);
  if (nnz <= 0) {
    return p;
  }
  p.perm = alloc_n<int32_t>(ctx, nnz);
  p.lookup_last = alloc_n<int32_t>(ctx, nnz);
  p.lookup_group = alloc_n<int64_t>(ctx, nnz);
  p.seg_start = alloc_n<int32_t>(ctx, nnz + 1);
  p.segs_by_slot = alloc_n<int32_t>(ctx, nnz);
  p.slot_run_keys = alloc_n<uint32_t>(ctx, nnz);

  const int gbits = bit_width_u64(static_cast<uint64_t>(max_groups > 1 ? max_groups - 1 : 0));
  const int bbits = bit_width_u64(static_cast<uint64_t>(B));
  if (gbits + bbits <= 32) {
    detail::plan_sort_single<uint32_t>(ctx, p, indices, lookup_bag, B, nnz, last_rows, gbits, bbits);
  } else if (gbits + bbits <= 64) {
    detail::plan_sort_single<uint64_t>(ctx, p, indices, lookup_bag, B, nnz, last_rows, gbits, bbits);
  } else {
    detail::plan_sort_two_pass(ctx, p, indices, lookup_bag, B, nnz, last_rows, gbits, bbits);
  }
  if (gbits + 1 <= 32) {
    detail::plan_segments_and_slots<uint32_t>(ctx, p, lookup_bag, nnz, gbits);
  } else {
    detail::plan_segments_and_slots<uint64_t>(ctx, p, lookup_bag, nnz, gbits);
  }
  return p;
}

// Bound on the groups of valid indices of a dtype when the table is unknown (standalone op).
inline int64_t max_groups_for_index_bytes(size_t index_bytes, int64_t last_rows) {
  const int64_t max_index = index_bytes <= 4 ? int64_t{0x7fffffff} : int64_t{0x7fffffffffffffff};
  const int64_t max_group = max_index / last_rows;
  // Capped so that the count does not overflow (int64 indices, last_rows = 1); the cap still needs
  // the same number of key bits as the largest group.
  return (max_group < int64_t{0x7fffffffffffffff} ? max_group : max_group - 1) + 1;
}

// The standalone group_plan op: every index >= 0 is valid (no table bound); negative indices and
// lookups outside every bag get lookup_segment = -1. `out` holds caller-provided buffers.
template <typename index_t, typename Ctx>
void group_plan_op(
    Ctx& ctx,
    const index_t* indices,
    const index_t* offsets,
    int64_t B,
    int64_t nnz,
    int64_t last_rows,
    const PlanOutputs& out) {
  if (nnz <= 0) {
    memset_async(ctx, out.counts, 0, 2 * sizeof(int64_t));
    return;
  }
  int32_t* bag = alloc_n<int32_t>(ctx, nnz);
  launch_elems(ctx, &lookup_bag_kernel<index_t>, nnz, indices, offsets, B, nnz, int64_t{-1}, bag);
  build_plan(
      ctx, indices, static_cast<const int32_t*>(bag), B, nnz, last_rows,
      max_groups_for_index_bytes(sizeof(index_t), last_rows), out);
}

} // namespace torchrec_tt::gpu
