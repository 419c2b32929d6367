// Device-wide primitives of the torchrec_tt CUDA kernels: stable radix sort of (key, value) pairs
// and inclusive prefix sums, on the context's stream, with cub (header-only, ships with the CUDA
// toolkit). Temporary storage is sized on the host (cub's nullptr query, no sync) and allocated
// through the context. Under TORCHREC_TT_CUDA_EMULATION the same calls run std algorithms.
#pragma once

#include "tt_cuda_common.cuh"

#if defined(TORCHREC_TT_CUDA_EMULATION)
#include <algorithm>
#include <numeric>
#include <vector>
#else
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>
#endif

namespace torchrec_tt::gpu {

// Stable sort of n (key, value) pairs by key bits [0, end_bit). Keys must be < 2^end_bit.
template <typename key_t, typename val_t, typename Ctx>
void radix_sort_pairs(
    Ctx& ctx,
    const key_t* keys_in,
    key_t* keys_out,
    const val_t* vals_in,
    val_t* vals_out,
    int n,
    int end_bit) {
  if (n <= 0) {
    return;
  }
  end_bit = end_bit < 1 ? 1 : end_bit;
  end_bit = end_bit > static_cast<int>(8 * sizeof(key_t)) ? static_cast<int>(8 * sizeof(key_t)) : end_bit;
#if defined(TORCHREC_TT_CUDA_EMULATION)
  std::vector<int> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  const key_t mask = end_bit >= static_cast<int>(8 * sizeof(key_t))
      ? static_cast<key_t>(~key_t{0})
      : static_cast<key_t>((key_t{1} << end_bit) - 1);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    return (keys_in[a] & mask) < (keys_in[b] & mask);
  });
  std::vector<key_t> k(static_cast<size_t>(n));
  std::vector<val_t> v(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    k[i] = keys_in[order[i]];
    v[i] = vals_in[order[i]];
  }
  std::copy(k.begin(), k.end(), keys_out);
  std::copy(v.begin(), v.end(), vals_out);
#else
  size_t bytes = 0;
  ctx.check(cub::DeviceRadixSort::SortPairs(
      nullptr, bytes, keys_in, keys_out, vals_in, vals_out, n, 0, end_bit, ctx.stream));
  void* temp = ctx.alloc(bytes > 0 ? bytes : 1);
  ctx.check(cub::DeviceRadixSort::SortPairs(
      temp, bytes, keys_in, keys_out, vals_in, vals_out, n, 0, end_bit, ctx.stream));
#endif
}

// out[i] = in[0] + ... + in[i] for i < n.
template <typename T, typename Ctx>
void inclusive_sum(Ctx& ctx, const T* in, T* out, int n) {
  if (n <= 0) {
    return;
  }
#if defined(TORCHREC_TT_CUDA_EMULATION)
  std::partial_sum(in, in + n, out);
#else
  size_t bytes = 0;
  ctx.check(cub::DeviceScan::InclusiveSum(nullptr, bytes, in, out, n, ctx.stream));
  void* temp = ctx.alloc(bytes > 0 ? bytes : 1);
  ctx.check(cub::DeviceScan::InclusiveSum(temp, bytes, in, out, n, ctx.stream));
#endif
}

} // namespace torchrec_tt::gpu
