"""Gradients of the functional ops: the reference by gradcheck, the fused backward against it."""
import pytest
import torch

import hen_kernels as hk
from hen_kernels import backward_cpu, reference
from hen_kernels.constants import GRAD_TOLERANCE

from .conftest import SIMILARITIES, kernel_backends, make, rel_err, require
from .pending import backend_params


def _inputs(shape_q, n, dv, dtype, shared, seed, requires_grad=True):
    lead, d = shape_q[:-2], shape_q[-1]
    q = make(shape_q, dtype, seed)
    x = make((n, d) if shared else lead + (n, d), dtype, seed + 1)
    v = make(x.shape[:-1] + (dv,), dtype, seed + 2)
    beta = (0.5 + torch.rand(lead[-1:] if lead else (), generator=torch.Generator().manual_seed(seed))).double()
    for t in (q, x, v, beta):
        t.requires_grad_(requires_grad)
    return q, x, v, beta


def _beta_level(similarity, d):
    return 1.0 if similarity == "l2" else 1.0 / d**0.5


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("shared", [True, False])
def test_reference_gradcheck_float64(similarity, shared):
    q, x, v, beta = _inputs((2, 3, 4), 5, 3, torch.float64, shared, seed=1)

    def f(q, x, v, beta):
        p = reference.partial(q, x, beta * _beta_level(similarity, 4), similarity, v)
        return p.out, p.lse

    assert torch.autograd.gradcheck(f, (q, x, v, beta))


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("shared", [True, False])
def test_streaming_backward_equals_autograd_float64(similarity, shared):
    """backward_cpu's formulas, in float64 and in chunks of 4 rows, against autograd through the reference."""
    q, x, v, beta = _inputs((3, 5, 6), 11, 4, torch.float64, shared, seed=2)
    beta_l = (beta * _beta_level(similarity, 6)).detach().expand(3).requires_grad_()
    p = reference.partial(q, x, beta_l, similarity, v)
    dout, dlse = make(p.out.shape, torch.float64, 3), make(p.lse.shape, torch.float64, 4)
    want = torch.autograd.grad((p.out * dout).sum() + (p.lse * dlse).sum(), (q, x, v, beta_l))
    xs, vs = (x.detach().unsqueeze(0), v.detach().unsqueeze(0)) if shared else (x.detach(), v.detach())
    got = backward_cpu.partial_backward(dout, dlse, q.detach(), xs, vs, beta_l.detach(), p.out.detach(),
                                        p.lse.detach(), similarity, rows=4)
    for g, w in zip(got, want):
        assert rel_err(g.reshape(w.shape), w) < 1e-12


def _weights(shape, seed):
    w = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w.reshape(-1, shape[-1])[0, : (shape[-1] + 1) // 2] = 0  # a query that knows only part of its pattern
    return w


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("shared", [True, False])
def test_streaming_backward_with_weights_equals_autograd_float64(similarity, shared):
    """dq, dx, dv, dbeta through the weighted similarity (docs/design.md §5.1); weights get none."""
    q, x, v, beta = _inputs((3, 5, 6), 11, 4, torch.float64, shared, seed=12)
    w = _weights((3, 5, 6), 13)
    beta_l = (beta * _beta_level(similarity, 6)).detach().expand(3).requires_grad_()
    p = reference.partial(q, x, beta_l, similarity, v, weights=w)
    dout, dlse = make(p.out.shape, torch.float64, 14), make(p.lse.shape, torch.float64, 15)
    want = torch.autograd.grad((p.out * dout).sum() + (p.lse * dlse).sum(), (q, x, v, beta_l))
    xs, vs = (x.detach().unsqueeze(0), v.detach().unsqueeze(0)) if shared else (x.detach(), v.detach())
    got = backward_cpu.partial_backward(dout, dlse, q.detach(), xs, vs, beta_l.detach(), p.out.detach(),
                                        p.lse.detach(), similarity, weights=w.reshape(3, 5, 6), rows=4)
    for g, ww in zip(got, want):
        assert rel_err(g.reshape(ww.shape), ww) < 1e-12


@pytest.mark.parametrize("similarity", ["l2", "l2sq"])
def test_streaming_backward_far_from_the_origin(similarity):
    """The ℓ2 chain rule is taken about the queries' centre: ‖x‖ ≈ 1e4 loses nothing to cancellation.

    (Values stay near the origin: float32 ``out`` of values at 1e4 is itself 1e-3 off, which no
    backward recovers.)
    """
    g = torch.Generator().manual_seed(14)
    centre = 1e4 * torch.nn.functional.normalize(torch.randn(16, generator=g, dtype=torch.float64), dim=0)
    x = (centre + 0.3 * torch.randn(40, 16, generator=g, dtype=torch.float64)).float()
    q = (x[:6].double() + 0.1 * torch.randn(6, 16, generator=g, dtype=torch.float64)).float().unsqueeze(0)
    v = torch.randn(40, 8, generator=g)
    beta = torch.tensor([2.0 if similarity == "l2" else 4.0])
    dout, dlse = torch.randn(1, 6, 8, generator=g), torch.randn(1, 6, generator=g)
    want = partial_grads(None, similarity, q.double(), x.double(), v.double(), beta.double(), dout.double(),
                         dlse.double())
    p = reference.partial(q, x, beta, similarity, v)
    got = backward_cpu.partial_backward(dout, dlse, q, x.unsqueeze(0), v.unsqueeze(0), beta, p.out, p.lse, similarity)
    for name, gg, ww in zip(("query", "memory", "values", "beta"), got, want):
        assert rel_err(gg.reshape(ww.shape), ww) < GRAD_TOLERANCE[torch.float32], name


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("backend", backend_params(kernel_backends(), "weights"))
def test_fused_backward_with_weights_matches_reference(backend, similarity):
    require(backend, 10, 20, 24 * 8)
    q, x, v, beta = _inputs((2, 5, 24), 20, 24, torch.float32, False, seed=15, requires_grad=False)
    beta = (beta * _beta_level(similarity, 24)).float()
    w = _weights((2, 5, 24), 16).float()
    g = torch.Generator().manual_seed(17)
    dout, dlse = torch.randn(2, 5, 24, generator=g), torch.randn(2, 5, generator=g)
    grads = {}
    for name, dt in ((backend, torch.float32), ("torch", torch.float64)):
        args = [t.detach().to(dt).requires_grad_() for t in (q, x, v, beta)]
        p = hk.hopfield_partial(args[0], args[1], args[3], similarity=similarity, values=args[2], weights=w,
                                backend=name)
        grads[name] = torch.autograd.grad((p.out * dout.to(dt)).sum() + (p.lse * dlse.to(dt)).sum(), args)
    for name, gg, ww in zip(("query", "memory", "values", "beta"), grads[backend], grads["torch"]):
        assert rel_err(gg, ww) < GRAD_TOLERANCE[torch.float32], name


def _spy_triton_backward(monkeypatch):
    """Record calls of the Triton backward (when triton imports here)."""
    calls = []
    try:
        from hen_kernels.triton import backward as tb
    except ImportError:
        return calls
    real = tb.partial_backward

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(tb, "partial_backward", spy)
    return calls


def partial_grads(backend, similarity, q, x, v, beta, dout, dlse):
    """Gradients of Σ out·dout + Σ lse·dlse for q, x, v (left out when None: values = memory) and beta."""
    args = [t.detach().requires_grad_() for t in (q, x) + (() if v is None else (v,)) + (beta,)]
    values = None if v is None else args[2]
    if backend is None:  # ground truth: autograd through the reference in float64
        p = reference.partial(args[0], args[1], args[-1], similarity, values)
    else:
        p = hk.hopfield_partial(args[0], args[1], args[-1], similarity=similarity, values=values, backend=backend)
    loss = (p.out * dout).sum() + (p.lse * dlse).sum()
    return torch.autograd.grad(loss, args)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [((2, 5, 16), 19, 8, True), ((3, 7, 24), 20, 24, False), ((1, 9, 3), 7, 5, True)])
def test_fused_backward_matches_reference(backend, similarity, dtype, shape, monkeypatch):
    shape_q, n, dv, shared = shape
    require(backend, shape_q[-2] * shape_q[0], n, shape_q[-1] * 8)
    calls = _spy_triton_backward(monkeypatch)
    q, x, v, beta = _inputs(shape_q, n, dv, dtype, shared, seed=3, requires_grad=False)
    beta = (beta * _beta_level(similarity, shape_q[-1])).float()
    g = torch.Generator().manual_seed(4)
    dout = torch.randn(shape_q[:-1] + (dv,), generator=g)
    dlse = torch.randn(shape_q[:-1], generator=g)
    want = partial_grads(None, similarity, q.double(), x.double(), v.double(), beta.double(), dout.double(),
                  dlse.double())
    got = partial_grads(backend, similarity, q, x, v, beta, dout, dlse)
    assert calls == ([1] if backend == "triton" else [])  # the fused kernel, not a fallback
    for name, gg, w in zip(("query", "memory", "values", "beta"), got, want):
        assert gg.dtype == (beta.dtype if name == "beta" else dtype)
        assert torch.isfinite(gg).all()
        assert rel_err(gg, w) < GRAD_TOLERANCE[dtype], name


@pytest.mark.parametrize("matmul_precision, fused", [("highest", False), ("high", True)], ids=["tf32x3", "tf32"])
def test_float32_past_64_takes_the_fused_backward_at_one_tf32_product_only(matmul_precision, fused, monkeypatch):
    """float32 at D = 72: the fused kernels spill at float32 accuracy (tf32x3) past configs.BACKWARD_TF32X3_MAX_DIM,
    so the streaming backward serves it; with torch's tf32 allowed they serve it.  Either matches float64."""
    require("triton", 3 * 8, 20, 72)
    from hen_kernels.triton import backward, configs

    assert configs.BACKWARD_TF32X3_MAX_DIM < 72 <= configs.BACKWARD_MAX_DIM
    assert backward.serves(torch.float32, 72, 8, "tf32x3") is False and backward.serves(torch.float32, 72, 8, "tf32")
    assert backward.serves(torch.bfloat16, 72, 8, "tf32x3") and backward.serves(torch.float32, 64, 64, "tf32x3")
    calls = _spy_triton_backward(monkeypatch)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(matmul_precision)
    try:
        q, x, v, beta = _inputs((3, 72), 20, 8, torch.float32, True, seed=5, requires_grad=False)
        beta = (beta * _beta_level("l2sq", 72)).float()
        g = torch.Generator().manual_seed(6)
        dout, dlse = torch.randn((3, 8), generator=g), torch.randn((3,), generator=g)
        want = partial_grads(None, "l2sq", q.double(), x.double(), v.double(), beta.double(), dout.double(),
                             dlse.double())
        got = partial_grads("triton", "l2sq", q, x, v, beta, dout, dlse)
    finally:
        torch.set_float32_matmul_precision(old)
    assert calls == ([1] if fused else [])
    for name, gg, w in zip(("query", "memory", "values", "beta"), got, want):
        assert rel_err(gg, w) < (1e-2 if fused else GRAD_TOLERANCE[torch.float32]), name


@pytest.mark.parametrize("backend", kernel_backends())
def test_update_values_default_to_memory_and_beta_per_head(backend):
    """values=None: the bank gets both gradients (scores and values); beta per head gets its own."""
    require(backend, 8, 30, 16)
    q = make((2, 4, 8), torch.float32, 5).requires_grad_()
    x = make((30, 8), torch.float32, 6).requires_grad_()
    beta = torch.tensor([0.3, 0.7], requires_grad=True)
    grads = {}
    for b, args in (("torch", [t.detach().double().requires_grad_() for t in (q, x, beta)]), (backend, (q, x, beta))):
        out = hk.hopfield_update(*args, similarity="l2sq", backend=b)
        grads[b] = torch.autograd.grad(out.square().sum(), args)
    for got, want in zip(grads[backend], grads["torch"]):  # against the reference in float64
        assert rel_err(got, want) < GRAD_TOLERANCE[torch.float32]


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("beta_kind", ["float", "tensor"])  # on the CPU: the one C++ call, and the general path
@pytest.mark.parametrize("values", ["memory", "own"])
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen-bank", "trained-bank"])
def test_the_backward_is_asked_only_for_the_bank_gradients_wanted(backend, beta_kind, values, frozen, monkeypatch):
    """A frozen bank asks for no bank gradient, one bank as keys and values for one (dX + dV), others for
    both (backends.bank_grads_wanted); every gradient taken matches the reference's in float64."""
    require(backend, 8, 30, 16)
    from hen_kernels import backends

    asked = []
    real = backends.BACKENDS[backend].backward

    def spy(*args):
        asked.append(args[10])  # bank_grads (backends.BackwardImpl; then top)
        return real(*args)

    monkeypatch.setattr(backends.BACKENDS[backend], "backward", spy)
    q0, x0, v0 = make((2, 4, 8), torch.float32, 9), make((30, 8), torch.float32, 10), make((30, 5), torch.float32, 11)
    beta = 0.4 if beta_kind == "float" else torch.tensor([0.3, 0.4])
    grads = {}
    for b, dt in ((backend, torch.float32), ("torch", torch.float64)):
        q = q0.to(dt).requires_grad_()
        x = x0.to(dt).requires_grad_(not frozen)
        v = x if values == "memory" else v0.to(dt).requires_grad_(not frozen)
        out = hk.hopfield_update(q, x, beta, similarity="l2sq", values=v, backend=b)
        wrt = [q] if frozen else [q, x] if values == "memory" else [q, x, v]
        grads[b] = torch.autograd.grad(out.square().sum(), wrt)
    want = "none" if frozen else "summed" if values == "memory" else "apart"
    # The plain CPU call (float beta) records its graph in C++ (binding.cpp's UpdateFunction, deciding alike).
    assert asked == ([] if backend == "cpu" and beta_kind == "float" else [want])
    for got, ref in zip(grads[backend], grads["torch"]):
        assert rel_err(got, ref) < GRAD_TOLERANCE[torch.float32]


@pytest.mark.parametrize("backend", kernel_backends())
def test_retrieve_and_energy_are_differentiable(backend):
    require(backend, 6, 20, 8 * 4)
    q0 = make((6, 8), torch.float32, 7)
    x = make((20, 8), torch.float32, 8)
    grads = {}
    for b, dt in (("torch", torch.float64), (backend, torch.float32)):  # the reference in float64
        q, xx = q0.to(dt).requires_grad_(), x.to(dt).requires_grad_()
        r = hk.hopfield_retrieve(q, xx, 0.5, similarity="dot", max_steps=3, backend=b)
        e = hk.energy(r.state, xx, 0.5, backend=b)
        grads[b] = torch.autograd.grad(r.state.sum() + e.sum(), (q, xx))
    for got, want in zip(grads[backend], grads["torch"]):
        assert rel_err(got, want) < GRAD_TOLERANCE[torch.float32]


@pytest.mark.parametrize("backend", kernel_backends())
def test_l2_gradient_at_a_stored_pattern_is_finite(backend):
    """-‖x - s‖ has no derivative where s = x; the fused backward takes the zero subgradient there, for the top
    row and for a twin of it stored again, which is not the top row (its own path had lost the guard: NaN)."""
    require(backend, 3, 5, 4)
    x = make((5, 4), torch.float32, 9)
    x[4] = x[0]
    x.requires_grad_()
    q = x.detach()[:3].clone().requires_grad_()
    out = hk.hopfield_update(q, x, 2.0, similarity="l2", backend=backend)
    gq, gx = torch.autograd.grad(out.sum(), (q, x))
    assert torch.isfinite(gq).all() and torch.isfinite(gx).all()
    # the reference takes the same subgradient (float64 modules and backend="torch" train through it)
    x64 = x.detach().double().requires_grad_()
    q64 = x64.detach()[:3].clone().requires_grad_()
    out64 = hk.hopfield_update(q64, x64, 2.0, similarity="l2", backend="torch")
    for got, want in zip((gq, gx), torch.autograd.grad(out64.sum(), (q64, x64))):
        assert rel_err(got, want) < GRAD_TOLERANCE[torch.float32]


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("similarity", ["l2sq", "l2"])
def test_gradients_with_every_query_on_a_stored_row(backend, similarity):
    """Recall's normal case with a gradient for lse (a merge of chunks passes one back): each query on its
    own stored row (l2: next to it), beta 0.4 on 64 features, so the softmax sits mostly there.  That
    row's terms of dq and dX are G (x - q), near 0; formed as products minus rowsum / colsum terms they
    cancelled to the rounding of |G| |x| (CPU 2e-2, Triton 4.8e-2 off float64 on hen check's case)."""
    require(backend, 16, 64, 64)
    x, v = make((64, 64), torch.float32, 60), make((64, 11), torch.float32, 61)
    rows = x[torch.randperm(64, generator=torch.Generator().manual_seed(62))[:16]]
    q = (rows + (0.05 * make((16, 64), torch.float32, 63) if similarity == "l2" else 0)).reshape(2, 8, 64)
    dout, dlse = make((2, 8, 11), torch.float32, 64), make((2, 8), torch.float32, 65)
    beta = torch.tensor([0.4, 0.2])
    grads = {}
    for name, dt in ((backend, torch.float32), ("torch", torch.float64)):
        leaves = [t.to(dt).requires_grad_() for t in (q, x, v, beta)]
        p = hk.hopfield_partial(leaves[0], leaves[1], leaves[3], similarity=similarity, values=leaves[2], backend=name)
        grads[name] = torch.autograd.grad((p.out, p.lse), leaves, (dout.to(dt), dlse.to(dt)))
    for what, g, r in zip(("dq", "dx", "dv", "dbeta"), grads[backend], grads["torch"]):
        assert rel_err(g, r) <= GRAD_TOLERANCE[torch.float32], (what, rel_err(g, r))


def test_triton_backward_splits_long_banks_and_many_queries():
    """Shapes that make both Triton kernels split their walked range (workspace + sum path)."""
    require("triton", 2, 1100, 16)
    from hen_kernels.triton import backward as tb

    for (L, B, N, shared) in ((1, 2, 1100, True), (2, 600, 3, False)):
        q, x, v, beta = _inputs((L, B, 16), N, 16, torch.float32, shared, seed=10, requires_grad=False)
        xs, vs = (x.unsqueeze(0), v.unsqueeze(0)) if shared else (x, v)
        beta = (beta * 0.25).float().expand(L).contiguous()
        p = reference.partial(q, xs, beta, "l2sq", vs)
        dout, dlse = make(p.out.shape, torch.float32, 11), make(p.lse.shape, torch.float32, 12)
        assert tb._splits(L, max(N, B), q.device)[0] > 1
        got = tb.partial_backward(dout, dlse, q, xs, vs, beta, p.out, p.lse, "l2sq")
        # Against float64, not another float32 code, on seeded upstream gradients: dbeta sums N·B
        # terms of both signs (here 50-400 times their sum in magnitude), and with unseeded ones
        # two float32 summation orders once differed by 1.3e-5.
        args64 = (t.double() for t in (dout, dlse, q, xs, vs, beta, p.out, p.lse))
        want = backward_cpu.partial_backward(*args64, "l2sq")
        for name, g, w in zip(("dq", "dx", "dv", "dbeta"), got, want):
            assert rel_err(g, w) < GRAD_TOLERANCE[torch.float32], (name, rel_err(g, w))


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("backend", kernel_backends() + ["streaming"])
def test_dbeta_of_a_one_hot_softmax_is_zero(backend, similarity):
    """Every query on a stored row with a sharp beta: the softmax is one-hot, dt ~0 everywhere, the true dbeta
    ~1e-80.  Δ taken from ``out`` differs from Σ P dP by float32's rounding; uncorrected, that gave every query
    eps |dout| |v| |s| (7.7e-4 in all on the CPU op, dot) where the reference's autograd gives 0 (backward_cpu.py
    dbeta_from_terms)."""
    L, B, N, D, Dv = 1, 8, 64, 64, 12
    require("cpu" if backend == "streaming" else backend, B, N, D)
    x, v = make((N, D), torch.float32, 1) + 2.0, make((N, Dv), torch.float32, 2) + 3.0
    q = x[torch.arange(B) * 7][None]
    if similarity != "dot":  # (next to the rows: the top score is not 0, so an error there would show)
        q = q + 0.1 * make(q.shape, torch.float32, 4)
    beta = torch.tensor([4.0 if similarity == "dot" else 40.0])
    dout, dlse = make((L, B, Dv), torch.float32, 3), torch.zeros(L, B)
    p = reference.partial(q, x[None], beta, similarity, v[None])
    assert p.top_weight.min() == 1.0  # (one-hot in float32)
    if backend == "streaming":
        dbeta = backward_cpu.partial_backward(dout, dlse, q, x[None], v[None], beta, p.out, p.lse, similarity)[3]
    else:
        leaves = [t.clone().requires_grad_() for t in (q, x, v, beta)]
        got = hk.hopfield_partial(leaves[0], leaves[1], leaves[3], similarity=similarity, values=leaves[2],
                                  backend=backend)
        dbeta = torch.autograd.grad((got.out, got.lse), leaves[3], (dout, dlse))[0]
    # Against Σ |dout| |v_top| |s_top|: the old formula's error was 2e-11 to 3e-10 of it here (streaming and CPU
    # op), the new one's 4e-19 or less; a GPU's dP (tf32x3 products) leaves a dt ~1e-5 of |dout| |v| on the top
    # row, whose rounding the correction leaves at ~1e-14 of it.
    size = (dout.norm(dim=-1) * v[p.top_index].norm(dim=-1) * p.top_score.abs()).sum().item()
    assert dbeta.abs().max() < 1e-12 * size, (dbeta, size)


def test_the_streaming_backward_of_an_empty_bank_is_zero():
    """No rows: every query's Σ P is 0, and dbeta's correction must add nothing (it divided 0 by 0)."""
    q, dout = make((1, 3, 8), torch.float32, 1), make((1, 3, 8), torch.float32, 2)
    empty = torch.zeros(1, 0, 8)
    grads = backward_cpu.partial_backward(dout, make((1, 3), torch.float32, 3), q, empty, empty, torch.tensor([0.5]),
                                          torch.zeros(1, 3, 8), torch.full((1, 3), float("-inf")), "dot")
    assert torch.equal(grads[0], torch.zeros_like(q)) and torch.equal(grads[3], torch.zeros(1))


def test_backward_memory_does_not_hold_the_score_matrix():
    """The streaming path's temporaries are bounded by CHUNK_ELEMENTS, not by N."""
    assert backward_cpu.chunk_rows(4, 1024, 10**7) * 4 * 1024 <= backward_cpu.CHUNK_ELEMENTS
    assert backward_cpu.chunk_rows(1, 1, 100) == 100


def test_compiled_training_step_matches_eager():
    require("cpu")
    torch._dynamo.reset()

    def step(q, x, v):
        return hk.hopfield_update(q, x, 0.5, similarity="l2", values=v, backend="cpu").square().sum()

    q, x, v = (make(s, torch.float32, i) for i, s in enumerate([(3, 16), (40, 16), (40, 8)]))
    ins = [t.requires_grad_() for t in (q, x, v)]
    eager = torch.autograd.grad(step(*ins), ins)
    compiled = torch.autograd.grad(torch.compile(step, backend="aot_eager", fullgraph=True)(*ins), ins)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


# Queries on or next to stored rows, with a beta that gives each its own row a weight of 1 to float32's
# precision but not to float64's (1 - P from 1e-11 to 4e-8 in these draws; 7e-5 to 3e-3 in the nearly
# saturated one): the true gradients of the query and of that row are tiny, and the float32 reference's
# are rounding (0.2 to 1.1 of their size off; the fused backwards' were 3 to 1e13 before settle_top_rows).
# (B, N, D, beta, similarity, the query's distance from its row per feature)
SATURATED = [
    (5, 1000, 64, 0.5, "dot", 0.0),
    (5, 1000, 256, 0.125, "dot", 0.0),
    (5, 1000, 256, 1 / 16, "dot", 0.0),
    (3, 200, 64, 0.5, "dot", 0.0),  # small enough for the Triton interpreter, as is the one below
    (3, 200, 64, 2.0, "l2", 0.01),
    (5, 1000, 64, 3.0, "l2", 0.01),
    (5, 1000, 64, 0.4, "l2sq", 0.05),
]


@pytest.mark.parametrize("case", SATURATED, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("rows", [64, None], ids=["chunked", "whole"])
def test_the_streaming_backward_sums_the_top_rows_apart_too(case, rows):
    """backward_cpu.partial_backward (the CPU's without brgemm, and any device's fallback) given the forward's
    top rows, in chunks of 64 rows or one: every gradient within the tolerance of float64 autograd."""
    B, N, D, beta, similarity, off = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, N, D, generator=g, dtype=torch.float64).float()
    v = torch.randn(1, N, 7, generator=g, dtype=torch.float64).float()
    q = (x[:, torch.randint(0, N, (B,), generator=g)] + off * torch.randn(1, B, D, generator=g)).float()
    dout = torch.randn(1, B, 7, generator=g, dtype=torch.float64)
    b = torch.tensor([beta])
    p = reference.partial(q, x, b, similarity, v)
    got = backward_cpu.partial_backward(dout.float(), torch.zeros(1, B), q, x, v, b, p.out, p.lse, similarity,
                                        top=p.top_index, rows=rows)
    want = partial_grads(None, similarity, q.double(), x.double(), v.double(), b.double(), dout, torch.zeros(1, B))
    for name, gg, ww in zip(("query", "memory", "values", "beta"), got, want):
        assert rel_err(gg, ww.reshape(gg.shape)) <= GRAD_TOLERANCE[torch.float32], (name, rel_err(gg, ww))


@pytest.mark.parametrize("backend", backend_params(kernel_backends(), "saturated_grad"))
@pytest.mark.parametrize("case", SATURATED, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("own_values", [False, True], ids=["keys", "values"])
@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("banks", [1, 2])
@pytest.mark.interpreter_cross("case", "own_values", "chunks", "banks")  # the small cases' every combination
def test_saturated_softmax_gradients_match_float64(backend, case, own_values, chunks, banks):
    """Every gradient within the gradient tolerance of float64 autograd through the reference, one call
    (a float beta: the CPU's one-op path) or three chunks merged (a beta tensor with its gradient); one
    bank, or one for each of two leading indices (the CPU backward then settles the top rows in its tiles,
    else after them)."""
    B, N, D, beta, similarity, off = case
    require(backend, banks * B, N, D)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64).float()
    v = torch.randn(N, D, generator=g, dtype=torch.float64).float() if own_values else None
    q = (x[torch.randint(0, N, (B,), generator=g)] + off * torch.randn(B, D, generator=g)).float()
    dout = torch.randn(B, D, generator=g, dtype=torch.float64)
    if banks == 2:  # the second bank's rows in another order, the queries still on them
        x, v = (None if t is None else torch.stack([t, t.roll(7, 0)]) for t in (x, v))
        q, dout = torch.stack([q, q]), torch.stack([dout, torch.randn(B, D, generator=g, dtype=torch.float64)])
    dev = "cuda" if backend in ("triton", "cuda") and torch.cuda.is_available() else "cpu"

    def grads(dtype, backend_, chunks):  # chunks 0: one partial with a beta tensor
        ins = [t.to(dev, dtype).requires_grad_() for t in (q, x) + ((v,) if own_values else ())]
        qq, xx, vv = ins[0], ins[1], ins[2] if own_values else None
        if chunks == 1:
            out = hk.hopfield_update(qq, xx, beta, similarity=similarity, values=vv, backend=backend_)
        else:
            b = torch.full((banks,) if banks > 1 else (), beta, dtype=dtype, device=dev,
                           requires_grad=True)  # a beta per index
            ins.append(b)
            cut = [0, N] if chunks == 0 else [0, N // 3, N // 2, N]
            out = hk.merge_partials([hk.hopfield_partial(
                qq, xx[..., a:e, :], b, similarity=similarity, values=None if vv is None else vv[..., a:e, :],
                offset=a, backend=backend_) for a, e in zip(cut, cut[1:])]).out
        return torch.autograd.grad((out * dout.to(dev, out.dtype)).sum(), ins)

    want, got = grads(torch.float64, None, chunks), grads(torch.float32, backend, chunks)
    for name, gg, ww in zip(("query", "memory", "values") if own_values else ("query", "memory"), got, want):
        assert rel_err(gg.cpu(), ww.cpu()) <= GRAD_TOLERANCE[torch.float32], (name, rel_err(gg.cpu(), ww.cpu()))
    if chunks > 1:
        # dbeta sums dt s over the top row too, whose dt float64 itself resolves to (1 - P) / eps_64 of its
        # size: its own answer, whole against chunked, bounds what it can judge (6e-4 of it at 256 features,
        # beta 1/8, where float64 autograd was 5.7e-4 off an evaluation that sums the other rows' dt alone).
        whole = grads(torch.float64, None, 0)[-1]
        floor = max(GRAD_TOLERANCE[torch.float32], 4 * rel_err(whole.cpu(), want[-1].cpu()))
        assert rel_err(got[-1].cpu(), want[-1].cpu()) <= floor, ("beta", got[-1], want[-1], whole)
