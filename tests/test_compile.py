"""torch.compile traces through the public ops: the custom op has a fake (meta) implementation."""
import pytest
import torch

import hen_kernels as hk

from .conftest import device_of, kernel_backends, require
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


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
def test_a_compiled_sweep_over_float_betas_matches_eager(backend):
    """beta as an argument of a fullgraph function: dynamo makes the float symbolic at its second value, and
    the check that called math.isfinite on it broke the trace.  Its checks become guards: a bad beta is still
    refused, by name."""
    require(backend)
    torch._dynamo.reset()

    def f(q, x, beta):
        return hk.hopfield_update(q, x, beta, backend=backend), hk.energy(q, x, beta, backend=backend)

    q, x = torch.randn(2, 3, 16), torch.randn(50, 16)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    for beta in (0.5, 0.7, 2.0):
        for a, b in zip(f(q, x, beta), compiled(q, x, beta)):
            torch.testing.assert_close(a, b)
    with pytest.raises(Exception, match="beta: expected a finite float > 0"):
        compiled(q, x, -1.0)


def _served_on_cpu(backend):
    require(backend)
    if device_of(backend) != "cpu":
        pytest.skip("the value checks compile into CPU graphs only (a GPU's would be a device-side assert)")


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
@pytest.mark.parametrize("bad", ["beta", "weights", "memory", "tiny beta"])
def test_compiled_calls_on_cpu_tensors_refuse_bad_values(backend, bad):
    """Compiled, the checks that read values had stood aside: a negative tensor beta came back NaN and negative
    weights a finite answer with no meaning.  On CPU tensors they are compiled into the graph (RuntimeError at
    run time, the eager message); the same compiled function still answers good inputs."""
    _served_on_cpu(backend)
    torch._dynamo.reset()

    def f(q, x, beta, w):
        return hk.hopfield_update(q, x, beta, similarity="l2sq", weights=w, backend=backend)

    q, x, w = torch.randn(2, 3, 16), torch.randn(50, 16), torch.rand(2, 3, 16)
    beta = torch.full((2,), 0.5)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, x, beta, w), f(q, x, beta, w))
    args, message = {
        "beta": ((q, x, torch.tensor([0.5, -0.5]), w), "beta: expected every entry finite and > 0"),
        "tiny beta": ((q, x, torch.full((2,), 1e-33), w), "beta: expected every entry in"),
        "weights": ((q, x, beta, -w), "weights: expected every entry finite and >= 0"),
        "memory": ((q, x.index_fill(0, torch.tensor([7]), float("nan")), beta, w), "the bank .* holds inf or NaN"),
    }[bad]
    with pytest.raises(RuntimeError, match=message):
        compiled(*args)


def test_inductor_compiles_the_value_checks():
    """The same checks through inductor's code generation (the tests above stop at aot_eager)."""
    require("cpu")
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, x, beta: hk.hopfield_update(q, x, beta), fullgraph=True)
    q, x = torch.randn(3, 16), torch.randn(40, 16)
    torch.testing.assert_close(compiled(q, x, torch.tensor(0.5)), hk.hopfield_update(q, x, 0.5))
    with pytest.raises(RuntimeError, match="beta: expected every entry finite and > 0"):
        compiled(q, x, torch.tensor(-0.5))


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


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
def test_compiled_fullgraph_with_gradients_and_keys_as_values(backend, monkeypatch):
    """Keys = values (values omitted) with gradients: dynamo refused the bank given twice to the autograd
    Function (fullgraph=True raised 'duplicate tensor input').  Compiled, the bank goes in as an alias of
    itself, and its backward is still asked for the bank's one gradient (it asked for two, for autograd to
    sum)."""
    require(backend)
    torch._dynamo.reset()
    from hen_kernels import backends

    asked = []
    if backends.BACKENDS[backend].backward is not None:
        real = backends.BACKENDS[backend].backward
        monkeypatch.setattr(backends.BACKENDS[backend], "backward", lambda *a: asked.append(a[10]) or real(*a))  # bank_grads

    def f(q, x):
        return hk.hopfield_update(q, x, 0.7, backend=backend).square().sum()

    q, x = torch.randn(3, 8), torch.randn(20, 8)
    grads = []
    for g in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        qi, xi = q.clone().requires_grad_(), x.clone().requires_grad_()
        asked.clear()
        g(qi, xi).backward()
        grads.append((qi.grad, xi.grad))
    assert asked == ([] if backend == "torch" else ["summed"])  # (the compiled call's)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that bring a tensor's value to the host: on CUDA each synchronizes, which a
    graph capture refuses (cudaErrorStreamCaptureUnsupported), and a capture only runs work at replay."""

    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.is_nonzero.default)

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
def test_a_graph_capture_reads_no_value(monkeypatch, backend):
    """Under a CUDA graph capture (here pretended, on CPU tensors) the calls read nothing back: the value
    checks (beta, weights, every lse finite), the reference's exact ℓ2 recompute and retrieve's early stop
    stand aside, as under torch.compile; and a float beta's tensor, made under the capture, is not kept."""
    require(backend)
    from hen_kernels import tracing, validation

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=g, requires_grad=True)
    q = x.detach()[:5].clone().requires_grad_()  # on stored rows: the ℓ2 recompute's case
    w = torch.rand(5, 8, generator=g) + 0.5
    beta = torch.tensor(0.7, requires_grad=True)
    eager = hk.hopfield_retrieve(q.detach(), x.detach(), 0.25, max_steps=4, tol=1e-3, backend=backend)
    monkeypatch.setattr(tracing, "_capturing", lambda device: True)
    cached = dict(validation._FLOAT_BETAS)
    with _HostReads() as reads:
        p = hk.hopfield_partial(q, x, beta, similarity="l2", weights=w, backend=backend)
        (p.out.square().sum() + p.lse.sum()).backward()
        r = hk.hopfield_retrieve(q.detach(), x.detach(), 0.25, max_steps=4, tol=1e-3, backend=backend)
        hk.hopfield_update(q.detach(), x.detach(), 0.3125, backend=backend)  # a float beta not seen before
    assert reads.seen == [], f"values read back under a capture: {reads.seen}"
    assert validation._FLOAT_BETAS == cached, "a float beta's tensor made under a capture was kept"
    assert q.grad is not None and beta.grad is not None
    torch.testing.assert_close(r.state, eager.state)  # every step run, masked: the same answer
    assert torch.equal(r.steps, eager.steps)


@pytest.mark.parametrize("bank_grads", ["apart", "summed", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split", [False, True])
def test_the_backward_fake_has_the_ops_strides(split, dtype, bank_grads):
    """A compiled backward reads the bank gradients by the fake's strides: they must be the op's own.  Heads
    split from a projection are read in place, and the CPU op lays their gradients out as the views; the fake
    said contiguous, so inductor's size asserts failed (and without them the gradients were wrong)."""
    require("cpu")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from hen_kernels import backends

    g = torch.Generator().manual_seed(0)
    b, h, n, d = 2, 3, 20, 8
    qkv = torch.randn(b, n, 3 * h * d, generator=g).to(dtype)
    q, x, v = (t.unflatten(-1, (h, d)).transpose(1, 2) for t in qkv.split(h * d, -1))  # (b, h, n, d) views
    q = q[:, :, :4]  # few queries: the split bank is read in place
    if not split:
        q, x, v = (t.reshape(b * h, t.shape[2], d) for t in (q, x, v))
    inp = hk.validation.check_inputs(q, x, 0.4, "dot", v)  # as the autograd path hands them on (autograd.py)
    if split:
        assert inp.memory.dim() == 4, "the split bank was copied: this test no longer sees its layout"
    p = backends.BACKENDS["cpu"].partial(inp, 0)
    args = (torch.randn(p.out.shape, generator=g), torch.zeros(p.lse.shape), inp.query, inp.memory, inp.values,
            inp.beta, p.out, p.lse)
    if bank_grads == "summed":  # keys = values: the bank's one gradient, dv empty
        args = args[:4] + (inp.memory,) + args[5:]
    for op, tail in ((torch.ops.hen_kernels.partial_backward, ("dot", "cpu", None, bank_grads)),  # its fake
                     (torch.ops.hen_kernels.cpu_partial_backward, (0, None, bank_grads))):  # C++ op, Meta kernel
        real = op(*args, *tail)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = op(*(mode.from_tensor(a) for a in args), *tail)
        for r, f in zip(real, fake):
            assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype), op


@pytest.mark.slow
def test_a_compiled_training_step_of_a_multi_head_layer_matches_eager():
    """Inductor, end to end, over the split heads the test above checks the strides of (about 20 s)."""
    require("cpu")
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = hk.nn.Hopfield(input_size=16, num_heads=2)
    x = torch.randn(3, 5, 16)
    grads = []
    for f in (layer, torch.compile(layer)):
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        f(xi).square().sum().backward()
        grads.append([xi.grad] + [p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _transforms(backend: object) -> dict:
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(1))

    def update(q):
        return hk.hopfield_update(q, x, 0.5, backend=backend)

    def loss(q):
        return update(q).square().sum()

    return {"grad": (torch.func.grad(loss), 3), "vmap": (torch.vmap(update), 4),
            "vmap(grad)": (torch.vmap(torch.func.grad(loss)), 4),
            "grad(vmap)": (torch.func.grad(lambda q: torch.vmap(update)(q).square().sum()), 4)}


@pytest.mark.parametrize("transform", ["grad", "vmap", "vmap(grad)", "grad(vmap)"])
@pytest.mark.parametrize("backend", [None] + kernel_backends())
def test_compiled_torch_func_transforms_match_eager(backend, transform):
    """torch.compile over torch.func: dynamo inlines an autograd.Function's forward under a transform it
    traces and drops its backward (pytorch/pytorch#193279): compiled torch.func.grad gave a zero
    gradient.  The automatic choice takes the reference there (fullgraph too); a kernel asked for by
    name runs eagerly behind a graph break."""
    if backend is not None:
        require(backend)
    torch._dynamo.reset()
    fn, rank = _transforms(backend)[transform]
    q = torch.randn((2, 4, 3, 8)[-rank:], generator=torch.Generator().manual_seed(2))
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=backend is None)(q)
    want = fn(q)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(compiled, want)


def test_a_compiled_vmap_without_gradients_keeps_the_kernel():
    """Only a transform traced with gradients on takes the reference (above): a compiled vmap under
    torch.no_grad, inference, calls the kernel's op (the reference, B x N scores, ran 6x slower)."""
    require("cpu")
    torch._dynamo.reset()
    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm.code)
        return gm.forward

    fn, _ = _transforms(None)["vmap"]
    q = torch.randn(4, 3, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(fn, backend=keep, fullgraph=True)(q), fn(q))
    assert any("hen_kernels.partial" in code for code in graphs)
