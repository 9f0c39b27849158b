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
from .streaming import energy_from_log_mean_exp
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


def _pair_sums(q: torch.Tensor, x: torch.Tensor, w: Optional[torch.Tensor], idx: torch.Tensor,
               kind: str) -> torch.Tensor:
    """Σ_d w (q - x)² (``kind`` an ℓ2 form) or Σ_d w q x (``"dot"``) for the pairs ``idx`` (pairs,
    len(lead) + 2) of (..., b, n), q (..., B, D), x (..., N, D) and w expanded to the same leading dims.

    Each pair is summed alone, the same way wherever its row sits, so identical rows give identical sums.
    """
    step = max(1, _DIRECT_ELEMENTS // q.shape[-1])
    parts = []
    for i in range(0, idx.shape[0], step):
        at = idx[i:i + step].unbind(-1)
        qa, xa = q[at[:-1]], x[at[:-2] + at[-1:]]
        t = qa * xa if kind == "dot" else (qa - xa) * (qa - xa)
        parts.append((t if w is None else w[at[:-1]] * t).sum(-1))
    return torch.cat(parts)


def _expanded(q: torch.Tensor, x: torch.Tensor, w: Optional[torch.Tensor]):
    lead = torch.broadcast_shapes(q.shape[:-2], x.shape[:-2])
    return (lead, q.expand(lead + q.shape[-2:]), x.expand(lead + x.shape[-2:]),
            None if w is None else w.expand(lead + w.shape[-2:]))


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
    lead, qe, xe, we = _expanded(q, x, w)
    idx = near.expand(lead + near.shape[-2:]).nonzero()  # (pairs, len(lead) + 2): (..., b, n)
    return sq.expand(lead + sq.shape[-2:]).index_put(tuple(idx.unbind(-1)), _pair_sums(qe, xe, we, idx, "l2"))


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
    s = -_distance(sq) if kind == "l2" else -0.5 * sq
    return s.to(query.dtype)


def _distance(sq: torch.Tensor) -> torch.Tensor:
    """sqrt(sq) with the zero subgradient where sq = 0 (a query on a stored pattern), as the fused backwards
    take it: sqrt's own derivative there is inf, and inf times the zero derivative of sq made NaN gradients."""
    away = sq != 0  # NaN (a NaN query) stays NaN
    return torch.where(away, torch.where(away, sq, 1.0).sqrt(), 0.0)


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


def _top(t: torch.Tensor, query: torch.Tensor, memory: torch.Tensor, beta: Beta, kind: str,
         weights: Optional[torch.Tensor]):
    """The best score of each query and its row, by the kernels' rule (docs/design.md §5.1): the first of
    equal maxima, NaN never best, and no row (-1, score -inf) for a query with nothing above -inf (a NaN query)."""
    ranked = torch.where(torch.isnan(t), torch.full_like(t, -math.inf), t)
    top_score, top_index = ranked.max(-1)  # max documents the first of equal maxima
    if t.dtype == torch.float64 and not cannot_read(t.device):
        top_score, top_index = _settle_ties(ranked, top_score, top_index, query, memory, beta, kind, weights)
    return top_score, torch.where(torch.isneginf(top_score), torch.full_like(top_index, -1), top_index)


def _settle_ties(ranked: torch.Tensor, top_score: torch.Tensor, top_index: torch.Tensor, query: torch.Tensor,
                 memory: torch.Tensor, beta: Beta, kind: str, weights: Optional[torch.Tensor]):
    """The best rows of float64 scores, from the candidates scored again one pair at a time.

    A float64 matmul sums in an order that depends on where a row sits in its tile, so identical
    rows may score a rounding apart and the later one win (rounding to float32 hides this for the
    other dtypes).  Every row within a generous bound of that rounding of the best is scored again
    by :func:`_pair_sums`, which treats every row alike: the best row too where it is alone, since
    its twin may sit in another chunk, and merge_partials can break the tie by row only if both
    chunks' top scores were summed the same way.
    """
    q, x = query.to(torch.float64), memory.to(torch.float64)
    w = None if weights is None else weights.to(torch.float64)
    qn = torch.linalg.vector_norm(q if w is None else w * q, dim=-1)  # (..., B)
    xn = torch.linalg.vector_norm(x, dim=-1).amax(-1, keepdim=True)  # (..., 1)
    b = _beta_column(beta, torch.float64, q.device).squeeze(-1).abs()  # (..., 1)
    # A sum of D products rounds by at most D·eps of Σ|terms| ≤ (|q| + |x|)²: 8x that covers both scores of a
    # pair; the square root of "l2" moves a distance by at most the root of its square's error.
    sq_err = 8 * (q.shape[-1] + 2) * torch.finfo(torch.float64).eps * (qn + xn) ** 2
    slack = b * (sq_err.sqrt() if kind == "l2" else sq_err)
    near = (ranked >= (top_score - slack).unsqueeze(-1)) & ~torch.isneginf(ranked)
    scored = near.any(-1)  # every query with a finite best: alone or not, its best is summed again
    if not bool(scored.any()):
        return top_score, top_index
    lead, qe, xe, we = _expanded(q, x, w)
    near = (near & scored.unsqueeze(-1)).expand(lead + near.shape[-2:])
    idx = near.nonzero()
    sums = _pair_sums(qe, xe, we, idx, kind)
    be = _beta_column(beta, torch.float64, q.device).expand(lead + near.shape[-2:])[tuple(idx.unbind(-1))]
    direct = be * (sums if kind == "dot" else -sums.sqrt() if kind == "l2" else -0.5 * sums)
    again = torch.full(near.shape, -math.inf, dtype=torch.float64, device=q.device)
    again = again.index_put(tuple(idx.unbind(-1)), direct)
    best, at = again.max(-1)
    return torch.where(scored, best, top_score), torch.where(scored, at, top_index)


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
    top_score, top_index = _top(t, query, memory, beta, similarity, weights)
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


# Bank rows per block of the energy's scores: (..., B, 4096) float64 at a time, whatever N.
_ENERGY_ROWS = 4096


def energy(state: torch.Tensor, memory: torch.Tensor, beta: Beta, similarity: str = "dot",
           weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """E(s) of docs/design.md §1, (..., B) in the compute dtype: the formula of
    :func:`hen_kernels.streaming.energy_from_log_mean_exp` (its one home), with log meanₙ exp(t)
    formed as max t + log1p(meanₙ expm1(t - max t)), which keeps the small differences of a
    small beta that lse - log N rounds away.  The bank is scored in blocks of rows: the running
    max m and S = Σ expm1(t - m) over the n rows so far move to a new max m' as
    S + expm1(m - m') (S + n)."""
    n_rows = memory.shape[-2]
    top, acc = None, None
    for a in range(0, n_rows, _ENERGY_ROWS):
        t = scores(state, memory[..., a:a + _ENERGY_ROWS, :], beta, similarity, weights, exact=True)
        m = t.amax(-1) if top is None else torch.maximum(top, t.amax(-1))
        block = torch.expm1(t - m.unsqueeze(-1)).sum(-1)
        acc = block if top is None else acc + torch.expm1(top - m) * (acc + a) + block
        top = m
    if top is None:
        raise ValueError("memory: the bank is empty (N = 0); the energy needs at least one stored pattern")
    return energy_from_log_mean_exp(state, memory, beta, similarity, top + torch.log1p(acc / n_rows), weights)
