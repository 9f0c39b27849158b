"""``HopfieldLayer`` and ``HopfieldPooling``: hflayers' two wrappers around ``Hopfield`` with learned patterns.

Each holds a ``Hopfield`` as ``.hopfield`` and one learned pattern set of
hflayers' shape, (1, quantity, width) with ``batch_first=True`` or (quantity, 1,
width) without, so code that writes into ``lookup_weights`` or
``pooling_weights`` (hflayers' examples do) works unchanged.  The learned set is
shared by the whole batch: for ``HopfieldLayer`` that makes one bank per head for
every batch item, the layer regime of the fused kernel (docs/design.md §2).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import arguments as A
from .arguments import Role
from .hopfield import Hopfield

# hflayers' read-only properties of the wrappers, answered by the inner Hopfield.
_DELEGATED = (
    "batch_first", "scaling", "num_heads", "similarity", "backend", "stored_pattern_dim", "state_pattern_dim",
    "pattern_projection_dim", "input_size", "hidden_size", "output_size", "pattern_size", "update_steps_max",
    "update_steps_eps", "stored_pattern_as_static", "state_pattern_as_static", "pattern_projection_as_static",
    "normalize_stored_pattern", "normalize_stored_pattern_affine", "normalize_state_pattern",
    "normalize_state_pattern_affine", "normalize_pattern_projection", "normalize_pattern_projection_affine",
    "normalize_hopfield_space", "normalize_hopfield_space_affine",
)


def _delegating(cls):
    for name in _DELEGATED:
        setattr(cls, name, property(lambda self, n=name: getattr(self.hopfield, n), doc=f"``self.hopfield.{name}``"))
    return cls


def _pattern_set(quantity: int, width: int, batch_first: bool, trainable: bool) -> nn.Parameter:
    shape = (1, quantity, width) if batch_first else (quantity, 1, width)
    return nn.Parameter(torch.empty(shape), requires_grad=trainable)


@_delegating
class HopfieldLayer(nn.Module):
    """A learned lookup table: the input (state patterns) retrieves from ``quantity`` learned stored patterns.

    Args:
        input_size, hidden_size, output_size, pattern_size, num_heads, scaling, update_steps_max,
            update_steps_eps: as :class:`Hopfield`.
        lookup_weights_as_separated: learn separate pattern projections (``target_weights``) instead of
            using the stored patterns as their own projections.
        lookup_targets_as_trainable: whether ``target_weights`` learn.
        quantity: number of stored patterns (int >= 1).
        trainable: whether the stored patterns (``lookup_weights``) learn.
        **kwargs: every other argument of :class:`Hopfield` (normalisations, static patterns, dropout,
            ``similarity``, ``backend``, ...).

    Parameters: ``lookup_weights`` (1, quantity, stored_pattern_dim) (``(quantity, 1, ...)`` with
    ``batch_first=False``), ``target_weights`` likewise with ``pattern_projection_dim`` or None.

    Shapes: ``forward(input)`` takes state patterns (batch, L, input_size) ((L, batch, input_size) with
    ``batch_first=False``) and returns (batch, L, output_size), in the module's dtype.
    """

    def __init__(self, input_size: int, hidden_size: Optional[int] = None, output_size: Optional[int] = None,
                 pattern_size: Optional[int] = None, num_heads: int = 1, scaling: A.ScalingArg = None,
                 update_steps_max: A.StepsArg = 0, update_steps_eps: A.EpsArg = 1e-4,
                 lookup_weights_as_separated: bool = False, lookup_targets_as_trainable: bool = True,
                 quantity: int = 1, trainable: bool = True, **kwargs):
        super().__init__()
        self.quantity = A.check_int("quantity", quantity, 1)
        for name, flag in (("lookup_weights_as_separated", lookup_weights_as_separated),
                           ("lookup_targets_as_trainable", lookup_targets_as_trainable), ("trainable", trainable)):
            A.check_bool(name, flag)
        self.hopfield = Hopfield(input_size=input_size, hidden_size=hidden_size, output_size=output_size,
                                 pattern_size=pattern_size, num_heads=num_heads, scaling=scaling,
                                 update_steps_max=update_steps_max, update_steps_eps=update_steps_eps, **kwargs)
        bf = self.hopfield.batch_first
        self.lookup_weights = _pattern_set(quantity, self.hopfield.stored_pattern_dim, bf, trainable)
        if lookup_weights_as_separated:
            self.target_weights = _pattern_set(quantity, self.hopfield.pattern_projection_dim, bf,
                                               lookup_targets_as_trainable)
        else:
            self.register_parameter("target_weights", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """hflayers' initialisation, and the lookup (and target) weights N(0, 0.02²)."""
        self.hopfield.reset_parameters()
        nn.init.normal_(self.lookup_weights, mean=0.0, std=0.02)
        if self.target_weights is not None:
            nn.init.normal_(self.target_weights, mean=0.0, std=0.02)

    def _inputs(self, input: Tensor):
        stored = self.lookup_weights.reshape(self.quantity, -1)
        proj = stored if self.target_weights is None else self.target_weights.reshape(self.quantity, -1)
        role = Role("input", "state patterns", "L", self.hopfield.state_pattern_dim)
        return [stored, input, proj], [None, role, None]

    def forward(self, input: Tensor, stored_pattern_padding_mask: Optional[Tensor] = None,
                association_mask: Optional[Tensor] = None, return_info: bool = False):
        """Look ``input`` up; masks as :meth:`Hopfield.forward` with S = ``quantity``."""
        out, info = self.hopfield._associate(*self._inputs(input), stored_pattern_padding_mask, association_mask,
                                             want_info=return_info)
        out = self.hopfield._finish(out)
        return (out, info) if return_info else out

    def get_association_matrix(self, input: Tensor, stored_pattern_padding_mask: Optional[Tensor] = None,
                               association_mask: Optional[Tensor] = None) -> Tensor:
        """The softmax weights (batch, heads, L, quantity) (no grad)."""
        with torch.no_grad():
            return self.hopfield._associate(*self._inputs(input), stored_pattern_padding_mask, association_mask,
                                            mode="raw")

    def get_projected_pattern_matrix(self, input: Tensor, stored_pattern_padding_mask: Optional[Tensor] = None,
                                     association_mask: Optional[Tensor] = None) -> Tensor:
        """The pattern projections v (batch, heads, quantity, pattern_size) (no grad)."""
        with torch.no_grad():
            return self.hopfield._associate(*self._inputs(input), mode="values")


@_delegating
class HopfieldPooling(nn.Module):
    """Pooling of a set: ``quantity`` learned state patterns retrieve from each input set (bag).

    Args:
        input_size, hidden_size, output_size, pattern_size, num_heads, scaling, update_steps_max,
            update_steps_eps: as :class:`Hopfield`.
        quantity: number of learned state (pooling) patterns (int >= 1).
        trainable: whether they learn.
        **kwargs: every other argument of :class:`Hopfield`.

    Parameter: ``pooling_weights`` (1, quantity, state_pattern_dim) (``(quantity, 1, ...)`` with
    ``batch_first=False``).

    Shapes: ``forward(input)`` takes a bag (batch, S, input_size) used as stored patterns and projections,
    or a tuple (stored (batch, S, stored_pattern_size), projections (batch, S, pattern_projection_size))
    ((S, batch, ...) with ``batch_first=False``), and returns (batch, quantity * output_size) in the
    module's dtype.  This is the multiple-instance learning layer: each bag is its own bank.
    """

    def __init__(self, input_size: int, hidden_size: Optional[int] = None, output_size: Optional[int] = None,
                 pattern_size: Optional[int] = None, num_heads: int = 1, scaling: A.ScalingArg = None,
                 update_steps_max: A.StepsArg = 0, update_steps_eps: A.EpsArg = 1e-4,
                 quantity: int = 1, trainable: bool = True, **kwargs):
        super().__init__()
        self.quantity = A.check_int("quantity", quantity, 1)
        A.check_bool("trainable", trainable)
        self.hopfield = Hopfield(input_size=input_size, hidden_size=hidden_size, output_size=output_size,
                                 pattern_size=pattern_size, num_heads=num_heads, scaling=scaling,
                                 update_steps_max=update_steps_max, update_steps_eps=update_steps_eps, **kwargs)
        self.pooling_weights = _pattern_set(quantity, self.hopfield.state_pattern_dim, self.hopfield.batch_first,
                                            trainable)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """hflayers' initialisation, and the pooling weights N(0, 0.02²)."""
        self.hopfield.reset_parameters()
        nn.init.normal_(self.pooling_weights, mean=0.0, std=0.02)

    def _inputs(self, input: Union[Tensor, Tuple[Tensor, Tensor]]):
        h = self.hopfield
        if isinstance(input, Tensor):
            stored, proj, names = input, input, ("input", "input")
        elif isinstance(input, (tuple, list)) and len(input) == 2:
            (stored, proj), names = input, ("input[0]", "input[1]")
        else:
            raise TypeError("input: expected a tensor (stored = projection) or a tuple (stored, projection), "
                            f"got {type(input).__name__}")
        roles = [Role(names[0], "stored patterns", "S", h.stored_pattern_dim), None,
                 Role(names[1], "pattern projections", "S", h.pattern_projection_dim)]
        return [stored, self.pooling_weights.reshape(self.quantity, -1), proj], roles

    def forward(self, input: Union[Tensor, Tuple[Tensor, Tensor]], stored_pattern_padding_mask: Optional[Tensor] = None,
                association_mask: Optional[Tensor] = None, return_info: bool = False):
        """Pool each bag; masks as :meth:`Hopfield.forward` with L = ``quantity``."""
        out, info = self.hopfield._associate(*self._inputs(input), stored_pattern_padding_mask, association_mask,
                                             want_info=return_info)
        out = self.hopfield._finish(out)
        if not self.hopfield.batch_first:
            out = out.transpose(0, 1)
        out = out.flatten(start_dim=1)
        return (out, info) if return_info else out

    def get_association_matrix(self, input: Union[Tensor, Tuple[Tensor, Tensor]],
                               stored_pattern_padding_mask: Optional[Tensor] = None,
                               association_mask: Optional[Tensor] = None) -> Tensor:
        """The softmax weights (batch, heads, quantity, S) (no grad)."""
        with torch.no_grad():
            return self.hopfield._associate(*self._inputs(input), stored_pattern_padding_mask, association_mask,
                                            mode="raw")

    def get_projected_pattern_matrix(self, input: Union[Tensor, Tuple[Tensor, Tensor]],
                                     stored_pattern_padding_mask: Optional[Tensor] = None,
                                     association_mask: Optional[Tensor] = None) -> Tensor:
        """The pattern projections v (batch, heads, S, pattern_size) (no grad)."""
        with torch.no_grad():
            return self.hopfield._associate(*self._inputs(input), mode="values")
