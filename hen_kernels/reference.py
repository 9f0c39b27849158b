"""The executable specification (docs/design.md §1, §2, §4) in plain PyTorch.

Everything here materialises the full B x N score matrix and is meant to be read
against the design, not to be fast.  The similarities of :func:`partial` and
:func:`energy` are formed in float64 and rounded once (so they are exact to float32,
ℓ2 forms near stored patterns and ties among identical rows included: docs/design.md
§5.1); the softmax runs in float32 (float64 when given float64, which is how the
tests obtain ground truth).  Differentiable, also under torch.func transforms.
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

from .constants import L2_DIRECT_BELOW, SIMILARITIES
from .streaming import energy_from_lse
from .tracing import cannot_read
from .types import Beta, Partial


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _beta_column(beta: Beta, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """beta shaped (..., 1, 1) so it scales a (..., B, N) score matrix."""
    b = torch.as_tensor(beta, dtype=dtype, device=device)
    return b.reshape(b.shape + (1, 1))


# Bound on the (pairs, D) float64 temporaries of the direct recompute: 2^22 elements = 32 MiB.
_DIRECT_ELEMENTS = 1 << 22


def _recompute_near_pairs(sq: torch.Tensor, q: torch.Tensor, x: torch.Tensor, w: Optional[torch.Tensor],
                          scale: torch.Tensor) -> torch.Tensor:
    """``sq`` with Σ w (q - x)² recomputed directly for the pairs where the expansion may have cancelled.

    The rule of docs/design.md §5.1 (threshold L2_DIRECT_BELOW), applied in float64: the
    expansion there has lost up to log2(scale / sq) bits, which the square root of ``"l2"``
    then magnifies.  Only those pairs (recall's few near neighbours) are recomputed.
    """
    near = sq < L2_DIRECT_BELOW * scale
    if sq.device.type == "meta" or not bool(near.any()):
        return sq
    lead = torch.broadcast_shapes(q.shape[:-2], x.shape[:-2])
    qe = q.expand(lead + q.shape[-2:])
    xe = x.expand(lead + x.shape[-2:])
    we = None if w is None else w.expand(lead + w.shape[-2:])
    idx = near.expand(lead + near.shape[-2:]).nonzero()  # (pairs, len(lead) + 2): (..., b, n)
    step = max(1, _DIRECT_ELEMENTS // q.shape[-1])
    parts = []
    for i in range(0, idx.shape[0], step):
        at = idx[i:i + step].unbind(-1)
        diff = qe[at[:-1]] - xe[at[:-2] + at[-1:]]
        parts.append(((diff * diff) if we is None else (we[at[:-1]] * diff * diff)).sum(-1))
    return sq.expand(lead + sq.shape[-2:]).index_put(tuple(idx.unbind(-1)), torch.cat(parts))


def centre(rows: torch.Tensor) -> torch.Tensor:
    """The mean of the finite rows of ``rows`` (..., D), as (D,): a point to expand about.

    ‖x - s‖² is translation invariant, and about a point near the queries the expansion
    ‖s‖² + ‖x‖² - 2 x·s no longer cancels for a bank far from the origin.  Taken from the
    queries alone, every chunk of a bank is expanded about the same point, so identical
    rows score identically whatever chunk they fall in.  (The backward centres values
    about the mean of ``out`` the same way.)  Rows holding NaN or inf are left out, so
    one bad query does not spoil the others.
    """
    flat = rows.reshape(-1, rows.shape[-1])
    finite = torch.isfinite(flat).all(-1, keepdim=True)
    return torch.where(finite, flat, torch.zeros_like(flat)).sum(0) / finite.sum().clamp_min(1)


def similarity(query: torch.Tensor, memory: torch.Tensor, kind: str,
               weights: Optional[torch.Tensor] = None, exact: bool = False) -> torch.Tensor:
    """sim(x_n, s_b) for every query row b and bank row n: (..., B, N), in the query's dtype.

    ``weights`` (..., B, D), when given, weigh each query's features: Σ_d w_d s_d x_d
    for ``"dot"``, Σ_d w_d (x_d - s_d)² inside the ℓ2 forms (docs/design.md §4).
    The ℓ2 forms are computed in float64 and rounded once; ``"dot"`` too with ``exact``
    (the specification's way: matmuls sum columns in tile-dependent orders, so identical
    rows could otherwise score a rounding apart), else by a matmul in the query's dtype
    (the layers' and the backward's fast way).
    """
    if kind == "dot":
        q, x = (query, memory) if not exact else (query.to(torch.float64), memory.to(torch.float64))
        if weights is not None:
            q = q * weights.to(q.dtype)
        return (q @ x.transpose(-1, -2)).to(query.dtype)
    if kind not in ("l2", "l2sq"):
        raise ValueError(f"similarity: expected one of {SIMILARITIES}, got {kind!r}")
    # Expanded about a point near the queries, in float64; pairs on or near each other
    # (recall's normal case), where even that cancels, are recomputed directly by the rule
    # the kernels follow (docs/design.md §5.1).
    q = query.to(torch.float64)
    c = centre(q)
    q, x = q - c, memory.to(torch.float64) - c
    w = None if weights is None else weights.to(torch.float64)
    if w is None:
        # vector_norm reduces without an N x D temporary, as `(x * x).sum(-1)` would make.
        q_sq = torch.linalg.vector_norm(q, dim=-1, keepdim=True).square()
        x_sq = torch.linalg.vector_norm(x, dim=-1).square().unsqueeze(-2)
        cross = q @ x.transpose(-1, -2)
    else:
        q_sq = (w * q * q).sum(-1, keepdim=True)
        x_sq = w @ (x * x).transpose(-1, -2)
        cross = (w * q) @ x.transpose(-1, -2)
    sq = q_sq + x_sq - 2 * cross
    # traced (vmap, compile, fake tensors) or captured in a CUDA graph: the centred float64 expansion alone
    # (exact to float32); the recompute's shapes depend on the data
    if not cannot_read(q.device):
        sq = _recompute_near_pairs(sq, q, x, w, q_sq + x_sq)
    sq = sq.clamp_min(0)  # rounding may still leave a tiny negative
    s = -sq.sqrt() if kind == "l2" else -0.5 * sq
    return s.to(query.dtype)


def scores(query: torch.Tensor, memory: torch.Tensor, beta: Beta, kind: str,
           weights: Optional[torch.Tensor] = None, exact: bool = False) -> torch.Tensor:
    """beta · sim, in the compute dtype: (..., B, N) (``exact``: see :func:`similarity`)."""
    dt = _compute_dtype(query.dtype)
    q, x = query.to(dt), memory.to(dt)
    return _beta_column(beta, dt, q.device) * similarity(q, x, kind, weights, exact)


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
    t = scores(query, memory, beta, similarity, weights, exact=True)
    lse = torch.logsumexp(t, dim=-1)
    # argmax documents the first of equal maxima: ties go to the smallest row (docs/design.md §5.1).
    top_index = t.argmax(dim=-1)
    top_score = t.gather(-1, top_index.unsqueeze(-1)).squeeze(-1)
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
    lse = torch.logsumexp(scores(state, memory, beta, similarity, weights, exact=True), dim=-1)
    return energy_from_lse(state, memory, beta, similarity, lse, weights)
