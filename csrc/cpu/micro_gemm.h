// Register-blocked small-matrix products for the CPU kernels (docs/design.md section 3.2).
//
// Every TT contraction is a product of small matrices (a few to a few hundred per side), far too
// small for a BLAS call per product, and too many for the call overhead. These kernels keep an
// MR x (NV * W) tile of C in vector registers across the whole K loop (W = lanes of a 32-byte
// vector: 8 floats or 4 doubles), so each k-step is NV vector loads of B, MR broadcasts of A and
// MR * NV fused multiply-adds; C is loaded and stored once per tile. With AVX2 + FMA (the
// extension builds with -march=native, see setup.py) a 4 x 16 float tile is 8 ymm accumulators.
//
// The vectors are GCC/Clang vector extensions: portable C++ that the compiler lowers to the widest
// unit it was told about (two SSE registers when built without AVX).
//
// Operand conventions (all row-major):
//   A(i, k) = A[i * a_row + k * a_col]  (a strided view: A, A^T or an interleaved slice)
//   B[k, j] = B[k * ldb + j]            (rows contiguous)
//   C[i, j] = C[i * ldc + j]
// A K range may be split into "segments" with their own A and B pointers (multi_gemm): the tile of
// C stays in registers across all of them, e.g. dQ = sum_s g_s S_s^T over the segments of a group.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#if defined(__GNUC__) || defined(__clang__)
#define TORCHREC_TT_ALWAYS_INLINE inline __attribute__((always_inline))
#define TORCHREC_TT_RESTRICT __restrict__
#else
#define TORCHREC_TT_ALWAYS_INLINE inline
#define TORCHREC_TT_RESTRICT
#endif

namespace torchrec_tt::cpu {

template <typename T>
struct VecTraits;
template <>
struct VecTraits<float> {
  typedef float type __attribute__((vector_size(32)));
  static constexpr int kLanes = 8;
};
template <>
struct VecTraits<double> {
  typedef double type __attribute__((vector_size(32)));
  static constexpr int kLanes = 4;
};

template <typename T>
using vec_t = typename VecTraits<T>::type;

template <typename T>
TORCHREC_TT_ALWAYS_INLINE vec_t<T> vload(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
TORCHREC_TT_ALWAYS_INLINE void vstore(T* p, vec_t<T> v) {
  std::memcpy(p, &v, sizeof(v));
}
// One broadcast instruction (vbroadcastss / vbroadcastsd) where AVX is known; `0 + x` elsewhere
// (not folded to a plain broadcast without AVX: -0.0 + 0 is +0).
TORCHREC_TT_ALWAYS_INLINE vec_t<float> vbroadcast(float x) {
#if defined(__AVX__)
  return reinterpret_cast<vec_t<float>>(_mm256_set1_ps(x));
#else
  return vec_t<float>{} + x;
#endif
}
TORCHREC_TT_ALWAYS_INLINE vec_t<double> vbroadcast(double x) {
#if defined(__AVX__)
  return reinterpret_cast<vec_t<double>>(_mm256_set1_pd(x));
#else
  return vec_t<double>{} + x;
#endif
}

// Pins a value in a register: without it GCC re-reads B from memory for every row of the tile
// (a load per FMA), which makes the tile load-bound instead of FMA-bound.
template <typename V>
TORCHREC_TT_ALWAYS_INLINE void keep_in_register(V& v) {
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__)) && defined(__AVX__)
  __asm__("" : "+x"(v));
#else
  (void)v;
#endif
}

// Rows of the register tile and vectors per row. 4 x 2 vectors keep 8 accumulators, 2 B vectors
// and a broadcast in the 16 architectural vector registers of AVX2.
constexpr int kTileRows = 4;
constexpr int kTileVecs = 2;

// acc[r][v] += sum_{k < K} A(r, k) * B[k, v*W : (v+1)*W] for a full MR x NV tile.
template <int MR, int NV, typename T>
TORCHREC_TT_ALWAYS_INLINE void tile_accumulate(
    vec_t<T> (&acc)[MR][NV],
    int64_t K,
    const T* TORCHREC_TT_RESTRICT A,
    int64_t a_row,
    int64_t a_col,
    const T* TORCHREC_TT_RESTRICT B,
    int64_t ldb) {
  constexpr int W = VecTraits<T>::kLanes;
  for (int64_t k = 0; k < K; ++k) {
    const T* bk = B + k * ldb;
    vec_t<T> b0 = vload(bk);
    keep_in_register(b0);
    if constexpr (NV == 1) {
      for (int r = 0; r < MR; ++r) {
        acc[r][0] += vbroadcast(A[r * a_row + k * a_col]) * b0;
      }
    } else {
      static_assert(NV == 2, "tiles are one or two vectors wide");
      vec_t<T> b1 = vload(bk + W);
      keep_in_register(b1);
      for (int r = 0; r < MR; ++r) {
        const vec_t<T> a = vbroadcast(A[r * a_row + k * a_col]);
        acc[r][0] += a * b0;
        acc[r][1] += a * b1;
      }
    }
  }
}

// One segment of a multi-segment product: its own A, B pointers and K.
template <typename T>
struct GemmSegment {
  const T* A;
  const T* B;
  int64_t K;
};

// C tile (MR x NV*W at C) (= or +=) alpha * sum over segments of A_s B_s. kPrefetchB: prefetch the
// next segment's B rows while one segment computes (for B gathered from all over memory; pointless
// overhead when the segments' B sit in a small local buffer).
template <int MR, int NV, bool kAccumulate, bool kPrefetchB, typename T, typename Segments>
TORCHREC_TT_ALWAYS_INLINE void tile_multi(
    const Segments& segs,
    int64_t num_segs,
    T alpha,
    int64_t a_row,
    int64_t a_col,
    int64_t ldb,
    T* C,
    int64_t ldc) {
  constexpr int W = VecTraits<T>::kLanes;
  vec_t<T> acc[MR][NV];
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = vec_t<T>{};
    }
  }
  for (int64_t s = 0; s < num_segs; ++s) {
    const GemmSegment<T> seg = segs(s);
    if (kPrefetchB && s + 1 < num_segs) {
      const GemmSegment<T> next = segs(s + 1);
      for (int64_t k = 0; k < next.K; ++k) {
        const char* row = reinterpret_cast<const char*>(next.B + k * ldb);
        for (size_t byte = 0; byte < NV * sizeof(vec_t<T>); byte += 64) { // one per cache line
          __builtin_prefetch(row + byte);
        }
      }
    }
    tile_accumulate<MR, NV, T>(acc, seg.K, seg.A, a_row, a_col, seg.B, ldb);
  }
  const vec_t<T> va = vbroadcast(alpha);
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      T* c = C + r * ldc + v * W;
      vstore(c, kAccumulate ? vload(c) + va * acc[r][v] : va * acc[r][v]);
    }
  }
}

// Scalar edge tile: rows [0, mr) x columns [0, nc), any sizes.
template <bool kAccumulate, typename T, typename Segments>
inline void tile_multi_scalar(
    const Segments& segs,
    int64_t num_segs,
    T alpha,
    int64_t mr,
    int64_t nc,
    int64_t a_row,
    int64_t a_col,
    int64_t ldb,
    T* C,
    int64_t ldc) {
  for (int64_t r = 0; r < mr; ++r) {
    for (int64_t j = 0; j < nc; ++j) {
      T sum = 0;
      for (int64_t s = 0; s < num_segs; ++s) {
        const GemmSegment<T> seg = segs(s);
        for (int64_t k = 0; k < seg.K; ++k) {
          sum += seg.A[r * a_row + k * a_col] * seg.B[k * ldb + j];
        }
      }
      T* c = C + r * ldc + j;
      *c = kAccumulate ? *c + alpha * sum : alpha * sum;
    }
  }
}

// Full-width tiles of MR rows (MR known at compile time) over columns [0, N).
template <int MR, bool kAccumulate, bool kPrefetchB, typename T, typename Segments>
inline void row_block(
    const Segments& segs,
    int64_t num_segs,
    int64_t N,
    T alpha,
    int64_t a_row,
    int64_t a_col,
    int64_t ldb,
    T* C,
    int64_t ldc) {
  constexpr int W = VecTraits<T>::kLanes;
  int64_t j = 0;
  const auto shifted = [&](int64_t s) { // the segments' B at column j
    GemmSegment<T> seg = segs(s);
    seg.B += j;
    return seg;
  };
  for (; j + kTileVecs * W <= N; j += kTileVecs * W) {
    tile_multi<MR, kTileVecs, kAccumulate, kPrefetchB>(shifted, num_segs, alpha, a_row, a_col, ldb, C + j, ldc);
  }
  for (; j + W <= N; j += W) {
    tile_multi<MR, 1, kAccumulate, kPrefetchB>(shifted, num_segs, alpha, a_row, a_col, ldb, C + j, ldc);
  }
  if (j < N) {
    tile_multi_scalar<kAccumulate>(shifted, num_segs, alpha, MR, N - j, a_row, a_col, ldb, C + j, ldc);
  }
}

// row_block with the rows of the block (1 <= mr <= kTileRows) chosen at run time.
template <bool kAccumulate, bool kPrefetchB, typename T, typename Segments>
TORCHREC_TT_ALWAYS_INLINE void row_block_of(
    int64_t mr,
    const Segments& segs,
    int64_t num_segs,
    int64_t N,
    T alpha,
    int64_t a_row,
    int64_t a_col,
    int64_t ldb,
    T* C,
    int64_t ldc) {
  switch (mr) {
    case 1:
      row_block<1, kAccumulate, kPrefetchB>(segs, num_segs, N, alpha, a_row, a_col, ldb, C, ldc);
      break;
    case 2:
      row_block<2, kAccumulate, kPrefetchB>(segs, num_segs, N, alpha, a_row, a_col, ldb, C, ldc);
      break;
    case 3:
      row_block<3, kAccumulate, kPrefetchB>(segs, num_segs, N, alpha, a_row, a_col, ldb, C, ldc);
      break;
    default:
      row_block<kTileRows, kAccumulate, kPrefetchB>(segs, num_segs, N, alpha, a_row, a_col, ldb, C, ldc);
      break;
  }
}

// C[M x N] (= or +=) alpha * sum_s A_s(M x K_s) B_s(K_s x N); segs(s) -> GemmSegment<T> with A, B
// pointing at row 0 / column 0 of segment s. The stride arguments are shared by all segments.
// kPrefetchB: see tile_multi.
template <bool kAccumulate, bool kPrefetchB = true, typename T, typename Segments>
inline void multi_gemm(
    int64_t M,
    int64_t N,
    const Segments& segs,
    int64_t num_segs,
    T alpha,
    int64_t a_row,
    int64_t a_col,
    int64_t ldb,
    T* C,
    int64_t ldc) {
  int64_t i = 0;
  const auto rows = [&](int64_t s) { // the segments' A at row i
    GemmSegment<T> seg = segs(s);
    seg.A += i * a_row;
    return seg;
  };
  for (; i + kTileRows <= M; i += kTileRows) {
    row_block<kTileRows, kAccumulate, kPrefetchB>(rows, num_segs, N, alpha, a_row, a_col, ldb, C + i * ldc, ldc);
  }
  if (i < M) {
    row_block_of<kAccumulate, kPrefetchB>(M - i, rows, num_segs, N, alpha, a_row, a_col, ldb, C + i * ldc, ldc);
  }
}

// C (count*m x N) = [A_0; ...; A_{count-1}] @ B (K x N), where block i, A_i = a(i), is m x K
// (row-major, row stride K): the blocks are read where they lie (e.g. the slices of a core picked by
// index). Gathering them into one A first was a memcpy as large as A: without it the paper table's
// inference forward is 10 % faster.
template <typename T, typename BlockA>
inline void gather_rows_gemm(
    int64_t count,
    int64_t m,
    int64_t N,
    int64_t K,
    const BlockA& a,
    const T* B,
    int64_t ldb,
    T* C,
    int64_t ldc) {
  for (int64_t i = 0; i < count; ++i) {
    const T* const A = a(i);
    for (int64_t r = 0; r < m; r += kTileRows) {
      const auto block = [&](int64_t) { return GemmSegment<T>{A + r * K, B, K}; };
      row_block_of</*kAccumulate=*/false, /*kPrefetchB=*/false>(
          std::min<int64_t>(kTileRows, m - r), block, 1, N, T(1), K, 1, ldb, C + (i * m + r) * ldc, ldc);
    }
  }
}

// C[M x N] (= or +=) alpha * A(M x K) B(K x N), A strided as above.
template <bool kAccumulate, typename T>
inline void gemm(
    int64_t M,
    int64_t N,
    int64_t K,
    T alpha,
    const T* A,
    int64_t a_row,
    int64_t a_col,
    const T* B,
    int64_t ldb,
    T* C,
    int64_t ldc) {
  const auto one = [&](int64_t) { return GemmSegment<T>{A, B, K}; };
  multi_gemm<kAccumulate>(M, N, one, 1, alpha, a_row, a_col, ldb, C, ldc);
}

// Prefetches the cache lines of x[0, n) into L1.
template <typename T>
TORCHREC_TT_ALWAYS_INLINE void prefetch_row(const T* x, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(x);
  for (int64_t byte = 0; byte < n * static_cast<int64_t>(sizeof(T)); byte += 64) {
    __builtin_prefetch(bytes + byte);
  }
}

// f(width) with the row width n as a compile-time constant (std::integral_constant) when it is one of
// the common embedding widths, else as the runtime value. The row kernels below are written for any
// n; with n known, their block loop runs a fixed number of times and the remainder loops vanish.
// With n a runtime value the loops, and the row lambdas inlined into each, spilled registers: the
// paper table's bag pass (sum_rows_into, 64 floats a row), timed alone on one thread, took 200
// instead of 148 us.
template <typename F>
TORCHREC_TT_ALWAYS_INLINE void with_row_width(int64_t n, const F& f) {
  switch (n) {
    case 32:
      f(std::integral_constant<int64_t, 32>{});
      break;
    case 64:
      f(std::integral_constant<int64_t, 64>{});
      break;
    case 128:
      f(std::integral_constant<int64_t, 128>{});
      break;
    default:
      f(n);
      break;
  }
}

// y[0, n) += alpha * x[0, n).
template <typename T>
TORCHREC_TT_ALWAYS_INLINE void axpy_n(int64_t n, T alpha, const T* TORCHREC_TT_RESTRICT x, T* TORCHREC_TT_RESTRICT y) {
  constexpr int W = VecTraits<T>::kLanes;
  const vec_t<T> va = vbroadcast(alpha);
  const int64_t vectors = n / W * W; // bounds of both loops are constants when n is one
  for (int64_t t = 0; t < vectors; t += W) {
    vstore(y + t, vload(y + t) + va * vload(x + t));
  }
  for (int64_t t = vectors; t < n; ++t) {
    y[t] += alpha * x[t];
  }
}

template <typename T>
TORCHREC_TT_ALWAYS_INLINE void axpy(int64_t n, T alpha, const T* TORCHREC_TT_RESTRICT x, T* TORCHREC_TT_RESTRICT y) {
  with_row_width(n, [&](auto width) { axpy_n<T>(width, alpha, x, y); });
}

// y[0, n) += sum over i < count of alpha(i) * x(i)[0, n): a gather-sum of rows (a bag's cached
// rows, a segment's last-core slices). The same arithmetic in the same order as `count` axpy calls,
// so the same bits, but each block of y stays in registers across all rows: one load and store of y
// per block instead of one per row (the axpy loop was bound by y's store-to-load round trips).
template <typename T, typename Alpha, typename Row>
TORCHREC_TT_ALWAYS_INLINE void sum_rows_into_n(int64_t n, int64_t count, const Alpha& alpha, const Row& row, T* y) {
  constexpr int W = VecTraits<T>::kLanes;
  constexpr int kBlock = 8; // vectors of y per block: 8 accumulators + a broadcast + a load fit AVX2's 16
  // Loop bounds are constants when n is one (with_row_width).
  const int64_t blocks = n / (kBlock * W) * (kBlock * W);
  const int64_t vectors = n / W * W;
  for (int64_t t = 0; t < blocks; t += kBlock * W) {
    vec_t<T> acc[kBlock];
#pragma GCC unroll 8
    for (int v = 0; v < kBlock; ++v) {
      acc[v] = vload(y + t + v * W);
    }
    for (int64_t i = 0; i < count; ++i) {
      const vec_t<T> a = vbroadcast(static_cast<T>(alpha(i)));
      const T* x = row(i) + t;
#pragma GCC unroll 8
      for (int v = 0; v < kBlock; ++v) {
        acc[v] = acc[v] + a * vload(x + v * W);
      }
    }
#pragma GCC unroll 8
    for (int v = 0; v < kBlock; ++v) {
      vstore(y + t + v * W, acc[v]);
    }
  }
  for (int64_t t = blocks; t < vectors; t += W) {
    vec_t<T> acc = vload(y + t);
    for (int64_t i = 0; i < count; ++i) {
      acc = acc + vbroadcast(static_cast<T>(alpha(i))) * vload(row(i) + t);
    }
    vstore(y + t, acc);
  }
  for (int64_t t = vectors; t < n; ++t) {
    T acc = y[t];
    for (int64_t i = 0; i < count; ++i) {
      acc += static_cast<T>(alpha(i)) * row(i)[t];
    }
    y[t] = acc;
  }
}

template <typename T, typename Alpha, typename Row>
TORCHREC_TT_ALWAYS_INLINE void sum_rows_into(int64_t n, int64_t count, const Alpha& alpha, const Row& row, T* y) {
  with_row_width(n, [&](auto width) { sum_rows_into_n(width, count, alpha, row, y); });
}

// y(i)[0, n) += alpha(i) * x[0, n) for i < count: one row x added into `count` rows (a bag's
// output gradient into its cached rows' gradients). The same arithmetic as `count` axpy calls, but
// each block of x stays in registers across the rows: one load of x per block instead of one per
// row. With an alpha that does not depend on i the compiler forms alpha * x once per block and adds
// it (no FMA), so the bits may differ from axpy's in the last place; each is deterministic.
template <typename T, typename Alpha, typename Row>
TORCHREC_TT_ALWAYS_INLINE void add_into_rows_n(int64_t n, int64_t count, const Alpha& alpha, const Row& row, const T* x) {
  constexpr int W = VecTraits<T>::kLanes;
  constexpr int kBlock = 8; // vectors of x per block: 8 held + a broadcast + a row load fit AVX2's 16
  // Loop bounds are constants when n is one (with_row_width).
  const int64_t blocks = n / (kBlock * W) * (kBlock * W);
  const int64_t vectors = n / W * W;
  for (int64_t t = 0; t < blocks; t += kBlock * W) {
    vec_t<T> xv[kBlock];
#pragma GCC unroll 8
    for (int v = 0; v < kBlock; ++v) {
      xv[v] = vload(x + t + v * W);
    }
    for (int64_t i = 0; i < count; ++i) {
      const vec_t<T> a = vbroadcast(static_cast<T>(alpha(i)));
      T* y = row(i) + t;
#pragma GCC unroll 8
      for (int v = 0; v < kBlock; ++v) {
        vstore(y + v * W, vload(y + v * W) + a * xv[v]);
      }
    }
  }
  for (int64_t t = blocks; t < vectors; t += W) {
    const vec_t<T> xv = vload(x + t);
    for (int64_t i = 0; i < count; ++i) {
      T* y = row(i) + t;
      vstore(y, vload(y) + vbroadcast(static_cast<T>(alpha(i))) * xv);
    }
  }
  for (int64_t t = vectors; t < n; ++t) {
    for (int64_t i = 0; i < count; ++i) {
      row(i)[t] += static_cast<T>(alpha(i)) * x[t];
    }
  }
}

template <typename T, typename Alpha, typename Row>
TORCHREC_TT_ALWAYS_INLINE void add_into_rows(int64_t n, int64_t count, const Alpha& alpha, const Row& row, const T* x) {
  with_row_width(n, [&](auto width) { add_into_rows_n(width, count, alpha, row, x); });
}

// sum_t x[t] * y[t].
template <typename T>
TORCHREC_TT_ALWAYS_INLINE T dot(int64_t n, const T* TORCHREC_TT_RESTRICT x, const T* TORCHREC_TT_RESTRICT y) {
  constexpr int W = VecTraits<T>::kLanes;
  vec_t<T> acc0{}, acc1{};
  int64_t t = 0;
  for (; t + 2 * W <= n; t += 2 * W) {
    acc0 += vload(x + t) * vload(y + t);
    acc1 += vload(x + t + W) * vload(y + t + W);
  }
  for (; t + W <= n; t += W) {
    acc0 += vload(x + t) * vload(y + t);
  }
  acc0 += acc1;
  T sum = 0;
  for (int l = 0; l < W; ++l) {
    sum += acc0[l];
  }
  for (; t < n; ++t) {
    sum += x[t] * y[t];
  }
  return sum;
}

#if defined(__AVX__)
// dst (8 x 8, row stride ldd) = src (8 x 8, row stride lds)^T in registers: pairs of rows
// interleaved, then pairs of pairs, then the 128-bit halves exchanged.
TORCHREC_TT_ALWAYS_INLINE void transpose_8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8];
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm256_loadu_ps(src + i * lds);
  }
  __m256 t[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  __m256 u[8];
  for (int i = 0; i < 2; ++i) {
    u[4 * i + 0] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
  }
}
#endif

#if defined(__AVX__)
// dst (8 x 4, contiguous) = src (4 x 8, row stride lds)^T.
TORCHREC_TT_ALWAYS_INLINE void transpose_4x8(const float* src, int64_t lds, float* dst) {
  const __m256 r0 = _mm256_loadu_ps(src);
  const __m256 r1 = _mm256_loadu_ps(src + lds);
  const __m256 r2 = _mm256_loadu_ps(src + 2 * lds);
  const __m256 r3 = _mm256_loadu_ps(src + 3 * lds);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1); // a00 a10 a01 a11 | a04 a14 a05 a15
  const __m256 t1 = _mm256_unpackhi_ps(r0, r1); // a02 a12 a03 a13 | a06 a16 a07 a17
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3);
  const __m256 t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 c04 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)); // column 0 | column 4
  const __m256 c15 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 c26 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 c37 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  _mm256_storeu_ps(dst, _mm256_permute2f128_ps(c04, c15, 0x20));
  _mm256_storeu_ps(dst + 8, _mm256_permute2f128_ps(c26, c37, 0x20));
  _mm256_storeu_ps(dst + 16, _mm256_permute2f128_ps(c04, c15, 0x31));
  _mm256_storeu_ps(dst + 24, _mm256_permute2f128_ps(c26, c37, 0x31));
}

// dst (4 x 8, row stride ldd) = src (8 x 4, contiguous)^T.
TORCHREC_TT_ALWAYS_INLINE void transpose_8x4(const float* src, float* dst, int64_t ldd) {
  const auto rows = [&](int a, int b) { // rows a | b of src, one per 128-bit lane
    return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(src + 4 * a)), _mm_loadu_ps(src + 4 * b), 1);
  };
  const __m256 v0 = rows(0, 4), v1 = rows(1, 5), v2 = rows(2, 6), v3 = rows(3, 7);
  const __m256 t0 = _mm256_unpacklo_ps(v0, v1); // a00 a10 a01 a11 | a40 a50 a41 a51
  const __m256 t1 = _mm256_unpackhi_ps(v0, v1); // a02 a12 a03 a13 | a42 a52 a43 a53
  const __m256 t2 = _mm256_unpacklo_ps(v2, v3);
  const __m256 t3 = _mm256_unpackhi_ps(v2, v3);
  _mm256_storeu_ps(dst, _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0))); // column 0
  _mm256_storeu_ps(dst + ldd, _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2)));
  _mm256_storeu_ps(dst + 2 * ldd, _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)));
  _mm256_storeu_ps(dst + 3 * ldd, _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2)));
}
#endif

// dst[cols x rows] = src[rows x cols]^T. Float matrices whose sides are multiples of 8 go by 8 x 8
// register blocks (the grt forward transposes every slot's Q, 16 x 32 at rank 32: element by
// element that took as long as the chain product that made it), 4 x 8k and 8k x 4 ones by 4 x 8 and
// 8 x 4 blocks.
template <typename T>
inline void transpose(int64_t rows, int64_t cols, const T* TORCHREC_TT_RESTRICT src, T* TORCHREC_TT_RESTRICT dst) {
#if defined(__AVX__)
  if constexpr (std::is_same_v<T, float>) {
    if (rows % 8 == 0 && cols % 8 == 0) {
      for (int64_t r = 0; r < rows; r += 8) {
        for (int64_t c = 0; c < cols; c += 8) {
          transpose_8x8(src + r * cols + c, cols, dst + c * rows + r, rows);
        }
      }
      return;
    }
    if (rows == 4 && cols % 8 == 0) { // a bag's n_l x N' sum at n_l = 4 (the common q = 4)
      for (int64_t c = 0; c < cols; c += 8) {
        transpose_4x8(src + c, cols, dst + c * 4);
      }
      return;
    }
    if (rows % 8 == 0 && cols == 4) { // a last-core slice (R' x n_l; every call transposes the core)
      for (int64_t r = 0; r < rows; r += 8) {
        transpose_8x4(src + r * 4, dst + r, rows);
      }
      return;
    }
  }
#endif
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      dst[c * rows + r] = src[r * cols + c];
    }
  }
}

} // namespace torchrec_tt::cpu
