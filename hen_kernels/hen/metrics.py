"""Metrics of the paper: MSE, 1 - SSIM, identity accuracy, column rank, query/memory cosine similarity.

Images are (N, C, H, W) float tensors in [0, 1]; per-image metrics return (N,) float64 numpy arrays.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch


def mse(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Mean squared error per image."""
    if a.shape != b.shape:
        raise ValueError(f"b: expected shape {tuple(a.shape)} like a, got {tuple(b.shape)}")
    return (a.double() - b.double()).pow(2).reshape(len(a), -1).mean(1).numpy()


def one_minus_ssim(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """1 - SSIM per image (scikit-image, data range 1, channels averaged, 7 x 7 windows or smaller)."""
    from skimage.metrics import structural_similarity

    if a.shape != b.shape:
        raise ValueError(f"b: expected shape {tuple(a.shape)} like a, got {tuple(b.shape)}")
    a_np, b_np = a.double().numpy(), b.double().numpy()
    side = min(a.shape[-2:])
    win = min(7, side if side % 2 else side - 1)
    out = np.empty(len(a))
    for i in range(len(a)):
        out[i] = 1.0 - structural_similarity(a_np[i], b_np[i], data_range=1.0, channel_axis=0, win_size=win)
    return out


def identity_accuracy(index: torch.Tensor, expected: torch.Tensor) -> float:
    """Fraction of queries whose recalled row is the stored one."""
    index, expected = torch.as_tensor(index), torch.as_tensor(expected)
    if index.shape != expected.shape:
        raise ValueError(f"expected: shape {tuple(expected.shape)} differs from index {tuple(index.shape)}")
    return float((index == expected).double().mean()) if len(index) else float("nan")


def column_rank(states: torch.Tensor, rtol: float = 1e-3) -> int:
    """Numerical rank of the recovered pattern matrix (one column per recovered pattern).

    A collapse of many recalls onto a few metastable states lowers it; compare with the rank
    of the stored patterns the queries came from (the paper's appendix sanity check).
    """
    s = states.double().reshape(len(states), -1)
    return int(torch.linalg.matrix_rank(s.T, rtol=rtol))


def cosine_matrix(queries: torch.Tensor, memories: torch.Tensor) -> torch.Tensor:
    """cos(q_i, x_j) for every pair, (Nq, Nm) float32."""
    q = torch.nn.functional.normalize(queries.float().reshape(len(queries), -1), dim=1)
    m = torch.nn.functional.normalize(memories.float().reshape(len(memories), -1), dim=1)
    return q @ m.T


def cosine_distributions(queries: torch.Tensor, memories: torch.Tensor, *, max_cross: int = 200_000,
                         seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """The paper's Fig. 3: (self, cross) cosine similarities; query i belongs to memory i.

    ``self`` is cos(q_i, x_i) for every i; ``cross`` is cos(q_i, x_j), j != i, for every pair or a
    uniform sample of ``max_cross`` of them.
    """
    if len(queries) > len(memories):
        raise ValueError("queries: query i must belong to memory i, so there can be no more queries than memories")
    c = cosine_matrix(queries, memories)
    n = len(queries)
    self_c = c[torch.arange(n), torch.arange(n)].numpy().astype(np.float64)
    mask = torch.ones_like(c, dtype=torch.bool)
    mask[torch.arange(n), torch.arange(n)] = False
    cross = c[mask]
    if cross.numel() > max_cross:
        g = torch.Generator().manual_seed(seed)
        cross = cross[torch.randint(cross.numel(), (max_cross,), generator=g)]
    return self_c, cross.numpy().astype(np.float64)


def separability(queries: torch.Tensor, memories: torch.Tensor, **kw) -> Dict[str, float]:
    """Summary of :func:`cosine_distributions`: means, d' and the cosine nearest-neighbour accuracy.

    d' = (mean self - mean cross) / sqrt((var self + var cross) / 2); ``nn_accuracy`` is the fraction
    of queries whose own memory has the highest cosine among all memories.
    """
    s, x = cosine_distributions(queries, memories, **kw)
    c = cosine_matrix(queries, memories)
    nn_acc = float((c.argmax(1) == torch.arange(len(queries))).double().mean())
    d = (s.mean() - x.mean()) / np.sqrt(max((s.var() + x.var()) / 2, 1e-30))
    return dict(self_mean=float(s.mean()), self_std=float(s.std()), cross_mean=float(x.mean()),
                cross_std=float(x.std()), d_prime=float(d), nn_accuracy=nn_acc)


def summarize(recalled: Optional[torch.Tensor], target: Optional[torch.Tensor], index: torch.Tensor,
              expected: torch.Tensor, top_weight: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """accuracy, and (with images) mean MSE and 1 - SSIM, and the mean top weight."""
    out = dict(accuracy=identity_accuracy(index, expected), n=int(len(index)))
    if recalled is not None and target is not None:
        out["mse"] = float(mse(recalled, target).mean())
        out["one_minus_ssim"] = float(one_minus_ssim(recalled, target).mean())
    if top_weight is not None:
        out["top_weight"] = float(torch.as_tensor(top_weight).double().mean())
    return out
