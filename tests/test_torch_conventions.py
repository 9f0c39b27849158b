"""The ops follow PyTorch's conventions (issue 12): torch.func transforms, autocast as SDPA has it,
float64, ops registered at import, documented signatures."""
import inspect
import os
import pydoc
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import hen_kernels as hk
from hen_kernels import reference

from .conftest import SIMILARITIES, TOLERANCE, interpreted, kernel_backends, make, rel_err, require

BACKENDS = ["torch"] + kernel_backends()


def _ref64(q, x, beta, similarity):
    return reference.update(q.double(), x.double(), beta, similarity)


# --- torch.func: grad, jacrev, vmap -----------------------------------------------------

@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_func_grad_and_jacrev(backend, similarity):
    require(backend, 3 * 24, 20, 8)
    b = 1 if interpreted(backend) else 3  # jacrev runs one backward per output entry
    q, x = make((b, 8), torch.float32, 1), make((20, 8), torch.float32, 2)
    beta = 0.5

    def f(q):
        return hk.hopfield_update(q, x, beta, similarity=similarity, backend=backend)

    g = torch.func.grad(lambda q: f(q).square().sum())(q)
    q64 = q.double().requires_grad_()
    (g64,) = torch.autograd.grad(_ref64(q64, x, beta, similarity).square().sum(), q64)
    assert rel_err(g, g64) < 4 * TOLERANCE[torch.float32]
    jac = torch.func.jacrev(f)(q)
    jac64 = torch.autograd.functional.jacobian(lambda t: _ref64(t, x, beta, similarity), q.double())
    assert jac.shape == (b, 8, b, 8) and rel_err(jac, jac64) < 4 * TOLERANCE[torch.float32]


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_over_queries_banks_and_per_sample_grads(backend, similarity, capfd):
    require(backend, 5 * 3, 20, 8 * 4)
    qs, x = make((5, 3, 8), torch.float32, 3), make((20, 8), torch.float32, 4)
    xs = make((5, 20, 8), torch.float32, 5)
    kw = dict(similarity=similarity, backend=backend)
    shared = torch.vmap(lambda q: hk.hopfield_update(q, x, 0.5, **kw))(qs)
    own = torch.vmap(lambda q, x: hk.hopfield_update(q, x, 0.5, **kw))(qs, xs)
    lse = torch.vmap(lambda q: hk.hopfield_partial(q, x, 0.5, **kw).lse)(qs)
    per_sample = torch.vmap(torch.func.grad(lambda q: hk.hopfield_update(q, x, 0.5, **kw).square().sum()))(qs)
    # functorch's slow per-index fallback announces itself on stderr: the ops have vmap rules instead
    assert "performance drop" not in capfd.readouterr().err
    torch.testing.assert_close(shared, hk.hopfield_update(qs, x, 0.5, **kw))
    torch.testing.assert_close(own, hk.hopfield_update(qs, xs, 0.5, **kw))
    torch.testing.assert_close(lse, hk.hopfield_partial(qs, x, 0.5, **kw).lse)
    q64 = qs.double().requires_grad_()
    (want,) = torch.autograd.grad(_ref64(q64, x, 0.5, similarity).square().sum(), q64)
    assert rel_err(per_sample, want) < 4 * TOLERANCE[torch.float32]


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_from_outside_a_vmap_reach_the_vmapped_inputs(backend, similarity):
    """grad(vmap(f)), and a backward through a vmapped call: the batched inputs' wrappers read
    requires_grad False at the vmap's level, and the kernels' raw op (no autograd kernel) gave a zero
    gradient (torch.func.grad) or none at all (.backward()) for every vmapped input, without a word."""
    require(backend, 4 * 3, 20, 8 * 4)
    qs, xs = make((4, 3, 8), torch.float32, 3), make((4, 20, 8), torch.float32, 5)
    betas, w = torch.tensor([0.3, 0.5, 0.7, 0.9]), make((4, 3, 8), torch.float32, 6)

    def loss(q, x, b):
        out = torch.vmap(lambda q, x, b: hk.hopfield_update(q, x, b, similarity=similarity, backend=backend))(q, x, b)
        return (out * w.to(out.dtype)).sum()

    got = torch.func.grad(loss, argnums=(0, 1, 2))(qs, xs, betas)
    args64 = [t.double().requires_grad_() for t in (qs, xs, betas)]
    want = torch.autograd.grad((_ref64(args64[0], args64[1], args64[2], similarity) * w).sum(),
                               args64)
    for g, g64 in zip(got, want):
        assert rel_err(g, g64) < 4 * TOLERANCE[torch.float32]
    leaves = [t.clone().requires_grad_() for t in (qs, xs, betas)]
    loss(*leaves).backward()
    for t, g64 in zip(leaves, want):
        assert t.grad is not None and rel_err(t.grad, g64) < 4 * TOLERANCE[torch.float32]


@pytest.mark.parametrize("in_dim", [0, 1])
def test_vmap_over_a_layer_with_per_sample_masks(in_dim):
    """Per-sample padding masks are a vmapped layer's normal case: the fully-masked check read the
    mask's values, which vmap forbids (it raised for every masked call); it now reads them beneath
    the transform, so a sample with every stored pattern masked is still refused, by name."""
    m = hk.nn.Hopfield(input_size=8, num_heads=2, batch_first=True)
    params = dict(m.named_parameters())
    stored, state = make((4, 5, 8), torch.float32, 1), make((4, 3, 8), torch.float32, 2)
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[:, -1], mask[2, :3] = True, True

    def one(s, p, padding):
        inputs = ((s[None], p[None], s[None]),)
        return torch.func.functional_call(m, params, inputs, {"stored_pattern_padding_mask": padding[None]})[0]

    def batched(t):
        return t.movedim(0, in_dim)
    got = torch.vmap(one, in_dims=in_dim)(batched(stored), batched(state), batched(mask))
    torch.testing.assert_close(got, torch.stack([one(stored[i], state[i], mask[i]) for i in range(4)]))
    grads = torch.vmap(torch.func.grad(lambda s, p, k: one(s, p, k).square().sum()))(stored, state, mask)
    assert torch.isfinite(grads).all() and grads.abs().sum() > 0
    mask[1] = True
    with pytest.raises(ValueError, match="every stored pattern is masked for one state pattern of a vmapped"):
        torch.vmap(one, in_dims=in_dim)(batched(stored), batched(state), batched(mask))
    with pytest.raises(ValueError, match="every stored pattern is masked for batch item 0, head 0"):  # grad's wrap
        torch.func.grad(lambda s: one(s, state[1], mask[1]).sum())(stored[1])


def test_a_fully_masked_state_pattern_is_refused_under_torch_compile():
    """The check reads the mask; under torch.compile dynamo breaks the graph there and runs it (a
    version that skipped it while compiling returned NaN)."""
    m = hk.nn.Hopfield(input_size=8, num_heads=2, batch_first=True)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1] = True
    compiled = torch.compile(lambda s, p, k: m((s, p, s), stored_pattern_padding_mask=k), backend="eager")
    with pytest.raises(ValueError, match="every stored pattern is masked for batch item 1"):
        compiled(make((2, 5, 8), torch.float32, 1), make((2, 3, 8), torch.float32, 2), mask)


# --- forward mode: torch.func.jvp, jacfwd, torch.autograd.forward_ad ---------------------

def _forward_calls(beta, similarity):
    """Every public op as a function of (query, memory), returning one tensor."""
    return {
        "update": lambda q, x: hk.hopfield_update(q, x, beta, similarity=similarity),
        "partial out": lambda q, x: hk.hopfield_partial(q, x, beta, similarity=similarity).out,
        "partial lse": lambda q, x: hk.hopfield_partial(q, x, beta, similarity=similarity).lse,
        "energy": lambda q, x: hk.energy(q, x, beta, similarity=similarity),
        "retrieve": lambda q, x: hk.hopfield_retrieve(q, x, beta, similarity=similarity, max_steps=3).state,
    }


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("beta", ["float", "tensor"])
def test_forward_mode_tangents_are_computed_not_dropped(beta, similarity):
    """The kernels' ops have no forward derivative, and PyTorch runs such an op by dropping the
    tangents (a zero jvp, without a word): a call that carries tangents takes the reference."""
    q, x = make((3, 8), torch.float32, 1), make((20, 8), torch.float32, 2)
    if similarity != "l2":  # (-‖x - s‖ has no derivative on a stored pattern: the reference's is NaN there)
        q[0] = x[4]  # recall's normal case
    tq, tx = make((3, 8), torch.float32, 3), make((20, 8), torch.float32, 4)
    b = 0.5 if beta == "float" else torch.tensor(0.5)
    for name, f in _forward_calls(b, similarity).items():
        out, got = torch.func.jvp(f, (q, x), (tq, tx))
        out64, want = torch.func.jvp(f, (q.double(), x.double()), (tq.double(), tx.double()))
        assert want.norm() > 0, name
        assert rel_err(out, out64) < 4 * TOLERANCE[torch.float32], name
        assert rel_err(got, want) < 4 * TOLERANCE[torch.float32], name
        with torch.autograd.forward_ad.dual_level():
            dual = f(torch.autograd.forward_ad.make_dual(q, tq), torch.autograd.forward_ad.make_dual(x, tx))
            assert rel_err(torch.autograd.forward_ad.unpack_dual(dual).tangent, want) < 4 * TOLERANCE[torch.float32]


def test_jacfwd_is_jacrev():
    q, x = make((2, 8), torch.float32, 5), make((30, 8), torch.float32, 6)

    def f(q):
        return hk.hopfield_update(q, x, 0.7)

    torch.testing.assert_close(torch.func.jacfwd(f)(q), torch.func.jacrev(f)(q))


def test_linearize_and_hessian():
    """linearize traces with make_fx (no data to read: tracing.is_tracing); a hessian takes forward mode
    over reverse mode, whose tangents the fused backward would not carry: the reference computes it, and
    an asked kernel refuses it by name."""
    q, x, t = make((3, 8), torch.float32, 1), make((10, 8), torch.float32, 2), make((3, 8), torch.float32, 3)
    _, jvp_fn = torch.func.linearize(lambda a: hk.hopfield_update(a, x, 0.5), q)
    _, want = torch.func.jvp(lambda a: hk.hopfield_update(a, x.double(), 0.5), (q.double(),), (t.double(),))
    assert rel_err(jvp_fn(t), want) < 4 * TOLERANCE[torch.float32]

    def energy_like(backend):
        return lambda a: hk.hopfield_update(a, x, 0.5, backend=backend).square().sum()

    h64 = torch.func.hessian(lambda a: hk.hopfield_update(a, x.double(), 0.5).square().sum())(q[:1].double())
    assert h64.norm() > 0
    for backend in (None, "torch"):
        assert rel_err(torch.func.hessian(energy_like(backend))(q[:1]), h64) < 4 * TOLERANCE[torch.float32]
    for backend in kernel_backends():
        require(backend, 1, 10, 8)
        with pytest.raises(NotImplementedError, match=f"^backend: '{backend}' has no forward-mode derivative"):
            torch.func.hessian(energy_like(backend))(q[:1])


def test_forward_mode_refused_by_name_on_an_asked_kernel(monkeypatch):
    q, x, t = make((3, 8), torch.float32, 1), make((20, 8), torch.float32, 2), make((3, 8), torch.float32, 3)
    for backend in kernel_backends():
        require(backend, 3, 20, 8)
        with pytest.raises(NotImplementedError, match=f"^backend: '{backend}' has no forward-mode derivative"):
            torch.func.jvp(lambda q: hk.hopfield_update(q, x, 0.5, backend=backend), (q,), (t,))
        monkeypatch.setenv("HEN_KERNELS_BACKEND", backend)
        with pytest.raises(NotImplementedError, match="^HEN_KERNELS_BACKEND: .* no forward-mode derivative"):
            torch.func.jvp(lambda q: hk.hopfield_update(q, x, 0.5), (q,), (t,))
        monkeypatch.delenv("HEN_KERNELS_BACKEND")
        with torch.autograd.forward_ad.dual_level():  # no tangent on these inputs: the kernel still serves
            assert torch.equal(hk.hopfield_update(q, x, 0.5, backend=backend),
                               hk.hopfield_update(q, x, 0.5, backend=backend, weights=torch.ones(3, 8)))


# --- torch.autocast: as scaled_dot_product_attention ----------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_computes_mixed_dtypes_like_sdpa(backend):
    """Under autocast a bf16 query meets a float32 bank: both are cast to the autocast dtype (as SDPA's
    inputs are), the math runs in float32, and the update comes back in the autocast dtype."""
    require(backend)
    q, x = make((2, 4, 16), torch.bfloat16, 6), make((30, 16), torch.float32, 7)
    with pytest.raises(TypeError, match="^memory:"):
        hk.hopfield_update(q, x, 0.25, backend=backend)  # outside autocast: refused, never cast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sdpa = F.scaled_dot_product_attention(q, x.expand(2, 30, 16), x.expand(2, 30, 16))
        out = hk.hopfield_update(q, x, 0.25, backend=backend)
        p = hk.hopfield_partial(q, x, 0.25, backend=backend)
        r = hk.hopfield_retrieve(q, x, 0.25, max_steps=2, backend=backend)
        e = hk.energy(q, x, 0.25, backend=backend)
    assert out.dtype == sdpa.dtype == torch.bfloat16 and r.state.dtype == torch.bfloat16
    assert p.out.dtype == p.lse.dtype == e.dtype == torch.float32
    want = hk.hopfield_update(q, x.bfloat16(), 0.25, backend=backend)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert rel_err(out, _ref64(q, x.bfloat16(), 0.25, "dot")) <= TOLERANCE[torch.bfloat16]
    # a float64 input is left as it is (as SDPA leaves it): the refusal says what autocast did to the others
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(
            TypeError, match=r"^memory: expected dtype torch.float64 .* got torch.bfloat16 after autocast"):
        hk.hopfield_update(q.double(), x, 0.25, backend=backend)


# --- shapes without data: meta tensors and FakeTensorMode, as SDPA takes them ---------------------------

def _shapes_and_dtypes(result):
    parts = result if isinstance(result, tuple) else (result,)
    return [(tuple(t.shape), t.dtype) for t in parts]


def _calls(q, x, v, beta, similarity):
    """The public functions a shape-propagating tool (a meta-device model, torch.export's fake tracing,
    a FLOP counter) would run: each returns tensors only."""
    return {
        "update": lambda: hk.hopfield_update(q, x, beta, similarity=similarity, values=v),
        "partial": lambda: tuple(hk.hopfield_partial(q, x, beta, similarity=similarity, values=v)),
        "energy": lambda: hk.energy(q, x, beta, similarity=similarity),
        "retrieve": lambda: tuple(hk.hopfield_retrieve(q, x, beta, similarity=similarity, max_steps=3)),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_meta_and_fake_tensors_give_the_real_calls_shapes_and_dtypes(similarity, dtype):
    """No data is read (beta's range, the lse check, the reference's exact ℓ2 recompute are data-dependent):
    the answer's shapes and dtypes are the real call's, and the float beta cache keeps no fake tensor."""
    require("cpu")
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    shapes = [(2, 3, 5, 16), (2, 3, 40, 16), (2, 3, 40, 7)]
    real = [make(s, dtype, seed) for seed, s in enumerate(shapes)]
    for beta in (0.25, torch.tensor(0.25), torch.full((2, 3), 0.25)):
        want = {k: _shapes_and_dtypes(f()) for k, f in _calls(*real, beta, similarity).items()}
        meta_beta = beta.to("meta") if isinstance(beta, torch.Tensor) and beta.dim() else beta
        meta = {k: f() for k, f in _calls(*(t.to("meta") for t in real), meta_beta, similarity).items()}
        assert {k: _shapes_and_dtypes(r) for k, r in meta.items()} == want
        assert all(t.device.type == "meta" for r in meta.values() for t in (r if isinstance(r, tuple) else (r,)))
        with FakeTensorMode() as mode:
            fake_in = [mode.from_tensor(t) for t in real]
            fake_beta = mode.from_tensor(beta) if isinstance(beta, torch.Tensor) else beta
            fake = {k: f() for k, f in _calls(*fake_in, fake_beta, similarity).items()}
        assert {k: _shapes_and_dtypes(r) for k, r in fake.items()} == want
        assert all(isinstance(t, FakeTensor) for r in fake.values() for t in (r if isinstance(r, tuple) else (r,)))
    after = hk.hopfield_update(real[0], real[1], 0.25, similarity=similarity)
    assert not isinstance(after, FakeTensor) and torch.isfinite(after.float()).all()


@pytest.mark.parametrize("layer", ["Hopfield", "HopfieldLayer", "HopfieldPooling"])
def test_layers_built_on_the_meta_device_and_under_fake_tensors(layer):
    require("cpu")
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = getattr(hk.nn, layer)(16)
    want = real(make((3, 5, 16), torch.float32, 0)).shape
    with torch.device("meta"):
        y = getattr(hk.nn, layer)(16)(torch.randn(3, 5, 16))
    assert y.shape == want and y.device.type == "meta"
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert real(torch.randn(3, 5, 16)).shape == want


def test_autocast_leaves_the_references_scores_in_float32():
    """Inside the ops autocast is off: the reference's matmuls do not round scores to bf16 again."""
    q, x = make((8, 64), torch.float32, 8), make((500, 64), torch.float32, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hk.hopfield_update(q, x, 0.5, backend="torch")
    want = _ref64(q.bfloat16(), x.bfloat16(), 0.5, "dot")
    assert rel_err(out, want) <= TOLERANCE[torch.bfloat16] / 4


# --- float64 -------------------------------------------------------------------------------

@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_float64_is_computed_in_float64(similarity, monkeypatch):
    """The automatic choice routes float64 to the reference (every op, gradients included); the
    kernels refuse it by name.  Held to float64's tolerance against a direct restatement."""
    monkeypatch.delenv("HEN_KERNELS_BACKEND", raising=False)
    q, x = make((2, 5, 6), torch.float64, 10), make((40, 6), torch.float64, 11)
    q = torch.cat([q, x[:2].expand(2, 2, 6)], dim=1)  # queries on stored patterns too
    beta = 0.7
    diff = x.unsqueeze(-3) - q.unsqueeze(-2)
    d2 = (diff * diff).sum(-1)
    sim = {"dot": q @ x.T, "l2": -d2.sqrt(), "l2sq": -0.5 * d2}[similarity]
    want = torch.softmax(beta * sim, -1) @ x
    out = hk.hopfield_update(q, x, beta, similarity=similarity)
    assert out.dtype == torch.float64 and rel_err(out, want) <= TOLERANCE[torch.float64]
    p = hk.hopfield_partial(q, x, beta, similarity=similarity)
    assert p.out.dtype == p.lse.dtype == torch.float64
    torch.testing.assert_close(p.lse, torch.logsumexp(beta * sim, -1), rtol=1e-13, atol=1e-13)
    parts = [hk.hopfield_partial(q, x[i:i + 7], beta, similarity=similarity, offset=i) for i in range(0, 40, 7)]
    assert rel_err(hk.merge_partials(parts).out, want) <= TOLERANCE[torch.float64]
    assert hk.energy(q, x, beta, similarity=similarity).dtype == torch.float64
    assert hk.hopfield_retrieve(q, x, beta, similarity=similarity, max_steps=3).state.dtype == torch.float64
    if similarity != "l2":  # -‖x - s‖ has no derivative on a stored pattern
        qg = q[:1, :3].detach().requires_grad_()
        assert torch.autograd.gradcheck(lambda t: hk.hopfield_update(t, x[:9], beta, similarity=similarity), (qg,))
    if "cpu" in hk.available_backends():
        with pytest.raises(ValueError, match="^backend: 'cpu' takes float32, float16, bfloat16 inputs, got float64"):
            hk.hopfield_update(q, x, beta, similarity=similarity, backend="cpu")


def test_float64_beta_keeps_its_precision():
    q, x = make((3, 4), torch.float64, 12), make((9, 4), torch.float64, 13)
    beta = 0.1 + 1e-12
    got = hk.hopfield_partial(q, x, beta).lse
    torch.testing.assert_close(got, torch.logsumexp(beta * (q @ x.T), -1), rtol=1e-15, atol=0)


# --- registered at import, documented ---------------------------------------------------

def test_ops_are_registered_at_import():
    if "cpu" not in hk.available_backends():
        pytest.skip("the compiled extension is not built here")
    code = ("import torch, hen_kernels; torch.ops.hen_kernels.partial; torch.ops.hen_kernels.partial_backward; "
            "torch.ops.hen_kernels.cpu_info()")
    env = dict(os.environ)
    env.pop("HEN_KERNELS_BACKEND", None)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_import_leaves_dynamo_unloaded():
    """A model that imports the package as a backend pays for torch.compile's machinery only when it compiles:
    torch.compiler.disable as a decorator had imported torch._dynamo at import, 2.8 of the 2.9 s the package
    took after torch."""
    code = ("import sys, hen_kernels, hen_kernels.nn, hen_kernels.bank; "
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout


PUBLIC_FUNCTIONS = [hk.hopfield_update, hk.hopfield_partial, hk.hopfield_retrieve, hk.energy, hk.merge_partials]


@pytest.mark.parametrize("fn", PUBLIC_FUNCTIONS, ids=lambda f: f.__name__)
def test_public_functions_document_arguments_shapes_and_dtypes(fn):
    doc = inspect.getdoc(fn)
    assert doc and "Args:" in doc and "Returns:" in doc
    for name in inspect.signature(fn).parameters:
        assert name in doc, f"{fn.__name__}: argument {name!r} is not documented"
    assert "(..., B" in doc or fn is hk.merge_partials
    assert doc.splitlines()[0] in pydoc.render_doc(fn)  # what help() shows


def test_types_and_available_backends_are_documented():
    for obj in (hk.Partial, hk.Retrieval):
        doc = inspect.getdoc(obj)
        assert "(..., B)" in doc and "int64" in doc
    assert inspect.getdoc(hk.available_backends)
    assert "float32" in inspect.getdoc(hk.hopfield_update) and "autocast" in inspect.getdoc(hk.hopfield_update)
