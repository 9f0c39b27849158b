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
#pragma once

#include <cstdint>

#include "cuda/primitives.cuh"

namespace hen {
namespace cuda_kernels {

constexpr int kMmaThreads = 128;  // 4 warps x 16 queries
constexpr int kMmaBlockQ = 64;

HEN_HOST_DEVICE constexpr int mma_block_rows(int hd) { return hd <= 128 ? 64 : 32; }
HEN_HOST_DEVICE constexpr int mma_pitch(int hd) { return hd + 8; }  // +16 bytes: conflict-free ldmatrix rows
// Shared memory of mma_kernel in bytes: Q tile, two K stages, two V stages
// (unless values are the memory), the bank rows' and queries' squared norms.
HEN_HOST_DEVICE constexpr int64_t mma_smem_bytes(int hd, bool same) {
  const int64_t q = static_cast<int64_t>(kMmaBlockQ) * mma_pitch(hd) * 2;
  const int64_t kv = 2LL * mma_block_rows(hd) * mma_pitch(hd) * 2;
  return q + kv * (same ? 1 : 2) + 2LL * mma_block_rows(hd) * 4 + kMmaBlockQ * 4;
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

template <DType DT, int HD>
HEN_GLOBAL void HEN_LAUNCH_BOUNDS(kMmaThreads)
    mma_kernel(const PartialParams p, const LaunchArgs a, const Workspace ws) {
  static_assert(DT != DType::F32, "tensor-core path is for 16-bit inputs");
  using E = Elem<DT>;
  constexpr bool kBF16 = DT == DType::BF16;
  constexpr int BM = kMmaBlockQ, BN = mma_block_rows(HD), PITCH = mma_pitch(HD);
  constexpr int KSTEPS = HD / 16;  // k-steps of the score product
  constexpr int NB = BN / 8;       // n-blocks of a score tile
  constexpr int DB = HD / 8;       // n-blocks of the output
  constexpr bool kQInRegs = HD <= 128;

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

  uint16_t* Qs = reinterpret_cast<uint16_t*>(dynamic_smem());
  uint16_t* Ks = Qs + BM * PITCH;                   // [2][BN][PITCH]
  uint16_t* Vs = same ? Ks : Ks + 2 * BN * PITCH;   // [2][BN][PITCH]
  float* xn = reinterpret_cast<float*>(Ks + (same ? 2 : 4) * BN * PITCH);  // [2][BN]
  float* qn_s = xn + 2 * BN;                                             // [BM]

  auto load_bank_tile = [&](int stage, int64_t t0) {
    const int64_t rows = n_end - t0;
    load_tile<BN, HD>(Ks + stage * BN * PITCH, xbase + t0 * p.memory_row_stride, p.memory_row_stride, rows, p.D, vec);
    if (!same)
      load_tile<BN, HD>(Vs + stage * BN * PITCH, vbase + t0 * p.values_row_stride, p.values_row_stride, rows, p.Dv,
                        vec);
  };

  // Prologue: the query tile and its norms, then the first bank tile in flight.
  load_tile<BM, HD>(Qs, qbase, p.query_row_stride, nq, p.D, vec);
  cp_async_commit();
  cp_async_wait_all();
  sync_block();
  if (need_norm) tile_norms<E, BM, HD>(Qs, qn_s);
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
  const float qn0 = need_norm ? qn_s[qrow + g] : 0.f, qn1 = need_norm ? qn_s[qrow + g + 8] : 0.f;

  // Rows g and g + 8 of the warp's 16: running max, this lane's part of the sum, top.
  float m[2] = {neg_inf(), neg_inf()}, lsum[2] = {0.f, 0.f}, ts[2] = {neg_inf(), neg_inf()};
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
    if (need_norm) {
      tile_norms<E, BN, HD>(Kt, xn + stage * BN);
      sync_block();
    }

    // S = Q K^T for the warp's 16 queries x BN bank rows.
    float s[NB][4];
    HEN_UNROLL
    for (int nb = 0; nb < NB; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.f;
    HEN_UNROLL
    for (int ks = 0; ks < KSTEPS; ++ks) {
      uint32_t af[4];
      if constexpr (kQInRegs) {
        HEN_UNROLL
        for (int i = 0; i < 4; ++i) af[i] = qf[ks][i];
      } else {
        ldmatrix_x4(af, Qs + (qrow + (lane % 16)) * PITCH + ks * 16 + (lane / 16) * 8);
      }
      HEN_UNROLL
      for (int nn = 0; nn < BN; nn += 16) {
        uint32_t bf[4];  // K rows nn..nn+15 as two n8 blocks: {k 0-7, k 8-15} each
        ldmatrix_x4(bf, Kt + (nn + (lane & 7) + ((lane >> 4) << 3)) * PITCH + ks * 16 + ((lane >> 3) & 1) * 8);
        mma_16816<kBF16>(s[nn / 8], af, bf[0], bf[1]);
        mma_16816<kBF16>(s[nn / 8 + 1], af, bf[2], bf[3]);
      }
    }

    // Scores, the running max and top per row, the weights (in s) and the rescale.
    HEN_UNROLL
    for (int h = 0; h < 2; ++h) {
      const float qn = h == 0 ? qn0 : qn1;
      float tmax = neg_inf();
      HEN_UNROLL
      for (int nb = 0; nb < NB; ++nb) {
        HEN_UNROLL
        for (int e = 0; e < 2; ++e) {
          const int col = nb * 8 + 2 * tig + e;
          float v = score(p.similarity, beta, s[nb][2 * h + e], qn, need_norm ? xnt[col] : 0.f);
          v = t0 + col < n_end ? v : neg_inf();
          s[nb][2 * h + e] = v;
          tmax = max_f(tmax, v);
          if (v > ts[h]) ts[h] = v, ti[h] = p.offset + t0 + col;  // this lane's columns ascend
        }
      }
      tmax = max_f(tmax, shfl_xor(tmax, 1));  // the quad shares the row
      tmax = max_f(tmax, shfl_xor(tmax, 2));
      const float m_new = max_f(m[h], tmax);
      const float mu = origin(m_new);
      const float scale = exp_f(m[h] - mu);
      m[h] = m_new;
      lsum[h] *= scale;
      HEN_UNROLL
      for (int db = 0; db < DB; ++db) o[db][2 * h] *= scale, o[db][2 * h + 1] *= scale;
      HEN_UNROLL
      for (int nb = 0; nb < NB; ++nb) {
        HEN_UNROLL
        for (int e = 0; e < 2; ++e) {
          const float w = exp_f(s[nb][2 * h + e] - mu);
          s[nb][2 * h + e] = w;
          lsum[h] += w;
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
      mult = inverse_sum(lsum[h]);
    } else {
      dst = ws.acc + ((l * a.splits + tc.split) * p.B + b) * p.Dv;
      mult = 1.f;
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

template <DType DT>
KernelFn mma_table(int hd) {
  switch (hd) {
    case 32: return &mma_kernel<DT, 32>;
    case 64: return &mma_kernel<DT, 64>;
    case 128: return &mma_kernel<DT, 128>;
    case 256: return &mma_kernel<DT, 256>;
    default: return nullptr;
  }
}

// Defined in mma.cu: the kernel for a head dim, or nullptr.
KernelFn mma_f16(int hd);
KernelFn mma_bf16(int hd);

}  // namespace cuda_kernels
}  // namespace hen
