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
//
// docs/design.md §5.1: the l2 forms take sum_d w_d (x_d - q_d)^2 directly where
// that costs no extra instructions (simt_direct_l2), else the expanded form with
// the pairs that may have cancelled recomputed from the chunks in registers.
// Every row's score comes from the same operations in the same order whatever
// its team, step or split, so identical rows tie exactly and the smallest row
// wins.  Weights (an instance of their own, W): w∘q as the query for dot, and
// w_d weighing each squared difference for the l2 forms.
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

// Blocks per SM each instance is compiled for (__launch_bounds__).  With at most
// 16 accumulator floats per thread, ptxas fits every instance in 128 registers
// without spilling (checked on sm_80 and sm_90: tests/test_cuda_build.py), so two
// blocks of 256 threads share an SM and one hides the other's reductions and
// exps between its loads; the larger instances take what they need, one block.
HEN_HOST_DEVICE constexpr int simt_min_blocks(int qb, int nch, int vec) { return qb * nch * vec <= 16 ? 2 : 1; }

// Whether an instance forms the l2 forms' squared distance directly for every
// (row, query) pair, sum_d w_d (x_d - q_d)^2 (docs/design.md §5.1), rather than
// expanded as |q|^2 + |x|^2 - 2 q.x with the cancelled pairs recomputed.  With
// one query per block the direct form takes no more instructions per element
// (one FADD + one FFMA per pair against one FFMA per pair + one FFMA per row for
// the row norm), and with weights the expanded form would need a second product
// per pair (<w, x∘x>) anyway.  With four queries the direct form would add an
// FADD per element and query to a kernel that is then compute bound.
HEN_HOST_DEVICE constexpr bool simt_direct_l2(int qb, bool weighted) { return qb == 1 || weighted; }

// Sum the first N values of v over the team (all its threads end with the same
// bits).  Teams up to a warp use shuffles; wider teams add the warps' sums
// through shared memory, double-buffered so one barrier per call suffices.
template <int N, int K>
HEN_DEVICE void team_sum(float (&v)[K], int team_size, float* red, int& buf) {
  static_assert(N <= K, "team_sum: N values of K");
  if (team_size <= 32) {
    for (int off = team_size / 2; off >= 1; off >>= 1) {
      HEN_UNROLL
      for (int k = 0; k < N; ++k) v[k] += shfl_xor(v[k], off);
    }
    return;
  }
  HEN_UNROLL
  for (int off = 16; off >= 1; off >>= 1) {
    HEN_UNROLL
    for (int k = 0; k < N; ++k) v[k] += shfl_xor(v[k], off);
  }
  const int tid = thread_index(), warp = tid / 32, lane = tid % 32;
  float* slot = red + buf * (kSimtWarps * N);
  if (lane == 0) {
    HEN_UNROLL
    for (int k = 0; k < N; ++k) slot[warp * N + k] = v[k];
  }
  sync_block();
  const int w0 = (tid / team_size) * (team_size / 32);
  HEN_UNROLL
  for (int k = 0; k < N; ++k) {
    float s = 0.f;
    for (int w = 0; w < team_size / 32; ++w) s += slot[(w0 + w) * N + k];
    v[k] = s;
  }
  buf ^= 1;
}

// Whether any thread of the team's warp (teams up to a warp) or of the block
// (wider teams, whose team_sum holds a barrier) has pred, for a pred that every
// thread of a team holds alike: the branch it guards is then taken by every
// thread that a team_sum inside it needs.  One team is the whole block: no vote.
HEN_DEVICE bool any_in_teams(bool pred, int team_size) {
  if (team_size <= 32) return any_in_warp(pred);
  return team_size == kSimtThreads ? pred : any_in_block(pred);
}

// This thread's share of every (row r, query q) pair of a step, added to
// s[r * QB + q] for the pairs in `only` (bit r * QB + q): the squared distance
// sum_e w_e (x_e - q_e)^2 when DIRECT (w_e = 1 unless W), else the dot product
// and, with `norms`, each row's squared norm in s[R * QB + r].  The same
// operations in the same order for every row.
template <class E, bool DIRECT, bool W, int QB, int NCH, int R, int K, class QF, class WF>
HEN_DEVICE void pair_sums(float (&s)[K], const Chunk (&xc)[R][NCH], const QF& qf, const WF& wf, bool norms,
                          uint32_t only = ~0u) {
  constexpr int V = E::kVec;
  HEN_UNROLL
  for (int j = 0; j < NCH; ++j) {
    HEN_UNROLL
    for (int r = 0; r < R; ++r) {
      float xf[V];
      HEN_UNROLL
      for (int e = 0; e < V; ++e) xf[e] = get_elem<E>(xc[r][j], e);
      if constexpr (!DIRECT) {
        if (norms) {
          HEN_UNROLL
          for (int e = 0; e < V; ++e) s[R * QB + r] += xf[e] * xf[e];
        }
      }
      HEN_UNROLL
      for (int q = 0; q < QB; ++q) {
        float d = 0.f;
        HEN_UNROLL
        for (int e = 0; e < V; ++e) {
          if constexpr (DIRECT) {
            const float diff = xf[e] - qf[q][j][e];  // exact where x and q are close: translation invariant
            if constexpr (W) {
              d += diff * wf[q][j][e] * diff;
            } else {
              d += diff * diff;
            }
          } else {
            d += qf[q][j][e] * xf[e];
          }
        }
        if ((only >> (r * QB + q)) & 1u) s[r * QB + q] += d;
      }
    }
  }
}

template <DType DT, int QB, int NCH, bool SAME, bool W>
HEN_GLOBAL void HEN_LAUNCH_BOUNDS_MIN(kSimtThreads, simt_min_blocks(QB, NCH, Elem<DT>::kVec))
    simt_kernel(const PartialParams p, const LaunchArgs a, const Workspace ws) {
  using E = Elem<DT>;
  using raw_t = typename E::raw;
  constexpr int V = E::kVec;
  constexpr int R = simt_rows(QB, NCH, SAME);
  constexpr int RQ = R * QB;                       // (row, query) pairs per team and step
  constexpr int K = simt_reduced(QB, NCH, SAME);   // [r * QB + q]: per pair, [RQ + r]: row norms
  constexpr int PER = QB * NCH * V;                // accumulator floats per thread
  constexpr bool kDirect = simt_direct_l2(QB, W);

  float* red = reinterpret_cast<float*>(dynamic_smem());  // [2][kSimtWarps][<= K]
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
  const bool expanded = need_norm && !kDirect;  // l2 forms from |q|^2 + |x|^2 - 2 q.x
  const int64_t D = p.D, Dv = p.Dv;
  const int64_t Dc = (D + V - 1) / V, Dvc = (Dv + V - 1) / V;
  const raw_t* qbase = static_cast<const raw_t*>(p.query) + l * p.query_lead_stride + b0 * p.query_row_stride;
  const raw_t* xbase = static_cast<const raw_t*>(p.memory) + l * p.memory_lead_stride;
  const raw_t* vbase = static_cast<const raw_t*>(p.values) + l * p.values_lead_stride;
  int buf = 0;

  // This thread's chunks of every query as float (w∘q for a weighted dot), the
  // weights for a weighted l2 form, and the queries' squared norms.
  float qf[QB][NCH][V];
  [[maybe_unused]] float wf[W ? QB : 1][W ? NCH : 1][W ? V : 1];
  float qn[QB];
  HEN_UNROLL
  for (int q = 0; q < QB; ++q) {
    qn[q] = 0.f;
    [[maybe_unused]] const float* wrow = W && q < nq ? p.weights + (l * p.B + b0 + q) * D : nullptr;
    HEN_UNROLL
    for (int j = 0; j < NCH; ++j) {
      const int64_t c = tl + static_cast<int64_t>(j) * team_size;
      const Chunk ch = q < nq && c < Dc ? load_chunk<E>(qbase + q * p.query_row_stride, c * V, D, vec) : zero_chunk();
      HEN_UNROLL
      for (int e = 0; e < V; ++e) {
        float v = get_elem<E>(ch, e);
        if constexpr (W) {
          const float w = wrow != nullptr && c * V + e < D ? wrow[c * V + e] : 0.f;
          wf[q][j][e] = w;
          if (!need_norm) v *= w;
        }
        qf[q][j][e] = v;
        qn[q] += v * v;
      }
    }
  }
  if (expanded) team_sum<QB>(qn, team_size, red, buf);

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

    // Per pair: the dot product, or the squared distance (direct, or expanded
    // with the row norms); reduced over the team.
    float s[K];
    HEN_UNROLL
    for (int k = 0; k < K; ++k) s[k] = 0.f;
    if (kDirect && need_norm) {
      pair_sums<E, true, W, QB, NCH, R>(s, xc, qf, wf, false);
      team_sum<RQ>(s, team_size, red, buf);
    } else if (expanded) {
      pair_sums<E, false, W, QB, NCH, R>(s, xc, qf, wf, true);
      team_sum<K>(s, team_size, red, buf);
    } else {
      pair_sums<E, false, W, QB, NCH, R>(s, xc, qf, wf, false);
      team_sum<RQ>(s, team_size, red, buf);
    }

    // Scores in place, then the online softmax per query; s[r * QB + q] ends as the weight.
    if (need_norm) {
      if constexpr (!kDirect) {
        // Expanded d2 per pair; a pair where it may have cancelled (a query on or
        // next to a stored row, or a bank far from the origin) is recomputed
        // directly from the chunks still in registers.  Recall's usual case flags
        // one row in the whole bank, so the recompute runs rarely.
        uint32_t flags = 0;
        HEN_UNROLL
        for (int r = 0; r < R; ++r) {
          HEN_UNROLL
          for (int q = 0; q < QB; ++q) {
            const float S = qn[q] + s[RQ + r];
            const float d2 = S - 2.f * s[r * QB + q];
            if (cancelled(d2, S)) flags |= 1u << (r * QB + q);
            s[r * QB + q] = d2;
          }
        }
        if (any_in_teams(flags != 0, team_size)) {
          // In place: a kept d2 goes through the team sum as d2 + 0 + ... + 0
          // (exact), a flagged one is summed afresh from the direct form.
          HEN_UNROLL
          for (int k = 0; k < RQ; ++k) s[k] = (flags >> k) & 1u || tl != 0 ? 0.f : s[k];
          pair_sums<E, true, W, QB, NCH, R>(s, xc, qf, wf, false, flags);
          team_sum<RQ>(s, team_size, red, buf);
        }
      }
      HEN_UNROLL
      for (int r = 0; r < R; ++r) {
        const bool ok = rb + r < n_end;
        HEN_UNROLL
        for (int q = 0; q < QB; ++q) s[r * QB + q] = ok ? score_from_d2(p.similarity, beta, s[r * QB + q]) : neg_inf();
      }
    } else {
      HEN_UNROLL
      for (int r = 0; r < R; ++r) {
        const bool ok = rb + r < n_end;
        HEN_UNROLL
        for (int q = 0; q < QB; ++q) s[r * QB + q] = ok ? beta * s[r * QB + q] : neg_inf();
      }
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
KernelFn simt_instance(bool same, bool weighted) {
  if constexpr (simt_fits(QB, NCH, Elem<DT>::kVec)) {
    if (weighted) return same ? &simt_kernel<DT, QB, NCH, true, true> : &simt_kernel<DT, QB, NCH, false, true>;
    return same ? &simt_kernel<DT, QB, NCH, true, false> : &simt_kernel<DT, QB, NCH, false, false>;
  } else {
    return nullptr;
  }
}

template <DType DT, int QB>
KernelFn simt_by_chunks(int nch, bool same, bool weighted) {
  switch (nch) {
    case 1: return simt_instance<DT, QB, 1>(same, weighted);
    case 2: return simt_instance<DT, QB, 2>(same, weighted);
    case 4: return simt_instance<DT, QB, 4>(same, weighted);
    case 8: return simt_instance<DT, QB, 8>(same, weighted);
    default: return nullptr;
  }
}

template <DType DT>
KernelFn simt_table(int qb, int nch, bool same, bool weighted) {
  switch (qb) {
    case 1: return simt_by_chunks<DT, 1>(nch, same, weighted);
    case 4: return simt_by_chunks<DT, 4>(nch, same, weighted);
    default: return nullptr;
  }
}

// Defined one per dtype (simt_f32.cu, ...): the kernel for a plan, or nullptr.
KernelFn simt_f32(int qb, int nch, bool same, bool weighted);
KernelFn simt_f16(int qb, int nch, bool same, bool weighted);
KernelFn simt_bf16(int qb, int nch, bool same, bool weighted);

}  // namespace cuda_kernels
}  // namespace hen
