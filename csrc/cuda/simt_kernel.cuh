// simt_kernel: the split-bank CUDA-core kernel of the recall regime
// (docs/design.md §2: B <= ~64, any D, N huge, bound by memory bandwidth) and
// the general fallback (float32, D > 256).
//
// A block holds 1 or 4 queries and streams its split of the bank.  A "team" of
// threads (a power of two, up to the whole block) shares each bank row: every
// thread owns a few 16-byte chunks of the row, loads them once into registers
// and uses them twice, for the score (a team-wide reduction) and for the value
// accumulation, so the bank is read once, with 16-byte loads and many rows in
// flight per thread.  Small D gives small teams, so one block streams many rows
// at once; the teams' running (max, sum, acc) are merged in shared memory at
// the end.  D and Dv up to 8192.
//
// Why CUDA cores: with few queries there are 4*B flops per bank element, far
// below what the memory system delivers, and no tensor-core tile shape fits one
// to eight queries without wasting most of it.
#pragma once

#include <cstdint>

#include "cuda/primitives.cuh"

namespace hen {
namespace cuda_kernels {

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

// Instances hold 1 or 4 queries per block, and per thread at most 32 floats of
// accumulator (and as many of query): QB x chunks x elements per chunk <= 32.
HEN_HOST_DEVICE constexpr bool simt_fits(int qb, int nch, int vec) { return qb * nch * vec <= 32; }

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
// Instance tables: simt_f32.cu, simt_f16.cu and simt_bf16.cu each instantiate
// one dtype's share, so the instances compile in parallel.

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

// Defined one per dtype (simt_f32.cu, ...): the kernel for a plan, or nullptr.
KernelFn simt_f32(int qb, int nch, bool same);
KernelFn simt_f16(int qb, int nch, bool same);
KernelFn simt_bf16(int qb, int nch, bool same);

}  // namespace cuda_kernels
}  // namespace hen
