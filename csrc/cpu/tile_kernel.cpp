// The tile kernel of hopfield_cpu.h.  CMake compiles this file once per
// instruction set (HEN_ISA_NS = avx512 / avx2 / baseline with HEN_ISA_LEVEL 3 / 2 / 1);
// hopfield_cpu.cpp picks one at run time; cpu/isa_begin.h says how the instruction
// set reaches this file's functions only.
//
// One tile: a query block (up to 64 queries, padded to the vector width W) against
// one split of the bank, walked in row tiles of plan.row_block rows:
//   1. scores   C = X_tile . Q^T          (bank rows x queries: brgemm or dot blocks; or
//               queries x rows for a few queries: dot blocks or lane_scores)
//               ℓ2: d² = |q|²_w + |x|²_w - 2 C, recomputed directly where it cancels
//   2. softmax  over each column (W queries per vector) or each query's row (W rows per
//               vector): max, argmax, exp, sums, and the weights P (queries x rows)
//   3. values   O += P . V_tile            (brgemm or vector FMAs)
// Every row is scored by the same operations wherever it sits (a tail tile is padded
// to a multiple of kRowQuantum rows, never computed by another path), so equal rows score equally
// and the argmax keeps the first: docs/design.md §5.1.
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

// Tiles compute a multiple of kRowQuantum rows, W rows a vector where the scores lie along the rows
// (row_scores, lane_scores).
static_assert(kRowQuantum % W == 0, "a row tile must be whole vectors of rows");

namespace {

// --- the softmax over a score tile held column-wise (rows x queries) -------------------

// The first row of the largest score per lane, over rows visited in increasing
// order: U independent chains, so that no comparison waits for the previous row's.
struct ArgMax {
  static constexpr int U = 4;
  vf best[U];
  vi at[U];
  ArgMax() {
    for (int u = 0; u < U; ++u) best[u] = splat(kNegInf), at[u] = vi{};
  }
  void add(int u, vf s, int32_t j) {
    const vi up = s > best[u];  // strictly: a tie keeps the earlier row
    best[u] = up ? s : best[u];
    at[u] = up ? vi{} + j : at[u];
  }
  void merge(vf& b, vi& j) const {
    b = best[0], j = at[0];
    for (int u = 1; u < U; ++u) {
      const vi take = (best[u] > b) | ((best[u] == b) & (at[u] < j));
      b = take ? best[u] : b;
      j = take ? at[u] : j;
    }
  }
};

// Scores of rows [0, R) of one column group (score(j, c) from the product c): their
// max (NaN scores never win) and its first row; written back in place when kStore
// (else the exp pass recomputes them the same way), -inf for the padding rows up to
// BN.  A NaN score shows in the exp pass instead: its weight, and so the column sum
// and the running sum, are NaN (weights of finite scores are finite).
template <bool kStore, typename Score>
__attribute__((always_inline)) inline void column_scores(float* c, int64_t ldc, int64_t R, int64_t BN, Score&& score,
                                                         vf& best, vi& best_j) {
  ArgMax am;
  int64_t j = 0;
  for (; j + ArgMax::U <= R; j += ArgMax::U)
    for (int u = 0; u < ArgMax::U; ++u) {
      float* cj = c + (j + u) * ldc;
      const vf s = score(j + u, load(cj));
      if constexpr (kStore) store(cj, s);
      am.add(u, s, int32_t(j + u));
    }
  for (; j < R; ++j) {
    float* cj = c + j * ldc;
    const vf s = score(j, load(cj));
    if constexpr (kStore) store(cj, s);
    am.add(0, s, int32_t(j));
  }
  for (; j < BN; ++j) store(c + j * ldc, splat(kNegInf));
  am.merge(best, best_j);
}

// W weights into P: float, 16-bit dt, or bfloat16 by store_bf16_native (kNative).
template <bool kNative, typename T>
inline void put_weights(T* dst, vf v, DType dt) {
  if constexpr (std::is_same_v<T, float>)
    store(dst, v);
  else if constexpr (kNative)
    store_bf16_native(dst, v);
  else
    store_16(dt, dst, v);
}

// The column sums of a weights pass: of the weights as computed (the softmax's sum, which
// gives lse and weighs bank splits against each other) and of the weights as stored in P,
// which the value product multiplies by.  16-bit P rounds each weight by up to 2^-9
// (bfloat16) of itself, so O / exact would scale the output by the sum of those
// roundings and move it off the bank's rows by that fraction of their offset from the
// origin; O / stored keeps it a convex combination of them (docs/design.md §5.1).
template <typename V>
struct WeightSums {
  V exact, stored;
};

// exp(scale * c - msub) for BN rows (a multiple of W) of one column group (c itself
// without kScaled: the stored ℓ2 scores), written as rows of P (queries x BN rows,
// float or 16-bit kDt) for the `live` queries, W x W blocks transposed in registers;
// returns the column sums.  kDt is a template argument so that no dtype test sits in the
// unrolled loop (with one there, GCC kept both roundings' code in it and spilled the sums).
template <bool kScaled, DType kDt, bool kNative, typename T>
inline WeightSums<vf> column_weights(const float* c, int64_t ldc, int64_t BN, vf scale, vf msub, int live, T* p) {
  constexpr bool k16 = !std::is_same_v<T, float>;
  auto put = [&](T* dst, vf v) __attribute__((always_inline)) { put_weights<kNative>(dst, v, kDt); };
  vf acc = vf{}, acc_stored = vf{};
  vf e[W];
  for (int64_t j0 = 0; j0 < BN; j0 += W) {
    const float* src = c + j0 * ldc;
#pragma GCC unroll 16
    for (int jj = 0; jj < W; ++jj, src += ldc) {
      // The scores column_scores saw.
      e[jj] = exp_nonpositive((kScaled ? rounded(load(src) * scale) : load(src)) - msub);
      acc += e[jj];
      if constexpr (k16) {
        e[jj] = as_stored_16(kDt, e[jj]);
        acc_stored += e[jj];
      }
    }
    transpose(e);
    T* dst = p + j0;
    if (live == W) {
#pragma GCC unroll 16
      for (int i = 0; i < W; ++i, dst += BN) put(dst, e[i]);
    } else {
      for (int i = 0; i < live; ++i, dst += BN) put(dst, e[i]);
    }
  }
  return {acc, k16 ? acc_stored : acc};
}

// --- the same for one query, its scores laid along the rows --------------------------

// With a single query the scores of a tile lie contiguous (ldc = 1), W rows per
// vector: no lane is padding and P needs no transpose.  Every score still comes from
// the same product and the same score function as with many queries.

// Scores of rows [0, R) (score(j0, c): the W scores of rows j0.. from their products c):
// their max (NaN never wins) and its first row; written back in place when kStore
// (else the exp pass recomputes them), -inf for the padding rows up to BN.
template <bool kStore, typename Score>
__attribute__((always_inline)) inline void row_scores(float* c, int64_t R, int64_t BN, Score&& score, float& best,
                                                      int64_t& best_j) {
  constexpr vi lane = lane_numbers(std::make_index_sequence<W>{});
  ArgMax am;  // chain u, lane l: rows j + l of the vectors j it was given
  for (int64_t j = 0, u = 0; j < BN; j += W, u = (u + 1) % ArgMax::U) {
    const vf cj = load(c + j);
    vf s = score(j, cj);
    if (j + W > R) {
      const vi pad = lane + int32_t(j) >= int32_t(R);
      s = pad ? splat(kNegInf) : s;
      if constexpr (!kStore) store(c + j, pad ? splat(kNegInf) : cj);  // -inf * beta = -inf
    }
    if constexpr (kStore) store(c + j, s);
    am.add(int(u), s, int32_t(j));
  }
  vf lane_best;
  vi lane_at;  // per lane: the first vector with its best (a lane's rows grow with its vectors)
  am.merge(lane_best, lane_at);
  best = kNegInf, best_j = 0;
  for (int l = 0; l < W; ++l) {
    const float v = lane_best[l];
    const int64_t row = int64_t(lane_at[l]) + l;
    if (v > best || (v == best && v != kNegInf && row < best_j)) best = v, best_j = row;
  }
}

// exp(scale * c - msub) (c itself without kScaled) for BN rows into P's one row;
// returns their sums (WeightSums).
template <bool kScaled, DType kDt, bool kNative, typename T>
inline WeightSums<float> row_weights(const float* c, int64_t BN, vf scale, vf msub, T* p) {
  constexpr bool k16 = !std::is_same_v<T, float>;
  vf acc = vf{}, acc_stored = vf{};
  for (int64_t j = 0; j < BN; j += W) {
    vf e = exp_nonpositive((kScaled ? rounded(load(c + j) * scale) : load(c + j)) - msub);
    acc += e;
    if constexpr (k16) {
      e = as_stored_16(kDt, e);
      acc_stored += e;
    }
    put_weights<kNative>(p + j, e, kDt);
  }
  return {hsum(acc), k16 ? hsum(acc_stored) : hsum(acc)};
}

// The pair dot products where this copy has them (make_plan asks for them only then).
#if HEN_NATIVE_BF16
#define HEN_PAIR_PRODUCT(call) call
#else
#define HEN_PAIR_PRODUCT(call) std::abort()
#endif

// --- per-thread scratch, grown on demand and reused across tiles ----------------------

struct Scratch {
  std::vector<float> q, qw, qsplit, qn, qop, wop, xraw, vraw, xf, vf_, xsq, xn, xt, c1, c2, pf, o, m, l, lstored, top;
  std::vector<uint16_t> q16, qw16, p16, vpack;
  std::vector<int64_t> top_index;
};

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
  const int64_t BMv = brgemm_queries(BM, W);  // the value product's queries where a microkernel takes it
  const int64_t n_begin = std::min(p.N, split * plan.rows_per_split);
  const int64_t n_end = std::min(p.N, n_begin + plan.rows_per_split);
  const int64_t D = p.D, Dv = p.Dv, BN = plan.row_block;
  const DType dt = p.dtype;
  const size_t es = dt == DType::F32 ? 4 : 2;
  const float beta = p.beta[l];
  const Similarity sim = p.similarity;
  const bool l2 = sim != Similarity::Dot;
  const Product sp = plan.score, vp = plan.value;
  const float* wts = p.weights ? p.weights + (l * p.B + b0) * D : nullptr;
  const bool weighted_l2 = l2 && wts;
  // C2 = (X∘X) . w^T, unless every query has the same weights (Plan::shared_weights): then
  // sum_d w_d x_d² is one number a row, which row_norms sums as it sums |x|².
  const bool weight_product = weighted_l2 && !plan.shared_weights;
  const char* mem = static_cast<const char*>(p.memory) + es * size_t(p.memory_lead(l));
  const char* val = static_cast<const char*>(p.values) + es * size_t(p.values_lead(l));
  const char* qsrc = static_cast<const char*>(p.query) + es * size_t(p.query_lead(l) + b0 * p.query_row_stride);
  const bool values_are_memory = p.values_are_memory();

  // The query block, once per tile: q in float, the product operand qw (w∘q with
  // weights), |q|²_w, and the B operands of the brgemm score products.
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
  // The 16-bit score products' query rows: the query's own, or with weights w∘q, which
  // make_plan found exactly 16-bit (weighted_cue_is_16bit: bfloat16), so cut to its top half.
  const char* q16rows = qsrc;
  int64_t q16stride = p.query_row_stride;
  if (wts && (sp == Product::Vnni || sp == Product::Bf16Pairs)) {
    uint16_t* t = grow(sc.qw16, BM * D);
    for (int64_t i = 0; i < BM * D; ++i) {
      uint32_t bits;
      std::memcpy(&bits, qw + i, 4);
      t[i] = uint16_t(bits >> 16);
    }
    q16rows = reinterpret_cast<const char*>(t), q16stride = D;
  }
  // The hand-written bfloat16 score products take the query split into pairs (split_pairs),
  // or on the pair dot product, the bfloat16 query rows themselves.
  const bool hand_scores_here = sp == Product::Hand || sp == Product::Bf16Pairs || sp == Product::Lanes;
  const float* qhand = qw;
  const uint16_t* qpairs = nullptr;
  if (sp == Product::Bf16Pairs) {
    uint16_t* t = grow(sc.q16, BM * D);
    for (int64_t i = 0; i < BM; ++i) std::memcpy(t + i * D, q16rows + 2 * size_t(i * q16stride), 2 * size_t(D));
    qpairs = t;
  }
  if (sp == Product::Hand && dt == DType::BF16) {
    float* t = grow(sc.qsplit, BM * D);
    split_pairs(qw, BM, D, t);
    qhand = t;
  }
  float* qn = grow(sc.qn, BMp);
  std::fill(qn, qn + BMp, 0.f);
  if (l2)
    for (int64_t i = 0; i < BM; ++i) {
      const float* qi = q + i * D;
      if (!wts) {
        qn[i] = sum_sq(DType::F32, reinterpret_cast<const char*>(qi), D);
      } else {  // sum_d w_d q_d², the same way for every query
        const float* wi = wts + i * D;
        vf acc = vf{};
        int64_t k = 0;
        for (; k + W <= D; k += W) acc += load(wi + k) * load(qi + k) * load(qi + k);
        float t = hsum(acc);
        for (; k < D; ++k) t += wi[k] * qi[k] * qi[k];
        qn[i] = t;
      }
    }
  const float* qop = nullptr;
  const float* wop = nullptr;
  const uint16_t* q16 = nullptr;
  // The score product's depth: D, or D + 1 where the VNNI pairs need it even (the bank tile
  // then gets a zero column below, and Q^T a zero row here).
  const int64_t Dk = sp == Product::Vnni ? (D + 1) / 2 * 2 : D;
  if (sp == Product::Vnni) {  // (Dk/2, BMp, 2): the VNNI image of Q^T, straight from the 16-bit query rows
    uint16_t* t = grow(sc.q16, Dk * BMp);
    std::memset(t, 0, 2 * size_t(Dk * BMp));
    vnni_transposed(reinterpret_cast<const uint16_t*>(q16rows), q16stride, BM, D, BMp, t);
    q16 = t;
  } else if (sp == Product::F32) {  // (D, BMp): Q^T in float
    qop = transposed(qw, BMp, D, sc.qop);  // qw is zero past BM
    if (weight_product) {
      float* u = grow(sc.wop, D * BMp);
      for (int64_t k = 0; k < D; ++k)
        for (int64_t i = 0; i < BMp; ++i) u[k * BMp + i] = i < BM ? wts[i * D + k] : 0.f;
      wop = u;
    }
  }

  float* o = grow(sc.o, BMp * Dv);
  std::fill(o, o + BMv * Dv, 0.f);
  float* m = grow(sc.m, BMp);
  float* lsum = grow(sc.l, BMp);
  float* lstored = grow(sc.lstored, BMp);  // the sum of the weights as P holds them (WeightSums)
  float* top = grow(sc.top, BMp);
  int64_t* top_index = grow(sc.top_index, BMp);
  std::fill(m, m + BMp, kNegInf);
  std::fill(lsum, lsum + BMp, 0.f);
  std::fill(lstored, lstored + BMp, 0.f);
  std::fill(top, top + BMp, kNegInf);
  std::fill(top_index, top_index + BMp, int64_t(-1));

  // The scores as the softmax takes them: W queries a vector (rows x queries), or each query's
  // along the rows (queries x rows, row_layout), W rows of one query a vector, none of them
  // padding, and P with no transpose.  The lane products leave them so; the dot products
  // write either, and up to kRowLayoutQueries take the rows (W queries a vector left all but
  // a few lanes idle).  Hand-written products, queries x rows against rows x queries (EPYC Zen 4,
  // D = 64 and 128, float32 and bfloat16, in-process): 2 queries 1.2-1.6x faster, 4 queries
  // 1.1-1.2x (AVX2 forced: 1.2-1.3x, 1.1-1.15x); 8 queries 0.93-1.03x (AVX2: 0.96-1.04x).
  constexpr int64_t kRowLayoutQueries = 4;
  const bool row_layout = sp == Product::Lanes || (hand_scores_here && BM <= kRowLayoutQueries);
  const int64_t ldc = row_layout ? 1 : BMp, ldq = row_layout ? BN : 1;
  float* c1 = grow(sc.c1, BN * BMp);
  float* c2 = weight_product ? grow(sc.c2, BN * BMp) : nullptr;
  float* xt = sp == Product::Lanes ? grow(sc.xt, D * BN) : nullptr;  // the turned tile of lane_scores
  // |x|²_w a row: left by the hand-written score products unweighted, else summed apart.
  float* xn = l2 && !weight_product ? grow(sc.xn, BN) : nullptr;
  float* xn_by_scores = wts ? nullptr : xn;
  // P in the value product's A operand: 16-bit for VNNI and the pair dot product, else float.
  const bool p_16bit = vp == Product::Vnni || vp == Product::Bf16Pairs;
  float* pf = p_16bit ? nullptr : grow(sc.pf, BMp * BN);
  uint16_t* p16 = p_16bit ? grow(sc.p16, BMp * BN) : nullptr;
  const float neg_half_beta = -0.5f * beta;
  // The ℓ2 score functions capture copies ([=]) of these locals: the score pass writes the
  // scores back through memcpy, after which whatever is reached by reference may have changed.
  const bool l2_direct = plan.l2_direct, root = sim == Similarity::L2;
  // Float rows for the float32 brgemm products of 16-bit inputs (the inputs themselves when float32).
  const bool float_tiles = sp == Product::F32 || vp == Product::F32;

  // The first tile of the work item this thread most likely takes next, prefetched (by the
  // hand-written products) during this split's last tile, whose own next tile is not there:
  // items go out from one counter in order, so with every worker in step it is tile +
  // workers.  Measured (EPYC Zen 4, one query against each of 128 banks of 2048 rows of
  // 64 floats): 3-7 % faster.  A wrong guess costs one tile of reads.
  const char* after_x = nullptr;
  const char* after_v = nullptr;
  if (const int64_t t = tile + plan.workers; t < plan.tiles(p)) {
    const int64_t l_next = t / (plan.splits * qblocks);
    const int64_t first = std::min(p.N, (t % plan.splits) * plan.rows_per_split);
    if (first + BN <= std::min(p.N, first + plan.rows_per_split)) {  // a whole tile, read as stored
      after_x = static_cast<const char*>(p.memory) + es * size_t(p.memory_lead(l_next) + first * p.memory_row_stride);
      after_v = static_cast<const char*>(p.values) + es * size_t(p.values_lead(l_next) + first * p.values_row_stride);
    }
  }
  for (int64_t r0 = n_begin; r0 < n_end; r0 += BN) {
    const int64_t R = std::min(BN, n_end - r0);
    // The rows this tile computes: a tail only its own, rounded up to kRowQuantum (the
    // microkernels score each row alike for any number of rows: the tie tests hold them to it).
    const int64_t TN = R < BN ? (R + kRowQuantum - 1) / kRowQuantum * kRowQuantum : BN;
    // The bank tile as stored (xr, row stride ldr in elements of dt), padded to TN
    // rows at the tail; xf: the same rows in float where a float32 product needs them.
    const char* xr = mem + es * size_t(r0 * p.memory_row_stride);
    int64_t ldr = p.memory_row_stride;
    if (R < TN || Dk > D) xr = pad_rows(xr, ldr, es, R, TN, D, sc.xraw, Dk), ldr = Dk;
    const float* xf = reinterpret_cast<const float*>(xr);
    int64_t ldf = ldr;
    if (float_tiles && (dt != DType::F32 || restride_float_tile(ldr, BM, D))) xf = float_rows(dt, xr, ldr, TN, D, sc.xf, ldf);
    const int64_t xstep = int64_t(es) * ldr;  // bytes from one row of the tile as stored to the next
    // The next tile of this split as stored, where it is a whole one (after its last tile:
    // the next work item's first), for the prefetches.
    const char* next_x = r0 + 2 * BN <= n_end ? mem + es * size_t((r0 + BN) * p.memory_row_stride)
                         : r0 + BN >= n_end  ? after_x
                                             : nullptr;

    // 1. Score products: C1 = X . (w∘q)^T, and for weighted ℓ2 C2 = (X∘X) . w^T.
    if (sp == Product::Vnni) {
      mk::gemm_vnni(dt, TN, BMp, Dk, ldr, BMp, BMp, false, reinterpret_cast<const uint16_t*>(xr), q16, c1);
    } else if (sp == Product::F32) {
      mk::gemm_f32(TN, BMp, D, ldf, BMp, BMp, false, xf, qop, c1);
    } else {
      // (Rows ldr apart: a tile padded to another stride prefetches nothing.)
      const char* next = ldr == p.memory_row_stride && plan.scores_fetch_next ? next_x : nullptr;
      if (sp == Product::Lanes)
        by_dtype(dt, [&](auto DT) {
          lane_scores<DT()>(qw, BM, D, xr, int64_t(es) * ldr, TN, c1, ldq, xt, next, xn_by_scores);
        });
      else if (sp == Product::Bf16Pairs)
        HEN_PAIR_PRODUCT(pair_scores(qpairs, qw, BM, D, xr, int64_t(es) * ldr, TN, c1, ldc, ldq, next, xn_by_scores));
      else
        by_dtype(dt, [&](auto DT) {
          hand_scores<DT()>(qhand, BM, D, xr, int64_t(es) * ldr, TN, c1, ldc, ldq, next, xn_by_scores);
        });
      if (!row_layout)
        for (int64_t j = 0; j < TN; ++j) std::fill(c1 + j * BMp + BM, c1 + (j + 1) * BMp, 0.f);
    }
    if (xn && (wts || !hand_scores_here)) {  // (else the hand-written products left them already)
      if (plan.pair_norms && !wts)
        HEN_PAIR_PRODUCT(pair_row_norms(xr, int64_t(es) * ldr, TN, D, xn));
      else
        by_dtype(dt, [&](auto DT) { row_norms<DT()>(xr, int64_t(es) * ldr, TN, D, xn, wts); });
    }
    if (weight_product) {
      int64_t ldsq;  // rows padded_stride apart, as every float tile a product reads
      float* xsq = float_rows(dt, xr, ldr, TN, D, sc.xsq, ldsq);
      for (int64_t j = 0; j < TN; ++j)
        for (int64_t k = 0; k < D; ++k) xsq[j * ldsq + k] *= xsq[j * ldsq + k];
      if (sp == Product::F32) {
        mk::gemm_f32(TN, BMp, D, ldsq, BMp, BMp, false, xsq, wop, c2);
      } else if (sp == Product::Lanes) {
        lane_scores<DType::F32>(wts, BM, D, reinterpret_cast<const char*>(xsq), 4 * ldsq, TN, c2, ldq, xt);
      } else {
        hand_scores<DType::F32>(wts, BM, D, reinterpret_cast<const char*>(xsq), 4 * ldsq, TN, c2, ldc, ldq);
        if (!row_layout)
          for (int64_t j = 0; j < TN; ++j) std::fill(c2 + j * BMp + BM, c2 + (j + 1) * BMp, 0.f);
      }
    }

    // 2. Softmax over each column, W queries per vector, or (row_layout) over each query's
    // row, lane 0 of every vector below standing for that query.
    for (int64_t g = 0; g < BM; g += row_layout ? 1 : W) {
      const int live = row_layout ? 1 : int(std::min<int64_t>(W, BM - g));  // real queries in this group
      float* cg = row_layout ? c1 + g * ldq : c1 + g;
      vf best;
      vi best_j;
      if (row_layout) {
        float b;
        int64_t bj;
        if (!l2) {
          const vf vb = splat(beta);
          row_scores<false>(cg, R, TN, [&](int64_t, vf c) { return c * vb; }, b, bj);
        } else {
          const vf vq = splat(qn[g]);
          const float* sums = c2 ? c2 + g * ldq : xn;
          const float* qg = q + g * D;
          const float* wg = wts ? wts + g * D : nullptr;
          auto score = [=](int64_t j, vf c) __attribute__((always_inline)) {  // copies: see l2_direct
            const vf sum = vq + load(sums + j);
            const int live_rows = int(std::min<int64_t>(W, R - j));
            const vf d2 = l2_distance_sq(sum, c, l2_direct, live_rows,
                                         [&] { return LanePairs{qg, 0, wg, xr + j * xstep, xstep}; }, D, dt);
            return root ? -beta * vsqrt(d2) : splat(neg_half_beta) * d2;
          };
          row_scores<true>(cg, R, TN, score, b, bj);
        }
        best = splat(kNegInf), best_j = vi{};
        best[0] = b, best_j[0] = int32_t(bj);
      } else if (!l2) {
        const vf vb = splat(beta);
        // The exp pass recomputes c * beta: no score tile is written back.
        column_scores<false>(cg, BMp, R, TN, [&](int64_t, vf c) { return c * vb; }, best, best_j);
      } else {
        const vf vq = load(qn + g);
        const float* wg = wts ? wts + g * D : nullptr;
        const float* c2g = c2 ? c2 + g : nullptr;
        auto score = [=](int64_t j, vf c) __attribute__((always_inline)) {  // copies: see l2_direct
          const vf sum = vq + (c2g ? load(c2g + j * BMp) : splat(xn[j]));
          const vf d2 = l2_distance_sq(sum, c, l2_direct, live,
                                       [&] { return LanePairs{q + g * D, D, wg, xr + j * xstep, 0}; }, D, dt);
          return root ? -beta * vsqrt(d2) : splat(neg_half_beta) * d2;
        };
        column_scores<true>(cg, BMp, R, TN, score, best, best_j);
      }
      // The running state of the group's queries (a row's: its query in every lane, lane 0 kept).
      auto state = [&](const float* a) { return row_layout ? splat(a[g]) : load(a + g); };
      auto set_state = [&](float* a, vf v) {
        if (row_layout)
          a[g] = v[0];
        else
          store(a + g, v);
      };
      const vf m_old = state(m);
      const vf m_new = vmax(m_old, best);
      const vf msub = m_new == splat(kNegInf) ? vf{} : m_new;  // nothing finite yet: weights 0
      // The dot products times beta again, or the stored ℓ2 scores.
      const vf scale = splat(beta);
      // P's dtype (kDt: float, or 16-bit rounded by the CPU's own conversion where kNative).
      auto weights_pass = [&](auto scaled, auto dtype, auto native, auto* dst) -> WeightSums<vf> {
        constexpr bool kScaled = decltype(scaled)::value, kNative = decltype(native)::value;
        constexpr DType kDt = decltype(dtype)::value;
        if (row_layout) {  // lane 0 is the query
          const WeightSums<float> r = row_weights<kScaled, kDt, kNative>(cg, TN, scale, splat(msub[0]), dst + g * TN);
          WeightSums<vf> v{vf{}, vf{}};
          v.exact[0] = r.exact, v.stored[0] = r.stored;
          return v;
        }
        return column_weights<kScaled, kDt, kNative>(cg, BMp, TN, scale, msub, live, dst + g * TN);
      };
      auto weights_into = [&](auto scaled) -> WeightSums<vf> {
        using std::false_type, std::true_type;
        constexpr std::integral_constant<DType, DType::F32> f32{};
        constexpr std::integral_constant<DType, DType::F16> f16{};
        constexpr std::integral_constant<DType, DType::BF16> bf16{};
        if (!p16) return weights_pass(scaled, f32, false_type{}, pf);
        if (dt == DType::F16) return weights_pass(scaled, f16, false_type{}, p16);
        if (HEN_NATIVE_BF16 && plan.native_bf16) return weights_pass(scaled, bf16, true_type{}, p16);
        return weights_pass(scaled, bf16, false_type{}, p16);
      };
      const WeightSums<vf> sum = l2 ? weights_into(std::false_type{}) : weights_into(std::true_type{});
      const vf rescale = exp_nonpositive(m_old - msub);
      set_state(lsum, state(lsum) * rescale + sum.exact);
      set_state(lstored, state(lstored) * rescale + sum.stored);
      set_state(m, m_new);
      for (int i = 0; i < live; ++i) {
        if (rescale[i] != 1.f) {
          float* oi = o + (g + i) * Dv;
          for (int64_t d = 0; d < Dv; ++d) oi[d] *= rescale[i];
        }
        if (best[i] > top[g + i]) {  // strictly: an earlier row keeps a tie
          top[g + i] = best[i];
          top_index[g + i] = p.offset + r0 + best_j[i];
        }
      }
    }

    // The microkernels' score products read the bank from memory as its rows come: the
    // next tile goes towards L2 beforehand, while the value products run on this one.
    if (plan.burst_next && next_x) prefetch_tile(next_x, es * p.memory_row_stride, BN, es * D);
    // 3. Value products: O += P . V, V the same tile when values are the memory.
    const char* vr = values_are_memory ? xr : val + es * size_t(r0 * p.values_row_stride);
    int64_t ldvr = values_are_memory ? ldr : p.values_row_stride;
    if (!values_are_memory && R < TN) vr = pad_rows(vr, ldvr, es, R, TN, Dv, sc.vraw), ldvr = Dv;
    constexpr int64_t kValueChunk = 512;  // output columns per product: the C block stays in L2
    // The microkernels take BMv queries: the padding's weights 0 (the softmax writes BM rows).
    if (vp == Product::Vnni) std::fill(p16 + BM * TN, p16 + BMv * TN, uint16_t(0));
    if (vp == Product::F32) std::fill(pf + BM * TN, pf + BMv * TN, 0.f);
    if (vp == Product::Vnni) {
      // Pair rows padded_stride apart, as the widened tiles' rows (rows.h): with rows a
      // multiple of 1 KiB apart the bulk bf16 call (B = 64, D = 2048, EPYC Zen 4) took 1.14x
      // the time (D = 1024: 1.09x, D = 256: no difference; in-process A/B, the same bits).
      const int64_t ldp = padded_stride(Dv);
      vnni_rows(reinterpret_cast<const uint16_t*>(vr), ldvr, TN, Dv, ldp, grow(sc.vpack, TN * ldp));
      for (int64_t c0 = 0; c0 < Dv; c0 += kValueChunk)
        mk::gemm_vnni(dt, BMv, std::min(kValueChunk, Dv - c0), TN, TN, ldp, Dv, true, p16, sc.vpack.data() + 2 * c0,
                      o + c0);
    } else if (vp == Product::F32) {
      const float* vf32 = reinterpret_cast<const float*>(vr);
      int64_t ldv = ldvr;
      if (values_are_memory) {
        vf32 = xf, ldv = ldf;
      } else if (dt != DType::F32) {
        vf32 = float_rows(dt, vr, ldvr, TN, Dv, sc.vf_, ldv);
      }
      for (int64_t c0 = 0; c0 < Dv; c0 += kValueChunk)
        mk::gemm_f32(BMv, std::min(kValueChunk, Dv - c0), TN, TN, ldv, Dv, true, pf, vf32 + c0, o + c0);
    } else {
      // The next value tile towards L2, spread over this pass, as make_plan chose
      // (Plan::values_fetch_next).  (From the rows as stored: vr may be the copy an odd depth made.)
      const char* stored = values_are_memory ? mem : val;
      const int64_t stride = values_are_memory ? p.memory_row_stride : p.values_row_stride;
      const ValueFetch order = plan.values_fetch_next;
      const char* vnext = order == ValueFetch::None ? nullptr
                          : r0 + 2 * BN <= n_end    ? stored + es * size_t((r0 + BN) * stride)
                          : r0 + BN >= n_end        ? after_v
                                                    : nullptr;
      if (vp == Product::Bf16Pairs)
        HEN_PAIR_PRODUCT(pair_values(p16, TN, BM, vr, int64_t(es) * ldvr, TN, Dv, o, vnext, order));
      else
        by_dtype(dt, [&](auto DT) { hand_values<DT()>(pf, TN, BM, vr, int64_t(es) * ldvr, TN, Dv, o, vnext, order); });
    }
  }
  if (sp == Product::Vnni || vp == Product::Vnni) mk::release_vnni();

  // Leave the result: final when the bank is not split, else unnormalised for combine().
  for (int64_t i = 0; i < BM; ++i) {
    const int64_t row = l * p.B + b0 + i;
    const float* a = o + i * Dv;
    const float s = lsum[i];  // NaN once any weight was (see column_scores), as lsum * rescale + sum keeps it
    // O normalised by the sum of the weights it was made of (WeightSums); lse and the
    // split's own sum stay exact.
    const float stored = lstored[i];
    if (plan.splits == 1) {
      const float inv = std::isnan(s) ? NAN : stored > 0.f ? 1.f / stored : 0.f;
      float* out = p.out + row * Dv;
      uint32_t bad = 0;
      for (int64_t d = 0; d < Dv; ++d) {
        out[d] = a[d] * inv;
        bad |= non_finite(out[d]);
      }
      p.lse[row] = bad || std::isnan(s) ? NAN : s > 0.f ? m[i] + std::log(s) : kNegInf;
      p.top_score[row] = top[i];
      p.top_index[row] = top_index[i];
    } else {
      const int64_t slot = (l * plan.splits + split) * p.B + b0 + i;
      float* acc = ws.acc + slot * Dv;
      uint32_t bad = 0;
      if (stored > 0.f && stored != s) {  // combine() divides by the exact sums
        const float to_exact = s / stored;
        for (int64_t d = 0; d < Dv; ++d) {
          acc[d] = a[d] * to_exact;
          bad |= non_finite(acc[d]);
        }
      } else {
        for (int64_t d = 0; d < Dv; ++d) {
          acc[d] = a[d];
          bad |= non_finite(acc[d]);
        }
      }
      ws.max[slot] = m[i];
      // A split whose rows all scored -inf is skipped by combine(), its accumulator with it: a NaN sum
      // makes the query's lse NaN there too (non_finite), as a bank holding inf does in one pass.
      ws.sum[slot] = bad ? NAN : s;
      ws.top_score[slot] = top[i];
      ws.top_index[slot] = top_index[i];
    }
  }
}

}  // namespace HEN_ISA_NS
}  // namespace hen

#include "cpu/isa_end.h"
