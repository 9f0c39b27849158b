"""Bulk regime (many queries, D or Dv > REGISTER_TILE_MAX_DIM = 256), and recall with large D.

Here a query block's output row (BM x Dv floats) no longer fits in registers,
so nothing of size D or Dv is held whole.  For each bank tile of BN rows the
score product is accumulated over the feature dim in BK-wide slices (the
(BM, BN) score tile is all that is kept), the online-softmax step runs on that
tile, and the weighted sum is added into the accumulator one BDV-wide slice at
a time.  The accumulator lives in global memory (the output itself when the
bank is not split, else the split workspace): each slice is read, rescaled,
updated and written back by the program that owns it, and stays hot in L2.
That round trip, 8·BM·Dv bytes per bank tile, is the kernel's cost beyond the
bank read (benchmarks/PERFORMANCE.md §4.2; the machine-code report shows it as
the accumulator loads and stores of the inner loop).  No B x N score matrix
ever exists.

With SPLIT (few queries) the bank is cut across programs as in
``small_d.py`` and ``combine.py`` merges the partials.  Feature weights as in
``small_d.py``: w∘q and ⟨w, x∘x⟩ per BK slice, from the slice's one load.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import configs
from .common import (DOT, autotune, exact_top_rows, finish, l2_direct, l2_scores, online_step, sq_dist,
                     stored_weights)

KEY = ["D", "DV", "SIM", "SPLIT", "BM", "HAS_WEIGHTS", "PRECISION"]


@autotune(configs.TILED_D, key=KEY, prune=configs.prune_tiled_d, reset_to_zero=["acc_ptr"])
@triton.jit
def tiled_d_kernel(
    q_ptr, x_ptr, v_ptr, w_ptr, beta_ptr,
    acc_ptr, m_ptr, l_ptr, top_s_ptr, top_i_ptr,
    B, N, D, DV, rows_per_split, offset,
    q_lead, q_row, x_lead, x_row, v_lead, v_row, w_lead, w_row,
    SIM: tl.constexpr, SPLIT: tl.constexpr, BM: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, BDV: tl.constexpr,
):
    qb = tl.program_id(0)
    split = tl.program_id(1)
    lead = tl.program_id(2).to(tl.int64)
    beta = tl.load(beta_ptr + lead)

    rows_q = qb * BM + tl.arange(0, BM)
    mask_q = rows_q < B
    q_rows = q_ptr + lead * q_lead + rows_q.to(tl.int64) * q_row
    w_rows = w_ptr + lead * w_lead + rows_q.to(tl.int64) * w_row
    x_base = x_ptr + lead * x_lead
    v_base = v_ptr + lead * v_lead
    slot = (lead * tl.num_programs(1) + split) * B + rows_q
    acc_base = acc_ptr + slot[:, None] * DV

    q_sq = tl.zeros([BM], tl.float32)
    if SIM != DOT:
        for k0 in range(0, D, BK):
            cols = k0 + tl.arange(0, BK)
            mask_qk = mask_q[:, None] & (cols < D)[None, :]
            qk = tl.load(q_rows[:, None] + cols[None, :], mask=mask_qk, other=0.0).to(tl.float32)
            if HAS_WEIGHTS:
                wk = tl.load(w_rows[:, None] + cols[None, :], mask=mask_qk, other=0.0)
                q_sq += tl.sum(wk * qk * qk, 1)
            else:
                q_sq += tl.sum(qk * qk, 1)

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    top_s = tl.full([BM], float("-inf"), tl.float32)
    top_i = tl.full([BM], -1, tl.int64)

    n_begin = split * rows_per_split
    n_end = tl.minimum(n_begin + rows_per_split, N)
    first = tl.cast(offset, tl.int64)  # offset may be a specialised constexpr; int64 before any sum
    for n0 in range(n_begin, n_end, BN):
        rows_n = n0 + tl.arange(0, BN)
        mask_n = rows_n < n_end
        x_rows = x_base + rows_n.to(tl.int64) * x_row
        dot = tl.zeros([BM, BN], tl.float32)
        if HAS_WEIGHTS:
            x_sq = tl.zeros([BM, BN], tl.float32)  # ⟨w, x∘x⟩ differs per query
        else:
            x_sq = tl.zeros([1, BN], tl.float32)
        for k0 in range(0, D, BK):
            cols = k0 + tl.arange(0, BK)
            mask_k = cols < D
            qk = tl.load(q_rows[:, None] + cols[None, :], mask=mask_q[:, None] & mask_k[None, :], other=0.0)
            xk = tl.load(x_rows[:, None] + cols[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            if UPCAST:  # the interpreter's bf16 tl.dot is wrong: compute in float32 there
                qk = qk.to(tl.float32)
                xk = xk.to(tl.float32)
            if HAS_WEIGHTS:
                wk = tl.load(w_rows[:, None] + cols[None, :], mask=mask_q[:, None] & mask_k[None, :], other=0.0)
                xf = xk.to(tl.float32)
                dot = tl.dot(wk * qk.to(tl.float32), tl.trans(xf), dot, input_precision=PRECISION)
                if SIM != DOT:
                    x_sq = tl.dot(wk, tl.trans(xf * xf), x_sq, input_precision=PRECISION)
            else:
                dot = tl.dot(qk, tl.trans(xk), dot, input_precision=PRECISION)
                if SIM != DOT:
                    xf = xk.to(tl.float32)
                    x_sq += tl.sum(xf * xf, 1)[None, :]
        if SIM == DOT:
            t = dot * beta
        else:
            sq_sum = q_sq[:, None] + x_sq
            d2 = l2_direct(sq_dist(dot, sq_sum), sq_sum, q_rows, x_rows, w_rows, mask_q, mask_n, D, HAS_WEIGHTS)
            t = l2_scores(d2, beta, SIM)
        t = tl.where(mask_n[None, :], t, float("-inf"))
        m_i, alpha, p, l_i, top_s, top_i = online_step(t, m_i, l_i, top_s, top_i, first + n0)
        pv, to_exact = stored_weights(p, v_ptr)
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
            a = a * alpha[:, None] + to_exact[:, None] * tl.dot(pv.to(vk.dtype), vk, input_precision=PRECISION)
            tl.store(a_ptrs, a, mask=a_mask)
        # The next tile reads these slices back through other threads of this program.
        tl.debug_barrier()

    if not SPLIT:
        inv, lse = finish(m_i, l_i)
        for d0 in range(0, DV, BDV):
            cols = d0 + tl.arange(0, BDV)
            a_ptrs = acc_base + cols[None, :]
            a_mask = mask_q[:, None] & (cols < DV)[None, :]
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            tl.store(a_ptrs, a * inv[:, None], mask=a_mask)
        tl.store(m_ptr + slot, lse, mask=mask_q)
    else:
        tl.store(m_ptr + slot, m_i, mask=mask_q)
        tl.store(l_ptr + slot, l_i, mask=mask_q)
    tl.store(top_s_ptr + slot, top_s, mask=mask_q)
    tl.store(top_i_ptr + slot, top_i, mask=mask_q)
    exact_top_rows(acc_ptr, m_ptr, top_s_ptr, top_i_ptr, (lead * tl.num_programs(1) + split) * B + qb * BM,
                   B - qb * BM, first, v_base, v_row, DV, BM, SPLIT, PRECISION)
