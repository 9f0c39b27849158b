"""Hopfield layers (Ramsauer et al. 2020) as trainable modules on the fused kernels: a drop-in for ``hflayers``.

``Hopfield``, ``HopfieldLayer`` and ``HopfieldPooling`` take every constructor
and ``forward`` argument of ``hflayers`` (github.com/ml-jku/hopfield-layers),
so its code runs with only the import changed, plus ``similarity`` (``"dot"``,
``"l2"``, ``"l2sq"``), ``trainable_scaling`` and ``backend``;
``load_hflayers_state_dict`` loads a trained hflayers model.
``HopfieldNetwork`` is the plain recurrent network over a stored bank.
Every association without a mask runs through :func:`hen_kernels.hopfield_update`,
:func:`hen_kernels.hopfield_partial` or :func:`hen_kernels.hopfield_retrieve`, so the
forward is the fused kernel of the chosen backend and the backward its fused backward
(no B x N matrix is kept for training); on the CPU, ``Hopfield``'s forward of one input
for inference (what ``nn.MultiheadAttention`` computes, or that with hflayers' pattern
norms) is one C++ call, norms and projections included
(``Hopfield._plain_self_association``); ``docs/nn.md`` lists every
default and every difference from hflayers.

Modules by role: ``hopfield`` (the Hopfield module), ``wrappers`` (HopfieldLayer,
HopfieldPooling), ``network`` (HopfieldNetwork), ``association`` (fused and dense
association), ``arguments`` (argument checks in the user's terms), ``convert``
(hflayers state dicts).
"""
from ..types import Retrieval
from .association import HopfieldInfo
from .convert import convert_hflayers_state_dict, load_hflayers_state_dict
from .hopfield import Hopfield
from .network import HopfieldNetwork
from .wrappers import HopfieldLayer, HopfieldPooling

__all__ = [
    "Hopfield",
    "HopfieldInfo",
    "HopfieldLayer",
    "HopfieldNetwork",
    "HopfieldPooling",
    "Retrieval",
    "convert_hflayers_state_dict",
    "load_hflayers_state_dict",
]
