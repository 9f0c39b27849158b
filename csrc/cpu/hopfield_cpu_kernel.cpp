// The tile kernel of hopfield_cpu.h.  CMake compiles this file once per
// instruction set (HEN_ISA_NS = avx2 with -mavx2 -mfma -mf16c, and baseline);
// hopfield_cpu.cpp picks one at run time.  GCC vector extensions keep the
// register blocking explicit while staying portable across instruction sets.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/hopfield_cpu.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#ifndef HEN_ISA_NS
#error "HEN_ISA_NS must name the instruction-set namespace"
#endif

namespace hen {
namespace HEN_ISA_NS {
namespace {

#if defined(__AVX2__)
constexpr int W = 8;
#else
constexpr int W = 4;
#endif
typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
// A broadcast: GCC builds `vf{} + x` with an add and a lane loop with inserts.
inline vf splat(float x) {
#if defined(__AVX2__)
  return _mm256_set1_ps(x);
#elif defined(__SSE2__)
  return _mm_set1_ps(x);
#else
  vf v;
  for (int i = 0; i < W; ++i) v[i] = x;
  return v;
#endif
}
inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}
#if defined(__AVX2__)
// r[m] = sum of the lanes of a[m], for eight vectors at once.
inline vf reduce8(const vf* a) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_permute2f128_ps(u0, u1, 0x20) + _mm256_permute2f128_ps(u0, u1, 0x31);
}
#endif
inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// exp for arguments <= 0 (scores minus their running max): Cody-Waite range
// reduction and a degree-6 polynomial, within 2 ulp; -inf and anything below
// the float range give 0, NaN stays NaN.
inline vf exp_nonpositive(vf x) {
  const vf lo = splat(-87.3f);
  vi underflow = x < lo;
  x = underflow ? lo : x;
  const vf magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  vf n = (x * splat(1.44269504088896341f) + magic) - magic;
  vf r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  vf p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.f);
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof scale);
  vf y = p * scale;
  return underflow ? vf{} : y;
}

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal half: renormalise
    int e = -1;
    do { man <<= 1; ++e; } while (!(man & 0x400));
    bits = sign | uint32_t(112 - e) << 23 | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

void to_float(DType dt, const void* src, float* dst, int64_t n) {
  if (dt == DType::F32) {
    std::memcpy(dst, src, size_t(n) * 4);
  } else if (dt == DType::BF16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) {
      uint32_t bits = uint32_t(s[i]) << 16;
      std::memcpy(dst + i, &bits, 4);
    }
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
#endif
    for (; i < n; ++i) dst[i] = half_to_float(s[i]);
  }
}

inline size_t elem_size(DType dt) { return dt == DType::F32 ? 4 : 2; }

// S[i][j] (+)= <Q_i, X_j> over k in [0, K): QI queries by RJ rows in registers.
template <int QI, int RJ>
inline void dot_block(const float* q, int64_t q_stride, const float* const* x, int64_t K, float* s,
                      int64_t s_stride, bool accumulate) {
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
#if defined(__AVX2__)
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
      float* dst = s + a * s_stride + b;
      *dst = accumulate ? *dst + t : t;
    }
}

template <int QI>
void dot_rows(const float* q, int64_t q_stride, const float* const* rows, int64_t R, int64_t K, float* s,
              int64_t s_stride, bool accumulate) {
  constexpr int RJ = QI == 3 ? 2 : 8 / QI;  // eight accumulators where the shape allows
  int64_t j = 0;
  for (; j + RJ <= R; j += RJ) dot_block<QI, RJ>(q, q_stride, rows + j, K, s + j, s_stride, accumulate);
  for (; j < R; ++j) dot_block<QI, 1>(q, q_stride, rows + j, K, s + j, s_stride, accumulate);
}

// acc[i][:] += sum_j P[i][j] * V_j[:] for QI queries, 3 vectors of Dv at a time.
template <int QI>
void accumulate_values(const float* p, int64_t p_stride, const float* const* v, int64_t R, int64_t Dv,
                       float* acc, int64_t acc_stride) {
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
        vf w = splat(p[i * p_stride + j]);
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
      vf vv = load(v[j] + d);
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

template <int QI>
struct DotRows {
  static void run(const float* q, float* s, int64_t q_stride, const float* const* rows, int64_t R, int64_t K,
                  int64_t s_stride, bool accumulate) {
    dot_rows<QI>(q, q_stride, rows, R, K, s, s_stride, accumulate);
  }
};

template <int QI>
struct AccumulateValues {
  static void run(const float* p, float* acc, int64_t p_stride, const float* const* v, int64_t R, int64_t Dv,
                  int64_t acc_stride) {
    accumulate_values<QI>(p, p_stride, v, R, Dv, acc, acc_stride);
  }
};

// Per-thread scratch, grown on demand and reused across tiles.
struct Scratch {
  std::vector<float> q, qnorm, x, v, xnorm, s, acc, max, sum, top_score;
  std::vector<int64_t> top_index;
  std::vector<const float*> xrows, vrows;
};

constexpr int64_t kDepthChunk = 128;  // feature columns per pass of the score product (L1-sized)

}  // namespace

void run_tile(const PartialParams& p, const Plan& plan, int64_t tile, const Workspace& ws) {
  thread_local Scratch sc;
  const int64_t qblocks = plan.query_blocks;
  const int64_t split = tile % plan.splits;
  const int64_t qb = (tile / plan.splits) % qblocks;
  const int64_t l = tile / (plan.splits * qblocks);
  const int64_t b0 = qb * plan.query_block;
  const int64_t QB = std::min(plan.query_block, p.B - b0);
  const int64_t n_begin = std::min(p.N, split * plan.rows_per_split);
  const int64_t n_end = std::min(p.N, n_begin + plan.rows_per_split);
  const int64_t D = p.D, Dv = p.Dv, RB = plan.row_block;
  const int64_t RBp = (RB + W - 1) / W * W;
  const size_t es = elem_size(p.dtype);
  const float beta = p.beta[l];
  const char* mem = static_cast<const char*>(p.memory) + es * size_t(l * p.memory_lead_stride);
  const char* val = static_cast<const char*>(p.values) + es * size_t(l * p.values_lead_stride);
  const bool values_are_memory = p.values == p.memory && p.values_lead_stride == p.memory_lead_stride &&
                                 p.values_row_stride == p.memory_row_stride && Dv == D;
  const bool need_norms = p.similarity != Similarity::Dot;

  sc.q.resize(size_t(QB * D));
  sc.qnorm.resize(size_t(QB));
  sc.s.resize(size_t(QB * RBp));
  sc.acc.assign(size_t(QB * Dv), 0.f);
  sc.max.assign(size_t(QB), kNegInf);
  sc.sum.assign(size_t(QB), 0.f);
  sc.top_score.assign(size_t(QB), kNegInf);
  sc.top_index.assign(size_t(QB), -1);
  sc.xnorm.resize(size_t(RB));
  sc.xrows.resize(size_t(RB));
  sc.vrows.resize(size_t(RB));
  if (p.dtype != DType::F32) {
    sc.x.resize(size_t(RB * D));
    if (!values_are_memory) sc.v.resize(size_t(RB * Dv));
  }

  const char* qsrc = static_cast<const char*>(p.query) + es * size_t(l * p.query_lead_stride);
  for (int64_t i = 0; i < QB; ++i) {
    float* qi = sc.q.data() + i * D;
    to_float(p.dtype, qsrc + es * size_t((b0 + i) * p.query_row_stride), qi, D);
    float n2 = 0.f;
    for (int64_t k = 0; k < D; ++k) n2 += qi[k] * qi[k];
    sc.qnorm[size_t(i)] = n2;
    // For dot, scale the query once so the score product yields beta * sim directly.
    if (p.similarity == Similarity::Dot)
      for (int64_t k = 0; k < D; ++k) qi[k] *= beta;
  }

  for (int64_t r0 = n_begin; r0 < n_end; r0 += RB) {
    const int64_t R = std::min(RB, n_end - r0);
    // Bank rows of this block as float pointers (converted once when stored as 16-bit).
    for (int64_t j = 0; j < R; ++j) {
      const char* xr = mem + es * size_t((r0 + j) * p.memory_row_stride);
      if (p.dtype == DType::F32) {
        sc.xrows[size_t(j)] = reinterpret_cast<const float*>(xr);
      } else {
        to_float(p.dtype, xr, sc.x.data() + j * D, D);
        sc.xrows[size_t(j)] = sc.x.data() + j * D;
      }
      if (values_are_memory) {
        sc.vrows[size_t(j)] = sc.xrows[size_t(j)];
      } else {
        const char* vr = val + es * size_t((r0 + j) * p.values_row_stride);
        if (p.dtype == DType::F32) {
          sc.vrows[size_t(j)] = reinterpret_cast<const float*>(vr);
        } else {
          to_float(p.dtype, vr, sc.v.data() + j * Dv, Dv);
          sc.vrows[size_t(j)] = sc.v.data() + j * Dv;
        }
      }
    }
    if (need_norms) {
      for (int64_t j = 0; j < R; ++j) {
        const float* xr = sc.xrows[size_t(j)];
        vf a = vf{};
        int64_t k = 0;
        for (; k + W <= D; k += W) {
          vf xv = load(xr + k);
          a += xv * xv;
        }
        float t = hsum(a);
        for (; k < D; ++k) t += xr[k] * xr[k];
        sc.xnorm[size_t(j)] = t;
      }
    }

    // Scores: the dot products, one L1-sized slice of the feature dim at a time.
    float* S = sc.s.data();
    for (int64_t k0 = 0; k0 < D; k0 += kDepthChunk) {
      const int64_t K = std::min(kDepthChunk, D - k0);
      const float* shifted[256];
      const float* const* rows = sc.xrows.data();
      if (k0 > 0) {
        for (int64_t j = 0; j < R; ++j) shifted[j] = sc.xrows[size_t(j)] + k0;
        rows = shifted;
      }
      over_query_groups<DotRows>(QB, D, RBp, sc.q.data() + k0, S, D, rows, R, K, RBp, k0 > 0);
    }

    // Online softmax per query: scores -> weights in place, running max / sum / top.
    for (int64_t i = 0; i < QB; ++i) {
      float* t = S + i * RBp;
      const float qn = sc.qnorm[size_t(i)];
      const float* xn = sc.xnorm.data();
      if (p.similarity == Similarity::L2Sq) {
        for (int64_t j = 0; j < R; ++j) t[j] = -0.5f * beta * std::max(qn + xn[j] - 2.f * t[j], 0.f);
      } else if (p.similarity == Similarity::L2) {
        for (int64_t j = 0; j < R; ++j) t[j] = -beta * std::sqrt(std::max(qn + xn[j] - 2.f * t[j], 0.f));
      }
      for (int64_t j = R; j < RBp; ++j) t[j] = kNegInf;
      vf mv = splat(kNegInf);
      vi nan = vi{};
      for (int64_t j = 0; j < RBp; j += W) {
        vf tv = load(t + j);
        mv = tv > mv ? tv : mv;
        nan |= tv != tv;
      }
      bool any_nan = false;
      for (int k = 0; k < W; ++k) any_nan |= nan[k] != 0;
      if (any_nan) {  // a NaN query poisons its own answer and nothing else
        for (int64_t j = 0; j < RBp; ++j) t[j] = NAN;
        sc.sum[size_t(i)] = NAN;
        continue;
      }
      const float block_max = hmax(mv);
      if (block_max > sc.top_score[size_t(i)]) {
        for (int64_t j = 0; j < R; ++j)
          if (t[j] == block_max) {
            sc.top_score[size_t(i)] = block_max;
            sc.top_index[size_t(i)] = p.offset + r0 + j;
            break;
          }
      }
      const float m_old = sc.max[size_t(i)];
      const float m_new = std::max(m_old, block_max);
      if (m_new == kNegInf) {  // nothing seen yet is finite: weights are zero
        for (int64_t j = 0; j < RBp; ++j) t[j] = 0.f;
        continue;
      }
      const vf mnew = splat(m_new);
      vf sv = vf{};
      for (int64_t j = 0; j < RBp; j += W) {
        vf e = exp_nonpositive(load(t + j) - mnew);
        store(t + j, e);
        sv += e;
      }
      const float scale = m_old == kNegInf ? 0.f : std::exp(m_old - m_new);
      sc.sum[size_t(i)] = sc.sum[size_t(i)] * scale + hsum(sv);
      sc.max[size_t(i)] = m_new;
      if (scale != 1.f) {
        float* a = sc.acc.data() + i * Dv;
        for (int64_t d = 0; d < Dv; ++d) a[d] *= scale;
      }
    }

    over_query_groups<AccumulateValues>(QB, RBp, Dv, S, sc.acc.data(), RBp, sc.vrows.data(), R, Dv, Dv);
  }

  // Leave the result: final when the bank is not split, else unnormalised for combine().
  for (int64_t i = 0; i < QB; ++i) {
    const int64_t row = l * p.B + b0 + i;
    const float* a = sc.acc.data() + i * Dv;
    if (plan.splits == 1) {
      const float s = sc.sum[size_t(i)];
      const float inv = s > 0.f ? 1.f / s : (std::isnan(s) ? NAN : 0.f);
      float* o = p.out + row * Dv;
      for (int64_t d = 0; d < Dv; ++d) o[d] = a[d] * inv;
      p.lse[row] = s > 0.f ? sc.max[size_t(i)] + std::log(s) : (std::isnan(s) ? NAN : kNegInf);
      p.top_score[row] = sc.top_score[size_t(i)];
      p.top_index[row] = sc.top_index[size_t(i)];
    } else {
      const int64_t slot = (l * plan.splits + split) * p.B + b0 + i;
      std::memcpy(ws.acc + slot * Dv, a, size_t(Dv) * 4);
      ws.max[slot] = sc.max[size_t(i)];
      ws.sum[slot] = sc.sum[size_t(i)];
      ws.top_score[slot] = sc.top_score[size_t(i)];
      ws.top_index[slot] = sc.top_index[size_t(i)];
    }
  }
}

}  // namespace HEN_ISA_NS
}  // namespace hen
