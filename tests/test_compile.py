"""torch.compile traces through the public ops: the custom op has a fake (meta) implementation."""
import pytest
import torch

import hen_kernels as hk

from .conftest import kernel_backends, require
from .pending import backend_params


@pytest.mark.parametrize("backend", kernel_backends())
def test_compiled_function_calls_the_ops(backend):
    require(backend)
    torch._dynamo.reset()

    def f(q, x, v):
        p = hk.hopfield_partial(q, x, 0.5, similarity="l2", values=v, backend=backend)
        out = hk.hopfield_update(q, x, 0.5, similarity="dot", backend=backend)
        return p.out * 2 + out.sum(-1, keepdim=True), p.lse, p.top_index

    q, x, v = torch.randn(2, 3, 16), torch.randn(50, 16), torch.randn(50, 16)
    eager = f(q, x, v)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(q, x, v)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


def test_fake_tensor_shapes():
    require("cpu")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, x, v = torch.empty(4, 5, 8), torch.empty(1, 30, 8), torch.empty(1, 30, 3, dtype=torch.float32)
        out, lse, top_score, top_index = torch.ops.hen_kernels.partial(q, x, v, torch.empty(4), 0, 0)
    assert out.shape == (4, 5, 3) and lse.shape == (4, 5) and top_index.dtype == torch.int64


@pytest.mark.parametrize("backend", backend_params(["torch"] + kernel_backends(), "weights"))
def test_compiled_weighted_call_matches_eager(backend):
    """Weights travel through the traced op like every other input (docs/design.md §5.1)."""
    require(backend)
    torch._dynamo.reset()

    def f(q, x, w):
        p = hk.hopfield_partial(q, x, 0.5, similarity="l2sq", weights=w, backend=backend)
        return p.out, p.lse, p.top_index

    q, x = torch.randn(2, 3, 16), torch.randn(50, 16)
    w = torch.rand(2, 3, 16)
    eager = f(q, x, w)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(q, x, w)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)
