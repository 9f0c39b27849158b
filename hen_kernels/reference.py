"""The executable specification (DESIGN.md §1, §2, §4) in plain PyTorch.

Everything here materialises the full B x N score matrix and is meant to be read
against the design, not to be fast.  It computes in float32 (float64 when given
float64, which is how the tests obtain ground truth) and is differentiable.

Shapes: ``query`` (..., B, D); ``memory`` (N, D) or (..., N, D); ``values``
(N, Dv) or (..., N, Dv); ``beta`` a float or a tensor broadcastable to the
leading dims ``...``.  These functions do not validate: :mod:`hen_kernels.ops`
does, before it dispatches here or to a kernel.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch

from .types import Partial, Retrieval

SIMILARITIES = ("dot", "l2", "l2sq")

Beta = Union[float, torch.Tensor]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _beta_column(beta: Beta, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """beta shaped (..., 1, 1) so it scales a (..., B, N) score matrix."""
    b = torch.as_tensor(beta, dtype=dtype, device=device)
    return b.reshape(b.shape + (1, 1))


def similarity(query: torch.Tensor, memory: torch.Tensor, kind: str) -> torch.Tensor:
    """sim(x_n, s_b) for every query row b and bank row n: (..., B, N)."""
    dot = query @ memory.transpose(-1, -2)
    if kind == "dot":
        return dot
    # ‖x - s‖² = ‖s‖² + ‖x‖² - 2 x·s, clamped: rounding may push it below zero.
    # vector_norm reduces without an N x D temporary, as `(x * x).sum(-1)` would make.
    q_sq = torch.linalg.vector_norm(query, dim=-1, keepdim=True).square()
    x_sq = torch.linalg.vector_norm(memory, dim=-1).square().unsqueeze(-2)
    sq = q_sq + x_sq - 2 * dot
    sq = sq.clamp_min(0)
    if kind == "l2":
        return -sq.sqrt()
    if kind == "l2sq":
        return -0.5 * sq
    raise ValueError(f"similarity: expected one of {SIMILARITIES}, got {kind!r}")


def scores(query: torch.Tensor, memory: torch.Tensor, beta: Beta, kind: str) -> torch.Tensor:
    """beta · sim, in the compute dtype: (..., B, N)."""
    dt = _compute_dtype(query.dtype)
    q, x = query.to(dt), memory.to(dt)
    return _beta_column(beta, dt, q.device) * similarity(q, x, kind)


def _empty_partial(query: torch.Tensor, dv: int, dtype: torch.dtype) -> Partial:
    lead = query.shape[:-1]
    return Partial(
        out=query.new_zeros(lead + (dv,), dtype=dtype),
        lse=query.new_full(lead, -math.inf, dtype=dtype),
        top_score=query.new_full(lead, -math.inf, dtype=dtype),
        top_index=query.new_full(lead, -1, dtype=torch.int64),
    )


def partial(
    query: torch.Tensor,
    memory: torch.Tensor,
    beta: Beta,
    similarity: str = "dot",
    values: Optional[torch.Tensor] = None,
    offset: int = 0,
) -> Partial:
    """One update of ``query`` against this chunk of the bank, as a Partial."""
    values = memory if values is None else values
    dt = _compute_dtype(query.dtype)
    if memory.shape[-2] == 0:
        lead = torch.broadcast_shapes(query.shape[:-2], memory.shape[:-2])
        return _empty_partial(query.expand(lead + query.shape[-2:]), values.shape[-1], dt)
    t = scores(query, memory, beta, similarity)
    lse = torch.logsumexp(t, dim=-1)
    top_score, top_index = t.max(dim=-1)
    weights = torch.exp(t - lse.unsqueeze(-1))
    out = weights @ values.to(dt)
    return Partial(out=out, lse=lse, top_score=top_score, top_index=top_index + offset)


def merge_partials(partials: Sequence[Partial]) -> Partial:
    """Exact merge of Partials over disjoint chunks (associative, commutative, -inf is the identity)."""
    lse_i = torch.stack([p.lse for p in partials])
    lse = torch.logsumexp(lse_i, dim=0)
    # exp(-inf - -inf) is NaN: an empty chunk, or all of them empty, weighs nothing.
    w = torch.where(torch.isneginf(lse_i), torch.zeros_like(lse_i), torch.exp(lse_i - lse))
    out = (w.unsqueeze(-1) * torch.stack([p.out for p in partials])).sum(0)
    score_i = torch.stack([p.top_score for p in partials])
    index_i = torch.stack([p.top_index for p in partials])
    top_score = score_i.amax(0)
    # Ties go to the smaller global row, as one call over the whole bank would answer.
    no_row = torch.iinfo(torch.int64).max
    cand = torch.where(score_i == top_score, index_i, torch.full_like(index_i, no_row))
    top_index = cand.amin(0)
    top_index = torch.where(top_index == no_row, torch.full_like(top_index, -1), top_index)
    return Partial(out=out, lse=lse, top_score=top_score, top_index=top_index)


def update(
    query: torch.Tensor,
    memory: torch.Tensor,
    beta: Beta,
    similarity: str = "dot",
    values: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """s_new = softmax(beta · sim(X, s)) @ V, in the query's dtype."""
    return partial(query, memory, beta, similarity, values).finalize(query.dtype)


PartialFn = Callable[..., Partial]


def retrieve(
    query: torch.Tensor,
    memory: torch.Tensor,
    beta: Beta,
    similarity: str = "dot",
    values: Optional[torch.Tensor] = None,
    max_steps: int = 1,
    tol: Optional[float] = None,
    partial_fn: PartialFn = partial,
) -> Retrieval:
    """Iterate the update up to ``max_steps`` times, each query until max|s_new - s| ≤ tol.

    A query that met its tolerance keeps its state, ``lse`` and top row from its
    last update; with ``tol=None`` every query takes ``max_steps`` steps and
    ``converged`` says whether its last step left it unchanged.  ``partial_fn``
    is the one-step kernel (this module's :func:`partial` by default), so every
    backend shares this loop.
    """
    state = query
    lead = query.shape[:-1]
    active = torch.ones(lead, dtype=torch.bool, device=query.device)
    converged = torch.zeros_like(active)
    steps = torch.zeros(lead, dtype=torch.int64, device=query.device)
    stop_at = 0.0 if tol is None else float(tol)
    last: Optional[Partial] = None
    for _ in range(max_steps):
        p = partial_fn(state, memory, beta, similarity, values)
        new = p.out.to(query.dtype)
        if new.shape != state.shape:  # one step into a value space of another width: nothing to iterate
            return Retrieval(new, steps + 1, torch.zeros_like(converged), p.lse, p.top_index, p.top_weight)
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
        steps = steps + active.to(torch.int64)
        done = active & (delta <= stop_at)
        converged = torch.where(active, done, converged)
        if tol is not None:
            active = active & ~done
            if not bool(active.any()):
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


def energy(
    state: torch.Tensor,
    memory: torch.Tensor,
    beta: Beta,
    similarity: str = "dot",
    lse: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """E(s) of DESIGN.md §1, (..., B) in the compute dtype; ``lse`` may come from a kernel's Partial."""
    dt = _compute_dtype(state.dtype)
    if lse is None:
        lse = torch.logsumexp(scores(state, memory, beta, similarity), dim=-1)
    b = torch.as_tensor(beta, dtype=dt, device=state.device)
    b = b.reshape(b.shape + (1,))
    e = -lse.to(dt) / b
    if similarity == "dot":
        s, x = state.to(dt), memory.to(dt)
        n = memory.shape[-2]
        max_norm_sq = (x * x).sum(-1).amax(-1, keepdim=True)
        e = e + 0.5 * (s * s).sum(-1) + math.log(n) / b + 0.5 * max_norm_sq
    return e
