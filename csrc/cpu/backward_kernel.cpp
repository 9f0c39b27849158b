// The backward tile kernel of hopfield_cpu.h, compiled once per instruction set
// like tile_kernel.cpp (cpu/isa_begin.h, the same shared headers).
//
// One tile: one leading index of the bank (all leading indices when it is shared)
// and one split of its rows.  For each query block, each row tile of the split:
//   1. scores  S^T = X_tile . Q^T (bank rows x queries), the ℓ2 forms with the
//              §5.1 recompute, P = exp(beta s - lse)
//   2. dP^T = V_tile . dout^T, dt = P ∘ (dP - Δ), G from beta dt and s (a query's top row
//      leaves the products: BackwardParams::top)
//   3. dV_tile += P^T-layout . dout,  dX_tile += G . (w∘q)  (ℓ2: - x ∘ (G . w)),
//      dq += G^T . X_tile  (ℓ2: - rowsum(G) q, and w ∘ at the end)
// The column layout (rows x queries) makes the dV and dX products read P and G as
// stored, and only dq needs G transposed.  Products are float32 brgemms (16-bit
// inputs widened), or with BackwardPlan::vnni (bfloat16) 16-bit ones as the forward's: the
// score product on the stored rows, dX on G rounded to 16 bits (as FlashAttention's
// backward rounds dS), dq on G split in two 16-bit parts (its sum nearly cancels), and
// with BackwardPlan::dout16 dP and dV on dout (then exactly 16-bit) and P rounded as
// the forward's value product rounds it.
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

// A query and a bank row of this tile close enough that their ℓ2 terms are taken as differences
// (run_backward_tile, step 2), with their G.
struct NearPair {
  int64_t row, query;
  float g;
};

struct BackScratch {
  std::vector<float> q, qw, wr, qn, qop, wop, qhand, douthand, dout_t, dout_r, lse, delta, xraw, vraw, xf, vf_, xn, xsq, xt, c1, c2, pp, g,
      glo, gt, t, tail, dq, rowsum, dxt, dvt, dts, dtsum, pssum, psum, gap, dttop, rowf, top_row;
  std::vector<int64_t> top;
  std::vector<uint64_t> top_at;
  std::vector<NearPair> near;
  std::vector<uint16_t> q16, qt16, qv16, dout16, doutt16, doutv16, p16, g16, gt16, gtlo16, xpack;
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

// n floats as 16-bit dt, rounded to nearest even (store_16), the tail through a padded vector.
void floats_to_16(DType dt, const float* src, int64_t n, uint16_t* dst) {
  int64_t k = 0;
  for (; k + W <= n; k += W) store_16(dt, dst + k, load(src + k));
  if (k < n) {
    float tail[W] = {};
    uint16_t out[W];
    std::memcpy(tail, src + k, sizeof(float) * size_t(n - k));
    store_16(dt, out, load(tail));
    std::memcpy(dst + k, out, 2 * size_t(n - k));
  }
}

// R rows of n floats (n apart) as 16-bit dt into the output's rows (ld apart, from dst):
// BackwardPlan::direct.
void store_rows_16(DType dt, const float* src, int64_t R, int64_t n, uint16_t* dst, int64_t ld) {
  for (int64_t j = 0; j < R; ++j) floats_to_16(dt, src + j * n, n, dst + j * ld);
}

// A (rows x cols) row-major 16-bit matrix's two VNNI images (rows.h), rows and cols even:
// of its transpose (the B operand of a product over its columns) and of itself (over its rows).
void vnni_images(const uint16_t* m, int64_t rows, int64_t cols, std::vector<uint16_t>& of_t_buf,
                 std::vector<uint16_t>& of_m_buf, uint16_t*& of_t, uint16_t*& of_m) {
  of_t = grow(of_t_buf, cols * rows);
  vnni_transposed(m, cols, rows, cols, rows, of_t);
  of_m = grow(of_m_buf, rows * cols);
  vnni_rows(m, cols, rows, cols, cols, of_m);
}

// out[j] (+)= Σ_i a[i * lda + j] b[i] (+ Σ_i a2[i * lda + j] b2[i] with kTwo) for rows j < R (ldo
// apart), queries i < Q (a and a2 queries x rows), b's and b2's rows n floats long: the dV and dX
// products of few queries (both at once where keys = values), one pass over each output row.  Q and
// kTwo at compile time keep a row's coefficients in registers (read in the depth loop, they were
// reloaded after every store to the row: 4 queries 5-10 % slower with AVX2).
template <int Q, bool kTwo>
void few_query_rows_of(const float* a, const float* a2, int64_t lda, const float* b, const float* b2, int64_t n,
                       int64_t R, bool add, float* out, int64_t ldo) {
  for (int64_t j = 0; j < R; ++j) {
    vf ca[Q], ca2[Q];
#pragma GCC unroll 4
    for (int i = 0; i < Q; ++i) {
      ca[i] = splat(a[i * lda + j]);
      if constexpr (kTwo) ca2[i] = splat(a2[i * lda + j]);
    }
    float* o = out + j * ldo;
    int64_t k = 0;
    for (; k + W <= n; k += W) {
      vf acc = add ? load(o + k) : vf{};
#pragma GCC unroll 4
      for (int i = 0; i < Q; ++i) {
        acc += ca[i] * load(b + i * n + k);
        if constexpr (kTwo) acc += ca2[i] * load(b2 + i * n + k);
      }
      store(o + k, acc);
    }
    for (; k < n; ++k) {
      float t = add ? o[k] : 0.f;
      for (int i = 0; i < Q; ++i) {
        t += a[i * lda + j] * b[i * n + k];
        if constexpr (kTwo) t += a2[i * lda + j] * b2[i * n + k];
      }
      o[k] = t;
    }
  }
}

// few_query_rows_of for Q <= kBackwardHandQueriesMax queries; a2 and b2 null: one product.
void few_query_rows(const float* a, const float* a2, int64_t lda, int64_t Q, const float* b, const float* b2,
                    int64_t n, int64_t R, bool add, float* out, int64_t ldo) {
  static_assert(kBackwardHandQueriesMax == 4, "few_query_rows instantiates 1 to 4 queries");
  auto run = [&](auto q) {
    constexpr int kQ = decltype(q)::value;
    if (a2)
      few_query_rows_of<kQ, true>(a, a2, lda, b, b2, n, R, add, out, ldo);
    else
      few_query_rows_of<kQ, false>(a, nullptr, lda, b, nullptr, n, R, add, out, ldo);
  };
  switch (Q) {
    case 1: return run(std::integral_constant<int, 1>{});
    case 2: return run(std::integral_constant<int, 2>{});
    case 3: return run(std::integral_constant<int, 3>{});
    default: return run(std::integral_constant<int, 4>{});
  }
}

// One query's top row into its dq row and that bank row's dX (BackwardParams::top): the pair's dt is dlse Σ P
// less the other rows' dt, `others` (Σ_j dt_j = dlse Σ P), its G beta dt (l2: over sqrt(d²); 0 at a stored
// row).  q, x (the top row) and w (null: unweighted) in float; dq takes w ∘ only with `weigh_dq` (a tile's
// dq takes it at the end); dx null: no bank gradient.
void add_top_pair(Similarity sim, int64_t D, const float* q, const float* x, const float* w, float beta,
                  float dlse_p_sum, float others, bool weigh_dq, float* dq, float* dx) {
  float g = beta * (dlse_p_sum - others);
  if (sim == Similarity::L2) {
    float d2 = 0.f;
    for (int64_t k = 0; k < D; ++k) d2 += (w ? w[k] : 1.f) * (q[k] - x[k]) * (q[k] - x[k]);
    g = d2 > 0.f ? g / std::sqrt(d2) : 0.f;
  }
  if (g == 0.f) return;
  const bool dot = sim == Similarity::Dot;
  for (int64_t k = 0; k < D; ++k) dq[k] += g * (weigh_dq && w ? w[k] : 1.f) * (dot ? x[k] : x[k] - q[k]);
  if (dx)
    for (int64_t k = 0; k < D; ++k) dx[k] += g * (w ? w[k] : 1.f) * (dot ? q[k] : q[k] - x[k]);
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
  const bool values_are_memory = p.values_are_memory();
  const char* mem = static_cast<const char*>(p.memory) + es * size_t(p.memory_lead(lm));
  const char* val = static_cast<const char*>(p.values) + es * size_t(p.values_lead(lm));
  // dX and dV rows in float: the outputs themselves (rows ld_dx and ld_dv apart: a split bank's
  // float32 gradients are written in its layout), or with BackwardPlan::direct a tile's worth,
  // stored in the 16-bit dtype and the output's layout once complete.
  const bool direct = plan.direct, summed = bp.bank_grads == BankGrads::Summed;
  const bool bank_grads = bp.bank_grads != BankGrads::None;
  float* dx = direct || !bank_grads ? nullptr : bp.dx + bp.dx_lead(lm);
  float* dv = direct || summed || !bank_grads ? nullptr : bp.dv + bp.dv_lead(lm);
  const int64_t ld_dx = direct ? D : bp.dx_row_stride, ld_dv = summed ? ld_dx : direct ? Dv : bp.dv_row_stride;
  const int64_t l_begin = bp.Lm == 1 ? 0 : lm, l_end = bp.Lm == 1 ? L : lm + 1;
  // 16-bit products: scores, dX and dq (v16); dP and dV as well (d16, which implies v16).
  const bool v16 = plan.vnni, d16 = plan.dout16, hand = plan.hand;
  // The bank tile in float where a float32 product reads it; the value tile likewise.
  const bool float_x = !hand && (!v16 || (!d16 && values_are_memory));
  const bool float_v = !hand && !d16 && !values_are_memory;

  for (int64_t l = l_begin; l < l_end; ++l) {
    const float beta = p.beta[l];
    for (int64_t b0 = 0; b0 < p.B; b0 += plan.query_block) {
      const int64_t BM = std::min(plan.query_block, p.B - b0), BMp = (BM + W - 1) / W * W;
      const int64_t BMv = brgemm_queries(BM, W);  // the dq product's rows
      const float* wts = p.weights ? p.weights + (l * p.B + b0) * D : nullptr;
      const char* qsrc =
          static_cast<const char*>(p.query) + es * size_t(p.query_lead(l) + b0 * p.query_row_stride);
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
      float* qop = nullptr;
      uint16_t* qt16 = nullptr;  // Q^T, the 16-bit score product's B operand
      uint16_t* qv16 = nullptr;  // Q, the 16-bit dX product's B operand
      if (v16) {  // unweighted (make_backward_plan): the query rows as stored
        uint16_t* q16 = grow(sc.q16, BMp * D);
        std::memset(q16, 0, 2 * size_t(BMp * D));
        for (int64_t i = 0; i < BM; ++i) std::memcpy(q16 + i * D, qsrc + es * size_t(i * p.query_row_stride), 2 * size_t(D));
        vnni_images(q16, BMp, D, sc.qt16, sc.qv16, qt16, qv16);
      } else if (!hand) {
        qop = transposed(qw, BMp, D, sc.qop);
      }
      const float* wop = wr ? transposed(wr, BMp, D, sc.wop) : nullptr;
      const float* dout_src = bp.dout + (l * p.B + b0) * Dv;
      float* dout_r = grow(sc.dout_r, BMp * Dv);
      std::fill(dout_r, dout_r + BMp * Dv, 0.f);
      std::memcpy(dout_r, dout_src, sizeof(float) * size_t(BM * Dv));
      float* dout_t = nullptr;
      uint16_t* doutt16 = nullptr;  // dout^T, the 16-bit dP product's B operand
      uint16_t* doutv16 = nullptr;  // dout, the 16-bit dV product's B operand
      if (d16) {  // dout is exactly 16-bit (BackwardParams::dout_16bit): no rounding here
        uint16_t* o16 = grow(sc.dout16, BMp * Dv);
        floats_to_16(dt, dout_r, BMp * Dv, o16);
        vnni_images(o16, BMp, Dv, sc.doutt16, sc.doutv16, doutt16, doutv16);
      } else if (!hand) {
        dout_t = transposed(dout_r, BMp, Dv, sc.dout_t);
      }
      // The hand-written dot products' operands: w∘q and dout rows, for a bfloat16 bank in
      // split_pairs' layout (hand_products.h); the lane products take them as they are.
      const float* qhand = qw;
      const float* douthand = dout_r;
      if (hand && dt == DType::BF16 && !plan.lanes_x) {
        float* t = grow(sc.qhand, BM * D);
        split_pairs(qw, BM, D, t);
        qhand = t;
      }
      if (hand && dt == DType::BF16 && !plan.lanes_v) {
        float* u = grow(sc.douthand, BM * Dv);
        split_pairs(dout_r, BM, Dv, u);
        douthand = u;
      }
      float* qn = grow(sc.qn, BMp);
      float* lse = grow(sc.lse, BMp);
      float* delta = grow(sc.delta, BMp);
      // Each query's top row if in this split (else -1), its dP - Δ as a difference, and its dt as dbeta's
      // terms take it (BackwardParams::top).
      int64_t* top = grow(sc.top, BMp);
      float* gap = grow(sc.gap, BMp);
      float* dttop = grow(sc.dttop, BMp);
      std::fill(dttop, dttop + BMp, 0.f);
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
        top[i] = -1;
        const int64_t row = live && bp.top ? bp.top[l * p.B + b0 + i] : -1;
        if (row >= n_begin && row < n_end) {
          const float* o = bp.out + (l * p.B + b0 + i) * Dv;
          const char* vrow = val + es * size_t(row * p.values_row_stride);
          const float* vt = reinterpret_cast<const float*>(vrow);
          if (dt != DType::F32) row_to_float(dt, vrow, grow(sc.rowf, Dv), Dv), vt = sc.rowf.data();
          vf acc{};
          int64_t d = 0;
          for (; d + W <= Dv; d += W) acc += load(dout_src + i * Dv + d) * (load(vt + d) - load(o + d));
          float u = hsum(acc);
          for (; d < Dv; ++d) u += dout_src[i * Dv + d] * (vt[d] - o[d]);
          top[i] = row;
          gap[i] = u + bp.dlse[l * p.B + b0 + i];
        }
      }
      float* dq = grow(sc.dq, BMp * D);
      std::fill(dq, dq + BMp * D, 0.f);
      float* rowsum = grow(sc.rowsum, BMp);
      std::fill(rowsum, rowsum + BMp, 0.f);
      // Per query, over this split's rows: Σ dt s, Σ dt, Σ P s and Σ P (BackwardParams::dbeta).
      float* dts = grow(sc.dts, BMp);
      float* dtsum = grow(sc.dtsum, BMp);
      float* pssum = grow(sc.pssum, BMp);
      float* psum = grow(sc.psum, BMp);
      for (float* t : {dts, dtsum, pssum, psum}) std::fill(t, t + BMp, 0.f);

      float* c1 = grow(sc.c1, BN * BMp);
      float* pp = d16 ? nullptr : grow(sc.pp, BN * BMp);
      uint16_t* p16 = d16 ? grow(sc.p16, BN * BMp) : nullptr;
      float* g = grow(sc.g, BN * BMp);
      uint16_t* g16 = v16 ? grow(sc.g16, BN * BMp) : nullptr;
      float* glo = v16 ? grow(sc.glo, BN * BMp) : nullptr;  // G - its 16-bit rounding
      float* gt = grow(sc.gt, BMp * BN);
      for (int64_t r0 = n_begin; r0 < n_end; r0 += BN) {
        const int64_t R = std::min(BN, n_end - r0);
        sc.near.clear();
        // Per row of the tile, the vectors of W queries (bits) holding a query it is the top row of: the
        // rows x queries loop below patches those alone (tested for every row and vector, the patch took
        // 40 % of a 128-query backward over 128 rows, where nearly every row is some query's top).
        // Each query's top row within the tile as a float (exact: a tile's rows number < 2^24; -1: not here),
        // for the vector compare that patches its lanes.
        static_assert(kBackwardQueryBlockMax <= 64 * W, "a row's query vectors as the bits of a uint64_t");
        uint64_t* top_at = grow(sc.top_at, BN);
        std::fill(top_at, top_at + BN, uint64_t(0));
        float* top_row = grow(sc.top_row, BMp);
        bool any_top = false;
        for (int64_t i = 0; i < BMp; ++i) {
          const bool here = i < BM && top[i] >= r0 && top[i] < r0 + R;
          top_row[i] = here ? float(top[i] - r0) : -1.f;
          if (here) top_at[top[i] - r0] |= uint64_t(1) << (i / W), any_top = true;
        }
        // The rows this tile computes: a tail only its own, rounded up to kRowQuantum, as the
        // forward's (a bank of 64 rows of 16 features went through tiles of 256: 4x the work).
        const int64_t TN = R < BN ? (R + kRowQuantum - 1) / kRowQuantum * kRowQuantum : BN;
        // The bank tile as stored (xr, rows ldr elements apart), padded to TN rows; xf: in
        // float where a float32 product reads it.  xe: the rows the elementwise ℓ2 terms read.
        const char* xr = mem + es * size_t(r0 * p.memory_row_stride);
        int64_t ldr = p.memory_row_stride;
        if (R < TN) xr = pad_rows(xr, ldr, es, R, TN, D, sc.xraw), ldr = D;
        const float* xf = nullptr;
        int64_t ldf = 0;
        if (float_x) {
          if (dt == DType::F32)
            xf = reinterpret_cast<const float*>(xr), ldf = ldr;
          else
            xf = float_rows(dt, xr, ldr, TN, D, sc.xf, ldf);
        }
        const char* xe = float_x ? reinterpret_cast<const char*>(xf) : xr;
        const int64_t xe_step = float_x ? 4 * ldf : int64_t(es) * ldr;
        const DType xe_dt = float_x ? DType::F32 : dt;
        const char* vr = values_are_memory ? xr : val + es * size_t(r0 * p.values_row_stride);
        int64_t ldvr = values_are_memory ? ldr : p.values_row_stride;
        if (!values_are_memory && R < TN) vr = pad_rows(vr, ldvr, es, R, TN, Dv, sc.vraw), ldvr = Dv;
        const float* vfl = xf;
        int64_t ldv = ldf;
        if (float_v) {
          if (dt == DType::F32)
            vfl = reinterpret_cast<const float*>(vr), ldv = ldvr;
          else
            vfl = float_rows(dt, vr, ldvr, TN, Dv, sc.vf_, ldv);
        }

        // out = a bank tile (X or V: `rows` as stored, or `fl` in float; K features) times the
        // queries' operands transposed, by whichever product this tile takes: TN x BMp (rows x
        // queries), or the hand-written one's BM x TN (queries x rows: the few queries' lanes would be
        // mostly padding), which also leaves the rows' |x|² in `norms` when given.
        auto rows_by_queries = [&](const float* hand_ops, bool lanes, const float* lane_ops, bool use_vnni,
                                   const uint16_t* vnni_ops, const float* f32_ops, const char* rows, int64_t ld_rows,
                                   const float* fl, int64_t ld_fl, int64_t K, float* out, float* norms = nullptr,
                                   const char* next = nullptr, bool turned = false) {
          if (lanes) {  // (the w∘q and dout rows in float: lane_scores takes no split pairs)
            by_dtype(dt, [&](auto DT) {
              lane_scores<DT()>(lane_ops, BM, K, rows, int64_t(es) * ld_rows, TN, out, TN, grow(sc.xt, K * TN), next,
                                norms, turned);
            });
          } else if (hand) {
            by_dtype(dt, [&](auto DT) {
              hand_scores<DT()>(hand_ops, BM, K, rows, int64_t(es) * ld_rows, TN, out, 1, TN, next, norms);
            });
          } else if (use_vnni) {
            mk::gemm_vnni(dt, TN, BMp, K, ld_rows, BMp, BMp, false, reinterpret_cast<const uint16_t*>(rows), vnni_ops,
                          out);
          } else {
            mk::gemm_f32(TN, BMp, K, ld_fl, BMp, BMp, false, fl, f32_ops, out);
          }
        };

        // 1. Scores and weights, column-wise.
        // |x|² of the rows: from the hand-written score product's own loads, as the forward's
        // (the tile is read once), else a pass of its own.
        float* xn = l2 && !wts ? grow(sc.xn, TN) : nullptr;
        // The hand-written score product prefetches the next tile of this split (a whole one, as
        // stored), as the forward's does.  Measured (EPYC Zen 4, ad-hoc, in-process, median of 25;
        // one query against each of 128 banks of 2048 x 32): float32 17-20 % faster on rows a head
        // apart (split views), 4-7 % on contiguous rows; bf16 0-4 %.
        const char* x_next = r0 + 2 * BN <= n_end ? xr + es * size_t(BN * ldr) : nullptr;
        rows_by_queries(qhand, plan.lanes_x, qw, v16, qt16, qop, xr, ldr, xf, ldf, D, c1, hand ? xn : nullptr, x_next);
        float* c2 = nullptr;
        if (xn && !hand) {
          by_dtype(xe_dt, [&](auto DT) { row_norms<DT()>(xe, xe_step, TN, D, xn); });
        } else if (l2 && wts) {  // weighted: float32 brgemm products only (make_backward_plan)
          float* xsq = grow(sc.xsq, TN * D);
          for (int64_t j = 0; j < TN; ++j)
            for (int64_t k = 0; k < D; ++k) xsq[j * D + k] = xf[j * ldf + k] * xf[j * ldf + k];
          c2 = grow(sc.c2, BN * BMp);
          mk::gemm_f32(TN, BMp, D, D, BMp, BMp, false, xsq, wop, c2);
        }
        // 2. dP^T = V . dout^T into g, then dt and G in place.
        // (keys = values: the tile the score product turned, not turned again)
        rows_by_queries(douthand, plan.lanes_v, dout_r, d16, doutt16, dout_t, vr, ldvr, vfl, ldv, Dv, g, nullptr,
                        nullptr, plan.lanes_x && values_are_memory);
        const vf vb = splat(beta);
        // One vector of (query, row) pairs, its lanes queries (rows x queries tiles) or rows (queries x
        // rows): the score from the product c (ℓ2: from sum = |q|²_w + |x|²_w and c, §5.1's recompute
        // taking the lanes below `live` that `pairs` gives, flagged in `near`), ...
        auto score = [&](vf c, vf sum, int live, auto&& pairs, FlaggedLanes& near) {
          if (!l2) return c;
          const vf d2 = l2_distance_sq(sum, c, true, live, pairs, D, xe_dt, &near);
          return sim == Similarity::L2 ? -vsqrt(d2) : splat(-0.5f) * d2;
        };
        // ... then P (into pj), dt and G (returned) from the score, lse, Δ and dP, dbeta's terms summed.
        struct Sums {
          vf g{}, dts{}, dt{}, ps{}, p{};
        };
        auto weights = [&](vf s, vf vl, vf vd, vf dp, vf& pj, Sums& sums) {
          pj = exp_nonpositive(rounded(vb * s) - vl);
          const vf dtj = pj * (dp - vd);
          // Padding rows (s = -inf) and underflowed weights contribute nothing (not 0 * inf).
          const auto none = pj == vf{};
          sums.dts += none ? vf{} : dtj * s;
          sums.ps += none ? vf{} : pj * s;
          sums.dt += dtj;
          sums.p += pj;
          const vf gj = vb * dtj;
          if (sim != Similarity::L2) return gj;
          return s < vf{} ? -gj / s : vf{};  // 0: the subgradient at a stored pattern
        };
        // dX and dq sum G_ij (q_i - x_j) and G_ij (x_j - q_i) as G . q - colsum(G) x and G^T . X - rowsum(G) q:
        // for a query on or next to a stored row, that row's G_ij x_j and G_ij q_i cancel, to float32's
        // rounding of |G_ij| |x|, which was 1e-2 of dq and dX with every query on a stored row and a
        // gradient for lse (l2sq, 256 x 64, beta 0.4; the float32 reference 2e-7).  Such pairs (d² cancelled
        // in the product: §5.1's test) leave the products and are summed as differences after them:
        // G of the flagged lanes below `live` out of gj, into sc.near (pair_of(lane, G): their NearPair).
        auto take_near = [&](vf gj, const FlaggedLanes& near, int live, auto&& pair_of) {
          float gl[W];
          int nl[W];
          store(gl, gj);
          std::memcpy(nl, &near.lanes, sizeof nl);
          for (int t = 0; t < live; ++t)
            if (nl[t] && gl[t] != 0.f) sc.near.push_back(pair_of(t, gl[t])), gl[t] = 0.f;
          return load(gl);
        };
        if (hand) {  // queries x rows: W rows of one query a vector
          for (int64_t i = 0; i < BM; ++i) {
            const vf vq = splat(qn[i]), vl = splat(lse[i]), vd = splat(delta[i]);
            Sums sums;
            for (int64_t j0 = 0; j0 < TN; j0 += W) {  // (TN a multiple of kRowQuantum, so of W)
              const int live = int(std::clamp<int64_t>(R - j0, 0, W));
              FlaggedLanes near;
              vf s = splat(kNegInf);
              if (live > 0) {
                const vf sum = l2 ? vq + load(xn + j0) : vf{};
                auto pairs = [&] {
                  return LanePairs{q + i * D, 0, wts ? wts + i * D : nullptr, xe + j0 * xe_step, xe_step};
                };
                s = score(load(c1 + i * TN + j0), sum, live, pairs, near);
                if (live < W) s = first_lanes(live) ? s : splat(kNegInf);  // the padding rows
              }
              vf pj, dp = load(g + i * TN + j0), di = vd;
              const bool at_top = top[i] >= r0 + j0 && top[i] < r0 + j0 + live;
              if (at_top) [[unlikely]] {  // dP - Δ there: the gap (BackwardParams::top)
                float dpl[W], dl[W];
                store(dpl, dp), store(dl, vd);
                dpl[top[i] - r0 - j0] = gap[i], dl[top[i] - r0 - j0] = 0.f;
                dp = load(dpl), di = load(dl);
              }
              vf gj = weights(s, vl, di, dp, pj, sums);
              if (at_top) [[unlikely]] {  // its dt into dttop, its G out of the products
                float gl[W], pl[W];
                store(gl, gj), store(pl, pj);
                dttop[i] += pl[top[i] - r0 - j0] * gap[i], gl[top[i] - r0 - j0] = 0.f;
                gj = load(gl);
              }
              if (near.any) [[unlikely]]
                gj = take_near(gj, near, live, [&](int t, float gt_) { return NearPair{j0 + t, i, gt_}; });
              store(pp + i * TN + j0, pj);
              sums.g += gj;
              store(g + i * TN + j0, gj);
            }
            rowsum[i] += hsum(sums.g);  // of the float G: dq's products sum it whole
            dts[i] += hsum(sums.dts);
            dtsum[i] += hsum(sums.dt);
            pssum[i] += hsum(sums.ps);
            psum[i] += hsum(sums.p);
          }
        }
        for (int64_t gq = 0; gq < BMp && !hand; gq += W) {  // rows x queries: W queries of one row a vector
          const int live = int(std::min<int64_t>(W, BM - gq));
          const vf vq = load(qn + gq), vl = load(lse + gq), vd = load(delta + gq);
          const vf vtop = load(top_row + gq), vgap = load(gap + gq);
          vf vdttop{};
          Sums sums;
          for (int64_t j = 0; j < TN; ++j) {
            FlaggedLanes near;
            vf s = splat(kNegInf);
            if (j < R) {
              const vf sum = l2 ? vq + (wts ? load(c2 + j * BMp + gq) : splat(xn[j])) : vf{};
              auto pairs = [&] { return LanePairs{q + gq * D, D, wts ? wts + gq * D : nullptr, xe + j * xe_step, 0}; };
              s = score(load(c1 + j * BMp + gq), sum, live, pairs, near);
            }
            vf pj, dp = load(g + j * BMp + gq), dj = vd;
            const bool at_top = any_top && (top_at[j] >> (gq / W) & 1);
            vi mine{};  // the lanes whose top row this is: dP - Δ is their gap, and no G (BackwardParams::top)
            if (at_top) [[unlikely]] {
              mine = vtop == splat(float(j));
              dp = mine ? vgap : dp, dj = mine ? vf{} : vd;
            }
            vf gj = weights(s, vl, dj, dp, pj, sums);
            if (at_top) [[unlikely]] {
              vdttop += mine ? pj * vgap : vf{};
              gj = mine ? vf{} : gj;
            }
            if (near.any) [[unlikely]]
              gj = take_near(gj, near, live, [&](int t, float gt_) { return NearPair{j, gq + t, gt_}; });
            if (d16)
              store_16(dt, p16 + j * BMp + gq, pj);
            else
              store(pp + j * BMp + gq, pj);
            sums.g += gj;
            if (v16) {
              // G as the 16-bit products take it, in float too: the ℓ2 colsum term then cancels
              // against G . q as exactly as in float32 (with the float G, dX of a query next to
              // its stored row was 1.4e-2 off, not 2e-3).  dq takes the remainder too, below.
              store_16(dt, g16 + j * BMp + gq, gj);
              const vf rounded_g = load_as_float(dt, g16 + j * BMp + gq, 0);
              store(glo + j * BMp + gq, gj - rounded_g);
              gj = rounded_g;
            }
            store(g + j * BMp + gq, gj);
          }
          store(dttop + gq, load(dttop + gq) + vdttop);
          store(rowsum + gq, load(rowsum + gq) + sums.g);  // of the float G: dq's products sum it whole
          store(dts + gq, load(dts + gq) + sums.dts);
          store(dtsum + gq, load(dtsum + gq) + sums.dt);
          store(pssum + gq, load(pssum + gq) + sums.ps);
          store(psum + gq, load(psum + gq) + sums.p);
        }
        // 3. dV and dX rows of this tile (only its R real rows), dq of the query block.
        float* dxr = !bank_grads ? nullptr : direct ? grow(sc.dxt, BN * D) : dx + r0 * ld_dx;
        float* dvr = summed ? dxr : !bank_grads ? nullptr : direct ? grow(sc.dvt, BN * Dv) : dv + r0 * ld_dv;
        // The first query block writes these rows, the others add: dX and dV are N x D
        // and N x Dv, so neither a zero fill nor a first read of them is free.  Summed, dX's
        // product adds to the dV product's rows.
        const bool add = !(l == l_begin && b0 == 0);  // (always false with direct)
        if (!bank_grads) {
          // a frozen bank: no rows to write
        } else if (hand && summed) {
          few_query_rows(pp, g, TN, BM, dout_r, qw, D, R, add, dxr, ld_dx);
        } else if (hand) {
          few_query_rows(pp, nullptr, TN, BM, dout_r, nullptr, Dv, R, add, dvr, ld_dv);
          few_query_rows(g, nullptr, TN, BM, qw, nullptr, D, R, add, dxr, ld_dx);
        } else {
          // The products take whole kRowQuantum rows, as the forward's (a brgemm per tail length
          // would grow ATen's kernel cache: hopfield_cpu.h, brgemm_queries): a tail's last, partial
          // quantum goes through a tile of its own, its real rows copied in (where added to) and
          // back, so that brgemm adds them as it adds the others.
          auto rows = [&](float* out, int64_t ld, int64_t cols, bool add_to, auto&& product) {
            if (direct || R == TN) return product(0, TN, out, ld, add_to);
            const int64_t whole = R / kRowQuantum * kRowQuantum;
            if (whole > 0) product(0, whole, out, ld, add_to);
            float* t = grow(sc.tail, kRowQuantum * cols);
            const size_t row_bytes = sizeof(float) * size_t(cols);
            if (add_to)
              for (int64_t j = whole; j < R; ++j) std::memcpy(t + (j - whole) * cols, out + j * ld, row_bytes);
            product(whole, kRowQuantum, t, cols, add_to);
            for (int64_t j = whole; j < R; ++j) std::memcpy(out + j * ld, t + (j - whole) * cols, row_bytes);
          };
          rows(dvr, ld_dv, Dv, add, [&](int64_t r, int64_t M, float* c, int64_t ldc, bool a) {
            if (d16)
              mk::gemm_vnni(dt, M, Dv, BMp, BMp, Dv, ldc, a, p16 + r * BMp, doutv16, c);
            else
              mk::gemm_f32(M, Dv, BMp, BMp, Dv, ldc, a, pp + r * BMp, dout_r, c);
          });
          rows(dxr, ld_dx, D, add || summed, [&](int64_t r, int64_t M, float* c, int64_t ldc, bool a) {
            if (v16)
              mk::gemm_vnni(dt, M, D, BMp, BMp, D, ldc, a, g16 + r * BMp, qv16, c);
            else
              mk::gemm_f32(M, D, BMp, BMp, D, ldc, a, g + r * BMp, qw, c);
          });
        }
        if (l2 && bank_grads) {
          // - x ∘ (G . w): the colsum of G when unweighted.
          if (wts) {
            float* t = grow(sc.t, BN * D);
            mk::gemm_f32(TN, D, BMp, BMp, D, D, false, g, wr, t);
            for (int64_t j = 0; j < R; ++j)
              for (int64_t k = 0; k < D; ++k) dxr[j * ld_dx + k] -= xf[j * ldf + k] * t[j * D + k];
          } else {
            for (int64_t j = 0; j < R; ++j) {
              float cs = 0.f;
              for (int64_t i = 0; i < BM; ++i) cs += hand ? g[i * TN + j] : g[j * BMp + i];
              const vf vcs = splat(cs);
              const char* xj = xe + j * xe_step;
              float* dj = dxr + j * ld_dx;
              int64_t k = 0;
              for (; k + W <= D; k += W) store(dj + k, load(dj + k) - vcs * load_as_float(xe_dt, xj, k));
              for (; k < D; ++k) dj[k] -= cs * scalar_to_float(xe_dt, xj, k);
            }
          }
        }
        for (const NearPair& np : sc.near) {  // the near pairs' terms as differences (step 2)
          const float* qi = q + np.query * D;
          const float* wi = wts ? wts + np.query * D : nullptr;
          const char* xj = xe + np.row * xe_step;
          float* dxj = dxr ? dxr + np.row * ld_dx : nullptr;
          float* dqi = dq + np.query * D;
          for (int64_t k = 0; k < D; ++k) {
            const float diff = qi[k] - scalar_to_float(xe_dt, xj, k);
            if (dxj) dxj[k] += np.g * (wi ? wi[k] : 1.f) * diff;
            dqi[k] -= np.g * diff;
          }
        }
        if (direct && bank_grads) {
          if (!summed)
            store_rows_16(dt, dvr, R, Dv, bp.dv16 + bp.dv_lead(lm) + r0 * bp.dv_row_stride, bp.dv_row_stride);
          store_rows_16(dt, dxr, R, D, bp.dx16 + bp.dx_lead(lm) + r0 * bp.dx_row_stride, bp.dx_row_stride);
        }
        if (hand) {  // G is queries x rows already
          by_dtype(dt, [&](auto DT) { hand_values<DT()>(g, TN, BM, xr, int64_t(es) * ldr, TN, D, dq); });
        } else if (v16) {
          transpose_block(g, BMp, TN, BMp, gt, TN);  // (past BM the padding's rows: 0, never read)
          uint16_t* gt16 = grow(sc.gt16, BMv * TN);
          floats_to_16(dt, gt, BMv * TN, gt16);
          const int64_t ldp = padded_stride(D);  // as the forward's value tiles (tile_kernel.cpp)
          uint16_t* xp = grow(sc.xpack, TN * ldp);
          vnni_rows(reinterpret_cast<const uint16_t*>(xr), ldr, TN, D, ldp, xp);
          mk::gemm_vnni(dt, BMv, D, TN, TN, ldp, D, true, gt16, xp, dq);
          // dq = Σ_j G_j x_j sums terms that nearly cancel (Σ_j G_j is β dlse, often 0), so
          // the rounding of G would enter as Σ_j (G_j - rounded G_j) x_j: for a bank far from the
          // origin, dq was 1.9e-2 off (rows 3 + 0.3 N(0, 1)).  The remainder, rounded to 16 bits
          // in turn, is a second product: G to ~2^-16 of itself, as float32 products take it.
          transpose_block(glo, BMp, TN, BMp, gt, TN);
          uint16_t* gtlo16 = grow(sc.gtlo16, BMv * TN);
          floats_to_16(dt, gt, BMv * TN, gtlo16);
          mk::gemm_vnni(dt, BMv, D, TN, TN, ldp, D, true, gtlo16, xp, dq);
        } else {
          transpose_block(g, BMp, TN, BMp, gt, TN);
          mk::gemm_f32(BMv, D, TN, TN, ldf, D, true, gt, xf, dq);
        }
      }
      if (plan.settle_in_tiles) {  // settle_top_rows, for this block: the split is the bank
        for (int64_t i = 0; i < BM; ++i) {
          if (top[i] < 0) continue;
          const char* xrow = mem + es * size_t(top[i] * p.memory_row_stride);
          const float* x = reinterpret_cast<const float*>(xrow);
          if (dt != DType::F32) row_to_float(dt, xrow, grow(sc.rowf, D), D), x = sc.rowf.data();
          add_top_pair(sim, D, q + i * D, x, wts ? wts + i * D : nullptr, beta, bp.dlse[l * p.B + b0 + i] * psum[i],
                       dtsum[i] - dttop[i], false, dq + i * D, dx ? dx + top[i] * ld_dx : nullptr);
        }
      }
      // The query block's dq: - rowsum(G) q for the ℓ2 forms, then w ∘.
      float* dq_out = bp.dq + ((split * L + l) * p.B + b0) * D;
      for (int64_t i = 0; i < BM; ++i)
        for (int64_t k = 0; k < D; ++k) {
          float t = dq[i * D + k] - (l2 ? rowsum[i] * q[i * D + k] : 0.f);
          dq_out[i * D + k] = wts ? wts[i * D + k] * t : t;
        }
      const int64_t slot = (split * L + l) * p.B + b0;
      std::memcpy(bp.dbeta + slot, dts, sizeof(float) * size_t(BM));
      std::memcpy(bp.dt_sum + slot, dtsum, sizeof(float) * size_t(BM));
      std::memcpy(bp.ps_sum + slot, pssum, sizeof(float) * size_t(BM));
      std::memcpy(bp.p_sum + slot, psum, sizeof(float) * size_t(BM));
      if (bp.top) std::memcpy(bp.dt_top + slot, dttop, sizeof(float) * size_t(BM));
    }
  }
  if (v16) mk::release_vnni();
}

void settle_top_rows(const BackwardParams& bp, float* dq, const float* terms) {
  const PartialParams& p = bp.p;
  const int64_t L = p.L, B = p.B, N = p.N, D = p.D;
  const DType dt = p.dtype;
  const size_t es = dt == DType::F32 ? 4 : 2;
  const float *dt_sum = terms + L * B, *p_sum = terms + 3 * L * B, *dt_top = terms + 4 * L * B;
  const bool with_dx = bp.bank_grads != BankGrads::None, rows16 = with_dx && bp.dx16;
  // A 16-bit dX row that several queries top takes their changes summed and is rounded once: the changes
  // wait in `change`, (row key, offset) in `at_rows`; a float32 row takes each change at once.
  std::vector<std::pair<int64_t, int64_t>> at_rows;
  std::vector<float> change, qf(static_cast<size_t>(D)), xf(static_cast<size_t>(D));
  auto as_float = [&](const char* row, std::vector<float>& buf) {
    if (dt == DType::F32) return reinterpret_cast<const float*>(row);
    row_to_float(dt, row, buf.data(), D);
    return static_cast<const float*>(buf.data());
  };
  for (int64_t l = 0; l < L; ++l)
    for (int64_t i = 0; i < B; ++i) {
      const int64_t lb = l * B + i, row = bp.top[lb];
      if (row < 0 || row >= N) continue;
      const float* x = as_float(static_cast<const char*>(p.memory) + es * size_t(p.memory_lead(l) + row * p.memory_row_stride), xf);
      const float* q = as_float(static_cast<const char*>(p.query) + es * size_t(p.query_lead(l) + i * p.query_row_stride), qf);
      const int64_t lm = bp.Lm > 1 ? l : 0;
      float* to = nullptr;
      if (rows16) {
        at_rows.emplace_back(lm * N + row, int64_t(change.size()));
        change.resize(change.size() + size_t(D), 0.f);
        to = change.data() + change.size() - size_t(D);
      } else if (with_dx) {
        to = bp.dx + bp.dx_lead(lm) + row * bp.dx_row_stride;
      }
      add_top_pair(p.similarity, D, q, x, p.weights ? p.weights + lb * D : nullptr, p.beta[l],
                   bp.dlse[lb] * p_sum[lb], dt_sum[lb] - dt_top[lb], true, dq + lb * D, to);
    }
  std::sort(at_rows.begin(), at_rows.end());
  for (size_t g = 0; g < at_rows.size();) {
    const int64_t key = at_rows[g].first;
    uint16_t* r = bp.dx16 + bp.dx_lead(key / N) + key % N * bp.dx_row_stride;
    row_to_float(dt, r, xf.data(), D);
    for (; g < at_rows.size() && at_rows[g].first == key; ++g)
      for (int64_t k = 0; k < D; ++k) xf[size_t(k)] += change[size_t(at_rows[g].second + k)];
    floats_to_16(dt, xf.data(), D, r);
  }
}

}  // namespace HEN_ISA_NS
}  // namespace hen

#include "cpu/isa_end.h"
