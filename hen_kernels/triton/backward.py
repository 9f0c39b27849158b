"""Fused backward of the Hopfield update (layer regime, D and Dv within ``serves``), flash-attention style.

The forward saved only ``out`` (L, B, Dv) and ``lse`` (L, B).  Both kernels
here recompute each score tile from the inputs and turn it into the softmax
weights with the saved lse, P = exp(beta · sim - lse), so no B x N matrix is
ever stored.  The formulas are those of ``hen_kernels/backward_cpu.py`` (the
streaming PyTorch path, its docstring derives them): with Δ = rowsum(dout ∘ out)
- dlse, dt = P ∘ (dout Vᵀ - Δ), G = beta·dt (dot, l2sq) or -beta·dt / s (l2); each
query's top row leaves the products, its dt taken as P · gap in dbeta's terms
(``backward_cpu.top_row_gaps``), and the wrapper adds it to dq and dX after the kernels
(``backward_cpu.settle_top_rows``).

* ``dq_kernel``: one program per (query block, bank range, leading index)
  walks its bank range in BN-row tiles and accumulates dq = G X (- rowsum(G) q
  for l2, l2sq) and dbeta's terms (Σ dt ∘ s, Σ dt, Σ P ∘ s, Σ P per query:
  ``backward_cpu.dbeta_from_terms``) for its rows, in registers.
* ``dkv_kernel``: one program per (bank tile, query range, bank leading
  index) keeps its X and V tiles in registers and walks the queries (every
  leading index when the bank is shared by all of them), accumulating
  dV = Pᵀ dout and dX = Gᵀ q (- colsum(G) x).

Two kernels that each recompute P, rather than one with atomic adds into dq,
keep the result deterministic.  When either grid would leave the GPU idle (few
queries against a long bank for the first, a short bank for the second) the
walked range is split across programs, which write partial sums to a
workspace that is summed afterwards (its size depends on the split count, not
on N for the first kernel and not on B for the second).  Products take 16-bit
inputs as they are (and the float32 weights P, G rounded to them, as
flash-attention does), float32 inputs at ``launch.fp32_precision()``; the ℓ2
forms follow docs/design.md §5.1 like the forward (the same P near a stored
pattern).  Feature weights are not taken here: backends.py sends weighted
calls to the streaming backward.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import backward_cpu
from ..constants import MIN_SPLIT_ROWS, REGISTER_TILE_MAX_DIM, SIMILARITY_CODES
from . import configs
from .common import DOT, INTERPRET, L2, autotune, l2_direct, l2_scores, sq_dist
from .interpreted_products import as_on_gpu
from .launch import _pow2, _sm_count, fp32_precision


@triton.jit
def _tile(q, x, v, dout, lse, delta, top, gap, beta, q_sq, x_sq, q_rows, x_rows, rows_n, mask_q, mask_n, D,
          SIM: tl.constexpr, PRECISION: tl.constexpr):
    """Recompute one (BM, BN) tile: P, dt, s and the chain-rule coefficients G (all float32)."""
    dot = tl.dot(q, tl.trans(x), input_precision=PRECISION)
    if SIM == DOT:
        s = dot
    else:
        sq_sum = q_sq[:, None] + x_sq[None, :]
        d2 = l2_direct(sq_dist(dot, sq_sum), sq_sum, q_rows, x_rows, q_rows, mask_q, mask_n, D, False)
        s = l2_scores(d2, 1.0, SIM)
    valid = mask_q[:, None] & mask_n[None, :]
    t = tl.where(valid, s * beta, float("-inf"))
    p = tl.exp(t - lse[:, None])
    dp = tl.dot(dout.to(v.dtype), tl.trans(v), input_precision=PRECISION)
    # A query's top row: dP - Δ as its gap, a difference taken first, for dbeta's terms, and no G (the
    # wrapper's backward_cpu.settle_top_rows gives it one): a saturated softmax's dt there is nearly 0,
    # and dP - Δ of two products only the rounding of |dout| |v|.
    at_top = rows_n[None, :] == top[:, None]
    dt = tl.where(valid, p * tl.where(at_top, gap[:, None], dp - delta[:, None]), 0.0)
    ds = tl.where(at_top, 0.0, dt) * beta
    if SIM == L2:
        neg = s < 0
        g = tl.where(neg, -ds / tl.where(neg, s, 1.0), 0.0)
    else:
        g = ds
    return p, dt, tl.where(valid, s, 0.0), g


# Tuned once per padded width, not per D or bank size (the split count is the grid's, read at run time).
KEY_DQ = ["BD", "BDV", "SIM", "VALUES_ARE_MEMORY", "PRECISION"]


@autotune(configs.BACKWARD, key=KEY_DQ, prune=configs.prune_backward)
@triton.jit
def dq_kernel(
    q_ptr, x_ptr, v_ptr, beta_ptr, dout_ptr, lse_ptr, delta_ptr, top_ptr, gap_ptr, dq_ptr, dbeta_ptr,
    B, N, D, DV, rows_per_split,
    q_lead, q_row, x_lead, x_row, v_lead, v_row,
    SIM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    VALUES_ARE_MEMORY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
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
    q_rows = q_ptr + lead * q_lead + rows_q.to(tl.int64) * q_row
    q = tl.load(q_rows[:, None] + cols_d[None, :], mask=mask_q[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:  # the interpreter's bf16 tl.dot is wrong: compute in float32 there
        q = q.to(tl.float32)
    qf = q.to(tl.float32)
    q_sq = tl.sum(qf * qf, 1)
    row = lead * B + rows_q
    dout = tl.load(dout_ptr + row[:, None] * DV + cols_v[None, :], mask=mask_q[:, None] & mask_v[None, :], other=0.0)
    lse = tl.load(lse_ptr + row, mask=mask_q, other=0.0)
    delta = tl.load(delta_ptr + row, mask=mask_q, other=0.0)
    top = tl.load(top_ptr + row, mask=mask_q, other=-1)
    gap = tl.load(gap_ptr + row, mask=mask_q, other=0.0)

    acc = tl.zeros([BM, BD], tl.float32)
    g_rows = tl.zeros([BM], tl.float32)
    db = tl.zeros([BM], tl.float32)  # dbeta's terms: Σ dt s, Σ dt, Σ P s, Σ P (backward_cpu.dbeta_from_terms)
    dt_sum = tl.zeros([BM], tl.float32)
    ps_sum = tl.zeros([BM], tl.float32)
    p_sum = tl.zeros([BM], tl.float32)
    n_begin = split * rows_per_split
    n_end = tl.minimum(n_begin + rows_per_split, N)
    x_base = x_ptr + lead * x_lead
    v_base = v_ptr + lead * v_lead
    if SIM != DOT:
        # dq = Σ G (x - q) cancels in G X - rowsum(G) q where q sits next to the rows: both sides take
        # a row of the bank off first (translation invariance), so what cancels is the bank's spread.
        centre = tl.load(x_base + n_begin.to(tl.int64) * x_row + cols_d, mask=mask_d & (n_begin < N),
                         other=0.0).to(tl.float32)
    for n0 in range(n_begin, n_end, BN):
        rows_n = n0 + tl.arange(0, BN)
        mask_n = rows_n < n_end
        x_rows = x_base + rows_n.to(tl.int64) * x_row
        x = tl.load(x_rows[:, None] + cols_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        if VALUES_ARE_MEMORY:
            v = x
        else:
            v = tl.load(v_base + rows_n[:, None].to(tl.int64) * v_row + cols_v[None, :],
                        mask=mask_n[:, None] & mask_v[None, :], other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
        xf = x.to(tl.float32)
        p, dt, s, g = _tile(q, x, v, dout, lse, delta, top, gap, beta, q_sq, tl.sum(xf * xf, 1), q_rows, x_rows,
                            rows_n, mask_q, mask_n, D, SIM, PRECISION)
        if SIM == DOT:
            acc += tl.dot(g.to(x.dtype), x, input_precision=PRECISION)
        else:
            # Each query's heaviest row of the tile (the stored row it sits on, in recall) leaves the
            # product: its G (x - q) is a difference taken here, where the product and the rowsum term
            # cancelled to the rounding of |G| |x - centre| (dq 5e-2 off with a gradient for lse).
            best = tl.argmax(p, 1)
            at_best = tl.arange(0, BN)[None, :] == best[:, None]
            g_best = tl.sum(tl.where(at_best, g, 0.0), 1)
            g = tl.where(at_best, 0.0, g)
            acc += tl.dot(g.to(x.dtype), (xf - centre[None, :]).to(x.dtype), input_precision=PRECISION)
            x_best = tl.load(x_base + (n0 + best).to(tl.int64)[:, None] * x_row + cols_d[None, :],
                             mask=((n0 + best) < n_end)[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            acc += g_best[:, None] * (x_best - qf)
        g_rows += tl.sum(g, 1)
        db += tl.sum(dt * s, 1)
        dt_sum += tl.sum(dt, 1)
        ps_sum += tl.sum(p * s, 1)
        p_sum += tl.sum(p, 1)
    if SIM != DOT:
        acc -= g_rows[:, None] * (qf - centre[None, :])

    slot = (lead * tl.num_programs(1) + split) * B + rows_q
    tl.store(dq_ptr + slot[:, None] * D + cols_d[None, :], acc, mask=mask_q[:, None] & mask_d[None, :])
    terms = tl.num_programs(2).to(tl.int64) * tl.num_programs(1) * B  # the workspace's (L, splits, B) per term
    tl.store(dbeta_ptr + slot, db, mask=mask_q)
    tl.store(dbeta_ptr + terms + slot, dt_sum, mask=mask_q)
    tl.store(dbeta_ptr + 2 * terms + slot, ps_sum, mask=mask_q)
    tl.store(dbeta_ptr + 3 * terms + slot, p_sum, mask=mask_q)


KEY_DKV = ["BD", "BDV", "SIM", "SHARED", "VALUES_ARE_MEMORY", "PRECISION"]


@autotune(configs.BACKWARD, key=KEY_DKV, prune=configs.prune_backward)
@triton.jit
def dkv_kernel(
    q_ptr, x_ptr, v_ptr, beta_ptr, dout_ptr, lse_ptr, delta_ptr, top_ptr, gap_ptr, dx_ptr, dv_ptr,
    L, B, N, D, DV, rows_per_split,
    q_lead, q_row, x_lead, x_row, v_lead, v_row,
    SIM: tl.constexpr, SHARED: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    VALUES_ARE_MEMORY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    nb = tl.program_id(0)
    split = tl.program_id(1)
    bank = tl.program_id(2).to(tl.int64)

    rows_n = nb * BN + tl.arange(0, BN)
    cols_d = tl.arange(0, BD)
    cols_v = tl.arange(0, BDV)
    mask_n = rows_n < N
    mask_d = cols_d < D
    mask_v = cols_v < DV
    x_rows = x_ptr + bank * x_lead + rows_n.to(tl.int64) * x_row
    x = tl.load(x_rows[:, None] + cols_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:  # the interpreter's bf16 tl.dot is wrong: compute in float32 there
        x = x.to(tl.float32)
    if VALUES_ARE_MEMORY:
        v = x
    else:
        v = tl.load(v_ptr + bank * v_lead + rows_n[:, None].to(tl.int64) * v_row + cols_v[None, :],
                    mask=mask_n[:, None] & mask_v[None, :], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
    xf = x.to(tl.float32)
    x_sq = tl.sum(xf * xf, 1)
    # dX = Gᵀ q - colsum(G) x as Gᵀ (q - c) - colsum(G) (x - c), c = the tile's first row: as in dq_kernel
    centre = tl.sum(tl.where((tl.arange(0, BN) == 0)[:, None], xf, 0.0), 0)

    acc_x = tl.zeros([BN, BD], tl.float32)
    acc_v = tl.zeros([BN, BDV], tl.float32)
    g_cols = tl.zeros([BN], tl.float32)
    if SHARED:  # one bank for every leading index: collect from all of them
        l_begin = 0
        l_end = L
    else:
        l_begin = bank
        l_end = bank + 1
    m_begin = split * rows_per_split
    m_end = tl.minimum(m_begin + rows_per_split, B)
    for lead in range(l_begin, l_end):
        beta = tl.load(beta_ptr + lead)
        for m0 in range(m_begin, m_end, BM):
            rows_q = m0 + tl.arange(0, BM)
            mask_q = rows_q < m_end
            q_rows = q_ptr + lead * q_lead + rows_q.to(tl.int64) * q_row
            q = tl.load(q_rows[:, None] + cols_d[None, :], mask=mask_q[:, None] & mask_d[None, :], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            qf = q.to(tl.float32)
            row = lead * B + rows_q
            dout = tl.load(dout_ptr + row[:, None] * DV + cols_v[None, :],
                           mask=mask_q[:, None] & mask_v[None, :], other=0.0)
            lse = tl.load(lse_ptr + row, mask=mask_q, other=0.0)
            delta = tl.load(delta_ptr + row, mask=mask_q, other=0.0)
            top = tl.load(top_ptr + row, mask=mask_q, other=-1)
            gap = tl.load(gap_ptr + row, mask=mask_q, other=0.0)
            p, dt, s, g = _tile(q, x, v, dout, lse, delta, top, gap, beta, tl.sum(qf * qf, 1), x_sq, q_rows,
                                x_rows, rows_n, mask_q, mask_n, D, SIM, PRECISION)
            acc_v += tl.dot(tl.trans(p.to(v.dtype)), dout.to(v.dtype), input_precision=PRECISION)
            if SIM == DOT:
                acc_x += tl.dot(tl.trans(g.to(q.dtype)), q, input_precision=PRECISION)
            else:
                # Each row's heaviest query leaves the product, as in dq_kernel: G (q - x) as a difference.
                best = tl.argmax(p, 0)
                at_best = tl.arange(0, BM)[:, None] == best[None, :]
                g_best = tl.sum(tl.where(at_best, g, 0.0), 0)
                g = tl.where(at_best, 0.0, g)
                acc_x += tl.dot(tl.trans(g.to(q.dtype)), (qf - centre[None, :]).to(q.dtype),
                                input_precision=PRECISION)
                q_best = tl.load(q_ptr + lead * q_lead + (m0 + best).to(tl.int64)[:, None] * q_row + cols_d[None, :],
                                 mask=((m0 + best) < m_end)[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
                acc_x += g_best[:, None] * (q_best - xf)
            g_cols += tl.sum(g, 0)
    if SIM != DOT:
        acc_x -= g_cols[:, None] * (xf - centre[None, :])

    slot = (bank * tl.num_programs(1) + split) * N + rows_n
    tl.store(dx_ptr + slot[:, None] * D + cols_d[None, :], acc_x, mask=mask_n[:, None] & mask_d[None, :])
    tl.store(dv_ptr + slot[:, None] * DV + cols_v[None, :], acc_v, mask=mask_n[:, None] & mask_v[None, :])


def _splits(programs: int, length: int, device: torch.device) -> tuple[int, int]:
    """(splits, rows per split) of a walked range so that programs x splits fills the device."""
    want = triton.cdiv(2 * _sm_count(device), max(programs, 1))
    splits = max(1, min(want, triton.cdiv(max(length, 1), MIN_SPLIT_ROWS)))
    rows = triton.cdiv(max(length, 1), splits)
    return triton.cdiv(max(length, 1), rows), rows


def serves(dtype: torch.dtype, D: int, Dv: int, precision: Optional[str] = None) -> bool:
    """Whether the fused kernels take these dims with float32 products at ``precision`` (default
    ``launch.fp32_precision()``): D, Dv up to configs.BACKWARD_MAX_DIM within the forward's
    REGISTER_TILE_MAX_DIM and FP32_MAX_DIM, float32 at tf32x3 up to configs.BACKWARD_TF32X3_MAX_DIM.
    Wider calls take the streaming backward."""
    limit = min(REGISTER_TILE_MAX_DIM, configs.BACKWARD_MAX_DIM)
    if dtype == torch.float32:
        limit = min(limit, configs.FP32_MAX_DIM)
        if (precision or fp32_precision()) == "tf32x3":
            limit = min(limit, configs.BACKWARD_TF32X3_MAX_DIM)
    return max(D, Dv) <= limit


def constexprs(dtype: torch.dtype, sim_code: int, D: int, Dv: int, values_are_memory: bool, precision: str,
               interpret: bool = INTERPRET) -> dict:
    """The compile-time arguments both kernels take (hen_kernels/bench/static_cases.py compiles them)."""
    return dict(SIM=sim_code, BD=_pow2(D), BDV=_pow2(Dv), VALUES_ARE_MEMORY=values_are_memory,
                UPCAST=interpret and dtype == torch.bfloat16, PRECISION=precision)


@as_on_gpu
def partial_backward(dout, dlse, q, x, v, beta, out, lse, similarity: str, top=None):
    """(dq, dx, dv, dbeta) in float32; shapes and ``top`` as in ``backward_cpu.partial_backward``."""
    L, B, D = q.shape
    Lm, N, Dv = v.shape
    precision = fp32_precision()
    if not serves(q.dtype, D, Dv, precision):
        raise ValueError(f"the fused Triton backward takes D, Dv up to its limit (see serves()), got {D}, {Dv}")
    values_are_memory = v.data_ptr() == x.data_ptr() and v.shape == x.shape and v.stride() == x.stride()
    q, x = q.contiguous(), x.contiguous()
    v = x if values_are_memory else v.contiguous()
    f32 = dict(dtype=torch.float32, device=q.device)
    dout = dout.to(torch.float32).contiguous()
    delta = ((dout * out.to(torch.float32)).sum(-1) - dlse.to(torch.float32)).contiguous()
    rows = torch.full((L, B), -1, dtype=torch.int64, device=q.device) if top is None else top.reshape(L, B)
    gap = backward_cpu.top_row_gaps(dout, dlse, out, v, rows).contiguous()
    rows32 = rows.to(torch.int32).contiguous()  # (a row index fits: rows_n is int32 too; half the registers)
    lse = lse.to(torch.float32).contiguous()
    beta = beta.to(torch.float32).contiguous()
    if L == 0 or B == 0 or N == 0:
        return (torch.zeros((L, B, D), **f32), torch.zeros((Lm, N, D), **f32),
                torch.zeros((Lm, N, Dv), **f32), torch.zeros((L,), **f32))
    common = dict(
        D=D, DV=Dv, q_lead=q.stride(0), q_row=q.stride(1),
        x_lead=x.stride(0) if Lm > 1 else 0, x_row=x.stride(1),
        v_lead=v.stride(0) if Lm > 1 else 0, v_row=v.stride(1),
        **constexprs(q.dtype, SIMILARITY_CODES[similarity], D, Dv, values_are_memory, precision),
    )

    sq, rows_n = _splits(L * triton.cdiv(B, 64), N, q.device)
    dq = torch.empty((L, sq, B, D), **f32)
    dbeta_terms = torch.empty((4, L, sq, B), **f32)
    grid = lambda meta: (triton.cdiv(B, meta["BM"]), sq, L)  # noqa: E731
    dq_kernel[grid](q, x, v, beta, dout, lse, delta, rows32, gap, dq, dbeta_terms, B=B, N=N, rows_per_split=rows_n,
                    **common)

    sk, rows_b = _splits(Lm * triton.cdiv(N, 64), B, q.device)
    dx = torch.empty((Lm, sk, N, D), **f32)
    dv = torch.empty((Lm, sk, N, Dv), **f32)
    grid = lambda meta: (triton.cdiv(N, meta["BN"]), sk, Lm)  # noqa: E731
    dkv_kernel[grid](q, x, v, beta, dout, lse, delta, rows32, gap, dx, dv, L=L, B=B, N=N, rows_per_split=rows_b,
                     SHARED=Lm == 1 and L > 1, **common)
    dts, dt_sum, ps_sum, p_sum = dbeta_terms.sum(2)
    dlse = dlse.to(torch.float32)
    dq, dx = dq.sum(1), dx.sum(1)
    if top is not None:
        # the top row's dt in the terms, P gap, with P from this score (an accumulator of it in dq_kernel
        # spilled at D = 128 under triton 3.6; the kernels' own P differs by a rounding, times gap)
        s_top = backward_cpu.top_row_scores(q, x, rows, similarity, None)
        top_dt = torch.exp(beta.reshape(L, 1) * s_top - lse) * gap
        backward_cpu.settle_top_rows(dq, dx, dt_sum - top_dt, p_sum, dlse, q, x, beta, similarity, None, rows)
    return dq, dx, dv.sum(1), backward_cpu.dbeta_from_terms(dts, dt_sum, ps_sum, p_sum, dlse)
