"""Merge the per-split partials of ``small_d.py`` / ``tiled_d.py`` (flash-decoding's combine step).

One program per (query, BDV-wide slice of the output): the splits' running
maxima and sums give each split's weight exp(m_s - M), the output is the
weighted sum of their accumulators over the total sum, lse = M + log(sum);
the top row is the best split's, ties going to the smallest row (docs/design.md
§5.1).  The splits are walked BS at a time, so the registers a program holds do
not grow with their number (all of them at once spilled from 264 splits on, in
the machine-code report), and the sums run in float64 like every other merge
of partials (§5.1): their error does not grow with the number of splits.
"""
from __future__ import annotations

import triton
import triton.language as tl

NO_ROW = tl.constexpr(9223372036854775807)


@triton.jit
def combine_kernel(
    acc_ptr, m_ptr, l_ptr, ts_ptr, ti_ptr,
    out_ptr, lse_ptr, top_s_ptr, top_i_ptr,
    B, DV, n_splits,
    BS: tl.constexpr, BDV: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # lead * B + b
    lead = row // B
    b = row % B
    base = lead * n_splits * B + b  # split s of this query sits at base + s * B

    m_all = tl.full([], float("-inf"), tl.float32)
    for s0 in range(0, n_splits, BS):
        splits = s0 + tl.arange(0, BS)
        m = tl.load(m_ptr + base + splits * B, mask=splits < n_splits, other=float("-inf"))
        m_all = tl.maximum(m_all, tl.max(m, 0))
    m_ref = tl.where(m_all == float("-inf"), 0.0, m_all)

    cols = tl.program_id(1) * BDV + tl.arange(0, BDV)
    mask_v = cols < DV
    total = tl.zeros([], tl.float64)
    out = tl.zeros([BDV], tl.float64)
    for s0 in range(0, n_splits, BS):
        splits = s0 + tl.arange(0, BS)
        mask_s = splits < n_splits
        slot = base + splits * B
        m = tl.load(m_ptr + slot, mask=mask_s, other=float("-inf"))
        s = tl.load(l_ptr + slot, mask=mask_s, other=0.0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_ref))
        total += tl.sum((w * s).to(tl.float64), 0)  # NaN when any split saw a NaN query
        a = tl.load(acc_ptr + slot[:, None] * DV + cols[None, :], mask=mask_s[:, None] & mask_v[None, :], other=0.0)
        out += tl.sum((a * w[:, None]).to(tl.float64), 0)
    scale = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), tl.where(total == total, 0.0, total))
    tl.store(out_ptr + row * DV + cols, (out * scale).to(tl.float32), mask=mask_v)

    if tl.program_id(1) == 0:
        t32 = total.to(tl.float32)
        lse = tl.where(t32 > 0, m_ref + tl.log(tl.where(t32 > 0, t32, 1.0)), tl.where(t32 == t32, float("-inf"), t32))
        tl.store(lse_ptr + row, lse)
        best = tl.full([], float("-inf"), tl.float32)
        first = tl.full([], NO_ROW, tl.int64)
        for s0 in range(0, n_splits, BS):
            splits = s0 + tl.arange(0, BS)
            mask_s = splits < n_splits
            ts = tl.load(ts_ptr + base + splits * B, mask=mask_s, other=float("-inf"))
            ti = tl.load(ti_ptr + base + splits * B, mask=mask_s, other=-1)
            chunk_best = tl.max(ts, 0)
            chunk_first = tl.min(tl.where((ts == chunk_best) & (ti >= 0), ti, NO_ROW), 0)
            # Splits hold increasing rows, so an equal score in a later chunk never wins.
            take = (chunk_best > best) & (chunk_first != NO_ROW)
            first = tl.where(take, chunk_first, first)
            best = tl.where(take, chunk_best, best)
        tl.store(top_s_ptr + row, best)
        tl.store(top_i_ptr + row, tl.where(first == NO_ROW, -1, first))
