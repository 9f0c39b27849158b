"""The streaming backward of one Hopfield update, in PyTorch: memory independent of N.

Forward (docs/design.md §1): t = beta · sim(X, q), P = softmax(t), out = P V,
lse = logsumexp(t).  Given the upstream gradients dout (of ``out``) and dlse
(of ``lse``), and the saved ``out`` and ``lse``, the backward recomputes P one
bank chunk at a time from the saved lse (flash-attention style), so no B x N
matrix is ever held whole:

    dP    = dout Vᵀ
    dt    = P ∘ (dP - Δ),            Δ_b = dout_b · out_b - dlse_b
    dV    = Pᵀ dout
    dbeta = Σ_{b,n} dt ∘ s           (s = sim, per leading index; see dbeta_from_terms)
    ds    = beta · dt

and the similarity's chain rule, written with one matrix G per chunk and the
query's feature weights w (all ones without ``weights``; ∘ is the elementwise product):

    dot:   G = ds              dq = w ∘ (G X),                dX = Gᵀ (w ∘ q)
    l2sq:  G = ds              dq = w ∘ (G X - rowsum(G) ∘ q), dX = Gᵀ (w ∘ q) - (Gᵀ w) ∘ x
    l2:    G = -ds / s  (0 where s = 0: the subgradient at a stored pattern)
                               same as l2sq

(l2sq: s = -½ Σ w (x - q)²; l2: s = -(Σ w (x - q)²)^½, so ∂s/∂q = w ∘ (x - q) / ‖x - q‖_w
= -w ∘ (x - q)/s.)  The ℓ2 rows are translation invariant, so q and x enter them
centred on the queries' mean (:func:`reference.centre`): a bank far from the origin
does not cancel there.  So does dP - Δ = dout·(v - out) + dlse, taken about the mean
of ``out`` (Σ P = 1): values far from the origin do not cancel either.

Δ comes from ``out``, as flash attention's backward takes it, and is off by float32's
rounding of |dout| |v|: every dt of a query shares that error (dbeta_from_terms takes it out
of dbeta).  Where one row holds nearly all of a query's weight (a query on a stored row:
recall's normal case) that row's true dt, and with it dq and the row's dX, are nearly 0, and
the error was all of them (3.3x their size off, 6e10x at 256 features; PERFORMANCE.md §5.24).
So each query's top row (the forward's ``top_index``, given as ``top``) leaves the products:
its dt enters dbeta's terms as P (dout·(v_top - out) + dlse) (:func:`top_row_gaps`, the
difference taken first, Δ's error in it as in the others), and dq and dX as dlse Σ P less the
other rows' dt (:func:`settle_top_rows`, after the pass): Σ_j dt_j = dlse Σ P exactly, and the
others' errors are in proportion to their weights.

``weights`` get no gradient (docs/design.md §5.1).  The Triton kernel in ``triton/backward.py`` computes the same
quantities tile by tile; this module is the CPU path and the fallback for shapes
the kernel does not serve.  The similarity itself comes from
:func:`hen_kernels.reference.similarity`, its one home.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference

# Bound on the (L, B, chunk) float32 temporaries: 2^22 elements = 16 MiB each (smaller chunks
# cost more in per-op overhead than they save: 1024-row chunks ran 2-4x slower at B = 1024).
CHUNK_ELEMENTS = 1 << 22


def chunk_rows(lead: int, b: int, n: int) -> int:
    """Bank rows per chunk: the score tile stays below CHUNK_ELEMENTS whatever N is."""
    return max(64, min(n, CHUNK_ELEMENTS // max(1, lead * b)))


def grad_coefficients(ds: torch.Tensor, s: torch.Tensor, similarity: str) -> torch.Tensor:
    """G of the module docstring, from ds = beta · dt and the similarity s."""
    if similarity == "l2":
        neg = s < 0
        return torch.where(neg, -ds / torch.where(neg, s, torch.ones_like(s)), torch.zeros_like(ds))
    return ds


def dbeta_from_terms(dts: torch.Tensor, dt_sum: torch.Tensor, ps_sum: torch.Tensor, p_sum: torch.Tensor,
                     dlse: torch.Tensor) -> torch.Tensor:
    """dbeta (L,) from each query's Σ dt s, Σ dt, Σ P s and Σ P (L, B), free of dt's common-mode error.

    Δ comes from ``out`` rather than Σ P dP, and P from the saved lse: both off by float32's rounding, so
    every dt of a query carries a common -P err (err = Δ - Σ P dP / Σ P + dlse), which Σ dt s gathers as
    -err Σ P s, with Σ dt = Σ P (Σ P dP / Σ P - Δ) as its witness: with P* = P / Σ P, exact weights,

        dbeta = Σ_b (Σ dt s - (Σ dt / Σ P - dlse) Σ P s) / Σ P

    A one-hot softmax (true dbeta ~0) returned eps |dout| |v| |s| otherwise, 7.7e-4 where the reference
    gave 1e-88 (benchmarks/PERFORMANCE.md §5.16).  The CPU op (hen_kernels::cpu_partial_backward) and
    Triton's kernel return the same four terms.  A query with no rows (an empty bank: Σ P = 0) adds 0."""
    rows = p_sum > 0
    safe = torch.where(rows, p_sum, torch.ones_like(p_sum))
    return torch.where(rows, (dts - (dt_sum / safe - dlse) * ps_sum) / safe, torch.zeros_like(dts)).sum(-1)


def _top_rows(bank: torch.Tensor, top: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's top row of ``bank`` (Lm, N, ·) as (L, B, ·) in ``dtype`` (row 0 where it has none), and
    whether it has one: ``top`` (L, B) inside [0, N).  N > 0."""
    L, B = top.shape
    n, d = bank.shape[-2:]
    hit = (top >= 0) & (top < n)
    at = torch.where(hit, top, torch.zeros_like(top))
    return bank.expand(L, n, d).gather(1, at.unsqueeze(-1).expand(L, B, d)).to(dtype), hit


def top_row_gaps(dout: torch.Tensor, dlse: torch.Tensor, out: torch.Tensor, v: torch.Tensor,
                 top: torch.Tensor) -> torch.Tensor:
    """dP - Δ of each query's top row (L, B), as dout·(v_top - out) + dlse: the difference taken first.

    v (Lm, N, Dv) with Lm in {1, L}; top (L, B) rows of v, a row outside [0, N) (the forward's -1: no
    row) giving 0; in dout's dtype.  The Triton wrapper takes it too; the C++ backward computes the same
    per query block."""
    if v.shape[-2] == 0:
        return torch.zeros(top.shape, dtype=dout.dtype, device=dout.device)
    v_top, hit = _top_rows(v, top, dout.dtype)
    gap = (dout * (v_top - out.to(dout.dtype))).sum(-1) + dlse.to(dout.dtype)
    return torch.where(hit, gap, torch.zeros_like(gap))


def top_row_scores(q: torch.Tensor, x: torch.Tensor, top: torch.Tensor, similarity: str,
                   weights: Optional[torch.Tensor]) -> torch.Tensor:
    """sim(q, x_top) of each query and its top row (L, B) by :func:`reference.similarity`, one pair at a time,
    in q's float dtype (float32 for 16-bit q); 0 where ``top`` is outside [0, N).  q (L, B, D), x (Lm, N, D),
    weights (L, B, D) or None."""
    f = torch.float64 if q.dtype == torch.float64 else torch.float32
    if x.shape[-2] == 0:
        return torch.zeros(top.shape, dtype=f, device=q.device)
    x_top, hit = _top_rows(x, top, f)
    w = None if weights is None else weights.unsqueeze(-2)
    s = reference.similarity(q.to(f).unsqueeze(-2), x_top.unsqueeze(-2), similarity, w)[..., 0, 0]
    return torch.where(hit, s, torch.zeros_like(s))


def settle_top_rows(dq: torch.Tensor, dx: Optional[torch.Tensor], others: torch.Tensor, p_sum: torch.Tensor,
                    dlse: torch.Tensor, q: torch.Tensor, x: torch.Tensor, beta: torch.Tensor, similarity: str,
                    weights: Optional[torch.Tensor], top: torch.Tensor) -> None:
    """Each query's top row into dq and its row of dX (in place), with dt = dlse Σ P - ``others``.

    ``others`` (L, B): the sum of the query's other rows' dt; p_sum (L, B) Σ P.  dq (L, B, D) float;
    dx the bank's gradient, (*lead, N, D) with lead flattening to Lm in {1, L} (a split bank's views: any
    strides; any dtype, a 16-bit row rounded once), or None (not asked for); q (L, B, D), x (Lm, N, D),
    beta (L,), top (L, B) rows of x (outside [0, N), the forward's -1 for no row: left alone)."""
    L, B, D = q.shape
    N = x.shape[-2]
    if N == 0 or L * B == 0:
        return
    f = dq.dtype
    x_top, hit = _top_rows(x, top, f)
    qf = q.to(f)
    w = None if weights is None else weights.to(f)
    g = beta.to(f).reshape(L, 1) * (dlse.to(f) * p_sum - others)  # the pair's G (module docstring)
    if similarity == "l2":
        s = top_row_scores(q, x, top, similarity, weights).to(f)
        g = torch.where(s < 0, -g / torch.where(s < 0, s, torch.ones_like(s)), torch.zeros_like(s))
    g = torch.where(hit, g, torch.zeros_like(g)).unsqueeze(-1)
    to_q = x_top if similarity == "dot" else x_top - qf  # dq's term of the pair, and dX's (q or q - x)
    to_x = qf if similarity == "dot" else qf - x_top
    dq += g * (to_q if w is None else w * to_q)
    if dx is None or dx.numel() == 0:
        return
    change = (g * (to_x if w is None else w * to_x)).reshape(L * B, D)
    lead = dx.shape[:-2]
    lm = torch.arange(L, device=q.device).repeat_interleave(B) if x.shape[0] > 1 else torch.zeros(
        L * B, dtype=torch.long, device=q.device)
    key = lm * N + top.reshape(-1)
    key, at = key[hit.reshape(-1)], change[hit.reshape(-1)]
    rows_hit, pos = torch.unique(key, return_inverse=True)  # a row several queries top: its changes summed
    summed = torch.zeros((rows_hit.numel(), D), dtype=f, device=q.device).index_add_(0, pos, at)
    index = tuple(torch.unravel_index(rows_hit // N, lead)) + (rows_hit % N,)
    dx[index] = (dx[index].to(f) + summed).to(dx.dtype)


def partial_backward(
    dout: torch.Tensor,
    dlse: torch.Tensor,
    q: torch.Tensor,
    x: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    similarity: str,
    weights: Optional[torch.Tensor] = None,
    top: Optional[torch.Tensor] = None,
    rows: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dx, dv, dbeta) in float32 (float64 for float64 q) for the normalised inputs of :mod:`validation`.

    q (L, B, D), x (Lm, N, D), v (Lm, N, Dv) with Lm in {1, L}, beta (L,);
    ``weights`` (L, B, D) or None; out (L, B, Dv) and lse (L, B) as the forward
    returned them; dout and dlse their upstream gradients; ``top`` (L, B) each
    query's top row of this bank (the forward's top_index less its offset) or None.
    ``rows`` overrides the chunk length (tests).
    """
    f32 = torch.float64 if q.dtype == torch.float64 else torch.float32
    L, B, D = q.shape
    Lm, N, Dv = v.shape
    qf = q.to(f32)
    w = None if weights is None else weights.to(f32)
    wq = qf if w is None else w * qf
    dout = dout.to(f32)
    v_centre = reference.centre(out.to(f32))
    delta = (dout * (out.to(f32) - v_centre)).sum(-1) - dlse.to(f32)  # (L, B)
    bcol = beta.to(f32).reshape(L, 1, 1)
    lse_col = lse.to(f32).unsqueeze(-1)
    l2_type = similarity in ("l2", "l2sq")
    centre = reference.centre(qf) if l2_type else None
    qr = None if centre is None else qf - centre

    dq = torch.zeros((L, B, D), dtype=f32, device=q.device)
    # dbeta's terms per query (L, B): Σ dt s, Σ dt, Σ P s and Σ P (dbeta_from_terms), and the top row's dt
    # in them (settle_top_rows)
    dts, dt_sum, ps_sum, p_sum, dt_top = (torch.zeros((L, B), dtype=f32, device=q.device) for _ in range(5))
    gap = None if top is None else top_row_gaps(dout, dlse, out, v, top).unsqueeze(-1)
    step = rows or chunk_rows(L, B, N)
    if step < N or N == 0:
        dx = torch.zeros((Lm, N, D), dtype=f32, device=q.device)
        dv = torch.zeros((Lm, N, Dv), dtype=f32, device=q.device)
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        xc, vc = x[:, n0:n1].to(f32), v[:, n0:n1].to(f32)
        s = reference.similarity(qf, xc, similarity, w)  # (L, B, C)
        p = torch.exp(bcol * s - lse_col)
        dt = p * (dout @ (vc - v_centre).transpose(-1, -2) - delta.unsqueeze(-1))
        dt_g = dt  # dt as the products take it: 0 at the top rows (settle_top_rows)
        if top is not None:
            local = top.unsqueeze(-1) - n0
            hit = (local >= 0) & (local < n1 - n0)
            at = torch.where(hit, local, torch.zeros_like(local))
            kept = dt.gather(-1, at)  # (a query whose top row is in another chunk: its row `at` as it was)
            here = torch.where(hit, p.gather(-1, at) * gap, torch.zeros_like(gap))
            dt = dt.scatter(-1, at, torch.where(hit, here, kept))
            dt_g = dt.scatter(-1, at, torch.where(hit, torch.zeros_like(here), kept))
            dt_top += here.squeeze(-1)
        dts += (dt * s).sum(-1)
        dt_sum += dt.sum(-1)
        ps_sum += (p * s).sum(-1)
        p_sum += p.sum(-1)
        g = grad_coefficients(bcol * dt_g, s, similarity)
        if l2_type:
            xr = xc - centre
            # Each query's heaviest row (the stored row it sits on, in recall) leaves dq's products,
            # and each row's heaviest query dX's: their G (x - q) is a difference, where the product
            # and the rowsum / colsum term cancelled to the rounding of |G| |x - centre| (dq 3.6e-5 off
            # float64 with every query on a stored row and a gradient for lse, 5e-7 now; the CPU kernel
            # and the Triton one do the same).
            xl = xr.expand(L, -1, -1)
            best_row = p.argmax(-1, keepdim=True)  # (L, B, 1)
            g_row = g.gather(-1, best_row)
            gq = g.scatter(-1, best_row, 0.0)
            x_best = xl.gather(1, best_row.expand(L, B, D))
            dqc = gq @ xr - gq.sum(-1, keepdim=True) * qr + g_row * (x_best - qr)
            best_query = p.argmax(-2, keepdim=True)  # (L, 1, C)
            g_col = g.gather(-2, best_query).transpose(-1, -2)  # (L, C, 1)
            gx = g.scatter(-2, best_query, 0.0)
            at = best_query.transpose(-1, -2).expand(L, n1 - n0, D)
            near = qr.gather(1, at) - xl
            dxc = gx.transpose(-1, -2) @ (qr if w is None else w * qr)  # (L, C, D)
            dxc -= (gx.sum(-2).unsqueeze(-1) if w is None else gx.transpose(-1, -2) @ w) * xr
            dxc += g_col * (near if w is None else w.gather(1, at) * near)
        else:
            dqc = g @ xc
            dxc = g.transpose(-1, -2) @ wq  # (L, C, D)
        dq += dqc if w is None else w * dqc
        dvc = p.transpose(-1, -2) @ dout  # (L, C, Dv)
        if Lm == 1 and L > 1:  # a bank shared by every leading index collects from all of them
            dxc, dvc = dxc.sum(0, keepdim=True), dvc.sum(0, keepdim=True)
        if n1 - n0 == N:  # one chunk: keep the result rather than copy it into a second buffer
            dx, dv = dxc, dvc
        else:
            dx[:, n0:n1] = dxc
            dv[:, n0:n1] = dvc
    dlse = dlse.to(f32)
    if top is not None:
        settle_top_rows(dq, dx, dt_sum - dt_top, p_sum, dlse, qf, x, beta, similarity, w, top)
    return dq, dx, dv, dbeta_from_terms(dts, dt_sum, ps_sum, p_sum, dlse)
