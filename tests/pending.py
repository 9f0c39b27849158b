"""Numerics rules (docs/design.md §5.1) that a backend's kernels do not follow yet: ONE table.

tests/test_kernels.py, tests/test_autograd.py and tests/test_properties.py mark a
(backend, feature) case listed here as a strict xfail: it must fail, and fail by
an assertion, so a kernel that starts to pass turns the run red until its engineer
deletes the entry, and a typo in a test is not mistaken for a pending kernel.
Delete an entry in the same change that makes the kernel follow the rule.

Features:
  l2_near    "l2" with queries on, next to and far from stored patterns, at the dtype tolerances
  l2sq_near  the same for "l2sq" (no square root to magnify the expansion's error near zero)
  l2_far     ℓ2/ℓ2sq on a bank far from the origin (‖x‖ ≈ 1e4, patterns 0.1 apart)
  ties       identical rows: the smallest global row, whatever the chunking and block position
  weights    per-query feature weights (issue 14), forward and backward, against the reference
  saturated_grad  gradients of a saturated softmax (queries on or next to stored rows, P of their row 1
             to float32's precision): every gradient within the gradient tolerance of float64 autograd
"""
from __future__ import annotations

import pytest

FEATURES = ("l2_near", "l2sq_near", "l2_far", "ties", "weights", "saturated_grad")

# The CUDA kernels are checked on the CPU emulator (tests/test_cuda_emulated.py), not yet on a GPU.
# An entry reads
#   "cpu": {"ties": "scores of identical rows depend on their block position (issue 13.3)"}
PENDING: dict[str, dict[str, str]] = {}


def marks(backend: str, feature: str) -> list:
    """The strict-xfail mark for (backend, feature) when it is pending, else no mark."""
    assert feature in FEATURES, feature
    reason = PENDING.get(backend, {}).get(feature)
    if reason is None:
        return []
    return [pytest.mark.xfail(strict=True, raises=AssertionError,
                              reason=f"pending ({backend}, {feature}): {reason}")]


def backend_params(backends: list, feature: str) -> list:
    """``backends`` as pytest params, each carrying its pending mark for ``feature``."""
    return [pytest.param(b, marks=marks(b, feature), id=b) for b in backends]


def is_pending(backend: str, feature: str) -> bool:
    return feature in PENDING.get(backend, {})
