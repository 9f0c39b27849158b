"""Pieces every Triton kernel here shares: the score transform, the online-softmax step, autotuning."""
from __future__ import annotations

import os
import time

import triton
import triton.language as tl

from ..constants import SIMILARITY_CODES

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The SIM constexpr every kernel takes; jit code may only read globals that are constexpr.
DOT = tl.constexpr(SIMILARITY_CODES["dot"])
L2 = tl.constexpr(SIMILARITY_CODES["l2"])


@triton.jit
def beta_sim(dot, q_sq, x_sq, beta, SIM: tl.constexpr):
    """beta * sim from the dot products (BM, BN) and squared norms (BM,), (BN,): docs/design.md §1."""
    if SIM == DOT:
        s = dot
    else:
        # ‖x - s‖² from its expansion, clamped: rounding can push it below zero.
        d2 = tl.maximum(q_sq[:, None] + x_sq[None, :] - 2.0 * dot, 0.0, propagate_nan=tl.PropagateNan.ALL)
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
    """
    # Max and argmax over the scores with NaN set aside (the interpreter's argmax
    # rejects an all-NaN row); the NaN still reaches p and the sum below.
    clean = tl.where(t == t, t, float("-inf"))
    m_tile = tl.max(clean, 1)
    arg = tl.argmax(clean, 1)
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


def cpu_do_bench(fn, quantiles=None, **_):
    """Autotuning's timer under TRITON_INTERPRET=1, where kernels run on CPU tensors."""
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    ms = min(times)
    return [ms] * len(quantiles) if quantiles else ms


def autotune(configs, key, **kwargs):
    """triton.autotune, with a CPU timer under the interpreter (triton's default needs a GPU)."""
    if INTERPRET:
        kwargs["do_bench"] = cpu_do_bench
    return triton.autotune(configs=configs, key=key, **kwargs)
