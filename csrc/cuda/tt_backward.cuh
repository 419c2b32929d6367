// Backward kernels of torchrec_tt::tt_embedding_bag on the GPU (tt_embedding_bag_backward).
//
// Every core gradient is a sum of per-item contributions (E values each) into rows of the core
// (a row = one slice core_k[i]). All of them go through one "sorted chunk reduction":
//   items sorted by destination row (stable radix sort) -> chunks of <= K consecutive items with one
//   destination (run heads and every K-th position; flags + scan) -> chunk_reduce_kernel: one block per
//   chunk (x) and tile of E (y) sums its items' contributions in registers, then either
//     default:        atomicAdd into the destination row (one atomic per chunk and element), or
//     deterministic:  writes a per-chunk partial; chunk_combine_kernel sums each run's partials in
//                     chunk order into the row (no float atomics: bit-identical across runs).
//
// grt (variant 1), with the plan of the forward (recomputed) and g_b = grad_output[b] (N' x n_l):
//   grt_prefix_kernel (store_all)  A_0..A_{d-2} = Q of every slot, row-major
//   grt_bwd_bag_kernel   block per bag, warp per segment: dS_s = Q^T g_b (R' x n_l) -> global, and
//                        psw_grad[j] = scale_b <core_last[last_j], dS_s>
//   last core            items = lookups sorted by last digit: dcore_last[last_j] += c_j dS_s(j)
//   dQ                   items = segments sorted by slot (plan order): dQ_u += g_b(s) @ S_s^T, S_s rebuilt
//                        in shared memory from the segment's lookups
//   grt_slot_backprop    block per slot: dA_{k-1} = dA_k' C_k^T for k = d-2..1 (once per slot)
//   prefix cores         items = slots sorted by digit i_k: dcore_k[i_k] += A_{k-1}^T dA_k'
// No per-lookup chains.
//
// tt (variant 0): per core k, items = lookups sorted by digit i_k; each item recomputes its chain
// (forward to A_{k-1}, backward from c_j g_b to dA_k) in shared memory and contributes
// A_{k-1}^T dA_k' (the per-lookup chain backprop of TT-Rec). psw_grad[j] = scale_b <W[idx_j], g_b>.
#pragma once

#include "tt_chain.cuh"
#include "tt_cuda_common.cuh"
#include "tt_device_primitives.cuh"
#include "tt_forward.cuh"
#include "tt_group_plan.cuh"

namespace torchrec_tt::gpu {

constexpr int kChunkThreads = 256;
// Items per chunk (TORCHREC_TT_CHUNK_ITEMS overrides them all: the emulation test uses tiny chunks).
#ifdef TORCHREC_TT_CHUNK_ITEMS
constexpr int kChunkLastCore = TORCHREC_TT_CHUNK_ITEMS;
constexpr int kChunkSlot = TORCHREC_TT_CHUNK_ITEMS;
constexpr int kChunkPrefixCore = TORCHREC_TT_CHUNK_ITEMS;
constexpr int kChunkTT = TORCHREC_TT_CHUNK_ITEMS;
#else
constexpr int kChunkLastCore = 64; // lookups into a last-core slice (grt)
constexpr int kChunkSlot = 16; // segments into a slot's dQ (grt)
constexpr int kChunkPrefixCore = 8; // slots into a prefix-core slice (grt)
constexpr int kChunkTT = 64; // lookups into a core slice (tt)
#endif

// ---------------------------------------------------------------------------------------------
// Sorted chunk reduction
// ---------------------------------------------------------------------------------------------

// flags[p] = 1 where a chunk starts: a valid key (< key_limit) that starts a run or sits at p % K == 0.
template <typename Unused = void>
__global__ void chunk_flags_kernel(
    const uint32_t* __restrict__ keys,
    int64_t n,
    uint32_t key_limit,
    int K,
    int32_t* __restrict__ flags) {
  TORCHREC_TT_GRID_STRIDE(p, n) {
    const uint32_t k = keys[p];
    flags[p] = (k < key_limit && (p == 0 || keys[p - 1] != k || p % K == 0)) ? 1 : 0;
  }
}

template <typename Unused = void>
__global__ void chunk_write_kernel(
    const uint32_t* __restrict__ keys,
    int64_t n,
    uint32_t key_limit,
    const int32_t* __restrict__ cpos,
    int32_t* __restrict__ chunk_start,
    uint32_t* __restrict__ chunk_key,
    int32_t* __restrict__ num_chunks) {
  TORCHREC_TT_GRID_STRIDE(p, n) {
    const uint32_t k = keys[p];
    if (k >= key_limit) {
      continue;
    }
    const int32_t c = cpos[p] - 1;
    if (p == 0 || cpos[p - 1] != cpos[p]) {
      chunk_start[c] = static_cast<int32_t>(p);
      chunk_key[c] = k;
    }
    if (p + 1 == n || keys[p + 1] >= key_limit) {
      chunk_start[c + 1] = static_cast<int32_t>(p + 1);
      *num_chunks = c + 1;
    }
  }
}

// Functor concept F (passed by value):
//   using acc_t; static constexpr bool kStaged;   // kStaged: item() fills shared memory
//   struct Elem; struct Item;
//   __device__ Elem elem(int e) const;            // per-thread element context (computed once)
//   __device__ Item item(int32_t item, acc_t* smem) const;  // all threads of the block call it
//   __device__ acc_t value(const Item&, const Elem&, const acc_t* smem) const;
template <typename F, int EPT>
__global__ void __launch_bounds__(kChunkThreads) chunk_reduce_kernel(
    F f,
    const int32_t* __restrict__ items,
    const int32_t* __restrict__ chunk_start,
    const uint32_t* __restrict__ chunk_key,
    const int32_t* __restrict__ num_chunks,
    int E,
    typename F::acc_t* dest,
    int64_t dest_stride,
    typename F::acc_t* __restrict__ partial) {
  using acc_t = typename F::acc_t;
  TORCHREC_TT_DYNAMIC_SMEM(acc_t, smem);
  const int nc = *num_chunks;
  const int base = static_cast<int>(blockIdx.y) * static_cast<int>(blockDim.x) * EPT + threadIdx.x;
  typename F::Elem el[EPT];
#pragma unroll
  for (int i = 0; i < EPT; ++i) {
    const int e = base + i * static_cast<int>(blockDim.x);
    el[i] = f.elem(e < E ? e : 0);
  }
  for (int c = blockIdx.x; c < nc; c += gridDim.x) {
    acc_t acc[EPT];
#pragma unroll
    for (int i = 0; i < EPT; ++i) {
      acc[i] = acc_t(0);
    }
    const int q0 = chunk_start[c];
    const int q1 = chunk_start[c + 1];
    for (int q = q0; q < q1; ++q) {
      const typename F::Item it = f.item(items[q], smem);
      if (F::kStaged) {
        __syncthreads();
      }
#pragma unroll
      for (int i = 0; i < EPT; ++i) {
        if (base + i * static_cast<int>(blockDim.x) < E) {
          acc[i] += f.value(it, el[i], smem);
        }
      }
      if (F::kStaged) {
        __syncthreads();
      }
    }
    const int64_t row = chunk_key[c];
#pragma unroll
    for (int i = 0; i < EPT; ++i) {
      const int e = base + i * static_cast<int>(blockDim.x);
      if (e < E) {
        if (partial != nullptr) {
          partial[static_cast<int64_t>(c) * E + e] = acc[i];
        } else {
          atomicAdd(dest + row * dest_stride + e, acc[i]);
        }
      }
    }
  }
}

// Deterministic mode: the first chunk of every run sums the run's partials in chunk order.
template <typename acc_t>
__global__ void chunk_combine_kernel(
    const acc_t* __restrict__ partial,
    const uint32_t* __restrict__ chunk_key,
    const int32_t* __restrict__ num_chunks,
    int E,
    acc_t* dest,
    int64_t dest_stride) {
  const int nc = *num_chunks;
  for (int c = blockIdx.x; c < nc; c += gridDim.x) {
    const uint32_t key = chunk_key[c];
    if (c > 0 && chunk_key[c - 1] == key) {
      continue;
    }
    for (int e = blockIdx.y * blockDim.x + threadIdx.x; e < E; e += gridDim.y * blockDim.x) {
      acc_t v = acc_t(0);
      for (int c2 = c; c2 < nc && chunk_key[c2] == key; ++c2) {
        v += partial[static_cast<int64_t>(c2) * E + e];
      }
      dest[static_cast<int64_t>(key) * dest_stride + e] = v;
    }
  }
}

// Sums f's contributions of n items into dest[key * dest_stride + e], e < E. items/keys are sorted
// by key; invalid items carry keys >= key_limit (and sort last). runs_ub bounds the distinct keys.
template <typename F, typename Ctx>
void reduce_sorted(
    Ctx& ctx,
    const F& f,
    const int32_t* items,
    const uint32_t* keys,
    int64_t n,
    uint32_t key_limit,
    int64_t runs_ub,
    int K,
    int E,
    size_t smem,
    bool deterministic,
    typename F::acc_t* dest,
    int64_t dest_stride) {
  using acc_t = typename F::acc_t;
  if (n <= 0 || E <= 0) {
    return;
  }
  const int64_t chunks_ub = ceil_div_i64(n, K) + tt_min<int64_t>(n, runs_ub);
  int32_t* flags = alloc_n<int32_t>(ctx, n);
  int32_t* cpos = alloc_n<int32_t>(ctx, n);
  int32_t* chunk_start = alloc_n<int32_t>(ctx, chunks_ub + 1);
  uint32_t* chunk_key = alloc_n<uint32_t>(ctx, chunks_ub);
  int32_t* num_chunks = alloc_n<int32_t>(ctx, 1);
  memset_async(ctx, num_chunks, 0, sizeof(int32_t));
  launch_elems(ctx, &chunk_flags_kernel<>, n, keys, n, key_limit, K, flags);
  inclusive_sum(ctx, flags, cpos, static_cast<int>(n));
  launch_elems(
      ctx, &chunk_write_kernel<>, n, keys, n, key_limit, static_cast<const int32_t*>(cpos), chunk_start,
      chunk_key, num_chunks);
  acc_t* partial = deterministic ? alloc_n<acc_t>(ctx, chunks_ub * E) : nullptr;

  int threads = kChunkThreads;
  int ept = 1;
  if (E <= kChunkThreads) {
    threads = ((E + kWarpSize - 1) / kWarpSize) * kWarpSize;
  } else if (E <= 2 * kChunkThreads) {
    ept = 2;
  } else if (E <= 4 * kChunkThreads) {
    ept = 4;
  } else {
    ept = 8;
  }
  const int64_t tiles = ceil_div_i64(E, static_cast<int64_t>(threads) * ept);
  const dim3 grid(grid_for_items(chunks_ub), static_cast<unsigned int>(tiles));
  const auto launch = [&](auto ept_c) {
    constexpr int EPT = decltype(ept_c)::value;
    const auto kernel = &chunk_reduce_kernel<F, EPT>;
    set_dynamic_smem(ctx, kernel, smem);
    TORCHREC_TT_LAUNCH(
        kernel, grid, threads, smem, ctx.stream, f, items, static_cast<const int32_t*>(chunk_start),
        static_cast<const uint32_t*>(chunk_key), static_cast<const int32_t*>(num_chunks), E, dest,
        dest_stride, partial);
    ctx.check_launch();
  };
  switch (ept) {
    case 1:
      launch(std::integral_constant<int, 1>{});
      break;
    case 2:
      launch(std::integral_constant<int, 2>{});
      break;
    case 4:
      launch(std::integral_constant<int, 4>{});
      break;
    default:
      launch(std::integral_constant<int, 8>{});
      break;
  }
  if (deterministic) {
    const auto kernel = &chunk_combine_kernel<acc_t>;
    const dim3 cgrid(
        grid_for_items(chunks_ub), static_cast<unsigned int>(ceil_div_i64(E, kChunkThreads)));
    TORCHREC_TT_LAUNCH(
        kernel, cgrid, kChunkThreads, 0, ctx.stream, static_cast<const acc_t*>(partial),
        static_cast<const uint32_t*>(chunk_key), static_cast<const int32_t*>(num_chunks), E, dest,
        dest_stride);
    ctx.check_launch();
  }
}

// Sorts n (key, item) pairs with keys <= max_key (max_key = the invalid sentinel).
template <typename Ctx>
void sort_by_key(
    Ctx& ctx,
    const uint32_t* keys,
    const int32_t* items,
    uint32_t* keys_sorted,
    int32_t* items_sorted,
    int64_t n,
    uint64_t max_key) {
  radix_sort_pairs(ctx, keys, keys_sorted, items, items_sorted, static_cast<int>(n), bit_width_u64(max_key));
}

// (key, item) pairs for sort_by_key: the key kernels write keys/items, the sort the *_sorted ones.
struct KeySortBuffers {
  uint32_t* keys = nullptr;
  uint32_t* keys_sorted = nullptr;
  int32_t* items = nullptr;
  int32_t* items_sorted = nullptr;
};

template <typename Ctx>
KeySortBuffers alloc_key_sort_buffers(Ctx& ctx, int64_t n) {
  KeySortBuffers kb;
  kb.keys = alloc_n<uint32_t>(ctx, n);
  kb.keys_sorted = alloc_n<uint32_t>(ctx, n);
  kb.items = alloc_n<int32_t>(ctx, n);
  kb.items_sorted = alloc_n<int32_t>(ctx, n);
  return kb;
}

// Sorts the n pairs of kb by key (keys <= max_key).
template <typename Ctx>
void sort_by_key(Ctx& ctx, const KeySortBuffers& kb, int64_t n, uint64_t max_key) {
  sort_by_key(ctx, kb.keys, kb.items, kb.keys_sorted, kb.items_sorted, n, max_key);
}

// Divisor of digit k in a mixed-radix number whose least significant digit is `last`:
// prod m_{k+1..last}.
inline int64_t digit_divisor(const TTDims& t, int k, int last) {
  int64_t div = 1;
  for (int kk = k + 1; kk <= last; ++kk) {
    div *= t.m[kk];
  }
  return div;
}

// ---------------------------------------------------------------------------------------------
// Key kernels
// ---------------------------------------------------------------------------------------------

// grt last core: key = last digit of valid lookups, m_last otherwise.
template <typename Unused = void>
__global__ void last_keys_kernel(
    const int32_t* __restrict__ lookup_bag,
    const int32_t* __restrict__ lookup_last,
    int64_t nnz,
    uint32_t m_last,
    uint32_t* __restrict__ keys,
    int32_t* __restrict__ items) {
  TORCHREC_TT_GRID_STRIDE(j, nnz) {
    keys[j] = lookup_bag[j] >= 0 ? static_cast<uint32_t>(lookup_last[j]) : m_last;
    items[j] = static_cast<int32_t>(j);
  }
}

// grt prefix core k: key = digit k of slot u's group (u < U), m_k otherwise; div = prod m_{k+1..d-2}.
template <typename Unused = void>
__global__ void slot_digit_keys_kernel(
    const int64_t* __restrict__ slot_group,
    const int64_t* __restrict__ counts,
    int64_t n,
    int64_t div,
    int64_t mk,
    uint32_t* __restrict__ keys,
    int32_t* __restrict__ items) {
  const int64_t U = counts[1];
  TORCHREC_TT_GRID_STRIDE(u, n) {
    keys[u] = u < U ? static_cast<uint32_t>((slot_group[u] / div) % mk) : static_cast<uint32_t>(mk);
    items[u] = static_cast<int32_t>(u);
  }
}

// tt core k: key = digit k of the row of valid lookups, m_k otherwise; div = prod m_{k+1..d-1}.
template <typename index_t>
__global__ void tt_digit_keys_kernel(
    const index_t* __restrict__ indices,
    const int32_t* __restrict__ lookup_bag,
    int64_t nnz,
    int64_t div,
    int64_t mk,
    uint32_t* __restrict__ keys,
    int32_t* __restrict__ items) {
  TORCHREC_TT_GRID_STRIDE(j, nnz) {
    keys[j] = lookup_bag[j] >= 0
        ? static_cast<uint32_t>((static_cast<int64_t>(indices[j]) / div) % mk)
        : static_cast<uint32_t>(mk);
    items[j] = static_cast<int32_t>(j);
  }
}

// ---------------------------------------------------------------------------------------------
// Contribution functors
// ---------------------------------------------------------------------------------------------

// grt last core: item = lookup j, contribution c_j * dS[segment(j)] (R' x n_l).
template <typename acc_t_>
struct GrtLastCoreGrad {
  using acc_t = acc_t_;
  static constexpr bool kStaged = false;
  struct Elem {
    int e;
  };
  struct Item {
    acc_t c;
    const acc_t* row;
  };
  const acc_t* coef;
  const int64_t* lookup_segment;
  const acc_t* dS;
  int Rn;
  __device__ __forceinline__ Elem elem(int e) const {
    return Elem{e};
  }
  __device__ __forceinline__ Item item(int32_t j, acc_t* /*smem*/) const {
    return Item{coef[j], dS + lookup_segment[j] * Rn};
  }
  __device__ __forceinline__ acc_t value(const Item& it, const Elem& el, const acc_t* /*smem*/) const {
    return it.c * it.row[el.e];
  }
};

// grt dQ: item = segment s, contribution g_b @ S_s^T (N' x R'), element e = (r, a).
// Shared memory: g_b (N) then S_s^T (n_l x R').
template <typename scalar_t, typename acc_t_>
struct GrtSlotGrad {
  using acc_t = acc_t_;
  static constexpr bool kStaged = true;
  struct Elem {
    int r;
    int a;
  };
  struct Item {
    int unused;
  };
  int N;
  int Rp;
  int nl;
  int Rn;
  const scalar_t* grad_out;
  const scalar_t* core_last;
  const int64_t* segment_bag;
  const int32_t* seg_start;
  const int32_t* perm;
  const acc_t* coef;
  const int32_t* lookup_last;
  __device__ __forceinline__ Elem elem(int e) const {
    const int r = e / Rp;
    return Elem{r, e - r * Rp};
  }
  __device__ __forceinline__ Item item(int32_t s, acc_t* smem) const {
    acc_t* gs = smem;
    acc_t* st = smem + N;
    const int64_t b = segment_bag[s];
    for (int o = threadIdx.x; o < N; o += blockDim.x) {
      gs[o] = to_acc(grad_out[b * N + o]);
    }
    const int p0 = seg_start[s];
    const int p1 = seg_start[s + 1];
    for (int e = threadIdx.x; e < Rn; e += blockDim.x) {
      const int a = e / nl;
      const int c = e - a * nl;
      acc_t v = acc_t(0);
      for (int p = p0; p < p1; ++p) {
        const int32_t j = perm[p];
        v += coef[j] * to_acc(core_last[static_cast<int64_t>(lookup_last[j]) * Rn + e]);
      }
      st[c * Rp + a] = v;
    }
    return Item{0};
  }
  __device__ __forceinline__ acc_t value(const Item& /*it*/, const Elem& el, const acc_t* smem) const {
    const acc_t* gs = smem;
    const acc_t* st = smem + N;
    acc_t v = acc_t(0);
    for (int c = 0; c < nl; ++c) {
      v += gs[el.r * nl + c] * st[c * Rp + el.a];
    }
    return v;
  }
};

// grt prefix core k: item = slot u, contribution A_{k-1}^T dA_k' (R[k] x n_k R[k+1]) from the slot's
// activation records (act: forward, dact: gradients; A_{-1} = [1] for k = 0).
template <typename acc_t_>
struct GrtPrefixCoreGrad {
  using acc_t = acc_t_;
  static constexpr bool kStaged = false;
  struct Elem {
    int a;
    int rem;
  };
  struct Item {
    const acc_t* Aprev;
    const acc_t* dA;
  };
  const acc_t* act;
  const acc_t* dact;
  int64_t rec;
  int off_prev;
  int off_k;
  int Nprev;
  int Rk;
  int L;
  int first;
  __device__ __forceinline__ Elem elem(int e) const {
    const int a = e / L;
    return Elem{a, e - a * L};
  }
  __device__ __forceinline__ Item item(int32_t u, acc_t* /*smem*/) const {
    return Item{first ? nullptr : act + u * rec + off_prev, dact + u * rec + off_k};
  }
  __device__ __forceinline__ acc_t value(const Item& it, const Elem& el, const acc_t* /*smem*/) const {
    return core_grad_elem(it.Aprev, it.dA, Nprev, Rk, L, el.a, el.rem);
  }
};

// tt core k: item = lookup j; the item's chain is recomputed in shared memory (3 buffers of
// max_chain_all): A_0..A_{k-1} forward (ping-pong in a0/a1), then dA_{d-1} = c_j g_b down to dA_k
// backward (ping-pong in d0 and the forward buffer that does not hold A_{k-1}).
template <typename scalar_t, typename acc_t_, typename index_t>
struct TTCoreGrad {
  using acc_t = acc_t_;
  static constexpr bool kStaged = true;
  struct Elem {
    int a;
    int rem;
  };
  struct Item {
    const acc_t* Aprev;
    const acc_t* dA;
  };
  TTDims t;
  CorePtrs<scalar_t> cores;
  const index_t* indices;
  const int32_t* lookup_bag;
  const acc_t* coef;
  const scalar_t* grad_out;
  int k;
  int Nprev;
  int Rk;
  int L;
  __device__ __forceinline__ Elem elem(int e) const {
    const int a = e / L;
    return Elem{a, e - a * L};
  }
  __device__ Item item(int32_t j, acc_t* smem) const {
    const int M = t.max_chain_all;
    acc_t* a0 = smem;
    acc_t* a1 = smem + M;
    acc_t* d0 = smem + 2 * M;
    acc_t* d1 = a1; // free unless it ends up holding A_{k-1}
    int64_t digits[kMaxCoresGpu] = {};
    row_digits_dev(t, static_cast<int64_t>(indices[j]), digits);
    const acc_t* Aprev = nullptr;
    if (k >= 1) {
      block_chain_first(
          cores.p[0] + digits[0] * t.slice[0], t.n[0] * t.R[1], a0, static_cast<acc_t*>(nullptr),
          static_cast<acc_t*>(nullptr), 0);
      __syncthreads();
      acc_t* cur = a0;
      acc_t* nxt = a1;
      for (int kk = 1; kk <= k - 1; ++kk) {
        block_chain_step(
            cur, cores.p[kk] + digits[kk] * t.slice[kk], t.chain[kk - 1], t.R[kk],
            t.n[kk] * t.R[kk + 1], nxt, static_cast<acc_t*>(nullptr), static_cast<acc_t*>(nullptr), 0);
        __syncthreads();
        acc_t* const tmp = cur;
        cur = nxt;
        nxt = tmp;
      }
      Aprev = cur;
      d1 = nxt;
    }
    const int64_t b = lookup_bag[j];
    const acc_t c = coef[j];
    for (int o = threadIdx.x; o < t.N; o += blockDim.x) {
      d0[o] = c * to_acc(grad_out[b * t.N + o]);
    }
    __syncthreads();
    acc_t* dcur = d0;
    acc_t* dnxt = d1;
    for (int kk = t.d - 1; kk > k; --kk) {
      block_chain_step_back(
          dcur, cores.p[kk] + digits[kk] * t.slice[kk], t.chain[kk - 1], t.R[kk],
          t.n[kk] * t.R[kk + 1], dnxt);
      __syncthreads();
      acc_t* const tmp = dcur;
      dcur = dnxt;
      dnxt = tmp;
    }
    return Item{Aprev, dcur};
  }
  __device__ __forceinline__ acc_t value(const Item& it, const Elem& el, const acc_t* /*smem*/) const {
    return core_grad_elem(it.Aprev, it.dA, Nprev, Rk, L, el.a, el.rem);
  }
};

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// One block per bag, one warp per segment: dS_s = Q^T g_b -> dS[s] (R' x n_l), and
// psw_grad[j] = scale_b <core_last[last_j], dS_s> for the segment's lookups (if requested).
// Shared memory: g_b (N), then one R' x n_l buffer per warp.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBagThreads) grt_bwd_bag_kernel(
    TTDims t,
    const scalar_t* __restrict__ core_last,
    const acc_t* __restrict__ act,
    const int32_t* __restrict__ perm,
    const int32_t* __restrict__ lookup_last,
    const int32_t* __restrict__ seg_start,
    const int64_t* __restrict__ segment_bag,
    const int64_t* __restrict__ segment_slot,
    const int64_t* __restrict__ counts,
    const scalar_t* __restrict__ grad_out,
    const acc_t* __restrict__ bag_scale,
    int64_t B,
    acc_t* __restrict__ dS,
    scalar_t* __restrict__ psw_grad) {
  TORCHREC_TT_DYNAMIC_SMEM(acc_t, smem);
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int N = t.N;
  const int Np = t.Np;
  const int Rp = t.Rp;
  const int nl = t.nl;
  const int Rn = t.Rn;
  acc_t* const gs = smem;
  acc_t* const dsw = smem + N + warp * Rn;
  const int64_t S = counts[0];
  const int64_t q_off = t.act_off[t.d - 2];
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const int64_t s_begin = lower_bound_i64(segment_bag, S, b);
    const int64_t s_end = lower_bound_i64(segment_bag, S, b + 1);
    if (s_begin >= s_end) { // block-uniform
      continue;
    }
    for (int o = threadIdx.x; o < N; o += blockDim.x) {
      gs[o] = to_acc(grad_out[b * N + o]);
    }
    __syncthreads();
    for (int64_t s = s_begin + warp; s < s_end; s += kBagWarps) {
      const int64_t u = segment_slot[s];
      const acc_t* q = act + u * t.act_size + q_off;
      for (int e = lane; e < Rn; e += kWarpSize) {
        const int a = e / nl;
        const int c = e - a * nl;
        acc_t v = acc_t(0);
        for (int r = 0; r < Np; ++r) {
          v += q[r * Rp + a] * gs[r * nl + c];
        }
        dS[s * Rn + e] = v;
        dsw[e] = v; // lane-private: read back only by this lane
      }
      if (psw_grad != nullptr) {
        const acc_t scale = bag_scale[b];
        const int p0 = seg_start[s];
        const int p1 = seg_start[s + 1];
        for (int p = p0; p < p1; ++p) {
          const int32_t j = perm[p];
          const scalar_t* row = core_last + static_cast<int64_t>(lookup_last[j]) * Rn;
          acc_t part = acc_t(0);
          for (int e = lane; e < Rn; e += kWarpSize) {
            part += to_acc(row[e]) * dsw[e];
          }
          part = warp_sum(part);
          if (lane == 0) {
            psw_grad[j] = from_acc<scalar_t>(scale * part);
          }
        }
      }
    }
    __syncthreads(); // before the next bag overwrites g_b
  }
}

// One block per slot u < U: dA_{k-1} = dA_k' C_k^T for k = d-2 .. 1, in the slot's gradient record.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kPrefixThreads) grt_slot_backprop_kernel(
    TTDims t,
    CorePtrs<scalar_t> cores,
    const int64_t* __restrict__ slot_group,
    const int64_t* __restrict__ counts,
    acc_t* dact) {
  const int64_t U = counts[1];
  for (int64_t u = blockIdx.x; u < U; u += gridDim.x) {
    int64_t digits[kMaxCoresGpu] = {};
    group_digits_dev(t, slot_group[u], digits);
    acc_t* rec = dact + u * t.act_size;
    for (int k = t.d - 2; k >= 1; --k) {
      block_chain_step_back(
          static_cast<const acc_t*>(rec + t.act_off[k]), cores.p[k] + digits[k] * t.slice[k],
          t.chain[k - 1], t.R[k], t.n[k] * t.R[k + 1], rec + t.act_off[k - 1]);
      __syncthreads();
    }
  }
}

// tt: psw_grad[j] = scale_b <W[idx_j], g_b>, one block per bag (chain per lookup, as the forward).
// Shared memory: 2 * max_chain chain buffers, then kTTThreads / 32 partial sums.
template <typename scalar_t, typename acc_t, typename index_t, int OPT>
__global__ void __launch_bounds__(kTTThreads) tt_psw_grad_kernel(
    TTDims t,
    CorePtrs<scalar_t> cores,
    const index_t* __restrict__ indices,
    const index_t* __restrict__ offsets,
    const int32_t* __restrict__ lookup_bag,
    const acc_t* __restrict__ bag_scale,
    const scalar_t* __restrict__ grad_out,
    int64_t B,
    int64_t nnz,
    scalar_t* __restrict__ psw_grad) {
  TORCHREC_TT_DYNAMIC_SMEM(acc_t, smem);
  acc_t* const buf0 = smem;
  acc_t* const buf1 = smem + t.max_chain;
  acc_t* const red = smem + 2 * t.max_chain;
  const int N = t.N;
  const int Rp = t.Rp;
  const int nl = t.nl;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int nwarps = (blockDim.x + kWarpSize - 1) / kWarpSize;
  int ro[OPT];
  int co[OPT];
  thread_output_coords(static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x), nl, ro, co);
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    for_each_bag_row(
        t, cores, indices, offsets, lookup_bag, b, nnz, buf0, buf1,
        [&](int64_t j, const acc_t* q, const scalar_t* cl) {
          acc_t part = acc_t(0);
#pragma unroll
          for (int i = 0; i < OPT; ++i) {
            const int o = threadIdx.x + i * blockDim.x;
            if (o < N) {
              part += row_entry(q + ro[i] * Rp, cl, Rp, nl, co[i]) * to_acc(grad_out[b * N + o]);
            }
          }
          part = warp_sum(part);
          if (lane == 0) {
            red[warp] = part;
          }
          __syncthreads();
          if (threadIdx.x == 0) {
            acc_t v = acc_t(0);
            for (int w = 0; w < nwarps; ++w) {
              v += red[w];
            }
            psw_grad[j] = from_acc<scalar_t>(bag_scale[b] * v);
          }
        }); // for_each_bag_row's barrier: red is rewritten by the next lookup
  }
}

// ---------------------------------------------------------------------------------------------
// Shared-memory requirements and host orchestration
// ---------------------------------------------------------------------------------------------

inline size_t smem_grt_bwd_bag(const TTDims& t, size_t acc_bytes) {
  return (static_cast<size_t>(t.N) + static_cast<size_t>(kBagWarps) * t.Rn) * acc_bytes;
}
inline size_t smem_grt_slot_grad(const TTDims& t, size_t acc_bytes) {
  return (static_cast<size_t>(t.N) + t.Rn) * acc_bytes;
}
inline size_t smem_tt_core_grad(const TTDims& t, size_t acc_bytes) {
  return 3 * static_cast<size_t>(t.max_chain_all) * acc_bytes;
}
inline size_t smem_tt_psw_grad(const TTDims& t, size_t acc_bytes) {
  return (2 * static_cast<size_t>(t.max_chain) + kTTThreads / kWarpSize) * acc_bytes;
}

// Largest dynamic shared memory any kernel of (variant, direction) needs.
inline size_t max_smem_bytes(const TTDims& t, int variant, bool backward, size_t acc_bytes) {
  size_t s = 0;
  if (variant == 1) {
    s = tt_max(smem_grt_prefix(t, acc_bytes), smem_grt_fwd_bag(t, acc_bytes));
    if (backward) {
      s = tt_max(s, tt_max(smem_grt_bwd_bag(t, acc_bytes), smem_grt_slot_grad(t, acc_bytes)));
    }
  } else {
    s = smem_tt_fwd(t, acc_bytes);
    if (backward) {
      s = tt_max(s, tt_max(smem_tt_core_grad(t, acc_bytes), smem_tt_psw_grad(t, acc_bytes)));
    }
  }
  return s;
}

// grads[k]: acc_t buffers of core k's numel, zero-filled by the caller. psw_grad (nullable): nnz
// entries, zero-filled by the caller (invalid lookups keep 0).
template <typename scalar_t, typename index_t, typename Ctx>
void grt_backward(
    Ctx& ctx,
    const LookupBatch<scalar_t, index_t>& in,
    const scalar_t* grad_out,
    acc_type<scalar_t>* const* grads,
    scalar_t* psw_grad,
    bool deterministic) {
  using acc_t = acc_type<scalar_t>;
  const TTDims& t = in.t;
  if (in.B <= 0 || in.nnz <= 0) {
    return;
  }
  const int d = t.d;
  const LookupInfo<acc_t> info = compute_lookup_info(ctx, in);
  const DevicePlan plan =
      build_plan(ctx, in.indices, info.bag, in.B, in.nnz, t.m[d - 1], t.num_groups, PlanOutputs{});
  const int64_t U_ub = plan.slots_ub;

  // Forward activations of every slot, then dS per segment (and psw grads).
  acc_t* act = alloc_n<acc_t>(ctx, U_ub * t.act_size);
  launch_grt_prefix(ctx, t, in.cores, plan, act, /*store_all=*/1);
  acc_t* dS = alloc_n<acc_t>(ctx, in.nnz * t.Rn);
  {
    const auto kernel = &grt_bwd_bag_kernel<scalar_t, acc_t>;
    const size_t smem = smem_grt_bwd_bag(t, sizeof(acc_t));
    set_dynamic_smem(ctx, kernel, smem);
    TORCHREC_TT_LAUNCH(
        kernel, grid_for_items(in.B), kBagThreads, smem, ctx.stream, t, in.cores.p[d - 1],
        static_cast<const acc_t*>(act), static_cast<const int32_t*>(plan.perm),
        static_cast<const int32_t*>(plan.lookup_last), static_cast<const int32_t*>(plan.seg_start),
        static_cast<const int64_t*>(plan.segment_bag), static_cast<const int64_t*>(plan.segment_slot),
        static_cast<const int64_t*>(plan.counts), grad_out, static_cast<const acc_t*>(info.bag_scale),
        in.B, dS, psw_grad);
    ctx.check_launch();
  }

  // Last core: lookups sorted by their last digit.
  {
    const KeySortBuffers kb = alloc_key_sort_buffers(ctx, in.nnz);
    const uint32_t m_last = static_cast<uint32_t>(t.m[d - 1]);
    launch_elems(
        ctx, &last_keys_kernel<>, in.nnz, static_cast<const int32_t*>(info.bag),
        static_cast<const int32_t*>(plan.lookup_last), in.nnz, m_last, kb.keys, kb.items);
    sort_by_key(ctx, kb, in.nnz, m_last);
    const GrtLastCoreGrad<acc_t> f{info.coef, plan.lookup_segment, dS, t.Rn};
    reduce_sorted(
        ctx, f, kb.items_sorted, kb.keys_sorted, in.nnz, m_last,
        tt_min<int64_t>(in.nnz, t.m[d - 1]),
        kChunkLastCore, t.Rn, 0, deterministic, grads[d - 1], t.Rn);
  }

  // dQ of every slot: segments in slot order (from the plan).
  acc_t* dact = alloc_n<acc_t>(ctx, U_ub * t.act_size);
  memset_async(ctx, dact, 0, static_cast<size_t>(tt_max<int64_t>(U_ub, 1)) * t.act_size * sizeof(acc_t));
  {
    const GrtSlotGrad<scalar_t, acc_t> f{
        t.N,           t.Rp,          t.nl,           t.Rn,        grad_out,
        in.cores.p[d - 1], plan.segment_bag, plan.seg_start, plan.perm, info.coef,
        plan.lookup_last};
    reduce_sorted(
        ctx, f, plan.segs_by_slot, plan.slot_run_keys, in.nnz, 0xffffffffu, U_ub, kChunkSlot,
        t.Np * t.Rp, smem_grt_slot_grad(t, sizeof(acc_t)), deterministic, dact + t.act_off[d - 2],
        t.act_size);
  }

  // Back through the prefix chain, once per slot.
  if (d >= 3 && U_ub > 0) {
    const auto kernel = &grt_slot_backprop_kernel<scalar_t, acc_t>;
    TORCHREC_TT_LAUNCH(
        kernel, grid_for_items(U_ub), kPrefixThreads, 0, ctx.stream, t, in.cores,
        static_cast<const int64_t*>(plan.slot_group), static_cast<const int64_t*>(plan.counts), dact);
    ctx.check_launch();
  }

  // Prefix cores: slots sorted by digit k.
  if (U_ub > 0) {
    const KeySortBuffers kb = alloc_key_sort_buffers(ctx, U_ub);
    for (int k = 0; k <= d - 2; ++k) {
      launch_elems(
          ctx, &slot_digit_keys_kernel<>, U_ub, static_cast<const int64_t*>(plan.slot_group),
          static_cast<const int64_t*>(plan.counts), U_ub, digit_divisor(t, k, d - 2), t.m[k],
          kb.keys, kb.items);
      sort_by_key(ctx, kb, U_ub, static_cast<uint64_t>(t.m[k]));
      const int L = t.n[k] * t.R[k + 1];
      const GrtPrefixCoreGrad<acc_t> f{
          act,
          dact,
          static_cast<int64_t>(t.act_size),
          k > 0 ? t.act_off[k - 1] : 0,
          t.act_off[k],
          k > 0 ? t.chain[k - 1] : 1,
          t.R[k],
          L,
          k == 0 ? 1 : 0};
      reduce_sorted(
          ctx, f, kb.items_sorted, kb.keys_sorted, U_ub, static_cast<uint32_t>(t.m[k]),
          tt_min<int64_t>(U_ub, t.m[k]), kChunkPrefixCore, static_cast<int>(t.slice[k]), 0,
          deterministic, grads[k], t.slice[k]);
    }
  }
}

template <typename scalar_t, typename index_t, typename Ctx>
void tt_backward(
    Ctx& ctx,
    const LookupBatch<scalar_t, index_t>& in,
    const scalar_t* grad_out,
    acc_type<scalar_t>* const* grads,
    scalar_t* psw_grad,
    bool deterministic) {
  using acc_t = acc_type<scalar_t>;
  const TTDims& t = in.t;
  if (in.B <= 0 || in.nnz <= 0) {
    return;
  }
  const int d = t.d;
  const LookupInfo<acc_t> info = compute_lookup_info(ctx, in);
  const KeySortBuffers kb = alloc_key_sort_buffers(ctx, in.nnz);
  const size_t smem = smem_tt_core_grad(t, sizeof(acc_t));
  for (int k = 0; k < d; ++k) {
    launch_elems(
        ctx, &tt_digit_keys_kernel<index_t>, in.nnz, in.indices,
        static_cast<const int32_t*>(info.bag), in.nnz,
        digit_divisor(t, k, d - 1), t.m[k], kb.keys, kb.items);
    sort_by_key(ctx, kb, in.nnz, static_cast<uint64_t>(t.m[k]));
    const TTCoreGrad<scalar_t, acc_t, index_t> f{
        t, in.cores, in.indices, info.bag, info.coef, grad_out, k, k > 0 ? t.chain[k - 1] : 1,
        t.R[k], t.n[k] * t.R[k + 1]};
    reduce_sorted(
        ctx, f, kb.items_sorted, kb.keys_sorted, in.nnz, static_cast<uint32_t>(t.m[k]),
        tt_min<int64_t>(in.nnz, t.m[k]), kChunkTT, static_cast<int>(t.slice[k]), smem,
        deterministic,
        grads[k], t.slice[k]);
  }
  if (psw_grad != nullptr) {
    const size_t psmem = smem_tt_psw_grad(t, sizeof(acc_t));
    dispatch_pow2<8>((t.N + kTTThreads - 1) / kTTThreads, [&](auto opt) {
      constexpr int OPT = decltype(opt)::value;
      const auto kernel = &tt_psw_grad_kernel<scalar_t, acc_t, index_t, OPT>;
      set_dynamic_smem(ctx, kernel, psmem);
      TORCHREC_TT_LAUNCH(
          kernel, grid_for_items(in.B), kTTThreads, psmem, ctx.stream, t, in.cores, in.indices,
          in.offsets,
          static_cast<const int32_t*>(info.bag), static_cast<const acc_t*>(info.bag_scale), grad_out,
          in.B, in.nnz, psw_grad);
      ctx.check_launch();
    });
  }
}

} // namespace torchrec_tt::gpu
