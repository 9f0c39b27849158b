"""torch.vmap rules for the package's operators: the kernels' forward and the fused backward.

Without them torch.vmap falls back to a slow loop with a warning per call.  The
forward ops (``hen_kernels::partial`` of csrc, ``hen_kernels::triton_partial``)
take a query (L, B, D) against a bank (Lm, N, D), Lm in {1, L}: a vmapped query
against one shared bank folds the vmapped dim into L, one kernel call for all of
it.  Anything else (a vmapped bank, per-leading-index banks, the backward, whose
bank gradients must stay per vmapped index) runs the op once per index: correct,
and no slower than the fallback.  Imports nothing from the package.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


def _select(t: object, dim: Optional[int], k: int) -> object:
    return t if dim is None or not isinstance(t, torch.Tensor) else t.select(dim, k)


def _looped(op: Callable, batch: int, in_dims: Sequence[Optional[int]], args: Sequence[object]):
    outs = [op(*(_select(a, d, k) for a, d in zip(args, in_dims))) for k in range(batch)]
    stacked = tuple(torch.stack(fields) for fields in zip(*outs))
    return stacked, (0,) * len(stacked)


def _front(t: torch.Tensor, dim: Optional[int], batch: int) -> torch.Tensor:
    """``t`` with the vmapped dim first (expanded when ``t`` is not vmapped)."""
    return t.movedim(dim, 0) if dim is not None else t.expand((batch,) + t.shape)


def partial_rule(op: Callable) -> Callable:
    """The vmap rule of a forward op (query, memory, values, beta, similarity, offset, weights)."""

    def rule(info, in_dims, query, memory, values, beta, similarity, offset, weights=None):
        dims = tuple(in_dims) + (None,) * (7 - len(in_dims))
        qd, md, vd, bd, _, _, wd = dims
        args = (query, memory, values, beta, similarity, offset, weights)
        k = info.batch_size
        if md is not None or vd is not None or memory.shape[0] != 1 or query.dim() - (qd is not None) != 3:
            return _looped(op, k, dims, args)
        q = _front(query, qd, k)
        lead, b = q.shape[1], q.shape[2]
        q = q.reshape((k * lead,) + q.shape[2:])
        be = _front(beta, bd, k).reshape(k * lead)
        w = None if weights is None else _front(weights, wd, k).reshape(q.shape)
        out = op(q, memory, values, be, similarity, offset, w)
        return tuple(t.reshape((k, lead, b) + t.shape[2:]) for t in out), (0,) * len(out)

    return rule


def looped_rule(op: Callable) -> Callable:
    """A vmap rule that runs ``op`` once per vmapped index (the fused backward)."""

    def rule(info, in_dims, *args):
        return _looped(op, info.batch_size, tuple(in_dims) + (None,) * (len(args) - len(in_dims)), args)

    return rule


_REGISTERED: set = set()


def register_partial(name: str) -> None:
    """Give the forward op ``name`` (e.g. "hen_kernels::partial") its vmap rule, once."""
    if name in _REGISTERED:
        return
    namespace, op_name = name.split("::")
    op = getattr(getattr(torch.ops, namespace), op_name).default
    torch.library.register_vmap(name, partial_rule(op))
    _REGISTERED.add(name)
