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
from . import workarounds

# Before the first call of any of its functions, ours or the user's, can run on many threads at once.
workarounds.settle_mkl_vml_dispatch()

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

# HEN (the hen subpackage) is exported lazily: `import hen_kernels` stays fast and never imports
# diffusers, transformers or sentence-transformers.
# `hk.codecs` is the module itself (TAEF2Codec, ImageCodec, DiffusersCodec, text encoders).
_LAZY = {"HEN": ("hen", "HEN"), "Recall": ("hen", "Recall"), "codecs": ("hen.codecs", None)}
__all__ += list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        module = importlib.import_module(f".{mod}", __name__)
        return module if attr is None else getattr(module, attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
