"""The executable specification (docs/design.md §1, §2, §4) in plain PyTorch.

Everything here materialises the full B x N score matrix and is meant to be read
against the design, not to be fast.  It computes in float32 (float64 when given
float64, which is how the tests obtain ground truth) and is differentiable.
It is the ``torch`` backend and the answer the tests hold every kernel to.
What production code builds on top of one update (the merge, the multi-step
loop, the energy from a kernel's lse) lives in :mod:`hen_kernels.streaming`,
which the tests check against this module.

Shapes: ``query`` (..., B, D); ``memory`` (N, D) or (..., N, D); ``values``
(N, Dv) or (..., N, Dv); ``beta`` a float or a tensor broadcastable to the
leading dims ``...``.  These functions do not validate: :mod:`hen_kernels.ops`
does, before it dispatches here or to a kernel.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .constants import SIMILARITIES
from .streaming import energy_from_lse
from .types import Beta, Partial


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _beta_column(beta: Beta, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """beta shaped (..., 1, 1) so it scales a (..., B, N) score matrix."""
    b = torch.as_tensor(beta, dtype=dtype, device=device)
    return b.reshape(b.shape + (1, 1))


def similarity(query: torch.Tensor, memory: torch.Tensor, kind: str,
               weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sim(x_n, s_b) for every query row b and bank row n: (..., B, N), in the query's dtype.

    ``weights`` (..., B, D), when given, weigh each query's features: Σ_d w_d s_d x_d
    for ``"dot"``, Σ_d w_d (x_d - s_d)² inside the ℓ2 forms (docs/design.md §4).
    """
    if kind == "dot":
        q = query if weights is None else query * weights.to(query.dtype)
        return q @ memory.transpose(-1, -2)
    if kind not in ("l2", "l2sq"):
        raise ValueError(f"similarity: expected one of {SIMILARITIES}, got {kind!r}")
    # ‖x - s‖² from its expansion ‖s‖² + ‖x‖² - 2 x·s, taken in float64: the expansion cancels
    # where s sits on or near a stored pattern (recall's normal case) or far from the origin,
    # and float64 keeps that cancellation below float32 rounding (docs/design.md §5.1).
    q, x = query.to(torch.float64), memory.to(torch.float64)
    if weights is None:
        # vector_norm reduces without an N x D temporary, as `(x * x).sum(-1)` would make.
        q_sq = torch.linalg.vector_norm(q, dim=-1, keepdim=True).square()
        x_sq = torch.linalg.vector_norm(x, dim=-1).square().unsqueeze(-2)
        cross = q @ x.transpose(-1, -2)
    else:
        w = weights.to(torch.float64)
        q_sq = (w * q * q).sum(-1, keepdim=True)
        x_sq = w @ (x * x).transpose(-1, -2)
        cross = (w * q) @ x.transpose(-1, -2)
    sq = (q_sq + x_sq - 2 * cross).clamp_min(0)  # rounding may still leave a tiny negative
    s = -sq.sqrt() if kind == "l2" else -0.5 * sq
    return s.to(query.dtype)


def scores(query: torch.Tensor, memory: torch.Tensor, beta: Beta, kind: str,
           weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """beta · sim, in the compute dtype: (..., B, N)."""
    dt = _compute_dtype(query.dtype)
    q, x = query.to(dt), memory.to(dt)
    return _beta_column(beta, dt, q.device) * similarity(q, x, kind, weights)


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
    weights: Optional[torch.Tensor] = None,
) -> Partial:
    """One update of ``query`` against this chunk of the bank, as a Partial (``weights``: §4)."""
    values = memory if values is None else values
    dt = _compute_dtype(query.dtype)
    if memory.shape[-2] == 0:
        lead = torch.broadcast_shapes(query.shape[:-2], memory.shape[:-2])
        return _empty_partial(query.expand(lead + query.shape[-2:]), values.shape[-1], dt)
    t = scores(query, memory, beta, similarity, weights)
    lse = torch.logsumexp(t, dim=-1)
    top_score, top_index = t.max(dim=-1)
    p = torch.exp(t - lse.unsqueeze(-1))
    out = p @ values.to(dt)
    return Partial(out=out, lse=lse, top_score=top_score, top_index=top_index + offset)


def update(
    query: torch.Tensor,
    memory: torch.Tensor,
    beta: Beta,
    similarity: str = "dot",
    values: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """s_new = softmax(beta · sim(X, s)) @ V, in the query's dtype."""
    return partial(query, memory, beta, similarity, values, weights=weights).finalize(query.dtype)


def energy(state: torch.Tensor, memory: torch.Tensor, beta: Beta, similarity: str = "dot",
           weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """E(s) of docs/design.md §1, (..., B) in the compute dtype: the formula of
    :func:`hen_kernels.streaming.energy_from_lse` (its one home) on this module's lse."""
    lse = torch.logsumexp(scores(state, memory, beta, similarity, weights), dim=-1)
    return energy_from_lse(state, memory, beta, similarity, lse, weights)
