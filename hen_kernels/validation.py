"""Argument checks for the public API (docs/design.md §4) and the one normalised form backends see.

Every backend receives ``query`` as (L, B, D), ``memory`` as (Lm, N, D) and
``values`` as (Lm, N, Dv) with Lm ∈ {1, L}, and ``beta`` as an (L,) float32
tensor, where L is the product of the query's leading dims.  Nothing is
silently broadcast, truncated or cast: anything else is refused here with an
error that names the argument.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch

from .constants import SIMILARITIES

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Inputs(NamedTuple):
    query: torch.Tensor  # (L, B, D)
    memory: torch.Tensor  # (Lm, N, D)
    values: torch.Tensor  # (Lm, N, Dv)
    beta: torch.Tensor  # (L,) float32
    similarity: str
    lead: torch.Size  # the query's leading dims, restored on the way out
    weights: Optional[torch.Tensor] = None  # (L, B, D) float32, non-negative; None: unweighted

    @property
    def bank_rows(self) -> int:
        return self.memory.shape[-2]


def _tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32, float16 or bfloat16, got {t.dtype}")
    return t


def check_similarity(similarity: object) -> str:
    if not isinstance(similarity, str):
        raise TypeError(f"similarity: expected a str, one of {SIMILARITIES}, got {type(similarity).__name__}")
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity: expected one of {SIMILARITIES}, got {similarity!r}")
    return similarity


def _is_tracing() -> bool:
    return torch.compiler.is_compiling()


def check_beta(beta: object, lead: torch.Size, device: torch.device) -> torch.Tensor:
    """beta as an (L,) float32 tensor on ``device``."""
    numel = math.prod(lead)
    if isinstance(beta, bool) or not isinstance(beta, (numbers.Real, torch.Tensor)):
        raise TypeError(f"beta: expected a float > 0 or a floating tensor, got {type(beta).__name__}")
    if not isinstance(beta, torch.Tensor):
        b = float(beta)
        if not (math.isfinite(b) and b > 0):
            raise ValueError(f"beta: expected a finite float > 0, got {b}")
        return torch.full((numel,), b, dtype=torch.float32, device=device)
    if not beta.is_floating_point():
        raise TypeError(f"beta: expected a floating tensor, got {beta.dtype}")
    if beta.device != device and not (beta.dim() == 0 and beta.device.type == "cpu"):
        raise ValueError(
            f"beta: expected a tensor on {device} (the query's device) or a 0-d CPU tensor, got {beta.device}"
        )
    try:
        fits = torch.broadcast_shapes(beta.shape, lead) == lead
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"beta: expected a shape broadcastable to the query's leading dims {tuple(lead)}, got {tuple(beta.shape)}"
        )
    b = beta.detach()
    if not _is_tracing() and b.device.type != "meta" and not bool(((b > 0) & torch.isfinite(b)).all()):
        raise ValueError("beta: expected every entry finite and > 0")
    return beta.to(device=device, dtype=torch.float32).expand(lead).reshape(numel)


def check_weights(weights: object, query: torch.Tensor) -> Optional[torch.Tensor]:
    """Per-query feature weights (docs/design.md §4): float32, the query's shape and device, >= 0."""
    if weights is None:
        return None
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights: expected a torch.Tensor or None, got {type(weights).__name__}")
    if weights.layout != torch.strided:
        raise TypeError(f"weights: expected a dense (strided) tensor, got layout {weights.layout}")
    if weights.dtype != torch.float32:
        raise TypeError(f"weights: expected dtype float32, got {weights.dtype}")
    if weights.shape != query.shape:
        raise ValueError(
            f"weights: expected shape {tuple(query.shape)} (the query's: one weight per query feature), "
            f"got {tuple(weights.shape)}"
        )
    if weights.device != query.device:
        raise ValueError(f"weights: expected device {query.device} (the query's), got {weights.device}")
    if weights.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "weights: no gradient flows to the feature weights; pass weights.detach() "
            "(gradients to query, memory, values and beta are supported)"
        )
    w = weights.detach()
    if not _is_tracing() and w.device.type != "meta" and not bool(((w >= 0) & torch.isfinite(w)).all()):
        raise ValueError("weights: expected every entry finite and >= 0")
    return weights


def check_inputs(
    query: object,
    memory: object,
    beta: object,
    similarity: object,
    values: object = None,
    *,
    weights: object = None,
    allow_empty_bank: bool = False,
) -> Inputs:
    q = _tensor("query", query)
    x = _tensor("memory", memory)
    if q.dim() < 2:
        raise ValueError(f"query: expected shape (..., B, D), got {tuple(q.shape)}")
    if q.shape[-1] == 0:
        raise ValueError("query: expected a feature dim D >= 1, got D = 0")
    lead, (b, d) = q.shape[:-2], q.shape[-2:]
    if x.dim() != 2 and x.dim() != q.dim():
        raise ValueError(
            f"memory: expected shape (N, {d}) or {tuple(lead) + ('N', d)} to match query {tuple(q.shape)}, "
            f"got {tuple(x.shape)}"
        )
    if x.shape[-1] != d:
        raise ValueError(f"memory: expected last dim {d} (the query's D), got shape {tuple(x.shape)}")
    if x.dim() > 2 and x.shape[:-2] != lead:
        raise ValueError(
            f"memory: expected leading dims {tuple(lead)} (the query's), got {tuple(x.shape[:-2])}; "
            "pass an (N, D) bank to share it across leading dims"
        )
    if x.dtype != q.dtype:
        raise TypeError(f"memory: expected dtype {q.dtype} (the query's), got {x.dtype}")
    if x.device != q.device:
        raise ValueError(f"memory: expected device {q.device} (the query's), got {x.device}")
    n = x.shape[-2]
    if n == 0 and not allow_empty_bank:
        raise ValueError("memory: the bank is empty (N = 0); an update needs at least one stored pattern")
    if values is None:
        v = x
    else:
        v = _tensor("values", values)
        if v.dim() != x.dim() or v.shape[:-1] != x.shape[:-1]:
            raise ValueError(
                f"values: expected shape {tuple(x.shape[:-1]) + ('Dv',)} (memory's leading dims and N), "
                f"got {tuple(v.shape)}"
            )
        if v.shape[-1] == 0:
            raise ValueError("values: expected a value dim Dv >= 1, got Dv = 0")
        if v.dtype != q.dtype:
            raise TypeError(f"values: expected dtype {q.dtype} (the query's), got {v.dtype}")
        if v.device != q.device:
            raise ValueError(f"values: expected device {q.device} (the query's), got {v.device}")
    sim = check_similarity(similarity)
    beta_vec = check_beta(beta, lead, q.device)
    w = check_weights(weights, q)
    num_lead = math.prod(lead)
    lm = 1 if x.dim() == 2 else num_lead
    return Inputs(
        query=q.reshape(num_lead, b, d),
        memory=x.reshape(lm, n, d),
        values=v.reshape(lm, n, v.shape[-1]),
        beta=beta_vec,
        similarity=sim,
        lead=lead,
        weights=None if w is None else w.reshape(num_lead, b, d),
    )


def check_offset(offset: object) -> int:
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral):
        raise TypeError(f"offset: expected an int, got {type(offset).__name__}")
    if offset < 0:
        raise ValueError(f"offset: expected an int >= 0, got {offset}")
    return int(offset)


def check_steps(max_steps: object, tol: object) -> tuple[int, Optional[float]]:
    if isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Integral):
        raise TypeError(f"max_steps: expected an int, got {type(max_steps).__name__}")
    if max_steps < 1:
        raise ValueError(f"max_steps: expected an int >= 1, got {max_steps}")
    if tol is None:
        return int(max_steps), None
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        raise TypeError(f"tol: expected a float >= 0 or None, got {type(tol).__name__}")
    if not (math.isfinite(float(tol)) and tol >= 0):
        raise ValueError(f"tol: expected a finite float >= 0, got {tol}")
    return int(max_steps), float(tol)
