"""Bulk regime (many queries, D or Dv > REGISTER_TILE_MAX_DIM = 256), and recall with large D.

Here a query block's output row (BM x Dv floats) no longer fits in registers,
so nothing of size D or Dv is held whole.  For each bank tile of BN rows the
score product is accumulated over the feature dim in BK-wide slices (the
(BM, BN) score tile is all that is kept), the online-softmax step runs on that
tile, and the weighted sum is added into the accumulator one BDV-wide slice at
a time.  The accumulator lives in global memory (the output itself when the
bank is not split, else the split workspace): each slice is read, rescaled,
updated and written back by the program that owns it, and stays hot in L2.
No B x N score matrix ever exists.

With SPLITS > 1 (few queries) the bank is cut across programs as in
``small_d.py`` and ``combine.py`` merges the partials.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import DOT, INTERPRET, autotune, beta_sim, online_step

_CONFIGS = (
    [triton.Config({"BN": 16, "BK": 32, "BDV": 32}, num_warps=4, num_stages=1)]
    if INTERPRET
    else [
        triton.Config({"BN": bn, "BK": bk, "BDV": bdv}, num_warps=w, num_stages=s)
        for bn in (32, 64)
        for bk in (64, 128)
        for bdv in (64, 128)
        for w in (4, 8)
        for s in (2, 3)
    ]
)


@autotune(_CONFIGS, key=["D", "DV", "SIM", "SPLITS", "BM"], reset_to_zero=["acc_ptr"])
@triton.jit
def tiled_d_kernel(
    q_ptr, x_ptr, v_ptr, beta_ptr,
    acc_ptr, m_ptr, l_ptr, top_s_ptr, top_i_ptr,
    B, N, D, DV, rows_per_split, offset,
    q_lead, q_row, x_lead, x_row, v_lead, v_row,
    SIM: tl.constexpr, SPLITS: tl.constexpr, BM: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, BDV: tl.constexpr,
):
    qb = tl.program_id(0)
    split = tl.program_id(1)
    lead = tl.program_id(2).to(tl.int64)
    beta = tl.load(beta_ptr + lead)

    rows_q = qb * BM + tl.arange(0, BM)
    mask_q = rows_q < B
    q_base = q_ptr + lead * q_lead + rows_q[:, None].to(tl.int64) * q_row
    x_base = x_ptr + lead * x_lead
    v_base = v_ptr + lead * v_lead
    slot = (lead * SPLITS + split) * B + rows_q
    acc_base = acc_ptr + slot[:, None] * DV

    q_sq = tl.zeros([BM], tl.float32)
    if SIM != DOT:
        for k0 in range(0, D, BK):
            cols = k0 + tl.arange(0, BK)
            qk = tl.load(q_base + cols[None, :], mask=mask_q[:, None] & (cols < D)[None, :], other=0.0)
            qk = qk.to(tl.float32)
            q_sq += tl.sum(qk * qk, 1)

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    top_s = tl.full([BM], float("-inf"), tl.float32)
    top_i = tl.full([BM], -1, tl.int64)

    n_begin = split * rows_per_split
    n_end = tl.minimum(n_begin + rows_per_split, N)
    for n0 in range(n_begin, n_end, BN):
        rows_n = n0 + tl.arange(0, BN)
        mask_n = rows_n < n_end
        x_rows = x_base + rows_n[:, None].to(tl.int64) * x_row
        dot = tl.zeros([BM, BN], tl.float32)
        x_sq = tl.zeros([BN], tl.float32)
        for k0 in range(0, D, BK):
            cols = k0 + tl.arange(0, BK)
            mask_k = cols < D
            qk = tl.load(q_base + cols[None, :], mask=mask_q[:, None] & mask_k[None, :], other=0.0)
            xk = tl.load(x_rows + cols[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            if UPCAST:  # the interpreter's bf16 tl.dot is wrong: compute in float32 there
                qk = qk.to(tl.float32)
                xk = xk.to(tl.float32)
            dot = tl.dot(qk, tl.trans(xk), dot, input_precision=PRECISION)
            if SIM != DOT:
                xf = xk.to(tl.float32)
                x_sq += tl.sum(xf * xf, 1)
        t = beta_sim(dot, q_sq, x_sq, beta, SIM)
        t = tl.where(mask_n[None, :], t, float("-inf"))
        m_i, alpha, p, l_i, top_s, top_i = online_step(t, m_i, l_i, top_s, top_i, (offset + n0).to(tl.int64))
        v_rows = v_base + rows_n[:, None].to(tl.int64) * v_row
        for d0 in range(0, DV, BDV):
            cols = d0 + tl.arange(0, BDV)
            mask_v = cols < DV
            vk = tl.load(v_rows + cols[None, :], mask=mask_n[:, None] & mask_v[None, :], other=0.0)
            if UPCAST:
                vk = vk.to(tl.float32)
            a_ptrs = acc_base + cols[None, :]
            a_mask = mask_q[:, None] & mask_v[None, :]
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            a = a * alpha[:, None] + tl.dot(p.to(vk.dtype), vk, input_precision=PRECISION)
            tl.store(a_ptrs, a, mask=a_mask)
        # The next tile reads these slices back through other threads of this program.
        tl.debug_barrier()

    if SPLITS == 1:
        inv = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), tl.where(l_i == l_i, 0.0, l_i))
        for d0 in range(0, DV, BDV):
            cols = d0 + tl.arange(0, BDV)
            a_ptrs = acc_base + cols[None, :]
            a_mask = mask_q[:, None] & (cols < DV)[None, :]
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            tl.store(a_ptrs, a * inv[:, None], mask=a_mask)
        lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), tl.where(l_i == l_i, float("-inf"), l_i))
        tl.store(m_ptr + slot, lse, mask=mask_q)
    else:
        tl.store(m_ptr + slot, m_i, mask=mask_q)
        tl.store(l_ptr + slot, l_i, mask=mask_q)
    tl.store(top_s_ptr + slot, top_s, mask=mask_q)
    tl.store(top_i_ptr + slot, top_i, mask=mask_q)
