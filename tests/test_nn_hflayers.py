"""hk.nn as a drop-in for hflayers: every constructor argument, its properties, and its trained state dicts.

The reference for the converter is hflayers' forward written out here in plain
PyTorch from its documented math (packed or separate input projections stacked
q, k, v; LayerNorm of the inputs and in Hopfield space; beta on the query;
masks; update steps; a zero pattern; out projection and activation), applied to
a state dict with hflayers' key names and shapes.  hflayers itself is not used.
"""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import hen_kernels as hk

from .conftest import kernel_backends, make, rel_err, require
from .test_nn import _check, _randomise, restate

C = "association_core."

# hflayers.Hopfield's constructor arguments and defaults (its documented signature).
HFLAYERS_HOPFIELD = dict(
    input_size=None, hidden_size=None, output_size=None, pattern_size=None, num_heads=1, scaling=None,
    update_steps_max=0, update_steps_eps=1e-4, normalize_stored_pattern=True, normalize_stored_pattern_affine=True,
    normalize_stored_pattern_eps=1e-5, normalize_state_pattern=True, normalize_state_pattern_affine=True,
    normalize_state_pattern_eps=1e-5, normalize_pattern_projection=True, normalize_pattern_projection_affine=True,
    normalize_pattern_projection_eps=1e-5, normalize_hopfield_space=False, normalize_hopfield_space_affine=False,
    normalize_hopfield_space_eps=1e-5, stored_pattern_as_static=False, state_pattern_as_static=False,
    pattern_projection_as_static=False, pattern_projection_as_connected=False, stored_pattern_size=None,
    pattern_projection_size=None, batch_first=True, association_activation=None, dropout=0.0, input_bias=True,
    concat_bias_pattern=False, add_zero_association=False, disable_out_projection=False)


def test_every_hflayers_argument_is_accepted_at_its_default():
    params = inspect.signature(hk.nn.Hopfield).parameters
    for name, default in HFLAYERS_HOPFIELD.items():
        assert name in params, name
        assert params[name].default == default, name
    hk.nn.Hopfield(**dict(HFLAYERS_HOPFIELD, input_size=8))
    wrapper_only = dict(lookup_weights_as_separated=False, lookup_targets_as_trainable=True, quantity=1, trainable=True)
    common = {k: v for k, v in HFLAYERS_HOPFIELD.items() if not k.endswith("_eps") or k == "update_steps_eps"}
    hk.nn.HopfieldLayer(**dict(common, input_size=8, **wrapper_only))
    hk.nn.HopfieldPooling(**dict(common, input_size=8, quantity=1, trainable=True))


@pytest.mark.parametrize("cls", [hk.nn.Hopfield, hk.nn.HopfieldLayer, hk.nn.HopfieldPooling])
def test_hflayers_properties_exist_on_every_module(cls):
    m = cls(input_size=12, num_heads=3, output_size=5, **({} if cls is hk.nn.Hopfield else {"quantity": 2}))
    assert m.output_size == 5 and m.input_size == 12 and m.hidden_size == 4 and m.pattern_size == 4
    for name in ("batch_first", "scaling", "stored_pattern_dim", "state_pattern_dim", "pattern_projection_dim",
                 "update_steps_max", "update_steps_eps", "stored_pattern_as_static", "state_pattern_as_static",
                 "pattern_projection_as_static", "normalize_stored_pattern", "normalize_stored_pattern_affine",
                 "normalize_state_pattern", "normalize_state_pattern_affine", "normalize_pattern_projection",
                 "normalize_pattern_projection_affine", "normalize_hopfield_space", "get_association_matrix",
                 "get_projected_pattern_matrix"):
        assert hasattr(m, name), name
    assert hk.nn.Hopfield(input_size=8, num_heads=2, disable_out_projection=True, pattern_size=3).output_size == 6


def test_projected_pattern_matrix_on_every_module():
    x = make((2, 5, 8), torch.float32, 1)
    assert hk.nn.Hopfield(input_size=8, num_heads=2).get_projected_pattern_matrix(x).shape == (2, 2, 5, 4)
    layer = hk.nn.HopfieldLayer(input_size=8, num_heads=2, quantity=7, add_zero_association=True)
    assert layer.get_projected_pattern_matrix(x).shape == (2, 2, 8, 4)
    assert layer.get_association_matrix(x).shape == (2, 2, 5, 8)
    assert hk.nn.HopfieldPooling(input_size=8, pattern_size=3).get_projected_pattern_matrix(x).shape == (2, 1, 5, 3)


def test_lookup_weights_take_hflayers_layout_as_its_examples_write_them():
    """hflayers' latch example fills the lookup table with the training samples: ``w[:] = samples.unsqueeze(0)``."""
    samples = make((6, 8), torch.float32, 2)
    layer = hk.nn.HopfieldLayer(input_size=8, quantity=6, lookup_weights_as_separated=True,
                                lookup_targets_as_trainable=False)
    with torch.no_grad():
        layer.lookup_weights[:] = samples.unsqueeze(dim=0)
    assert torch.equal(layer.lookup_weights[0], samples) and not layer.target_weights.requires_grad
    net = torch.nn.Sequential(layer, torch.nn.Flatten(start_dim=1), torch.nn.Linear(layer.output_size * 4, 1))
    assert net(make((3, 4, 8), torch.float32, 3)).shape == (3, 1)


OPTIONS = {
    "hopfield_space": dict(normalize_hopfield_space=True, normalize_hopfield_space_affine=True,
                           normalize_hopfield_space_eps=1e-3),
    "connected": dict(pattern_projection_as_connected=True, pattern_size=3),
    "connected_static": dict(pattern_projection_as_connected=True, pattern_projection_as_static=True,
                             normalize_pattern_projection=False, normalize_pattern_projection_affine=False),
    "bias_and_zero": dict(concat_bias_pattern=True, add_zero_association=True),
    "activation": dict(association_activation="tanh", input_bias=False),
    "steps_per_head": dict(update_steps_max=torch.tensor([0, 3]), update_steps_eps=torch.tensor([1e-6, 1e-2])),
}


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
@pytest.mark.parametrize("option", list(OPTIONS))
def test_hflayers_options_equal_restatement(backend, option):
    """The options hflayers has beyond the common ones, fused and dense (with a padding mask)."""
    require(backend, 2 * 2 * 5, 7, 4 * 8) if backend != "torch" else None
    kw = dict(input_size=8, hidden_size=4, num_heads=2, similarity="l2sq", backend=backend)
    kw.update(OPTIONS[option])
    m = _randomise(hk.nn.Hopfield(**kw), 4)
    x, state = make((2, 7, 8), torch.float32, 5), make((2, 5, 8), torch.float32, 6)
    proj = make((2, 7, 8), torch.float32, 7)
    _check(m((x, state, proj)), restate(m, x, state, proj), backend)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 4:] = True
    _check(m((x, state, proj), stored_pattern_padding_mask=pad), restate(m, x, state, proj, padding_mask=pad),
           backend)


def test_steps_per_head_run_their_own_number_of_updates():
    m = hk.nn.Hopfield(input_size=8, num_heads=2, update_steps_max=torch.tensor([0, 3]), update_steps_eps=0.0)
    _, info = m(make((2, 5, 8), torch.float32, 8), return_info=True)
    assert (info.steps[:, 0] == 1).all() and (info.steps[:, 1] == 4).all()
    assert torch.equal(m.update_steps_max, torch.tensor([0, 3]))
    unbounded = hk.nn.Hopfield(input_size=8, update_steps_max=-1)  # hflayers: negative = until eps
    assert unbounded._steps == (1000,)


# --- hflayers state dicts: shapes, a plain-PyTorch forward, the converter --------------------------------


def _sizes(cfg):
    e, h = cfg.get("input_size"), cfg.get("num_heads", 1)
    hd = cfg.get("hidden_size") or e // h
    pd = cfg.get("pattern_size") or hd
    kdim, vdim = cfg.get("stored_pattern_size") or e, cfg.get("pattern_projection_size") or e
    statics = [cfg.get(f"{n}_as_static", False) for n in ("state_pattern", "stored_pattern", "pattern_projection")]
    return e, h, hd, pd, kdim, vdim, statics


def hflayers_state_dict(cfg, seed, prefix=""):
    """Random tensors with the keys and shapes hflayers gives a Hopfield module built with ``cfg``."""
    e, h, hd, pd, kdim, vdim, (qs, ks, vs) = _sizes(cfg)
    big, pat = h * hd, h * pd
    connected = cfg.get("pattern_projection_as_connected", False)
    shapes = {}
    if kdim == e and vdim == e and cfg.get("pattern_size") is None and not connected:
        if not (qs and ks and vs):
            shapes[C + "in_proj_weight"] = ((not qs) * big + (not ks) * big + (not vs) * pat, e)
    else:
        shapes.update({C + "q_proj_weight": (big, e)} if not qs else {})
        shapes.update({C + "k_proj_weight": (big, kdim)} if not ks else {})
        shapes.update({C + "v_proj_weight": (pat, big if connected and not ks else vdim)} if not vs else {})
    bias = cfg.get("input_bias", True)
    if bias and not (qs and ks and vs):
        shapes[C + "in_proj_bias"] = ((not qs) * big + (not ks) * big + pat,)
    if not cfg.get("disable_out_projection", False):
        out = cfg.get("output_size") or e
        shapes[C + "out_proj.weight"] = (out, pat)
        shapes.update({C + "out_proj.bias": (out,)} if bias else {})
    if cfg.get("concat_bias_pattern", False):
        shapes.update({C + "bias_k": (1, 1, big), C + "bias_v": (1, 1, big)})
    if cfg.get("normalize_hopfield_space_affine", False):
        shapes.update({C + "p_norm_weight": (hd,), C + "p_norm_bias": (hd,)})
    for name, width in (("stored_pattern", kdim), ("state_pattern", e), ("pattern_projection", vdim)):
        if cfg.get(f"normalize_{name}_affine", True):
            shapes.update({f"norm_{name}.weight": (width,), f"norm_{name}.bias": (width,)})
    g = torch.Generator().manual_seed(seed)
    sd = {prefix + k: torch.randn(s, generator=g) * (0.1 if k.endswith(("bias", "bias_k", "bias_v")) else 0.4)
          for k, s in shapes.items()}
    for k in sd:
        if k.endswith(".weight") and "norm" in k:
            sd[k] = 1 + sd[k] * 0.2
    return sd


def hflayers_forward(sd, cfg, stored, state, proj, padding_mask=None, association_mask=None):
    """hflayers' Hopfield forward from its documented math, on its state dict; inputs and output batch-first."""
    e, h, hd, pd, kdim, vdim, (qs, ks, vs) = _sizes(cfg)
    big = h * hd

    def ln(t, name):
        if not cfg.get(f"normalize_{name}", True):
            return t
        return F.layer_norm(t, (t.shape[-1],), sd.get(f"norm_{name}.weight"), sd.get(f"norm_{name}.bias"), 1e-5)

    stored, state, proj = ln(stored, "stored_pattern"), ln(state, "state_pattern"), ln(proj, "pattern_projection")
    rows = {"q": 0 if qs else big, "k": 0 if ks else big, "v": 0 if vs else h * pd}
    w, b, start = {}, {}, 0
    for n in "qkv":
        if C + "in_proj_weight" in sd:
            w[n] = sd[C + "in_proj_weight"][start:start + rows[n]]
        elif rows[n]:
            w[n] = sd[C + f"{n}_proj_weight"]
        if C + "in_proj_bias" in sd:  # the value part is always there
            b[n] = sd[C + "in_proj_bias"][start:start + (rows[n] or (h * pd if n == "v" else 0))]
        start += rows[n]
    q = state if qs else F.linear(state, w["q"], b.get("q"))
    k = stored if ks else F.linear(stored, w["k"], b.get("k"))
    v = proj
    if cfg.get("pattern_projection_as_connected", False) and not ks:
        v = F.linear(v, w["k"], b.get("k"))
    if not vs:
        v = F.linear(v, w["v"], b.get("v"))

    def heads(t, static):
        t = t.unsqueeze(2).expand(-1, -1, h, -1) if static else t.reshape(t.shape[:2] + (h, -1))
        return t.transpose(1, 2)  # (batch, heads, S, d)

    q, k, v = heads(q, qs), heads(k, ks), heads(v, vs and not cfg.get("pattern_projection_as_connected", False))
    if cfg.get("normalize_hopfield_space", False):
        q = F.layer_norm(q, (hd,), sd.get(C + "p_norm_weight"), sd.get(C + "p_norm_bias"), 1e-5)
        k = F.layer_norm(k, (hd,), sd.get(C + "p_norm_weight"), sd.get(C + "p_norm_bias"), 1e-5)
    if cfg.get("add_zero_association", False):
        k, v = (torch.cat([t, t.new_zeros(t.shape[:2] + (1, t.shape[-1]))], 2) for t in (k, v))
        padding_mask = None if padding_mask is None else F.pad(padding_mask, (0, 1))
        association_mask = None if association_mask is None else F.pad(association_mask, (0, 1))
    beta = cfg.get("scaling") or 1 / math.sqrt(hd)

    def softmax(q):
        t = (q * beta) @ k.transpose(-1, -2)
        if association_mask is not None:
            am = association_mask.reshape(t.shape) if association_mask.dim() == 3 else association_mask
            t = t.masked_fill(am, -math.inf) if am.dtype == torch.bool else t + am
        if padding_mask is not None:
            t = t.masked_fill(padding_mask[:, None, None, :], -math.inf)
        return torch.softmax(t, -1)

    for _ in range(cfg.get("update_steps_max", 0)):
        q = softmax(q) @ k
    out = (softmax(q) @ v).transpose(1, 2).flatten(2)
    if not cfg.get("disable_out_projection", False):
        out = F.linear(out, sd[C + "out_proj.weight"], sd.get(C + "out_proj.bias"))
    act = cfg.get("association_activation")
    return out if act is None else getattr(torch, act)(out)


CONFIGS = {
    "packed": dict(input_size=8, num_heads=2),
    "separate_steps": dict(input_size=8, hidden_size=4, num_heads=2, pattern_size=3, stored_pattern_size=5,
                           pattern_projection_size=6, output_size=7, update_steps_max=2, update_steps_eps=1e-12),
    "connected_hopfield_space": dict(input_size=8, num_heads=2, pattern_projection_as_connected=True,
                                     normalize_hopfield_space=True, normalize_hopfield_space_affine=True),
    "no_bias_zero_tanh": dict(input_size=8, num_heads=2, input_bias=False, add_zero_association=True,
                              association_activation="tanh", disable_out_projection=True,
                              normalize_state_pattern_affine=False),
    "static_state": dict(input_size=8, state_pattern_as_static=True, scaling=0.7),
    "unused_bias_pattern": dict(input_size=8, num_heads=2, concat_bias_pattern=True),
}


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_converted_hopfield_gives_hflayers_outputs(name, backend):
    require(backend) if backend != "torch" else None
    cfg = CONFIGS[name]
    sd = hflayers_state_dict(cfg, seed=11)
    kw = {k: v for k, v in cfg.items() if k != "concat_bias_pattern"}  # hflayers never appends its bias pattern
    m = hk.nn.load_hflayers_state_dict(hk.nn.Hopfield(backend=backend, **kw), sd)
    e, _, hd, _, kdim, vdim, (qs, ks, vs) = _sizes(cfg)
    stored = make((3, 6, hd if ks else kdim), torch.float32, 12)
    state = make((3, 4, hd if qs else e), torch.float32, 13)
    proj = make((3, 6, vdim), torch.float32, 14)
    want = hflayers_forward(sd, cfg, stored, state, proj)
    assert rel_err(m((stored, state, proj)), want) < 1e-5
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[0, 3:] = True
    am = torch.randn(3 * m.num_heads, 4, 6, generator=torch.Generator().manual_seed(1))
    got = m((stored, state, proj), stored_pattern_padding_mask=pad, association_mask=am)
    assert rel_err(got, hflayers_forward(sd, cfg, stored, state, proj, pad, am)) < 1e-5


@pytest.mark.parametrize("batch_first", [True, False])
def test_converted_layer_and_pooling_give_hflayers_outputs(batch_first):
    cfg = dict(input_size=8, num_heads=2, update_steps_max=1, update_steps_eps=1e-12)
    x = make((3, 5, 8), torch.float32, 15)
    t = (lambda a: a) if batch_first else (lambda a: a.transpose(0, 1))
    layout = (lambda q: (1, q, 8)) if batch_first else (lambda q: (q, 1, 8))
    g = torch.Generator().manual_seed(2)
    sd = hflayers_state_dict(cfg, 21, prefix="hopfield.")
    sd["lookup_weights"] = torch.randn(layout(9), generator=g)
    sd["target_weights"] = torch.randn(layout(9), generator=g)
    layer = hk.nn.load_hflayers_state_dict(hk.nn.HopfieldLayer(quantity=9, lookup_weights_as_separated=True,
                                                               batch_first=batch_first, **cfg), sd)
    inner = {k[len("hopfield."):]: v for k, v in sd.items() if k.startswith("hopfield.")}
    lookup, target = (sd[n].reshape(9, 8).expand(3, 9, 8) for n in ("lookup_weights", "target_weights"))
    assert rel_err(t(layer(t(x))), hflayers_forward(inner, cfg, lookup, x, target)) < 1e-5

    sd = hflayers_state_dict(cfg, 22, prefix="hopfield.")
    sd["pooling_weights"] = torch.randn(layout(2), generator=g)
    pool = hk.nn.load_hflayers_state_dict(hk.nn.HopfieldPooling(quantity=2, batch_first=batch_first, **cfg), sd)
    inner = {k[len("hopfield."):]: v for k, v in sd.items() if k.startswith("hopfield.")}
    want = hflayers_forward(inner, cfg, x, sd["pooling_weights"].reshape(2, 8).expand(3, 2, 8), x)
    assert rel_err(pool(t(x)), want.flatten(1)) < 1e-5


def test_converter_names_what_does_not_fit():
    sd = hflayers_state_dict(dict(input_size=8, num_heads=2), 3)
    with pytest.raises(ValueError, match="in_proj_weight"):
        hk.nn.load_hflayers_state_dict(hk.nn.Hopfield(input_size=8, num_heads=2, pattern_size=3), sd)
    with pytest.raises(ValueError, match="in_proj_weight.*rows"):
        hk.nn.load_hflayers_state_dict(hk.nn.Hopfield(input_size=8, num_heads=2, stored_pattern_as_static=True,
                                                      hidden_size=8, normalize_stored_pattern=False,
                                                      normalize_stored_pattern_affine=False), sd)
    with pytest.raises(ValueError, match="norm_state_pattern"):
        hk.nn.load_hflayers_state_dict(hk.nn.Hopfield(input_size=8, num_heads=2, normalize_state_pattern=False,
                                                      normalize_state_pattern_affine=False), sd)
    with pytest.raises(TypeError, match="module"):
        hk.nn.load_hflayers_state_dict(torch.nn.Linear(2, 2), sd)
    biased = hflayers_state_dict(dict(input_size=8, num_heads=2, concat_bias_pattern=True), 3)
    with pytest.warns(UserWarning, match="never appends"):
        hk.nn.load_hflayers_state_dict(hk.nn.Hopfield(input_size=8, num_heads=2, concat_bias_pattern=True), biased)


@pytest.mark.parametrize("backend", kernel_backends())
def test_option_gradients_fused_equal_reference(backend):
    """The appended patterns, Hopfield-space norm and per-head steps train through the fused backward."""
    require(backend, 2 * 2 * 6, 8, 4 * 8)
    grads = {}
    for b in ("torch", backend):
        torch.manual_seed(0)  # the bias patterns' initialisation draws from the global generator
        # "dot": the ℓ2 forms are blind to a shift of q and k alike, so the Hopfield-space bias would get no gradient
        m = _randomise(hk.nn.Hopfield(input_size=8, num_heads=2, similarity="dot", trainable_scaling=True,
                                      concat_bias_pattern=True, add_zero_association=True,
                                      normalize_hopfield_space=True, normalize_hopfield_space_affine=True,
                                      update_steps_max=torch.tensor([1, 2]), update_steps_eps=1e-9, backend=b), 30)
        x = make((2, 6, 8), torch.float32, 31)
        m(x).square().sum().backward()
        grads[b] = {n: p.grad.clone() for n, p in m.named_parameters()}
    assert grads[backend]["bias_k"].abs().sum() > 0 and grads[backend]["norm_hopfield_space.weight"].abs().sum() > 0
    for name, g in grads["torch"].items():
        assert rel_err(grads[backend][name], g) < 1e-4, name
