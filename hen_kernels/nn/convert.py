"""Load an hflayers ``state_dict`` into the matching hk.nn module.

hflayers keeps the three input projections in ``association_core`` either
packed (``in_proj_weight``: the rows of W_q, W_k, W_v stacked, leaving out a
static pattern's) or separate (``q_proj_weight``, ``k_proj_weight``,
``v_proj_weight``: when the widths differ, ``pattern_size`` is given or the
projections are connected), with one ``in_proj_bias`` stacked in the same order
(its value part is there even when the projections are static).  hk.nn keeps
one ``nn.Linear`` per projection.  The module must be built with the same
constructor arguments as the hflayers module; its ``scaling`` is kept (hflayers
does not save beta in its state dict).

    hop = hk.nn.HopfieldPooling(input_size=64, num_heads=4, quantity=2)   # hflayers' arguments
    hk.nn.load_hflayers_state_dict(hop, torch.load("hflayers_pooling.pt"))
"""
from __future__ import annotations

import warnings
from typing import Dict, Mapping

import torch
from torch import Tensor, nn

from .hopfield import Hopfield
from .wrappers import HopfieldLayer, HopfieldPooling

_CORE = "association_core."
_NORMS = ("norm_stored_pattern", "norm_state_pattern", "norm_pattern_projection")


class _Source:
    """The hflayers keys under one prefix, remembering which were used."""

    def __init__(self, state_dict: Mapping[str, Tensor], prefix: str):
        self.items = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        self.used = set()

    def __contains__(self, key: str) -> bool:
        return key in self.items

    def take(self, key: str) -> Tensor:
        if key not in self.items:
            raise ValueError(f"state_dict: the hflayers key {key!r} is missing; build the hk.nn module with the "
                             "same arguments as the hflayers module")
        self.used.add(key)
        return self.items[key]


def _slices(total: Tensor, parts, what: str) -> Dict[str, Tensor]:
    out, row = {}, 0
    for name, rows in parts:
        if name is not None:
            out[name] = total[row:row + rows]
        row += rows
    if row != total.shape[0]:
        raise ValueError(f"state_dict: {what} has {total.shape[0]} rows, the module's projections need {row}; build "
                         "the hk.nn module with the same arguments as the hflayers module")
    return out


def _hopfield(h: Hopfield, src: _Source) -> Dict[str, Tensor]:
    out: Dict[str, Tensor] = {}
    lins = (("q", h.q_proj), ("k", h.k_proj), ("v", h.v_proj))
    if _CORE + "in_proj_weight" in src:
        parts = [(f"{n}_proj.weight", lin.out_features) for n, lin in lins if lin is not None]
        out.update(_slices(src.take(_CORE + "in_proj_weight"), parts, "association_core.in_proj_weight"))
    else:
        out.update({f"{n}_proj.weight": src.take(f"{_CORE}{n}_proj_weight") for n, lin in lins if lin is not None})
    if any(lin is not None and lin.bias is not None for _, lin in lins):
        # hflayers sizes the value part of the bias even when the projections are static (then unused).
        value_rows = h.num_heads * h.pattern_size
        parts = [(f"{n}_proj.bias" if lin is not None else None, lin.out_features if lin is not None else value_rows)
                 for n, lin in lins if lin is not None or n == "v"]
        out.update(_slices(src.take(_CORE + "in_proj_bias"), parts, "association_core.in_proj_bias"))
    if h.out_proj is not None:
        out["out_proj.weight"] = src.take(_CORE + "out_proj.weight")
        if h.out_proj.bias is not None:
            out["out_proj.bias"] = src.take(_CORE + "out_proj.bias")
    if h.bias_k is not None:
        warnings.warn("concat_bias_pattern: hflayers creates bias_k / bias_v but never appends them (its check for "
                      "static patterns compares a bool with None), while hk.nn appends them as documented, so this "
                      "module's outputs differ from hflayers'; build it with concat_bias_pattern=False to reproduce "
                      "hflayers exactly", stacklevel=3)
        out["bias_k"], out["bias_v"] = (src.take(_CORE + n).reshape(-1) for n in ("bias_k", "bias_v"))
    else:  # unused by hflayers' forward: dropping them reproduces its outputs
        for n in ("bias_k", "bias_v"):
            if _CORE + n in src:
                src.take(_CORE + n)
    if h.norm_hopfield_space is not None and h.norm_hopfield_space.elementwise_affine:
        out["norm_hopfield_space.weight"] = src.take(_CORE + "p_norm_weight")
        out["norm_hopfield_space.bias"] = src.take(_CORE + "p_norm_bias")
    for name in _NORMS:
        norm = getattr(h, name)
        if norm is not None and norm.elementwise_affine:
            out[f"{name}.weight"], out[f"{name}.bias"] = src.take(f"{name}.weight"), src.take(f"{name}.bias")
    out["scaling"] = h.scaling.detach().clone()
    return out


def convert_hflayers_state_dict(module: nn.Module, state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """An hflayers ``state_dict`` as the ``state_dict`` of ``module`` (a Hopfield, HopfieldLayer or HopfieldPooling
    built with the hflayers module's arguments).  Raises ``ValueError`` naming the key on any mismatch."""
    if isinstance(module, Hopfield):
        src, prefix, extra = _Source(state_dict, ""), "", ()
    elif isinstance(module, (HopfieldLayer, HopfieldPooling)):
        src, prefix = _Source(state_dict, "hopfield."), "hopfield."
        extra = ("lookup_weights", "target_weights") if isinstance(module, HopfieldLayer) else ("pooling_weights",)
    else:
        raise TypeError(f"module: expected an hk.nn Hopfield, HopfieldLayer or HopfieldPooling, got "
                        f"{type(module).__name__}")
    inner = module if isinstance(module, Hopfield) else module.hopfield
    out = {prefix + k: v for k, v in _hopfield(inner, src).items()}
    top = _Source(state_dict, "")
    for name in extra:
        if getattr(module, name) is not None:
            out[name] = top.take(name)
    unused = sorted(set(state_dict) - {prefix + k for k in src.used} - top.used)
    if unused:
        raise ValueError(f"state_dict: hflayers keys {unused} have no place in this module; build it with the same "
                         "arguments as the hflayers module")
    want = module.state_dict()
    for key, value in want.items():
        if key not in out:
            raise ValueError(f"state_dict: nothing in the hflayers state dict fills {key!r}")
        if tuple(out[key].shape) != tuple(value.shape):
            raise ValueError(f"state_dict: {key!r} gets shape {tuple(out[key].shape)} from hflayers, the module "
                             f"needs {tuple(value.shape)}; build it with the same arguments as the hflayers module")
    return out


def load_hflayers_state_dict(module: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Load an hflayers ``state_dict`` into ``module`` (see :func:`convert_hflayers_state_dict`); returns it."""
    with torch.no_grad():
        module.load_state_dict(convert_hflayers_state_dict(module, state_dict), strict=True)
    return module
