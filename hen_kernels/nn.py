"""Hopfield layers (seed 001; Ramsauer et al. 2020) as trainable modules on the fused kernels.

``Hopfield``, ``HopfieldLayer`` and ``HopfieldPooling`` take the constructor and
``forward`` arguments of ``hflayers`` (github.com/ml-jku/hopfield-layers) for
their common uses, plus ``similarity`` (``"dot"``, ``"l2"``, ``"l2sq"``);
``HopfieldNetwork`` is the seed's plain recurrent network on a stored bank.
Every association runs through :func:`hen_kernels.hopfield_partial` /
:func:`hen_kernels.hopfield_retrieve`, so the forward is the fused kernel of
the chosen backend and the backward is the fused backward of
:mod:`hen_kernels.autograd` (no B x N matrix is kept for training).  Masks and
dropout on the association matrix need that matrix, so with a mask, or with
``dropout > 0`` in training mode, the module computes the dense masked softmax
in PyTorch instead (``docs/nn.md`` lists every default and difference).

Shapes (``batch_first=True``): stored patterns (batch, S, stored_size), state
patterns (batch, L, input_size), pattern projections (batch, S, proj_size);
output (batch, L, output_size).  Inside, each head works in its own Hopfield
space of ``hidden_size`` dims: q (batch, heads, L, hidden), k (batch, heads, S,
hidden), v (batch, heads, S, pattern_size), and
``out_h = softmax(beta_h · sim(k, q)) v`` after ``update_steps_max`` updates
``q <- softmax(beta_h · sim(k, q)) k`` that stop per query once
max|Δq| <= ``update_steps_eps``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import ops, reference, streaming
from .constants import SIMILARITIES
from .types import Partial, Retrieval

Scaling = Optional[Union[float, Tensor]]

# update_steps_max=None means "until update_steps_eps": bounded here so a
# non-contracting configuration still returns.
UNBOUNDED_STEPS = 1000


class HopfieldInfo(NamedTuple):
    """Per (batch, head, state pattern) diagnostics of the last association."""

    top_weight: Tensor  # softmax weight of the best stored pattern: ≈1 in one basin, small in a metastable mix
    top_index: Tensor  # that stored pattern's row
    energy: Tensor  # E(q) of docs/design.md §1 in the head's Hopfield space, at the final state
    steps: Tensor  # associations performed (1 + query-space updates)


def _layer_norm(enabled: bool, affine: bool, size: Optional[int], eps: float, what: str) -> Optional[nn.LayerNorm]:
    if affine and not enabled:
        raise ValueError(f"normalize_{what}_affine: affine normalization needs normalize_{what}=True")
    if not enabled:
        return None
    if size is None:
        raise ValueError(f"normalize_{what}: the {what} size is needed to set up its normalization")
    return nn.LayerNorm(size, eps=eps, elementwise_affine=affine)


def _heads(t: Tensor, heads: int) -> Tensor:
    """(..., S, heads * d) -> (..., heads, S, d)."""
    return t.reshape(t.shape[:-1] + (heads, t.shape[-1] // heads)).movedim(-2, -3)


class Hopfield(nn.Module):
    """Hopfield association of state patterns with stored patterns (hflayers' ``Hopfield``).

    ``input`` to :meth:`forward` is one tensor (stored = state = projection)
    or a tuple ``(stored, state, projection)``.
    """

    def __init__(
        self,
        input_size: Optional[int] = None,
        hidden_size: Optional[int] = None,
        output_size: Optional[int] = None,
        pattern_size: Optional[int] = None,
        num_heads: int = 1,
        scaling: Scaling = None,
        update_steps_max: Optional[int] = 0,
        update_steps_eps: float = 1e-4,
        normalize_stored_pattern: bool = True,
        normalize_stored_pattern_affine: bool = True,
        normalize_stored_pattern_eps: float = 1e-5,
        normalize_state_pattern: bool = True,
        normalize_state_pattern_affine: bool = True,
        normalize_state_pattern_eps: float = 1e-5,
        normalize_pattern_projection: bool = True,
        normalize_pattern_projection_affine: bool = True,
        normalize_pattern_projection_eps: float = 1e-5,
        stored_pattern_as_static: bool = False,
        state_pattern_as_static: bool = False,
        pattern_projection_as_static: bool = False,
        stored_pattern_size: Optional[int] = None,
        pattern_projection_size: Optional[int] = None,
        batch_first: bool = True,
        dropout: float = 0.0,
        input_bias: bool = True,
        disable_out_projection: bool = False,
        similarity: str = "dot",
        trainable_scaling: bool = False,
        backend: Optional[str] = None,
    ):
        super().__init__()
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads: expected an int >= 1, got {num_heads!r}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity: expected one of {SIMILARITIES}, got {similarity!r}")
        if update_steps_max is not None and (not isinstance(update_steps_max, int) or update_steps_max < 0):
            raise ValueError(f"update_steps_max: expected an int >= 0 or None, got {update_steps_max!r}")
        if not (isinstance(update_steps_eps, (int, float)) and update_steps_eps >= 0):
            raise ValueError(f"update_steps_eps: expected a float >= 0, got {update_steps_eps!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        self.num_heads = num_heads
        self.similarity = similarity
        self.backend = backend
        self.batch_first = batch_first
        self.dropout = dropout
        self.update_steps_max = update_steps_max
        self.update_steps_eps = float(update_steps_eps)

        if hidden_size is None:
            if input_size is None:
                raise ValueError("hidden_size: give hidden_size or input_size (hidden_size = input_size // num_heads)")
            if input_size % num_heads:
                raise ValueError(f"input_size: {input_size} is not divisible by num_heads = {num_heads}")
            hidden_size = input_size // num_heads
        self.hidden_size = hidden_size
        self.pattern_size = hidden_size if pattern_size is None else pattern_size
        self.input_size = input_size
        self.stored_pattern_as_static = stored_pattern_as_static
        self.state_pattern_as_static = state_pattern_as_static
        self.pattern_projection_as_static = pattern_projection_as_static
        # Raw widths of the three inputs: a static pattern is already in the Hopfield space.
        state_dim = hidden_size if state_pattern_as_static else input_size
        stored_dim = hidden_size if stored_pattern_as_static else (stored_pattern_size or input_size)
        proj_dim = self.pattern_size if pattern_projection_as_static else (pattern_projection_size or input_size)
        self.state_pattern_dim, self.stored_pattern_dim, self.pattern_projection_dim = state_dim, stored_dim, proj_dim
        for name, dim in (("input_size", state_dim), ("stored_pattern_size", stored_dim),
                          ("pattern_projection_size", proj_dim)):
            if dim is None:
                raise ValueError(f"{name}: needed (the pattern is not static)")

        hopfield_dim, value_dim = num_heads * hidden_size, num_heads * self.pattern_size
        self.q_proj = None if state_pattern_as_static else nn.Linear(state_dim, hopfield_dim, bias=input_bias)
        self.k_proj = None if stored_pattern_as_static else nn.Linear(stored_dim, hopfield_dim, bias=input_bias)
        self.v_proj = None if pattern_projection_as_static else nn.Linear(proj_dim, value_dim, bias=input_bias)
        self.output_size = None if disable_out_projection else (output_size or input_size or value_dim)
        self.out_proj = None if disable_out_projection else nn.Linear(value_dim, self.output_size, bias=input_bias)

        self.norm_stored_pattern = _layer_norm(normalize_stored_pattern, normalize_stored_pattern_affine,
                                               stored_dim, normalize_stored_pattern_eps, "stored_pattern")
        self.norm_state_pattern = _layer_norm(normalize_state_pattern, normalize_state_pattern_affine,
                                              state_dim, normalize_state_pattern_eps, "state_pattern")
        self.norm_pattern_projection = _layer_norm(normalize_pattern_projection, normalize_pattern_projection_affine,
                                                   proj_dim, normalize_pattern_projection_eps, "pattern_projection")

        if scaling is None:
            scaling = 1.0 / math.sqrt(hidden_size)
        beta = torch.as_tensor(scaling, dtype=torch.float32).detach().clone()
        if beta.dim() == 0:
            beta = beta.expand(num_heads).clone()
        if beta.shape != (num_heads,):
            raise ValueError(f"scaling: expected a float or one entry per head ({num_heads},), got {tuple(beta.shape)}")
        if not bool(((beta > 0) & torch.isfinite(beta)).all()):
            raise ValueError("scaling: expected every entry finite and > 0")
        if trainable_scaling:
            self.scaling = nn.Parameter(beta)
        else:
            self.register_buffer("scaling", beta)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """hflayers' initialisation: projections N(0, 0.02²), biases 0, LayerNorm identity."""
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if lin is not None:
                nn.init.normal_(lin.weight, mean=0.0, std=0.02)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
        for norm in (self.norm_stored_pattern, self.norm_state_pattern, self.norm_pattern_projection):
            if norm is not None:
                norm.reset_parameters()

    # --- the three patterns into each head's Hopfield space ---------------------------------

    def _project(self, t: Tensor, norm, proj, width: int) -> Tensor:
        if norm is not None:
            t = norm(t)
        if proj is None:  # static: the same pattern in every head
            return t.unsqueeze(-3).expand(t.shape[:-2] + (self.num_heads,) + t.shape[-2:])
        return _heads(proj(t), self.num_heads)

    def _time_major(self, t: Tensor, shared: bool) -> Tensor:
        return t if (self.batch_first or shared) else t.transpose(0, 1)

    def _patterns(self, stored, state, proj, stored_shared: bool, state_shared: bool):
        stored = self._time_major(stored, stored_shared)
        proj = self._time_major(proj, stored_shared)
        state = self._time_major(state, state_shared)
        q = self._project(state, self.norm_state_pattern, self.q_proj, self.hidden_size)
        k = self._project(stored, self.norm_stored_pattern, self.k_proj, self.hidden_size)
        v = self._project(proj, self.norm_pattern_projection, self.v_proj, self.pattern_size)
        return q, k, v

    @property
    def _steps(self) -> int:
        return UNBOUNDED_STEPS if self.update_steps_max is None else self.update_steps_max

    # --- the association: fused, or dense where a mask or dropout needs the matrix ----------

    def _fused(self, q: Tensor, k: Tensor, v: Tensor, want_info: bool):
        kw = dict(similarity=self.similarity, backend=self.backend)
        state, steps = q, None
        if self._steps > 0:
            r = ops.hopfield_retrieve(q, k, self.scaling, max_steps=self._steps, tol=self.update_steps_eps, **kw)
            state, steps = r.state, r.steps + 1
        p = ops.hopfield_partial(state, k, self.scaling, values=v, **kw)
        info = None
        if want_info:
            if steps is None:
                steps = torch.ones(p.lse.shape, dtype=torch.int64, device=q.device)
            with torch.no_grad():
                energy = streaming.energy_from_lse(state, k, self.scaling, self.similarity, p.lse).float()
            info = HopfieldInfo(p.top_weight.detach(), p.top_index, energy, steps)
        return p.out.to(q.dtype), info

    def _dense(self, q: Tensor, k: Tensor, v: Tensor, padding_mask: Optional[Tensor],
               association_mask: Optional[Tensor], want_info: bool, raw: bool = False):
        """The masked softmax in PyTorch, on q (batch, heads, L, d), k (batch, heads, S, d)."""
        bt, h, lq, s = q.shape[0], q.shape[1], q.shape[2], k.shape[-2]
        add = None
        if association_mask is not None:
            m = association_mask.to(q.device)
            if m.dim() == 3:
                if m.shape != (bt * h, lq, s):
                    raise ValueError(f"association_mask: expected ({lq}, {s}) or ({bt * h}, {lq}, {s}), "
                                     f"got {tuple(m.shape)}")
                m = m.reshape(bt, h, lq, s)
            elif m.shape != (lq, s):
                raise ValueError(f"association_mask: expected ({lq}, {s}) or ({bt * h}, {lq}, {s}), "
                                 f"got {tuple(m.shape)}")
            add = m
        if padding_mask is not None:
            if padding_mask.shape != (bt, s):
                raise ValueError(f"stored_pattern_padding_mask: expected ({bt}, {s}), got {tuple(padding_mask.shape)}")
            pad = padding_mask.to(q.device).bool()[:, None, None, :]
            add = pad if add is None else (add | pad if add.dtype == torch.bool else add.masked_fill(pad, -math.inf))

        def assoc(state):
            t = reference.scores(state, k, self.scaling, self.similarity)
            if add is not None:
                t = t.masked_fill(add, -math.inf) if add.dtype == torch.bool else t + add.to(t.dtype)
            return t

        def step(state: Tensor) -> Partial:
            t = assoc(state)
            out = torch.softmax(t, -1).to(k.dtype) @ k
            with torch.no_grad():  # the loop's per-query report; the layer's info comes from the last association
                lse = torch.logsumexp(t, -1)
                top_score, top_index = t.max(-1)
            return Partial(out, lse, top_score, top_index)

        state = q
        steps = torch.ones(q.shape[:-1], dtype=torch.int64, device=q.device)
        if self._steps > 0:
            r = streaming.retrieve(step, q, value_dim=k.shape[-1], max_steps=self._steps, tol=self.update_steps_eps)
            state, steps = r.state, r.steps + 1
        t = assoc(state)
        a = torch.softmax(t, -1)
        if raw:
            return a
        out = nn.functional.dropout(a, p=self.dropout, training=self.training).to(v.dtype) @ v
        info = None
        if want_info:
            with torch.no_grad():
                lse = torch.logsumexp(t, -1)
                top_score, top_index = t.max(-1)
                energy = streaming.energy_from_lse(state, k, self.scaling, self.similarity, lse).float()
            info = HopfieldInfo(torch.exp(top_score - lse).float(), top_index, energy, steps)
        return out.to(q.dtype), info

    def _associate(self, stored, state, proj, padding_mask=None, association_mask=None, *, want_info=False,
                   stored_shared=False, state_shared=False, raw=False):
        q, k, v = self._patterns(stored, state, proj, stored_shared, state_shared)
        # Batch size from whichever input carries it.
        bt = None if state_shared else q.shape[0]
        bt = bt if bt is not None else (None if stored_shared else k.shape[0])
        dense = raw or padding_mask is not None or association_mask is not None or (self.training and self.dropout > 0)
        if dense or not stored_shared:
            if stored_shared:
                k, v = (t.expand((bt,) + t.shape) for t in (k, v))
            if state_shared:
                q = q.expand((bt,) + q.shape)
            if dense:
                return self._dense(q, k, v, padding_mask, association_mask, want_info, raw=raw)
            return self._fused(q, k, v, want_info)
        # A bank shared by the whole batch: the batch's queries become one long query block per head.
        if state_shared:
            raise ValueError("input: at least one of the stored and state patterns must carry a batch dim")
        b, h, lq, d = q.shape
        qh = q.transpose(0, 1).reshape(h, b * lq, d)
        out, info = self._fused(qh, k, v, want_info)
        out = out.reshape(h, b, lq, -1).transpose(0, 1)
        if info is not None:
            info = HopfieldInfo(*(f.reshape(h, b, lq).transpose(0, 1) for f in info))
        return out, info

    def _finish(self, out: Tensor) -> Tensor:
        out = out.movedim(-3, -2)  # (batch, L, heads, d)
        out = out.reshape(out.shape[:-2] + (-1,))
        if self.out_proj is not None:
            out = self.out_proj(out)
        return out if self.batch_first else out.transpose(0, 1)

    @staticmethod
    def _split_input(input) -> Tuple[Tensor, Tensor, Tensor]:
        if isinstance(input, Tensor):
            return input, input, input
        if isinstance(input, (tuple, list)) and len(input) == 3:
            return tuple(input)
        raise TypeError("input: expected a tensor (stored = state = projection) or a tuple (stored, state, projection)")

    def forward(self, input, stored_pattern_padding_mask: Optional[Tensor] = None,
                association_mask: Optional[Tensor] = None, return_info: bool = False):
        """Associate; with ``return_info`` also a :class:`HopfieldInfo` (batch, heads, L)."""
        stored, state, proj = self._split_input(input)
        out, info = self._associate(stored, state, proj, stored_pattern_padding_mask, association_mask,
                                    want_info=return_info)
        out = self._finish(out)
        return (out, info) if return_info else out

    def get_association_matrix(self, input, stored_pattern_padding_mask: Optional[Tensor] = None,
                               association_mask: Optional[Tensor] = None) -> Tensor:
        """The softmax weights (batch, heads, L, S) of the last association (materialised, no grad)."""
        with torch.no_grad():
            return self._associate(*self._split_input(input), stored_pattern_padding_mask, association_mask,
                                   raw=True)

    def get_projected_pattern_matrix(self, input) -> Tensor:
        """The pattern projections v (batch, heads, S, pattern_size) (no grad)."""
        stored, state, proj = self._split_input(input)
        with torch.no_grad():
            return self._patterns(stored, state, proj, False, False)[2]


class HopfieldLayer(nn.Module):
    """A learned lookup table: the input (state) retrieves from ``quantity`` trainable stored patterns.

    The stored patterns are shared by the whole batch, so the fused kernel sees
    one bank per head and all batch x L states as one query block (the layer
    regime of docs/design.md §2).
    """

    def __init__(self, input_size: int, hidden_size: Optional[int] = None, output_size: Optional[int] = None,
                 pattern_size: Optional[int] = None, num_heads: int = 1, scaling: Scaling = None,
                 update_steps_max: Optional[int] = 0, update_steps_eps: float = 1e-4,
                 lookup_weights_as_separated: bool = False, lookup_targets_as_trainable: bool = True,
                 quantity: int = 1, trainable: bool = True, **kwargs):
        super().__init__()
        self.hopfield = Hopfield(input_size=input_size, hidden_size=hidden_size, output_size=output_size,
                                 pattern_size=pattern_size, num_heads=num_heads, scaling=scaling,
                                 update_steps_max=update_steps_max, update_steps_eps=update_steps_eps, **kwargs)
        self.quantity = quantity
        self.lookup_weights = nn.Parameter(torch.empty(quantity, self.hopfield.stored_pattern_dim),
                                           requires_grad=trainable)
        if lookup_weights_as_separated:
            self.target_weights = nn.Parameter(torch.empty(quantity, self.hopfield.pattern_projection_dim),
                                               requires_grad=lookup_targets_as_trainable)
        else:
            self.register_parameter("target_weights", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.hopfield.reset_parameters()
        nn.init.normal_(self.lookup_weights, mean=0.0, std=0.02)
        if self.target_weights is not None:
            nn.init.normal_(self.target_weights, mean=0.0, std=0.02)

    def _inputs(self, input: Tensor):
        targets = self.lookup_weights if self.target_weights is None else self.target_weights
        return self.lookup_weights, input, targets

    def forward(self, input: Tensor, stored_pattern_padding_mask: Optional[Tensor] = None,
                association_mask: Optional[Tensor] = None, return_info: bool = False):
        stored, state, proj = self._inputs(input)
        out, info = self.hopfield._associate(stored, state, proj, stored_pattern_padding_mask, association_mask,
                                             want_info=return_info, stored_shared=True)
        out = self.hopfield._finish(out)
        return (out, info) if return_info else out

    def get_association_matrix(self, input: Tensor, stored_pattern_padding_mask: Optional[Tensor] = None,
                               association_mask: Optional[Tensor] = None) -> Tensor:
        with torch.no_grad():
            return self.hopfield._associate(*self._inputs(input), stored_pattern_padding_mask, association_mask,
                                            stored_shared=True, raw=True)


class HopfieldPooling(nn.Module):
    """Pooling of a set: ``quantity`` trainable state patterns retrieve from the input's patterns.

    Output (batch, quantity * output_size).  This is the multiple-instance
    learning layer of the seed's applications: each bag is its own bank.
    """

    def __init__(self, input_size: int, hidden_size: Optional[int] = None, output_size: Optional[int] = None,
                 pattern_size: Optional[int] = None, num_heads: int = 1, scaling: Scaling = None,
                 update_steps_max: Optional[int] = 0, update_steps_eps: float = 1e-4,
                 quantity: int = 1, trainable: bool = True, **kwargs):
        super().__init__()
        self.hopfield = Hopfield(input_size=input_size, hidden_size=hidden_size, output_size=output_size,
                                 pattern_size=pattern_size, num_heads=num_heads, scaling=scaling,
                                 update_steps_max=update_steps_max, update_steps_eps=update_steps_eps, **kwargs)
        self.quantity = quantity
        self.pooling_weights = nn.Parameter(torch.empty(quantity, self.hopfield.state_pattern_dim),
                                            requires_grad=trainable)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.hopfield.reset_parameters()
        nn.init.normal_(self.pooling_weights, mean=0.0, std=0.02)

    def _inputs(self, input):
        if isinstance(input, Tensor):
            return input, self.pooling_weights, input
        if isinstance(input, (tuple, list)) and len(input) == 2:
            return input[0], self.pooling_weights, input[1]
        raise TypeError("input: expected a tensor (stored = projection) or a tuple (stored, projection)")

    def forward(self, input, stored_pattern_padding_mask: Optional[Tensor] = None,
                association_mask: Optional[Tensor] = None, return_info: bool = False):
        out, info = self.hopfield._associate(*self._inputs(input), stored_pattern_padding_mask, association_mask,
                                             want_info=return_info, state_shared=True)
        out = self.hopfield._finish(out)
        if not self.hopfield.batch_first:
            out = out.transpose(0, 1)
        out = out.flatten(start_dim=1)
        return (out, info) if return_info else out

    def get_association_matrix(self, input, stored_pattern_padding_mask: Optional[Tensor] = None,
                               association_mask: Optional[Tensor] = None) -> Tensor:
        with torch.no_grad():
            return self.hopfield._associate(*self._inputs(input), stored_pattern_padding_mask, association_mask,
                                            state_shared=True, raw=True)


class HopfieldNetwork(nn.Module):
    """The seed's recurrent modern Hopfield network: ξ <- softmax(β sim(X, ξ)) X until a fixed point.

    ``patterns`` (N, D) are stored as a buffer, or as a parameter with
    ``trainable=True``; :meth:`forward` iterates every state to
    ``update_steps_eps`` (at most ``update_steps_max`` steps) with the fused
    kernel and, with ``return_info``, returns the :class:`Retrieval` and the energy.
    """

    def __init__(self, patterns: Tensor, scaling: Union[float, Tensor] = 1.0, *, similarity: str = "dot",
                 update_steps_max: int = 100, update_steps_eps: float = 1e-4, trainable: bool = False,
                 backend: Optional[str] = None):
        super().__init__()
        if not isinstance(patterns, Tensor) or patterns.dim() != 2:
            raise ValueError("patterns: expected a tensor (N, D)")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity: expected one of {SIMILARITIES}, got {similarity!r}")
        self.similarity, self.backend = similarity, backend
        self.update_steps_max, self.update_steps_eps = update_steps_max, update_steps_eps
        self.scaling = scaling
        if trainable:
            self.stored_patterns = nn.Parameter(patterns.detach().clone())
        else:
            self.register_buffer("stored_patterns", patterns.detach().clone())

    def store(self, patterns: Tensor) -> None:
        """Append patterns (N', D) to a buffer bank."""
        if isinstance(self.stored_patterns, nn.Parameter):
            raise TypeError("store: the patterns are a trainable parameter; build a new network instead")
        self.stored_patterns = torch.cat([self.stored_patterns, patterns.to(self.stored_patterns)])

    def energy(self, state: Tensor) -> Tensor:
        return ops.energy(state, self.stored_patterns, self.scaling, similarity=self.similarity,
                          backend=self.backend)

    def forward(self, state: Tensor, return_info: bool = False):
        r = ops.hopfield_retrieve(state, self.stored_patterns, self.scaling, similarity=self.similarity,
                                  max_steps=self.update_steps_max, tol=self.update_steps_eps, backend=self.backend)
        if not return_info:
            return r.state
        return r.state, r, self.energy(r.state.detach())


__all__ = ["Hopfield", "HopfieldInfo", "HopfieldLayer", "HopfieldNetwork", "HopfieldPooling", "Retrieval"]
