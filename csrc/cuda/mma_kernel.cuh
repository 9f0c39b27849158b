// mma_kernel: the tensor-core kernel of the layer regime (docs/design.md §2:
// B and N large, D <= 256, bound by tensor cores), also serving recall with
// tens of queries at D <= 256.
//
// FlashAttention-2 style: a block of 4 warps owns 64 queries; bank tiles of 64
// (32 for D > 128) rows stream through shared memory with cp.async double
// buffering; S = Q K^T and O += P V both run on mma.sync m16n8k16 (fp16 or bf16
// inputs, fp32 accumulation), and one shared-memory tile serves as both keys
// and values when values are the memory.  mma.sync runs on sm_80 and sm_90;
// Hopper's wgmma and TMA would raise the sm_90 ceiling and are the next step
// once this kernel is measured against a GPU (they change the shared-memory
// layout and need a warpgroup-wide pipeline, which nothing on a machine without
// a GPU can check).
//
// l2 forms (docs/design.md §5.1): d2 = |q|^2 + |x|^2 - 2 q.x from the tensor-core
// product; a pair where that may have cancelled is recomputed directly from the
// shared-memory tile by its own lane (rare: a query on a stored row).  Weights
// (an instance of their own): the score product takes w∘q, and for the l2 forms
// <w, x∘x> is a second product of the weights with the squared bank tile, from
// the same ldmatrix fragments; both in hi + lo 16-bit halves (below).
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/primitives.cuh"

namespace hen {
namespace cuda_kernels {

constexpr int kMmaThreads = 128;  // 4 warps x 16 queries
constexpr int kMmaBlockQ = 64;

HEN_HOST_DEVICE constexpr int mma_block_rows(int hd) { return hd <= 128 ? 64 : 32; }
HEN_HOST_DEVICE constexpr int mma_pitch(int hd) { return hd + 8; }  // +16 bytes: conflict-free ldmatrix rows
// The blocks per SM each instance's registers allow (the machine-code report: ~240 registers at head
// dims 128 and 256, 150-170 at 64 and weighted 32, 120-128 unweighted at 32), given to ptxas as its
// target: left to itself, it held the f16 d = 64 instance to 128 registers on sm_90 for a fourth block
// and spilled 24 B there.
HEN_HOST_DEVICE constexpr int mma_min_blocks(int hd, bool weighted) { return hd >= 128 ? 2 : hd == 32 && !weighted ? 4 : 3; }
// Query-side tiles: the query; with weights, the hi and lo halves of w∘q and,
// for the l2 forms, of w.
HEN_HOST_DEVICE constexpr int mma_query_tiles(bool weighted, bool l2) { return weighted ? (l2 ? 4 : 2) : 1; }
// Shared memory of mma_kernel in bytes: the query-side tiles, two K stages, two
// V stages (unless values are the memory), the bank rows' and queries' squared
// norms and the queries' weight scales.
HEN_HOST_DEVICE constexpr int64_t mma_smem_bytes(int hd, bool same, bool weighted, bool l2) {
  const int64_t q = static_cast<int64_t>(mma_query_tiles(weighted, l2)) * kMmaBlockQ * mma_pitch(hd) * 2;
  const int64_t kv = 2LL * mma_block_rows(hd) * mma_pitch(hd) * 2;
  return q + kv * (same ? 1 : 2) + 2LL * mma_block_rows(hd) * 4 + 2LL * kMmaBlockQ * 4;
}

// rows x HD tile of 16-bit elements into shared memory (row pitch PITCH),
// zero past rows_valid and past cols; cp.async when `vec`, else element-wise.
template <int ROWS, int HD>
HEN_DEVICE void load_tile(uint16_t* dst, const uint16_t* src, int64_t row_stride, int64_t rows_valid, int64_t cols,
                          bool vec) {
  constexpr int kChunks = HD / 8;  // 16-byte chunks per row
  constexpr int kPitch = mma_pitch(HD);
  for (int i = thread_index(); i < ROWS * kChunks; i += kMmaThreads) {
    const int r = i / kChunks, c = i % kChunks;
    const int64_t col = static_cast<int64_t>(c) * 8;
    uint16_t* d = dst + r * kPitch + col;
    const bool row_ok = r < rows_valid;
    if (vec) {
      // With vec, cols is a multiple of 8: a chunk is wholly inside or outside.
      const bool ok = row_ok && col < cols;
      cp_async_16(d, ok ? src + r * row_stride + col : src, ok);
    } else {
      Chunk ch = zero_chunk();
      if (row_ok) {
        const uint16_t* s = src + r * row_stride;
        for (int e = 0; e < 8; ++e)
          if (col + e < cols) set_elem<Elem<DType::BF16>>(ch, e, s[col + e]);
      }
      HEN_CHECK_SMEM16(d);
      *reinterpret_cast<Chunk*>(d) = ch;
    }
  }
}

// Squared norms of `rows` rows of a tile: kMmaThreads / rows threads per row.
template <class E, int ROWS, int HD>
HEN_DEVICE void tile_norms(const uint16_t* tile, float* norms) {
  constexpr int kPer = kMmaThreads / ROWS;  // 2 or 4: adjacent lanes of one warp
  constexpr int kPitch = mma_pitch(HD);
  const int tid = thread_index(), r = tid / kPer, part = tid % kPer;
  float s = 0.f;
  for (int k = part; k < HD; k += kPer) {
    const float v = E::to_float(static_cast<typename E::raw>(tile[r * kPitch + k]));
    s += v * v;
  }
  for (int off = kPer / 2; off >= 1; off >>= 1) s += shfl_xor(s, off);
  if (part == 0) norms[r] = s;
}

// Two floats as two 16-bit values in one register (the first in the low half), and back.
template <bool BF16>
HEN_DEVICE uint32_t pack2(float lo, float hi) {
  if constexpr (BF16) {
    return pack_bf16x2(lo, hi);
  } else {
    return pack_f16x2(lo, hi);
  }
}
template <bool BF16>
HEN_DEVICE float unpack(uint32_t w, int half) {
  const uint16_t b = static_cast<uint16_t>(half ? w >> 16 : w & 0xffffu);
  if constexpr (BF16) {
    return bits_to_float(static_cast<uint32_t>(b) << 16);
  } else {
    return half_bits_to_float(b);
  }
}
// w as the 16-bit P of the value product holds it.
template <bool BF16>
HEN_DEVICE float as_stored(float w) {
  return unpack<BF16>(pack2<BF16>(w, 0.f), 0);
}
// a and b as hi + lo, each half in the 16-bit type: together about 16 (bf16) or
// 22 (f16) significant bits, where one rounding keeps 8 or 11.
template <bool BF16>
HEN_DEVICE void split2(float a, float b, uint32_t& hi, uint32_t& lo) {
  hi = pack2<BF16>(a, b);
  lo = pack2<BF16>(a - unpack<BF16>(hi, 0), b - unpack<BF16>(hi, 1));
}

// The query-side tiles of a weighted block.  Tile 0 holds the raw queries on
// entry.  Per query row r, with s_r = max_d w_d (1 when every weight is 0):
// tiles 0 and 1 become the hi and lo halves (input type) of w∘q / s_r; for the
// l2 forms tiles 2 and 3 the hi and lo halves (bf16, whose range holds any
// square) of w / s_r, and qn[r] = sum_d w_d q_d^2.  Dividing by s_r keeps f16 in
// range; the split keeps the weighted products within the dtype's tolerance,
// where one 16-bit rounding of w∘q, w and x∘x would not.
template <class E, int HD>
HEN_DEVICE void weighted_query_tiles(uint16_t* tiles, const float* wbase, int64_t D, int64_t nq, bool l2, float* qn,
                                     float* scale) {
  constexpr bool kBF16 = std::is_same<E, Elem<DType::BF16>>::value;
  constexpr int kPitch = mma_pitch(HD), kHalf = HD / 16;  // 16-byte chunks per thread: two threads per row
  constexpr int64_t kTile = static_cast<int64_t>(kMmaBlockQ) * kPitch;
  static_assert(kMmaThreads == 2 * kMmaBlockQ, "two threads per query row");
  const int tid = thread_index(), r = tid / 2, part = tid % 2;
  const float* wrow = r < nq ? wbase + r * D : nullptr;
  float mx = 0.f;
  for (int c = part * kHalf; c < (part + 1) * kHalf; ++c)
    for (int e = 0; e < 8; ++e)
      if (wrow != nullptr && c * 8 + e < D) mx = max_f(mx, wrow[c * 8 + e]);
  mx = max_f(mx, shfl_xor(mx, 1));
  const float sr = mx > 0.f ? mx : 1.f;
  float n = 0.f;
  uint16_t* row = tiles + r * kPitch;
  for (int c = part * kHalf; c < (part + 1) * kHalf; ++c) {
    const Chunk qc = *reinterpret_cast<const Chunk*>(row + c * 8);
    Chunk t[4];
    HEN_UNROLL
    for (int i = 0; i < 4; ++i) {
      float w[2], v[2];
      HEN_UNROLL
      for (int h = 0; h < 2; ++h) {
        const int64_t col = c * 8 + 2 * i + h;
        const float q = get_elem<E>(qc, 2 * i + h);
        w[h] = wrow != nullptr && col < D ? wrow[col] / sr : 0.f;
        v[h] = w[h] * q;
        n += w[h] * q * q;
      }
      split2<kBF16>(v[0], v[1], t[0].w[i], t[1].w[i]);
      split2<true>(w[0], w[1], t[2].w[i], t[3].w[i]);
    }
    HEN_UNROLL
    for (int k = 0; k < 4; ++k)
      if (k < 2 || l2) *reinterpret_cast<Chunk*>(row + k * kTile + c * 8) = t[k];
  }
  n += shfl_xor(n, 1);
  if (part == 0) qn[r] = n * sr, scale[r] = sr;
}

// sum_d w_d (q_d - x_d)^2 for one (query, bank row) pair, directly: exact where
// q and x are close, whatever their distance from the origin.  Unweighted, both
// rows from shared memory (zero past D); weighted, the query and weights from
// global memory.  The same operations in the same order for every pair.
template <class E, int HD, bool W>
HEN_DEVICE float direct_d2(const uint16_t* q_smem, const uint16_t* q_global, const float* wrow, const uint16_t* x_smem,
                           int64_t D) {
  float d = 0.f;
  if constexpr (!W) {
    HEN_NO_UNROLL  // a rare path: compact code, few registers
    for (int c = 0; c < HD / 8; ++c) {  // rows zero past D
      const Chunk qc = *reinterpret_cast<const Chunk*>(q_smem + c * 8);
      const Chunk xc = *reinterpret_cast<const Chunk*>(x_smem + c * 8);
      HEN_UNROLL
      for (int e = 0; e < 8; ++e) {
        const float diff = get_elem<E>(xc, e) - get_elem<E>(qc, e);
        d += diff * diff;
      }
    }
  } else {
    (void)q_smem;
    HEN_NO_UNROLL
    for (int64_t k = 0; k < D; ++k) {
      const float diff = E::to_float(static_cast<typename E::raw>(x_smem[k])) -
                         E::to_float(static_cast<typename E::raw>(q_global[k]));
      d += diff * wrow[k] * diff;
    }
  }
  return d;
}

template <DType DT, int HD, bool W>
HEN_GLOBAL void HEN_LAUNCH_BOUNDS_MIN(kMmaThreads, mma_min_blocks(HD, W))
    mma_kernel(const PartialParams p, const LaunchArgs a, const Workspace ws) {
  static_assert(DT != DType::F32, "tensor-core path is for 16-bit inputs");
  using E = Elem<DT>;
  constexpr bool kBF16 = DT == DType::BF16;
  constexpr int BM = kMmaBlockQ, BN = mma_block_rows(HD), PITCH = mma_pitch(HD);
  constexpr int KSTEPS = HD / 16;  // k-steps of the score product
  constexpr int NB = BN / 8;       // n-blocks of a score tile
  constexpr int DB = HD / 8;       // n-blocks of the output
  constexpr bool kQInRegs = HD <= 128 && !W;
  static_assert(2 * NB <= 32, "one flag bit per score of a lane's row");

  const int tid = thread_index(), warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, tig = lane % 4;  // mma fragment coordinates
  const TileCoords tc = tile_coords(a);
  const int64_t l = tc.l, b0 = tc.qb * BM;
  const int64_t nq = min_i64(BM, p.B - b0);
  const int64_t n_begin = min_i64(p.N, tc.split * a.rows_per_split);
  const int64_t n_end = min_i64(p.N, n_begin + a.rows_per_split);
  const float beta = p.beta[l];
  const bool vec = a.vec != 0, same = a.same != 0, need_norm = a.need_norm != 0;
  const uint16_t* qbase = static_cast<const uint16_t*>(p.query) + l * p.query_lead_stride + b0 * p.query_row_stride;
  const uint16_t* xbase = static_cast<const uint16_t*>(p.memory) + l * p.memory_lead_stride;
  const uint16_t* vbase = static_cast<const uint16_t*>(p.values) + l * p.values_lead_stride;
  [[maybe_unused]] const float* wbase = W ? p.weights + (l * p.B + b0) * p.D : nullptr;

  constexpr int64_t kTile = static_cast<int64_t>(BM) * PITCH;
  const int qtiles = mma_query_tiles(W, need_norm);
  uint16_t* Qs = reinterpret_cast<uint16_t*>(dynamic_smem());  // [qtiles][BM][PITCH]
  uint16_t* Ks = Qs + qtiles * kTile;                           // [2][BN][PITCH]
  uint16_t* Vs = same ? Ks : Ks + 2 * BN * PITCH;               // [2][BN][PITCH]
  float* xn = reinterpret_cast<float*>(Ks + (same ? 2 : 4) * BN * PITCH);  // [2][BN]
  float* qn_s = xn + 2 * BN;                                             // [BM]
  [[maybe_unused]] float* scale_s = qn_s + BM;                           // [BM]

  auto load_bank_tile = [&](int stage, int64_t t0) {
    const int64_t rows = n_end - t0;
    load_tile<BN, HD>(Ks + stage * BN * PITCH, xbase + t0 * p.memory_row_stride, p.memory_row_stride, rows, p.D, vec);
    if (!same)
      load_tile<BN, HD>(Vs + stage * BN * PITCH, vbase + t0 * p.values_row_stride, p.values_row_stride, rows, p.Dv,
                        vec);
  };

  // Prologue: the query tile(s) and norms, then the first bank tile in flight.
  load_tile<BM, HD>(Qs, qbase, p.query_row_stride, nq, p.D, vec);
  cp_async_commit();
  cp_async_wait_all();
  sync_block();
  if constexpr (W) {
    weighted_query_tiles<E, HD>(Qs, wbase, p.D, nq, need_norm, qn_s, scale_s);
  } else {
    if (need_norm) tile_norms<E, BM, HD>(Qs, qn_s);
  }
  const int64_t ntiles = (n_end - n_begin + BN - 1) / BN;
  if (ntiles > 0) load_bank_tile(0, n_begin);
  cp_async_commit();
  sync_block();

  const int qrow = warp * 16;  // this warp's first query in the block
  uint32_t qf[kQInRegs ? KSTEPS : 1][4];
  if constexpr (kQInRegs) {
    HEN_UNROLL
    for (int ks = 0; ks < KSTEPS; ++ks)
      ldmatrix_x4(qf[ks], Qs + (qrow + (lane % 16)) * PITCH + ks * 16 + (lane / 16) * 8);
  }
  const bool norms_kept = need_norm;  // qn_s written for the l2 forms only
  const float qn0 = norms_kept ? qn_s[qrow + g] : 0.f, qn1 = norms_kept ? qn_s[qrow + g + 8] : 0.f;
  [[maybe_unused]] float sc[2] = {1.f, 1.f};
  if constexpr (W) sc[0] = scale_s[qrow + g], sc[1] = scale_s[qrow + g + 8];

  // Rows g and g + 8 of the warp's 16: running max, this lane's part of the sum, top.
  float m[2] = {neg_inf(), neg_inf()}, lsum[2] = {0.f, 0.f}, ts[2] = {neg_inf(), neg_inf()};
  // The sum of the weights as the value product's 16-bit P holds them: the output is normalised by
  // it, so that it stays a convex combination of the value rows wherever they sit (docs/design.md
  // §5.1); lse and the splits' weights keep the exact lsum.
  float lstored[2] = {0.f, 0.f};
  int64_t ti[2] = {-1, -1};
  float o[DB][4];
  HEN_UNROLL
  for (int db = 0; db < DB; ++db) o[db][0] = o[db][1] = o[db][2] = o[db][3] = 0.f;

  for (int64_t t = 0; t < ntiles; ++t) {
    const int stage = static_cast<int>(t & 1);
    const int64_t t0 = n_begin + t * BN;
    cp_async_wait_all();
    sync_block();  // tile t is in place; every warp is done with tile t - 1
    if (t + 1 < ntiles) load_bank_tile(stage ^ 1, t0 + BN);
    cp_async_commit();
    const uint16_t* Kt = Ks + stage * BN * PITCH;
    const uint16_t* Vt = Vs + stage * BN * PITCH;
    const float* xnt = xn + stage * BN;
    const int valid = static_cast<int>(min_i64(BN, n_end - t0));  // bank rows in this tile
    if (!W && need_norm) {
      tile_norms<E, BN, HD>(Kt, xn + stage * BN);
      sync_block();
    }

    // S = Q K^T for the warp's 16 queries x BN bank rows (weighted: (w∘q) K^T in
    // s, and for the l2 forms w (K∘K)^T in s2, both scaled by 1 / s_r).
    float s[NB][4];
    [[maybe_unused]] float s2[W ? NB : 1][4];
    HEN_UNROLL
    for (int nb = 0; nb < NB; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.f;
    if constexpr (W) {
      HEN_UNROLL
      for (int nb = 0; nb < NB; ++nb) s2[nb][0] = s2[nb][1] = s2[nb][2] = s2[nb][3] = 0.f;
    }
    HEN_UNROLL
    for (int ks = 0; ks < KSTEPS; ++ks) {
      const int a_off = (qrow + (lane % 16)) * PITCH + ks * 16 + (lane / 16) * 8;
      uint32_t af[4];
      [[maybe_unused]] uint32_t alo[4], wh[4], wl[4];
      if constexpr (kQInRegs) {
        HEN_UNROLL
        for (int i = 0; i < 4; ++i) af[i] = qf[ks][i];
      } else {
        ldmatrix_x4(af, Qs + a_off);
      }
      if constexpr (W) {
        ldmatrix_x4(alo, Qs + kTile + a_off);
        if (need_norm) {
          ldmatrix_x4(wh, Qs + 2 * kTile + a_off);
          ldmatrix_x4(wl, Qs + 3 * kTile + a_off);
        }
      }
      HEN_UNROLL
      for (int nn = 0; nn < BN; nn += 16) {
        uint32_t bf[4];  // K rows nn..nn+15 as two n8 blocks: {k 0-7, k 8-15} each
        ldmatrix_x4(bf, Kt + (nn + (lane & 7) + ((lane >> 4) << 3)) * PITCH + ks * 16 + ((lane >> 3) & 1) * 8);
        mma_16816<kBF16>(s[nn / 8], af, bf[0], bf[1]);
        mma_16816<kBF16>(s[nn / 8 + 1], af, bf[2], bf[3]);
        if constexpr (W) {
          mma_16816<kBF16>(s[nn / 8], alo, bf[0], bf[1]);
          mma_16816<kBF16>(s[nn / 8 + 1], alo, bf[2], bf[3]);
          if (need_norm) {
            // The fragment squared element by element is the fragment of K∘K.
            uint32_t x2h[4], x2l[4];
            HEN_UNROLL
            for (int i = 0; i < 4; ++i) {
              const float x0 = unpack<kBF16>(bf[i], 0), x1 = unpack<kBF16>(bf[i], 1);
              split2<true>(x0 * x0, x1 * x1, x2h[i], x2l[i]);
            }
            HEN_UNROLL
            for (int hb = 0; hb < 2; ++hb) {
              float(&acc)[4] = s2[nn / 8 + hb];
              mma_16816<true>(acc, wh, x2h[2 * hb], x2h[2 * hb + 1]);
              mma_16816<true>(acc, wh, x2l[2 * hb], x2l[2 * hb + 1]);
              mma_16816<true>(acc, wl, x2h[2 * hb], x2h[2 * hb + 1]);
            }
          }
        }
      }
    }

    // Scores, the running max and top per row, the weights (in s) and the rescale.
    HEN_UNROLL
    for (int h = 0; h < 2; ++h) {
      const float qn = h == 0 ? qn0 : qn1;
      const int row = qrow + g + 8 * h;  // in the block
      // Scores, and the tile's max (also its top: tcol, this lane's first column
      // reaching it).  An l2 pair whose expanded d2 may have cancelled is
      // recomputed directly below (rare: a query on or next to a stored row).
      uint32_t flags = 0;
      float tmax = neg_inf();
      int tcol = -1;
      HEN_UNROLL
      for (int nb = 0; nb < NB; ++nb) {
        HEN_UNROLL
        for (int e = 0; e < 2; ++e) {
          const int col = nb * 8 + 2 * tig + e;
          const bool in = col < valid;
          float v;
          if (need_norm) {
            float S, dot;
            if constexpr (W) {
              S = qn + sc[h] * s2[nb][2 * h + e];
              dot = sc[h] * s[nb][2 * h + e];
            } else {
              S = qn + xnt[col];
              dot = s[nb][2 * h + e];
            }
            const float d2 = S - 2.f * dot;
            if (in && cancelled(d2, S)) flags |= 1u << (2 * nb + e);
            v = score_from_d2(p.similarity, beta, d2);
          } else {
            v = beta * (W ? sc[h] * s[nb][2 * h + e] : s[nb][2 * h + e]);
          }
          v = in ? v : neg_inf();
          s[nb][2 * h + e] = v;
          if (v > tmax) tmax = v, tcol = col;  // this lane's columns ascend: the first of equals stays
        }
      }
      if (flags != 0) {
        if (row < nq) {
          const uint16_t* qg = qbase + row * p.query_row_stride;
          const float* wrow = W ? wbase + row * p.D : nullptr;
          for (uint32_t f = flags; f != 0; f &= f - 1) {
            const int i = first_set(f);
            const int col = (i >> 1) * 8 + 2 * tig + (i & 1);
            const float v = score_from_d2(p.similarity, beta,
                                          direct_d2<E, HD, W>(Qs + row * PITCH, qg, wrow, Kt + col * PITCH, p.D));
            HEN_UNROLL
            for (int k = 0; k < 2 * NB; ++k)
              if (k == i) s[k >> 1][2 * h + (k & 1)] = v;
          }
        }
        tmax = neg_inf(), tcol = -1;
        HEN_UNROLL
        for (int nb = 0; nb < NB; ++nb) {
          HEN_UNROLL
          for (int e = 0; e < 2; ++e)
            if (s[nb][2 * h + e] > tmax) tmax = s[nb][2 * h + e], tcol = nb * 8 + 2 * tig + e;
        }
      }
      if (tmax > ts[h]) ts[h] = tmax, ti[h] = p.offset + t0 + tcol;  // earlier tiles win ties
      tmax = max_f(tmax, shfl_xor(tmax, 1));  // the quad shares the row
      tmax = max_f(tmax, shfl_xor(tmax, 2));
      const float m_new = max_f(m[h], tmax);
      const float mu = origin(m_new);
      const float scale = exp_f(m[h] - mu);
      m[h] = m_new;
      lsum[h] *= scale;
      lstored[h] *= scale;
      HEN_UNROLL
      for (int db = 0; db < DB; ++db) o[db][2 * h] *= scale, o[db][2 * h + 1] *= scale;
      HEN_UNROLL
      for (int nb = 0; nb < NB; ++nb) {
        HEN_UNROLL
        for (int e = 0; e < 2; ++e) {
          const float w = exp_f(s[nb][2 * h + e] - mu);
          s[nb][2 * h + e] = w;
          lsum[h] += w;
          lstored[h] += as_stored<kBF16>(w);
        }
      }
    }

    // O += P V: the score accumulators are the A fragments of P (k = bank rows).
    HEN_UNROLL
    for (int j = 0; j < BN / 16; ++j) {
      uint32_t pa[4];
      if constexpr (kBF16) {
        pa[0] = pack_bf16x2(s[2 * j][0], s[2 * j][1]);
        pa[1] = pack_bf16x2(s[2 * j][2], s[2 * j][3]);
        pa[2] = pack_bf16x2(s[2 * j + 1][0], s[2 * j + 1][1]);
        pa[3] = pack_bf16x2(s[2 * j + 1][2], s[2 * j + 1][3]);
      } else {
        pa[0] = pack_f16x2(s[2 * j][0], s[2 * j][1]);
        pa[1] = pack_f16x2(s[2 * j][2], s[2 * j][3]);
        pa[2] = pack_f16x2(s[2 * j + 1][0], s[2 * j + 1][1]);
        pa[3] = pack_f16x2(s[2 * j + 1][2], s[2 * j + 1][3]);
      }
      HEN_UNROLL
      for (int db = 0; db < DB; db += 2) {
        uint32_t vb[4];  // V rows 16j..16j+15, columns of output blocks db and db+1, transposed
        ldmatrix_x4_trans(vb, Vt + (j * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * PITCH + db * 8 + (lane >> 4) * 8);
        mma_16816<kBF16>(o[db], pa, vb[0], vb[1]);
        mma_16816<kBF16>(o[db + 1], pa, vb[2], vb[3]);
      }
    }
  }

  // The quad's partial sums and tops, then the stores.
  HEN_UNROLL
  for (int h = 0; h < 2; ++h) {
    HEN_UNROLL
    for (int off = 1; off <= 2; off <<= 1) {
      lsum[h] += shfl_xor(lsum[h], off);
      lstored[h] += shfl_xor(lstored[h], off);
      const float ots = shfl_xor(ts[h], off);
      const int64_t oti = shfl_xor(ti[h], off);
      if (better(ots, oti, ts[h], ti[h])) ts[h] = ots, ti[h] = oti;
    }
  }
  HEN_UNROLL
  for (int h = 0; h < 2; ++h) {
    const int64_t q = qrow + g + 8 * h;
    if (q >= nq) continue;
    const int64_t b = b0 + q;
    float* dst;
    float mult;
    if (a.splits == 1) {
      dst = p.out + (l * p.B + b) * p.Dv;
      mult = is_nan(lsum[h]) ? quiet_nan() : inverse_sum(lstored[h]);
    } else {  // on the exact sum, which the combine divides by
      dst = ws.acc + ((l * a.splits + tc.split) * p.B + b) * p.Dv;
      mult = lstored[h] > 0.f ? lsum[h] / lstored[h] : 1.f;
    }
    HEN_UNROLL
    for (int db = 0; db < DB; ++db) {
      HEN_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int64_t col = db * 8 + 2 * tig + e;
        if (col < p.Dv) dst[col] = o[db][2 * h + e] * mult;
      }
    }
    if (tig == 0) store_stats(p, a, ws, l, tc.split, b, m[h], lsum[h], ts[h], ti[h]);
  }
}

// ---------------------------------------------------------------------------
// Instance table: mma.cu instantiates both dtypes.

template <DType DT, bool W>
KernelFn mma_by_dim(int hd) {
  switch (hd) {
    case 32: return &mma_kernel<DT, 32, W>;
    case 64: return &mma_kernel<DT, 64, W>;
    case 128: return &mma_kernel<DT, 128, W>;
    case 256: return &mma_kernel<DT, 256, W>;
    default: return nullptr;
  }
}

template <DType DT>
KernelFn mma_table(int hd, bool weighted) {
  return weighted ? mma_by_dim<DT, true>(hd) : mma_by_dim<DT, false>(hd);
}

// Defined in mma.cu: the kernel for a head dim and weights or none, or nullptr.
KernelFn mma_f16(int hd, bool weighted);
KernelFn mma_bf16(int hd, bool weighted);

}  // namespace cuda_kernels
}  // namespace hen
