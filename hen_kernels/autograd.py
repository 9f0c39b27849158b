"""Autograd for the fused kernels: forward by the chosen backend, backward by the same backend's backward.

A backend without a backward (the reference) is plain differentiable PyTorch
and is left to PyTorch's autograd: it is the specification the fused gradients
are tested against.  Every other backend's Partial goes through
:class:`PartialFunction`, which saves only the inputs, ``out`` (L, B, Dv), ``lse`` (L, B) and
``top_index`` (L, B), never a B x N matrix, so training memory does not grow with the
bank.  Its backward is the custom op ``hen_kernels::partial_backward`` (with a
fake implementation, so ``torch.compile`` traces through it), which runs the
backward that :mod:`hen_kernels.backends` gives the forward's backend.

Gradients flow to ``query``, ``memory``, ``values`` and ``beta`` (a beta tensor
with ``requires_grad``, e.g. a per-head parameter).  ``top_score`` and
``top_index`` are not differentiable.  Double backward is not supported.

The Function follows torch.func's conventions (a ``setup_context``, a generated
vmap rule), so ``torch.func.grad``, ``vjp``, ``jacrev`` and ``vmap`` compose with
it; the ops it calls have their own vmap rules (:mod:`hen_kernels.vmap_rules`).  It has no forward-mode
derivative (jvp): a call that may carry tangents never reaches it (``backends.carries_tangents``, also under
``torch.func.hessian``, forward mode over reverse mode).
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch

from . import backends, vmap_rules
from .tracing import is_tracing
from .types import Partial
from .validation import Inputs


def needs_grad(inp: Inputs) -> bool:
    # Under a functorch transform the tensors here are wrappers whose requires_grad speaks for their own level
    # only: in grad(vmap(f)), or a backward through vmap, the batched input reads False while the level outside
    # differentiates it, and the raw op (no autograd kernel) handed back a zero gradient.  There the
    # differentiable path, always.
    return torch.is_grad_enabled() and (
        any(t.requires_grad for t in (inp.query, inp.memory, inp.values, inp.beta))
        or torch._C._are_functorch_transforms_active()
    )


def _partial_backward_impl(dout: torch.Tensor, dlse: torch.Tensor, query: torch.Tensor, memory: torch.Tensor,
                           values: torch.Tensor, beta: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                           similarity: str, backend: str, weights: Optional[torch.Tensor] = None,
                           bank_grads: str = "apart", top: Optional[torch.Tensor] = None,
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backend's backward (backends.BackwardImpl: bank_grads "apart", "summed" or "none"; top each
    query's top row)."""
    return backends.BACKENDS[backend].backward(dout, dlse, query, memory, values, beta, out, lse, similarity,
                                               weights, bank_grads, top)


# The backend travels by name: a custom op's arguments must be tensors or plain values.
_partial_backward = torch.library.custom_op("hen_kernels::partial_backward", mutates_args=())(_partial_backward_impl)


@_partial_backward.register_fake
def _(dout, dlse, query, memory, values, beta, out, lse, similarity, backend, weights=None, bank_grads="apart",
      top=None):
    f32 = dict(dtype=torch.float32, device=query.device)
    own = backends.BACKENDS[backend].bank_grads_in_input_dtype

    def bank_grad(t: torch.Tensor) -> torch.Tensor:
        dt = t.dtype if own else torch.float32
        # The CPU op lays a split bank's (Lo, Li, N, D) gradients out as the views themselves (empty_like), so
        # that autograd hands them back through the user's transposes without a copy; a compiled backward
        # reads them by the strides said here, so they must be the op's own.
        if own and t.dim() == 4:
            return torch.empty_like(t, dtype=dt, device=query.device)
        return t.new_empty(t.shape, dtype=dt, device=query.device)

    def none() -> torch.Tensor:  # a gradient not asked for
        return memory.new_empty(0, dtype=memory.dtype if own else torch.float32)

    return (query.new_empty(query.shape, **f32), none() if bank_grads == "none" else bank_grad(memory),
            bank_grad(values) if bank_grads == "apart" else none(), beta.new_empty(beta.shape, **f32))


_partial_backward.register_vmap(vmap_rules.looped_rule(_partial_backward))


class PartialFunction(torch.autograd.Function):
    """(q, x, v, beta) -> (out, lse, top_score, top_index) by a fused backend, with its fused backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, x, v, beta, similarity, backend, offset, weights, keys_are_values):
        inp = Inputs(q, x, v, beta, similarity, torch.Size([q.shape[0]]), weights)
        return tuple(backend.partial(inp, offset))

    @staticmethod
    def setup_context(ctx, inputs, output):
        # keys_are_values: v is x (or, under torch.compile, an alias of it: `partial`), one bank
        q, x, v, beta, similarity, backend, offset, weights, keys_are_values = inputs
        out, lse, top_score, top_index = output
        # Each query's top row of this bank, whose dt the backward takes as a difference of its own
        # (backward_cpu.top_row_gaps): B integers, where the softmax's weights would be B x N.
        ctx.save_for_backward(q, x, v, beta, out, lse, weights, top_index - offset if offset else top_index)
        ctx.similarity = similarity
        ctx.backend = backend.name
        ctx.keys_are_values = keys_are_values
        ctx.mark_non_differentiable(top_score, top_index)

    @staticmethod
    def backward(ctx, dout, dlse, _dts, _dti):
        q, x, v, beta, out, lse, weights, top = ctx.saved_tensors
        with torch.no_grad():
            dout = torch.zeros_like(out) if dout is None else dout
            dlse = torch.zeros_like(lse) if dlse is None else dlse
            # The custom op is for what traces (torch.compile, vmap, fake tensors); on data its
            # dispatch layers cost more than a small backward itself (docs/nn.md "Benchmarks").
            backward = _partial_backward if is_tracing() else _partial_backward_impl
            need = ctx.needs_input_grad
            # Only the bank gradients wanted: none for a frozen bank, one (dX + dV) for a bank that is keys and
            # values, rather than two for autograd to sum into a third.
            bank_grads = backends.bank_grads_wanted(ctx.keys_are_values, need[1], need[2])
            dq, dx, dv, dbeta = backward(dout.contiguous(), dlse.contiguous(), q, x,
                                         x if bank_grads == "summed" else v, beta, out, lse, ctx.similarity,
                                         ctx.backend, weights, bank_grads, top)
            grads = (dq.to(q.dtype) if need[0] else None, dx.to(x.dtype) if need[1] else None,
                     dv.to(v.dtype) if need[2] and bank_grads == "apart" else None,
                     dbeta.to(beta.dtype) if need[3] else None)
        # (similarity, backend, offset, weights, keys_are_values; dout and dlse last in the refusal's inputs)
        return refuse_second_derivative(grads, (q, x, v, beta, weights, dout, dlse)) + (None,) * 5


TWICE = (b"trying to differentiate twice hen_kernels' fused backward (double backward is not supported; "
         b"backend='torch' has it)")


def refuse_second_derivative(grads: tuple, sources: tuple) -> tuple:
    """``grads`` as they are, or, under create_graph, through a node that raises once they are differentiated.

    The node also takes every source that requires grad (the inputs, the incoming gradients), so it lies on
    each path from these gradients back to them.  once_differentiable gives it the gradients' detached
    copies alone: torch.autograd.grad, which runs only the nodes on paths to the inputs it is asked about,
    then skipped it and took the kernels' second-order term as zero, silently (a gradient penalty, hvp).
    """
    if not torch.is_grad_enabled():
        return grads
    given = [g for g in grads if g is not None]
    if torch._C._are_functorch_transforms_active():
        # The wrappers' requires_grad speaks for their own level, and DelayedError reads its inputs' data,
        # which vmap forbids: an autograd.Function, which the transforms lift level by level, takes them all.
        ties = (t for t in sources if isinstance(t, torch.Tensor))
        wrapped = iter(_SecondDerivative.apply(len(given), *given, *ties))
        return tuple(None if g is None else next(wrapped) for g in grads)
    live = [t for t in sources if isinstance(t, torch.Tensor) and t.requires_grad]
    if not live:
        return grads
    wrapped = iter(torch._C._functions.DelayedError(TWICE, len(given) + len(live))(*given, *live)[:len(given)])
    return tuple(None if g is None else next(wrapped) for g in grads)


class _SecondDerivative(torch.autograd.Function):
    """Its first ``n`` inputs, as they are (the others only tie it to their graphs); differentiated, it raises
    (refuse_second_derivative under torch.func)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(n, *tensors):
        return tuple(t.clone() for t in tensors[:n])

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(TWICE.decode())


# Function.apply binds its arguments to forward's signature at every call (a Function with a
# setup_context); inspect reads a __signature__ where there is one instead of rebuilding it
# from the code each time, which took 40 of the ~250 µs a small call with gradients took.
PartialFunction.forward.__signature__ = inspect.signature(PartialFunction.forward)


def partial(backend: backends.Backend, inp: Inputs, offset: int = 0) -> Partial:
    """``backend.partial(inp, offset)``, differentiable: the one call the public ops make."""
    if not backend.reads_split(inp, needs_grad(inp)):
        inp = inp.flat()  # (a copy, differentiable, of a split bank view: the backward then needs no layout)
    if backend.backward is None or not needs_grad(inp):
        return backend.partial(inp, offset)
    # A query that is also the bank (self-association) enters as its own alias, so that autograd sums its
    # gradient as dq + (dx + dv) however the inputs' views came out (one tensor in all three places summed
    # (dq + dx) + dv); binding.cpp's UpdateFunction does the same, and the two paths keep the same bits.
    query = inp.query.view_as(inp.query) if inp.query is inp.memory or inp.query is inp.values else inp.query
    values = inp.values
    keys_are_values = values is inp.memory
    if keys_are_values and torch.compiler.is_compiling():
        # Dynamo refuses one tensor twice among an autograd.Function's inputs (fullgraph=True raised): an alias,
        # whose data and strides are the bank's, so the kernels still read keys = values once (they compare
        # pointers and strides); eager calls keep the one tensor.
        values = values.view_as(values)
    apply = _apply_eagerly if backends.compiling_a_transform() else PartialFunction.apply
    return Partial(*apply(query, inp.memory, values, inp.beta, inp.similarity, backend, offset, inp.weights,
                          keys_are_values))


# Dynamo tracing a torch.func transform (torch.compile(torch.func.grad(f))) reads requires_grad False on the
# transform's wrappers, inlines the Function's forward as plain code and drops its backward: the raw op has no
# derivative, and the gradient came back zero, without a word (pytorch/pytorch#193279).  The automatic choice
# takes the reference there (backends.resolve); a kernel asked for by name runs eagerly, behind a graph break.
# torch._disable_dynamo, not torch.compiler.disable: the latter imports torch._dynamo when the decorator runs, which
# was 2.8 of the 2.9 s `import hen_kernels` took after torch (EPYC Zen 4, -X importtime); the former imports it
# at the first call, when dynamo is already tracing.
@torch._disable_dynamo
def _apply_eagerly(*args) -> tuple:
    return PartialFunction.apply(*args)
