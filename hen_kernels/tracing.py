"""Whether a call sees data or only shapes: under torch.compile, a functorch transform (vmap, grad), a
FakeTensorMode (shape propagation, export, FLOP counting) or make_fx's proxy mode (torch.func.linearize,
aot_function) no tensor's values can be read, so the checks that read them (beta > 0, weights >= 0, every lse
finite) and the data-dependent shapes of the reference's exact ℓ2 recompute are skipped; the ops' fake
implementations give the shapes.  Under torch.compile on CPU tensors those checks go into the graph instead
(``checks_in_graph``).

A CUDA stream capturing a graph (torch.cuda.graph, make_graphed_callables) also hides values: reading one
back synchronizes, which the capture refuses (cudaErrorStreamCaptureUnsupported), and work issued there
only runs at replay.  ``cannot_read`` covers both."""
from typing import Optional, Tuple

import torch
from torch._C import _functorch as functorch

_MODES = (torch._C._TorchDispatchModeKey.FAKE, torch._C._TorchDispatchModeKey.PROXY)


def _shape_modes() -> bool:
    # fake tensors, make_fx: no values anywhere, not even beneath functorch's wrappers
    return any(torch._C._get_dispatch_mode(m) is not None for m in _MODES)


def is_tracing() -> bool:
    return torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active() or _shape_modes()


def _capturing(device: torch.device) -> bool:
    # (asked only for CUDA tensors: on a torch built without CUDA the query raises)
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def checks_in_graph(device: torch.device) -> bool:
    """Whether a value check can be compiled into the graph: under torch.compile (no functorch transform) on
    CPU tensors, as ``torch._assert_async``, which raises RuntimeError when the compiled code runs.  On a GPU
    it would be a device-side assert, which leaves the CUDA context unusable for the rest of the process: GPU
    graphs keep none."""
    return device.type == "cpu" and torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()


def cannot_read(device: torch.device) -> bool:
    """Whether values on ``device`` cannot be read now: under tracing, or on a stream capturing a CUDA graph."""
    return is_tracing() or _capturing(device)


def beneath_transforms(t: torch.Tensor, dim: int) -> Tuple[Optional[torch.Tensor], int]:
    """The plain tensor beneath ``t``'s functorch wrappers (vmap, grad) and where ``t``'s dimension ``dim``
    sits in it, or ``None`` where no values exist (fake tensors, make_fx, CUDA graph capture).

    A check that refuses bad values (a fully masked row, say) can then still run under vmap, on every
    sample at once, where reading a batched tensor's values raises: each vmap level adds one dimension,
    at its ``bdim``, to the tensor beneath it.  Under torch.compile without a transform the check reads ``t``
    as it is (dynamo breaks the graph there, once, and runs the check eagerly)."""
    if torch.compiler.is_compiling():
        if not torch._C._are_functorch_transforms_active():
            return t, dim
    elif _shape_modes() or _capturing(t.device):
        return None, dim
    dim %= t.dim()
    while torch._C._are_functorch_transforms_active() and functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t) and functorch.maybe_get_bdim(t) <= dim:
            dim += 1
        t = functorch.get_unwrapped(t)
    return t, dim
