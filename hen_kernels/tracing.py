"""Whether a call sees data or only shapes: under torch.compile, a functorch transform (vmap, grad), a
FakeTensorMode (shape propagation, export, FLOP counting) or make_fx's proxy mode (torch.func.linearize,
aot_function) no tensor's values can be read, so the checks that read them (beta > 0, weights >= 0, every lse
finite) and the data-dependent shapes of the reference's exact ℓ2 recompute are skipped; the ops' fake
implementations give the shapes.

A CUDA stream capturing a graph (torch.cuda.graph, make_graphed_callables) also hides values: reading one
back synchronizes, which the capture refuses (cudaErrorStreamCaptureUnsupported), and work issued there
only runs at replay.  ``cannot_read`` covers both."""
import torch

_MODES = (torch._C._TorchDispatchModeKey.FAKE, torch._C._TorchDispatchModeKey.PROXY)


def is_tracing() -> bool:
    return (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or any(torch._C._get_dispatch_mode(m) is not None for m in _MODES))


def _capturing(device: torch.device) -> bool:
    # (asked only for CUDA tensors: on a torch built without CUDA the query raises)
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def cannot_read(device: torch.device) -> bool:
    """Whether values on ``device`` cannot be read now: under tracing, or on a stream capturing a CUDA graph."""
    return is_tracing() or _capturing(device)
