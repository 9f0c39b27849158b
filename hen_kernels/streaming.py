"""What every production path builds on top of one partial update (docs/design.md §1, §2, §4).

The ops, the memory bank, the sharded bank and the nn layers differ only in
how one step over the bank is computed (one kernel call, a stream of chunks,
an all_gather of shards, a dense masked softmax); what they do with the steps
lives here once:

* :func:`merge_partials`: the exact merge of Partials over disjoint chunks;
* :func:`retrieve`: the multi-step loop, with each query's own stopping rule
  and the one check that a multi-step retrieval can feed its output back;
* :func:`energy_from_lse`: the energy of §1 from the lse a Partial carries (and the bound on its
  rounding at small beta, :func:`dot_energy_rounding`).

Nothing here validates its arguments: the callers have done so already.  The
tests hold it to :mod:`hen_kernels.reference`: merged chunk Partials against
one Partial over the whole bank, the energy against its own restatement.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from .tracing import cannot_read
from .types import Beta, Partial, Retrieval

Step = Callable[[torch.Tensor], Partial]


def merge_partials(partials: Sequence[Partial]) -> Partial:
    """Exact merge of Partials over disjoint chunks (associative, commutative, -inf is the identity).

    The sums are taken in float64 and rounded once to the Partials' dtype (float64 when any
    of them is), so the error of a bank streamed in any number of chunks does not grow with
    their number (docs/design.md §5.1).  A running merge that wants the same (a bank adding
    one chunk at a time) keeps its running Partial in float64 with :func:`to_float64` and
    rounds at the end with :func:`round_partial`.
    """
    dt = torch.promote_types(partials[0].out.dtype, torch.float32)
    for p in partials[1:]:
        dt = torch.promote_types(dt, p.out.dtype)
    f64 = torch.float64
    lse_i = torch.stack([p.lse.to(f64) for p in partials])
    lse = torch.logsumexp(lse_i, dim=0)
    # exp(-inf - -inf) is NaN: an empty chunk, or all of them empty, weighs nothing.
    w = torch.where(torch.isneginf(lse_i), torch.zeros_like(lse_i), torch.exp(lse_i - lse))
    out = torch.zeros_like(partials[0].out, dtype=f64)
    for wi, p in zip(w, partials):  # no (chunks, ..., B, Dv) stack: 1-row chunks of a long bank stay cheap
        out += wi.unsqueeze(-1) * p.out.to(f64)
    score_i = torch.stack([p.top_score.to(f64) for p in partials])
    index_i = torch.stack([p.top_index for p in partials])
    top_score = score_i.amax(0)
    # Ties go to the smaller global row, as one call over the whole bank would answer.
    no_row = torch.iinfo(torch.int64).max
    cand = torch.where(score_i == top_score, index_i, torch.full_like(index_i, no_row))
    top_index = cand.amin(0)
    top_index = torch.where(top_index == no_row, torch.full_like(top_index, -1), top_index)
    return Partial(out=out.to(dt), lse=lse.to(dt), top_score=top_score.to(dt), top_index=top_index)


def to_float64(p: Partial) -> Partial:
    """``p`` with its float fields in float64: the running state of a merge over many chunks."""
    f64 = torch.float64
    return Partial(p.out.to(f64), p.lse.to(f64), p.top_score.to(f64), p.top_index)


def round_partial(p: Partial, dtype: torch.dtype = torch.float32) -> Partial:
    """``p`` with its float fields rounded once to ``dtype`` (the end of a float64 running merge)."""
    return Partial(p.out.to(dtype), p.lse.to(dtype), p.top_score.to(dtype), p.top_index)


def retrieve(step: Step, query: torch.Tensor, *, value_dim: int, max_steps: int,
             tol: Optional[float]) -> Retrieval:
    """Apply ``step`` up to ``max_steps`` times, each query until max|s_new - s| <= tol.

    ``step(state)`` is one update of ``state`` (..., B, D) against the whole bank,
    as a Partial whose ``out`` has ``value_dim`` columns.  A query that met its
    tolerance keeps its state, ``lse`` and top row from its last update; with
    ``tol=None`` every query takes ``max_steps`` steps and ``converged`` says
    whether its last step left it unchanged.
    """
    if max_steps > 1 and value_dim != query.shape[-1]:
        raise ValueError(
            f"values: multi-step retrieval feeds the output back as the query, so Dv (a bank's value_dim) "
            f"must equal D = {query.shape[-1]}, got Dv = {value_dim}"
        )
    state = query
    lead = query.shape[:-1]
    active = torch.ones(lead, dtype=torch.bool, device=query.device)
    converged = torch.zeros_like(active)
    steps = torch.zeros(lead, dtype=torch.int64, device=query.device)
    stop_at = 0.0 if tol is None else float(tol)
    last: Optional[Partial] = None
    for i in range(max_steps):
        p = step(state)
        new = p.out.to(query.dtype)
        if new.shape[-1] != state.shape[-1]:  # one step into a value space of another width: nothing to iterate
            return Retrieval(new, steps + 1, torch.zeros_like(converged), p.lse, p.top_index, p.top_weight)
        new = new.reshape(state.shape)  # (B, Dv) rows under the state's own leading dims
        if tol is None and i + 1 < max_steps:
            # Every query stays active to the end: the bookkeeping below would keep each step's
            # answer whole, and only the last step's delta is read (binding.cpp retrieve_cpu, the
            # plain CPU case's copy of this loop, skips the same).
            state = new
            continue
        delta = (new.to(p.out.dtype) - state.to(p.out.dtype)).abs().amax(-1)
        state = torch.where(active.unsqueeze(-1), new, state)
        if last is not None:
            p = Partial(
                p.out,
                torch.where(active, p.lse, last.lse),
                torch.where(active, p.top_score, last.top_score),
                torch.where(active, p.top_index, last.top_index),
            )
        last = p
        steps = steps + active.to(torch.int64) if tol is not None else torch.full_like(steps, max_steps)
        done = active & (delta <= stop_at)
        converged = torch.where(active, done, converged)
        if tol is not None:
            active = active & ~done
            # (the early stop reads a flag back: under a graph capture every step runs, masked)
            if not cannot_read(active.device) and not bool(active.any()):
                break
    assert last is not None
    return Retrieval(
        state=state,
        steps=steps,
        converged=converged,
        lse=last.lse,
        top_index=last.top_index,
        top_weight=torch.exp(last.top_score - last.lse),
    )


def energy_from_lse(state: torch.Tensor, memory: torch.Tensor, beta: Beta, similarity: str,
                    lse: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """E(s) of docs/design.md §1, (..., B) in float32 (float64 for float64 input), given lse (..., B).

    ``beta`` is a float or a tensor over the leading dims of ``state``.  With feature
    ``weights`` (..., B, D) the norms of the ``"dot"`` energy are the weighted ones,
    ½ Σ w s² and ½ maxₙ Σ w xₙ², the energy whose update is the weighted one.  For ``"dot"``,
    -lse/beta and log(N)/beta cancel at small beta: :func:`dot_energy_rounding` bounds what that
    costs, and :func:`energy_from_log_mean_exp` takes the difference formed without it.
    """
    dt = torch.float64 if state.dtype == torch.float64 else torch.float32
    return energy_from_log_mean_exp(state, memory, beta, similarity,
                                    lse.to(dt) - math.log(max(memory.shape[-2], 1)), weights)


def energy_from_log_mean_exp(state: torch.Tensor, memory: torch.Tensor, beta: Beta, similarity: str,
                             log_mean_exp: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """E(s) as :func:`energy_from_lse`, given ``log_mean_exp`` = lse - log N = log meanₙ exp(beta·sim)."""
    dt = torch.float64 if state.dtype == torch.float64 else torch.float32
    b = torch.as_tensor(beta, dtype=dt, device=state.device)
    b = b.reshape(b.shape + (1,))
    e = -log_mean_exp.to(dt) / b
    if similarity != "dot":
        return e - math.log(max(memory.shape[-2], 1)) / b
    s = state.to(dt)
    if weights is None:
        # (vector_norm reduces the bank without an N x D temporary, or a copy of a 16-bit one)
        max_norm_sq = torch.linalg.vector_norm(memory, dim=-1, dtype=dt).amax(-1, keepdim=True).square()
        s_norm_sq = (s * s).sum(-1)
    else:
        x, w = memory.to(dt), weights.to(dt)
        max_norm_sq = (w @ (x * x).transpose(-1, -2)).amax(-1)
        s_norm_sq = (w * s * s).sum(-1)
    return e + 0.5 * s_norm_sq + 0.5 * max_norm_sq


def dot_energy_rounding(lse: torch.Tensor, beta: Beta, rows: int) -> torch.Tensor:
    """A bound on what the rounding of lse (and of log N) moves the ``"dot"`` energy
    -(lse - log N)/beta: a few units of lse's last place over beta, (..., B).  At small beta lse is
    within beta·max|sim| of log N and the difference is lost to that rounding (float32: a unit of
    E at beta ~ 1e-6 with N ~ 1000)."""
    b = torch.as_tensor(beta, dtype=lse.dtype, device=lse.device)
    ulp = torch.finfo(lse.dtype).eps
    return 4 * ulp * (lse.abs() + math.log(max(rows, 1)) + 1) / b.reshape(b.shape + (1,))
