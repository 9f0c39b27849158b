// The tile products written by hand (Gemm::Hand): used where the platform's
// microkernels are absent (microkernel.h), and for few queries, where a
// microkernel would pad the queries to a whole vector and a 16-bit one would
// need the bank tile repacked.  They read the bank rows as stored (float32,
// bfloat16 or float16, widened in registers).  Included by tile_kernel.cpp inside
// its instruction-set namespace, after simd.h.
#pragma once

namespace {

template <DType DT>
inline vf lf(const char* row, int64_t k) {
  return load_as_float(DT, row, k);
}
template <DType DT>
inline float sf(const char* row, int64_t k) {
  return scalar_to_float(DT, row, k);
}

// --- bfloat16 pairs ---------------------------------------------------------------

// 2W bfloat16 elements k.. of a row as W 32-bit words: a bfloat16 is the top half of
// its float, so one shift and one mask widen the even and the odd elements (half the
// loads and shuffles of widening W at a time).  Sums over pairs keep this order.
inline void load_bf16_pairs(const char* row, int64_t k, vf& even, vf& odd) {
  vu u;
  std::memcpy(&u, row + 2 * k, sizeof u);
  const vu e = u << 16, o = u & 0xffff0000u;
  std::memcpy(&even, &e, sizeof even);
  std::memcpy(&odd, &o, sizeof odd);
}
template <size_t... k>
constexpr vi even_lanes(std::index_sequence<k...>) {
  return vi{int(2 * k)...};
}
template <size_t... k>
constexpr vi lanes_interleaved(int from, std::index_sequence<k...>) {
  return vi{int((k % 2 ? W : 0) + from + k / 2)...};
}
// (a, b) = 2W consecutive floats -> their even and odd elements, and back.
inline void deinterleave(vf a, vf b, vf& even, vf& odd) {
  constexpr vi ev = even_lanes(std::make_index_sequence<W>{});
  even = __builtin_shuffle(a, b, ev);
  odd = __builtin_shuffle(a, b, ev + 1);
}
inline void interleave(vf even, vf odd, vf& a, vf& b) {
  constexpr vi lo = lanes_interleaved(0, std::make_index_sequence<W>{});
  constexpr vi hi = lanes_interleaved(W / 2, std::make_index_sequence<W>{});
  a = __builtin_shuffle(even, odd, lo);
  b = __builtin_shuffle(even, odd, hi);
}
// Float rows (stride D) with each whole 2W block split into its even then its odd
// elements, the rest copied: the query operand of the bfloat16 pair products.
inline void split_pairs(const float* q, int64_t rows, int64_t D, float* out) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* r = q + i * D;
    float* o = out + i * D;
    int64_t k = 0;
    for (; k + 2 * W <= D; k += 2 * W) {
      vf e, od;
      deinterleave(load(r + k), load(r + k + W), e, od);
      store(o + k, e);
      store(o + k + W, od);
    }
    for (; k < D; ++k) o[k] = r[k];
  }
}

// --- reducing many accumulators at once ---------------------------------------------

// Folding pairs of vectors (each keeps the sum of its two halves, side by side with
// its partner's) reduces N accumulators in log2(W) steps; every accumulator goes
// through the same additions whatever its place, so equal rows get equal sums.
template <int N>
struct LaneMap {
  int acc[(N > W ? N : W)];  // final vectors, lane by lane: whose sum each lane holds
};
template <int N>
constexpr LaneMap<N> fold_map() {
  int lab[N][W] = {};
  for (int i = 0; i < N; ++i)
    for (int l = 0; l < W; ++l) lab[i][l] = i;
  int n = N;
  for (int h = W / 2; h >= 1; h /= 2) {
    const int m = n > 1 ? n / 2 : 1;
    int next[N][W] = {};
    for (int i = 0; i < m; ++i) {
      const int a = n > 1 ? 2 * i : 0, b = n > 1 ? 2 * i + 1 : 0;
      for (int k = 0; k < W; k += 2 * h)
        for (int t = 0; t < h; ++t) {
          next[i][k + t] = lab[a][k + t];
          next[i][k + h + t] = lab[b][k + t];
        }
    }
    for (int i = 0; i < m; ++i)
      for (int l = 0; l < W; ++l) lab[i][l] = next[i][l];
    n = m;
  }
  LaneMap<N> r{};
  for (int i = 0; i < n; ++i)
    for (int l = 0; l < W; ++l) r.acc[i * W + l] = lab[i][l];
  return r;
}
template <int h, size_t... k>
constexpr vi fold_lo(std::index_sequence<k...>) {
  return vi{int((k / h) % 2 == 0 ? (k / (2 * h)) * 2 * h + k % h : W + (k / (2 * h)) * 2 * h + k % h)...};
}
template <int h, size_t... k>
constexpr vi fold_hi(std::index_sequence<k...>) {
  return vi{int((k / h) % 2 == 0 ? (k / (2 * h)) * 2 * h + h + k % h : W + (k / (2 * h)) * 2 * h + h + k % h)...};
}
template <int h>
inline int fold_step(vf* v, int n) {
  constexpr vi lo = fold_lo<h>(std::make_index_sequence<W>{});
  constexpr vi hi = fold_hi<h>(std::make_index_sequence<W>{});
  const int m = n > 1 ? n / 2 : 1;
  for (int i = 0; i < m; ++i) {
    const vf a = v[n > 1 ? 2 * i : 0], b = v[n > 1 ? 2 * i + 1 : 0];
    v[i] = __builtin_shuffle(a, b, lo) + __builtin_shuffle(a, b, hi);
  }
  return m;
}

// The lane of final vector `block` that holds the sum of accumulator block * W + a, or -1.
template <int N>
constexpr int lane_of(int block, int a) {
  const LaneMap<N> m = fold_map<N>();
  for (int l = 0; l < W; ++l)
    if (m.acc[block * W + l] == block * W + a) return l;
  return -1;
}
// Whether final vector `block` holds a whole run of sums, min(N, W) of them from block * W on.
template <int N>
constexpr bool whole_run(int block) {
  for (int a = 0; a < (N < W ? N : W); ++a)
    if (lane_of<N>(block, a) < 0) return false;
  return true;
}
template <int N, size_t... a>
constexpr vi run_order(int block, std::index_sequence<a...>) {
  return vi{lane_of<N>(block, int(a) < N ? int(a) : 0)...};
}
// Final vector `block` into out: put in order and stored at once where it holds a whole
// run, else lane by lane.  At short depths the lane-by-lane stores cost as much as the
// products: one query against rows of 64 floats ran 5-10 % faster with the bank in cache,
// 0-3 % from memory (EPYC Zen 4, in-process A/B, the same bits).
template <int N, int block>
__attribute__((always_inline)) inline void store_sums(vf v, float* out) {
  static constexpr LaneMap<N> map = fold_map<N>();
  if constexpr (whole_run<N>(block)) {
    constexpr vi order = run_order<N>(block, std::make_index_sequence<W>{});
    const vf s = __builtin_shuffle(v, order);
    std::memcpy(out + block * W, &s, sizeof(float) * (N < W ? N : W));
  } else {
    for (int l = 0; l < W; ++l) out[map.acc[block * W + l]] = v[l];
  }
}
template <int N, size_t... i>
__attribute__((always_inline)) inline void store_all_sums(const vf* v, float* out, std::index_sequence<i...>) {
  (store_sums<N, int(i)>(v[i], out), ...);
}

// out[i] = the sum of the lanes of v[i], for i < N (v is overwritten).
template <int N>
inline void reduce_lanes(vf* v, float* out) {
  int n = N;
  if constexpr (W >= 16) n = fold_step<8>(v, n);
  if constexpr (W >= 8) n = fold_step<4>(v, n);
  n = fold_step<2>(v, n);
  n = fold_step<1>(v, n);
  store_all_sums<N>(v, out, std::make_index_sequence<(N > W ? N / W : 1)>{});
}

// --- scores ---------------------------------------------------------------------------

// Rows per register block for QI queries: QI x RJ accumulators, a power of two.
template <int QI>
constexpr int rows_per_block() {
  return W >= 16 ? (QI == 4 ? 4 : 8) : (QI == 4 ? 2 : QI == 2 ? 4 : 8);
}

// The end of a dot block: the depth from k on (past the block's own steps) W elements at
// a time, the last partial step a TailStep (a D that is no multiple of W costs one more
// vector step, not D mod W scalar ones), then the QI x RJ accumulators (and RJ norm
// accumulators) reduced.  q holds that depth in float at its place in each row
// (split_pairs leaves it there too).
template <DType DT, int QI, int RJ, bool kNorms>
inline void finish_dots(vf* acc, vf* nacc, const float* q, int64_t D, int64_t k, const char* x, int64_t ldx,
                        float* c, int64_t ldc, int64_t ldq, float* norms, int64_t ldn, const char* next) {
  constexpr int64_t es = DT == DType::F32 ? 4 : 2;
  constexpr int64_t line = 64 / (W * es) > 0 ? 64 / (W * es) : 1;  // k-steps per cache line
  auto step = [&](auto&& row, auto&& query) __attribute__((always_inline)) {
    vf xv[RJ];
    for (int b = 0; b < RJ; ++b) xv[b] = row(x + b * ldx);
    if constexpr (kNorms)
      for (int b = 0; b < RJ; ++b) nacc[b] += xv[b] * xv[b];
    for (int a = 0; a < QI; ++a) {
      vf qv = query(q + a * D);
#if defined(__x86_64__) || defined(__i386__)
      // Keep qv in a register: GCC would otherwise fold a fresh load into every
      // FMA, and the load ports, not the FMA units, would set the pace.
      if constexpr (RJ > 1) asm("" : "+v"(qv));
#endif
      for (int b = 0; b < RJ; ++b) acc[a * RJ + b] += qv * xv[b];
    }
  };
  for (; k + W <= D; k += W) {
    // The same rows of the next tile towards L2, one line per row every `line` steps:
    // walking many short rows at once, the hardware prefetchers fall behind.
    if (next && (k / W) % line == 0)
      for (int b = 0; b < RJ; ++b) __builtin_prefetch(next + b * ldx + k * es, 0, 2);
    step([&](const char* r) { return lf<DT>(r, k); }, [&](const float* r) { return load(r + k); });
  }
  if (k < D) {
    const TailStep t(D, k);
    // Both ends of the tail's span: without, rows of 15 floats (no whole step) and of 24 (a
    // line in three left) ran 2.9x and 1.45x slower (one query, EPYC Zen 5, ad-hoc).
    if (next)
      for (int b = 0; b < RJ; ++b) {
        __builtin_prefetch(next + b * ldx + t.at * es, 0, 2);
        __builtin_prefetch(next + b * ldx + D * es - 1, 0, 2);
      }
    step([&](const char* r) { return t.row(DT, r); }, [&](const float* r) { return t.floats(r); });
  }
  float sums[QI * RJ];
  reduce_lanes<QI * RJ>(acc, sums);
  for (int a = 0; a < QI; ++a)
    for (int b = 0; b < RJ; ++b) c[b * ldc + a * ldq] = sums[a * RJ + b];
  if constexpr (kNorms) {
    float n[RJ];
    reduce_lanes<RJ>(nacc, n);
    for (int b = 0; b < RJ; ++b) norms[b * ldn] = n[b];
  }
}

// C[b * ldc + a * ldq] = <q_a, x_b> over the whole depth D, for QI queries (float rows of
// q, stride D; for bfloat16 banks as split_pairs leaves them) and RJ bank rows of
// dtype DT (byte stride ldx).
// With kNorms, also norms[b * ldn] = |x_b|² from the same loads (the ℓ2 forms), reduced
// the way row_norms reduces them.
template <DType DT, int QI, int RJ, bool kNorms>
inline void dot_block(const float* q, int64_t D, const char* x, int64_t ldx, float* c, int64_t ldc, int64_t ldq,
                      const char* next, float* norms, int64_t ldn) {
  constexpr int64_t es = DT == DType::F32 ? 4 : 2;
  vf acc[QI * RJ];
  vf nacc[RJ];
  // Unrolled, so that GCC keeps the accumulators in registers rather than memset them on the stack.
#pragma GCC unroll 64
  for (int i = 0; i < QI * RJ; ++i) acc[i] = vf{};
#pragma GCC unroll 64
  for (int b = 0; b < RJ; ++b) nacc[b] = vf{};
  int64_t k = 0;
  if constexpr (DT == DType::BF16) {  // q split by split_pairs
    constexpr int64_t pline = 64 / (4 * W) > 0 ? 64 / (4 * W) : 1;
    for (; k + 2 * W <= D; k += 2 * W) {
      if (next && (k / (2 * W)) % pline == 0)
        for (int b = 0; b < RJ; ++b) __builtin_prefetch(next + b * ldx + k * es, 0, 2);
      vf xe[RJ], xo[RJ];
      for (int b = 0; b < RJ; ++b) load_bf16_pairs(x + b * ldx, k, xe[b], xo[b]);
      if constexpr (kNorms)
        for (int b = 0; b < RJ; ++b) nacc[b] += xe[b] * xe[b] + xo[b] * xo[b];
      for (int a = 0; a < QI; ++a) {
        vf qe = load(q + a * D + k), qo = load(q + a * D + k + W);
#if defined(__x86_64__) || defined(__i386__)
        if constexpr (RJ > 1) asm("" : "+v"(qe), "+v"(qo));
#endif
        for (int b = 0; b < RJ; ++b) acc[a * RJ + b] += qe * xe[b] + qo * xo[b];
      }
    }
  }
  finish_dots<DT, QI, RJ, kNorms>(acc, nacc, q, D, k, x, ldx, c, ldc, ldq, norms, ldn, next);  // W-steps, the tail
}

template <DType DT, int QI>
void dot_rows(const float* q, int64_t D, const char* x, int64_t ldx, int64_t rows, float* c, int64_t ldc,
              int64_t ldq, const char* next, float* norms) {
  constexpr int RJ = rows_per_block<QI>();
  // A block's RJ rows are `lane` rows apart, not neighbours: the tile is read as RJ
  // streams, each through its own pages, and more of it is in flight at once.
  const int64_t lane = rows / RJ;
  for (int64_t j = 0; j < lane; ++j) {
    const char* nx = next ? next + j * ldx : nullptr;
    if (norms)
      dot_block<DT, QI, RJ, true>(q, D, x + j * ldx, lane * ldx, c + j * ldc, lane * ldc, ldq, nx, norms + j, lane);
    else
      dot_block<DT, QI, RJ, false>(q, D, x + j * ldx, lane * ldx, c + j * ldc, lane * ldc, ldq, nx, nullptr, 0);
  }
}

// C[j * ldc + i * ldq] = <q_i, x_j> for `rows` bank rows (a multiple of 8: a whole tile, so no
// row is reduced another way) and Q queries (float rows, stride D; split_pairs'
// layout for a bfloat16 bank, made once per query block by the caller): rows x queries
// (ldq 1) or queries x rows (ldc 1); `next`: the following tile (same layout) to
// prefetch, or null; `norms`: where to leave |x_j|², or null.
template <DType DT>
void hand_scores(const float* q, int64_t Q, int64_t D, const char* x, int64_t ldx, int64_t rows, float* c,
                 int64_t ldc, int64_t ldq, const char* next = nullptr, float* norms = nullptr) {
  int64_t i = 0;
  // Only the first query group prefetches and takes the norms: the others find the tile in cache.
  auto first = [&](auto p) { return i == 0 ? p : nullptr; };
  for (; i + 4 <= Q; i += 4)
    dot_rows<DT, 4>(q + i * D, D, x, ldx, rows, c + i * ldq, ldc, ldq, first(next), first(norms));
  for (; i + 2 <= Q; i += 2)
    dot_rows<DT, 2>(q + i * D, D, x, ldx, rows, c + i * ldq, ldc, ldq, first(next), first(norms));
  for (; i < Q; ++i) dot_rows<DT, 1>(q + i * D, D, x, ldx, rows, c + i * ldq, ldc, ldq, first(next), first(norms));
}

// --- scores with the rows in the lanes (short rows) --------------------------------------
//
// Over rows of a few vectors the dot products above spend more on reducing each query-row
// sum across a vector than on the sum itself.  lane_scores turns the tile first, W rows by W
// elements of depth per register transpose, so that a vector holds one element of W rows:
// a query's scores of those rows are then D broadcast FMAs, with no reduction, and they come
// out queries x rows.  Every row's sum is the same whatever its place: over each W elements
// of depth in order, those partial sums then added in order (one chain over D elements
// would leave errors growing with D, not with W + D / W: 1.3e-5 relative at D = 1030, ℓ2).

// C[a * ldq + j] for QI queries and RV vectors of rows from j on, from the turned tile xt
// (element k of row j at xt[k * rows + j]).
template <int QI, int RV>
inline void lane_block(const float* q, int64_t D, const float* xt, int64_t rows, int64_t j, float* c, int64_t ldq) {
  for (int64_t k0 = 0; k0 < D; k0 += W) {
    vf acc[QI][RV];
    for (int a = 0; a < QI; ++a)
      for (int r = 0; r < RV; ++r) acc[a][r] = vf{};
    for (int64_t k = k0; k < std::min<int64_t>(D, k0 + W); ++k) {
      vf xv[RV];
      for (int r = 0; r < RV; ++r) xv[r] = load(xt + k * rows + j + r * W);
      for (int a = 0; a < QI; ++a) {
        const vf qa = splat(q[a * D + k]);
        for (int r = 0; r < RV; ++r) acc[a][r] += qa * xv[r];
      }
    }
    for (int a = 0; a < QI; ++a)
      for (int r = 0; r < RV; ++r) {
        float* cj = c + a * ldq + j + r * W;
        store(cj, k0 == 0 ? acc[a][r] : load(cj) + acc[a][r]);
      }
  }
}

template <int QI>
void lane_rows(const float* q, int64_t D, const float* xt, int64_t rows, float* c, int64_t ldq) {
  constexpr int RV = QI >= 4 ? 2 : 4;  // QI x RV >= 8 independent FMA chains
  int64_t j = 0;
  for (; j + RV * W <= rows; j += RV * W) lane_block<QI, RV>(q, D, xt, rows, j, c, ldq);
  for (; j < rows; j += W) lane_block<QI, 1>(q, D, xt, rows, j, c, ldq);
}

// C[i * ldq + j] = <q_i, x_j> for `rows` bank rows (a multiple of W) of dtype DT (byte stride
// ldx) and Q queries (float rows, stride D); xt: room for D x rows floats, holding this tile
// turned already where `turned` (the same rows scored twice: keys = values in the backward);
// `next`: the following tile (same layout) to prefetch, or null; `norms`: where to leave
// |x_j|² (the same order of sums), or null.
template <DType DT>
void lane_scores(const float* q, int64_t Q, int64_t D, const char* x, int64_t ldx, int64_t rows, float* c,
                 int64_t ldq, float* xt, const char* next = nullptr, float* norms = nullptr, bool turned = false) {
  constexpr int64_t es = DT == DType::F32 ? 4 : 2;
  const int64_t bytes = D * es;
  for (int64_t j0 = 0; j0 < rows && !turned; j0 += W) {
    // The same W rows of the next tile towards L2, each line they touch once (one span where the rows
    // are contiguous): a bank streamed from memory ran 1.5x slower without (one bank of 2^20 rows of
    // 32 floats, 4 queries); a prefetch for each end of each W elements of each row cost 4-12 % on
    // banks held in cache.
    if (next) {
      auto lines = [](const char* from, const char* to) {  // the lines of bytes [from, to)
        const uintptr_t last = reinterpret_cast<uintptr_t>(to - 1) & ~uintptr_t(63);
        for (uintptr_t a = reinterpret_cast<uintptr_t>(from) & ~uintptr_t(63); a <= last; a += 64)
          __builtin_prefetch(reinterpret_cast<const char*>(a), 0, 2);
      };
      const char* first = next + j0 * ldx;
      if (ldx == bytes)
        lines(first, first + W * bytes);
      else
        for (int jj = 0; jj < W; ++jj) lines(first + jj * ldx, first + jj * ldx + bytes);
    }
    for (int64_t k0 = 0; k0 < D; k0 += W) {
      const int n = int(std::min<int64_t>(W, D - k0));
      // A last partial step of a row of W elements or more: the W elements ending at its end, whose last
      // n lanes are the ones wanted (a masked load costs more, and below AVX-512 a 16-bit one is a copy).
      const bool ending = n < W && D >= W;
      const int skip = ending ? W - n : 0;
      vf e[W];
      for (int jj = 0; jj < W; ++jj) {
        const char* r = x + (j0 + jj) * ldx;
        e[jj] = n == W || ending ? lf<DT>(r, k0 - skip) : load_as_float_first(DT, r, k0, n);
      }
      transpose(e);
      for (int kk = 0; kk < n; ++kk) store(xt + (k0 + kk) * rows + j0, e[skip + kk]);
    }
  }
  if (norms)
    for (int64_t j = 0; j < rows; j += W) {
      vf sum = vf{};
      for (int64_t k0 = 0; k0 < D; k0 += W) {
        vf acc = vf{};
        for (int64_t k = k0; k < std::min<int64_t>(D, k0 + W); ++k) {
          const vf v = load(xt + k * rows + j);
          acc += v * v;
        }
        sum = k0 == 0 ? acc : sum + acc;
      }
      store(norms + j, sum);
    }
  int64_t i = 0;
  for (; i + 4 <= Q; i += 4) lane_rows<4>(q + i * D, D, xt, rows, c + i * ldq, ldq);
  for (; i + 2 <= Q; i += 2) lane_rows<2>(q + i * D, D, xt, rows, c + i * ldq, ldq);
  for (; i < Q; ++i) lane_rows<1>(q + i * D, D, xt, rows, c + i * ldq, ldq);
}

// --- values ---------------------------------------------------------------------------

// The next tile of value rows towards L2, spread over the passes of a value product: each
// fetch(span) is one row's span in a pass.  ValueFetch::Stored: the tile's next lines in the
// order they are stored (row by row), whatever the pass reads; ByPass: the same span of the
// next tile's same row (make_plan says which where).  Where the value pass alone fetches the
// tile, eight bf16 queries after AMX's scores (rows of 64-2048, Xeon with AMX) ran 1.05-1.8x
// faster in stored order than by pass, whose requests scatter over the rows' pages.
class NextTileLines {
 public:
  NextTileLines(const char* tile, int64_t ld, int64_t rows, int64_t row_bytes, ValueFetch order)
      : tile_(tile), ld_(ld), rows_(tile && order != ValueFetch::None ? rows : 0), row_bytes_(row_bytes),
        order_(order) {}
  void fetch(int64_t span) {
    if (order_ == ValueFetch::ByPass) {
      if (row_ >= rows_) return;
      for (int64_t b = 0; b < span; b += 64) __builtin_prefetch(tile_ + row_ * ld_ + off_ + b, 0, 2);
      if (++row_ == rows_) row_ = 0, off_ += span;
      if (off_ >= row_bytes_) row_ = rows_;  // every pass done
      return;
    }
    for (; span > 0 && row_ < rows_; span -= 64) {
      __builtin_prefetch(tile_ + row_ * ld_ + off_, 0, 2);
      if ((off_ += 64) >= row_bytes_) off_ = 0, ++row_;
    }
  }

 private:
  const char* tile_;
  int64_t ld_, rows_, row_bytes_, row_ = 0, off_ = 0;
  ValueFetch order_;
};

// `rows` rows (a multiple of 8; `bytes` each, ldx apart) towards L2 in dot_rows' lane
// order: eight streams, each through its own pages.
inline void prefetch_tile(const char* x, int64_t ldx, int64_t rows, int64_t bytes) {
  const int64_t lane = rows / 8;
  for (int64_t j = 0; j < lane; ++j)
    for (int64_t off = 0; off < bytes; off += 64)
      for (int b = 0; b < 8; ++b) __builtin_prefetch(x + (j + b * lane) * ldx + off, 0, 2);
}

// Output vectors per pass for QI queries: enough independent FMA chains (QI x C >= 8)
// to cover the FMA latency, within the register file (32 vectors on AVX-512, 16 below;
// eight queries, bfloat16 on AVX-512 only: 16 accumulators and the widened row).
template <int QI>
constexpr int columns_per_pass() {
  return W >= 16 ? (QI == 8 ? 2 : QI == 4 ? 4 : 8) : (QI == 4 ? 2 : 4);
}

// One pass over the rows for NC vectors of columns of acc[i][:] += sum_j P[i][j] * v_j[:]
// (weight(i, j) = P[i][j] as a float; row(r, c) and the acc lambdas give vector c of the
// pass; prefetch(j) sends the pass's span of row j of the next tile towards L2).  Fewer
// than 8 accumulators would leave the FMA latency, not its throughput, to set the pace
// (one query and one vector: a 4-cycle chain a row), so RS sets of them take interleaved
// rows and are summed at the end.
template <int QI, int NC, typename Weight, typename LoadAcc, typename Row, typename StoreAcc, typename Prefetch>
__attribute__((always_inline)) inline void value_pass(Weight&& weight, const char* v, int64_t ldv, int64_t rows,
                                                      float* acc, int64_t ldacc, LoadAcc&& load_acc, Row&& row,
                                                      StoreAcc&& store_acc, Prefetch&& prefetch) {
  constexpr int RS = QI * NC >= 8 ? 1 : 8 / (QI * NC);
  vf a[RS][QI][NC];
#pragma GCC unroll 8
  for (int i = 0; i < QI; ++i)
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) {
      a[0][i][c] = load_acc(acc + i * ldacc, c);
#pragma GCC unroll 8
      for (int r = 1; r < RS; ++r) a[r][i][c] = vf{};  // (unrolled: else a memset of a stack copy)
    }
  auto add_row = [&](int r, int64_t j) __attribute__((always_inline)) {
    prefetch(j);
    vf vv[NC];
    for (int c = 0; c < NC; ++c) vv[c] = row(v + j * ldv, c);
    for (int i = 0; i < QI; ++i) {
      const vf w = splat(weight(i, j));
      for (int c = 0; c < NC; ++c) a[r][i][c] += w * vv[c];
    }
  };
  int64_t j = 0;
  for (; j + RS <= rows; j += RS)
    for (int r = 0; r < RS; ++r) add_row(r, j + r);
  for (; j < rows; ++j) add_row(0, j);
  for (int i = 0; i < QI; ++i)
    for (int c = 0; c < NC; ++c) {
      for (int r = 1; r < RS; ++r) a[0][i][c] += a[r][i][c];
      store_acc(acc + i * ldacc, c, a[0][i][c]);
    }
}

// Columns d .. Dv - 1 of acc[i][:] += sum_j P[i][j] * v_j[:] for QI queries and `rows`
// value rows of dtype DT: the whole vectors in passes of C = columns_per_pass<QI>(), then 4,
// 2 and 1, the last partial one a TailStep.  (Until 2026-12 what C did not cover went one
// vector a pass, a single FMA chain for one query: the op ran 1.1-1.7x slower with one to
// four queries on rows of 32-96 elements, EPYC Zen 5, one thread, six alternating runs.)
// `next`: the following tile of value rows, fetched by the C-wide passes
// only (the narrower ones ran 0-12 % slower with it on rows of 32-96 elements, keys =
// values or not: EPYC Zen 5, one thread, in-process A/B).
template <DType DT, int QI, typename Weight>
inline void value_columns(Weight&& weight, const char* v, int64_t ldv, int64_t rows, int64_t Dv, float* acc,
                          int64_t ldacc, int64_t d, NextTileLines* next) {
  constexpr int C = columns_per_pass<QI>();
  constexpr int64_t es = DT == DType::F32 ? 4 : 2;
  auto whole = [&](auto nc) __attribute__((always_inline)) {
    constexpr int NC = decltype(nc)::value;
    for (; d + NC * W <= Dv; d += NC * W)
      value_pass<QI, NC>(
          weight, v, ldv, rows, acc, ldacc, [&](const float* p, int c) { return load(p + d + c * W); },
          [&](const char* r, int c) { return lf<DT>(r, d + c * W); },
          [&](float* p, int c, vf x) { store(p + d + c * W, x); },
          [&](int64_t) {
            if (NC == C && next) next->fetch(es * NC * W);
          });
  };
  whole(std::integral_constant<int, C>{});
  if constexpr (C > 4) whole(std::integral_constant<int, 4>{});
  if constexpr (C > 2) whole(std::integral_constant<int, 2>{});
  whole(std::integral_constant<int, 1>{});
  if (d < Dv) {
    const TailStep t(Dv, d);
    value_pass<QI, 1>(weight, v, ldv, rows, acc, ldacc, [&](const float* p, int) { return t.load_acc(p); },
                      [&](const char* r, int) { return t.row(DT, r); },
                      [&](float* p, int, vf x) { t.store_acc(p, x); }, [](int64_t) {});
  }
}

// acc[i][:] += sum_j P[i][j] * v_j[:] for QI queries and `rows` value rows of dtype DT;
// `next`: the following tile of value rows to fetch, or null.
template <DType DT, int QI>
void accumulate_values(const float* p, int64_t ldp, const char* v, int64_t ldv, int64_t rows, int64_t Dv,
                       float* acc, int64_t ldacc, NextTileLines* next) {
  constexpr int C = columns_per_pass<QI>();
  int64_t d = 0;
  if constexpr (DT == DType::BF16) {  // the same sums over j, widened in pairs
    constexpr int H = C / 2;          // 2W-column blocks per pass
    for (; d + C * W <= Dv; d += C * W) {
      vf e[QI][H], od[QI][H];
      for (int i = 0; i < QI; ++i)
        for (int h = 0; h < H; ++h) {
          const float* a = acc + i * ldacc + d + 2 * h * W;
          deinterleave(load(a), load(a + W), e[i][h], od[i][h]);
        }
      for (int64_t j = 0; j < rows; ++j) {
        if (next) next->fetch(2 * C * W);
        vf ve[H], vo[H];
        for (int h = 0; h < H; ++h) load_bf16_pairs(v + j * ldv, d + 2 * h * W, ve[h], vo[h]);
        for (int i = 0; i < QI; ++i) {
          const vf w = splat(p[i * ldp + j]);
          for (int h = 0; h < H; ++h) {
            e[i][h] += w * ve[h];
            od[i][h] += w * vo[h];
          }
        }
      }
      for (int i = 0; i < QI; ++i)
        for (int h = 0; h < H; ++h) {
          float* a = acc + i * ldacc + d + 2 * h * W;
          vf lo, hi;
          interleave(e[i][h], od[i][h], lo, hi);
          store(a, lo);
          store(a + W, hi);
        }
    }
  }
  value_columns<DT, QI>([&](int i, int64_t j) { return p[i * ldp + j]; }, v, ldv, rows, Dv, acc, ldacc, d, next);
}

template <DType DT>
void hand_values(const float* p, int64_t ldp, int64_t Q, const char* v, int64_t ldv, int64_t rows, int64_t Dv,
                 float* acc, const char* next = nullptr, ValueFetch order = ValueFetch::ByPass) {
  NextTileLines lines(next, ldv, rows, DT == DType::F32 ? 4 * Dv : 2 * Dv, order);
  int64_t i = 0;
  auto first = [&](NextTileLines* p) { return i == 0 && next ? p : nullptr; };
  // bfloat16 rows widened once for eight queries, not once for each four: eight recall
  // queries (262144 x 512, Xeon with AMX; the fastest of 9 calls, 4 alternating rounds)
  // 38.8-43.6 ms against 44.1-62.1, the same bits.
  if constexpr (DT == DType::BF16 && W >= 16)
    for (; i + 8 <= Q; i += 8)
      accumulate_values<DT, 8>(p + i * ldp, ldp, v, ldv, rows, Dv, acc + i * Dv, Dv, first(&lines));
  for (; i + 4 <= Q; i += 4) accumulate_values<DT, 4>(p + i * ldp, ldp, v, ldv, rows, Dv, acc + i * Dv, Dv, first(&lines));
  for (; i + 2 <= Q; i += 2) accumulate_values<DT, 2>(p + i * ldp, ldp, v, ldv, rows, Dv, acc + i * Dv, Dv, first(&lines));
  for (; i < Q; ++i) accumulate_values<DT, 1>(p + i * ldp, ldp, v, ldv, rows, Dv, acc + i * Dv, Dv, first(&lines));
}

// --- bfloat16 on the pair dot product (Product::Bf16Pairs) ----------------------------
//
// AVX-512 BF16's vdpbf16ps adds to each float32 lane the two products of a pair of
// bfloat16 lanes (exact products, float32 sums): a bank row's 2W elements take one
// instruction per query, where widening takes two FMAs and two shifts; make_plan asks
// for these only where the CPU has them.
#if HEN_NATIVE_BF16
// Functions with the pair dot product: this copy's instruction set (cpu/isa_begin.h) and
// AVX-512 BF16, so that the compiler keeps the accumulators in registers (it would not
// around inline assembly).  Called, never inlined, from the rest of the copy.
#define HEN_BF16_PAIRS __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx512bf16")))
HEN_BF16_PAIRS __attribute__((always_inline)) inline void dot_pairs(vf& acc, vf a, vf b) {
  acc = vf(_mm512_dpbf16_ps(__m512(acc), (__m512bh)a, (__m512bh)b));
}
// The same with b one pair from memory, broadcast to every lane.
HEN_BF16_PAIRS __attribute__((always_inline)) inline void dot_pair_splat(vf& acc, vf a, const uint16_t* pair) {
  uint32_t bits;
  std::memcpy(&bits, pair, sizeof bits);
  acc = vf(_mm512_dpbf16_ps(__m512(acc), (__m512bh)a, (__m512bh)_mm512_set1_epi32(int(bits))));
}
inline vf load_raw(const void* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// dot_block's sums with the query and the rows in bfloat16 as stored: q16 the query rows
// (stride D), qf the same in float for the last D mod 2W elements.
template <int QI, int RJ, bool kNorms>
HEN_BF16_PAIRS void pair_block(const uint16_t* q16, const float* qf, int64_t D, const char* x, int64_t ldx, float* c,
                               int64_t ldc, int64_t ldq, const char* next, float* norms, int64_t ldn) {
  vf acc[QI * RJ];
  vf nacc[RJ];
#pragma GCC unroll 64
  for (int i = 0; i < QI * RJ; ++i) acc[i] = vf{};
#pragma GCC unroll 64
  for (int b = 0; b < RJ; ++b) nacc[b] = vf{};
  int64_t k = 0;
  for (; k + 2 * W <= D; k += 2 * W) {  // one cache line of each row per step
    if (next)
      for (int b = 0; b < RJ; ++b) __builtin_prefetch(next + b * ldx + 2 * k, 0, 2);
    vf xv[RJ];
    for (int b = 0; b < RJ; ++b) xv[b] = load_raw(x + b * ldx + 2 * k);
    if constexpr (kNorms)
      for (int b = 0; b < RJ; ++b) dot_pairs(nacc[b], xv[b], xv[b]);
    for (int a = 0; a < QI; ++a) {
      const vf qv = load_raw(q16 + a * D + k);
      for (int b = 0; b < RJ; ++b) dot_pairs(acc[a * RJ + b], qv, xv[b]);
    }
  }
  finish_dots<DType::BF16, QI, RJ, kNorms>(acc, nacc, qf, D, k, x, ldx, c, ldc, ldq, norms, ldn, next);
}

template <int QI>
void pair_rows(const uint16_t* q16, const float* qf, int64_t D, const char* x, int64_t ldx, int64_t rows, float* c,
               int64_t ldc, int64_t ldq, const char* next, float* norms) {
  constexpr int RJ = QI == 4 ? 4 : 8;  // QI x RJ accumulators and RJ rows within 32 registers
  const int64_t lane = rows / RJ;  // as dot_rows
  for (int64_t j = 0; j < lane; ++j) {
    const char* nx = next ? next + j * ldx : nullptr;
    if (norms)
      pair_block<QI, RJ, true>(q16, qf, D, x + j * ldx, lane * ldx, c + j * ldc, lane * ldc, ldq, nx, norms + j, lane);
    else
      pair_block<QI, RJ, false>(q16, qf, D, x + j * ldx, lane * ldx, c + j * ldc, lane * ldc, ldq, nx, nullptr, 0);
  }
}

// hand_scores for a bfloat16 bank on the pair dot product: q16 the bfloat16 query rows,
// qf the same in float (stride D both).
inline void pair_scores(const uint16_t* q16, const float* qf, int64_t Q, int64_t D, const char* x, int64_t ldx,
                        int64_t rows, float* c, int64_t ldc, int64_t ldq, const char* next = nullptr,
                        float* norms = nullptr) {
  int64_t i = 0;
  auto first = [&](auto p) { return i == 0 ? p : nullptr; };
  for (; i + 4 <= Q; i += 4)
    pair_rows<4>(q16 + i * D, qf + i * D, D, x, ldx, rows, c + i * ldq, ldc, ldq, first(next), first(norms));
  for (; i + 2 <= Q; i += 2)
    pair_rows<2>(q16 + i * D, qf + i * D, D, x, ldx, rows, c + i * ldq, ldc, ldq, first(next), first(norms));
  for (; i < Q; ++i)
    pair_rows<1>(q16 + i * D, qf + i * D, D, x, ldx, rows, c + i * ldq, ldc, ldq, first(next), first(norms));
}

// Two rows' 2W elements interleaved 16 bits at a time, within each 128-bit lane (one
// instruction each): lo holds columns 8L..8L+3 of lane L, hi 8L+4..8L+7.  The value
// accumulators are kept in that order across a tile and put back at its end.
template <bool kHi, size_t... k>
constexpr vi pair_columns(std::index_sequence<k...>) {  // lane k of lo / hi: its column
  return vi{int(8 * (k / 4) + (kHi ? 4 : 0) + k % 4)...};
}
template <size_t... k>
constexpr vi pair_columns_back(int from, std::index_sequence<k...>) {  // column from + k: its lane in (lo, hi)
  return vi{int(((from + k) % 8 < 4 ? 0 : W) + 4 * ((from + k) / 8) + (from + k) % 4)...};
}
inline void to_pair_order(vf a, vf b, vf& lo, vf& hi) {
  constexpr vi l = pair_columns<false>(std::make_index_sequence<W>{});
  constexpr vi h = pair_columns<true>(std::make_index_sequence<W>{});
  lo = __builtin_shuffle(a, b, l);
  hi = __builtin_shuffle(a, b, h);
}
inline void from_pair_order(vf lo, vf hi, vf& a, vf& b) {
  constexpr vi fa = pair_columns_back(0, std::make_index_sequence<W>{});
  constexpr vi fb = pair_columns_back(W, std::make_index_sequence<W>{});
  a = __builtin_shuffle(lo, hi, fa);
  b = __builtin_shuffle(lo, hi, fb);
}

// accumulate_values with P in bfloat16 (p16: queries x rows, stride ldp; `rows` even)
// on the pair dot product, H blocks of 2W columns per pass over the rows.
template <int QI, int H>
HEN_BF16_PAIRS int64_t pair_values_pass(const uint16_t* p, int64_t ldp, const char* v, int64_t ldv, int64_t rows, int64_t Dv,
                         float* acc, int64_t ldacc, NextTileLines* next, int64_t d) {
  for (; d + 2 * W * H <= Dv; d += 2 * W * H) {
    vf lo[QI][H], hi[QI][H];
    for (int i = 0; i < QI; ++i)
      for (int h = 0; h < H; ++h) {
        const float* a = acc + i * ldacc + d + 2 * h * W;
        to_pair_order(load(a), load(a + W), lo[i][h], hi[i][h]);
      }
    for (int64_t j = 0; j < rows; j += 2) {
      const char* r0 = v + j * ldv;
      const char* r1 = r0 + ldv;
      if (next) next->fetch(2 * (2 * W * H)), next->fetch(2 * (2 * W * H));  // rows j and j + 1
      vf vl[H], vh[H];
      for (int h = 0; h < H; ++h) {
        const __m512i a = _mm512_loadu_si512(r0 + 2 * (d + 2 * h * W));
        const __m512i b = _mm512_loadu_si512(r1 + 2 * (d + 2 * h * W));
        vl[h] = vf(_mm512_unpacklo_epi16(a, b));
        vh[h] = vf(_mm512_unpackhi_epi16(a, b));
      }
      for (int i = 0; i < QI; ++i)
        for (int h = 0; h < H; ++h) {
          dot_pair_splat(lo[i][h], vl[h], p + i * ldp + j);
          dot_pair_splat(hi[i][h], vh[h], p + i * ldp + j);
        }
    }
    for (int i = 0; i < QI; ++i)
      for (int h = 0; h < H; ++h) {
        float* a = acc + i * ldacc + d + 2 * h * W;
        vf x, y;
        from_pair_order(lo[i][h], hi[i][h], x, y);
        store(a, x);
        store(a + W, y);
      }
  }
  return d;
}

template <int QI>
void pair_accumulate_values(const uint16_t* p, int64_t ldp, const char* v, int64_t ldv, int64_t rows, int64_t Dv,
                            float* acc, int64_t ldacc, NextTileLines* next) {
  constexpr int H = QI == 4 ? 2 : 4;  // 2 x QI x H accumulators: >= 8 chains, within 32 registers
  int64_t d = pair_values_pass<QI, H>(p, ldp, v, ldv, rows, Dv, acc, ldacc, next, 0);
  d = pair_values_pass<QI, 1>(p, ldp, v, ldv, rows, Dv, acc, ldacc, next, d);
  // The last Dv mod 2W columns: the same products, widened (a bfloat16 weight is exact in float).
  const char* pb = reinterpret_cast<const char*>(p);
  value_columns<DType::BF16, QI>([&](int i, int64_t j) { return sf<DType::BF16>(pb + 2 * i * ldp, j); }, v, ldv,
                                 rows, Dv, acc, ldacc, d, next);
}

// hand_values for bfloat16 values and P on the pair dot product (`rows` even: whole tiles).
inline void pair_values(const uint16_t* p, int64_t ldp, int64_t Q, const char* v, int64_t ldv, int64_t rows,
                        int64_t Dv, float* acc, const char* next = nullptr,
                        ValueFetch order = ValueFetch::ByPass) {
  NextTileLines lines(next, ldv, rows, 2 * Dv, order);
  int64_t i = 0;
  auto first = [&](NextTileLines* p) { return i == 0 && next ? p : nullptr; };
  for (; i + 4 <= Q; i += 4) pair_accumulate_values<4>(p + i * ldp, ldp, v, ldv, rows, Dv, acc + i * Dv, Dv, first(&lines));
  for (; i + 2 <= Q; i += 2) pair_accumulate_values<2>(p + i * ldp, ldp, v, ldv, rows, Dv, acc + i * Dv, Dv, first(&lines));
  for (; i < Q; ++i) pair_accumulate_values<1>(p + i * ldp, ldp, v, ldv, rows, Dv, acc + i * Dv, Dv, first(&lines));
}
#endif  // HEN_NATIVE_BF16

// The three dtypes at run time.
template <typename F>
void by_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::F32: f(std::integral_constant<DType, DType::F32>{}); break;
    case DType::BF16: f(std::integral_constant<DType, DType::BF16>{}); break;
    default: f(std::integral_constant<DType, DType::F16>{}); break;
  }
}

}  // namespace
