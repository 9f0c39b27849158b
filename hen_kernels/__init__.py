"""hen_kernels: fused streaming-softmax Modern Hopfield updates and Hopfield Encoding Networks."""
from .ops import (
    available_backends,
    energy,
    hopfield_partial,
    hopfield_retrieve,
    hopfield_update,
    merge_partials,
)
from .bank import MemoryBank
from . import nn
from .types import Partial, Retrieval

__all__ = [
    "MemoryBank",
    "Partial",
    "Retrieval",
    "available_backends",
    "energy",
    "hopfield_partial",
    "hopfield_retrieve",
    "hopfield_update",
    "merge_partials",
]
__version__ = "0.1.0"
