"""Public functional API (docs/design.md §4): validate once, dispatch once, restore shapes."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import autograd, backends, streaming
from .types import Beta, Partial, Retrieval
from .validation import Inputs, check_inputs, check_offset, check_steps


def _restore(p: Partial, inp: Inputs) -> Partial:
    b = inp.query.shape[1]
    return Partial(
        out=p.out.reshape(inp.lead + (b, p.out.shape[-1])),
        lse=p.lse.reshape(inp.lead + (b,)),
        top_score=p.top_score.reshape(inp.lead + (b,)),
        top_index=p.top_index.reshape(inp.lead + (b,)),
    )


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
    """One update of ``query`` against a chunk of the bank whose first row is global row ``offset``."""
    inp = check_inputs(query, memory, beta, similarity, values, weights=weights, allow_empty_bank=True)
    offset = check_offset(offset)
    return _restore(autograd.partial(backends.resolve(backend, inp), inp, offset), inp)


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
    """s_new = softmax(beta · sim(X, s)) @ V, in the query's dtype (float32 accumulation)."""
    inp = check_inputs(query, memory, beta, similarity, values, weights=weights)
    p = autograd.partial(backends.resolve(backend, inp), inp)
    return p.out.to(query.dtype).reshape(query.shape[:-1] + (p.out.shape[-1],))


def merge_partials(partials: Sequence[Partial]) -> Partial:
    """Exact merge of Partials computed over disjoint chunks of one bank."""
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
    """Up to ``max_steps`` updates; each query stops once max|s_new - s| <= tol (docs/design.md §4).

    ``weights`` weigh the query's features in every step (a query that knows only part of
    its pattern keeps knowing only that part).
    """
    inp = check_inputs(query, memory, beta, similarity, values, weights=weights)
    max_steps, tol = check_steps(max_steps, tol)
    be = backends.resolve(backend, inp)

    def step(state: torch.Tensor) -> Partial:
        return autograd.partial(be, inp._replace(query=state))

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
    """E(s) of docs/design.md §1, (..., B) float32, with the log-sum-exp taken by the chosen kernel."""
    try:
        inp = check_inputs(state, memory, beta, similarity, weights=weights)
    except (TypeError, ValueError) as e:
        raise type(e)(str(e).replace("query", "state", 1)) from None
    lse = autograd.partial(backends.resolve(backend, inp), inp).lse
    e = streaming.energy_from_lse(inp.query, inp.memory, inp.beta, inp.similarity, lse, inp.weights)
    return e.to(torch.float32).reshape(state.shape[:-1])


def available_backends() -> list[str]:
    """Backends that loaded on this machine (docs/design.md §4 names)."""
    return backends.available_backends()
