"""Types shared by every layer: a chunk's Partial, a multi-step Retrieval, and what ``beta`` may be."""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

# A float > 0, or a tensor broadcastable to the query's leading dims (a beta per head, say).
Beta = Union[float, torch.Tensor]


class Partial(NamedTuple):
    """One Hopfield update restricted to a chunk of the bank (docs/design.md §2).

    Fields, for a query (..., B, D) and values (..., N, Dv):

    * ``out`` (..., B, Dv): the update normalised within the chunk;
    * ``lse`` (..., B): log Σ exp(beta·sim) over the chunk (``-inf`` for an empty chunk);
    * ``top_score`` (..., B): the best beta·sim;
    * ``top_index`` (..., B) int64: its global row (the smallest among equal scores; -1 when empty, or when
      no score beats -inf, as for a query holding NaN, whose ``top_score`` is then -inf).

    Float fields are float32 (float64 for float64 inputs) whatever the input dtype.
    Partials of disjoint chunks merge exactly with :func:`hen_kernels.merge_partials`.
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
        """The updated state, cast to ``dtype`` (a floating dtype: a state rounded to integers or
        booleans is no update); when None, as accumulated (float32; float64 for float64 inputs)."""
        if dtype is None:
            return self.out
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")
        return self.out.to(dtype)


class Retrieval(NamedTuple):
    """Outcome of :func:`hen_kernels.hopfield_retrieve`; every field is per query row.

    * ``state`` (..., B, Dv): the last state, in the query's dtype;
    * ``steps`` (..., B) int64: updates taken (a query stops once it meets ``tol``);
    * ``converged`` (..., B) bool: whether its last step moved it by at most ``tol`` (0 without);
    * ``lse`` (..., B) float32 (float64 for float64 inputs, as below): log Σ exp(beta·sim) of its
      last update;
    * ``top_index`` (..., B) int64 and ``top_weight`` (..., B) float32: the best row of the
      last update and its softmax weight (≈ 1 inside one pattern's basin).
    """

    state: torch.Tensor
    steps: torch.Tensor
    converged: torch.Tensor
    lse: torch.Tensor
    top_index: torch.Tensor
    top_weight: torch.Tensor
