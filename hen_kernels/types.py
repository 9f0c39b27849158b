"""Types shared by every layer: a chunk's Partial, a multi-step Retrieval, and what ``beta`` may be."""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

# A float > 0, or a tensor broadcastable to the query's leading dims (a beta per head, say).
Beta = Union[float, torch.Tensor]


class Partial(NamedTuple):
    """One Hopfield update restricted to a chunk of the bank (docs/design.md §2).

    ``out`` is normalised within the chunk; ``lse`` is log Σ exp(beta·sim) over it
    (``-inf`` for an empty chunk); ``top_score``/``top_index`` are the best
    beta·sim and its global row (-1 when empty).  Partials of disjoint chunks merge
    exactly with :func:`hen_kernels.merge_partials`.
    """

    out: torch.Tensor
    lse: torch.Tensor
    top_score: torch.Tensor
    top_index: torch.Tensor

    @property
    def top_weight(self) -> torch.Tensor:
        """Softmax weight of the best row: ≈1 inside one pattern's basin, small in a metastable mix."""
        return torch.exp(self.top_score - self.lse)

    def finalize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The updated state, cast to ``dtype`` (float32 when None)."""
        return self.out if dtype is None else self.out.to(dtype)


class Retrieval(NamedTuple):
    """Outcome of :func:`hen_kernels.hopfield_retrieve`; every field is per query."""

    state: torch.Tensor
    steps: torch.Tensor
    converged: torch.Tensor
    lse: torch.Tensor
    top_index: torch.Tensor
    top_weight: torch.Tensor
