"""``Hopfield``: hflayers' Hopfield module (Ramsauer et al. 2020) on the fused kernels.

It takes every constructor and ``forward`` argument of ``hflayers.Hopfield``
(github.com/ml-jku/hopfield-layers) plus ``similarity``, ``trainable_scaling``
and ``backend``; ``docs/nn.md`` lists each argument, its default and every
difference from hflayers, and says why.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import backends
from ..validation import check_similarity
from . import arguments as A
from .arguments import Role
from .association import HopfieldInfo, Setting, additive_mask, associate, refuse_fully_masked

Patterns = Union[Tensor, Tuple[Tensor, Tensor, Tensor]]


def _heads(t: Tensor, heads: int) -> Tensor:
    """(..., S, heads * d) -> (..., heads, S, d)."""
    return t.unflatten(-1, (heads, t.shape[-1] // heads)).transpose(-2, -3)


def _bare(m: object, kind: type) -> bool:
    """A module of exactly ``kind`` with no hook of its own, forward or backward, and its class's forward: one
    that may run inside a stacked product or in C++ (a hook, a subclass such as a LoRA adapter, or a forward
    replaced on the instance, as accelerate's offloading hooks do, must see its own call)."""
    return type(m) is kind and "forward" not in m.__dict__ and not (
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _bare_linear(p: object) -> bool:
    return _bare(p, nn.Linear)


def _global_hooks() -> bool:
    """Whether a hook is registered for every module (nn.modules.module.register_module_forward_hook, ...)."""
    m = nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
                or m._global_backward_pre_hooks)


class Hopfield(nn.Module):
    """Hopfield association of state patterns with stored patterns, multi-head (hflayers' ``Hopfield``).

    Per head h, in a Hopfield space of ``hidden_size`` dims::

        q = W_q LN(state),  k = W_k LN(stored),  v = W_v LN(projection)     (+ optional LN in Hopfield space)
        update_steps_max times, per query until max|Δq| <= update_steps_eps:  q <- softmax(beta_h sim(k, q)) k
        out = W_o concat_h( softmax(beta_h sim(k, q)) v )

    Args (hflayers' names and defaults; ``docs/nn.md`` has the full table):
        input_size: width of the state patterns (and of stored patterns and projections unless given).
        hidden_size: each head's Hopfield-space width (default ``input_size // num_heads``).
        output_size: width of the output projection (default ``input_size``).
        pattern_size: each head's value width (default ``hidden_size``).
        num_heads: parallel heads (int >= 1).
        scaling: beta, a float > 0 or a tensor of one per head (default ``1 / sqrt(hidden_size)``;
            1.0 when every pattern is static and there is no out projection, as in hflayers).
        update_steps_max: updates in query space before the association: an int, None (until
            ``update_steps_eps``, capped at 1000; hflayers' negative values mean the same), or an
            integer tensor of one per head.
        update_steps_eps: a query stops updating once max|Δq| <= eps: a float >= 0 or a tensor per head.
        normalize_{stored_pattern,state_pattern,pattern_projection}[_affine, _eps]: LayerNorm of each raw input.
        normalize_hopfield_space[_affine, _eps]: LayerNorm of q and k in each head's Hopfield space.
        {stored_pattern,state_pattern,pattern_projection}_as_static: no projection for that input (it must
            then already have the head width).
        pattern_projection_as_connected: project the pattern projections with the stored patterns' projection
            W_k first (then W_v, unless the projections are static).
        stored_pattern_size, pattern_projection_size: raw widths of those inputs (default ``input_size``).
        batch_first: inputs (batch, seq, feature); False takes (seq, batch, feature).
        association_activation: name of a torch function applied to the output (e.g. ``"tanh"``).
        dropout: dropout on the association matrix, in training mode.
        input_bias: biases of the projections.
        concat_bias_pattern: append one learned stored pattern and projection (in Hopfield space).
        add_zero_association: append an all-zero stored pattern and projection.
        disable_out_projection: return the concatenated heads (width ``num_heads * pattern_size``).
        similarity: **new** ``"dot"`` (hflayers' only choice), ``"l2"`` (-‖k - q‖) or ``"l2sq"`` (-½‖k - q‖²).
        trainable_scaling: **new** beta as a parameter.
        backend: **new** hen_kernels backend (None = automatic, ``"torch"`` = the reference).

    Shapes (``batch_first=True``): ``forward(input)`` takes one tensor (batch, S, input_size) used as
    stored, state and projection patterns, or a tuple (stored (batch, S, stored_pattern_size), state
    (batch, L, input_size), projection (batch, S, pattern_projection_size)); it returns (batch, L,
    output_size).  Inputs must have the module's dtype (float16, bfloat16, float32 or float64: convert
    the module with ``.to(dtype)`` / ``.double()``) and device; nothing is cast silently.
    """

    def __init__(
        self,
        input_size: Optional[int] = None,
        hidden_size: Optional[int] = None,
        output_size: Optional[int] = None,
        pattern_size: Optional[int] = None,
        num_heads: int = 1,
        scaling: A.ScalingArg = None,
        update_steps_max: A.StepsArg = 0,
        update_steps_eps: A.EpsArg = 1e-4,
        normalize_stored_pattern: bool = True,
        normalize_stored_pattern_affine: bool = True,
        normalize_stored_pattern_eps: float = 1e-5,
        normalize_state_pattern: bool = True,
        normalize_state_pattern_affine: bool = True,
        normalize_state_pattern_eps: float = 1e-5,
        normalize_pattern_projection: bool = True,
        normalize_pattern_projection_affine: bool = True,
        normalize_pattern_projection_eps: float = 1e-5,
        normalize_hopfield_space: bool = False,
        normalize_hopfield_space_affine: bool = False,
        normalize_hopfield_space_eps: float = 1e-5,
        stored_pattern_as_static: bool = False,
        state_pattern_as_static: bool = False,
        pattern_projection_as_static: bool = False,
        pattern_projection_as_connected: bool = False,
        stored_pattern_size: Optional[int] = None,
        pattern_projection_size: Optional[int] = None,
        batch_first: bool = True,
        association_activation: Optional[str] = None,
        dropout: float = 0.0,
        input_bias: bool = True,
        concat_bias_pattern: bool = False,
        add_zero_association: bool = False,
        disable_out_projection: bool = False,
        similarity: str = "dot",
        trainable_scaling: bool = False,
        backend: Optional[str] = None,
    ):
        super().__init__()
        num_heads = A.check_int("num_heads", num_heads, 1)
        input_size, hidden_size, output_size, pattern_size, stored_pattern_size, pattern_projection_size = (
            A.check_int(n, v, 1, optional=True) for n, v in (
                ("input_size", input_size), ("hidden_size", hidden_size), ("output_size", output_size),
                ("pattern_size", pattern_size), ("stored_pattern_size", stored_pattern_size),
                ("pattern_projection_size", pattern_projection_size)))
        for name, flag in (("stored_pattern_as_static", stored_pattern_as_static),
                           ("state_pattern_as_static", state_pattern_as_static),
                           ("pattern_projection_as_static", pattern_projection_as_static),
                           ("pattern_projection_as_connected", pattern_projection_as_connected),
                           ("batch_first", batch_first), ("input_bias", input_bias),
                           ("concat_bias_pattern", concat_bias_pattern), ("add_zero_association", add_zero_association),
                           ("disable_out_projection", disable_out_projection),
                           ("trainable_scaling", trainable_scaling)):
            A.check_bool(name, flag)
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"backend: expected None or a backend name (str), got {type(backend).__name__}")
        self.similarity = check_similarity(similarity)
        self.backend = backend
        self.num_heads = num_heads
        self.batch_first = batch_first
        self.dropout = A.check_dropout(dropout)
        self._activation = A.check_activation(association_activation)
        self.association_activation = association_activation

        if hidden_size is None:
            if input_size is None:
                raise ValueError("hidden_size: give hidden_size or input_size (hidden_size = input_size // num_heads)")
            if input_size % num_heads:
                raise ValueError(f"input_size: {input_size} is not divisible by num_heads = {num_heads} "
                                 "(or give hidden_size)")
            hidden_size = input_size // num_heads
        self.hidden_size = hidden_size
        self.pattern_size = hidden_size if pattern_size is None else pattern_size
        self.input_size = input_size
        self.stored_pattern_as_static = stored_pattern_as_static
        self.state_pattern_as_static = state_pattern_as_static
        self.pattern_projection_as_static = pattern_projection_as_static
        self.pattern_projection_as_connected = pattern_projection_as_connected
        self.concat_bias_pattern = concat_bias_pattern
        self.add_zero_association = add_zero_association

        # Raw widths of the three inputs: a static pattern is already in the Hopfield space.
        state_dim = hidden_size if state_pattern_as_static else input_size
        stored_dim = hidden_size if stored_pattern_as_static else (stored_pattern_size or input_size)
        proj_dim = self.pattern_size if pattern_projection_as_static else (pattern_projection_size or input_size)
        if pattern_projection_as_connected:
            proj_dim = self._check_connected(stored_dim, pattern_projection_size or input_size)
        self.state_pattern_dim, self.stored_pattern_dim, self.pattern_projection_dim = state_dim, stored_dim, proj_dim
        for name, dim in (("input_size", state_dim), ("stored_pattern_size", stored_dim),
                          ("pattern_projection_size", proj_dim)):
            if dim is None:
                raise ValueError(f"{name}: needed (that pattern is not static, so it has a projection to size)")

        hopfield_dim, value_dim = num_heads * hidden_size, num_heads * self.pattern_size
        connected = pattern_projection_as_connected
        self.q_proj = None if state_pattern_as_static else nn.Linear(state_dim, hopfield_dim, bias=input_bias)
        self.k_proj = None if stored_pattern_as_static else nn.Linear(stored_dim, hopfield_dim, bias=input_bias)
        self.v_proj = None if pattern_projection_as_static else nn.Linear(
            hopfield_dim if connected else proj_dim, value_dim, bias=input_bias)
        self.output_size = value_dim if disable_out_projection else (output_size or input_size or value_dim)
        self.out_proj = None if disable_out_projection else nn.Linear(value_dim, self.output_size, bias=input_bias)

        self.norm_stored_pattern = A.layer_norm(normalize_stored_pattern, normalize_stored_pattern_affine,
                                                stored_dim, normalize_stored_pattern_eps, "stored_pattern")
        self.norm_state_pattern = A.layer_norm(normalize_state_pattern, normalize_state_pattern_affine,
                                               state_dim, normalize_state_pattern_eps, "state_pattern")
        self.norm_pattern_projection = A.layer_norm(normalize_pattern_projection, normalize_pattern_projection_affine,
                                                    proj_dim, normalize_pattern_projection_eps, "pattern_projection")
        self.norm_hopfield_space = A.layer_norm(normalize_hopfield_space, normalize_hopfield_space_affine,
                                                hidden_size, normalize_hopfield_space_eps, "hopfield_space")
        for what in ("stored_pattern", "state_pattern", "pattern_projection", "hopfield_space"):
            norm = getattr(self, f"norm_{what}")
            setattr(self, f"normalize_{what}", norm is not None)
            setattr(self, f"normalize_{what}_affine", norm is not None and norm.elementwise_affine)

        if concat_bias_pattern:
            if stored_pattern_as_static or pattern_projection_as_static:
                raise ValueError("concat_bias_pattern: the bias pattern is learned in the Hopfield space, which "
                                 "static stored patterns or projections skip (hflayers asserts the same)")
            self.bias_k = nn.Parameter(torch.empty(hopfield_dim))
            self.bias_v = nn.Parameter(torch.empty(value_dim))
        else:
            self.register_parameter("bias_k", None)
            self.register_parameter("bias_v", None)

        static_execution = (stored_pattern_as_static and state_pattern_as_static and pattern_projection_as_static
                            and disable_out_projection and not normalize_hopfield_space and not connected)
        self._scaling_init = A.check_scaling(scaling, num_heads, 1.0 if static_execution else 1.0 / math.sqrt(
            hidden_size))
        beta = torch.tensor(self._scaling_init, dtype=torch.float32)
        if trainable_scaling:
            self.scaling = nn.Parameter(beta)
        else:
            self.register_buffer("scaling", beta)
        self.update_steps_max, self.update_steps_eps = update_steps_max, update_steps_eps
        self.reset_parameters()

    def _check_connected(self, stored_dim: Optional[int], proj_dim: Optional[int]) -> Optional[int]:
        if self.stored_pattern_as_static:
            raise ValueError("pattern_projection_as_connected: it routes the pattern projections through the stored "
                             "patterns' projection, which stored_pattern_as_static=True removes")
        if proj_dim != stored_dim:
            raise ValueError(f"pattern_projection_as_connected: the pattern projections go through the stored "
                             f"patterns' projection, so pattern_projection_size ({proj_dim}) must equal "
                             f"stored_pattern_size ({stored_dim})")
        if self.pattern_projection_as_static and self.pattern_size != self.hidden_size:
            raise ValueError(f"pattern_projection_as_connected: with static projections the values are the stored "
                             f"projection's output, so pattern_size ({self.pattern_size}) must equal hidden_size "
                             f"({self.hidden_size})")
        return stored_dim

    # --- hflayers' per-head iteration settings, checked whenever they are set --------------------------

    @property
    def update_steps_max(self) -> A.StepsArg:
        return self._update_steps_max

    @update_steps_max.setter
    def update_steps_max(self, value: A.StepsArg) -> None:
        self._steps = A.check_steps_max(value, self.num_heads)
        self._update_steps_max = value.clone() if isinstance(value, Tensor) else value

    @property
    def update_steps_eps(self) -> A.EpsArg:
        return self._update_steps_eps

    @update_steps_eps.setter
    def update_steps_eps(self, value: A.EpsArg) -> None:
        self._eps = A.check_steps_eps(value, self.num_heads)
        self._update_steps_eps = value.clone() if isinstance(value, Tensor) else value

    def _setting(self) -> Setting:
        return Setting(self.similarity, self.backend, self.scaling, A.head_groups(self._steps, self._eps),
                       self.dropout)

    def _apply(self, fn, recurse=True):
        # A beta still at its configured value keeps that value at the new precision: made in float32, a module
        # made float64 by .double() would carry float32's rounding of 1/sqrt(d) (1.7e-8 relative), as no
        # nn.MultiheadAttention in float64 does.  A beta that was trained or set keeps what it holds.
        before = self.scaling.detach()
        configured = torch.tensor(self._scaling_init, dtype=torch.float64)
        at_init = not before.is_meta and torch.equal(before.cpu(), configured.to(before.dtype))
        out = super()._apply(fn, recurse)
        if at_init and not self.scaling.is_meta and self.scaling.dtype != before.dtype:
            with torch.no_grad():
                self.scaling.copy_(configured)
        return out

    def reset_parameters(self) -> None:
        """hflayers' initialisation: projections and bias patterns N(0, 0.02²), biases 0, LayerNorm identity.

        Also refills ``scaling`` with its configured beta, so a module built on the meta device and
        materialised with ``to_empty`` is complete after this call.
        """
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if lin is not None:
                nn.init.normal_(lin.weight, mean=0.0, std=0.02)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
        for p in (self.bias_k, self.bias_v):
            if p is not None:
                nn.init.normal_(p, mean=0.0, std=0.02)
        for norm in (self.norm_stored_pattern, self.norm_state_pattern, self.norm_pattern_projection,
                     self.norm_hopfield_space):
            if norm is not None:
                norm.reset_parameters()
        with torch.no_grad():
            self.scaling.copy_(torch.tensor(self._scaling_init, dtype=self.scaling.dtype))

    # --- the three patterns into each head's Hopfield space ------------------------------------------------

    def _project(self, t: Tensor, norm: Optional[nn.LayerNorm], proj: Optional[nn.Linear]) -> Tensor:
        """(..., S, width) -> (..., heads, S, d)."""
        if norm is not None:
            t = norm(t)
        if proj is None:  # static: the same pattern in every head
            return t.unsqueeze(-3).expand(t.shape[:-2] + (self.num_heads,) + t.shape[-2:])
        return _heads(proj(t), self.num_heads)

    def _projection_values(self, proj: Tensor) -> Tensor:
        if not self.pattern_projection_as_connected:
            return self._project(proj, self.norm_pattern_projection, self.v_proj)
        if self.norm_pattern_projection is not None:
            proj = self.norm_pattern_projection(proj)
        through_k = self.k_proj(proj)  # (..., S, heads * hidden_size)
        return _heads(through_k if self.v_proj is None else self.v_proj(through_k), self.num_heads)

    def _packable(self, projs: Optional[Tuple[object, object, object]] = None) -> bool:
        """Whether q, k and v of one input may come from one product with the three projections' (``projs``,
        default the module's) weights stacked, as nn.MultiheadAttention's packed in-projection: each a bare
        nn.Linear (_bare_linear), nothing between input and projection."""
        projs = projs or (self.q_proj, self.k_proj, self.v_proj)
        if (self.pattern_projection_as_connected or not all(_bare_linear(p) for p in projs) or _global_hooks()
                or any(n is not None for n in (self.norm_stored_pattern, self.norm_state_pattern,
                                               self.norm_pattern_projection))):
            return False
        # (nn.Linear's own dict: p.weight and p.bias go through Module.__getattr__, six lookups a call here)
        held = [p._parameters for p in projs]
        return len({h["bias"] is None for h in held}) == 1 and len({h["weight"].dtype for h in held}) == 1

    def _patterns(self, stored: Tensor, state: Tensor, proj: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """q, k, v in Hopfield space, the bias and zero patterns appended to k and v."""
        if stored is state and state is proj and self._packable():
            # Self-association: one product of the stacked weights, not three of one third the width.
            # Measured (EPYC Zen 3, ad-hoc, median of 9 blocks, two runs): 32 x 128 tokens, width 128,
            # 8 heads, a training step 28.6-27.5 ms against 33.0-31.8; 8 x 64, width 64, forward 0.75
            # against 0.81 ms.
            projs = (self.q_proj, self.k_proj, self.v_proj)
            bias = None if self.q_proj.bias is None else torch.cat([p.bias for p in projs])
            qkv = nn.functional.linear(state, torch.cat([p.weight for p in projs]), bias)
            q, k, v = (_heads(t, self.num_heads) for t in qkv.split([p.out_features for p in projs], -1))
        else:
            q = self._project(state, self.norm_state_pattern, self.q_proj)
            k = self._project(stored, self.norm_stored_pattern, self.k_proj)
            v = self._projection_values(proj)
        if self.norm_hopfield_space is not None:
            q, k = self.norm_hopfield_space(q), self.norm_hopfield_space(k)
        extra_k, extra_v = [], []
        if self.bias_k is not None:
            extra_k.append(self.bias_k.to(k.dtype).reshape(self.num_heads, 1, -1))
            extra_v.append(self.bias_v.to(v.dtype).reshape(self.num_heads, 1, -1))
        if self.add_zero_association:
            extra_k.append(k.new_zeros((self.num_heads, 1, k.shape[-1])))
            extra_v.append(v.new_zeros((self.num_heads, 1, v.shape[-1])))
        if extra_k:
            lead = k.shape[:-3]
            k = torch.cat([k] + [e.expand(lead + e.shape) for e in extra_k], dim=-2)
            v = torch.cat([v] + [e.expand(lead + e.shape) for e in extra_v], dim=-2)
        return q, k, v

    @property
    def _extra_patterns(self) -> int:
        return int(self.bias_k is not None) + int(self.add_zero_association)

    # --- inputs in the user's terms, then the association ---------------------------------------------------

    def _roles(self, single: bool) -> List[Role]:
        names = ["input"] * 3 if single else ["input[0]", "input[1]", "input[2]"]
        return [Role(names[0], "stored patterns", "S", self.stored_pattern_dim),
                Role(names[1], "state patterns", "L", self.state_pattern_dim),
                Role(names[2], "pattern projections", "S", self.pattern_projection_dim)]

    def _associate(self, patterns: Sequence[Tensor], roles: Sequence[Optional[Role]],
                   padding_mask: Optional[Tensor] = None, association_mask: Optional[Tensor] = None, *,
                   want_info: bool = False, mode: str = "out"):
        """``patterns`` (stored, state, projection) as the user passed them; a shared pattern (role None) is
        (count, width), one set for the whole batch.  ``mode``: "out" (batch, heads, L, pattern_size) and
        the info, "raw" the association matrix, "values" the projected values."""
        like = self.scaling
        checked, seen = [], {}  # one input given for several roles stays one tensor (_patterns packs it)
        for t, role in zip(patterns, roles):
            if role is not None:
                key = (id(t), role.width)
                if key not in seen:
                    c = A.check_pattern(t, role, self.batch_first, like)
                    seen[key] = c if self.batch_first else c.transpose(0, 1)
                t = seen[key]
            checked.append(t)
        batched = [(r, t) for t, r in zip(checked, roles) if r is not None]
        A.check_same([(r, t.shape[0]) for r, t in batched], "batch")
        A.check_same([(r, t.shape[1]) for t, r in zip(checked, roles) if r is not None and r.length == "S"], "S")
        bt = batched[0][1].shape[0]
        stored, state, proj = checked
        q, k, v = self._patterns(stored, state, proj)
        if mode == "values":
            return v if v.dim() == 4 else v.expand((bt,) + v.shape)
        h, lq, s = self.num_heads, q.shape[-2], k.shape[-2] - self._extra_patterns
        padding_mask, association_mask = self._check_masks(padding_mask, association_mask, bt, lq, s)
        if s + self._extra_patterns == 0 and bt * lq > 0:
            raise ValueError(f"{roles[0].name if roles[0] else 'input'}: there are no stored patterns (S = 0); an "
                             "association needs at least one (pad with stored_pattern_padding_mask, or build the "
                             "module with add_zero_association=True to give empty sets a defined result)")
        if bt == 0 or lq == 0:  # nothing to associate: an empty result of the right shape
            width = k.shape[-2] if mode == "raw" else v.shape[-1]
            out = q.new_zeros((bt, h, lq, width))
            empty = torch.zeros((bt, h, lq), dtype=torch.int64, device=q.device)
            info = HopfieldInfo(empty.float(), empty, empty.float(), empty) if want_info else None
            return out if mode == "raw" else (out, info)
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        bias = additive_mask(padding_mask, association_mask, (bt, h, lq, s), self._extra_patterns, cdt, q.device)
        refuse_fully_masked(bias)
        result = associate(q, k, v, bias, self._setting(), training=self.training, want_info=want_info,
                           raw=mode == "raw")
        return result[0] if mode == "raw" else result

    def _check_masks(self, padding: object, association: object, bt: int, lq: int, s: int):
        if padding is not None:
            padding = A.check_mask_dtype("stored_pattern_padding_mask", padding, allow_float=False)
            if padding.shape != (bt, s):
                raise ValueError(f"stored_pattern_padding_mask: expected (batch, S) = ({bt}, {s}) with True = "
                                 f"ignore that stored pattern, got {tuple(padding.shape)}")
        if association is not None:
            association = A.check_mask_dtype("association_mask", association, allow_float=True)
            if association.shape not in ((lq, s), (bt * self.num_heads, lq, s)):
                raise ValueError(f"association_mask: expected (L, S) = ({lq}, {s}) or (batch * num_heads, L, S) = "
                                 f"({bt * self.num_heads}, {lq}, {s}), got {tuple(association.shape)}")
        return padding, association

    def _finish(self, out: Tensor) -> Tensor:
        out = out.transpose(-3, -2)  # (batch, L, heads, d)
        out = out.reshape(out.shape[:-2] + (out.shape[-2] * out.shape[-1],))
        if self.out_proj is not None:
            out = self.out_proj(out)
        return self._outward(out)

    def _outward(self, out: Tensor) -> Tensor:
        """(batch, L, width) in the module's layout, its activation applied."""
        out = out if self.batch_first else out.transpose(0, 1)
        return out if self._activation is None else self._activation(out)

    def _plain_self_association(self, input: Tensor) -> Optional[Tensor]:
        """The forward of one input tensor for inference in one C++ call (backends.fast_self_association), or
        None where the general path must answer.  Its case: q, k and v from bare nn.Linear projections of the
        input (stacked where _packable, else each after its pattern norm, a bare nn.LayerNorm, where it has
        one), no bias or zero pattern, no norm in Hopfield space, no update steps, no dropout to apply, the out
        projection (if any) a bare nn.Linear, one float beta for every head (backends.plain_beta) and, the C++
        side checks, nothing to differentiate.  The torch calls of the general path in its order, so the same
        bits (tests/test_nn.py); what nn.MultiheadAttention's inference fast path is to MHA."""
        projs, out_proj = (self.q_proj, self.k_proj, self.v_proj), self.out_proj
        norms = (self.norm_state_pattern, self.norm_stored_pattern, self.norm_pattern_projection)  # (q, k, v)
        if (any(self._steps) or self.bias_k is not None or self.add_zero_association
                or self.pattern_projection_as_connected or self.norm_hopfield_space is not None
                or (self.training and self.dropout > 0) or not all(_bare_linear(p) for p in projs)
                or (out_proj is not None and not _bare_linear(out_proj)) or _global_hooks()):
            return None
        roles = self._roles(single=True)
        width = roles[0].width
        if any(r.width != width for r in roles) or not all(
                n is None or (_bare(n, nn.LayerNorm) and tuple(n.normalized_shape) == (width,)) for n in norms):
            return None  # (the general path says which width the input lacks)
        beta = backends.plain_beta(self.scaling)
        if beta is None:
            return None
        x = A.check_pattern(input, roles[0], self.batch_first, self.scaling)
        # (the modules' own dicts: p.weight and p.bias go through Module.__getattr__, a lookup each)
        held = [p._parameters for p in projs]
        normed = [{} if n is None else n._parameters for n in norms]
        out_held = {} if out_proj is None else out_proj._parameters
        out = backends.fast_self_association(
            x if self.batch_first else x.transpose(0, 1), [h["weight"] for h in held], [h["bias"] for h in held],
            [h.get("weight") for h in normed], [h.get("bias") for h in normed],
            [-1.0 if n is None else float(n.eps) for n in norms], self._packable(projs), out_held.get("weight"),
            out_held.get("bias"), self.num_heads, beta, self.similarity, self.backend)
        return None if out is None else self._outward(out)

    def _split_input(self, input: object) -> Tuple[List[Tensor], List[Role]]:
        if isinstance(input, Tensor):
            return [input] * 3, self._roles(single=True)
        if isinstance(input, (tuple, list)) and len(input) == 3:
            return list(input), self._roles(single=False)
        raise TypeError("input: expected a tensor (stored = state = projection) or a tuple (stored, state, "
                        f"projection), got {type(input).__name__}"
                        + (f" of length {len(input)}" if isinstance(input, (tuple, list)) else ""))

    def forward(self, input: Patterns, stored_pattern_padding_mask: Optional[Tensor] = None,
                association_mask: Optional[Tensor] = None, return_info: bool = False):
        """Associate ``input`` (one tensor, or (stored, state, projection)); see the class docstring for shapes.

        ``stored_pattern_padding_mask`` (batch, S), bool or uint8: True (nonzero) = ignore that stored pattern.
        ``association_mask`` (L, S) or (batch * num_heads, L, S): bool or uint8 (True, nonzero = blocked) or
        float (added to the scores).  With ``return_info`` also a :class:`HopfieldInfo` of (batch, heads, L) tensors.
        """
        if (isinstance(input, Tensor) and stored_pattern_padding_mask is None and association_mask is None
                and not return_info):
            out = self._plain_self_association(input)
            if out is not None:
                return out
        patterns, roles = self._split_input(input)
        out, info = self._associate(patterns, roles, stored_pattern_padding_mask, association_mask,
                                    want_info=return_info)
        out = self._finish(out)
        return (out, info) if return_info else out

    def get_association_matrix(self, input: Patterns, stored_pattern_padding_mask: Optional[Tensor] = None,
                               association_mask: Optional[Tensor] = None) -> Tensor:
        """The softmax weights (batch, heads, L, S) of the last association (materialised, no grad)."""
        patterns, roles = self._split_input(input)
        with torch.no_grad():
            return self._associate(patterns, roles, stored_pattern_padding_mask, association_mask, mode="raw")

    def get_projected_pattern_matrix(self, input: Patterns, stored_pattern_padding_mask: Optional[Tensor] = None,
                                     association_mask: Optional[Tensor] = None) -> Tensor:
        """The pattern projections v (batch, heads, S, pattern_size) in Hopfield space (no grad).

        The masks are accepted for hflayers' signature; they do not change v."""
        patterns, roles = self._split_input(input)
        with torch.no_grad():
            return self._associate(patterns, roles, mode="values")
