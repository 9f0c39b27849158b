"""Public functional API (docs/design.md §4): validate once, dispatch once, restore shapes.

Conventions shared by every op here:

* ``query`` (..., B, D): B query rows of D features under any leading dims ``...``
  (batch, heads); a (B, D) query has none.
* ``memory`` (N, D), shared by every leading index, or (..., N, D) with the query's
  leading dims; ``values`` likewise (N, Dv) or (..., N, Dv), ``memory`` when None.
* dtypes: float32, float16 or bfloat16, all inputs alike, accumulated in float32;
  float64 too, computed in float64 by the reference (``backend="torch"``, which the
  automatic choice picks for float64; the kernels refuse it by name).
* ``beta``: a finite float in (0, 3.4e38] or a floating tensor broadcastable to ``...``.
* ``weights``: optional per-query feature weights, (..., B, D) float32, finite and >= 0,
  without ``requires_grad``.  ``"dot"`` becomes Σ_d w_d q_d x_d; ``"l2"``/``"l2sq"``
  use Σ_d w_d (x_d - q_d)².
* ``backend``: None (the fastest available for the device, shape and dtype;
  ``$HEN_KERNELS_BACKEND`` overrides), ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
* Under ``torch.autocast`` the ops follow ``scaled_dot_product_attention``: floating
  inputs other than float64 are cast to the autocast dtype (a bfloat16 query meets a
  float32 bank), the math runs as always (float32 accumulation, float32 Partials),
  and tensors returned "in the query's dtype" come back in the autocast dtype.
* Differentiable in ``query``, ``memory``, ``values`` and a ``beta`` tensor, also under
  ``torch.func`` (grad, vjp, jacrev, vmap) and ``torch.compile``.  Forward mode (``jvp``,
  ``jacfwd``, ``hessian``, ``torch.autograd.forward_ad``): a call whose inputs carry tangents runs the
  reference (the kernels have no forward derivative; it holds B x N scores); an asked kernel
  backend refuses it with ``NotImplementedError``.
* Errors: ``TypeError``/``ValueError`` naming the argument; a beta·sim that leaves the
  float32 range is refused by ``beta``'s name rather than returned as NaN.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch

from . import autograd, backends, reference, streaming
from .constants import TOLERANCE
from .tracing import cannot_read
from .types import Beta, Partial, Retrieval
from .validation import Inputs, autocast_dtype, autocast_inputs, check_inputs, check_offset, check_scores, check_steps


def _restore(p: Partial, inp: Inputs) -> Partial:
    b = inp.query.shape[-2]
    if p.lse.shape == inp.lead + (b,):  # one leading dim: the kernels' (L, B, ·) shapes already
        return p
    return Partial(
        out=p.out.reshape(inp.lead + (b, p.out.shape[-1])),
        lse=p.lse.reshape(inp.lead + (b,)),
        top_score=p.top_score.reshape(inp.lead + (b,)),
        top_index=p.top_index.reshape(inp.lead + (b,)),
    )


def _autocast_off(device_type: str):
    """Inside the ops the inputs are already cast: the reference's matmuls must not round scores again."""
    if autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def _computed(be: backends.Backend, inp: Inputs, offset: int = 0) -> Partial:
    with _autocast_off(inp.query.device.type):
        p = autograd.partial(be, inp, offset)
    check_scores(p.lse, None if be.lse_marks_out else p.out, inp, p.top_score)
    return p


def hopfield_partial(
    query: torch.Tensor,
    memory: torch.Tensor,
    beta: Beta,
    *,
    similarity: str = "dot",
    values: Optional[torch.Tensor] = None,
    offset: int = 0,
    weights: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> Partial:
    """One update of ``query`` against one chunk of a bank, as a mergeable :class:`Partial`.

    Args:
        query: (..., B, D).
        memory: the chunk's rows, (N, D) or (..., N, D); N = 0 (an empty chunk) is allowed.
        beta: inverse temperature, a float > 0 or a tensor broadcastable to ``...``.
        similarity: ``"dot"``, ``"l2"`` (-‖x - s‖) or ``"l2sq"`` (-½‖x - s‖²).
        values: (N, Dv) or (..., N, Dv); ``memory`` when None.
        offset: the global row of the chunk's first row (an int >= 0), added to ``top_index``.
        weights: optional (..., B, D) float32 feature weights (see the module docstring).
        backend: None for the automatic choice, or a name from :func:`available_backends`.

    Returns:
        ``Partial(out (..., B, Dv), lse (..., B), top_score (..., B), top_index (..., B))``:
        ``out`` normalised within the chunk, float32 (float64 for float64 inputs);
        ``top_index`` int64, global (``offset`` added), -1 for an empty chunk.
        Partials of disjoint chunks merge exactly with :func:`merge_partials`.
    """
    query, memory, values = autocast_inputs(query, memory, values)
    inp = check_inputs(query, memory, beta, similarity, values, weights=weights, allow_empty_bank=True)
    offset = check_offset(offset, inp.bank_rows)
    return _restore(_computed(backends.resolve(backend, inp), inp, offset), inp)


def hopfield_update(
    query: torch.Tensor,
    memory: torch.Tensor,
    beta: Beta,
    *,
    similarity: str = "dot",
    values: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """One Modern Hopfield update: ``softmax(beta · sim(memory, query)) @ values``.

    Scaled-dot-product attention with keys = ``memory`` (values = ``memory`` unless
    given) for ``"dot"``, without ever forming the B x N score matrix.

    Args:
        query: (..., B, D) states to update.
        memory: the stored patterns, (N, D) shared by every leading index or (..., N, D); N >= 1.
        beta: inverse temperature, a float > 0 or a tensor broadcastable to ``...``
            (a beta per head, say; may require grad).
        similarity: ``"dot"`` (x·s), ``"l2"`` (-‖x - s‖) or ``"l2sq"`` (-½‖x - s‖²).
        values: (N, Dv) or (..., N, Dv) read out by the softmax; ``memory`` when None.
        weights: optional (..., B, D) float32 per-query feature weights >= 0 (a query
            that knows only part of its pattern weighs the rest 0).
        backend: None for the automatic choice, or ``"torch"``, ``"cpu"``, ``"cuda"``, ``"triton"``.

    Returns:
        (..., B, Dv) in the query's dtype (the autocast dtype under ``torch.autocast``).

    Example::

        >>> x = torch.randn(1000, 64)                      # stored patterns
        >>> s = x[:4] + 0.1 * torch.randn(4, 64)           # noisy queries
        >>> hk.hopfield_update(s, x, beta=8.0).shape
        torch.Size([4, 64])
    """
    if type(beta) is float and weights is None:
        out = backends.fast_update(query, memory, values, beta, similarity, backend)
        if out is not None:
            return out
    query, memory, values = autocast_inputs(query, memory, values)
    inp = check_inputs(query, memory, beta, similarity, values, weights=weights)
    p = _computed(backends.resolve(backend, inp), inp)
    out = p.out if p.out.dtype == query.dtype else p.out.to(query.dtype)  # (a no-op .to still dispatches)
    return out.reshape(query.shape[:-1] + (out.shape[-1],))


def merge_partials(partials: Sequence[Partial]) -> Partial:
    """The exact merge of Partials computed over disjoint chunks of one bank.

    Args:
        partials: a non-empty sequence of :class:`Partial` with equal shapes, dtypes and
            devices (as :func:`hopfield_partial` returned them for the same queries).

    Returns:
        One :class:`Partial`, as one call over the union of the chunks would give:
        accumulated in float64 and rounded once, so the error does not grow with the
        number of chunks; ties of ``top_score`` go to the smallest global row.
    """
    if isinstance(partials, (Partial, str)) or not isinstance(partials, Sequence):
        raise TypeError(f"partials: expected a sequence of Partial, got {type(partials).__name__}")
    if len(partials) == 0:
        raise ValueError("partials: expected at least one Partial, got an empty sequence")
    for i, p in enumerate(partials):
        if not isinstance(p, Partial):
            raise TypeError(f"partials[{i}]: expected a Partial, got {type(p).__name__}")
        for field, value in zip(Partial._fields, p):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"partials[{i}]: expected {field} to be a tensor, got {type(value).__name__}")
            like = getattr(partials[0], field)
            if value.shape != like.shape or value.dtype != like.dtype or value.device != like.device:
                raise ValueError(
                    f"partials[{i}]: expected {field} of shape {tuple(like.shape)}, {like.dtype} on {like.device} "
                    f"like partials[0], got {tuple(value.shape)}, {value.dtype} on {value.device}"
                )
    first = partials[0]
    if len(partials) == 1:
        return first
    return streaming.merge_partials(partials)


def hopfield_retrieve(
    query: torch.Tensor,
    memory: torch.Tensor,
    beta: Beta,
    *,
    similarity: str = "dot",
    values: Optional[torch.Tensor] = None,
    max_steps: int = 1,
    tol: Optional[float] = None,
    weights: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> Retrieval:
    """Up to ``max_steps`` updates; each query stops once max|s_new - s| <= ``tol``.

    Args:
        query, memory, beta, similarity, values, weights, backend: as :func:`hopfield_update`
            (``weights`` weigh the query's features in every step: a query that knows only
            part of its pattern keeps knowing only that part).
        max_steps: an int >= 1.  With more than one step the output is fed back as the
            query, so Dv must equal D.
        tol: None (every query takes ``max_steps`` steps) or a float >= 0.

    Returns:
        :class:`Retrieval` with, per query: ``state`` (..., B, Dv) in the query's dtype;
        ``steps`` (..., B) int64; ``converged`` (..., B) bool; ``lse``, ``top_weight``
        (..., B) float32 and ``top_index`` (..., B) int64 of the last update taken.
        Queries never influence each other: a NaN query leaves every other intact.
    """
    # The plain case's steps and tolerance as the op's int64 and double take them, exactly (else the general path).
    plain_steps = type(max_steps) is int and 0 < max_steps < 2**63
    plain_tol = tol is None or type(tol) is float or (type(tol) is int and 0 <= tol <= 2**53)
    if type(beta) is float and weights is None and plain_steps and plain_tol:
        r = backends.fast_retrieve(query, memory, values, beta, similarity, backend, max_steps,
                                   None if tol is None else float(tol))
        if r is not None:
            return r
    query, memory, values = autocast_inputs(query, memory, values)
    inp = check_inputs(query, memory, beta, similarity, values, weights=weights)
    max_steps, tol = check_steps(max_steps, tol)
    be = backends.resolve(backend, inp)
    inp = inp._replace(query=inp.query.flatten(0, -3))  # the state fed back is (L, B, D): a split query as such

    def step(state: torch.Tensor) -> Partial:
        return _computed(be, inp._replace(query=state))

    r = streaming.retrieve(step, inp.query, value_dim=inp.values.shape[-1], max_steps=max_steps, tol=tol)
    per_query = query.shape[:-1]
    return Retrieval(
        state=r.state.reshape(per_query + (r.state.shape[-1],)),
        steps=r.steps.reshape(per_query),
        converged=r.converged.reshape(per_query),
        lse=r.lse.reshape(per_query),
        top_index=r.top_index.reshape(per_query),
        top_weight=r.top_weight.reshape(per_query),
    )


def energy(
    state: torch.Tensor,
    memory: torch.Tensor,
    beta: Beta,
    *,
    similarity: str = "dot",
    weights: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """The Hopfield energy E(s) of docs/design.md §1, with lse taken by the chosen kernel.

    ``lse = log Σₙ exp(beta·sim(xₙ, s))``; ``"dot"``: E = -lse/beta + ½‖s‖² + log(N)/beta
    + ½ maxₙ‖xₙ‖²; ``"l2"``, ``"l2sq"``: E = -lse/beta.  An update never increases it for
    ``"dot"`` and ``"l2sq"``.

    Args:
        state: (..., B, D); memory, beta, similarity, weights, backend: as :func:`hopfield_update`.

    Returns:
        (..., B) float32 (float64 for float64 inputs).
    """
    state, memory, _ = autocast_inputs(state, memory, None)
    try:
        inp = check_inputs(state, memory, beta, similarity, weights=weights)
    except (TypeError, ValueError) as e:
        raise type(e)(str(e).replace("query", "state", 1)) from None
    lse = _computed(backends.resolve(backend, inp), inp).lse
    flat = inp.flat()
    e = streaming.energy_from_lse(flat.query, flat.memory, flat.beta, flat.similarity, lse, flat.weights)
    if flat.similarity == "dot" and flat.memory.shape[-2] and e.device.type != "meta" and not cannot_read(e.device):
        # At small beta -lse/beta and log(N)/beta cancel past lse's precision (float32: beta ~ 1e-6
        # at N ~ 1000 leaves no digit): there the float64 reference forms their difference directly.
        rounding = streaming.dot_energy_rounding(lse.detach(), flat.beta, flat.memory.shape[-2])
        if bool((rounding > TOLERANCE[torch.float32] * e.detach().abs().clamp_min(1)).any()):
            wide = [None if t is None else t.to(torch.float64) for t in (flat.query, flat.memory, flat.weights)]
            e = reference.energy(wide[0], wide[1], flat.beta.to(torch.float64), "dot", wide[2])
    return e.to(torch.promote_types(state.dtype, torch.float32)).reshape(state.shape[:-1])


def available_backends() -> list[str]:
    """Names of the backends usable on this machine (``"torch"`` always), for ``backend=``."""
    return backends.available_backends()
