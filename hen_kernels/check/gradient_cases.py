"""`hen check`'s gradient cases: the fused backward (what hk.nn trains with) against float64 autograd through
the reference, within GRAD_TOLERANCE (docs/design.md §5)."""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

import hen_kernels as hk
from hen_kernels import backends
from hen_kernels.constants import GRAD_TOLERANCE, SIMILARITIES

from .cases import Result, Target, _cpu64, beta_for, make, rel_err


def _gradients(q, x, v, beta, sim, dout, backend, dlse=None, weights=None) -> Tuple[torch.Tensor, ...]:
    """Gradients of <update(q, x, values=v), dout> for q, x, v (v None: the bank is the values too, one
    gradient for it) and a beta tensor, by autograd through ``backend``; with ``dlse``, of <out, dout> +
    <lse, dlse> of ``hopfield_partial`` (what a merge of chunks passes back); ``weights`` as given."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, x, v) if t is not None]
    values = leaves[2] if v is not None else None
    if isinstance(beta, torch.Tensor):
        beta = beta.detach().clone().requires_grad_()
        leaves.append(beta)
    if dlse is None:
        out = hk.hopfield_update(leaves[0], leaves[1], beta, similarity=sim, values=values, weights=weights,
                                 backend=backend)
        return torch.autograd.grad(out, leaves, dout)
    p = hk.hopfield_partial(leaves[0], leaves[1], beta, similarity=sim, values=values, weights=weights,
                            backend=backend)
    return torch.autograd.grad((p.out, p.lse), leaves, (dout.to(p.out.dtype), dlse))


def _beta_per_index(t: Target, level: float) -> torch.Tensor:
    """A beta for each of the two leading indices the gradient cases use: level and half of it."""
    return torch.tensor([level, 0.5 * level], dtype=torch.promote_types(t.dtype, torch.float32), device=t.device)


def _gradient_inputs(t: Target, sim: str, b: int, n: int, d: int, seed: int) -> Tuple[torch.Tensor, ...]:
    """Queries (2, b, d), a bank (n, d) and values (n, 11) from seeds ``seed`` to ``seed`` + 2; each leading
    index's first query on the bank's first row (recall's normal case), but for "l2", which has no
    derivative there."""
    q, x, v = (make(shape, t.dtype, seed + i, t.device) for i, shape in enumerate(((2, b, d), (n, d), (n, 11))))
    if sim != "l2":
        q[:, 0] = x[0]
    return q, x, v


def case_gradients(t: Target, quick: bool) -> Iterator[Result]:
    """The fused backward (what hk.nn trains with): gradients for the queries, the bank, the values
    and a beta tensor, against float64 autograd through the reference, within GRAD_TOLERANCE.  A float
    beta and a beta per leading index (two paths to the kernels on the CPU); queries on stored patterns,
    except for "l2", which has no derivative there."""
    shapes = ((3, 17, 3), (17, 129, 64)) if quick else ((3, 17, 3), (17, 129, 64), (64, 300, 64), (5, 1000, 129))
    for b, n, d in shapes:
        if t.too_big(2 * b, n, d):
            continue
        for sim in SIMILARITIES:
            q, x, v = _gradient_inputs(t, sim, b, n, d, 40)
            dout = make((2, b, 11), t.dtype, 43, t.device)
            level = beta_for(sim, d, 1.0)
            per_index = _beta_per_index(t, level)
            yield from _gradient_results(t, q, x, v, dout, sim, level, per_index, f"B{b} N{n} D{d}")
    # The bank as the values too (one gradient for it, the CPU backward's summed rows), more queries than
    # one of its query blocks and a bank of 96 rows and a partial 16-row quantum (its tail's two paths).
    b, n, d = 70, 100, 32
    if not t.too_big(2 * b, n, d):
        for sim in ("dot", "l2sq"):
            q, x = make((2, b, d), t.dtype, 50, t.device), make((n, d), t.dtype, 51, t.device)
            q[:, 0] = x[0]
            dout = make((2, b, d), t.dtype, 52, t.device)
            level = beta_for(sim, d, 1.0)
            per_index = _beta_per_index(t, level)
            yield from _gradient_results(t, q, x, None, dout, sim, level, per_index, f"B{b} N{n} D{d} keys = values")
    # Every query on its own stored row (l2: next to it), the softmax mostly there, and a gradient for lse
    # (a merge of chunks passes one back): the ℓ2 forms' dq and dX are then sums whose largest terms
    # cancel (the CPU backward sums such pairs as differences).
    # (Not float16: there the reference's own float16 autograd is 2.7e-2 off float64, over the tolerance.)
    b, n, d = 8, 64, 64
    if t.dtype == torch.float16 or t.too_big(2 * b, n, d):
        return
    x, v = make((n, d), t.dtype, 44, t.device), make((n, 11), t.dtype, 45, t.device)
    rows = x[torch.randperm(n, generator=torch.Generator().manual_seed(46))[:2 * b].to(x.device)].float()
    dout = make((2, b, 11), t.dtype, 47, t.device)
    dlse = make((2, b), torch.float64 if t.dtype == torch.float64 else torch.float32, 49, t.device)
    for sim in ("l2sq", "l2"):
        near = rows + (0.05 * make((2 * b, d), torch.float32, 48, t.device) if sim == "l2" else 0)
        q = near.to(t.dtype).reshape(2, b, d)
        per_index = _beta_per_index(t, 0.4)
        yield from _gradient_results(t, q, x, v, dout, sim, 0.4, per_index, f"B{b} N{n} D{d} on stored rows", dlse)


def case_saturated_gradients(t: Target, quick: bool) -> Iterator[Result]:
    """Queries on stored rows (l2: 0.01 a feature from them) with a beta that gives each its own row a weight of
    1 to float32's precision, not to float64's: the true gradients of the query and of its row are tiny, and
    the error of a backward that takes Δ from ``out`` was all of them (3x to 1e13x their size;
    benchmarks/PERFORMANCE.md §5.24).  Not float16 (as above), and for the fused backwards only: a backend without
    one is PyTorch's autograd through its forward, and the reference's own float32 autograd is 0.8 of them off."""
    b, n, d = 5, 1000, 64
    if backends.BACKENDS[t.backend].backward is None or t.dtype == torch.float16 or t.too_big(2 * b, n, d):
        return
    x, v = make((n, d), t.dtype, 60, t.device), make((n, 11), t.dtype, 61, t.device)
    rows = x[torch.randperm(n, generator=torch.Generator().manual_seed(62))[:2 * b].to(x.device)].float()
    dout = make((2, b, 11), t.dtype, 63, t.device)
    for sim, level, off in (("dot", 0.5, 0.0), ("l2", 3.0, 0.01)):
        q = (rows + off * make((2 * b, d), torch.float32, 64, t.device)).to(t.dtype).reshape(2, b, d)
        per_index = _beta_per_index(t, level)
        yield from _gradient_results(t, q, x, v, dout, sim, level, per_index, f"B{b} N{n} D{d} saturated")
        yield from _gradient_results(t, q, x, None, make((2, b, d), t.dtype, 65, t.device), sim, level, per_index,
                                     f"B{b} N{n} D{d} saturated, keys = values")


def case_weighted_gradients(t: Target, quick: bool) -> Iterator[Result]:
    """Gradients with per-query feature weights, each leading index its own (some hidden): on the CPU the
    fused backward's weighted products, on a GPU the streaming backward (backends._streaming_backward),
    which the fused Triton backward leaves weights to."""
    b, n, d = 9, 200, 40
    if t.too_big(2 * b, n, d):
        return
    for sim in SIMILARITIES:
        q, x, v = _gradient_inputs(t, sim, b, n, d, 70)
        w = make((2, b, d), torch.float32, 73, t.device).abs()
        w[0, 1, : d // 2] = 0
        level = beta_for(sim, d, 1.0)
        yield from _gradient_results(t, q, x, v, make((2, b, 11), t.dtype, 74, t.device), sim, level,
                                     _beta_per_index(t, level), f"B{b} N{n} D{d} weighted", weights=w)


def _gradient_results(t: Target, q, x, v, dout, sim: str, level: float, per_index: torch.Tensor,
                      shape: str, dlse: Optional[torch.Tensor] = None,
                      weights: Optional[torch.Tensor] = None) -> Iterator[Result]:
    tol = GRAD_TOLERANCE[t.dtype]
    dlse64 = None if dlse is None else _cpu64(dlse)
    for label, beta in (("float beta", level), ("beta per index", per_index)):
        got = _gradients(q, x, v, beta, sim, dout, t.backend, dlse, weights)
        beta64 = _cpu64(beta) if isinstance(beta, torch.Tensor) else beta
        want = _gradients(*(_cpu64(a) for a in (q, x, v)), beta64, sim, _cpu64(dout), "torch", dlse64,
                          None if weights is None else weights.cpu())  # (weights are float32 for every dtype)
        names = ("query", "bank", "values", "beta") if v is not None else ("query", "bank", "beta")
        for name, g, w in zip(names, got, want):
            err = rel_err(g, w)
            ok = err <= tol and bool(torch.isfinite(g).all())
            yield Result(f"gradients {sim} {shape} {label}: {name}", err, tol, ok)
