"""Kernel Memory Network (the paper's §2.1, Iatropoulos et al. 2022): the comparison baseline.

Kernel  K(x, y) = exp(-(‖x - y‖₂ / r)^α)
Update  s ← Ξᵀ K(Ξ, Ξ)⁺ K(Ξ, s)

with K⁺ the Moore-Penrose pseudo-inverse of the N x N kernel matrix of the stored
patterns.  Every stored pattern is a fixed point (K(Ξ, ξ_i) is column i of K(Ξ, Ξ)).
The N x N matrix and its pseudo-inverse cost O(N²) memory and O(N³) time, which is why
the experiments run it on the smaller banks.  This is not a Hopfield update, so it does
not go through the kernels.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class KMNRetrieval(NamedTuple):
    state: torch.Tensor
    steps: torch.Tensor
    index: torch.Tensor  # the nearest stored pattern (ℓ2) to the final state


class KMN:
    """``KMN(memories (N, K), r, alpha, rcond=1e-7)``; ``retrieve(queries, max_steps, tol)``."""

    def __init__(self, memories: torch.Tensor, r: float, alpha: float, *, rcond: float = 1e-7):
        if memories.ndim != 2 or len(memories) == 0:
            raise ValueError(f"memories: expected a non-empty (N, K) tensor, got {tuple(memories.shape)}")
        if not (r > 0 and alpha > 0):
            raise ValueError(f"r, alpha: expected both > 0, got r={r!r}, alpha={alpha!r}")
        self.memories = memories.double()
        self.r, self.alpha = float(r), float(alpha)
        k = self.kernel(self.memories, self.memories)
        # s_new = k(s, Ξ) K⁺ Ξ: keep A = K⁺ Ξ (N, K); K is symmetric, so K⁺ is too.
        self.weights = torch.linalg.pinv(k, rtol=rcond, hermitian=True) @ self.memories

    def kernel(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(x.double(), y.double())
        return torch.exp(-(d / self.r).pow(self.alpha))

    def update(self, s: torch.Tensor) -> torch.Tensor:
        return self.kernel(s, self.memories) @ self.weights

    def retrieve(self, queries: torch.Tensor, max_steps: int = 10, tol: Optional[float] = 1e-4) -> KMNRetrieval:
        s = queries.double()
        active = torch.ones(len(s), dtype=torch.bool)
        steps = torch.zeros(len(s), dtype=torch.int64)
        for _ in range(max_steps):
            if not bool(active.any()):
                break
            new = self.update(s[active])
            delta = (new - s[active]).abs().amax(1)
            s[active] = new
            steps[active] += 1
            if tol is not None:
                idx = active.nonzero().squeeze(1)
                active[idx[delta <= tol]] = False
        index = torch.cdist(s, self.memories).argmin(1)
        return KMNRetrieval(s.float(), steps, index)
