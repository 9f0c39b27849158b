"""Workarounds for bugs in the libraries under hen_kernels, each with its upstream report.

Applied once, at import; drop one when the versions it names are no longer supported.
"""
import torch

# pytorch/pytorch#188792 (fix proposed in #188791): oneMKL 2024.2, bundled in torch's x86
# wheels, picks each VML function's kernel on that function's first call.  ATen runs a VML op in
# chunks of 2048 on its intra-op threads; when the first call runs on several threads at once,
# one of them can run a low-accuracy kernel for its whole chunk, silently.  Seen here: the
# float32 sqrt of 4,096 squared distances wrong by up to 3e-4 in its first 2,048 elements, in
# about one fresh process in twelve on a 2-core Xeon (a float32 peer of `bench cpu` then failed
# its check).  One call on one thread settles the choice for the process: a single element is
# never split across threads.  These are the functions ATen sends to VML (ATen/cpu/vml.h), each
# in float32 and float64.
VML_FUNCTIONS = ("acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp", "log", "log10", "log2", "sin",
                 "sqrt", "tan", "tanh", "trunc")


def settle_mkl_vml_dispatch() -> None:
    if not torch.backends.mkl.is_available():
        return
    with torch.no_grad():
        for dtype in (torch.float32, torch.float64):
            # On the CPU even under a default-device context; 0.5 is inside every domain (acos, erfinv, log).
            x = torch.full((1,), 0.5, dtype=dtype, device="cpu")
            for name in VML_FUNCTIONS:
                getattr(torch, name)(x)
