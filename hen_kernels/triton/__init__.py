"""Triton kernels for the fused Hopfield update (docs/design.md §2): layer, recall and bulk regimes.

``launch.py`` holds the heuristic that picks a kernel and the number of bank
splits; ``small_d.py``, ``tiled_d.py`` and ``combine.py`` hold the kernels,
``backward.py`` the fused backward, ``configs.py`` their autotune configs and
the rules that keep only those the GPU runs without spilling.
The launcher is registered as the custom op ``hen_kernels::triton_partial``
with a fake implementation, so ``torch.compile`` traces through it as one node.
Under ``TRITON_INTERPRET=1`` (set before triton is first imported) the kernels
run on CPU tensors, which is how the test suite checks them without a GPU.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..constants import SIMILARITY_CODES
from ..types import Partial
from .common import INTERPRET
from .launch import launch, plan

__all__ = ["partial", "plan", "unavailable_reason"]


@torch.library.custom_op("hen_kernels::triton_partial", mutates_args=())
def _triton_partial(query: torch.Tensor, memory: torch.Tensor, values: torch.Tensor, beta: torch.Tensor,
                    similarity: int, offset: int, weights: Optional[torch.Tensor] = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch(query, memory, values, beta, similarity, offset, weights)


@_triton_partial.register_fake
def _(query, memory, values, beta, similarity, offset, weights=None):
    lead, b = query.shape[0], query.shape[1]
    return (
        query.new_empty((lead, b, values.shape[-1]), dtype=torch.float32),
        query.new_empty((lead, b), dtype=torch.float32),
        query.new_empty((lead, b), dtype=torch.float32),
        query.new_empty((lead, b), dtype=torch.int64),
    )


def partial(q, x, v, beta, similarity: str, offset: int, weights: Optional[torch.Tensor] = None) -> Partial:
    return Partial(*_triton_partial(q, x, v, beta, SIMILARITY_CODES[similarity], offset, weights))


def unavailable_reason() -> Optional[str]:
    if INTERPRET:
        return None
    if not torch.cuda.is_available():
        return "no CUDA device is visible (set TRITON_INTERPRET=1 to run the kernels on the CPU)"
    return None
