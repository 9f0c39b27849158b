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
  saturated_grad  gradients of a saturated softmax (queries on stored rows, P of their row ≈ 1): the
             query gradient no worse than the float32 reference's
"""
from __future__ import annotations

import pytest

FEATURES = ("l2_near", "l2sq_near", "l2_far", "ties", "weights", "saturated_grad")

# The CUDA kernels are checked on the CPU emulator (tests/test_cuda_emulated.py), not yet on a GPU.
# An entry reads
#   "cpu": {"ties": "scores of identical rows depend on their block position (issue 13.3)"}
_SATURATED = ("dt = P (dP - delta) with delta = dout . out, as flash attention's backward takes it, cancels against "
              "dP of the dominant row to float32's rounding of |dout| |v|, where the reference's float32 autograd "
              "takes delta from P and dP and cancels exactly (PERFORMANCE.md §5.23)")
PENDING: dict[str, dict[str, str]] = {
    "cpu": {"saturated_grad": "the C++ backward: " + _SATURATED},
    # The Triton backward takes delta the same way; the cuda backend's forward takes the Triton backward
    # or the streaming one (backward_cpu.py, which fails this on the CPU too).  Not yet run on a GPU.
    "triton": {"saturated_grad": "the Triton backward: " + _SATURATED},
    "cuda": {"saturated_grad": "the Triton or the streaming backward: " + _SATURATED},
}


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
