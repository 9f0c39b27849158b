"""HEN: Hopfield Encoding Networks, the application built on the kernels and the memory bank.

``layer`` (the :class:`HEN` itself), ``codecs`` and ``taef2`` (what content is encoded
with, and where pretrained weights are found), ``masks`` (masked queries), ``data``,
``metrics``, ``kmn`` (the paper's baseline), ``demo`` (``hen demo``) and ``experiments``
(``hen experiment NAME``).  Nothing here imports diffusers, transformers or
sentence-transformers until a codec or encoder that needs them is built, so
``hk.HEN`` stays cheap to reach.
"""
from .layer import HEN, Recall

__all__ = ["HEN", "Recall"]
