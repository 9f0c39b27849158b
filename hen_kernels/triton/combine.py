"""Merge the per-split partials of ``small_d.py`` / ``tiled_d.py`` (flash-decoding's combine step).

One program per (query, BDV-wide slice of the output): the splits' running
maxima and sums give each split's weight exp(m_s - M), the output is the
weighted sum of their accumulators over the total sum, lse = M + log(sum);
the top row is the best split's, ties going to the smaller row.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def combine_kernel(
    acc_ptr, m_ptr, l_ptr, ts_ptr, ti_ptr,
    out_ptr, lse_ptr, top_s_ptr, top_i_ptr,
    B, DV,
    SPLITS: tl.constexpr, BS: tl.constexpr, BDV: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # lead * B + b
    lead = row // B
    b = row % B
    splits = tl.arange(0, BS)
    mask_s = splits < SPLITS
    slot = (lead * SPLITS + splits) * B + b
    m = tl.load(m_ptr + slot, mask=mask_s, other=float("-inf"))
    s = tl.load(l_ptr + slot, mask=mask_s, other=0.0)
    m_all = tl.max(m, 0)
    m_ref = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_ref))
    total = tl.sum(w * s, 0)  # NaN when any split saw a NaN query
    scale = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), tl.where(total == total, 0.0, total))

    cols = tl.program_id(1) * BDV + tl.arange(0, BDV)
    mask_v = cols < DV
    a = tl.load(acc_ptr + slot[:, None] * DV + cols[None, :], mask=mask_s[:, None] & mask_v[None, :], other=0.0)
    out = tl.sum(a * (w * scale)[:, None], 0)
    tl.store(out_ptr + row * DV + cols, out, mask=mask_v)

    if tl.program_id(1) == 0:
        lse = tl.where(total > 0, m_ref + tl.log(tl.where(total > 0, total, 1.0)), tl.where(total == total, float("-inf"), total))
        tl.store(lse_ptr + row, lse)
        ts = tl.load(ts_ptr + slot, mask=mask_s, other=float("-inf"))
        ti = tl.load(ti_ptr + slot, mask=mask_s, other=-1)
        best = tl.max(ts, 0)
        cand = tl.where((ts == best) & (ti >= 0), ti, 9223372036854775807)
        first = tl.min(cand, 0)
        tl.store(top_s_ptr + row, best)
        tl.store(top_i_ptr + row, tl.where(first == 9223372036854775807, -1, first))
