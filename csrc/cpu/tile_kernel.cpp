// The tile kernel of hopfield_cpu.h.  CMake compiles this file once per
// instruction set (HEN_ISA_NS = avx512 / avx2 / baseline with HEN_ISA_LEVEL 3 / 2 / 1);
// hopfield_cpu.cpp picks one at run time.  The instruction set comes from the
// target pragma below, placed after every library header, so that only this
// file's own functions use it: inline library code instantiated here (std::vector,
// say) keeps the baseline instruction set, and the linker's one copy of it runs
// on every CPU.
//
// One tile: a query block (up to 64 queries, padded to the vector width W) against
// one split of the bank, walked in row tiles of plan.row_block rows:
//   1. scores   C = X_tile . Q^T          (bank rows x queries; brgemm or dot blocks)
//               ℓ2: d² = |q|²_w + |x|²_w - 2 C, recomputed directly where it cancels
//   2. softmax  over each column (W queries per vector): max, argmax, exp, sums, and
//               the weights written transposed, P (queries x rows)
//   3. values   O += P . V_tile            (brgemm or vector FMAs)
// Every row is scored by the same operations wherever it sits (tails are padded
// to a whole tile, never computed by another path), so equal rows score equally
// and the argmax keeps the first: docs/design.md §5.1.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "cpu/hopfield_cpu.h"
#include "cpu/microkernel.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#if !defined(HEN_ISA_NS) || !defined(HEN_ISA_LEVEL)
#error "HEN_ISA_NS and HEN_ISA_LEVEL name the instruction set this copy is compiled for"
#endif

// Pragmas take no macros: one literal per instruction set.
#if HEN_ISA_LEVEL == 3 && defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c"))), apply_to = function)
#elif HEN_ISA_LEVEL == 2 && defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#elif HEN_ISA_LEVEL == 3
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
#elif HEN_ISA_LEVEL == 2
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace hen {
namespace HEN_ISA_NS {

#include "cpu/simd.h"

namespace {

// --- hand-written products (Gemm::Portable) ----------------------------------------

#if HEN_ISA_LEVEL == 2
// r[m] = sum of the lanes of a[m], for eight vectors at once.
inline vf reduce8(const vf* a) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_permute2f128_ps(u0, u1, 0x20) + _mm256_permute2f128_ps(u0, u1, 0x31);
}
#endif

// C[j * ldc + i] (+)= <Q_i, X_j> over k in [0, K): QI queries by RJ rows in registers.
template <int QI, int RJ>
inline void dot_block(const float* q, int64_t q_stride, const float* const* x, int64_t K, float* c, int64_t ldc,
                      bool accumulate) {
  vf acc[QI][RJ];
  for (int a = 0; a < QI; ++a)
    for (int b = 0; b < RJ; ++b) acc[a][b] = vf{};
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    vf xv[RJ];
    for (int b = 0; b < RJ; ++b) xv[b] = load(x[b] + k);
    for (int a = 0; a < QI; ++a) {
      vf qv = load(q + a * q_stride + k);
      // Keep qv in a register: GCC would otherwise fold a fresh load into every
      // FMA, and the load ports, not the FMA units, would set the pace.
      if constexpr (RJ > 1) asm("" : "+x"(qv));
      for (int b = 0; b < RJ; ++b) acc[a][b] += qv * xv[b];
    }
  }
  float sums[QI * RJ];
#if HEN_ISA_LEVEL == 2
  if constexpr (QI * RJ == 8) {
    store(sums, reduce8(&acc[0][0]));
  } else
#endif
  {
    for (int a = 0; a < QI; ++a)
      for (int b = 0; b < RJ; ++b) sums[a * RJ + b] = hsum(acc[a][b]);
  }
  for (int a = 0; a < QI; ++a)
    for (int b = 0; b < RJ; ++b) {
      float t = sums[a * RJ + b];
      for (int64_t kk = k; kk < K; ++kk) t += q[a * q_stride + kk] * x[b][kk];
      float* dst = c + b * ldc + a;
      *dst = accumulate ? *dst + t : t;
    }
}

// Rows come in whole tiles (a multiple of 8), so every row takes the RJ-row block
// of its query group and no row is reduced another way.
template <int QI>
struct DotRows {
  static void run(const float* q, float* c, int64_t q_stride, const float* const* rows, int64_t R, int64_t K,
                  int64_t ldc, bool accumulate) {
    constexpr int RJ = QI == 3 ? 2 : 8 / QI;
    for (int64_t j = 0; j < R; j += RJ) dot_block<QI, RJ>(q, q_stride, rows + j, K, c + j * ldc, ldc, accumulate);
  }
};

// acc[i][:] += sum_j P[i][j] * V_j[:] for QI queries.
template <int QI>
struct AccumulateValues {
  static void run(const float* p, float* acc, int64_t p_stride, const float* const* v, int64_t R, int64_t Dv,
                  int64_t acc_stride) {
    constexpr int C = 2;
    int64_t d = 0;
    for (; d + C * W <= Dv; d += C * W) {
      vf a[QI][C];
      for (int i = 0; i < QI; ++i)
        for (int c = 0; c < C; ++c) a[i][c] = load(acc + i * acc_stride + d + c * W);
      for (int64_t j = 0; j < R; ++j) {
        vf vv[C];
        for (int c = 0; c < C; ++c) vv[c] = load(v[j] + d + c * W);
        for (int i = 0; i < QI; ++i) {
          const vf w = splat(p[i * p_stride + j]);
          for (int c = 0; c < C; ++c) a[i][c] += w * vv[c];
        }
      }
      for (int i = 0; i < QI; ++i)
        for (int c = 0; c < C; ++c) store(acc + i * acc_stride + d + c * W, a[i][c]);
    }
    for (; d + W <= Dv; d += W) {
      vf a[QI];
      for (int i = 0; i < QI; ++i) a[i] = load(acc + i * acc_stride + d);
      for (int64_t j = 0; j < R; ++j) {
        const vf vv = load(v[j] + d);
        for (int i = 0; i < QI; ++i) a[i] += splat(p[i * p_stride + j]) * vv;
      }
      for (int i = 0; i < QI; ++i) store(acc + i * acc_stride + d, a[i]);
    }
    for (; d < Dv; ++d)
      for (int i = 0; i < QI; ++i) {
        float t = acc[i * acc_stride + d];
        for (int64_t j = 0; j < R; ++j) t += p[i * p_stride + j] * v[j][d];
        acc[i * acc_stride + d] = t;
      }
  }
};

// Dispatch a runtime query count to the register-blocked templates, 4 at a time.
template <template <int> class F, typename... Args>
void over_query_groups(int64_t Q, int64_t q_step, int64_t out_step, const float* q, float* out, Args... args) {
  int64_t i = 0;
  for (; i + 4 <= Q; i += 4) F<4>::run(q + i * q_step, out + i * out_step, args...);
  switch (Q - i) {
    case 3: F<3>::run(q + i * q_step, out + i * out_step, args...); break;
    case 2: F<2>::run(q + i * q_step, out + i * out_step, args...); break;
    case 1: F<1>::run(q + i * q_step, out + i * out_step, args...); break;
    default: break;
  }
}

constexpr int64_t kDepthChunk = 128;  // feature columns per pass of the portable score product (L1-sized)

// C[j * ldc + i] = <Q_i, X_j> for the R rows (a multiple of 8) and Q queries.
void portable_scores(const float* const* rows, int64_t R, const float* q, int64_t Q, int64_t D, float* c,
                     int64_t ldc, std::vector<const float*>& shifted) {
  shifted.resize(size_t(R));
  for (int64_t k0 = 0; k0 < D; k0 += kDepthChunk) {
    const int64_t K = std::min(kDepthChunk, D - k0);
    for (int64_t j = 0; j < R; ++j) shifted[size_t(j)] = rows[j] + k0;
    over_query_groups<DotRows>(Q, D, 1, q + k0, c, D, shifted.data(), R, K, ldc, k0 > 0);
  }
}

// --- per-pair and per-row helpers ---------------------------------------------------

// sum_d w_d (q_d - x_d)² in float32 from the inputs (w null: unweighted): the ℓ2
// form that does not cancel near zero (docs/design.md §5.1).
float direct_sq(const float* q, const float* w, DType xdt, const void* x, int64_t D) {
  vf acc = vf{};
  int64_t k = 0;
  for (; k + W <= D; k += W) {
    const vf d = load(q + k) - load_as_float(xdt, x, k);
    acc += w ? load(w + k) * d * d : d * d;
  }
  float t = hsum(acc);
  for (; k < D; ++k) {
    const float d = q[k] - scalar_to_float(xdt, x, k);
    t += w ? w[k] * d * d : d * d;
  }
  return t;
}

// sum_d x_d² in float32.
float sum_sq(DType dt, const void* x, int64_t D) {
  vf acc = vf{};
  int64_t k = 0;
  for (; k + W <= D; k += W) {
    const vf v = load_as_float(dt, x, k);
    acc += v * v;
  }
  float t = hsum(acc);
  for (; k < D; ++k) {
    const float v = scalar_to_float(dt, x, k);
    t += v * v;
  }
  return t;
}

// Rows r0, r0 + 1 of a 16-bit (K x N) matrix, interleaved: the VNNI layout of microkernel.h.
void pack_pairs(const uint16_t* r0, const uint16_t* r1, int64_t N, uint32_t* out) {
  int64_t n = 0;
  for (; n + W <= N; n += W) {
    vh a, b;
    std::memcpy(&a, r0 + n, sizeof a);
    std::memcpy(&b, r1 + n, sizeof b);
    const vu v = __builtin_convertvector(a, vu) | (__builtin_convertvector(b, vu) << 16);
    std::memcpy(out + n, &v, sizeof v);
  }
  for (; n < N; ++n) out[n] = uint32_t(r0[n]) | (uint32_t(r1[n]) << 16);
}

// --- per-thread scratch, grown on demand and reused across tiles ----------------------

template <typename T>
T* grow(std::vector<T>& v, int64_t n) {
  if (v.size() < size_t(n)) v.resize(size_t(n));
  return v.data();
}

struct Scratch {
  std::vector<float> q, qw, w, qn, qop, wop, xf, vf_, xsq, xn, c1, c2, pf, o, m, l, top;
  std::vector<uint16_t> q16, x16, v16, p16, vpack;
  std::vector<int64_t> top_index;
  std::vector<uint8_t> nan;
  std::vector<const float*> xrows, vrows, shifted;
};

// Copy R rows (row stride `stride` elements of `es` bytes) into a dense tile of
// `rows` rows, zero below R: a tail tile is padded, never computed by another path.
void pad_rows(const char* src, int64_t stride, size_t es, int64_t R, int64_t rows, int64_t cols, void* dst) {
  char* d = static_cast<char*>(dst);
  for (int64_t j = 0; j < R; ++j) std::memcpy(d + es * size_t(j * cols), src + es * size_t(j * stride), es * size_t(cols));
  std::memset(d + es * size_t(R * cols), 0, es * size_t((rows - R) * cols));
}

// R rows of dtype dt as float rows of a dense tile of `rows` rows, zero below R.
void float_rows(DType dt, const char* src, int64_t stride, size_t es, int64_t R, int64_t rows, int64_t cols,
                float* dst) {
  for (int64_t j = 0; j < R; ++j) row_to_float(dt, src + es * size_t(j * stride), dst + j * cols, cols);
  std::memset(dst + R * cols, 0, sizeof(float) * size_t((rows - R) * cols));
}

}  // namespace

void run_tile(const PartialParams& p, const Plan& plan, int64_t tile, const Workspace& ws) {
  thread_local Scratch sc;
  const int64_t qblocks = plan.query_blocks;
  const int64_t split = tile % plan.splits;
  const int64_t qb = (tile / plan.splits) % qblocks;
  const int64_t l = tile / (plan.splits * qblocks);
  const int64_t b0 = qb * plan.query_block;
  const int64_t BM = std::min(plan.query_block, p.B - b0);
  const int64_t BMp = (BM + W - 1) / W * W;
  const int64_t n_begin = std::min(p.N, split * plan.rows_per_split);
  const int64_t n_end = std::min(p.N, n_begin + plan.rows_per_split);
  const int64_t D = p.D, Dv = p.Dv, BN = plan.row_block;
  const DType dt = p.dtype;
  const size_t es = dt == DType::F32 ? 4 : 2;
  const float beta = p.beta[l];
  const Similarity sim = p.similarity;
  const bool l2 = sim != Similarity::Dot;
  const bool vnni = plan.vnni, brgemm = plan.gemm == Gemm::Brgemm;
  const float* wts = p.weights ? p.weights + (l * p.B + b0) * D : nullptr;
  const char* mem = static_cast<const char*>(p.memory) + es * size_t(l * p.memory_lead_stride);
  const char* val = static_cast<const char*>(p.values) + es * size_t(l * p.values_lead_stride);
  const char* qsrc = static_cast<const char*>(p.query) + es * size_t(l * p.query_lead_stride + b0 * p.query_row_stride);
  const bool values_are_memory = p.values == p.memory && p.values_lead_stride == p.memory_lead_stride &&
                                 p.values_row_stride == p.memory_row_stride && Dv == D;

  // The query block, once per tile: q in float, the product operand (w∘q for a
  // weighted dot or ℓ2 cross term), |q|²_w, and the B operands of the score products.
  float* q = grow(sc.q, BMp * D);
  for (int64_t i = 0; i < BM; ++i) row_to_float(dt, qsrc + es * size_t(i * p.query_row_stride), q + i * D, D);
  std::memset(q + BM * D, 0, sizeof(float) * size_t((BMp - BM) * D));
  const float* qw = q;
  if (wts) {
    float* t = grow(sc.qw, BMp * D);
    for (int64_t i = 0; i < BM * D; ++i) t[i] = wts[i] * q[i];
    std::memset(t + BM * D, 0, sizeof(float) * size_t((BMp - BM) * D));
    qw = t;
  }
  const bool weighted_l2 = l2 && wts;
  float* qn = grow(sc.qn, BMp);
  std::fill(qn, qn + BMp, 0.f);
  if (l2)
    for (int64_t i = 0; i < BM; ++i) {
      if (!wts) {
        qn[i] = sum_sq(DType::F32, q + i * D, D);
      } else {  // sum_d w_d q_d²
        float t = 0.f;
        const float* qi = q + i * D;
        const float* wi = wts + i * D;
        vf acc = vf{};
        int64_t k = 0;
        for (; k + W <= D; k += W) acc += load(wi + k) * load(qi + k) * load(qi + k);
        t = hsum(acc);
        for (; k < D; ++k) t += wi[k] * qi[k] * qi[k];
        qn[i] = t;
      }
    }
  float* qop = nullptr;
  float* wop = nullptr;
  uint16_t* q16 = nullptr;
  if (vnni) {  // (D/2, BMp, 2): the VNNI image of Q^T, straight from the 16-bit query rows
    q16 = grow(sc.q16, D * BMp);
    std::memset(q16, 0, 2 * size_t(D * BMp));
    for (int64_t i = 0; i < BM; ++i) {
      const uint16_t* r = reinterpret_cast<const uint16_t*>(qsrc + es * size_t(i * p.query_row_stride));
      for (int64_t k = 0; k < D; ++k) q16[(k / 2) * BMp * 2 + i * 2 + (k & 1)] = r[k];
    }
  } else if (brgemm) {  // (D, BMp): Q^T in float
    qop = grow(sc.qop, D * BMp);
    for (int64_t k = 0; k < D; ++k)
      for (int64_t i = 0; i < BMp; ++i) qop[k * BMp + i] = qw[i * D + k];
    if (weighted_l2) {
      wop = grow(sc.wop, D * BMp);
      for (int64_t k = 0; k < D; ++k)
        for (int64_t i = 0; i < BMp; ++i) wop[k * BMp + i] = i < BM ? wts[i * D + k] : 0.f;
    }
  }

  float* o = grow(sc.o, BMp * Dv);
  std::fill(o, o + BM * Dv, 0.f);
  float* m = grow(sc.m, BMp);
  float* lsum = grow(sc.l, BMp);
  float* top = grow(sc.top, BMp);
  int64_t* top_index = grow(sc.top_index, BMp);
  uint8_t* nan = grow(sc.nan, BMp);
  std::fill(m, m + BMp, kNegInf);
  std::fill(lsum, lsum + BMp, 0.f);
  std::fill(top, top + BMp, kNegInf);
  std::fill(top_index, top_index + BMp, int64_t(-1));
  std::fill(nan, nan + BMp, uint8_t(0));

  float* c1 = grow(sc.c1, BN * BMp);
  float* c2 = weighted_l2 ? grow(sc.c2, BN * BMp) : nullptr;
  float* xn = l2 && !wts ? grow(sc.xn, BN) : nullptr;
  float* pf = vnni ? nullptr : grow(sc.pf, BMp * BN);
  uint16_t* p16 = vnni ? grow(sc.p16, BMp * BN) : nullptr;
  const float** xrows = grow(sc.xrows, BN);
  const float** vrows = grow(sc.vrows, BN);
  const float two_beta_half = -0.5f * beta;

  for (int64_t r0 = n_begin; r0 < n_end; r0 += BN) {
    const int64_t R = std::min(BN, n_end - r0);
    const char* xsrc = mem + es * size_t(r0 * p.memory_row_stride);
    const char* vsrc = val + es * size_t(r0 * p.values_row_stride);

    // The bank tile as the products take it: as stored where possible, else
    // padded to BN rows (the tail) or converted to float (16-bit inputs on
    // float32 products).  xa/lda: the score product's A operand; xdt: its dtype.
    const void* xa;
    int64_t lda;
    DType xdt;
    if (vnni) {
      xdt = dt;
      if (R == BN) {
        xa = xsrc, lda = p.memory_row_stride;
      } else {
        pad_rows(xsrc, p.memory_row_stride, es, R, BN, D, grow(sc.x16, BN * D));
        xa = sc.x16.data(), lda = D;
      }
    } else {
      xdt = DType::F32;
      if (dt == DType::F32 && R == BN) {
        xa = xsrc, lda = p.memory_row_stride;
      } else {
        float_rows(dt, xsrc, p.memory_row_stride, es, R, BN, D, grow(sc.xf, BN * D));
        xa = sc.xf.data(), lda = D;
      }
    }
    const size_t xes = xdt == DType::F32 ? 4 : 2;
    auto xrow = [&](int64_t j) { return static_cast<const char*>(xa) + xes * size_t(j * lda); };

    // 1. Score products.
    if (vnni) {
      mk::gemm_vnni(dt, BN, BMp, D, lda, BMp, BMp, false, static_cast<const uint16_t*>(xa), q16, c1);
    } else if (brgemm) {
      mk::gemm_f32(BN, BMp, D, lda, BMp, BMp, false, static_cast<const float*>(xa), qop, c1);
    } else {
      for (int64_t j = 0; j < BN; ++j) xrows[j] = reinterpret_cast<const float*>(xrow(j));
      portable_scores(xrows, BN, qw, BM, D, c1, BMp, sc.shifted);
      for (int64_t j = 0; j < BN; ++j) std::fill(c1 + j * BMp + BM, c1 + (j + 1) * BMp, 0.f);
    }
    if (xn)
      for (int64_t j = 0; j < R; ++j) xn[j] = sum_sq(xdt, xrow(j), D);
    if (weighted_l2) {  // |x|²_w = (x∘x) . w, from the same tile
      float* xsq = grow(sc.xsq, BN * D);
      for (int64_t j = 0; j < BN; ++j) {
        const float* xr = reinterpret_cast<const float*>(xrow(j));
        for (int64_t k = 0; k < D; ++k) xsq[j * D + k] = xr[k] * xr[k];
      }
      if (brgemm) {
        mk::gemm_f32(BN, BMp, D, D, BMp, BMp, false, xsq, wop, c2);
      } else {
        for (int64_t j = 0; j < BN; ++j) xrows[j] = xsq + j * D;
        portable_scores(xrows, BN, wts, BM, D, c2, BMp, sc.shifted);
        for (int64_t j = 0; j < BN; ++j) std::fill(c2 + j * BMp + BM, c2 + (j + 1) * BMp, 0.f);
      }
    }

    // 2. Softmax over each column, W queries per vector.
    for (int64_t g = 0; g < BMp; g += W) {
      const int live = int(std::min<int64_t>(W, BM - g));  // real queries in this group
      const vf vq = load(qn + g);
      vf best = splat(kNegInf);
      vi best_j = vi{};
      vi nanm = vi{};
      for (int64_t j = 0; j < R; ++j) {
        float* cj = c1 + j * BMp + g;
        const vf c = load(cj);
        vf s;
        if (!l2) {
          s = c * splat(beta);
        } else {
          const vf sum = vq + (wts ? load(c2 + j * BMp + g) : splat(xn[j]));
          vf d2 = sum - 2.f * c;
          const vi flag = d2 < splat(kL2DirectBelow) * sum;
          if (any(flag))
            for (int i = 0; i < live; ++i)
              if (flag[i]) d2[i] = direct_sq(q + (g + i) * D, wts ? wts + (g + i) * D : nullptr, xdt, xrow(j), D);
          d2 = d2 < vf{} ? vf{} : d2;  // rounding may leave a tiny negative; NaN stays NaN
          s = sim == Similarity::L2 ? -beta * vsqrt(d2) : splat(two_beta_half) * d2;
        }
        store(cj, s);
        const vi up = s > best;
        best = up ? s : best;
        best_j = up ? vi{} + int32_t(j) : best_j;
        nanm |= s != s;
      }
      for (int64_t j = R; j < BN; ++j) store(c1 + j * BMp + g, splat(kNegInf));

      const vf m_old = load(m + g);
      const vf m_new = vmax(m_old, best);
      const vf msub = m_new == splat(kNegInf) ? vf{} : m_new;  // nothing finite yet: weights 0
      vf sum = vf{};
      vf e[W];
      for (int64_t j0 = 0; j0 < BN; j0 += W) {
        for (int jj = 0; jj < W; ++jj) {
          e[jj] = exp_nonpositive(load(c1 + (j0 + jj) * BMp + g) - msub);
          sum += e[jj];
        }
        transpose(e);  // e[i]: query g + i's weights for rows j0 .. j0 + W - 1
        for (int i = 0; i < live; ++i) {
          if (vnni)
            store_16(dt, p16 + (g + i) * BN + j0, e[i]);
          else
            store(pf + (g + i) * BN + j0, e[i]);
        }
      }
      const vf scale = exp_nonpositive(m_old - msub);
      store(lsum + g, load(lsum + g) * scale + sum);
      store(m + g, m_new);
      for (int i = 0; i < live; ++i) {
        if (scale[i] != 1.f) {
          float* oi = o + (g + i) * Dv;
          for (int64_t d = 0; d < Dv; ++d) oi[d] *= scale[i];
        }
        if (best[i] > top[g + i]) {  // strictly: an earlier row keeps a tie
          top[g + i] = best[i];
          top_index[g + i] = p.offset + r0 + best_j[i];
        }
        nan[g + i] |= nanm[i] != 0;
      }
    }

    // 3. Value products.
    constexpr int64_t kValueChunk = 512;  // output columns per product: the C block stays in L2
    if (vnni) {
      const char* vs = values_are_memory ? static_cast<const char*>(xa) : vsrc;
      int64_t ldv = values_are_memory ? lda : p.values_row_stride;
      if (!values_are_memory && R < BN) {
        pad_rows(vsrc, p.values_row_stride, es, R, BN, Dv, grow(sc.v16, BN * Dv));
        vs = reinterpret_cast<const char*>(sc.v16.data()), ldv = Dv;
      }
      uint32_t* vp = reinterpret_cast<uint32_t*>(grow(sc.vpack, BN * Dv));
      for (int64_t j = 0; j < BN; j += 2)
        pack_pairs(reinterpret_cast<const uint16_t*>(vs + es * size_t(j * ldv)),
                   reinterpret_cast<const uint16_t*>(vs + es * size_t((j + 1) * ldv)), Dv, vp + (j / 2) * Dv);
      for (int64_t c0 = 0; c0 < Dv; c0 += kValueChunk)
        mk::gemm_vnni(dt, BM, std::min(kValueChunk, Dv - c0), BN, BN, Dv, Dv, true, p16, sc.vpack.data() + 2 * c0,
                      o + c0);
    } else {
      const float* vs;
      int64_t ldv;
      if (values_are_memory) {
        vs = static_cast<const float*>(xa), ldv = lda;
      } else if (dt == DType::F32 && R == BN) {
        vs = reinterpret_cast<const float*>(vsrc), ldv = p.values_row_stride;
      } else {
        float_rows(dt, vsrc, p.values_row_stride, es, R, BN, Dv, grow(sc.vf_, BN * Dv));
        vs = sc.vf_.data(), ldv = Dv;
      }
      if (brgemm) {
        for (int64_t c0 = 0; c0 < Dv; c0 += kValueChunk)
          mk::gemm_f32(BM, std::min(kValueChunk, Dv - c0), BN, BN, ldv, Dv, true, pf, vs + c0, o + c0);
      } else {
        for (int64_t j = 0; j < BN; ++j) vrows[j] = vs + j * ldv;
        over_query_groups<AccumulateValues>(BM, BN, Dv, pf, o, BN, vrows, BN, Dv, Dv);
      }
    }
  }
  if (vnni) mk::release_vnni();

  // Leave the result: final when the bank is not split, else unnormalised for combine().
  for (int64_t i = 0; i < BM; ++i) {
    const int64_t row = l * p.B + b0 + i;
    const float* a = o + i * Dv;
    const float s = nan[i] ? NAN : lsum[i];
    if (plan.splits == 1) {
      const float inv = s > 0.f ? 1.f / s : (std::isnan(s) ? NAN : 0.f);
      float* out = p.out + row * Dv;
      for (int64_t d = 0; d < Dv; ++d) out[d] = a[d] * inv;
      p.lse[row] = s > 0.f ? m[i] + std::log(s) : (std::isnan(s) ? NAN : kNegInf);
      p.top_score[row] = top[i];
      p.top_index[row] = top_index[i];
    } else {
      const int64_t slot = (l * plan.splits + split) * p.B + b0 + i;
      std::memcpy(ws.acc + slot * Dv, a, size_t(Dv) * 4);
      ws.max[slot] = m[i];
      ws.sum[slot] = s;
      ws.top_score[slot] = top[i];
      ws.top_index[slot] = top_index[i];
    }
  }
}

}  // namespace HEN_ISA_NS
}  // namespace hen

#if HEN_ISA_LEVEL >= 2 && defined(__clang__)
#pragma clang attribute pop
#elif HEN_ISA_LEVEL >= 2
#pragma GCC pop_options
#endif
