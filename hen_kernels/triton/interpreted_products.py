"""The GPU's float32 tensor-core products, emulated under TRITON_INTERPRET=1 for this package's kernels.

The interpreter's ``tl.dot`` is numpy's float32 matmul whatever ``input_precision`` says, so a kernel
whose answer depends on how a GPU splits float32 operands passed there and failed on the first GPU
(benchmarks/results/nvidia-h200/run3: a one-hot weight row times the stored rows did not give the
stored row back).  Every launch of a kernel here runs ``as_on_gpu`` (launch.py, backward.py), so the
test suite and ``hen check`` on a CPU see the products a GPU computes:

* "tf32": the tensor core keeps 10 of an operand's 23 mantissa bits; the emulation drops the rest
  (rounding them instead changes the same 25 % of the elements of 1·v under tf32x3, measured: the
  misses do not hang on which the hardware does);
* "tf32x3" (triton's F32DotTC pass): each operand a is rounded to tf32 (cvt.rna: to nearest, ties
  away from zero) as big, small = a - big in float32, and the answer is
  big·big + nan-to-zero(small·big + big·small), each of the three a tf32 product.

The products of two tf32 numbers are exact in float64 and summed there (the tensor core sums them
in at least float32): the emulation is as precise as the hardware or a little more, never less.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

import numpy as np

from .common import INTERPRET

TF32_DROPPED_BITS = np.uint32(0x1FFF)  # the 13 low mantissa bits a tf32 operand lacks
TF32_HALF = np.uint32(0x1000)  # half of tf32's last place, in float32's bits


def tf32_read(a: np.ndarray) -> np.ndarray:
    """What a tf32 tensor-core product reads of a float32 operand."""
    return (a.view(np.uint32) & ~TF32_DROPPED_BITS).view(np.float32)


def tf32_rounded(a: np.ndarray) -> np.ndarray:
    """cvt.rna.tf32.f32: to the nearest tf32, ties away from zero (finite inputs; inf stays inf)."""
    return ((a.view(np.uint32) + TF32_HALF) & ~TF32_DROPPED_BITS).view(np.float32)


def tf32_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.matmul(tf32_read(a).astype(np.float64), tf32_read(b).astype(np.float64)).astype(np.float32)


def tf32x3_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a_big, b_big = tf32_rounded(a), tf32_rounded(b)
    with np.errstate(invalid="ignore"):  # inf - inf in the small parts: zeroed below, as on the GPU
        small = tf32_product(a - a_big, b_big) + tf32_product(a_big, b - b_big)
    return tf32_product(a_big, b_big) + np.nan_to_num(small, nan=0.0, posinf=np.inf, neginf=-np.inf)


def _hook():
    """Route the interpreter's dots through ``_dot`` once per process; outside ``as_on_gpu`` it does what it did.
    None (and numpy's products) where this triton's interpreter lacks the names it patches."""
    try:
        from triton._C.libtriton import ir
        from triton.runtime import interpreter
        exact = interpreter.InterpreterBuilder.create_dot
    except (ImportError, AttributeError):
        return None
    products = {ir.INPUT_PRECISION.TF32: tf32_product, ir.INPUT_PRECISION.TF32x3: tf32x3_product}

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        product = products.get(input_precision) if _ACTIVE.get() else None
        if product is None or a.data.dtype != np.float32 or b.data.dtype != np.float32:
            return exact(self, a, b, d, input_precision, max_num_imprecise_acc)
        return interpreter.TensorHandle(product(a.data, b.data).astype(d.data.dtype) + d.data, d.dtype.scalar)

    interpreter.InterpreterBuilder.create_dot = create_dot
    return create_dot


# A context variable, not a patch around each launch: threads launching at once cannot undo each other's,
# and other code's interpreted kernels keep numpy's products.
_ACTIVE = contextvars.ContextVar("hen_kernels_gpu_products", default=False)
EMULATED = INTERPRET and _hook() is not None


@contextlib.contextmanager
def gpu_products():
    """Within the block, this thread's interpreted float32 tl.dot at tf32 or tf32x3 is the GPU's."""
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def as_on_gpu(launcher):
    """``launcher``'s kernels compute their float32 products as a GPU does (a no-op off the interpreter)."""
    if not INTERPRET:
        return launcher

    @functools.wraps(launcher)
    def wrapped(*args, **kwargs):
        with gpu_products():
            return launcher(*args, **kwargs)
    return wrapped
