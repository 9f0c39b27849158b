"""Layer regime (D, Dv <= REGISTER_TILE_MAX_DIM = 256): a flash-attention-style kernel.

One program owns a block of BM queries and walks its share of the bank in
tiles of BN rows.  Each bank tile is loaded once and used for both products
(scores against the queries, then the weighted sum), since keys = values =
the stored patterns unless separate values are given.  The query block, the
accumulator (BM x Dv) and the running max / sum / top live in registers.

With SPLITS > 1 the bank is cut into SPLITS contiguous ranges, one program per
(query block, range): this is how the recall regime (few queries, huge N)
gets enough programs to fill the GPU, flash-decoding style.  Each program
then leaves an unnormalised partial (accumulator, max, sum, top) in a
workspace that ``combine.py`` merges.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import INTERPRET, autotune, beta_sim, online_step

_CONFIGS = (
    [triton.Config({"BN": 16}, num_warps=4, num_stages=1), triton.Config({"BN": 32}, num_warps=4, num_stages=1)]
    if INTERPRET
    else [
        triton.Config({"BN": bn}, num_warps=w, num_stages=s)
        for bn in (32, 64, 128)
        for w in (4, 8)
        for s in (2, 3, 4)
    ]
)


@autotune(_CONFIGS, key=["D", "DV", "SIM", "SPLITS", "BM", "VALUES_ARE_MEMORY"])
@triton.jit
def small_d_kernel(
    q_ptr, x_ptr, v_ptr, beta_ptr,
    out_ptr, m_ptr, l_ptr, top_s_ptr, top_i_ptr,
    B, N, D, DV, rows_per_split, offset,
    q_lead, q_row, x_lead, x_row, v_lead, v_row,
    SIM: tl.constexpr, SPLITS: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    VALUES_ARE_MEMORY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BN: tl.constexpr,
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

    q = tl.load(q_ptr + lead * q_lead + rows_q[:, None].to(tl.int64) * q_row + cols_d[None, :],
                mask=mask_q[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:  # the interpreter's bf16 tl.dot is wrong: compute in float32 there
        q = q.to(tl.float32)
    qf = q.to(tl.float32)
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
    for n0 in range(n_begin, n_end, BN):
        rows_n = n0 + tl.arange(0, BN)
        mask_n = rows_n < n_end
        x = tl.load(x_base + rows_n[:, None].to(tl.int64) * x_row + cols_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        xf = x.to(tl.float32)
        dot = tl.dot(q, tl.trans(x), input_precision=PRECISION)
        t = beta_sim(dot, q_sq, tl.sum(xf * xf, 1), beta, SIM)
        t = tl.where(mask_n[None, :], t, float("-inf"))
        m_i, alpha, p, l_i, top_s, top_i = online_step(t, m_i, l_i, top_s, top_i, (offset + n0).to(tl.int64))
        if VALUES_ARE_MEMORY:
            v = x
        else:
            v = tl.load(v_base + rows_n[:, None].to(tl.int64) * v_row + cols_v[None, :],
                        mask=mask_n[:, None] & mask_v[None, :], other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)

    slot = (lead * SPLITS + split) * B + rows_q
    if SPLITS == 1:
        # Final answer: normalise here (an empty bank leaves out = 0 and lse = -inf).
        inv = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), tl.where(l_i == l_i, 0.0, l_i))
        acc = acc * inv[:, None]
        lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), tl.where(l_i == l_i, float("-inf"), l_i))
        tl.store(m_ptr + slot, lse, mask=mask_q)
    else:
        tl.store(m_ptr + slot, m_i, mask=mask_q)
        tl.store(l_ptr + slot, l_i, mask=mask_q)
    tl.store(out_ptr + slot[:, None] * DV + cols_v[None, :], acc, mask=mask_q[:, None] & mask_v[None, :])
    tl.store(top_s_ptr + slot, top_s, mask=mask_q)
    tl.store(top_i_ptr + slot, top_i, mask=mask_q)
