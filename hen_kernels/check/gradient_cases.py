"""`hen check`'s gradient cases: the fused backward (what hk.nn trains with) against float64 autograd through
the reference, within GRAD_TOLERANCE (docs/design.md §5)."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import torch

import hen_kernels as hk
from hen_kernels import backends
from hen_kernels.constants import GRAD_TOLERANCE, SIMILARITIES

from .cases import Result, Target, _cpu64, beta_for, make, rel_err, unit_roundoff


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
    index's first query on the bank's first row (recall's normal case), for "l2", which has no derivative
    there, next to it (the CPU backward's near pairs: a sign flipped in their dq of few queries had passed)."""
    q, x, v = (make(shape, t.dtype, seed + i, t.device) for i, shape in enumerate(((2, b, d), (n, d), (n, 11))))
    if sim != "l2":
        q[:, 0] = x[0]
    else:
        q[:, 0] = (x[0].float() + 0.05 * make((2, d), torch.float32, seed + 3, t.device)).to(t.dtype)
    return q, x, v


def case_gradients(t: Target, quick: bool) -> Iterator[Result]:
    """The fused backward (what hk.nn trains with): gradients for the queries, the bank, the values
    and a beta tensor, against float64 autograd through the reference, within GRAD_TOLERANCE.  A float
    beta and a beta per leading index (two paths to the kernels on the CPU); queries on stored patterns,
    except for "l2", which has no derivative there."""
    # (3, 200, 64): few queries (the CPU backward's hand-written products) over a partial last bank tile
    shapes = ((3, 17, 3), (3, 200, 64), (17, 129, 64)) if quick else (
        (3, 17, 3), (3, 200, 64), (17, 129, 64), (64, 300, 64), (5, 1000, 129))
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
    # With one thread as well: the CPU backward then walks each bank whole, where its top rows are settled inside
    # the tile loop (with more threads it splits the bank and settles them after; a fault in the first had
    # passed the check on a 2-thread machine).
    for threads in (None, 1) if t.device == "cpu" else (None,):
        for sim in ("l2sq", "l2"):
            near = rows + (0.05 * make((2 * b, d), torch.float32, 48, t.device) if sim == "l2" else 0)
            q = near.to(t.dtype).reshape(2, b, d)
            per_index = _beta_per_index(t, 0.4)
            label = f"B{b} N{n} D{d} on stored rows" + (", one thread" if threads else "")
            with _threads(threads):
                results = list(_gradient_results(t, q, x, v, dout, sim, 0.4, per_index, label, dlse))
            yield from results


@contextlib.contextmanager
def _threads(n: Optional[int]):
    """torch's intra-op threads set to ``n`` within the block (None: as they are)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def case_l2_gradients_at_stored_rows(t: Target, quick: bool) -> Iterator[Result]:
    """Queries on a row stored twice, and next to one: one twin is the top row, whose terms a backward settles
    apart, the other is not.  On them, "l2" has no derivative and the backward takes the zero subgradient, as
    the reference does (a guard dropped from the twin's path gave NaN and passed the check); next to them the
    twin's terms G (x - q) cancel in products, which the CPU backward sums as differences instead (a sign
    flipped there passed it)."""
    x, v = make((6, 16), t.dtype, 75, t.device), make((6, 11), t.dtype, 76, t.device)
    x[4] = x[0]
    on = x[[0, 1, 2, 0, 3, 5]].reshape(2, 3, 16)
    near = (on.float() + 0.05 * make((2, 3, 16), torch.float32, 78, t.device)).to(t.dtype)
    dout = make((2, 3, 11), t.dtype, 77, t.device)
    # (next to them, betas that leave the other rows some weight: saturated, dq is a difference of nearly equal
    # terms that float32 autograd through the reference misses by 5e-2 as well)
    for sim, q, where, level in (("l2", on, "on", 2.0), ("l2", near, "next to", 0.5), ("l2sq", near, "next to", 0.1)):
        yield from _gradient_results(t, q, x, v, dout, sim, level, _beta_per_index(t, level),
                                     f"B3 N6 D16 {where} stored rows, one stored twice")


def case_gradient_rounding(t: Target, quick: bool) -> Iterator[Result]:
    """16-bit gradients rounded to nearest: their mean error along the sign of the exact gradient is a small
    fraction of their size, under a quarter of the dtype's unit roundoff (truncation leaves about three
    quarters of it: bfloat16 bank gradients truncated had passed every tolerance, 8e-2)."""
    if t.dtype.itemsize != 2 or t.too_big(8, 300, 64):
        return
    bound = unit_roundoff(t.dtype) / 4
    x = make((300, 64), t.dtype, 80, t.device)
    q = make((1, 8, 64), t.dtype, 81, t.device)
    dout = make((1, 8, 64), t.dtype, 82, t.device)
    for sim in ("dot", "l2sq"):
        got = _gradients(q, x, x, 0.2, sim, dout, t.backend)
        want = _gradients(_cpu64(q), _cpu64(x), _cpu64(x), 0.2, sim, _cpu64(dout), "torch")
        for name, g, w in zip(("query", "bank", "values"), got, want):
            bias = float(((_cpu64(g) - w) * w.sign()).mean() / w.abs().mean())
            yield Result(f"gradient rounding {sim}: {name}", abs(bias), bound, abs(bias) <= bound,
                         "" if abs(bias) <= bound else f"biased by {bias:.2e} of the gradients' size (rounded "
                         "toward zero?)")


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
