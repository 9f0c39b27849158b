"""Pieces every Triton kernel here shares: the score transform, the ℓ2 rule, the online-softmax step, autotuning."""
from __future__ import annotations

import os
import time

import triton
import triton.language as tl

from ..constants import L2_DIRECT_BELOW, SIMILARITY_CODES

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The SIM constexpr every kernel takes; jit code may only read globals that are constexpr.
DOT = tl.constexpr(SIMILARITY_CODES["dot"])
L2 = tl.constexpr(SIMILARITY_CODES["l2"])
DIRECT_BELOW = tl.constexpr(L2_DIRECT_BELOW)


@triton.jit
def sq_dist(dot, sq_sum):
    """‖x - s‖² from its expansion ‖s‖² + ‖x‖² - 2 s·x (sq_sum holds the first two), clamped: rounding
    can push it below zero."""
    return tl.maximum(sq_sum - 2.0 * dot, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def l2_direct(d2, sq_sum, q_rows, x_rows, w_rows, mask_q, mask_n, D, HAS_WEIGHTS: tl.constexpr):
    """docs/design.md §5.1: where the expanded d² fell below DIRECT_BELOW x (‖q‖²_w + ‖x‖²_w) it may have
    cancelled, so recompute those pairs as Σ_d w_d (q_d - x_d)², one feature column at a time from global
    memory (the tile was just loaded, so these reads hit the caches).

    q_rows (BM,), x_rows (BN,), w_rows (BM,): pointers to each row's first feature.
    Tiles with no such pair (the usual case away from stored patterns) skip the loop; every pair is
    computed by the same operations wherever its row sits, so identical rows still score identically.
    """
    near = (d2 < sq_sum * DIRECT_BELOW) & mask_q[:, None] & mask_n[None, :]
    if tl.max(tl.max(near.to(tl.int32), 1), 0) > 0:
        direct = tl.zeros_like(d2)
        for k in range(0, D):
            qk = tl.load(q_rows + k, mask=mask_q, other=0.0).to(tl.float32)
            xk = tl.load(x_rows + k, mask=mask_n, other=0.0).to(tl.float32)
            diff = qk[:, None] - xk[None, :]
            if HAS_WEIGHTS:
                wk = tl.load(w_rows + k, mask=mask_q, other=0.0)
                direct += wk[:, None] * (diff * diff)
            else:
                direct += diff * diff
        d2 = tl.where(near, direct, d2)
    return d2


@triton.jit
def l2_scores(d2, beta, SIM: tl.constexpr):
    """beta * sim for the ℓ2 forms from d² (docs/design.md §1)."""
    if SIM == L2:
        s = -tl.sqrt(d2)
    else:
        s = -0.5 * d2
    return s * beta


@triton.jit
def online_step(t, m_i, l_i, top_s, top_i, first_row):
    """Fold one tile of scores t (BM, BN; masked entries -inf) into the running max, sum and top.

    Returns the new max, the factor that rescales the old accumulator, the
    tile's unnormalised weights, the new sum and the new top score and row.
    A NaN score makes its query's weights NaN, so the NaN stays in that row.
    Ties go to the smallest row: argmax keeps the first of equal scores and a
    later tile replaces the top only when strictly better (docs/design.md §5.1).
    """
    # Max and argmax over the scores with NaN set aside (the interpreter's argmax
    # rejects an all-NaN row); the NaN still reaches p and the sum below.
    clean = tl.where(t == t, t, float("-inf"))
    m_tile = tl.max(clean, 1)
    arg = tl.argmax(clean, 1, tie_break_left=True)
    better = m_tile > top_s
    top_i = tl.where(better, first_row + arg, top_i)
    top_s = tl.where(better, m_tile, top_s)
    m_new = tl.maximum(m_i, m_tile)
    # exp(-inf - -inf) is NaN: while nothing finite has been seen, weigh by exp(x - 0) = 0.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_ref)
    p = tl.exp(t - m_ref[:, None])
    l_new = l_i * alpha + tl.sum(p, 1)
    return m_new, alpha, p, l_new, top_s, top_i


@triton.jit
def stored_weights(p, v_ptr):
    """The tile's weights p as the value product takes them, in the values' dtype, and the factor
    sum(p) / sum(as taken) of each query, which the product's result is multiplied by.  A 16-bit P
    rounds each weight by up to 2^-9 (bfloat16) of itself; so put back on the exact sum, each tile adds
    its sum times a convex combination of its rows, and the output stays a convex combination of the
    value rows wherever they sit, rather than scaled by the roundings' sum (docs/design.md §5.1)."""
    pv = p.to(v_ptr.dtype.element_ty)
    taken = tl.sum(pv.to(tl.float32), 1)
    return pv, tl.where(taken > 0, tl.sum(p, 1) / tl.where(taken > 0, taken, 1.0), 1.0)


# Query rows and output columns per step of exact_top_rows: the smallest tensor-core product.
TOP_ROW_TILE = tl.constexpr(16)


@triton.jit
def exact_top_rows(out_ptr, lse_ptr, top_s_ptr, top_i_ptr, slot0, rows, first, v_base, v_row, DV,
                   BM: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """Count each query's top row whole in what the program has stored (docs/design.md §5.1).

    The program's ``rows`` queries (of BM) sit at slots slot0, slot0 + 1, ...: output rows of Dv floats
    at out_ptr, and their lse (the split's running max when SPLIT), top score and top row, all stored.
    A walk's top row takes weight exp(0) = 1 and keeps it (the running max is its score), so the output
    holds it as the value product renders 1·v_top, times the top's weight exp(top - lse) once
    normalised.  For float32 rows that rendering is not v_top: tf32x3 splits v into a tf32 part and a
    rest that the tensor core reads to 10 bits, keeping ~22 of v's 24 bits.  So the same product of the
    identity and the top rows is taken out and the rows go back in whole: a query whose other weights
    underflowed (hard retrieval) gets its stored row bit for bit, as on the CPU, and every other query
    sheds the top row's rounding.  16-bit rows times a weight of 1 are exact already.  Runs after the
    stores, from memory, TOP_ROW_TILE queries and columns at a time: with the accumulator or the whole
    query block in registers beside it, it spilled (the machine-code report)."""
    if v_base.dtype.element_ty == tl.float32:
        tl.debug_barrier()  # what other threads of the program stored
        eye = (tl.arange(0, TOP_ROW_TILE)[:, None] == tl.arange(0, TOP_ROW_TILE)[None, :]).to(tl.float32)
        for g in tl.static_range(0, BM, TOP_ROW_TILE):
            at = g + tl.arange(0, TOP_ROW_TILE)
            slots = slot0 + at
            top = tl.load(top_i_ptr + slots, mask=at < rows, other=-1)
            found = top >= 0
            if SPLIT:
                weight = tl.full([TOP_ROW_TILE], 1.0, tl.float32)  # a split's partial is unnormalised
            else:
                weight = tl.exp(tl.load(top_s_ptr + slots, mask=found, other=0.0)
                                - tl.load(lse_ptr + slots, mask=found, other=0.0))
            top_rows = v_base + tl.where(found, top - first, 0) * v_row
            out_rows = out_ptr + slots * DV
            for d0 in range(0, DV, TOP_ROW_TILE):
                cols = d0 + tl.arange(0, TOP_ROW_TILE)
                mask = found[:, None] & (cols < DV)[None, :]
                v_top = tl.load(top_rows[:, None] + cols[None, :], mask=mask, other=0.0)
                rendered = tl.dot(eye, v_top, input_precision=PRECISION)
                o = tl.load(out_rows[:, None] + cols[None, :], mask=mask, other=0.0)
                tl.store(out_rows[:, None] + cols[None, :], o + (v_top - rendered) * weight[:, None], mask=mask)


@triton.jit
def finish(m_i, l_i):
    """(1 / sum, lse) of a finished walk; an empty bank gives (0, -inf), a NaN query NaN in both."""
    inv = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), tl.where(l_i == l_i, 0.0, l_i))
    lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), tl.where(l_i == l_i, float("-inf"), l_i))
    return inv, lse


def cpu_do_bench(fn, quantiles=None, **_):
    """Autotuning's timer under TRITON_INTERPRET=1, where kernels run on CPU tensors."""
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    ms = min(times)
    return [ms] * len(quantiles) if quantiles else ms


def autotune(configs, key, prune=None, **kwargs):
    """triton.autotune, with a CPU timer under the interpreter (triton's default needs a GPU) and
    ``prune(configs, named_args, **kwargs)`` dropping the configs the target cannot run well.

    On a GPU each choice is kept on disk beside Triton's compiled kernels (``cache_results``, keyed by
    triton, the target, the kernel's source, the key and the configs timed): the next process with the
    same launch key reads it instead of compiling and timing every config again."""
    if INTERPRET:
        kwargs["do_bench"] = cpu_do_bench
    else:
        kwargs.setdefault("cache_results", True)
        if prune is not None:
            kwargs["prune_configs_by"] = {"early_config_prune": prune}
    return triton.autotune(configs=configs, key=key, **kwargs)
