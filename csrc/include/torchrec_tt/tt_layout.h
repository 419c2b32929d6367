// TT layout of one table and the TT index decomposition, shared by the CPU and CUDA kernels.
//
// Plain C++ only (no ATen/c10 includes) so that the CUDA kernel files (csrc/cuda/*_cuda.cu, which
// include no ATen) and their CPU-thread emulation can use it: one layout type for both devices.
//
// Layout (see docs/design.md section 1): a table with d cores (2 <= d <= 4); core k is a contiguous tensor
// of shape (m_k, R[k], n_k, R[k+1]) with R[0] = R[d] = 1. Row i has the TT index (i_0, ..., i_{d-1})
// in mixed radix m_0..m_{d-1}, i_0 most significant. group(i) = i / m_{d-1}, last(i) = i % m_{d-1}.
// The prefix of a group, Q_g = core_0[i_0] . ... . core_{d-2}[i_{d-2}], is an (N' x R') matrix with
// N' = n_0 * ... * n_{d-2} and R' = R[d-1]; the row is W[i] = Q_g @ core_{d-1}[last(i)] viewed (R' x n_{d-1}).
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TORCHREC_TT_HOST_DEVICE __host__ __device__
#else
#define TORCHREC_TT_HOST_DEVICE
#endif

namespace torchrec_tt {

constexpr int kMinCores = 2;
constexpr int kMaxCores = 4;

// Sizes of a TT table, derived once from the cores at the op boundary. Trivially copyable: it can be
// passed by value to CUDA kernels.
struct TTLayout {
  int64_t d = 0; // number of cores
  int64_t m[kMaxCores] = {}; // row factors m_k (core k has m_k slices)
  int64_t n[kMaxCores] = {}; // dim factors n_k
  int64_t R[kMaxCores + 1] = {}; // full ranks, R[0] = R[d] = 1

  TORCHREC_TT_HOST_DEVICE int64_t num_rows() const { // prod(m)
    int64_t p = 1;
    for (int64_t k = 0; k < d; ++k) {
      p *= m[k];
    }
    return p;
  }
  TORCHREC_TT_HOST_DEVICE int64_t last_rows() const { // m_{d-1}: rows per group
    return m[d - 1];
  }
  TORCHREC_TT_HOST_DEVICE int64_t num_groups() const { // prod(m_0..m_{d-2})
    int64_t p = 1;
    for (int64_t k = 0; k + 1 < d; ++k) {
      p *= m[k];
    }
    return p;
  }
  TORCHREC_TT_HOST_DEVICE int64_t embedding_dim() const { // N = prod(n)
    int64_t p = 1;
    for (int64_t k = 0; k < d; ++k) {
      p *= n[k];
    }
    return p;
  }
  TORCHREC_TT_HOST_DEVICE int64_t prefix_dim() const { // N' = prod(n_0..n_{d-2})
    int64_t p = 1;
    for (int64_t k = 0; k + 1 < d; ++k) {
      p *= n[k];
    }
    return p;
  }
  TORCHREC_TT_HOST_DEVICE int64_t prefix_rank() const { // R' = R[d-1]
    return R[d - 1];
  }
  TORCHREC_TT_HOST_DEVICE int64_t last_dim() const { // n_{d-1}
    return n[d - 1];
  }
  // Elements of one slice core_k[i]: R[k] * n_k * R[k+1].
  TORCHREC_TT_HOST_DEVICE int64_t slice_numel(int64_t k) const {
    return R[k] * n[k] * R[k + 1];
  }
  TORCHREC_TT_HOST_DEVICE int64_t core_numel(int64_t k) const {
    return m[k] * slice_numel(k);
  }
  // Rows of the running chain matrix after core k: n_0 * ... * n_k.
  TORCHREC_TT_HOST_DEVICE int64_t chain_rows(int64_t k) const {
    int64_t p = 1;
    for (int64_t t = 0; t <= k; ++t) {
      p *= n[t];
    }
    return p;
  }
};

// Pointers to the d cores of one table (contiguous (m_k, R[k], n_k, R[k+1]) each), by value into
// kernels. T is the element type as the kernels see it (e.g. __half on CUDA for at::Half cores).
template <typename T>
struct CorePtrs {
  const T* p[kMaxCores] = {};
};

// Digit k (0 <= k < count) of x in mixed radix m_0..m_{count-1}, i_0 most significant: count = d for
// a row id, d - 1 for a group id.
TORCHREC_TT_HOST_DEVICE inline int64_t mixed_radix_digit(
    const TTLayout& layout,
    int64_t x,
    int64_t k,
    int64_t count) {
  for (int64_t t = count - 1; t > k; --t) {
    x /= layout.m[t];
  }
  return x % layout.m[k];
}

// Digits (i_0, ..., i_{d-2}) of a group id, i_0 most significant, in radix m_0..m_{d-2}.
TORCHREC_TT_HOST_DEVICE inline void group_digits(
    const TTLayout& layout,
    int64_t group,
    int64_t* digits) {
  for (int64_t k = layout.d - 2; k >= 0; --k) {
    digits[k] = group % layout.m[k];
    group /= layout.m[k];
  }
}

// Digits (i_0, ..., i_{d-1}) of a row id, i_0 most significant, in radix m_0..m_{d-1}.
TORCHREC_TT_HOST_DEVICE inline void row_digits(
    const TTLayout& layout,
    int64_t row,
    int64_t* digits) {
  for (int64_t k = layout.d - 1; k >= 0; --k) {
    digits[k] = row % layout.m[k];
    row /= layout.m[k];
  }
}

} // namespace torchrec_tt
