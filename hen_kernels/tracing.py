"""Whether a call sees data or only shapes: under torch.compile, a functorch transform (vmap, grad), a
FakeTensorMode (shape propagation, export, FLOP counting) or make_fx's proxy mode (torch.func.linearize,
aot_function) no tensor's values can be read, so the checks that read them (beta > 0, weights >= 0, every lse
finite) and the data-dependent shapes of the reference's exact ℓ2 recompute are skipped; the ops' fake
implementations give the shapes."""
import torch

_MODES = (torch._C._TorchDispatchModeKey.FAKE, torch._C._TorchDispatchModeKey.PROXY)


def is_tracing() -> bool:
    return (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or any(torch._C._get_dispatch_mode(m) is not None for m in _MODES))
