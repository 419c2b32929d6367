// Runs the CUDA kernel files (csrc/cuda/*_cuda.cu, compiled as C++ with cuda_emu.h forced in) on CPU
// threads and compares them with a straightforward double-precision reference: the packed
// group_plan, forward and backward of both variants with and without a caller-built plan, sum/mean
// pooling, per-sample weights, empty bags, B = 0, nnz = 0, d = 2..4, float/double/half/bfloat16 cores,
// int32/int64 indices, default (atomic) and deterministic reductions (bit-identical run to run),
// invalid inputs. It also counts the launches of every op call (kernels, memsets, cub calls) and
// asserts the budgets: grt forward <= 8 including the plan, grt backward <= 16 given the plan.
//
// .ci/compile_cuda.sh builds it (tiny grids and chunks: -DTORCHREC_TT_MAX_GRID_BLOCKS=3) and runs
//   emu_test [iterations] [seed]
// (EMU_SANITIZE=1 adds -fsanitize=address,undefined).

#include "../cuda/tt_launch.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

using namespace torchrec_tt::gpu;

namespace {

int g_failures = 0;
int g_checks = 0;

#define EXPECT(cond, ...)                                     \
  do {                                                        \
    ++g_checks;                                               \
    if (!(cond)) {                                            \
      ++g_failures;                                           \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);        \
      std::printf(__VA_ARGS__);                               \
      std::printf("\n");                                      \
    }                                                         \
  } while (0)

// ---------------------------------------------------------------------------------------------
// Problem and reference
// ---------------------------------------------------------------------------------------------

struct Problem {
  int d = 0;
  std::vector<int64_t> m, n, R; // R: d + 1 full ranks
  std::vector<std::vector<double>> cores; // values already rounded to the tested dtype
  std::vector<int64_t> indices;
  std::vector<int64_t> offsets; // B + 1
  bool has_psw = false;
  std::vector<double> psw;
  int mode = 0; // 0 sum, 1 mean
  std::vector<double> grad; // B x N
  int64_t B() const {
    return static_cast<int64_t>(offsets.size()) - 1;
  }
  int64_t nnz() const {
    return static_cast<int64_t>(indices.size());
  }
  int64_t rows() const {
    int64_t r = 1;
    for (int k = 0; k < d; ++k) {
      r *= m[k];
    }
    return r;
  }
  int64_t N() const {
    int64_t r = 1;
    for (int k = 0; k < d; ++k) {
      r *= n[k];
    }
    return r;
  }
  int64_t slice(int k) const {
    return R[k] * n[k] * R[k + 1];
  }
};

std::vector<int64_t> digits_of(const Problem& P, int64_t row) {
  std::vector<int64_t> dg(P.d);
  for (int k = P.d - 1; k >= 0; --k) {
    dg[k] = row % P.m[k];
    row /= P.m[k];
  }
  return dg;
}

// A_k for k = 0..d-1 (A_{d-1} is the row).
std::vector<std::vector<double>> chain_forward(const Problem& P, int64_t row) {
  const auto dg = digits_of(P, row);
  std::vector<std::vector<double>> acts;
  std::vector<double> A{1.0};
  int64_t Nprev = 1;
  for (int k = 0; k < P.d; ++k) {
    const int64_t Rk = P.R[k];
    const int64_t L = P.n[k] * P.R[k + 1];
    const double* C = P.cores[k].data() + dg[k] * Rk * L;
    std::vector<double> out(static_cast<size_t>(Nprev * L), 0.0);
    for (int64_t p = 0; p < Nprev; ++p) {
      for (int64_t r = 0; r < L; ++r) {
        double s = 0;
        for (int64_t a = 0; a < Rk; ++a) {
          s += A[p * Rk + a] * C[a * L + r];
        }
        out[p * L + r] = s;
      }
    }
    Nprev *= P.n[k];
    A = out;
    acts.push_back(A);
  }
  return acts;
}

void chain_backward(const Problem& P, int64_t row, const std::vector<double>& G,
                    std::vector<std::vector<double>>& dcores) {
  const auto dg = digits_of(P, row);
  const auto acts = chain_forward(P, row);
  std::vector<double> dA = G;
  for (int k = P.d - 1; k >= 0; --k) {
    const int64_t Rk = P.R[k];
    const int64_t L = P.n[k] * P.R[k + 1];
    int64_t Nprev = 1;
    for (int t = 0; t < k; ++t) {
      Nprev *= P.n[t];
    }
    const std::vector<double> one{1.0};
    const std::vector<double>& Aprev = k > 0 ? acts[k - 1] : one;
    const double* C = P.cores[k].data() + dg[k] * Rk * L;
    double* dC = dcores[k].data() + dg[k] * Rk * L;
    for (int64_t a = 0; a < Rk; ++a) {
      for (int64_t r = 0; r < L; ++r) {
        double s = 0;
        for (int64_t p = 0; p < Nprev; ++p) {
          s += Aprev[p * Rk + a] * dA[p * L + r];
        }
        dC[a * L + r] += s;
      }
    }
    if (k > 0) {
      std::vector<double> dprev(static_cast<size_t>(Nprev * Rk), 0.0);
      for (int64_t p = 0; p < Nprev; ++p) {
        for (int64_t a = 0; a < Rk; ++a) {
          double s = 0;
          for (int64_t r = 0; r < L; ++r) {
            s += dA[p * L + r] * C[a * L + r];
          }
          dprev[p * Rk + a] = s;
        }
      }
      dA = dprev;
    }
  }
}

// Bag of lookup j under the kernels' rules (offsets clamped into [0, nnz]; -1 if none or invalid).
int64_t ref_bag(const Problem& P, int64_t j, int64_t num_rows) {
  const int64_t nnz = P.nnz();
  auto oc = [&](int64_t b) { return std::min<int64_t>(std::max<int64_t>(P.offsets[b], 0), nnz); };
  int64_t lo = 0, hi = P.B() + 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (oc(mid) <= j) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  const int64_t b = lo - 1;
  bool ok = b >= 0 && b < P.B() && j >= oc(b) && j < oc(b + 1);
  const int64_t idx = P.indices[j];
  ok = ok && idx >= 0 && (num_rows < 0 || idx < num_rows);
  return ok ? b : -1;
}

double ref_scale(const Problem& P, int64_t b) {
  const int64_t nnz = P.nnz();
  auto oc = [&](int64_t x) { return std::min<int64_t>(std::max<int64_t>(P.offsets[x], 0), nnz); };
  const int64_t len = oc(b + 1) - oc(b);
  return (P.mode == 1 && len > 0) ? 1.0 / static_cast<double>(len) : 1.0;
}

struct RefOut {
  std::vector<double> y;
  std::vector<std::vector<double>> dcores;
  std::vector<double> psw_grad;
};

RefOut reference(const Problem& P) {
  RefOut o;
  const int64_t N = P.N();
  o.y.assign(static_cast<size_t>(P.B() * N), 0.0);
  o.dcores.resize(P.d);
  for (int k = 0; k < P.d; ++k) {
    o.dcores[k].assign(static_cast<size_t>(P.m[k] * P.slice(k)), 0.0);
  }
  o.psw_grad.assign(static_cast<size_t>(P.nnz()), 0.0);
  for (int64_t j = 0; j < P.nnz(); ++j) {
    const int64_t b = ref_bag(P, j, P.rows());
    if (b < 0) {
      continue;
    }
    const double scale = ref_scale(P, b);
    const double c = (P.has_psw ? P.psw[j] : 1.0) * scale;
    const auto W = chain_forward(P, P.indices[j]).back();
    std::vector<double> G(static_cast<size_t>(N));
    double dot = 0;
    for (int64_t e = 0; e < N; ++e) {
      o.y[b * N + e] += c * W[e];
      G[e] = c * P.grad[b * N + e];
      dot += W[e] * P.grad[b * N + e];
    }
    o.psw_grad[j] = scale * dot;
    chain_backward(P, P.indices[j], G, o.dcores);
  }
  return o;
}

// ---------------------------------------------------------------------------------------------
// dtype helpers
// ---------------------------------------------------------------------------------------------

template <typename T>
T to_t(double v);
template <>
float to_t<float>(double v) {
  return static_cast<float>(v);
}
template <>
double to_t<double>(double v) {
  return v;
}
template <>
__half to_t<__half>(double v) {
  return __float2half_rn(static_cast<float>(v));
}
template <>
__nv_bfloat16 to_t<__nv_bfloat16>(double v) {
  return __float2bfloat16_rn(static_cast<float>(v));
}
double to_d(float v) {
  return v;
}
double to_d(double v) {
  return v;
}
double to_d(__half v) {
  return __half2float(v);
}
double to_d(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T>
double round_t(double v) {
  return to_d(to_t<T>(v));
}

template <typename T>
const char* type_name();
template <>
const char* type_name<float>() {
  return "float";
}
template <>
const char* type_name<double>() {
  return "double";
}
template <>
const char* type_name<__half>() {
  return "half";
}
template <>
const char* type_name<__nv_bfloat16>() {
  return "bf16";
}

template <typename T>
double tolerance() {
  if (std::is_same_v<T, double>) {
    return 1e-10;
  }
  if (std::is_same_v<T, float>) {
    return 2e-5;
  }
  if (std::is_same_v<T, __half>) {
    return 4e-3;
  }
  return 2e-2;
}

// max |a - b| / (1 + max |b|) over the arrays.
double rel_err(const std::vector<double>& a, const std::vector<double>& b) {
  double scale = 0;
  for (double v : b) {
    scale = std::max(scale, std::fabs(v));
  }
  double err = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double e = std::fabs(a[i] - b[i]);
    err = std::max(err, std::isnan(e) ? std::numeric_limits<double>::infinity() : e);
  }
  return err / (1.0 + scale);
}

// ---------------------------------------------------------------------------------------------
// Running the kernels
// ---------------------------------------------------------------------------------------------

// Runs a launcher the way the CUDA ops do: a sizing pass, then the real pass on one workspace
// filled with 0xff bytes (NaN). Returns the real pass's launch count.
template <typename F>
int run_ctx(F&& f) {
  LaunchCtx sizing;
  sizing.measure = true;
  f(sizing);
  EXPECT(sizing.launches == 0, "the sizing pass launched %d kernels", sizing.launches);
  const size_t bytes = (sizing.used + 255) / 256 * 256 + 256;
  void* ws = std::aligned_alloc(256, bytes);
  std::memset(ws, 0xff, bytes);
  LaunchCtx ctx;
  ctx.base = static_cast<char*>(ws);
  ctx.capacity = sizing.used;
  f(ctx);
  EXPECT(ctx.error == cudaSuccess, "launcher error %d", static_cast<int>(ctx.error));
  EXPECT(ctx.used == sizing.used, "workspace %zu != sized %zu", ctx.used, sizing.used);
  std::free(ws);
  return ctx.launches;
}

torchrec_tt::TTLayout layout_of(const Problem& P) {
  torchrec_tt::TTLayout L;
  L.d = P.d;
  for (int k = 0; k < P.d; ++k) {
    L.m[k] = P.m[k];
    L.n[k] = P.n[k];
  }
  for (int k = 0; k <= P.d; ++k) {
    L.R[k] = P.R[k];
  }
  return L;
}

struct GpuOut {
  std::vector<double> y;
  std::vector<std::vector<double>> dcores;
  std::vector<double> psw_grad;
  std::vector<std::vector<unsigned char>> raw; // bytes of dcores + psw_grad (determinism check)
  int fwd_launches = 0; // forward, including the plan
  int bwd_launches = 0; // backward (given the plan when given_plan)
};

// given_plan: the plan comes from build_group_plan without the table's bound (the group_plan op),
// is counted with the forward and passed to both; otherwise each op builds its own.
template <typename scalar_t, typename index_t>
GpuOut run_gpu(const Problem& P, int variant, bool backward, bool deterministic, bool given_plan) {
  using acc_t = acc_type<scalar_t>;
  const int64_t B = P.B();
  const int64_t nnz = P.nnz();
  const int64_t N = P.N();
  std::vector<std::vector<scalar_t>> cores(P.d);
  torchrec_tt::CorePtrs<scalar_t> cp;
  for (int k = 0; k < P.d; ++k) {
    for (double v : P.cores[k]) {
      cores[k].push_back(to_t<scalar_t>(v));
    }
    cp.p[k] = cores[k].data();
  }
  std::vector<index_t> idx(P.indices.begin(), P.indices.end());
  std::vector<index_t> off(P.offsets.begin(), P.offsets.end());
  std::vector<scalar_t> psw;
  for (double v : P.psw) {
    psw.push_back(to_t<scalar_t>(v));
  }
  LookupBatch<scalar_t, index_t> batch;
  batch.layout = layout_of(P);
  batch.cores = cp;
  batch.indices = idx.data();
  batch.offsets = off.data();
  batch.psw = P.has_psw ? psw.data() : nullptr;
  batch.B = B;
  batch.nnz = nnz;
  batch.pooling_mode = P.mode;
  GpuOut o;
  std::vector<int64_t> plan;
  const int64_t* plan_ptr = nullptr;
  if (given_plan) {
    plan.assign(static_cast<size_t>(torchrec_tt::PlanLayout::make(nnz, B).numel), int64_t{-3});
    o.fwd_launches += run_ctx([&](LaunchCtx& ctx) {
      build_group_plan<index_t>(ctx, idx.data(), off.data(), B, nnz, P.m[P.d - 1], 0, plan.data());
    });
    plan_ptr = plan.data();
  }
  std::vector<scalar_t> y(static_cast<size_t>(B * N));
  if (!y.empty()) {
    std::memset(static_cast<void*>(y.data()), 0xff, y.size() * sizeof(scalar_t));
  }
  o.fwd_launches += run_ctx([&](LaunchCtx& ctx) { tt_forward(ctx, batch, variant, plan_ptr, y.data()); });
  for (auto v : y) {
    o.y.push_back(to_d(v));
  }
  if (!backward) {
    return o;
  }
  std::vector<scalar_t> g;
  for (double v : P.grad) {
    g.push_back(to_t<scalar_t>(v));
  }
  std::vector<std::vector<acc_t>> grads(P.d);
  GradPtrs<acc_t> gp;
  for (int k = 0; k < P.d; ++k) {
    grads[k].assign(static_cast<size_t>(P.m[k] * P.slice(k)), acc_t(std::nan("")));
    gp.p[k] = grads[k].data();
  }
  std::vector<scalar_t> pg(static_cast<size_t>(nnz), to_t<scalar_t>(std::nan("")));
  scalar_t* pg_ptr = P.has_psw ? pg.data() : nullptr;
  o.bwd_launches = run_ctx([&](LaunchCtx& ctx) {
    tt_backward(ctx, batch, variant, plan_ptr, g.data(), gp, pg_ptr, deterministic);
  });
  for (int k = 0; k < P.d; ++k) {
    std::vector<double> dc;
    for (auto v : grads[k]) {
      dc.push_back(static_cast<double>(v));
    }
    o.dcores.push_back(dc);
    const auto* bytes = reinterpret_cast<const unsigned char*>(grads[k].data());
    o.raw.emplace_back(bytes, bytes + grads[k].size() * sizeof(acc_t));
  }
  if (P.has_psw) {
    for (auto v : pg) {
      o.psw_grad.push_back(to_d(v));
    }
    const auto* pbytes = reinterpret_cast<const unsigned char*>(pg.data());
    o.raw.emplace_back(pbytes, pbytes + pg.size() * sizeof(scalar_t));
  }
  return o;
}

// ---------------------------------------------------------------------------------------------
// Problem generation
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
Problem make_problem(std::mt19937_64& rng, int d, bool invalid_indices) {
  auto uni = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  auto real = [&]() { return std::uniform_real_distribution<double>(-1.0, 1.0)(rng); };
  Problem P;
  P.d = d;
  P.R.assign(d + 1, 1);
  for (int k = 0; k < d; ++k) {
    P.m.push_back(uni(1, 5));
    P.n.push_back(uni(1, 3));
    if (k > 0) {
      P.R[k] = uni(1, 6);
    }
  }
  if (uni(0, 3) == 0) { // a wider rank now and then (more than a warp of elements)
    P.R[d - 1] = uni(17, 40);
  }
  if (uni(0, 4) == 0) { // a wider last dim
    P.n[d - 1] = uni(4, 9);
  }
  P.cores.resize(d);
  for (int k = 0; k < d; ++k) {
    const int64_t numel = P.m[k] * P.slice(k);
    for (int64_t i = 0; i < numel; ++i) {
      P.cores[k].push_back(round_t<scalar_t>(real()));
    }
  }
  const int64_t B = uni(1, 9);
  const int64_t rows = P.rows();
  // A small pool of rows so that bags repeat rows and groups (segments with several lookups, slots
  // shared by several bags).
  std::vector<int64_t> pool;
  const int64_t pool_size = uni(1, 8);
  for (int64_t i = 0; i < pool_size; ++i) {
    pool.push_back(uni(0, rows - 1));
  }
  P.offsets.push_back(0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = uni(0, 3) == 0 ? 0 : uni(1, 7);
    for (int64_t i = 0; i < len; ++i) {
      int64_t v = uni(0, 2) == 0 ? uni(0, rows - 1) : pool[uni(0, pool_size - 1)];
      if (invalid_indices && uni(0, 5) == 0) {
        v = uni(0, 1) == 0 ? -uni(1, 5) : rows + uni(0, 5);
      }
      P.indices.push_back(v);
    }
    P.offsets.push_back(static_cast<int64_t>(P.indices.size()));
  }
  P.has_psw = uni(0, 1) == 1;
  for (int64_t j = 0; j < P.nnz(); ++j) {
    P.psw.push_back(round_t<scalar_t>(real()));
  }
  if (!P.has_psw) {
    P.psw.clear();
  }
  P.mode = static_cast<int>(uni(0, 1));
  for (int64_t i = 0; i < B * P.N(); ++i) {
    P.grad.push_back(round_t<scalar_t>(real()));
  }
  return P;
}

// The paper's table shape (rows [21, 22, 50], dims [4, 4, 4], ranks [1, 32, 32, 1]) with a small
// batch of long bags over a few hot rows: N = 64 (two outputs per lane), R' = 32, a 4096-element
// core slice (several chunk tiles) and runs longer than a chunk.
template <typename scalar_t>
Problem make_paper_problem(std::mt19937_64& rng, int64_t B, int64_t bag_len) {
  auto uni = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  auto real = [&]() { return std::uniform_real_distribution<double>(-1.0, 1.0)(rng); };
  Problem P;
  P.d = 3;
  P.m = {21, 22, 50};
  P.n = {4, 4, 4};
  P.R = {1, 32, 32, 1};
  P.cores.resize(3);
  for (int k = 0; k < 3; ++k) {
    for (int64_t i = 0; i < P.m[k] * P.slice(k); ++i) {
      P.cores[k].push_back(round_t<scalar_t>(0.3 * real()));
    }
  }
  std::vector<int64_t> hot;
  for (int i = 0; i < 12; ++i) {
    hot.push_back(uni(0, P.rows() - 1));
  }
  P.offsets.push_back(0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < bag_len; ++i) {
      P.indices.push_back(uni(0, 3) == 0 ? uni(0, P.rows() - 1) : hot[uni(0, 11)]);
    }
    P.offsets.push_back(static_cast<int64_t>(P.indices.size()));
  }
  P.has_psw = true;
  for (int64_t j = 0; j < P.nnz(); ++j) {
    P.psw.push_back(round_t<scalar_t>(real()));
  }
  P.mode = 1;
  for (int64_t i = 0; i < B * P.N(); ++i) {
    P.grad.push_back(round_t<scalar_t>(real()));
  }
  return P;
}

std::string describe(const Problem& P) {
  std::string s = "d=" + std::to_string(P.d) + " m=[";
  for (auto v : P.m) s += std::to_string(v) + ",";
  s += "] n=[";
  for (auto v : P.n) s += std::to_string(v) + ",";
  s += "] R=[";
  for (auto v : P.R) s += std::to_string(v) + ",";
  s += "] B=" + std::to_string(P.B()) + " nnz=" + std::to_string(P.nnz()) +
      " psw=" + std::to_string(P.has_psw) + " mode=" + std::to_string(P.mode);
  return s;
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

// Launch budgets (issue 9): grt forward including the plan, grt backward given the plan.
constexpr int kMaxForwardLaunches = 8;
constexpr int kMaxBackwardLaunches = 16;

template <typename scalar_t, typename index_t>
void check_problem(const Problem& P, bool print_launches = false) {
  const RefOut ref = reference(P);
  const double tol = tolerance<scalar_t>();
  for (int variant = 0; variant <= 1; ++variant) {
    for (int given = 0; given <= variant; ++given) {
      for (int det = 0; det <= 1; ++det) {
        const GpuOut g = run_gpu<scalar_t, index_t>(P, variant, /*backward=*/true, det == 1, given == 1);
        const std::string what = std::string(type_name<scalar_t>()) + "/" +
            (sizeof(index_t) == 4 ? "i32" : "i64") + " variant=" + std::to_string(variant) +
            " plan=" + (given ? "given" : "built") + " det=" + std::to_string(det) + " " + describe(P);
        const double ey = rel_err(g.y, ref.y);
        EXPECT(ey <= tol, "forward err %.3g > %.3g: %s", ey, tol, what.c_str());
        for (int k = 0; k < P.d; ++k) {
          const double ec = rel_err(g.dcores[k], ref.dcores[k]);
          EXPECT(ec <= tol, "dcore[%d] err %.3g > %.3g: %s", k, ec, tol, what.c_str());
        }
        if (P.has_psw) {
          const double ep = rel_err(g.psw_grad, ref.psw_grad);
          EXPECT(ep <= tol, "psw_grad err %.3g > %.3g: %s", ep, tol, what.c_str());
        }
        if (det == 1) {
          const GpuOut g2 = run_gpu<scalar_t, index_t>(P, variant, true, true, given == 1);
          EXPECT(g2.raw == g.raw, "deterministic backward differs between runs: %s", what.c_str());
        }
        if (variant == 1) {
          EXPECT(g.fwd_launches <= kMaxForwardLaunches, "grt forward: %d launches incl. the plan > %d: %s",
                 g.fwd_launches, kMaxForwardLaunches, what.c_str());
          EXPECT(!given || g.bwd_launches <= kMaxBackwardLaunches, "grt backward: %d launches > %d: %s",
                 g.bwd_launches, kMaxBackwardLaunches, what.c_str());
        }
        if (print_launches && given == variant) {
          std::printf("  launches %-4s %-9s fwd%s=%d bwd%s=%d  (%s)\n", variant ? "grt" : "tt",
                      det ? "det" : "atomic", variant ? " incl. plan" : "", g.fwd_launches,
                      variant ? " given plan" : "", g.bwd_launches, describe(P).c_str());
        }
      }
    }
  }
}

template <typename scalar_t, typename index_t>
void test_ops(std::mt19937_64& rng, int d, bool invalid_indices) {
  check_problem<scalar_t, index_t>(make_problem<scalar_t>(rng, d, invalid_indices));
}

// The packed group_plan (no table bound) against a map-based reference, every field.
template <typename index_t>
void test_group_plan(std::mt19937_64& rng, bool huge, int64_t force_B = -1) {
  auto uni = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  Problem P;
  const int64_t B = force_B >= 0 ? force_B : uni(1, 12);
  const int64_t last_rows = uni(1, 6);
  const int64_t hi = huge && sizeof(index_t) == 8 ? (int64_t{1} << 62) : uni(1, 40);
  std::vector<int64_t> pool;
  for (int i = 0; i < 6; ++i) {
    pool.push_back(uni(0, hi));
  }
  P.offsets.push_back(0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = uni(0, 2) == 0 ? 0 : uni(1, 8);
    for (int64_t i = 0; i < len; ++i) {
      int64_t v = uni(0, 1) == 0 ? pool[uni(0, 5)] : uni(0, hi);
      if (uni(0, 9) == 0) {
        v = -uni(1, 3); // invalid
      }
      P.indices.push_back(v);
    }
    P.offsets.push_back(static_cast<int64_t>(P.indices.size()));
  }
  if (B == 0) {
    P.indices = {3, 1}; // lookups but no bag
  }
  const int64_t nnz = P.nnz();
  // The documented key width: groups need < 2^(64 - bit_width(B)).
  int bbits = 1;
  while ((int64_t{1} << bbits) <= B) {
    ++bbits;
  }
  auto group_ok = [&](int64_t g) { return 64 - bbits >= 63 || g < (int64_t{1} << (64 - bbits)); };
  // Reference.
  std::map<std::pair<int64_t, int64_t>, std::vector<int64_t>> segs; // (bag, group) -> lookups
  for (int64_t j = 0; j < nnz; ++j) {
    const int64_t b = ref_bag(P, j, -1);
    if (b >= 0 && group_ok(P.indices[j] / last_rows)) {
      segs[{b, P.indices[j] / last_rows}].push_back(j);
    }
  }
  std::vector<std::pair<int64_t, int64_t>> seg_list;
  std::vector<int64_t> sorted_lookup, seg_start{0};
  for (const auto& kv : segs) {
    seg_list.push_back(kv.first);
    sorted_lookup.insert(sorted_lookup.end(), kv.second.begin(), kv.second.end());
    seg_start.push_back(static_cast<int64_t>(sorted_lookup.size()));
  }
  std::map<int64_t, std::vector<int64_t>> slots; // group -> segments
  for (size_t s = 0; s < seg_list.size(); ++s) {
    slots[seg_list[s].second].push_back(static_cast<int64_t>(s));
  }
  const int64_t S = static_cast<int64_t>(seg_list.size());
  const int64_t U = static_cast<int64_t>(slots.size());
  // Kernels.
  std::vector<index_t> idx(P.indices.begin(), P.indices.end());
  std::vector<index_t> off(P.offsets.begin(), P.offsets.end());
  std::vector<int64_t> plan(static_cast<size_t>(torchrec_tt::PlanLayout::make(nnz, B).numel), -7);
  const int launches = run_ctx([&](LaunchCtx& ctx) {
    build_group_plan<index_t>(ctx, idx.data(), off.data(), B, nnz, last_rows, 0, plan.data());
  });
  EXPECT(launches <= 5, "group_plan: %d launches", launches);
  const auto v = torchrec_tt::PlanView<const int64_t>::make(plan.data(), nnz, B);
  using torchrec_tt::PlanHeader;
  auto hdr = [&](PlanHeader h) { return v.header[static_cast<int>(h)]; };
  EXPECT(hdr(PlanHeader::kNumSegments) == S && hdr(PlanHeader::kNumSlots) == U &&
             hdr(PlanHeader::kNumLookups) == nnz && hdr(PlanHeader::kNumBags) == B &&
             hdr(PlanHeader::kLastRows) == last_rows,
         "group_plan header [%lld %lld %lld %lld %lld] != [%lld %lld %lld %lld %lld]",
         (long long)v.header[0], (long long)v.header[1], (long long)v.header[2], (long long)v.header[3],
         (long long)v.header[4], (long long)S, (long long)U, (long long)nnz, (long long)B,
         (long long)last_rows);
  if (hdr(PlanHeader::kNumSegments) != S || hdr(PlanHeader::kNumSlots) != U) {
    return;
  }
  bool ok = true;
  for (int64_t p = 0; p < static_cast<int64_t>(sorted_lookup.size()); ++p) {
    ok = ok && v.sorted_lookup[p] == sorted_lookup[p] &&
        v.sorted_last[p] == P.indices[sorted_lookup[p]] % last_rows;
  }
  EXPECT(ok, "group_plan sorted_lookup / sorted_last");
  ok = true;
  for (int64_t s = 0; s <= S; ++s) {
    ok = ok && v.segment_start[s] == seg_start[s];
  }
  for (int64_t s = 0; s < S; ++s) {
    const int64_t u = std::distance(slots.begin(), slots.find(seg_list[s].second));
    ok = ok && v.segment_bag[s] == seg_list[s].first && v.segment_group[s] == seg_list[s].second &&
        v.segment_slot[s] == u;
  }
  EXPECT(ok, "group_plan segment_start / bag / group / slot");
  ok = true;
  for (int64_t b = 0; b <= B; ++b) {
    const int64_t want =
        std::lower_bound(seg_list.begin(), seg_list.end(), std::make_pair(b, std::numeric_limits<int64_t>::min())) -
        seg_list.begin();
    ok = ok && v.bag_segment_start[b] == want;
  }
  EXPECT(ok, "group_plan bag_segment_start");
  ok = true;
  int64_t u = 0;
  int64_t q = 0;
  for (const auto& kv : slots) {
    ok = ok && v.slot_group[u] == kv.first && v.slot_segment_start[u] == q;
    for (int64_t s : kv.second) {
      ok = ok && v.slot_segment[q++] == s;
    }
    ++u;
  }
  ok = ok && v.slot_segment_start[U] == S;
  EXPECT(ok, "group_plan slot_group / slot_segment_start / slot_segment");
  ok = true;
  for (int64_t j = 0; j < nnz; ++j) {
    const int64_t b = ref_bag(P, j, -1);
    int64_t want = -1;
    if (b >= 0 && group_ok(P.indices[j] / last_rows)) {
      want = std::lower_bound(seg_list.begin(), seg_list.end(), std::make_pair(b, P.indices[j] / last_rows)) -
          seg_list.begin();
    }
    ok = ok && v.lookup_segment[j] == want;
  }
  EXPECT(ok, "group_plan lookup_segment");
}

// Offsets that are not a valid CSR (decreasing, negative, past nnz): no crash, finite results.
template <typename index_t>
void test_bad_offsets(std::mt19937_64& rng) {
  Problem P = make_problem<float>(rng, 3, true);
  auto uni = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  for (auto& o : P.offsets) {
    if (uni(0, 2) == 0) {
      o = uni(-5, P.nnz() + 5);
    }
  }
  for (int variant = 0; variant <= 1; ++variant) {
    const GpuOut g = run_gpu<float, index_t>(P, variant, true, variant == 1, variant == 1);
    bool finite = true;
    for (double v : g.y) {
      finite = finite && std::isfinite(v);
    }
    for (const auto& dc : g.dcores) {
      for (double v : dc) {
        finite = finite && std::isfinite(v);
      }
    }
    EXPECT(finite, "non-finite results with bad offsets (variant %d): %s", variant, describe(P).c_str());
    // The kernels' semantics: the reference with the same bag rule.
    const RefOut ref = reference(P);
    const double ey = rel_err(g.y, ref.y);
    EXPECT(ey <= 2e-5, "bad offsets forward err %.3g (variant %d)", ey, variant);
  }
  // The opt-in value check flags them.
  std::vector<index_t> idx(P.indices.begin(), P.indices.end());
  std::vector<index_t> off(P.offsets.begin(), P.offsets.end());
  unsigned long long err[3] = {0, ~0ull, ~0ull};
  run_ctx([&](LaunchCtx& ctx) {
    check_index_values<index_t>(ctx, idx.data(), off.data(), P.B(), P.nnz(), P.rows(), err);
  });
  bool want_idx = false;
  unsigned long long first_bad = ~0ull;
  for (int64_t j = 0; j < P.nnz(); ++j) {
    if (P.indices[j] < 0 || P.indices[j] >= P.rows()) {
      want_idx = true;
      first_bad = std::min<unsigned long long>(first_bad, j);
    }
  }
  bool want_dec = false;
  for (int64_t b = 0; b < P.B(); ++b) {
    want_dec = want_dec || P.offsets[b + 1] < P.offsets[b];
  }
  EXPECT(((err[0] & 1) != 0) == want_idx && err[1] == first_bad, "check_inputs index flag");
  EXPECT(((err[0] & 2) != 0) == (P.offsets[0] != 0), "check_inputs offsets[0] flag");
  EXPECT(((err[0] & 4) != 0) == (P.offsets.back() != P.nnz()), "check_inputs offsets[B] flag");
  EXPECT(((err[0] & 8) != 0) == want_dec, "check_inputs decreasing flag");
}


// A plan that does not belong to the batch (another last_rows, or random values): the kernels clamp
// every count and index they read from it, so nothing is addressed out of bounds (ASan); the forward
// and the default backward also stay finite (the deterministic backward may read per-segment scratch
// that an inconsistent plan never wrote: garbage in, garbage out, but in bounds).
template <typename index_t>
void test_foreign_plan(std::mt19937_64& rng) {
  auto uni = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  Problem P = make_problem<float>(rng, static_cast<int>(uni(2, 4)), true);
  const int64_t B = P.B();
  const int64_t nnz = P.nnz();
  std::vector<index_t> idx(P.indices.begin(), P.indices.end());
  std::vector<index_t> off(P.offsets.begin(), P.offsets.end());
  std::vector<int64_t> plan(static_cast<size_t>(torchrec_tt::PlanLayout::make(nnz, B).numel));
  if (uni(0, 1) == 0) {
    run_ctx([&](LaunchCtx& ctx) {
      build_group_plan<index_t>(ctx, idx.data(), off.data(), B, nnz, P.m[P.d - 1] + uni(1, 3), 0, plan.data());
    });
  } else {
    for (auto& x : plan) {
      x = uni(-3, nnz + 3);
    }
  }
  std::vector<std::vector<float>> cores(P.d);
  torchrec_tt::CorePtrs<float> cp;
  for (int k = 0; k < P.d; ++k) {
    cores[k].assign(P.cores[k].begin(), P.cores[k].end());
    cp.p[k] = cores[k].data();
  }
  std::vector<float> psw(P.psw.begin(), P.psw.end());
  LookupBatch<float, index_t> batch;
  batch.layout = layout_of(P);
  batch.cores = cp;
  batch.indices = idx.data();
  batch.offsets = off.data();
  batch.psw = P.has_psw ? psw.data() : nullptr;
  batch.B = B;
  batch.nnz = nnz;
  batch.pooling_mode = P.mode;
  std::vector<float> y(static_cast<size_t>(B * P.N()));
  run_ctx([&](LaunchCtx& ctx) { tt_forward(ctx, batch, 1, plan.data(), y.data()); });
  std::vector<float> g(P.grad.begin(), P.grad.end());
  std::vector<std::vector<float>> grads(P.d);
  GradPtrs<float> gp;
  for (int k = 0; k < P.d; ++k) {
    grads[k].assign(static_cast<size_t>(P.m[k] * P.slice(k)), 0.f);
    gp.p[k] = grads[k].data();
  }
  std::vector<float> pg(static_cast<size_t>(nnz));
  for (int det = 0; det <= 1; ++det) {
    run_ctx([&](LaunchCtx& ctx) {
      tt_backward(ctx, batch, 1, plan.data(), g.data(), gp, P.has_psw ? pg.data() : nullptr, det == 1);
    });
    bool finite = true;
    for (float v : y) {
      finite = finite && std::isfinite(v);
    }
    for (const auto& dc : grads) {
      for (float v : dc) {
        finite = finite && std::isfinite(v);
      }
    }
    EXPECT(finite || det == 1, "foreign plan: non-finite results (det %d): %s", det, describe(P).c_str());
  }
}

} // namespace

// Fixed shapes whose launch counts are printed: d = 2, 3, 4, empty bags, B = 0, nnz = 0.
void launch_report(std::mt19937_64& rng) {
  std::printf("launch counts (kernels + memsets + cub calls per op call):\n");
  check_problem<float, int64_t>(make_paper_problem<float>(rng, 6, 40), true);
  for (int d = 2; d <= 4; ++d) {
    Problem P = make_problem<float>(rng, d, false);
    P.offsets = {0, 0, 3, 3, 5}; // bags 0 and 2 empty
    P.indices.resize(5);
    for (auto& i : P.indices) {
      i = std::uniform_int_distribution<int64_t>(0, P.rows() - 1)(rng);
    }
    P.psw.resize(5, 0.5);
    P.grad.resize(static_cast<size_t>(4 * P.N()), 0.25);
    check_problem<float, int32_t>(P, true);
  }
  Problem empty_batch = make_problem<double>(rng, 3, false);
  empty_batch.offsets = {0};
  empty_batch.indices.clear();
  empty_batch.psw.clear();
  empty_batch.grad.clear();
  check_problem<double, int64_t>(empty_batch, true); // B = 0
  Problem no_lookups = make_problem<double>(rng, 3, false);
  no_lookups.offsets = {0, 0, 0};
  no_lookups.indices.clear();
  no_lookups.psw.clear();
  no_lookups.grad.assign(static_cast<size_t>(2 * no_lookups.N()), 0.5);
  check_problem<double, int64_t>(no_lookups, true); // empty bags only
}

int main(int argc, char** argv) {
  const int iters = argc > 1 ? std::atoi(argv[1]) : 3;
  const uint64_t seed = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 12345;
  std::mt19937_64 rng(seed);
  launch_report(rng);
  std::printf("fixed shapes: %d checks, %d failures\n", g_checks, g_failures);
  for (int it = 0; it < iters; ++it) {
    for (int d = 2; d <= 4; ++d) {
      test_ops<float, int64_t>(rng, d, false);
      test_ops<double, int32_t>(rng, d, it % 2 == 1);
    }
    test_ops<__half, int32_t>(rng, 3, false);
    test_ops<__nv_bfloat16, int64_t>(rng, 4, false);
    test_ops<float, int32_t>(rng, 3, true);
    test_group_plan<int32_t>(rng, false);
    test_group_plan<int64_t>(rng, false);
    test_group_plan<int64_t>(rng, true);
    test_group_plan<int32_t>(rng, false, /*force_B=*/0);
    test_bad_offsets<int64_t>(rng);
    test_foreign_plan<int32_t>(rng);
    test_foreign_plan<int64_t>(rng);
    std::printf("iteration %d: %d checks, %d failures\n", it, g_checks, g_failures);
    std::fflush(stdout);
  }
  std::printf("%s: %d checks, %d failures\n", g_failures == 0 ? "OK" : "FAILED", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
