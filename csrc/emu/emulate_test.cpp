// Runs the CUDA kernels of csrc/ on the CPU emulator (cuda_emulator.h) against
// a float64 reference: every kernel instance family, dtype and similarity,
// values != memory, leading dims, unaligned and strided rows, bank splits and
// the combine, ties (at every position), a NaN query, empty and one-row banks,
// hard retrieval, and the numerics of docs/design.md §5.1: l2 forms with
// queries on and next to stored rows and banks far from the origin, weights.
// Then the plans (emulate_plans.cpp).  Built and run by
// tests/test_cuda_emulated.py; exits non-zero on a failure.
//
//   g++ -std=c++17 -O1 -DHEN_CUDA_EMULATE -Icsrc -x c++ csrc/cuda/*.cu -x none csrc/emu/*.cpp
//   ./a.out [name-filter]
// (csrc/cuda/*.cu is HEN_CUDA_SOURCES of CMakeLists.txt, the list the test builds from).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "emu/cuda_emulator.h"
#include "cuda/hopfield_cuda.h"

namespace {

using hen::DType;
using hen::Similarity;
using hen::cuda::Kernel;
using hen::cuda::PlanHints;

// Hints for the case table: force a kernel, a bank split and/or a query block.
PlanHints force(std::optional<Kernel> kernel, int64_t splits = 0, int query_block = 0) {
  PlanHints h;
  h.kernel = kernel;
  h.splits = splits;
  h.query_block = query_block;
  return h;
}

struct Case {
  std::string name;
  DType dtype = DType::F32;
  Similarity sim = Similarity::Dot;
  int64_t L = 1, Lm = 1, B = 1, N = 1, D = 1;
  int64_t Dv = 0;  // 0: values are the memory
  int64_t q_pad = 0, x_pad = 0, v_pad = 0;  // extra elements per row: strided, maybe unaligned rows
  int64_t offset = 0;
  PlanHints hints;            // the planner's choices forced (default: none)
  std::string expect;         // "simt" or "mma": the kernel the plan must pick
  double beta_level = 1.0;
  int nan_query = -1;         // query (0, b) gets a NaN
  bool ties = false;          // duplicate bank rows: the first must win
  bool hard = false;          // queries near bank rows, huge beta: the exact pattern must come back
  bool expect_split = false;  // the plan must split the bank
  // docs/design.md §5.1 (set by the helpers of cases()):
  bool weighted = false;      // per-query feature weights, |normal| with a quarter of them 0
  double near = -1;           // >= 0: each query is a bank row plus near * normal noise
  double far = 0;             // > 0: the bank and queries sit at distance `far` from the origin...
  double spread = 1;          // ...with the rows `spread` * normal around that centre
  bool all_same = false;      // every bank row identical: row 0 must win every tie
  double convex = 0;          // > 0: every element of out within convex * spread of float64's (far banks:
                              // out a convex combination of the rows, not scaled towards the origin)
};

double tolerance(DType dt) { return dt == DType::F32 ? 1e-5 : dt == DType::F16 ? 5e-3 : 2e-2; }
const char* dtype_name(DType dt) { return dt == DType::F32 ? "f32" : dt == DType::F16 ? "f16" : "bf16"; }

// A tensor of the case's dtype: raw storage and the float64 of each stored value.
struct Buffer {
  DType dt;
  std::vector<float> f32;
  std::vector<uint16_t> u16;
  std::vector<double> value;
  Buffer(DType d, size_t n) : dt(d), value(n, 0.0) {
    if (d == DType::F32) f32.assign(n, 0.f); else u16.assign(n, 0);
  }
  void set(size_t i, double v) {
    if (dt == DType::F32) {
      f32[i] = static_cast<float>(v);
      value[i] = f32[i];
    } else if (dt == DType::BF16) {
      u16[i] = hen_emu::float_to_bf16(static_cast<float>(v));
      value[i] = hen_emu::bits_to_float(static_cast<uint32_t>(u16[i]) << 16);
    } else {
      u16[i] = hen_emu::float_to_half(static_cast<float>(v));
      value[i] = hen_emu::half_bits_to_float(u16[i]);
    }
  }
  void copy(size_t dst, size_t src) {
    if (dt == DType::F32) f32[dst] = f32[src]; else u16[dst] = u16[src];
    value[dst] = value[src];
  }
  const void* data() const { return dt == DType::F32 ? static_cast<const void*>(f32.data()) : u16.data(); }
};

struct Result {
  std::vector<float> out, lse, top_score;
  std::vector<int64_t> top_index;
  hen::cuda::Plan plan;
};

struct Inputs {
  Case c;
  int64_t Dv;
  bool same;
  Buffer q, x, v;
  std::vector<float> beta;
  int64_t qrs, qls, xrs, xls, vrs, vls;
  std::vector<float> w;  // (L, B, D) weights, empty when none
};

Inputs make_inputs(const Case& c, uint32_t seed) {
  const bool same = c.Dv == 0;
  const int64_t Dv = same ? c.D : c.Dv;
  const int64_t qrs = c.D + c.q_pad, xrs = c.D + c.x_pad, vrs = same ? xrs : Dv + c.v_pad;
  Inputs in{c, Dv, same,
            Buffer(c.dtype, static_cast<size_t>(c.L * c.B * qrs)),
            Buffer(c.dtype, static_cast<size_t>(std::max<int64_t>(c.Lm * c.N * xrs, 1))),
            Buffer(c.dtype, static_cast<size_t>(same ? 1 : std::max<int64_t>(c.Lm * c.N * vrs, 1))),
            {}, qrs, c.B * qrs, xrs, c.Lm == 1 ? 0 : c.N * xrs, vrs, c.Lm == 1 ? 0 : c.N * vrs, {}};
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  const double centre = c.far / std::sqrt(static_cast<double>(c.D));  // per feature: |centre| = far
  for (int64_t i = 0; i < c.Lm * c.N * xrs; ++i) in.x.set(static_cast<size_t>(i), centre + c.spread * normal(gen));
  if (c.all_same)
    for (int64_t lm = 0; lm < c.Lm; ++lm)
      for (int64_t n = 1; n < c.N; ++n)
        for (int64_t k = 0; k < c.D; ++k)
          in.x.copy(static_cast<size_t>(lm * in.xls + n * xrs + k), static_cast<size_t>(lm * in.xls + k));
  if (!same)
    for (int64_t i = 0; i < c.Lm * c.N * vrs; ++i) in.v.set(static_cast<size_t>(i), normal(gen));
  if (c.ties) {  // every 7th row repeats the row 100 rows earlier (same lead)
    for (int64_t lm = 0; lm < c.Lm; ++lm)
      for (int64_t n = 100; n < c.N; n += 7)
        for (int64_t k = 0; k < c.D; ++k)
          in.x.copy(static_cast<size_t>(lm * in.xls + n * xrs + k), static_cast<size_t>(lm * in.xls + (n - 100) * xrs + k));
  }
  for (int64_t l = 0; l < c.L; ++l)
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t k = 0; k < c.D; ++k) {
        const size_t i = static_cast<size_t>(l * in.qls + b * qrs + k);
        if (c.hard || c.ties || c.near >= 0) {  // near (hard, near) or exactly on (ties) a bank row
          const int64_t row = (b * 37 + 11) % c.N;
          const double base = in.x.value[static_cast<size_t>((c.Lm == 1 ? 0 : l) * in.xls + row * xrs + k)];
          const double noise = c.hard ? 0.05 : c.near >= 0 ? c.near : 0.0;
          in.q.set(i, base + noise * normal(gen));
        } else {
          in.q.set(i, centre + c.spread * normal(gen));
        }
      }
  if (c.nan_query >= 0) in.q.set(static_cast<size_t>(c.nan_query * qrs + (c.D - 1) / 2), std::nan(""));
  if (c.weighted) {
    std::uniform_real_distribution<double> uniform(0.0, 1.0);
    in.w.resize(static_cast<size_t>(c.L * c.B * c.D));
    for (float& w : in.w) w = uniform(gen) < 0.25 ? 0.f : static_cast<float>(std::fabs(normal(gen)));
    for (int64_t k = 0; k < c.D / 2; ++k) in.w[static_cast<size_t>(k)] = 0.f;  // query 0 knows only its second half
  }
  const double base = c.sim == Similarity::L2 ? 1.0 : 1.0 / std::sqrt(static_cast<double>(c.D));
  for (int64_t l = 0; l < c.L; ++l) in.beta.push_back(static_cast<float>(c.beta_level * base * (1.0 + 0.1 * l)));
  return in;
}

Result run(const Inputs& in) {
  const Case& c = in.c;
  hen::PartialParams p{};
  p.query = in.q.data();
  p.memory = in.x.data();
  p.values = in.same ? in.x.data() : in.v.data();
  p.beta = in.beta.data();
  p.weights = in.w.empty() ? nullptr : in.w.data();
  p.dtype = c.dtype;
  p.similarity = c.sim;
  p.L = c.L, p.B = c.B, p.N = c.N, p.D = c.D, p.Dv = in.Dv;
  p.query_lead_stride = in.qls, p.query_row_stride = in.qrs;
  p.memory_lead_stride = in.xls, p.memory_row_stride = in.xrs;
  p.values_lead_stride = in.same ? in.xls : in.vls, p.values_row_stride = in.same ? in.xrs : in.vrs;
  p.offset = c.offset;
  Result r;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  r.out.assign(static_cast<size_t>(c.L * c.B * in.Dv), nan);  // anything left unwritten shows
  r.lse.assign(static_cast<size_t>(c.L * c.B), nan);
  r.top_score.assign(static_cast<size_t>(c.L * c.B), nan);
  r.top_index.assign(static_cast<size_t>(c.L * c.B), -7);
  p.out = r.out.data(), p.lse = r.lse.data(), p.top_score = r.top_score.data(), p.top_index = r.top_index.data();

  hen::cuda::DeviceInfo dev{};
  if (const char* e = hen::cuda::device_info(0, &dev)) { std::fprintf(stderr, "%s\n", e); std::exit(2); }
  if (const char* e = hen::cuda::make_plan(p, dev, c.hints, &r.plan)) { std::fprintf(stderr, "%s\n", e); std::exit(2); }
  const int64_t S = r.plan.splits;
  std::vector<float> ws_acc, ws_max, ws_sum, ws_ts;
  std::vector<int64_t> ws_ti;
  hen::Workspace ws{};
  if (S > 1) {
    ws_acc.assign(static_cast<size_t>(c.L * S * c.B * in.Dv), nan);
    ws_max.assign(static_cast<size_t>(c.L * S * c.B), nan);
    ws_sum = ws_max, ws_ts = ws_max;
    ws_ti.assign(static_cast<size_t>(c.L * S * c.B), -7);
    ws.acc = ws_acc.data(), ws.max = ws_max.data(), ws.sum = ws_sum.data(), ws.top_score = ws_ts.data();
    ws.top_index = ws_ti.data();
  }
  if (const char* e = hen::cuda::launch(p, r.plan, ws, 0, nullptr)) { std::fprintf(stderr, "%s\n", e); std::exit(2); }
  return r;
}

struct Reference {
  std::vector<double> out, lse, top_score;
  std::vector<int64_t> top_index;
};

Reference reference(const Inputs& in) {
  const Case& c = in.c;
  Reference ref;
  const double inf = std::numeric_limits<double>::infinity();
  for (int64_t l = 0; l < c.L; ++l) {
    const int64_t lm = c.Lm == 1 ? 0 : l;
    for (int64_t b = 0; b < c.B; ++b) {
      const double* q = &in.q.value[static_cast<size_t>(l * in.qls + b * in.qrs)];
      std::vector<double> s(static_cast<size_t>(c.N));
      double big = -inf, top = -inf;
      int64_t top_i = -1;
      for (int64_t n = 0; n < c.N; ++n) {
        const double* x = &in.x.value[static_cast<size_t>(lm * in.xls + n * in.xrs)];
        // The definitions, directly in float64 (no expanded form to cancel).
        const float* w = in.w.empty() ? nullptr : &in.w[static_cast<size_t>((l * c.B + b) * c.D)];
        double dot = 0, sq = 0;
        for (int64_t k = 0; k < c.D; ++k) {
          const double wk = w != nullptr ? w[k] : 1.0;
          dot += wk * q[k] * x[k];
          sq += wk * (x[k] - q[k]) * (x[k] - q[k]);
        }
        double sim = dot;
        if (c.sim != Similarity::Dot) sim = c.sim == Similarity::L2 ? -std::sqrt(sq) : -0.5 * sq;
        s[static_cast<size_t>(n)] = in.beta[static_cast<size_t>(l)] * sim;
        if (s[static_cast<size_t>(n)] > top) top = s[static_cast<size_t>(n)], top_i = n;
        big = std::max(big, s[static_cast<size_t>(n)]);
      }
      double total = 0;
      std::vector<double> o(static_cast<size_t>(in.Dv), 0.0);
      for (int64_t n = 0; n < c.N; ++n) {
        const double w = std::exp(s[static_cast<size_t>(n)] - big);
        total += w;
        const Buffer& vb = in.same ? in.x : in.v;
        const int64_t vls = in.same ? in.xls : in.vls, vrs = in.same ? in.xrs : in.vrs;
        for (int64_t d = 0; d < in.Dv; ++d) o[static_cast<size_t>(d)] += w * vb.value[static_cast<size_t>(lm * vls + n * vrs + d)];
      }
      bool nan = false;
      for (int64_t k = 0; k < c.D; ++k) nan |= std::isnan(q[k]);
      for (int64_t d = 0; d < in.Dv; ++d)
        ref.out.push_back(nan ? NAN : (c.N ? o[static_cast<size_t>(d)] / total : 0.0));
      ref.lse.push_back(nan ? NAN : (c.N ? big + std::log(total) : -inf));
      ref.top_score.push_back(top);
      ref.top_index.push_back(top_i < 0 ? -1 : top_i + c.offset);
    }
  }
  return ref;
}

double rel_err(const std::vector<float>& got, const std::vector<double>& want, const std::vector<bool>& keep,
               int64_t per) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!keep[i / static_cast<size_t>(per)] || std::isinf(want[i])) continue;
    diff += (got[i] - want[i]) * (got[i] - want[i]);
    norm += want[i] * want[i];
  }
  return norm == 0 ? std::sqrt(diff) : std::sqrt(diff / norm);
}

const char* kernel_name(const hen::cuda::Plan& p) { return p.kernel == hen::cuda::Kernel::Mma ? "mma" : "simt"; }

bool check(const Case& c, uint32_t seed) {
  const Inputs in = make_inputs(c, seed);
  const Result r = run(in);
  const Reference ref = reference(in);
  const double tol = tolerance(c.dtype);
  const int64_t rows = c.L * c.B;
  std::vector<bool> keep(static_cast<size_t>(rows), true);
  if (c.nan_query >= 0) keep[static_cast<size_t>(c.nan_query)] = false;
  std::string why;
  auto fail = [&](const std::string& m) { why += (why.empty() ? "" : "; ") + m; };

  if (!c.expect.empty() && c.expect != kernel_name(r.plan)) fail(std::string("plan picked ") + kernel_name(r.plan));
  if (c.expect_split && r.plan.splits < 2) fail("plan did not split the bank");
  for (size_t i = 0; i < r.out.size(); ++i)
    if (keep[i / static_cast<size_t>(in.Dv)] && std::isnan(r.out[i])) { fail("NaN in out"); break; }
  const double e_out = rel_err(r.out, ref.out, keep, in.Dv);
  // lse and the top score per query against max(1, |value|), the worst query
  // (as tests/test_kernels.py): a relative error of sum exp, well posed where
  // lse ~ 0 (a query on its pattern).
  auto worst = [&](const std::vector<float>& got, const std::vector<double>& want) {
    double e = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      if (!keep[i] || std::isinf(want[i])) continue;
      e = std::max(e, std::fabs(got[i] - want[i]) / std::max(1.0, std::fabs(want[i])));
    }
    return e;
  };
  const double e_lse = worst(r.lse, ref.lse), e_top = worst(r.top_score, ref.top_score);
  if (!(e_out <= tol)) fail("out error " + std::to_string(e_out));
  if (c.convex > 0) {
    double worst_abs = 0;
    for (size_t i = 0; i < r.out.size(); ++i)
      if (keep[i / static_cast<size_t>(in.Dv)]) worst_abs = std::max(worst_abs, std::fabs(r.out[i] - ref.out[i]));
    if (!(worst_abs <= c.convex * c.spread))
      fail("out off by " + std::to_string(worst_abs / c.spread) + " x the rows' spread");
  }
  if (!(e_lse <= tol)) fail("lse error " + std::to_string(e_lse));
  if (!(e_top <= tol)) fail("top_score error " + std::to_string(e_top));
  int bad_index = 0;
  for (int64_t i = 0; i < rows; ++i) {
    if (!keep[static_cast<size_t>(i)]) continue;
    const size_t k = static_cast<size_t>(i);
    if (c.N == 0) {
      if (r.lse[k] != -INFINITY || r.top_score[k] != -INFINITY || r.top_index[k] != -1) ++bad_index;
      continue;
    }
    const bool agree = r.top_index[k] == ref.top_index[k];
    const bool close = std::fabs(r.top_score[k] - ref.top_score[k]) <= tol * std::max(1.0, std::fabs(ref.top_score[k]));
    if (c.ties || c.hard || c.all_same ? !agree : !(agree || close)) ++bad_index;
  }
  if (bad_index) fail(std::to_string(bad_index) + " wrong top_index");
  if (c.N == 0)
    for (float v : r.out)
      if (v != 0.f) { fail("empty bank: out != 0"); break; }
  if (c.hard && in.same) {  // weight 1 on the stored row: out is that row, bit for bit
    int inexact = 0;
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t l = i / c.B, lm = c.Lm == 1 ? 0 : l, row = ref.top_index[static_cast<size_t>(i)] - c.offset;
      for (int64_t d = 0; d < in.Dv; ++d)
        if (r.out[static_cast<size_t>(i * in.Dv + d)] != static_cast<float>(in.x.value[static_cast<size_t>(lm * in.xls + row * in.xrs + d)]))
          ++inexact;
    }
    if (inexact) fail(std::to_string(inexact) + " elements off the stored pattern");
  }
  if (c.nan_query >= 0) {
    bool all_nan = std::isnan(r.lse[static_cast<size_t>(c.nan_query)]);
    for (int64_t d = 0; d < in.Dv; ++d) all_nan &= std::isnan(r.out[static_cast<size_t>(c.nan_query * in.Dv + d)]);
    if (!all_nan) fail("the NaN query's out/lse are not NaN");
    Case clean = c;
    clean.nan_query = -1;
    Inputs in2 = make_inputs(clean, seed);
    const Result r2 = run(in2);
    int differ = 0;
    for (int64_t i = 0; i < rows; ++i) {
      if (i == c.nan_query) continue;
      const size_t k = static_cast<size_t>(i);
      differ += r.lse[k] != r2.lse[k] || r.top_index[k] != r2.top_index[k];
      for (int64_t d = 0; d < in.Dv; ++d) differ += r.out[k * in.Dv + d] != r2.out[k * in.Dv + d];
    }
    if (differ) fail("the NaN query changed " + std::to_string(differ) + " values of other queries");
  }
  const hen::cuda::Plan& pl = r.plan;
  std::printf("%-4s %-44s %-4s %s qb=%d team=%d chunks=%d hd=%d splits=%lld vec=%d same=%d  err out=%.1e lse=%.1e top=%.1e%s%s\n",
              why.empty() ? "ok" : "FAIL", c.name.c_str(), dtype_name(c.dtype), kernel_name(pl), pl.query_block,
              pl.team, pl.chunks, pl.head_dim, static_cast<long long>(pl.splits), pl.vector_loads,
              pl.values_are_memory, e_out, e_lse, e_top, why.empty() ? "" : "  <- ", why.c_str());
  std::fflush(stdout);
  return why.empty();
}

std::vector<Case> cases() {
  using S = Similarity;
  using T = DType;
  std::vector<Case> v;
  auto add = [&](Case c) { v.push_back(c); };
  // simt: team sizes from 1 to 256 threads, 1 to 8 chunks per thread, 1 or 4 queries per block.
  add({"simt-d1", T::F32, S::L2, 1, 1, 2, 300, 1});
  add({"simt-unaligned-d17", T::F32, S::Dot, 1, 1, 1, 300, 17});
  add({"simt-values-lead2", T::F32, S::L2, 2, 2, 3, 1000, 64, 11, 0, 0, 0, 7});
  add({"simt-qb4-d129", T::F32, S::L2Sq, 1, 1, 17, 257, 129});
  add({"simt-bf16-d128-split", T::BF16, S::Dot, 1, 1, 1, 1000, 128, 0, 0, 0, 0, 0, {}, "simt", 1.0, -1, false, false, true});
  add({"simt-f16-strided-q", T::F16, S::L2, 1, 1, 5, 300, 33, 0, 3});
  add({"simt-bf16-d4096", T::BF16, S::L2Sq, 1, 1, 2, 60, 4096});
  add({"simt-f32-d4096-values", T::F32, S::Dot, 1, 1, 1, 40, 4096, 100});
  add({"simt-f32-d8192", T::F32, S::L2, 1, 1, 1, 20, 8192});
  add({"simt-bf16-d8192", T::BF16, S::Dot, 1, 1, 1, 24, 8192});
  add({"simt-splits5-values", T::F32, S::Dot, 1, 1, 4, 2000, 1024, 300, 0, 0, 0, 0, force(std::nullopt, 5)});
  add({"simt-empty-bank", T::F16, S::Dot, 1, 1, 3, 0, 8});
  add({"simt-one-row-offset", T::F32, S::Dot, 1, 1, 4, 1, 5, 0, 0, 0, 0, 3});
  add({"simt-ties-splits4", T::F32, S::L2, 1, 1, 3, 400, 16, 0, 0, 0, 0, 0, force(std::nullopt, 4), "", 1.0, -1, true});
  add({"simt-nan-query-qb4", T::F32, S::L2, 1, 1, 6, 500, 40, 0, 0, 0, 0, 0, {}, "", 1.0, 2});
  add({"simt-nan-query-l2sq-split", T::BF16, S::L2Sq, 1, 1, 3, 500, 40, 0, 0, 0, 0, 0, force(std::nullopt, 3), "", 1.0, 1});
  add({"simt-hard-bf16-l2sq", T::BF16, S::L2Sq, 1, 1, 4, 300, 512, 0, 0, 0, 0, 0, {}, "", 1e4, -1, false, true});
  add({"simt-hard-f32-dot-offset", T::F32, S::Dot, 1, 1, 4, 300, 16, 0, 0, 0, 0, 5, {}, "", 1e4, -1, false, true});
  add({"simt-qb1-hint", T::F32, S::L2Sq, 3, 3, 2, 77, 3, 7, 0, 0, 0, 0, force(std::nullopt, 0, 1)});
  add({"simt-forced-bf16-b20", T::BF16, S::L2, 1, 1, 20, 150, 64, 0, 0, 1, 0, 0, force(Kernel::Simt), "simt"});
  add({"simt-f16-values-unaligned", T::F16, S::Dot, 2, 1, 3, 90, 24, 40, 0, 0, 3});
  // mma: head dims 32 to 256, aligned (cp.async) and element-wise loads, splits.
  add({"mma-bf16-d64", T::BF16, S::Dot, 1, 1, 17, 129, 64, 0, 0, 0, 0, 0, {}, "mma"});
  add({"mma-f16-l2-d17-lead", T::F16, S::L2, 2, 1, 64, 300, 17, 0, 0, 0, 0, 0, {}, "mma"});
  add({"mma-bf16-values-d128-splits3", T::BF16, S::L2Sq, 1, 1, 100, 70, 128, 48, 0, 0, 0, 0, force(std::nullopt, 3), "mma"});
  add({"mma-f16-d256", T::F16, S::Dot, 1, 1, 20, 100, 256, 0, 0, 0, 0, 0, {}, "mma"});
  add({"mma-bf16-values-d256-strided", T::BF16, S::L2, 1, 1, 33, 65, 200, 256, 8, 8, 8, 0, {}, "mma"});
  add({"mma-nan-query", T::BF16, S::L2, 1, 1, 20, 100, 64, 0, 0, 0, 0, 0, force(Kernel::Mma), "mma", 1.0, 5});
  add({"mma-ties-splits2", T::F16, S::Dot, 1, 1, 16, 300, 32, 0, 0, 0, 0, 9, force(Kernel::Mma, 2), "mma", 1.0, -1, true});
  add({"mma-empty-bank", T::BF16, S::Dot, 1, 1, 16, 0, 32, 0, 0, 0, 0, 0, force(Kernel::Mma), "mma"});
  add({"mma-hard-bf16", T::BF16, S::Dot, 1, 1, 12, 300, 64, 0, 0, 0, 0, 0, force(Kernel::Mma), "mma", 1e4, -1, false, true});
  add({"mma-one-query", T::F16, S::L2Sq, 1, 1, 1, 100, 48, 0, 0, 0, 0, 0, force(Kernel::Mma), "mma"});
  add({"mma-auto-split", T::BF16, S::Dot, 1, 1, 16, 2000, 64, 0, 0, 0, 0, 0, {}, "mma", 1.0, -1, false, false, true});

  // docs/design.md §5.1.  Helpers set the numerics fields of a case.
  auto weighted = [](Case c) { c.weighted = true; return c; };
  auto near = [](Case c, double noise) { c.near = noise; return c; };
  auto far = [](Case c, double norm, double spread, double noise) {
    c.far = norm, c.spread = spread, c.near = noise;
    return c;
  };
  auto all_same = [](Case c) { c.all_same = true; return c; };
  auto convex = [](Case c, double norm, double spread, double bound) {
    c.far = norm, c.spread = spread, c.convex = bound;
    return c;
  };
  // l2 forms with queries on or next to stored rows: every instance kind (simt
  // direct with one query per block; simt expanded + recompute with four, the
  // vote in a warp (team <= 32) or the block (team 256); mma), every dtype.
  add(near({"near-simt-qb1-f32-l2", T::F32, S::L2, 1, 1, 1, 300, 64, 0, 0, 0, 0, 0, {}, "simt", 0.3}, 1e-3));
  add(near({"near-simt-qb4-f32-l2", T::F32, S::L2, 1, 1, 8, 500, 64, 0, 0, 0, 0, 0, {}, "simt", 0.3}, 1e-3));
  add(near({"on-simt-qb4-f32-l2sq", T::F32, S::L2Sq, 1, 1, 5, 300, 48, 0, 0, 0, 0, 0, {}, "simt", 0.3}, 0.0));
  add(near({"near-simt-qb4-f32-l2-team256", T::F32, S::L2, 1, 1, 4, 300, 1024, 0, 0, 0, 0, 0, {}, "simt", 0.05}, 1e-3));
  add(near({"near-simt-qb4-bf16-l2-team64", T::BF16, S::L2, 1, 1, 4, 300, 512, 0, 0, 0, 0, 0, {}, "simt", 0.1}, 1e-2));
  add(near({"near-simt-qb4-f32-l2-split3", T::F32, S::L2, 1, 1, 6, 900, 100, 0, 0, 0, 0, 0, force(std::nullopt, 3), "simt", 0.3}, 1e-3));
  add(near({"near-simt-bf16-l2-qb4", T::BF16, S::L2, 1, 1, 6, 300, 128, 0, 0, 0, 0, 0, {}, "simt", 0.3}, 1e-2));
  add(near({"near-simt-f16-l2sq-qb1", T::F16, S::L2Sq, 1, 1, 1, 300, 96, 0, 0, 0, 0, 0, {}, "simt", 0.3}, 1e-2));
  add(near({"near-mma-bf16-l2", T::BF16, S::L2, 1, 1, 40, 300, 64, 0, 0, 0, 0, 0, {}, "mma", 0.3}, 1e-2));
  add(near({"near-mma-f16-l2sq-d256", T::F16, S::L2Sq, 1, 1, 20, 100, 256, 0, 0, 0, 0, 0, {}, "mma", 0.3}, 1e-2));
  add(near({"on-mma-f16-l2-d17", T::F16, S::L2, 1, 1, 33, 200, 17, 0, 0, 0, 0, 0, {}, "mma", 0.3}, 0.0));
  // Banks far from the origin (|x| >> the rows' spread; the 1e4 with
  // rows 0.1 apart in float32): the expanded form cancels for every pair.
  const double sp = 0.1 / std::sqrt(128.0), nz = 1e-3 / 8.0;  // D = 64: rows 0.1 apart, queries 1e-3 off one
  add(far({"far-simt-qb1-f32-l2", T::F32, S::L2, 1, 1, 1, 300, 64, 0, 0, 0, 0, 0, {}, "simt", 100.0}, 1e4, sp, nz));
  add(far({"far-simt-qb4-f32-l2sq", T::F32, S::L2Sq, 1, 1, 8, 300, 64, 0, 0, 0, 0, 0, {}, "simt", 8000.0}, 1e4, sp, nz));
  add(far({"far-simt-qb4-f32-l2-values-split4", T::F32, S::L2, 1, 1, 5, 400, 64, 24, 0, 0, 0, 0, force(std::nullopt, 4), "simt", 100.0}, 1e4, sp, nz));
  // tests/test_kernels.py's far bank: D = 32, 50 rows, four queries, beta 1e3 (l2) and 1e5 (l2sq).
  const double sp32 = 0.1 / 8.0, nz32 = 1e-3 / std::sqrt(32.0), b32 = 1e5 * std::sqrt(32.0);
  add(far({"far-simt-qb4-f32-l2-beta1e3", T::F32, S::L2, 1, 1, 4, 50, 32, 0, 0, 0, 0, 0, {}, "simt", 1e3}, 1e4, sp32, nz32));
  add(far({"far-simt-qb4-f32-l2sq-beta1e5", T::F32, S::L2Sq, 1, 1, 4, 50, 32, 0, 0, 0, 0, 0, {}, "simt", b32}, 1e4, sp32, nz32));
  add(far({"far-simt-bf16-l2", T::BF16, S::L2, 1, 1, 3, 300, 64, 0, 0, 0, 0, 0, {}, "simt", 1.0}, 64.0, 0.5, 0.05));
  add(far({"far-mma-bf16-l2sq", T::BF16, S::L2Sq, 1, 1, 32, 200, 64, 0, 0, 0, 0, 0, {}, "mma", 4.0}, 64.0, 0.5, 0.05));
  add(far({"far-mma-f16-l2-d128", T::F16, S::L2, 1, 1, 20, 150, 128, 0, 0, 0, 0, 0, {}, "mma", 1.0}, 256.0, 0.5, 0.05));
  // 16-bit P, soft weights, rows at 16 +- 0.25 per feature: the output must stay within a small part of
  // the rows' spread of float64's.  Normalised by the softmax's own sum instead of the sum of the
  // rounded weights it was 0.011 / 0.0013 / 0.0061 of the spread off (now 2.7e-4 / 3.1e-5 / 1.2e-4).
  add(convex({"convex-mma-bf16-l2sq", T::BF16, S::L2Sq, 1, 1, 32, 500, 64, 0, 0, 0, 0, 0, {}, "mma", 4.0}, 128.0, 0.25, 2e-3));
  add(convex({"convex-mma-f16-dot-splits3", T::F16, S::Dot, 1, 1, 20, 600, 64, 0, 0, 0, 0, 0, force(Kernel::Mma, 3), "mma", 0.03}, 128.0, 0.25, 2.5e-4));
  add(convex({"convex-mma-bf16-l2-auto-split", T::BF16, S::L2, 1, 1, 16, 2000, 64, 0, 0, 0, 0, 0, {}, "mma", 2.0, -1, false, false, true}, 128.0, 0.25, 2e-3));
  // Weights: dot as w∘q, l2 forms from the weighted squares, every dtype and kernel.
  add(weighted({"w-simt-f32-dot-qb1", T::F32, S::Dot, 1, 1, 1, 300, 64, 0, 0, 0, 0, 0, {}, "simt"}));
  add(weighted({"w-simt-f32-l2-qb4", T::F32, S::L2, 1, 1, 5, 400, 40}));
  add(weighted({"w-simt-f32-l2sq-d4096", T::F32, S::L2Sq, 1, 1, 2, 40, 4096}));
  add(weighted({"w-simt-bf16-l2-values-split4", T::BF16, S::L2, 1, 1, 3, 600, 128, 48, 0, 0, 0, 0, force(std::nullopt, 4), "simt"}));
  add(weighted({"w-simt-f16-dot-qb4-d33-lead2", T::F16, S::Dot, 2, 2, 7, 200, 33, 0, 3, 0, 0, 4}));
  add(weighted(near({"w-near-simt-f32-l2-qb4", T::F32, S::L2, 1, 1, 6, 300, 64, 0, 0, 0, 0, 0, {}, "simt", 0.3}, 1e-3)));
  add(weighted(far({"w-far-simt-f32-l2sq-qb1", T::F32, S::L2Sq, 1, 1, 1, 300, 64, 0, 0, 0, 0, 0, {}, "simt", 8000.0}, 1e4, sp, nz)));
  add(weighted({"w-mma-bf16-dot", T::BF16, S::Dot, 1, 1, 40, 300, 64, 0, 0, 0, 0, 0, {}, "mma"}));
  add(weighted({"w-mma-f16-l2-b70", T::F16, S::L2, 1, 1, 70, 200, 128, 0, 0, 0, 0, 0, {}, "mma"}));
  add(weighted({"w-mma-bf16-l2sq-d256-values", T::BF16, S::L2Sq, 1, 1, 20, 100, 200, 256, 0, 0, 0, 0, {}, "mma"}));
  add(weighted({"w-mma-f16-dot-d17", T::F16, S::Dot, 1, 1, 33, 150, 17, 0, 0, 0, 0, 0, {}, "mma"}));
  add(weighted({"w-mma-bf16-l2-splits3-lead2", T::BF16, S::L2, 2, 1, 24, 300, 32, 0, 0, 0, 0, 5, force(Kernel::Mma, 3), "mma"}));
  // At large beta one 16-bit rounding of w∘q, w and x∘x misses the f16 tolerance
  // (6e-3 here); the hi + lo halves of mma_kernel keep it near 3e-5.
  add(weighted({"w-mma-f16-l2-beta12", T::F16, S::L2, 1, 1, 40, 300, 128, 0, 0, 0, 0, 0, {}, "mma", 12.0}));
  add(weighted({"w-mma-f16-l2sq-d256-beta12", T::F16, S::L2Sq, 1, 1, 40, 300, 256, 0, 0, 0, 0, 0, {}, "mma", 12.0}));
  add(weighted(near({"w-near-mma-bf16-l2", T::BF16, S::L2, 1, 1, 40, 300, 64, 0, 0, 0, 0, 0, {}, "mma", 0.3}, 1e-2)));
  add(weighted(far({"w-far-mma-f16-l2sq", T::F16, S::L2Sq, 1, 1, 24, 150, 64, 0, 0, 0, 0, 0, {}, "mma", 4.0}, 256.0, 0.5, 0.05)));
  add(weighted({"w-hard-simt-bf16-l2sq", T::BF16, S::L2Sq, 1, 1, 4, 300, 64, 0, 0, 0, 0, 0, {}, "simt", 1e4, -1, false, true}));
  // Ties at every position: every bank row the same, so row 0 (+ offset) must
  // win in every kernel, team, step, split and the combine.
  add(all_same({"same-simt-qb1-f32-l2", T::F32, S::L2, 1, 1, 3, 300, 16, 0, 0, 0, 0, 3, force(std::nullopt, 0, 1), "simt"}));
  add(all_same({"same-simt-qb4-f32-dot-splits5", T::F32, S::Dot, 1, 1, 6, 500, 24, 0, 0, 0, 0, 0, force(std::nullopt, 5), "simt"}));
  add(all_same({"same-simt-bf16-l2sq-d1024", T::BF16, S::L2Sq, 1, 1, 4, 200, 1024}));
  add(all_same(weighted({"same-simt-f16-l2-w-split3", T::F16, S::L2, 1, 1, 2, 300, 40, 0, 0, 0, 0, 0, force(std::nullopt, 3), "simt"})));
  add(all_same({"same-mma-bf16-dot-splits3", T::BF16, S::Dot, 1, 1, 20, 300, 64, 0, 0, 0, 0, 7, force(Kernel::Mma, 3), "mma"}));
  add(all_same(weighted({"same-mma-f16-l2-w", T::F16, S::L2, 1, 1, 20, 200, 32, 0, 0, 0, 0, 0, {}, "mma"})));
  add(all_same({"same-mma-bf16-l2sq-auto-split", T::BF16, S::L2Sq, 1, 1, 16, 2000, 64, 0, 0, 0, 0, 0, {}, "mma", 1.0, -1, false, false, true}));
  return v;
}

}  // namespace

// emulate_plans.cpp: the planner's checks, counted like the cases.
void plan_checks(const std::string& filter, int& ran, int& failed);

// emulate_test [filter [i/n]]: the cases whose name holds filter ("" for all); with i/n only every
// n-th of them from the i-th, and the plan checks in shard 0 only, so that n processes share the run.
int main(int argc, char** argv) {
  const std::string filter = argc > 1 ? argv[1] : "";
  int shard = 0, shards = 1;
  if (argc > 2 && (std::sscanf(argv[2], "%d/%d", &shard, &shards) != 2 || shards < 1 || shard < 0 ||
                   shard >= shards)) {
    std::fprintf(stderr, "usage: %s [filter [i/n]] with 0 <= i < n\n", argv[0]);
    return 2;
  }
  int failed = 0, ran = 0, index = 0;
  uint32_t seed = 1;
  for (const Case& c : cases()) {
    ++seed;
    if (!filter.empty() && c.name.find(filter) == std::string::npos) continue;
    if (index++ % shards != shard) continue;
    ++ran;
    failed += !check(c, seed);
  }
  if (shard == 0) plan_checks(filter, ran, failed);
  std::printf("%d of %d cases passed\n", ran - failed, ran);
  return failed ? 1 : 0;
}
