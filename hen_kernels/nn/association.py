"""The association of the Hopfield layers in each head's Hopfield space: fused where it can be, dense where it must.

Inputs are already projected: q (batch, heads, L, d), k (batch, heads, S, d),
v (batch, heads, S, dv); a stored bank shared by the whole batch (HopfieldLayer's
lookup table) comes as k (heads, S, d), v (heads, S, dv).  Without a mask and
without dropout in training, every association runs through
:func:`hen_kernels.hopfield_retrieve` / :func:`hen_kernels.hopfield_partial`
(the fused kernel of the chosen backend and its fused backward).  A mask or
training-mode dropout needs the (L x S) association matrix, so that case
computes the dense masked softmax with :func:`hen_kernels.reference.scores`.
The multi-step loop and its per-query stopping rule are
:func:`hen_kernels.streaming.retrieve` in both cases.

Heads that differ in ``update_steps_max`` / ``update_steps_eps`` (hflayers'
per-head tensors) are run in groups, one call per distinct pair.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import backends, ops, reference, streaming, tracing
from ..types import Partial
from ..validation import check_inputs
from .arguments import HeadGroup


class HopfieldInfo(NamedTuple):
    """Per (batch, head, state pattern) diagnostics of the last association, each (batch, heads, L).

    ``top_index`` counts the appended bias / zero patterns (``concat_bias_pattern``,
    ``add_zero_association``) after the S stored patterns, as S and S + 1.
    """

    top_weight: Tensor  # softmax weight of the best stored pattern: ≈1 in one basin, small in a metastable mix
    top_index: Tensor  # that stored pattern's row
    energy: Tensor  # E(q) of docs/design.md §1 in the head's Hopfield space, at the final state (float32)
    steps: Tensor  # associations performed (1 + query-space updates)


class Setting(NamedTuple):
    """What one association needs from its module."""

    similarity: str
    backend: Optional[str]
    scaling: Tensor  # (heads,) beta per head
    groups: Tuple[HeadGroup, ...]
    dropout: float  # applied only in training, on the dense path


# A call per head saves copying the banks whole but costs a call's fixed Python (~0.15-0.3 ms on
# the EPYC Zen 3: checks, dispatch, the cat), about what copying 1 MiB costs on these VMs: below
# that many bank bytes a head, the copy is the cheaper of the two.
SPLIT_HEADS_MIN_BANK_BYTES = 1 << 20


def _bank_bytes_per_head(k: Tensor, v: Tensor) -> int:
    return (k.numel() * k.element_size() + v.numel() * v.element_size()) // max(k.shape[1], 1)


def _merges_batch_and_heads(t: Tensor) -> bool:
    """Whether (batch, heads, ...) flattens to (batch * heads, ...) as a view, without a copy."""
    return t.shape[0] <= 1 or t.shape[1] <= 1 or t.stride(0) == t.shape[1] * t.stride(1)


def _copies_split_banks(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, s: Setting) -> bool:
    """Whether the backend the ops pick here copies a bank view split into heads (``Backend.reads_split``)."""
    inp = check_inputs(q, k, beta, s.similarity, v)
    return not backends.resolve(s.backend, inp).reads_split(inp, with_graph=False)


def _fused(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], beta: Tensor, group: HeadGroup, s: Setting,
           want_info: bool, raw: bool):
    shared = k.dim() < q.dim()
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, beta))
    if (not shared and not needs_grad and not all(_merges_batch_and_heads(t) for t in (k, v))
            and _bank_bytes_per_head(k, v) >= SPLIT_HEADS_MIN_BANK_BYTES and _copies_split_banks(q, k, v, beta, s)):
        # Per-item banks split into heads are views with the heads interleaved in each row (the
        # projection's (batch, S, heads * d) output).  The CPU kernel reads them in place
        # (Backend.reads_split); for a backend that would copy them, one call per head reads them in
        # place, where one call over (batch * heads) would first copy both banks whole.  Measured
        # (EPYC Zen 4, HopfieldPooling, 2-8 heads, the same outputs): forward 12-25 % faster; on
        # small banks the calls cost more than the copy (SPLIT_HEADS_MIN_BANK_BYTES).  Not
        # with gradients: the heads' bank gradients would then be stacked (a copy per bank), and
        # forward + backward measured -11 % to +8 %, no better than this VM's noise.
        parts = [_fused(qh.unsqueeze(1), kh.unsqueeze(1), vh.unsqueeze(1), None, beta[h:h + 1], group, s,
                        want_info, raw)
                 for h, (qh, kh, vh) in enumerate(zip(q.unbind(1), k.unbind(1), v.unbind(1)))]
        out = torch.cat([o for o, _ in parts], 1)
        if not want_info:
            return out, None
        return out, HopfieldInfo(*(torch.cat(f, 1) for f in zip(*(i for _, i in parts))))
    b, h, lq, d = q.shape
    if shared:  # one bank per head for the whole batch: the batch's queries become one long block per head
        q = q.transpose(0, 1).reshape(h, b * lq, d)
    kw = dict(similarity=s.similarity, backend=s.backend)
    state, steps = q, None
    if group.steps > 0:
        r = ops.hopfield_retrieve(q, k, beta, max_steps=group.steps, tol=group.eps, **kw)
        state, steps = r.state, r.steps + 1
    shared_beta = None if want_info else backends.plain_beta(beta)
    if shared_beta is not None:
        # Only the output wanted and one beta for every head: hopfield_update, whose plain CPU case is one
        # C++ call (backends.fast_update) where hopfield_partial's Python checks and views cost about 150 µs
        # of a small layer's call; the same op, views and plan, so the same bits.
        return _unshare(ops.hopfield_update(state, k, shared_beta, values=v, **kw), None, shared, b, h, lq)
    p = ops.hopfield_partial(state, k, beta, values=v, **kw)
    out, info = p.out.to(q.dtype), None
    if want_info:
        if steps is None:
            steps = torch.ones(p.lse.shape, dtype=torch.int64, device=q.device)
        with torch.no_grad():
            energy = streaming.energy_from_lse(state, k, beta, s.similarity, p.lse).float()
        info = HopfieldInfo(p.top_weight.detach().float(), p.top_index, energy, steps)
    return _unshare(out, info, shared, b, h, lq)


def _unshare(out: Tensor, info: Optional[HopfieldInfo], shared: bool, b: int, h: int, lq: int):
    """A shared bank's (heads, batch * L, ·) results back in (batch, heads, L, ·)."""
    if not shared:
        return out, info
    out = out.reshape(h, b, lq, out.shape[-1]).transpose(0, 1)
    if info is not None:
        info = HopfieldInfo(*(f.reshape(h, b, lq).transpose(0, 1) for f in info))
    return out, info


def _dense(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], beta: Tensor, group: HeadGroup, s: Setting,
           want_info: bool, raw: bool, training: bool = False):
    """The masked softmax in PyTorch, on q (batch, heads, L, d), k (batch, heads, S, d)."""

    def assoc(state: Tensor) -> Tensor:
        t = reference.scores(state, k, beta, s.similarity)
        return t if bias is None else t + bias.to(t.dtype)

    def step(state: Tensor) -> Partial:
        t = assoc(state)
        out = torch.softmax(t, -1).to(k.dtype) @ k
        with torch.no_grad():  # the loop's per-query report; the layer's info comes from the last association
            lse = torch.logsumexp(t, -1)
            top_score, top_index = t.max(-1)
        return Partial(out, lse, top_score, top_index)

    state = q
    steps = torch.ones(q.shape[:-1], dtype=torch.int64, device=q.device)
    if group.steps > 0:
        r = streaming.retrieve(step, q, value_dim=k.shape[-1], max_steps=group.steps, tol=group.eps)
        state, steps = r.state, r.steps + 1
    t = assoc(state)
    a = torch.softmax(t, -1)
    if raw:
        return a, None
    out = nn.functional.dropout(a, p=s.dropout, training=training).to(v.dtype) @ v
    info = None
    if want_info:
        with torch.no_grad():
            lse = torch.logsumexp(t, -1)
            top_score, top_index = t.max(-1)
            energy = streaming.energy_from_lse(state, k, beta, s.similarity, lse).float()
        info = HopfieldInfo(torch.exp(top_score - lse).float(), top_index, energy, steps)
    return out.to(q.dtype), info


def associate(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], s: Setting, *, training: bool,
              want_info: bool = False, raw: bool = False):
    """out (batch, heads, L, dv) and a HopfieldInfo or None; with ``raw`` the softmax weights (batch, heads, L, S).

    ``bias`` is the additive mask (batch or 1, heads or 1, L or 1, S) (-inf = blocked), or None.
    """
    dense = raw or bias is not None or (training and s.dropout > 0)
    if dense:
        bt = q.shape[0] if q.dim() == 4 else k.shape[0]
        q, k, v = (t if t.dim() == 4 else t.expand((bt,) + t.shape) for t in (q, k, v))

        def run(q, k, v, bias, beta, group):
            return _dense(q, k, v, bias, beta, group, s, want_info, raw, training)
    else:
        if q.dim() < k.dim():  # the state patterns are shared (HopfieldPooling), the banks are not
            q = q.expand(k.shape[:1] + q.shape)

        def run(q, k, v, bias, beta, group):
            return _fused(q, k, v, bias, beta, group, s, want_info, raw)

    if len(s.groups) == 1:
        return run(q, k, v, bias, s.scaling, s.groups[0])
    return _by_head_group(run, q, k, v, bias, s)


def _by_head_group(run, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], s: Setting):
    heads = q.shape[-3]
    outs, infos, order = [], [], []
    for group in s.groups:
        idx = torch.tensor(group.heads, device=q.device)
        pick = [t.index_select(-3, idx) for t in (q, k, v)]
        b = bias.index_select(-3, idx) if bias is not None and bias.shape[-3] == heads else bias
        out, info = run(*pick, b, s.scaling.index_select(0, idx.to(s.scaling.device)), group)
        outs.append(out)
        infos.append(info)
        order.extend(group.heads)
    back = torch.tensor(order, device=q.device).argsort()
    out = torch.cat(outs, -3).index_select(-3, back)
    if infos[0] is None:
        return out, None
    return out, HopfieldInfo(*(torch.cat(f, -2).index_select(-2, back) for f in zip(*infos)))


def additive_mask(padding: Optional[Tensor], association: Optional[Tensor], shape: Sequence[int], extra: int,
                  dtype: torch.dtype, device: torch.device) -> Optional[Tensor]:
    """One additive mask (batch or 1, heads or 1, L, S + extra) from hflayers' two masks, or None.

    ``shape`` is (batch, heads, L, S) with S the user's stored patterns; the
    ``extra`` appended patterns (bias, zero) are never masked, as in hflayers.
    ``padding`` (batch, S) and ``association`` (L, S) / (batch * heads, L, S) are
    already checked; boolean True blocks, a float mask is added to the scores.
    """
    if padding is None and association is None:
        return None
    bt, h, lq, s = shape
    bias = torch.zeros((1, 1, lq, s + extra), dtype=dtype, device=device)
    if association is not None:
        a = association.to(device)
        a = a.reshape(bt, h, lq, s) if a.dim() == 3 else a.reshape(1, 1, lq, s)
        a = nn.functional.pad(a, (0, extra))
        bias = bias.masked_fill(a, -math.inf) if a.dtype == torch.bool else bias + a.to(dtype)
    if padding is not None:
        p = nn.functional.pad(padding.to(device).bool(), (0, extra))[:, None, None, :]
        bias = bias.masked_fill(p, -math.inf)
    return bias


def refuse_fully_masked(bias: Optional[Tensor]) -> None:
    """A state pattern whose every stored pattern is masked has no softmax: refuse it rather than return NaN.

    Under vmap the check reads the mask beneath the transform (per-sample masks are a vmap's normal case)."""
    if bias is None or bias.device.type == "meta":
        return
    plain, patterns = tracing.beneath_transforms(bias, -1)
    if plain is None:
        return
    blocked = torch.isneginf(plain).all(patterns)
    if bool(blocked.any()):
        where = tuple(int(i) for i in blocked.nonzero()[0])
        # (vmap levels add dims beneath the transform, in front or at each level's batch dim; grad's add none)
        at = ("batch item {}, head {}, state pattern {}".format(*where) if plain.dim() == bias.dim()
              else f"one state pattern of a vmapped call (index {where} beneath the vmap, its batch dims "
                   "included; under vmap's chunk_size, within the chunk)")
        raise ValueError(
            f"stored_pattern_padding_mask / association_mask: every stored pattern is masked for {at}; a "
            "softmax over no pattern is undefined (hflayers returns NaN there). Leave at least one stored pattern "
            "unmasked, or build the module with add_zero_association=True so the zero pattern is always there "
            "to attend to."
        )
