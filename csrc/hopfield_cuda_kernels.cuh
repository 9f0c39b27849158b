// CUDA kernels for the Partial of DESIGN.md §2, free of torch.
//
// Three kernels, all reading hen::PartialParams (hopfield_cpu.h):
//
// simt_kernel: the recall regime (DESIGN.md §2: B <= ~64, any D, N huge,
//   bound by memory bandwidth) and the general fallback (float32, D > 256).
//   A block holds up to 8 queries and streams its split of the bank.  A "team"
//   of threads (a power of two, up to the whole block) shares each bank row:
//   every thread owns a few 16-byte chunks of the row, loads them once into
//   registers and uses them twice, for the score (a team-wide reduction) and
//   for the value accumulation, so the bank is read once, with 16-byte loads
//   and many rows in flight per thread.  Small D gives small teams, so one
//   block streams many rows at once; the teams' running (max, sum, acc) are
//   merged in shared memory at the end.  D and Dv up to 8192.
//   Why CUDA cores: with few queries there are 4*B flops per bank element, far
//   below what the memory system delivers, and no tensor-core tile shape fits
//   one to eight queries without wasting most of it.
//
// mma_kernel: the layer regime (B and N large, D <= 256; bound by tensor
//   cores) and recall with tens of queries at D <= 256.  FlashAttention-2
//   style: a block of 4 warps owns 64 queries; bank tiles of 64 (32 for
//   D > 128) rows stream through shared memory with cp.async double
//   buffering; S = Q K^T and O += P V both run on mma.sync m16n8k16 (fp16 or
//   bf16 inputs, fp32 accumulation), and one shared-memory tile serves as both
//   keys and values when values are the memory.  mma.sync runs on sm_80 and
//   sm_90; Hopper's wgmma and TMA would raise the sm_90 ceiling and are the
//   next step once this kernel is measured against a GPU (they change the
//   shared-memory layout and need a warpgroup-wide pipeline, which nothing on
//   a machine without a GPU can check).
//
// combine_kernel: when a plan splits the bank (flash-decoding: enough blocks
//   to fill the GPU when B is small), each split leaves an unnormalised
//   partial (max, sum, acc, top) in the workspace; this merges them exactly.
//
// Semantics shared with the CPU kernel: running max / sum / accumulator per
// query; top_score/top_index with ties going to the smaller row; a NaN score
// poisons its own query's out and lse and nothing else; an empty split or
// bank gives out = 0, lse = -inf, top = (-inf, -1); offset is added to
// top_index.
//
// The file compiles as CUDA, or as plain C++ with HEN_CUDA_EMULATE defined,
// where csrc/emu/cuda_emulator.h supplies the thread indices, barriers, warp
// shuffles, ldmatrix, mma and cp.async so a CPU test can run the kernels.
#pragma once

#include <cstdint>

#include "hopfield_cpu.h"

#if defined(HEN_CUDA_EMULATE)
#include "emu/cuda_emulator.h"
#define HEN_DEVICE inline
#define HEN_HOST_DEVICE inline
#define HEN_GLOBAL
#define HEN_LAUNCH_BOUNDS(n)
#define HEN_LAUNCH_BOUNDS_MIN(n, m)
#define HEN_UNROLL
#define HEN_CHECK_SMEM16(p) hen_emu::check_smem(p, 16, 16)
#define HEN_CHECK_ALIGNED16(p) hen_emu::check_aligned(p, 16)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define HEN_DEVICE __device__ __forceinline__
#define HEN_HOST_DEVICE __host__ __device__ __forceinline__
#define HEN_GLOBAL __global__
#define HEN_LAUNCH_BOUNDS(n) __launch_bounds__(n)
#define HEN_LAUNCH_BOUNDS_MIN(n, m) __launch_bounds__(n, m)
#define HEN_UNROLL _Pragma("unroll")
#define HEN_CHECK_SMEM16(p)
#define HEN_CHECK_ALIGNED16(p)
#endif

namespace hen {
namespace cuda_kernels {

// ---------------------------------------------------------------------------
// Primitives.  Each has a CUDA body and an emulated one.

#if defined(HEN_CUDA_EMULATE)
HEN_DEVICE int thread_index() { return hen_emu::thread_index(); }
HEN_DEVICE int64_t block_index() { return hen_emu::block_index(); }
HEN_DEVICE void sync_block() { hen_emu::sync_block(); }
HEN_DEVICE float shfl_xor(float v, int mask) { return hen_emu::shfl_xor(v, mask); }
HEN_DEVICE int64_t shfl_xor(int64_t v, int mask) { return hen_emu::shfl_xor(v, mask); }
HEN_DEVICE float bits_to_float(uint32_t b) { return hen_emu::bits_to_float(b); }
HEN_DEVICE float half_bits_to_float(uint16_t b) { return hen_emu::half_bits_to_float(b); }
HEN_DEVICE uint32_t pack_bf16x2(float lo, float hi) { return hen_emu::pack_bf16x2(lo, hi); }
HEN_DEVICE uint32_t pack_f16x2(float lo, float hi) { return hen_emu::pack_f16x2(lo, hi); }
HEN_DEVICE unsigned char* dynamic_smem() { return hen_emu::dynamic_smem(); }
HEN_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* p) { hen_emu::ldmatrix_x4(r, p, false); }
HEN_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { hen_emu::ldmatrix_x4(r, p, true); }
template <bool BF16>
HEN_DEVICE void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  hen_emu::mma_m16n8k16(d, a, b0, b1, BF16);
}
HEN_DEVICE void cp_async_16(void* smem, const void* global, bool valid) { hen_emu::cp_async_16(smem, global, valid); }
HEN_DEVICE void cp_async_commit() {}
HEN_DEVICE void cp_async_wait_all() {}
HEN_DEVICE float exp_f(float x) { return hen_emu::exp_f(x); }
HEN_DEVICE float log_f(float x) { return hen_emu::log_f(x); }
HEN_DEVICE float sqrt_f(float x) { return hen_emu::sqrt_f(x); }
#else
HEN_DEVICE int thread_index() { return static_cast<int>(threadIdx.x); }
HEN_DEVICE int64_t block_index() { return static_cast<int64_t>(blockIdx.x); }
HEN_DEVICE void sync_block() { __syncthreads(); }
HEN_DEVICE float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
HEN_DEVICE int64_t shfl_xor(int64_t v, int mask) {
  return static_cast<int64_t>(__shfl_xor_sync(0xffffffffu, static_cast<long long>(v), mask));
}
HEN_DEVICE float bits_to_float(uint32_t b) { return __uint_as_float(b); }
HEN_DEVICE float half_bits_to_float(uint16_t b) { return __half2float(__ushort_as_half(b)); }
HEN_DEVICE uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
  return *reinterpret_cast<const uint32_t*>(&v);
}
HEN_DEVICE uint32_t pack_f16x2(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
HEN_DEVICE unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char hen_dynamic_smem[];
  return hen_dynamic_smem;
}
HEN_DEVICE uint32_t smem_address(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
// The tensor-core instructions exist from sm_80 on; this build targets sm_80 and
// sm_90, and the guards keep a wider architecture list (torch's) compiling.
HEN_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
#if __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(p)));
#else
  __trap();
#endif
}
HEN_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
#if __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(p)));
#else
  __trap();
#endif
}
template <bool BF16>
HEN_DEVICE void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if __CUDA_ARCH__ >= 800
  if constexpr (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();
#endif
}
// 16 bytes global -> shared, bypassing L1; zero-filled when !valid (src-size 0).
HEN_DEVICE void cp_async_16(void* smem, const void* global, bool valid) {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(smem)), "l"(global),
               "r"(valid ? 16 : 0));
#else
  __trap();
#endif
}
HEN_DEVICE void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
HEN_DEVICE void cp_async_wait_all() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}
HEN_DEVICE float exp_f(float x) { return expf(x); }
HEN_DEVICE float log_f(float x) { return logf(x); }
HEN_DEVICE float sqrt_f(float x) { return sqrtf(x); }
#endif

HEN_DEVICE float neg_inf() { return bits_to_float(0xff800000u); }
HEN_DEVICE float quiet_nan() { return bits_to_float(0x7fc00000u); }
HEN_DEVICE bool is_nan(float x) { return x != x; }
HEN_DEVICE float max_f(float a, float b) { return a > b || is_nan(b) ? a : b; }  // ignores a NaN b, like fmaxf
HEN_HOST_DEVICE int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

// (score, row) a beats (score, row) b: higher score, ties to the smaller row;
// row -1 means none.  Scores here are never NaN (a NaN never passes `>`).
HEN_DEVICE bool better(float sa, int64_t ia, float sb, int64_t ib) {
  return sa > sb || (sa == sb && ia >= 0 && (ib < 0 || ia < ib));
}

// beta * sim from the dot product and, for l2 / l2sq, the squared norms.  The
// clamp is written so that a NaN passes through (a NaN query stays poisoned).
HEN_DEVICE float score(Similarity sim, float beta, float dot, float qn, float xn) {
  if (sim == Similarity::Dot) return beta * dot;
  float sq = qn + xn - 2.f * dot;
  sq = sq < 0.f ? 0.f : sq;
  return sim == Similarity::L2Sq ? -0.5f * beta * sq : -beta * sqrt_f(sq);
}

// Online-softmax bookkeeping: the max used as the exponent's origin.  With no
// finite score yet it is 0, so exp(-inf - 0) = 0 and exp(NaN - 0) = NaN.
HEN_DEVICE float origin(float m) { return m == neg_inf() ? 0.f : m; }

// ---------------------------------------------------------------------------
// Element types: raw bits in, float out.

template <DType DT>
struct Elem;
template <>
struct Elem<DType::F32> {
  using raw = uint32_t;
  static constexpr int kVec = 4;  // elements per 16-byte chunk
  static HEN_DEVICE float to_float(raw r) { return bits_to_float(r); }
};
template <>
struct Elem<DType::F16> {
  using raw = uint16_t;
  static constexpr int kVec = 8;
  static HEN_DEVICE float to_float(raw r) { return half_bits_to_float(r); }
};
template <>
struct Elem<DType::BF16> {
  using raw = uint16_t;
  static constexpr int kVec = 8;
  static HEN_DEVICE float to_float(raw r) { return bits_to_float(static_cast<uint32_t>(r) << 16); }
};

struct alignas(16) Chunk {
  uint32_t w[4];
};

HEN_DEVICE Chunk zero_chunk() { return Chunk{{0u, 0u, 0u, 0u}}; }

template <class E>
HEN_DEVICE void set_elem(Chunk& c, int e, typename E::raw v) {
  if constexpr (E::kVec == 4) {
    c.w[e] = v;
  } else {
    c.w[e >> 1] |= static_cast<uint32_t>(v) << (16 * (e & 1));
  }
}

template <class E>
HEN_DEVICE float get_elem(const Chunk& c, int e) {
  if constexpr (E::kVec == 4) {
    return E::to_float(c.w[e]);
  } else {
    return E::to_float(static_cast<typename E::raw>((c.w[e >> 1] >> (16 * (e & 1))) & 0xffffu));
  }
}

// Elements [col, col + kVec) of a row of length len, zero past the end; one
// 16-byte load when `vec` says rows are 16-byte aligned and the chunk is whole.
template <class E>
HEN_DEVICE Chunk load_chunk(const typename E::raw* row, int64_t col, int64_t len, bool vec) {
  if (vec && col + E::kVec <= len) {
    HEN_CHECK_ALIGNED16(row + col);
    return *reinterpret_cast<const Chunk*>(row + col);
  }
  Chunk c = zero_chunk();
  HEN_UNROLL
  for (int e = 0; e < E::kVec; ++e)
    if (col + e < len) set_elem<E>(c, e, row[col + e]);
  return c;
}

// Launch-time facts shared by the kernels (the host side is hopfield_cuda.cu).
struct LaunchArgs {
  int64_t query_blocks, splits, rows_per_split;
  int team;      // simt: threads per bank row
  int vec;       // 16-byte loads allowed
  int same;      // values are the memory
  int need_norm; // l2 / l2sq need ||x||^2 and ||q||^2
};

// Tile = (leading index, bank split, query block), query block fastest so
// blocks reading the same split run together and share it through L2.
struct TileCoords {
  int64_t l, split, qb;
};
HEN_DEVICE TileCoords tile_coords(const LaunchArgs& a) {
  const int64_t t = block_index();
  return TileCoords{t / (a.query_blocks * a.splits), (t / a.query_blocks) % a.splits, t % a.query_blocks};
}

// Leave a query's result: final when the bank is not split, else its
// unnormalised partial in the workspace for combine_kernel.
HEN_DEVICE void store_stats(const PartialParams& p, const LaunchArgs& a, const Workspace& ws, int64_t l,
                            int64_t split, int64_t b, float m, float lsum, float ts, int64_t ti) {
  if (a.splits == 1) {
    const int64_t row = l * p.B + b;
    p.lse[row] = lsum > 0.f ? m + log_f(lsum) : (is_nan(lsum) ? quiet_nan() : neg_inf());
    p.top_score[row] = ts;
    p.top_index[row] = ti;
  } else {
    const int64_t slot = (l * a.splits + split) * p.B + b;
    ws.max[slot] = m;
    ws.sum[slot] = lsum;
    ws.top_score[slot] = ts;
    ws.top_index[slot] = ti;
  }
}

// 1 / sum for the final normalisation: 0 for an empty chunk (acc is 0), NaN
// for a poisoned query.
HEN_DEVICE float inverse_sum(float lsum) { return is_nan(lsum) ? quiet_nan() : (lsum > 0.f ? 1.f / lsum : 0.f); }

// ---------------------------------------------------------------------------
// simt_kernel

constexpr int kSimtThreads = 256;
constexpr int kSimtWarps = kSimtThreads / 32;
constexpr int kSimtMaxSlots = kSimtThreads / 2;  // teams merged pairwise: at most 128 slots

// Rows per team per step: about eight 16-byte loads in flight per thread
// (keys and values count separately), registers bounded.
HEN_HOST_DEVICE constexpr int simt_rows(int qb, int nch, bool same) {
  const int r = ((8 / nch) < (16 / qb) ? (8 / nch) : (16 / qb)) / (same ? 1 : 2);
  return r > 1 ? r : 1;
}
// Values a team reduces per step: R x QB dot products and R bank-row norms.
HEN_HOST_DEVICE constexpr int simt_reduced(int qb, int nch, bool same) { return simt_rows(qb, nch, same) * (qb + 1); }

// Shared memory of simt_kernel, in floats (the int64 top indices count 2 each).
HEN_HOST_DEVICE constexpr int64_t simt_smem_floats(int qb, int nch, bool same, int vec, bool merge) {
  const int64_t red = 2 * kSimtWarps * simt_reduced(qb, nch, same);
  const int64_t per = static_cast<int64_t>(qb) * nch * vec;
  return red + (merge ? kSimtMaxSlots * per + 3 * kSimtMaxSlots * qb + 2 * kSimtMaxSlots * qb : 0);
}

// Sum K values over the team (all its threads end with the same bits).  Teams
// up to a warp use shuffles; wider teams add the warps' sums through shared
// memory, double-buffered so one barrier per call suffices.
template <int K>
HEN_DEVICE void team_sum(float (&v)[K], int team_size, float* red, int& buf) {
  if (team_size <= 32) {
    for (int off = team_size / 2; off >= 1; off >>= 1) {
      HEN_UNROLL
      for (int k = 0; k < K; ++k) v[k] += shfl_xor(v[k], off);
    }
    return;
  }
  HEN_UNROLL
  for (int off = 16; off >= 1; off >>= 1) {
    HEN_UNROLL
    for (int k = 0; k < K; ++k) v[k] += shfl_xor(v[k], off);
  }
  const int tid = thread_index(), warp = tid / 32, lane = tid % 32;
  float* slot = red + buf * (kSimtWarps * K);
  if (lane == 0) {
    HEN_UNROLL
    for (int k = 0; k < K; ++k) slot[warp * K + k] = v[k];
  }
  sync_block();
  const int w0 = (tid / team_size) * (team_size / 32);
  HEN_UNROLL
  for (int k = 0; k < K; ++k) {
    float s = 0.f;
    for (int w = 0; w < team_size / 32; ++w) s += slot[(w0 + w) * K + k];
    v[k] = s;
  }
  buf ^= 1;
}

template <DType DT, int QB, int NCH, bool SAME>
HEN_GLOBAL void HEN_LAUNCH_BOUNDS_MIN(kSimtThreads, 1)
    simt_kernel(const PartialParams p, const LaunchArgs a, const Workspace ws) {
  using E = Elem<DT>;
  using raw_t = typename E::raw;
  constexpr int V = E::kVec;
  constexpr int R = simt_rows(QB, NCH, SAME);
  constexpr int K = simt_reduced(QB, NCH, SAME);  // [r * QB + q]: dot products, [R * QB + r]: row norms
  constexpr int PER = QB * NCH * V;         // accumulator floats per thread

  float* red = reinterpret_cast<float*>(dynamic_smem());  // [2][kSimtWarps][K]
  float* merge_acc = red + 2 * kSimtWarps * K;            // [slot][PER][team]
  float* merge_m = merge_acc + kSimtMaxSlots * PER;       // [slot][QB]
  float* merge_l = merge_m + kSimtMaxSlots * QB;
  float* merge_ts = merge_l + kSimtMaxSlots * QB;
  int64_t* merge_ti = reinterpret_cast<int64_t*>(merge_ts + kSimtMaxSlots * QB);

  const int tid = thread_index();
  const int team_size = a.team, teams = kSimtThreads / team_size;
  const int team = tid / team_size, tl = tid % team_size;
  const TileCoords tc = tile_coords(a);
  const int64_t l = tc.l, b0 = tc.qb * QB;
  const int nq = static_cast<int>(min_i64(QB, p.B - b0));
  const int64_t n_begin = min_i64(p.N, tc.split * a.rows_per_split);
  const int64_t n_end = min_i64(p.N, n_begin + a.rows_per_split);
  const float beta = p.beta[l];
  const bool vec = a.vec != 0, need_norm = a.need_norm != 0;
  const int64_t D = p.D, Dv = p.Dv;
  const int64_t Dc = (D + V - 1) / V, Dvc = (Dv + V - 1) / V;
  const raw_t* qbase = static_cast<const raw_t*>(p.query) + l * p.query_lead_stride + b0 * p.query_row_stride;
  const raw_t* xbase = static_cast<const raw_t*>(p.memory) + l * p.memory_lead_stride;
  const raw_t* vbase = static_cast<const raw_t*>(p.values) + l * p.values_lead_stride;
  int buf = 0;

  // This thread's chunks of every query, as float, and the queries' squared norms.
  float qf[QB][NCH][V];
  float qn[QB];
  HEN_UNROLL
  for (int q = 0; q < QB; ++q) {
    qn[q] = 0.f;
    HEN_UNROLL
    for (int j = 0; j < NCH; ++j) {
      const int64_t c = tl + static_cast<int64_t>(j) * team_size;
      const Chunk ch = q < nq && c < Dc ? load_chunk<E>(qbase + q * p.query_row_stride, c * V, D, vec) : zero_chunk();
      HEN_UNROLL
      for (int e = 0; e < V; ++e) {
        qf[q][j][e] = get_elem<E>(ch, e);
        qn[q] += qf[q][j][e] * qf[q][j][e];
      }
    }
  }
  team_sum<QB>(qn, team_size, red, buf);

  float m[QB], lsum[QB], ts[QB], acc[QB][NCH][V];
  int64_t ti[QB];
  HEN_UNROLL
  for (int q = 0; q < QB; ++q) {
    m[q] = neg_inf(), lsum[q] = 0.f, ts[q] = neg_inf(), ti[q] = -1;
    HEN_UNROLL
    for (int j = 0; j < NCH; ++j)
      HEN_UNROLL
      for (int e = 0; e < V; ++e) acc[q][j][e] = 0.f;
  }

  // Every thread runs the same number of steps (team_sum may hold a barrier);
  // rows past the split's end are masked.
  const int64_t step = static_cast<int64_t>(teams) * R;
  for (int64_t r0 = n_begin; r0 < n_end; r0 += step) {
    const int64_t rb = r0 + static_cast<int64_t>(team) * R;
    Chunk xc[R][NCH];
    [[maybe_unused]] Chunk vc[SAME ? 1 : R][NCH];
    HEN_UNROLL
    for (int r = 0; r < R; ++r) {
      const bool ok = rb + r < n_end;
      const raw_t* xrow = xbase + (ok ? rb + r : 0) * p.memory_row_stride;
      const raw_t* vrow = vbase + (ok ? rb + r : 0) * p.values_row_stride;
      HEN_UNROLL
      for (int j = 0; j < NCH; ++j) {
        const int64_t c = tl + static_cast<int64_t>(j) * team_size;
        xc[r][j] = ok && c < Dc ? load_chunk<E>(xrow, c * V, D, vec) : zero_chunk();
        if constexpr (!SAME) vc[r][j] = ok && c < Dvc ? load_chunk<E>(vrow, c * V, Dv, vec) : zero_chunk();
      }
    }

    float s[K];
    HEN_UNROLL
    for (int k = 0; k < K; ++k) s[k] = 0.f;
    HEN_UNROLL
    for (int j = 0; j < NCH; ++j) {
      HEN_UNROLL
      for (int r = 0; r < R; ++r) {
        float xf[V];
        HEN_UNROLL
        for (int e = 0; e < V; ++e) xf[e] = get_elem<E>(xc[r][j], e);
        if (need_norm) {
          HEN_UNROLL
          for (int e = 0; e < V; ++e) s[R * QB + r] += xf[e] * xf[e];
        }
        HEN_UNROLL
        for (int q = 0; q < QB; ++q) {
          float d = 0.f;
          HEN_UNROLL
          for (int e = 0; e < V; ++e) d += qf[q][j][e] * xf[e];
          s[r * QB + q] += d;
        }
      }
    }
    team_sum<K>(s, team_size, red, buf);

    // Scores in place, then the online softmax per query; s[r * QB + q] ends as the weight.
    HEN_UNROLL
    for (int r = 0; r < R; ++r) {
      const bool ok = rb + r < n_end;
      HEN_UNROLL
      for (int q = 0; q < QB; ++q)
        s[r * QB + q] = ok ? score(p.similarity, beta, s[r * QB + q], qn[q], s[R * QB + r]) : neg_inf();
    }
    HEN_UNROLL
    for (int q = 0; q < QB; ++q) {
      float tmax = neg_inf();
      HEN_UNROLL
      for (int r = 0; r < R; ++r) {
        const float v = s[r * QB + q];
        tmax = max_f(tmax, v);
        if (v > ts[q]) ts[q] = v, ti[q] = p.offset + rb + r;  // rows ascend: the first of equals stays
      }
      const float m_new = max_f(m[q], tmax);
      const float mu = origin(m_new);
      const float scale = exp_f(m[q] - mu);
      float psum = 0.f;
      HEN_UNROLL
      for (int r = 0; r < R; ++r) {
        s[r * QB + q] = exp_f(s[r * QB + q] - mu);
        psum += s[r * QB + q];
      }
      lsum[q] = lsum[q] * scale + psum;
      m[q] = m_new;
      HEN_UNROLL
      for (int j = 0; j < NCH; ++j)
        HEN_UNROLL
        for (int e = 0; e < V; ++e) acc[q][j][e] *= scale;
    }
    HEN_UNROLL
    for (int j = 0; j < NCH; ++j) {
      HEN_UNROLL
      for (int r = 0; r < R; ++r) {
        float vf[V];
        const Chunk& vch = SAME ? xc[r][j] : vc[SAME ? 0 : r][j];  // SAME is a constant: no address select
        HEN_UNROLL
        for (int e = 0; e < V; ++e) vf[e] = get_elem<E>(vch, e);
        HEN_UNROLL
        for (int q = 0; q < QB; ++q)
          HEN_UNROLL
          for (int e = 0; e < V; ++e) acc[q][j][e] += s[r * QB + q] * vf[e];
      }
    }
  }

  // Merge the teams pairwise: team t + width hands its state to team t.
  for (int width = teams / 2; width >= 1; width >>= 1) {
    if (team >= width && team < 2 * width) {
      const int slot = team - width;
      float* dst = merge_acc + static_cast<int64_t>(slot) * PER * team_size;
      HEN_UNROLL
      for (int q = 0; q < QB; ++q)
        HEN_UNROLL
        for (int j = 0; j < NCH; ++j)
          HEN_UNROLL
          for (int e = 0; e < V; ++e) dst[((q * NCH + j) * V + e) * team_size + tl] = acc[q][j][e];
      if (tl == 0) {
        HEN_UNROLL
        for (int q = 0; q < QB; ++q) {
          merge_m[slot * QB + q] = m[q];
          merge_l[slot * QB + q] = lsum[q];
          merge_ts[slot * QB + q] = ts[q];
          merge_ti[slot * QB + q] = ti[q];
        }
      }
    }
    sync_block();
    if (team < width) {
      const int slot = team;
      const float* src = merge_acc + static_cast<int64_t>(slot) * PER * team_size;
      HEN_UNROLL
      for (int q = 0; q < QB; ++q) {
        const float om = merge_m[slot * QB + q], ol = merge_l[slot * QB + q];
        const float ots = merge_ts[slot * QB + q];
        const int64_t oti = merge_ti[slot * QB + q];
        const float m_new = max_f(m[q], om);
        const float mu = origin(m_new);
        const float sa = exp_f(m[q] - mu), sb = exp_f(om - mu);
        lsum[q] = lsum[q] * sa + ol * sb;
        m[q] = m_new;
        HEN_UNROLL
        for (int j = 0; j < NCH; ++j)
          HEN_UNROLL
          for (int e = 0; e < V; ++e)
            acc[q][j][e] = acc[q][j][e] * sa + src[((q * NCH + j) * V + e) * team_size + tl] * sb;
        if (better(ots, oti, ts[q], ti[q])) ts[q] = ots, ti[q] = oti;
      }
    }
    sync_block();
  }

  if (team != 0) return;
  HEN_UNROLL
  for (int q = 0; q < QB; ++q) {
    if (q >= nq) break;
    const int64_t b = b0 + q;
    float* dst;
    float mult;
    if (a.splits == 1) {
      dst = p.out + (l * p.B + b) * Dv;
      mult = inverse_sum(lsum[q]);
    } else {
      dst = ws.acc + ((l * a.splits + tc.split) * p.B + b) * Dv;
      mult = 1.f;
    }
    HEN_UNROLL
    for (int j = 0; j < NCH; ++j) {
      const int64_t c = tl + static_cast<int64_t>(j) * team_size;
      HEN_UNROLL
      for (int e = 0; e < V; ++e)
        if (c * V + e < Dv) dst[c * V + e] = acc[q][j][e] * mult;
    }
    if (tl == 0) store_stats(p, a, ws, l, tc.split, b, m[q], lsum[q], ts[q], ti[q]);
  }
}

// ---------------------------------------------------------------------------
// mma_kernel

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
// combine_kernel: one block per query, merging its splits' partials (defined
// in hopfield_cuda.cu, the one file that launches it).

constexpr int kCombineThreads = 128;
constexpr int kCombineMaxSplits = 1024;

HEN_HOST_DEVICE constexpr int64_t combine_smem_bytes(int64_t splits) {
  return (kCombineThreads / 32) * (8 + 4 * 4) + splits * 4;
}

// ---------------------------------------------------------------------------
// Instance tables.  Each hopfield_cuda_*.cu file instantiates one dtype's share
// (so the files compile in parallel) and hopfield_cuda.cu launches through them.

using KernelFn = void (*)(PartialParams, LaunchArgs, Workspace);

// simt instances: 1 or 4 queries per block, and per thread at most 32 floats
// of accumulator (and as many of query): QB x chunks x elements per chunk <= 32.
HEN_HOST_DEVICE constexpr bool simt_fits(int qb, int nch, int vec) { return qb * nch * vec <= 32; }

template <DType DT, int QB, int NCH>
KernelFn simt_instance(bool same) {
  if constexpr (simt_fits(QB, NCH, Elem<DT>::kVec)) {
    return same ? &simt_kernel<DT, QB, NCH, true> : &simt_kernel<DT, QB, NCH, false>;
  } else {
    return nullptr;
  }
}

template <DType DT, int QB>
KernelFn simt_by_chunks(int nch, bool same) {
  switch (nch) {
    case 1: return simt_instance<DT, QB, 1>(same);
    case 2: return simt_instance<DT, QB, 2>(same);
    case 4: return simt_instance<DT, QB, 4>(same);
    case 8: return simt_instance<DT, QB, 8>(same);
    default: return nullptr;
  }
}

template <DType DT>
KernelFn simt_table(int qb, int nch, bool same) {
  switch (qb) {
    case 1: return simt_by_chunks<DT, 1>(nch, same);
    case 4: return simt_by_chunks<DT, 4>(nch, same);
    default: return nullptr;
  }
}

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

// Defined one per file (hopfield_cuda_simt_f32.cu, ...): the kernel for a plan, or nullptr.
KernelFn simt_f32(int qb, int nch, bool same);
KernelFn simt_f16(int qb, int nch, bool same);
KernelFn simt_bf16(int qb, int nch, bool same);
KernelFn mma_f16(int hd);
KernelFn mma_bf16(int hd);

}  // namespace cuda_kernels
}  // namespace hen
