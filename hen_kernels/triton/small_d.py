"""Layer regime (D, Dv <= REGISTER_TILE_MAX_DIM = 256): a flash-attention-style kernel.

One program owns a block of BM queries and walks its share of the bank in
tiles of BN rows.  Each bank tile is loaded once and used for both products
(scores against the queries, then the weighted sum), since keys = values =
the stored patterns unless separate values are given.  The query block, the
accumulator (BM x Dv) and the running max / sum / top live in registers.

With SPLIT the bank is cut into contiguous ranges, one program per (query
block, range; the grid's second axis, so their number is a run-time value and
one compile serves every bank size): this is how the recall regime (few
queries, huge N) gets enough programs to fill the GPU, flash-decoding style.
Each program then leaves an unnormalised partial (accumulator, max, sum, top)
in a workspace that ``combine.py`` merges.

Feature weights (HAS_WEIGHTS, docs/design.md §5.1): the score product takes
w∘q as its query, in float32 at PRECISION (16-bit tensor-core operands would
round w∘q to 8 or 11 bits); the ℓ2 forms add ⟨w, x∘x⟩ as a second product
with the squared bank tile of the same load.
"""
from __future__ import annotations

import triton.language as tl
import triton

from . import configs
from .common import (DOT, autotune, exact_top_rows, finish, l2_direct, l2_scores, online_step, sq_dist,
                     stored_weights)

# Tuned once per padded width and kind of launch, not per D or bank size (docs/design.md §6.1).
KEY = ["BD", "BDV", "SIM", "SPLIT", "BM", "VALUES_ARE_MEMORY", "HAS_WEIGHTS", "PRECISION"]


@autotune(configs.SMALL_D, key=KEY, prune=configs.prune_small_d)
@triton.jit
def small_d_kernel(
    q_ptr, x_ptr, v_ptr, w_ptr, beta_ptr,
    out_ptr, m_ptr, l_ptr, top_s_ptr, top_i_ptr,
    B, N, D, DV, rows_per_split, offset,
    q_lead, q_row, x_lead, x_row, v_lead, v_row, w_lead, w_row,
    SIM: tl.constexpr, SPLIT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    VALUES_ARE_MEMORY: tl.constexpr, HAS_WEIGHTS: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BN: tl.constexpr,
):
    qb = tl.program_id(0)
    split = tl.program_id(1)
    lead = tl.program_id(2).to(tl.int64)
    beta = tl.load(beta_ptr + lead)

    rows_q = qb * BM + tl.arange(0, BM)
    cols_d = tl.arange(0, BD)
    cols_v = tl.arange(0, BDV)
    mask_q = rows_q < B
    mask_d = cols_d < D
    mask_v = cols_v < DV
    mask_qd = mask_q[:, None] & mask_d[None, :]

    q_rows = q_ptr + lead * q_lead + rows_q.to(tl.int64) * q_row
    q = tl.load(q_rows[:, None] + cols_d[None, :], mask=mask_qd, other=0.0)
    if UPCAST:  # the interpreter's bf16 tl.dot is wrong: compute in float32 there
        q = q.to(tl.float32)
    qf = q.to(tl.float32)
    w_rows = w_ptr + lead * w_lead + rows_q.to(tl.int64) * w_row
    if HAS_WEIGHTS:
        w = tl.load(w_rows[:, None] + cols_d[None, :], mask=mask_qd, other=0.0)
        qs = w * qf
        q_sq = tl.sum(qs * qf, 1)
    else:
        qs = q
        q_sq = tl.sum(qf * qf, 1)

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    top_s = tl.full([BM], float("-inf"), tl.float32)
    top_i = tl.full([BM], -1, tl.int64)
    acc = tl.zeros([BM, BDV], tl.float32)

    n_begin = split * rows_per_split
    n_end = tl.minimum(n_begin + rows_per_split, N)
    x_base = x_ptr + lead * x_lead
    v_base = v_ptr + lead * v_lead
    first = tl.cast(offset, tl.int64)  # offset may be a specialised constexpr; int64 before any sum
    for n0 in range(n_begin, n_end, BN):
        rows_n = n0 + tl.arange(0, BN)
        mask_n = rows_n < n_end
        x_rows = x_base + rows_n.to(tl.int64) * x_row
        x = tl.load(x_rows[:, None] + cols_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        if HAS_WEIGHTS:
            xf = x.to(tl.float32)
            dot = tl.dot(qs, tl.trans(xf), input_precision=PRECISION)
        else:
            dot = tl.dot(qs, tl.trans(x), input_precision=PRECISION)
        if SIM == DOT:
            t = dot * beta
        else:
            if HAS_WEIGHTS:
                sq_sum = q_sq[:, None] + tl.dot(w, tl.trans(xf * xf), input_precision=PRECISION)
            else:
                xf = x.to(tl.float32)
                sq_sum = q_sq[:, None] + tl.sum(xf * xf, 1)[None, :]
            d2 = l2_direct(sq_dist(dot, sq_sum), sq_sum, q_rows, x_rows, w_rows, mask_q, mask_n, D, HAS_WEIGHTS)
            t = l2_scores(d2, beta, SIM)
        t = tl.where(mask_n[None, :], t, float("-inf"))
        m_i, alpha, p, l_i, top_s, top_i = online_step(t, m_i, l_i, top_s, top_i, first + n0)
        if VALUES_ARE_MEMORY:
            v = x
        else:
            v = tl.load(v_base + rows_n[:, None].to(tl.int64) * v_row + cols_v[None, :],
                        mask=mask_n[:, None] & mask_v[None, :], other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
        pv, to_exact = stored_weights(p, v_ptr)
        acc = acc * alpha[:, None] + to_exact[:, None] * tl.dot(pv.to(v.dtype), v, input_precision=PRECISION)

    slot = (lead * tl.num_programs(1) + split) * B + rows_q
    if not SPLIT:
        # Final answer: normalise here (an empty bank leaves out = 0 and lse = -inf).
        inv, lse = finish(m_i, l_i)
        acc = acc * inv[:, None]
        tl.store(m_ptr + slot, lse, mask=mask_q)
    else:
        tl.store(m_ptr + slot, m_i, mask=mask_q)
        tl.store(l_ptr + slot, l_i, mask=mask_q)
    tl.store(out_ptr + slot[:, None] * DV + cols_v[None, :], acc, mask=mask_q[:, None] & mask_v[None, :])
    tl.store(top_s_ptr + slot, top_s, mask=mask_q)
    tl.store(top_i_ptr + slot, top_i, mask=mask_q)
    exact_top_rows(out_ptr, m_ptr, top_s_ptr, top_i_ptr, (lead * tl.num_programs(1) + split) * B + qb * BM,
                   B - qb * BM, first, v_base, v_row, DV, BM, SPLIT, PRECISION)
