// What the CUDA kernels of csrc/cuda/ share: portable primitives, element
// types and 16-byte chunk loads, the launch arguments and the tile bookkeeping.
//
// The kernels (simt_kernel.cuh, mma_kernel.cuh, combine_kernel.cuh) compute the
// Partial of hopfield_params.h with the same semantics as the CPU kernel:
// running max / sum / accumulator per query; top_score/top_index with ties
// going to the smaller row; a NaN score poisons its own query's out and lse and
// nothing else; an empty split or bank gives out = 0, lse = -inf, top = (-inf,
// -1); offset is added to top_index.
//
// Everything here compiles as CUDA, or as plain C++ with HEN_CUDA_EMULATE
// defined, where csrc/emu/cuda_emulator.h supplies the thread indices,
// barriers, warp shuffles, ldmatrix, mma and cp.async so a CPU test can run the
// kernels on machines without a GPU.
#pragma once

#include <cstdint>

#include "hopfield_params.h"

#if defined(HEN_CUDA_EMULATE)
#include "emu/cuda_emulator.h"
#define HEN_DEVICE inline
#define HEN_HOST_DEVICE inline
#define HEN_GLOBAL
#define HEN_LAUNCH_BOUNDS(n)
#define HEN_LAUNCH_BOUNDS_MIN(n, m)
#define HEN_UNROLL
#define HEN_NO_UNROLL
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
#define HEN_NO_UNROLL _Pragma("unroll 1")
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
HEN_DEVICE bool any_in_warp(bool pred) { return hen_emu::any_in_warp(pred); }
HEN_DEVICE bool any_in_block(bool pred) { return hen_emu::any_in_block(pred); }
HEN_DEVICE int first_set(uint32_t bits) { return __builtin_ffs(static_cast<int>(bits)) - 1; }
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
HEN_DEVICE bool any_in_warp(bool pred) { return __any_sync(0xffffffffu, pred) != 0; }
HEN_DEVICE bool any_in_block(bool pred) { return __syncthreads_or(pred ? 1 : 0) != 0; }
HEN_DEVICE int first_set(uint32_t bits) { return __ffs(static_cast<int>(bits)) - 1; }
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

// beta * sim from a squared distance (l2, l2sq).  The clamp is written so that
// a NaN passes through (a NaN query stays poisoned).
HEN_DEVICE float score_from_d2(Similarity sim, float beta, float d2) {
  d2 = d2 < 0.f ? 0.f : d2;
  return sim == Similarity::L2Sq ? -0.5f * beta * d2 : -beta * sqrt_f(d2);
}

// docs/design.md §5.1: the expanded d2 = S - 2 q.x with S = |q|^2 + |x|^2 may have
// cancelled (lost more than a few bits) when it falls below kL2DirectBelow * S;
// such pairs are recomputed directly as sum_d w_d (q_d - x_d)^2.  False for NaN.
HEN_DEVICE bool cancelled(float d2, float S) { return d2 < kL2DirectBelow * S; }

// beta * sim from the dot product and, for l2 / l2sq, the squared norms (the
// expanded form, without the cancellation check).
HEN_DEVICE float score(Similarity sim, float beta, float dot, float qn, float xn) {
  if (sim == Similarity::Dot) return beta * dot;
  return score_from_d2(sim, beta, qn + xn - 2.f * dot);
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

// ---------------------------------------------------------------------------
// Tiles: what a block works on, and where its result goes.

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

// The signature of every simt and mma kernel instance: hopfield_cuda.cu
// launches whichever instance the plan picks through this pointer.
using KernelFn = void (*)(PartialParams, LaunchArgs, Workspace);

}  // namespace cuda_kernels
}  // namespace hen
