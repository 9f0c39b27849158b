// The backward tile kernel of hopfield_cpu.h, compiled once per instruction set
// like tile_kernel.cpp (cpu/isa_begin.h, the same shared headers).
//
// One tile: one leading index of the bank (all leading indices when it is shared)
// and one split of its rows.  For each query block, each row tile of the split:
//   1. scores  S^T = X_tile . Q^T (bank rows x queries), the ℓ2 forms with the
//              §5.1 recompute, P = exp(beta s - lse)
//   2. dP^T = V_tile . dout^T, dt = P ∘ (dP - Δ), G from beta dt and s
//   3. dV_tile += P^T-layout . dout,  dX_tile += G . (w∘q)  (ℓ2: - x ∘ (G . w)),
//      dq += G^T . X_tile  (ℓ2: - rowsum(G) q, and w ∘ at the end)
// Every product is a float32 brgemm; the column layout (rows x queries) makes the
// dV and dX products read P and G as stored, and only dq needs G transposed.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/hopfield_cpu.h"
#include "cpu/microkernel.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "cpu/isa_begin.h"

namespace hen {
namespace HEN_ISA_NS {

#include "cpu/simd.h"
#include "cpu/hand_products.h"
#include "cpu/rows.h"

namespace {

struct BackScratch {
  std::vector<float> q, qw, wr, qn, qop, wop, dout_t, dout_r, lse, delta, xf, vf_, xn, xsq, c1, c2, pp, g, gt, t,
      dq, rowsum, dbeta;
};

// rows x cols block of a (rows x ld) float matrix, transposed into (cols x rows), W x W at a time.
void transpose_block(const float* src, int64_t ld, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  vf e[W];
  for (int64_t c0 = 0; c0 < cols; c0 += W)
    for (int64_t r0 = 0; r0 < rows; r0 += W) {
      for (int i = 0; i < W; ++i) e[i] = load(src + (r0 + i) * ld + c0);
      transpose(e);
      for (int i = 0; i < W; ++i) store(dst + (c0 + i) * ldd + r0, e[i]);
    }
}

}  // namespace

void run_backward_tile(const BackwardParams& bp, const BackwardPlan& plan, int64_t tile) {
  thread_local BackScratch sc;
  const PartialParams& p = bp.p;
  const int64_t split = tile % plan.splits, lm = tile / plan.splits;
  const int64_t n_begin = std::min(p.N, split * plan.rows_per_split);
  const int64_t n_end = std::min(p.N, n_begin + plan.rows_per_split);
  const int64_t D = p.D, Dv = p.Dv, BN = plan.row_block, L = p.L;
  const DType dt = p.dtype;
  const size_t es = dt == DType::F32 ? 4 : 2;
  const Similarity sim = p.similarity;
  const bool l2 = sim != Similarity::Dot;
  const bool values_are_memory = p.values == p.memory && p.values_lead_stride == p.memory_lead_stride &&
                                 p.values_row_stride == p.memory_row_stride && Dv == D;
  const char* mem = static_cast<const char*>(p.memory) + es * size_t(lm * p.memory_lead_stride);
  const char* val = static_cast<const char*>(p.values) + es * size_t(lm * p.values_lead_stride);
  float* dx = bp.dx + lm * p.N * D;
  float* dv = bp.dv + lm * p.N * Dv;
  const int64_t l_begin = bp.Lm == 1 ? 0 : lm, l_end = bp.Lm == 1 ? L : lm + 1;

  for (int64_t l = l_begin; l < l_end; ++l) {
    const float beta = p.beta[l];
    float dbeta_l = 0.f;
    for (int64_t b0 = 0; b0 < p.B; b0 += plan.query_block) {
      const int64_t BM = std::min(plan.query_block, p.B - b0), BMp = (BM + W - 1) / W * W;
      const float* wts = p.weights ? p.weights + (l * p.B + b0) * D : nullptr;
      const char* qsrc =
          static_cast<const char*>(p.query) + es * size_t(l * p.query_lead_stride + b0 * p.query_row_stride);
      // The query block's operands, zero-padded to BMp queries: q, qw = w∘q (the B
      // operand of the score and dX products), w, the transposed score operands,
      // dout both ways, |q|²_w, lse (+inf on padding: weight 0) and Δ.
      float* q = grow(sc.q, BMp * D);
      float* qw = grow(sc.qw, BMp * D);
      std::fill(q, q + BMp * D, 0.f);
      for (int64_t i = 0; i < BM; ++i) row_to_float(dt, qsrc + es * size_t(i * p.query_row_stride), q + i * D, D);
      for (int64_t i = 0; i < BMp * D; ++i) qw[i] = wts && i < BM * D ? wts[i] * q[i] : q[i];
      float* wr = nullptr;
      if (l2 && wts) {
        wr = grow(sc.wr, BMp * D);
        std::fill(wr, wr + BMp * D, 0.f);
        std::memcpy(wr, wts, sizeof(float) * size_t(BM * D));
      }
      float* qop = grow(sc.qop, D * BMp);
      for (int64_t k = 0; k < D; ++k)
        for (int64_t i = 0; i < BMp; ++i) qop[k * BMp + i] = qw[i * D + k];
      float* wop = nullptr;
      if (wr) {
        wop = grow(sc.wop, D * BMp);
        for (int64_t k = 0; k < D; ++k)
          for (int64_t i = 0; i < BMp; ++i) wop[k * BMp + i] = wr[i * D + k];
      }
      const float* dout_src = bp.dout + (l * p.B + b0) * Dv;
      float* dout_r = grow(sc.dout_r, BMp * Dv);
      std::fill(dout_r, dout_r + BMp * Dv, 0.f);
      std::memcpy(dout_r, dout_src, sizeof(float) * size_t(BM * Dv));
      float* dout_t = grow(sc.dout_t, Dv * BMp);
      for (int64_t d = 0; d < Dv; ++d)
        for (int64_t i = 0; i < BMp; ++i) dout_t[d * BMp + i] = dout_r[i * Dv + d];
      float* qn = grow(sc.qn, BMp);
      float* lse = grow(sc.lse, BMp);
      float* delta = grow(sc.delta, BMp);
      for (int64_t i = 0; i < BMp; ++i) {
        const bool live = i < BM;
        qn[i] = 0.f;
        if (live && l2) {
          float t = 0.f;
          for (int64_t k = 0; k < D; ++k) t += (wts ? wts[i * D + k] : 1.f) * q[i * D + k] * q[i * D + k];
          qn[i] = t;
        }
        lse[i] = live ? bp.lse[l * p.B + b0 + i] : std::numeric_limits<float>::infinity();
        float t = 0.f;
        if (live) {
          const float* o = bp.out + (l * p.B + b0 + i) * Dv;
          for (int64_t d = 0; d < Dv; ++d) t += dout_src[i * Dv + d] * o[d];
          t -= bp.dlse[l * p.B + b0 + i];
        }
        delta[i] = t;
      }
      float* dq = grow(sc.dq, BMp * D);
      std::fill(dq, dq + BMp * D, 0.f);
      float* rowsum = grow(sc.rowsum, BMp);
      std::fill(rowsum, rowsum + BMp, 0.f);
      vf dbeta_v[4] = {vf{}, vf{}, vf{}, vf{}};

      float* c1 = grow(sc.c1, BN * BMp);
      float* pp = grow(sc.pp, BN * BMp);
      float* g = grow(sc.g, BN * BMp);
      float* gt = grow(sc.gt, BMp * BN);
      for (int64_t r0 = n_begin; r0 < n_end; r0 += BN) {
        const int64_t R = std::min(BN, n_end - r0);
        // The bank tile in float, padded to BN rows; the value tile likewise.
        const char* xr = mem + es * size_t(r0 * p.memory_row_stride);
        const float* xf = reinterpret_cast<const float*>(xr);
        int64_t ldf = p.memory_row_stride;
        if (dt != DType::F32 || R < BN) {
          float* t = grow(sc.xf, BN * D);
          for (int64_t j = 0; j < R; ++j) row_to_float(dt, xr + es * size_t(j * p.memory_row_stride), t + j * D, D);
          std::fill(t + R * D, t + BN * D, 0.f);
          xf = t, ldf = D;
        }
        const float* vfl = xf;
        int64_t ldv = ldf;
        if (!values_are_memory) {
          const char* vr = val + es * size_t(r0 * p.values_row_stride);
          vfl = reinterpret_cast<const float*>(vr), ldv = p.values_row_stride;
          if (dt != DType::F32 || R < BN) {
            float* t = grow(sc.vf_, BN * Dv);
            for (int64_t j = 0; j < R; ++j)
              row_to_float(dt, vr + es * size_t(j * p.values_row_stride), t + j * Dv, Dv);
            std::fill(t + R * Dv, t + BN * Dv, 0.f);
            vfl = t, ldv = Dv;
          }
        }

        // 1. Scores and weights, column-wise.
        mk::gemm_f32(BN, BMp, D, ldf, BMp, BMp, false, xf, qop, c1);
        float* xn = nullptr;
        float* c2 = nullptr;
        if (l2 && !wts) {
          xn = grow(sc.xn, BN);
          row_norms<DType::F32>(reinterpret_cast<const char*>(xf), 4 * ldf, BN, D, xn);
        } else if (l2) {
          float* xsq = grow(sc.xsq, BN * D);
          for (int64_t j = 0; j < BN; ++j)
            for (int64_t k = 0; k < D; ++k) xsq[j * D + k] = xf[j * ldf + k] * xf[j * ldf + k];
          c2 = grow(sc.c2, BN * BMp);
          mk::gemm_f32(BN, BMp, D, D, BMp, BMp, false, xsq, wop, c2);
        }
        // 2. dP^T = V . dout^T into g, then dt and G in place.
        mk::gemm_f32(BN, BMp, Dv, ldv, BMp, BMp, false, vfl, dout_t, g);
        for (int64_t gq = 0; gq < BMp; gq += W) {
          const int live = int(std::min<int64_t>(W, BM - gq));
          const vf vq = load(qn + gq), vl = load(lse + gq), vd = load(delta + gq), vb = splat(beta);
          for (int64_t j = 0; j < BN; ++j) {
            const vf c = load(c1 + j * BMp + gq);
            vf s;
            if (j >= R) {
              s = splat(kNegInf);
            } else if (!l2) {
              s = c;
            } else {
              const vf sum = vq + (wts ? load(c2 + j * BMp + gq) : splat(xn[j]));
              auto pairs = [&] {
                return LanePairs{q + gq * D, D, wts ? wts + gq * D : nullptr,
                                 reinterpret_cast<const char*>(xf + j * ldf), 0};
              };
              const vf d2 = l2_distance_sq(sum, c, true, live, pairs, D, DType::F32);
              s = sim == Similarity::L2 ? -vsqrt(d2) : splat(-0.5f) * d2;
            }
            const vf pj = exp_nonpositive(rounded(vb * s) - vl);
            const vf dtj = pj * (load(g + j * BMp + gq) - vd);
            // Padding rows (s = -inf) and underflowed weights contribute nothing (not 0 * inf).
            dbeta_v[j & 3] += pj == vf{} ? vf{} : dtj * s;
            vf gj = vb * dtj;
            if (sim == Similarity::L2) gj = s < vf{} ? -gj / s : vf{};  // 0: the subgradient at a stored pattern
            store(pp + j * BMp + gq, pj);
            store(g + j * BMp + gq, gj);
          }
        }
        // 3. dV and dX rows of this tile (only its R real rows), dq of the query block.
        float* dvr = dv + r0 * Dv;
        float* dxr = dx + r0 * D;
        // The first query block writes these rows, the others add: dX and dV are N x D
        // and N x Dv, so neither a zero fill nor a first read of them is free.
        const bool add = !(l == l_begin && b0 == 0);
        mk::gemm_f32(R, Dv, BMp, BMp, Dv, Dv, add, pp, dout_r, dvr);
        mk::gemm_f32(R, D, BMp, BMp, D, D, add, g, qw, dxr);
        if (l2) {
          // - x ∘ (G . w): the colsum of G when unweighted.
          if (wts) {
            float* t = grow(sc.t, BN * D);
            mk::gemm_f32(R, D, BMp, BMp, D, D, false, g, wr, t);
            for (int64_t j = 0; j < R; ++j)
              for (int64_t k = 0; k < D; ++k) dxr[j * D + k] -= xf[j * ldf + k] * t[j * D + k];
          } else {
            for (int64_t j = 0; j < R; ++j) {
              float cs = 0.f;
              for (int64_t i = 0; i < BM; ++i) cs += g[j * BMp + i];
              for (int64_t k = 0; k < D; ++k) dxr[j * D + k] -= cs * xf[j * ldf + k];
            }
          }
          for (int64_t j = 0; j < BN; ++j)
            for (int64_t i = 0; i < BMp; i += W) store(rowsum + i, load(rowsum + i) + load(g + j * BMp + i));
        }
        transpose_block(g, BMp, BN, BMp, gt, BN);
        mk::gemm_f32(BM, D, BN, BN, ldf, D, true, gt, xf, dq);
      }
      // The query block's dq: - rowsum(G) q for the ℓ2 forms, then w ∘.
      float* dq_out = bp.dq + ((split * L + l) * p.B + b0) * D;
      for (int64_t i = 0; i < BM; ++i)
        for (int64_t k = 0; k < D; ++k) {
          float t = dq[i * D + k] - (l2 ? rowsum[i] * q[i * D + k] : 0.f);
          dq_out[i * D + k] = wts ? wts[i * D + k] * t : t;
        }
      const vf db = (dbeta_v[0] + dbeta_v[1]) + (dbeta_v[2] + dbeta_v[3]);
      float lanes[W];
      store(lanes, db);
      for (int i = 0; i < W; ++i) dbeta_l += lanes[i];
    }
    bp.dbeta[split * L + l] = dbeta_l;
  }
}

}  // namespace HEN_ISA_NS
}  // namespace hen

#include "cpu/isa_end.h"
