"""hk.nn modules against a plain-PyTorch re-statement of the Hopfield layer, on every backend."""
import math

import pytest
import torch
import torch.nn.functional as F

import hen_kernels as hk
from hen_kernels import backends
from hen_kernels.bench.nn import AS_MHA
from hen_kernels.nn import association

from .conftest import SIMILARITIES, kernel_backends, make, rel_err, require


def _sim(q, k, kind):
    if kind == "dot":
        return q @ k.transpose(-1, -2)
    d = torch.cdist(q, k)
    return -d if kind == "l2" else -0.5 * d * d


def _ln(t, norm):
    return t if norm is None else F.layer_norm(t, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _proj(t, lin, heads):
    if lin is None:  # static: the pattern itself, in every head
        return t.unsqueeze(-3).expand(t.shape[:-2] + (heads,) + t.shape[-2:])
    y = F.linear(t, lin.weight, lin.bias)
    return y.reshape(y.shape[:-1] + (heads, -1)).transpose(-2, -3)


def restate(m, stored, state, proj, padding_mask=None, association_mask=None):
    """hflayers' association written out: normalise, project, iterate in query space, associate, project out.

    Inputs batch-first and batched (the shared patterns of HopfieldLayer / HopfieldPooling already expanded).
    """
    h = m.num_heads
    q = _proj(_ln(state, m.norm_state_pattern), m.q_proj, h)
    k = _proj(_ln(stored, m.norm_stored_pattern), m.k_proj, h)
    pv = _ln(proj, m.norm_pattern_projection)
    if m.pattern_projection_as_connected:  # through the stored patterns' projection, then W_v unless static
        pv = F.linear(pv, m.k_proj.weight, m.k_proj.bias)
        split = pv.reshape(pv.shape[:-1] + (h, -1)).transpose(-2, -3)
        v = split if m.v_proj is None else _proj(pv, m.v_proj, h)
    else:
        v = _proj(pv, m.v_proj, h)
    if m.norm_hopfield_space is not None:
        q, k = _ln(q, m.norm_hopfield_space), _ln(k, m.norm_hopfield_space)
    extra_k, extra_v = [], []
    if m.bias_k is not None:
        extra_k.append(m.bias_k.reshape(h, 1, -1))
        extra_v.append(m.bias_v.reshape(h, 1, -1))
    if m.add_zero_association:
        extra_k.append(torch.zeros(h, 1, k.shape[-1]))
        extra_v.append(torch.zeros(h, 1, v.shape[-1]))
    b = k.shape[0]
    k = torch.cat([k] + [e.expand(b, h, 1, -1) for e in extra_k], -2)
    v = torch.cat([v] + [e.expand(b, h, 1, -1) for e in extra_v], -2)
    pad = (0, len(extra_k))
    beta = m.scaling.reshape(1, h, 1, 1)

    def weights(state):
        t = beta * _sim(state, k, m.similarity)
        if association_mask is not None:
            am = association_mask if association_mask.dim() == 2 else association_mask.reshape(t.shape[:-1] + (-1,))
            am = F.pad(am, pad)
            t = t.masked_fill(am, -math.inf) if am.dtype == torch.bool else t + am
        if padding_mask is not None:
            t = t.masked_fill(F.pad(padding_mask, pad)[:, None, None, :], -math.inf)
        return torch.softmax(t, -1)

    limit = torch.tensor(m._steps).reshape(1, h, 1)
    eps = torch.tensor(m._eps).reshape(1, h, 1)
    frozen = torch.zeros(q.shape[:-1], dtype=torch.bool)
    for step in range(max(m._steps)):
        frozen = frozen | (step >= limit)
        new = weights(q) @ k
        moved = (new - q).abs().amax(-1)
        q = torch.where(frozen.unsqueeze(-1), q, new)
        frozen = frozen | (moved <= eps)
    out = weights(q) @ v
    out = out.transpose(-2, -3).flatten(-2)
    out = out if m.out_proj is None else F.linear(out, m.out_proj.weight, m.out_proj.bias)
    return out if m._activation is None else m._activation(out)


def _randomise(m, seed):
    """Non-trivial parameters (hflayers' init is N(0, 0.02²), which makes every softmax nearly uniform)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("scaling"):
                continue
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            else:  # biases near 0, LayerNorm gains near 1
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def _check(got, want, backend, dtype=torch.float32):
    tol = 1e-5 if backend == "torch" else 5e-5
    assert rel_err(got, want) < tol


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("heads, steps", [(1, 0), (2, 3)])
def test_hopfield_equals_restatement(backend, similarity, heads, steps):
    require(backend, 3 * heads * 5, 7, 8 * 4) if backend != "torch" else None
    m = _randomise(hk.nn.Hopfield(input_size=8, num_heads=heads, hidden_size=4, output_size=6,
                                  update_steps_max=steps, update_steps_eps=1e-6, similarity=similarity,
                                  stored_pattern_size=5, pattern_projection_size=3,
                                  scaling=torch.tensor([0.7, 1.3][:heads]), backend=backend), 1)
    stored, state, proj = make((3, 7, 5), torch.float32, 2), make((3, 5, 8), torch.float32, 3), make(
        (3, 7, 3), torch.float32, 4)
    out = m((stored, state, proj))
    assert out.shape == (3, 5, 6)
    _check(out, restate(m, stored, state, proj), backend)


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_inference_reads_per_item_head_banks_in_place(backend, similarity, monkeypatch):
    """Without gradients, per-item banks split into heads go to the kernel as views: in one call where
    the backend reads such views in place (Backend.split_banks), else one call per head (never copied
    whole); the answers and the info are those of the one call over batch x heads that runs with
    gradients, and hflayers' restatement.  (Per head only above SPLIT_HEADS_MIN_BANK_BYTES a head: 0 here.)"""
    require(backend, 4 * 3 * 5, 9, 4 * 4) if backend != "torch" else None
    monkeypatch.setattr(association, "SPLIT_HEADS_MIN_BANK_BYTES", 0)
    m = _randomise(hk.nn.Hopfield(input_size=8, num_heads=3, hidden_size=4, update_steps_max=2,
                                  update_steps_eps=1e-6, similarity=similarity,
                                  scaling=torch.tensor([0.7, 1.0, 1.3]), backend=backend), 21)
    stored, state = make((4, 9, 8), torch.float32, 22), make((4, 5, 8), torch.float32, 23)
    banks = []
    real = hk.ops.hopfield_partial

    def spy(query, memory, *args, **kwargs):
        banks.append(memory)
        return real(query, memory, *args, **kwargs)

    monkeypatch.setattr(hk.ops, "hopfield_partial", spy)
    with torch.no_grad():
        out, info = m((stored, state, stored), return_info=True)
    if backends.BACKENDS[backend].split_banks:
        assert len(banks) == 1 and banks[0].shape[:2] == (4, 3) and not banks[0].is_contiguous()
    else:
        assert len(banks) == 3 and all(b.shape[:2] == (4, 1) and not b.is_contiguous() for b in banks)
    banks.clear()
    want, want_info = m((stored, state, stored), return_info=True)
    assert len(banks) == 1 and banks[0].shape[:2] == (4, 3)
    assert rel_err(out, want.detach()) < 1e-6
    for got_f, want_f in zip(info, want_info):
        assert got_f.shape == want_f.shape == (4, 3, 5)
        assert rel_err(got_f.float(), want_f.float()) < 1e-6
    _check(out, restate(m, stored, state, stored), backend)


@pytest.mark.parametrize("bank_bytes", [0, 1 << 40], ids=["large banks", "small banks"])
def test_small_per_item_head_banks_are_copied_into_one_call(bank_bytes, monkeypatch):
    """Below SPLIT_HEADS_MIN_BANK_BYTES a head, one call over batch x heads (its copy of the banks
    costs less than a call per head); the same answers either way."""
    monkeypatch.delenv("HEN_KERNELS_BACKEND", raising=False)
    monkeypatch.setattr(association, "_copies_split_banks", lambda *a: True)  # (a backend that would copy)
    monkeypatch.setattr(association, "SPLIT_HEADS_MIN_BANK_BYTES", bank_bytes)
    m = _randomise(hk.nn.Hopfield(input_size=8, num_heads=3, hidden_size=4, scaling=torch.tensor([0.7, 1.0, 1.3])),
                   21)
    stored, state = make((4, 9, 8), torch.float32, 22), make((4, 5, 8), torch.float32, 23)
    calls = []
    for name in ("hopfield_partial", "hopfield_update"):  # (a head's one beta takes update's plain case)
        real = getattr(hk.ops, name)
        monkeypatch.setattr(hk.ops, name, lambda *a, real=real, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        out = m((stored, state, stored))
    assert len(calls) == (3 if bank_bytes == 0 else 1)
    _check(out, restate(m, stored, state, stored), "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["attention", "layer", "pooling"])
def test_one_beta_for_every_head_takes_the_updates_plain_case_with_the_same_bits(kind, dtype, monkeypatch):
    """Only the output wanted, one beta for all heads, nothing differentiating it: one hopfield_update call (its
    one-C++-call CPU case) instead of hopfield_partial; the same kernel, so the same outputs and gradients to the
    bit.  Per-head betas, a trainable one, or info wanted keep hopfield_partial."""
    require("cpu")
    monkeypatch.delenv("HEN_KERNELS_BACKEND", raising=False)
    torch.manual_seed(0)
    common = dict(input_size=16, num_heads=2, hidden_size=8)
    m = {"attention": lambda: hk.nn.Hopfield(**common), "layer": lambda: hk.nn.HopfieldLayer(quantity=40, **common),
         "pooling": lambda: hk.nn.HopfieldPooling(quantity=3, **common)}[kind]()
    m = _randomise(m, 2).to(dtype)
    inp = make((3, 20, 16), dtype, 1)

    def run(partial_only: bool):
        calls = []
        with monkeypatch.context() as mp:
            real = hk.ops.hopfield_partial
            mp.setattr(hk.ops, "hopfield_partial", lambda *a, **kw: calls.append(1) or real(*a, **kw))
            if partial_only:
                mp.setattr(backends, "plain_beta", lambda beta: None)
            m.zero_grad()
            x = inp.detach().clone().requires_grad_()
            out = m(x)
            out.float().square().sum().backward()
        grads = [x.grad] + [p.grad for p in m.parameters()]
        return calls, out.detach(), grads

    calls, out, grads = run(False)
    assert calls == []
    want_calls, want, want_grads = run(True)
    assert want_calls and torch.equal(out, want)
    assert all(torch.equal(a, b) for a, b in zip(grads, want_grads))
    assert len(run(False)[0]) == 0
    with torch.no_grad():
        m.scaling.copy_(torch.tensor([0.3, 0.4]))
    assert run(False)[0]  # a beta per head: hopfield_partial


def test_a_float32_state_meets_bfloat16_patterns_under_autocast_as_without_the_plain_case(monkeypatch):
    """Static float32 state patterns against patterns projected to bfloat16 by autocast: the association's
    output keeps the state's dtype (hopfield_update would answer in the autocast dtype)."""
    m = hk.nn.Hopfield(input_size=16, num_heads=2, hidden_size=16, state_pattern_as_static=True,
                       disable_out_projection=True).eval()
    x = make((3, 20, 16), torch.float32, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
        monkeypatch.setattr(backends, "plain_beta", lambda beta: None)
        want = m(x)
    assert out.dtype == want.dtype == torch.float32 and torch.equal(out, want)


def test_a_trainable_beta_keeps_its_gradient():
    m = hk.nn.Hopfield(input_size=16, num_heads=2, hidden_size=8, trainable_scaling=True)
    m(make((3, 20, 16), torch.float32, 1)).square().sum().backward()
    assert m.scaling.grad is not None and m.scaling.grad.abs().sum() > 0


@pytest.mark.parametrize("scaling", [None, 0.1])
def test_a_float64_module_holds_its_configured_beta_exactly(scaling):
    """Made float32, then .double(): beta is the configured value in float64, not float32's rounding of it
    (which put a float64 layer 1.7e-7 off nn.MultiheadAttention); a beta set since keeps what it holds."""
    m = hk.nn.Hopfield(input_size=16, num_heads=2, scaling=scaling).double()
    want = 1 / math.sqrt(8) if scaling is None else scaling
    assert m.scaling.dtype == torch.float64 and m.scaling.tolist() == [want, want]
    pooling = hk.nn.HopfieldPooling(input_size=16, num_heads=2, scaling=0.1).double()
    assert pooling.hopfield.scaling.tolist() == [0.1] * 2
    m = hk.nn.Hopfield(input_size=16, num_heads=2)
    with torch.no_grad():
        m.scaling.fill_(0.3)
    assert m.double().scaling.tolist() == [torch.tensor(0.3).item()] * 2  # float32's 0.3, as set


@pytest.mark.parametrize("hook", ["backward", "backward_pre", "global_backward"])
def test_a_backward_hook_on_a_projection_sees_its_own_call(hook):
    """Self-association packs the three projections into one product only where no hook would miss its
    module's call: backward hooks were not looked at, so they never fired."""
    m = hk.nn.Hopfield(input_size=16, num_heads=2, **AS_MHA)
    fired = []
    if hook == "global_backward":
        handle = torch.nn.modules.module.register_module_full_backward_hook(
            lambda mod, gin, gout: fired.append(mod) if mod is m.k_proj else None)
    else:
        register = getattr(m.k_proj, f"register_full_{hook}_hook")
        handle = register(lambda mod, *grads: fired.append(mod))
    try:
        m(make((2, 5, 16), torch.float32, 1).requires_grad_()).sum().backward()
    finally:
        handle.remove()
    assert fired == [m.k_proj]


@pytest.mark.parametrize("static", ["stored", "state", "projection", "all"])
def test_static_patterns_skip_their_projection(static):
    kw = dict(stored_pattern_as_static=static in ("stored", "all"), state_pattern_as_static=static in ("state", "all"),
              pattern_projection_as_static=static in ("projection", "all"))
    if static == "all":
        kw.update(disable_out_projection=True, normalize_stored_pattern=False, normalize_stored_pattern_affine=False,
                  normalize_state_pattern=False, normalize_state_pattern_affine=False,
                  normalize_pattern_projection=False, normalize_pattern_projection_affine=False)
    m = _randomise(hk.nn.Hopfield(input_size=8, hidden_size=4, num_heads=2, similarity="l2sq", **kw), 5)
    assert (m.k_proj is None) == kw["stored_pattern_as_static"] and (m.q_proj is None) == kw["state_pattern_as_static"]
    stored = make((2, 6, 4 if kw["stored_pattern_as_static"] else 8), torch.float32, 6)
    state = make((2, 3, 4 if kw["state_pattern_as_static"] else 8), torch.float32, 7)
    proj = make((2, 6, 4 if kw["pattern_projection_as_static"] else 8), torch.float32, 8)
    _check(m((stored, state, proj)), restate(m, stored, state, proj), "cpu")


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
@pytest.mark.parametrize("separated", [False, True])
def test_hopfield_layer_equals_restatement(backend, separated):
    require(backend, 2 * 2 * 4, 9, 4 * 8) if backend != "torch" else None
    m = _randomise(hk.nn.HopfieldLayer(input_size=8, hidden_size=4, num_heads=2, quantity=9, similarity="l2",
                                       lookup_weights_as_separated=separated, update_steps_max=1,
                                       backend=backend), 9)
    x = make((2, 4, 8), torch.float32, 10)
    stored = m.lookup_weights.expand(2, 9, 8)
    proj = stored if m.target_weights is None else m.target_weights.expand(2, 9, 8)
    _check(m(x), restate(m.hopfield, stored, x, proj), backend)


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
def test_hopfield_pooling_equals_restatement(backend):
    require(backend, 3 * 2 * 2, 11, 4 * 8) if backend != "torch" else None
    m = _randomise(hk.nn.HopfieldPooling(input_size=8, hidden_size=4, num_heads=2, quantity=2, output_size=5,
                                         backend=backend), 11)
    bags = make((3, 11, 8), torch.float32, 12)
    out = m(bags)
    assert out.shape == (3, 2 * 5)
    want = restate(m.hopfield, bags, m.pooling_weights.expand(3, 2, 8), bags)
    _check(out, want.flatten(1), backend)


def test_masks_equal_restatement_and_hide_padded_patterns():
    m = _randomise(hk.nn.Hopfield(input_size=8, num_heads=2, update_steps_max=2, backend="cpu"), 13)
    x = make((2, 5, 8), torch.float32, 14)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    assoc2 = torch.rand(5, 5, generator=torch.Generator().manual_seed(1)) < 0.3
    assoc2.fill_diagonal_(False)
    assoc3 = torch.randn(2 * 2, 5, 5) * 0.5
    for kw, want_kw in [(dict(stored_pattern_padding_mask=pad), dict(padding_mask=pad)),
                        (dict(association_mask=assoc2), dict(association_mask=assoc2)),
                        (dict(association_mask=assoc3, stored_pattern_padding_mask=pad),
                         dict(association_mask=assoc3, padding_mask=pad))]:
        _check(m(x, **kw), restate(m, x, x, x, **want_kw), "cpu")
    # Padded stored patterns have no influence, whatever they hold.
    stored = x.clone()
    stored[1, 3:] = 100.0
    a = m((x, x, x), stored_pattern_padding_mask=pad)
    b = m((stored, x, stored), stored_pattern_padding_mask=pad)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="association_mask"):
        m(x, association_mask=torch.zeros(4, 4, dtype=torch.bool))


@pytest.mark.parametrize("backend", kernel_backends())
def test_module_gradients_fused_equal_reference(backend):
    require(backend, 2 * 2 * 6, 6, 8 * 8)
    grads = {}
    for b in ("torch", backend):
        torch.manual_seed(0)
        m = _randomise(hk.nn.Hopfield(input_size=8, num_heads=2, update_steps_max=2, similarity="l2",
                                      trainable_scaling=True, backend=b), 15)
        x = make((2, 6, 8), torch.float32, 16)
        m(x).square().sum().backward()
        grads[b] = {n: p.grad.clone() for n, p in m.named_parameters()}
    assert "scaling" in grads[backend] and grads[backend]["scaling"].abs().sum() > 0
    for name, g in grads["torch"].items():
        assert rel_err(grads[backend][name], g) < 1e-4, name


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_self_association_packs_the_projections_and_honours_their_hooks(batch_first, bias):
    """One input for all three roles, without pattern norms: q, k and v come from one product of
    the stacked weights (Hopfield._packable).  It must equal the re-statement, in values and
    gradients, and step aside for a projection that is hooked or replaced (a LoRA-style
    subclass): those must see their own call."""
    kw = dict(input_size=8, num_heads=2, hidden_size=4, pattern_size=3, input_bias=bias, batch_first=batch_first,
              **AS_MHA)
    m = _randomise(hk.nn.Hopfield(**kw), 31)
    assert m._packable()
    x = make((3, 5, 8), torch.float32, 32).requires_grad_()
    layout = (lambda t: t) if batch_first else (lambda t: t.transpose(0, 1))
    out = layout(m(layout(x)))
    want = restate(m, x, x, x)
    _check(out, want, "torch")
    g_out = torch.autograd.grad(out.square().sum(), [x] + list(m.parameters()))
    g_want = torch.autograd.grad(want.square().sum(), [x] + list(m.parameters()))
    for g, r in zip(g_out, g_want):  # (k's bias has a zero gradient: softmax ignores a shift of all scores)
        assert (g - r).abs().max() <= 1e-5 * max(float(r.abs().max()), 1.0)

    shift = m.v_proj.register_forward_hook(lambda mod, inp, y: y + 1.0)  # a hook that changes v
    assert not m._packable()
    hooked = layout(m(layout(x)))
    shift.remove()

    class Adapter(torch.nn.Linear):  # a subclass with its own forward, as LoRA wrappers are
        def forward(self, t):
            return super().forward(t) + 1.0

    adapted = hk.nn.Hopfield(**kw)
    adapted.load_state_dict(m.state_dict())
    adapted.v_proj = Adapter(8, 6, bias=bias)
    adapted.v_proj.load_state_dict(m.v_proj.state_dict())
    assert not adapted._packable()
    for got in (hooked, layout(adapted(layout(x)))):
        assert rel_err(got, out) > 1e-2  # the shifted v reached the answer
        _check(got, hooked, "torch")


def _fast_answers(monkeypatch):
    """Records, per call of backends.fast_self_association, whether it answered (a tensor) or declined (None)."""
    answered = []
    real = backends.fast_self_association

    def spy(*a, **kw):
        out = real(*a, **kw)
        answered.append(out is not None)
        return out

    monkeypatch.setattr(backends, "fast_self_association", spy)
    return answered


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("shape", ["batch_first", "seq_first", "no_out_projection", "no_bias_one_head_tanh",
                                   "one_value_a_head_seq_first", "hflayers_norms", "one_norm_seq_first"])
def test_inference_of_one_input_is_one_call_with_the_general_paths_bits(shape, similarity, dtype, monkeypatch):
    """A forward of one tensor with nothing to differentiate (nn.MultiheadAttention's inference fast path's case,
    and hflayers' with its pattern norms) runs as one C++ call (binding.cpp self_association_cpu): the general
    path's torch calls in its order, so its output to the bit, and the re-statement's in float32."""
    require("cpu")
    monkeypatch.delenv("HEN_KERNELS_BACKEND", raising=False)
    kw = dict(input_size=12, num_heads=3, hidden_size=5, pattern_size=3, similarity=similarity, **AS_MHA)
    kw.update({"batch_first": {}, "seq_first": dict(batch_first=False),
               "no_out_projection": dict(disable_out_projection=True),
               "no_bias_one_head_tanh": dict(input_bias=False, num_heads=1, association_activation="tanh"),
               # (the heads' rows merge without a copy: the out projection reads them strided, to other 16-bit bits)
               "one_value_a_head_seq_first": dict(pattern_size=1, batch_first=False),
               "hflayers_norms": {k: True for k in AS_MHA},  # hflayers' defaults: each role's LayerNorm, affine
               "one_norm_seq_first": dict(normalize_state_pattern=True, batch_first=False)}[shape])
    m = _randomise(hk.nn.Hopfield(**kw), 41).to(dtype).eval()
    x = make((3, 21, 12), dtype, 42)  # 21 tokens: no multiple of a row tile
    layout = (lambda t: t.transpose(0, 1)) if shape.endswith("seq_first") else (lambda t: t)
    answered = _fast_answers(monkeypatch)
    with torch.no_grad():
        out = layout(m(layout(x)))
        assert answered == [True]
        monkeypatch.setattr(backends, "_SELF_ASSOCIATION_OP", None)  # (the general path)
        want = layout(m(layout(x)))
    assert answered == [True, False] and out.dtype == dtype and torch.equal(out, want)
    if dtype == torch.float32:
        _check(out, restate(m, x, x, x), "torch")


def test_inference_in_one_call_steps_aside_for_what_it_does_not_do(monkeypatch):
    """Gradients to record, hooks (on a projection, a pattern norm or the out projection), a forward replaced on
    an instance, update steps, bias and zero patterns, a norm in Hopfield space, dropout in training, masks and
    info: the general path answers (it alone records, calls hooks, applies the rest); pattern norms themselves
    and a trainable beta under no_grad take the one call."""
    require("cpu")
    monkeypatch.delenv("HEN_KERNELS_BACKEND", raising=False)
    kw = dict(input_size=8, num_heads=2, **AS_MHA)
    x = make((2, 6, 8), torch.float32, 43)
    answered = _fast_answers(monkeypatch)

    def fast(m, *args, **kwargs):
        answered.clear()
        m(*args, **kwargs)
        return any(answered)

    m = _randomise(hk.nn.Hopfield(**kw), 44).eval()
    with torch.no_grad():
        assert fast(m, x)
        assert not fast(m, x, return_info=True)
        assert not fast(m, x, stored_pattern_padding_mask=torch.zeros(2, 6, dtype=torch.bool))
        assert not fast(m, x, association_mask=torch.zeros(6, 6, dtype=torch.bool))
    assert not fast(m, x)  # the parameters require grad and grad mode is on: a graph to record
    assert not fast(m, x.requires_grad_())
    fired = []
    handle = m.out_proj.register_forward_hook(lambda mod, inp, out: fired.append(mod))
    with torch.no_grad():
        assert not fast(m, x) and fired == [m.out_proj]
    handle.remove()
    for name in ("q_proj", "out_proj"):  # a forward replaced on the instance, as accelerate's hooks do
        lin = getattr(m, name)
        lin.forward = lambda t, lin=lin: torch.nn.Linear.forward(lin, t) * 2.0
        with torch.no_grad():
            assert not fast(m, x)
            doubled = m(x)
        del lin.forward
        with torch.no_grad():
            assert fast(m, x) and rel_err(doubled, m(x)) > 1e-2, name  # the replaced forward reached the answer
    for other in (dict(trainable_scaling=True), dict(update_steps_max=2), dict(concat_bias_pattern=True),
                  dict(add_zero_association=True), dict(normalize_hopfield_space=True)):
        m = _randomise(hk.nn.Hopfield(**{**kw, **other}), 45).eval()
        with torch.no_grad():
            assert fast(m, x) == ("trainable_scaling" in other), other  # (no_grad: a trainable beta is plain)
    m = _randomise(hk.nn.Hopfield(input_size=8, num_heads=2), 46).eval()  # hflayers' default pattern norms
    with torch.no_grad():
        assert fast(m, x)
        handle = m.norm_stored_pattern.register_forward_pre_hook(lambda mod, inp: fired.append(mod))
        assert not fast(m, x) and fired[-1] is m.norm_stored_pattern
        handle.remove()
        m.norm_pattern_projection = torch.nn.LayerNorm(8, elementwise_affine=False, bias=False)
        assert fast(m, x)
        m.norm_pattern_projection = torch.nn.LayerNorm(4)  # another width: the general path raises, as before
        with pytest.raises(RuntimeError):
            fast(m, x)
    m = _randomise(hk.nn.Hopfield(dropout=0.5, **kw), 47)
    with torch.no_grad():
        assert not fast(m, x)  # training mode with dropout to apply
        assert fast(m.eval(), x)
        w, b = m.q_proj.weight, m.q_proj.bias
        with pytest.raises(RuntimeError, match="an out_bias needs its out_weight"):
            torch.ops.hen_kernels.self_association(x, [w, w, w], [b, b, b], [None] * 3, [None] * 3, [-1.0] * 3,
                                                   True, None, b, 2, 0.5, 0, 16)


def test_batch_first_false_is_a_transpose():
    a = _randomise(hk.nn.Hopfield(input_size=8, num_heads=2), 17)
    b = hk.nn.Hopfield(input_size=8, num_heads=2, batch_first=False)
    b.load_state_dict(a.state_dict())
    x = make((3, 5, 8), torch.float32, 18)
    torch.testing.assert_close(b(x.transpose(0, 1)).transpose(0, 1), a(x))
    # hflayers' layout of the learned set: (1, quantity, D) batch-first, (quantity, 1, D) otherwise.
    pa = _randomise(hk.nn.HopfieldPooling(input_size=8, quantity=2), 19)
    pb = hk.nn.HopfieldPooling(input_size=8, quantity=2, batch_first=False)
    assert pa.pooling_weights.shape == (1, 2, 8) and pb.pooling_weights.shape == (2, 1, 8)
    sd = pa.state_dict()
    sd["pooling_weights"] = sd["pooling_weights"].transpose(0, 1)
    pb.load_state_dict(sd)
    torch.testing.assert_close(pb(x.transpose(0, 1)), pa(x))


def test_info_association_matrix_and_dropout():
    m = _randomise(hk.nn.Hopfield(input_size=8, num_heads=2, dropout=0.5, backend="cpu"), 19)
    x = make((2, 5, 8), torch.float32, 20)
    m.eval()
    out, info = m(x, return_info=True)
    a = m.get_association_matrix(x)
    assert a.shape == (2, 2, 5, 5)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, 5))
    torch.testing.assert_close(info.top_weight, a.amax(-1), rtol=1e-5, atol=1e-6)
    assert torch.equal(info.top_index, a.argmax(-1))
    assert info.energy.shape == (2, 2, 5) and torch.isfinite(info.energy).all()
    assert m.get_projected_pattern_matrix(x).shape == (2, 2, 5, 4)
    m.train()  # dropout on the association matrix: the dense path, now random
    torch.manual_seed(0)
    assert not torch.allclose(m(x), out)


@pytest.mark.parametrize("similarity", ["dot", "l2sq"])
def test_network_recalls_and_lowers_energy(similarity):
    patterns = make((12, 16), torch.float32, 21)
    net = hk.nn.HopfieldNetwork(patterns, 8.0 if similarity == "l2sq" else 2.0, similarity=similarity,
                                update_steps_max=20, update_steps_eps=1e-5)
    noisy = patterns[:4] + 0.1 * make((4, 16), torch.float32, 22)
    state, r, e = net(noisy, return_info=True)
    assert torch.equal(r.top_index, torch.arange(4))
    assert (e <= net.energy(noisy) + 1e-5).all()
    assert rel_err(state, patterns[:4]) < 1e-2
    net.store(make((3, 16), torch.float32, 23))
    assert net.stored_patterns.shape == (15, 16)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="similarity"):
        hk.nn.Hopfield(input_size=8, similarity="cosine")
    with pytest.raises(ValueError, match="input_size"):
        hk.nn.Hopfield(input_size=9, num_heads=2)
    with pytest.raises(ValueError, match="scaling"):
        hk.nn.Hopfield(input_size=8, num_heads=2, scaling=torch.ones(3))
    with pytest.raises(ValueError, match="normalize_state_pattern_affine"):
        hk.nn.Hopfield(input_size=8, normalize_state_pattern=False)


def test_bench_nn_marks_a_wrong_fused_row_and_exits_1(tmp_path, monkeypatch):
    """bench nn had compared the fused gradients with the dense ones only, and the forward output with
    nothing: a fused layer off in its output alone, however far, timed like any other."""
    from hen_kernels.bench import nn as bench_nn

    case = bench_nn.cases(True, torch.device("cpu"))[0]  # the functional update
    right = bench_nn.run_case(case, torch.device("cpu"), 1, torch.float32, 0.0)
    assert right["check_ok"]
    update = hk.hopfield_update
    monkeypatch.setattr(bench_nn.ops, "hopfield_update",
                        lambda *a, **k: update(*a, **k) * (1.001 if k.get("backend") != "torch" else 1.0))
    wrong = bench_nn.run_case(case, torch.device("cpu"), 1, torch.float32, 0.0)
    assert not wrong["check_ok"] and 9e-4 < wrong["errors"]["fused"]["out"] < 1.1e-3
    assert bench_nn.error_cell(wrong, "fused").endswith("(WRONG)")
    assert wrong["errors"]["dense"]["out"] < 1e-5  # the dense peer, right, is not blamed
    monkeypatch.setattr(bench_nn, "run", lambda *a, **k: {"rows": [wrong]})
    assert bench_nn.main(["--quick", "--out", str(tmp_path)]) == 1


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_bench_nn_quick_writes_the_table(tmp_path, dtype):
    from hen_kernels.bench import nn as bench_nn

    report = bench_nn.run(out=str(tmp_path), quick=True, repeats=1, device="cpu", dtype=dtype)
    assert report["dtype"] == (dtype or "float32")
    assert [r["name"] for r in report["rows"]] == [c.name for c in bench_nn.cases(True, torch.device("cpu"))]
    md = (tmp_path / "nn.md").read_text()
    assert "fwd+bwd vs dense" in md and "fwd+bwd vs sdpa" in md and all(r["name"] in md for r in report["rows"])
    for r in report["rows"]:
        assert r["fwd_fused_ms"] > 0 and r["fwd+bwd_dense_ms"] > 0
        # Every call's output and gradients against float64 before timing (an error of exactly 0 would be a
        # check against itself): the fused ones right, the dense peer computing what the kernel does.
        assert r["check_ok"], (r["name"], r["errors"])
        for who, e in r["errors"].items():
            assert 0 < e["out"] <= (1e-5 if dtype is None else 2e-2), (r["name"], who, e)
            assert 0 < e["grads"], (r["name"], who, e)
            if dtype is None:
                assert e["grads"] <= 1e-5, (r["name"], who, e)
        # SDPA computes the dot-product update, MultiheadAttention the attention case (the same weights).
        if r["kind"] == "attention" or (r["kind"] == "update" and r["similarity"] == "dot"):
            assert r["fwd+bwd_sdpa_ms"] > 0 and r["fwd+bwd_vs_sdpa"] > 0
            assert r["errors"]["sdpa"]["grads"] <= (1e-5 if dtype is None else 2e-2)
        else:
            assert "sdpa" not in r["errors"] and r["fwd+bwd_vs_sdpa"] is None
