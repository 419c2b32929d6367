// Block-cooperative pieces of the TT chain (all threads of a 1-D block call them with the same
// arguments; none contains a barrier -- callers separate dependent steps with __syncthreads()).
//
// With A_{-1} = [1] (1 x 1) the chain is A_k = A_{k-1} @ core_k[i_k].view(R[k], n_k R[k+1]), viewed
// (N_k x R[k+1]); Q = A_{d-2}; the row is A_{d-1} (N x 1). Backward through one step:
//   dA_{k-1} = dA_k' @ C_k^T          (dA_k' = dA_k viewed N_{k-1} x n_k R[k+1])
//   dC_k    += A_{k-1}^T @ dA_k'
#pragma once

#include "tt_cuda_common.cuh"

namespace torchrec_tt::gpu {

// Entry e of a chain step's (total-entry) result: written to out and out_copy (each may be null)
// and, with out_t != null, transposed into the (t_cols x total / t_cols) matrix out_t.
template <typename acc_t>
__device__ __forceinline__ void store_chain_entry(
    int e,
    acc_t v,
    int total,
    acc_t* out,
    acc_t* out_copy,
    acc_t* out_t,
    int t_cols) {
  if (out != nullptr) {
    out[e] = v;
  }
  if (out_copy != nullptr) {
    out_copy[e] = v;
  }
  if (out_t != nullptr) {
    const int rows = total / t_cols;
    const int row = e / t_cols;
    out_t[(e - row * t_cols) * rows + row] = v;
  }
}

// out = A (Nprev x Rk, acc_t) @ C (Rk x L, scalar_t, global), (Nprev x L) row-major, written to
// `out` (may be null) and `out_copy` (may be null); with out_t != null also written transposed as
// a (t_cols x rows) matrix, rows = Nprev * L / t_cols (the result viewed rows x t_cols).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void block_chain_step(
    const acc_t* A,
    const scalar_t* __restrict__ C,
    int Nprev,
    int Rk,
    int L,
    acc_t* out,
    acc_t* out_copy,
    acc_t* out_t,
    int t_cols) {
  const int total = Nprev * L;
  for (int e = threadIdx.x; e < total; e += blockDim.x) {
    const int p = e / L;
    const int rem = e - p * L;
    const acc_t* a_row = A + p * Rk;
    const scalar_t* c_col = C + rem;
    acc_t acc = acc_t(0);
    for (int a = 0; a < Rk; ++a) {
      acc += a_row[a] * to_acc(c_col[static_cast<int64_t>(a) * L]);
    }
    store_chain_entry(e, acc, total, out, out_copy, out_t, t_cols);
  }
}

// First step: A_0 = core_0[i_0] viewed (n_0 x R[1]); same outputs as block_chain_step.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void block_chain_first(
    const scalar_t* __restrict__ C,
    int total,
    acc_t* out,
    acc_t* out_copy,
    acc_t* out_t,
    int t_cols) {
  for (int e = threadIdx.x; e < total; e += blockDim.x) {
    const acc_t v = to_acc(C[e]);
    store_chain_entry(e, v, total, out, out_copy, out_t, t_cols);
  }
}

// dAprev (Nprev x Rk) = dA (Nprev x L) @ C^T, C (Rk x L, global).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void block_chain_step_back(
    const acc_t* dA,
    const scalar_t* __restrict__ C,
    int Nprev,
    int Rk,
    int L,
    acc_t* dAprev) {
  const int total = Nprev * Rk;
  for (int e = threadIdx.x; e < total; e += blockDim.x) {
    const int p = e / Rk;
    const int a = e - p * Rk;
    const acc_t* d_row = dA + static_cast<int64_t>(p) * L;
    const scalar_t* c_row = C + static_cast<int64_t>(a) * L;
    acc_t acc = acc_t(0);
    for (int r = 0; r < L; ++r) {
      acc += d_row[r] * to_acc(c_row[r]);
    }
    dAprev[e] = acc;
  }
}

// Element (a, rem) of A_{k-1}^T @ dA_k' (the gradient of core_k[i_k], R[k] x L): sum over the
// Nprev rows; Aprev == nullptr means A_{-1} = [1] (k = 0: the gradient is dA_0 itself).
template <typename acc_t>
__device__ __forceinline__ acc_t core_grad_elem(
    const acc_t* Aprev,
    const acc_t* dA,
    int Nprev,
    int Rk,
    int L,
    int a,
    int rem) {
  if (Aprev == nullptr) {
    return dA[rem];
  }
  acc_t acc = acc_t(0);
  for (int p = 0; p < Nprev; ++p) {
    acc += Aprev[p * Rk + a] * dA[static_cast<int64_t>(p) * L + rem];
  }
  return acc;
}

} // namespace torchrec_tt::gpu
