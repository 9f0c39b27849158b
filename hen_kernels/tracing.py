"""Whether a call sees data or only shapes: under torch.compile, a functorch transform (vmap, grad) or a
FakeTensorMode (shape propagation, export, FLOP counting) no tensor's values can be read, so the checks that
read them (beta > 0, weights >= 0, every lse finite) and the data-dependent shapes of the reference's exact
ℓ2 recompute are skipped; the ops' fake implementations give the shapes."""
import torch


def is_tracing() -> bool:
    return (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None)
