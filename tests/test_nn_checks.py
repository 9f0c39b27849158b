"""hk.nn checks its inputs like the functional API (issue 13 item 7): named errors, no silent casts, no NaN.

Also: errors in the user's terms, building on the meta device, ``.double()``, and the docstrings.
"""
import math

import pytest
import torch

import hen_kernels as hk

from .conftest import make, rel_err
from .test_nn import _randomise, restate

MODULES = [hk.nn.Hopfield, hk.nn.HopfieldLayer, hk.nn.HopfieldPooling]


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(quantity=-1), ValueError, "quantity"),
    (dict(quantity=0), ValueError, "quantity"),
    (dict(quantity=2.0), TypeError, "quantity"),
    (dict(scaling="x"), TypeError, "scaling"),
    (dict(scaling=-1.0), ValueError, "scaling"),
    (dict(scaling=torch.ones(3)), ValueError, "scaling"),
    (dict(dropout="0.1"), TypeError, "dropout"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(num_heads=True), TypeError, "num_heads"),
    (dict(num_heads=0), ValueError, "num_heads"),
    (dict(hidden_size=0), ValueError, "hidden_size"),
    (dict(update_steps_max=1.5), TypeError, "update_steps_max"),
    (dict(update_steps_max=torch.tensor([1.0, 2.0])), TypeError, "update_steps_max"),
    (dict(update_steps_max=torch.tensor([1, 2, 3])), ValueError, "update_steps_max"),
    (dict(update_steps_eps=-1e-3), ValueError, "update_steps_eps"),
    (dict(update_steps_eps=torch.tensor([-1.0, 1.0])), ValueError, "update_steps_eps"),
    (dict(batch_first=1), TypeError, "batch_first"),
    (dict(association_activation="no_such_fn"), ValueError, "association_activation"),
    (dict(association_activation="softmax"), ValueError, "association_activation"),
    (dict(association_activation=torch.tanh), TypeError, "association_activation"),
    (dict(similarity="cosine"), ValueError, "similarity"),
    (dict(normalize_hopfield_space_affine=True), ValueError, "normalize_hopfield_space_affine"),
    (dict(concat_bias_pattern=True, stored_pattern_as_static=True), ValueError, "concat_bias_pattern"),
    (dict(pattern_projection_as_connected=True, pattern_projection_size=5), ValueError,
     "pattern_projection_as_connected"),
    (dict(backend=3), TypeError, "backend"),
])
@pytest.mark.parametrize("cls", MODULES)
def test_bad_constructor_arguments_are_named(cls, kwargs, error, name):
    if "quantity" in kwargs and cls is hk.nn.Hopfield:
        error = TypeError  # hflayers' Hopfield has no quantity either: an unexpected keyword
    with pytest.raises(error, match=name):
        cls(**dict(dict(input_size=8, num_heads=2), **kwargs))


def test_wrong_shapes_are_told_in_the_users_terms():
    m = hk.nn.Hopfield(input_size=8, num_heads=2, stored_pattern_size=5)
    x = make((2, 6, 8), torch.float32, 1)
    with pytest.raises(ValueError, match=r"input\[0\] \(stored patterns\): expected shape \(batch, S, 5\)") as e:
        m((x, x, x))
    assert "'N'" not in str(e.value) and "heads" not in str(e.value)
    with pytest.raises(ValueError, match=r"input \(stored patterns\): expected shape \(batch, S, 5\)"):
        m(x)
    stored = make((2, 6, 5), torch.float32, 2)
    with pytest.raises(ValueError, match=r"input\[1\] \(state patterns\): batch is 3"):
        m((stored, make((3, 4, 8), torch.float32, 3), x))
    with pytest.raises(ValueError, match=r"input\[2\] \(pattern projections\): S is 4"):
        m((stored, x, make((2, 4, 8), torch.float32, 3)))
    with pytest.raises(ValueError, match=r"\(S, batch, 8\) \(batch_first=False\)"):
        hk.nn.Hopfield(input_size=8, batch_first=False)(make((6, 9), torch.float32, 4))
    with pytest.raises(TypeError, match="input"):
        m([x, x])
    with pytest.raises(ValueError, match=r"input \(state patterns\): expected shape \(batch, L, 8\)"):
        hk.nn.HopfieldLayer(input_size=8, quantity=3)(make((2, 3, 9), torch.float32, 5))
    with pytest.raises(ValueError, match=r"input \(stored patterns\): expected shape \(batch, S, 8\)"):
        hk.nn.HopfieldPooling(input_size=8)(make((3, 8), torch.float32, 6))
    with pytest.raises(TypeError, match="floating"):
        hk.nn.HopfieldPooling(input_size=8)(torch.ones(2, 3, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"stored_pattern_padding_mask: expected \(batch, S\) = \(2, 6\)"):
        hk.nn.Hopfield(input_size=8)(x, stored_pattern_padding_mask=torch.zeros(6, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="stored_pattern_padding_mask"):
        hk.nn.Hopfield(input_size=8)(x, stored_pattern_padding_mask=torch.zeros(2, 6))


def test_inputs_are_never_cast_silently():
    m = hk.nn.Hopfield(input_size=8)
    with pytest.raises(TypeError, match="nothing is cast silently"):
        m(make((2, 5, 8), torch.float64, 1))
    with pytest.raises(TypeError, match="nothing is cast silently"):
        hk.nn.HopfieldLayer(input_size=8).to(torch.bfloat16)(make((2, 5, 8), torch.float32, 1))


@pytest.mark.parametrize("cls", MODULES)
def test_empty_sets_raise_instead_of_returning_the_projection_bias(cls):
    kw = {} if cls is hk.nn.Hopfield else {"quantity": 2}
    m = cls(input_size=8, **kw)
    torch.nn.init.normal_(m.hopfield.out_proj.bias if cls is not hk.nn.Hopfield else m.out_proj.bias)
    empty = torch.zeros(2, 0, 8)
    if cls is hk.nn.HopfieldLayer:  # its stored patterns are the learned table: an empty input is 0 state patterns
        assert m(empty).shape == (2, 0, 8)
        return
    if cls is hk.nn.Hopfield:  # one tensor would make L = 0 too (an empty result): give the states apart
        empty = (empty, torch.ones(2, 3, 8), empty)
    with pytest.raises(ValueError, match=r"no stored patterns \(S = 0\)"):
        m(empty)
    # With a zero pattern to attend to, an empty set has a defined result: the value 0, projected.
    z = cls(input_size=8, add_zero_association=True, **kw)
    out = z(empty)
    assert torch.isfinite(out).all()


def test_fully_masked_bank_raises_instead_of_nan():
    m = _randomise(hk.nn.HopfieldPooling(input_size=8, num_heads=2, quantity=2), 1)
    bags = make((3, 5, 8), torch.float32, 2)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[1] = True
    with pytest.raises(ValueError, match="every stored pattern is masked for batch item 1"):
        m(bags, stored_pattern_padding_mask=pad)
    h = hk.nn.Hopfield(input_size=8)
    assoc = torch.zeros(5, 5, dtype=torch.bool)
    assoc[2] = True
    with pytest.raises(ValueError, match="state pattern 2"):
        h(bags, association_mask=assoc)
    z = _randomise(hk.nn.HopfieldPooling(input_size=8, num_heads=2, quantity=2, add_zero_association=True), 1)
    out = z(bags, stored_pattern_padding_mask=pad)
    assert torch.isfinite(out).all()
    # The fully masked bag attends to the zero pattern alone: its value is 0, so its output is the out bias.
    torch.testing.assert_close(out[1], z.hopfield.out_proj.bias.repeat(2))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_zero_length_batches_give_empty_outputs(backend):
    kw = dict(input_size=8, num_heads=2, backend=backend)
    x = torch.zeros(0, 5, 8)
    assert hk.nn.Hopfield(**kw)(x).shape == (0, 5, 8)
    out, info = hk.nn.HopfieldLayer(quantity=3, update_steps_max=2, **kw)(x, return_info=True)
    assert out.shape == (0, 5, 8) and info.steps.shape == (0, 2, 5)
    assert hk.nn.HopfieldPooling(quantity=3, **kw)(x).shape == (0, 24)
    state = torch.zeros(2, 0, 8)
    assert hk.nn.Hopfield(**kw)((make((2, 5, 8), torch.float32, 1), state, make((2, 5, 8), torch.float32, 2))).shape \
        == (2, 0, 8)
    assert hk.nn.HopfieldLayer(quantity=3, **kw).get_association_matrix(x).shape == (0, 2, 5, 3)


def test_network_store_and_forward_check_their_inputs():
    patterns = make((6, 4), torch.float32, 1)
    net = hk.nn.HopfieldNetwork(patterns, 2.0)
    with pytest.raises(TypeError, match="patterns: dtype torch.float64 differs"):
        net.store(make((2, 4), torch.float64, 2))
    with pytest.raises(TypeError, match="patterns: expected a floating tensor"):
        net.store(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"patterns: expected shape \(N, 4\)"):
        net.store(make((2, 5), torch.float32, 3))
    bad = make((3, 4), torch.float32, 4)
    bad[1, 2] = math.nan
    with pytest.raises(ValueError, match=r"patterns: rows \[1\] hold NaN"):
        net.store(bad)
    assert net.stored_patterns.shape == (6, 4)  # nothing was appended by the refused calls
    with pytest.raises(ValueError, match="patterns: rows"):
        hk.nn.HopfieldNetwork(bad)
    with pytest.raises(TypeError, match="patterns"):
        hk.nn.HopfieldNetwork(torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="state: dtype"):
        net(make((2, 4), torch.float64, 5))
    with pytest.raises(ValueError, match=r"state: expected shape \(\.\.\., B, 4\)"):
        net(make((2, 5), torch.float32, 5))
    with pytest.raises(ValueError, match="no patterns"):
        hk.nn.HopfieldNetwork(torch.zeros(0, 4))(make((2, 4), torch.float32, 6))
    # scaling is beta: the ops' checks, named for this module (a tensor's at the call, against the states' dims)
    for scaling in (math.inf, 1e-35, torch.tensor([1.0, -1.0]), torch.ones(3)):
        with pytest.raises(ValueError, match="^scaling: expected"):
            hk.nn.HopfieldNetwork(patterns, scaling)(make((2, 2, 4), torch.float32, 7))
    for kwargs, name in [(dict(scaling="x"), "scaling"), (dict(scaling=0.0), "scaling"),
                         (dict(update_steps_max=0), "update_steps_max"), (dict(similarity="cos"), "similarity"),
                         (dict(update_steps_eps=-1.0), "update_steps_eps"), (dict(trainable=1), "trainable")]:
        with pytest.raises((TypeError, ValueError), match=name):
            hk.nn.HopfieldNetwork(patterns, **kwargs)


@pytest.mark.parametrize("cls", MODULES)
def test_modules_build_on_the_meta_device(cls):
    kw = dict(input_size=8, num_heads=2, scaling=0.5, update_steps_max=torch.tensor([1, 2]))
    kw.update({} if cls is hk.nn.Hopfield else {"quantity": 3})
    with torch.device("meta"):
        m = cls(**kw)
    assert all(p.device.type == "meta" for p in m.parameters())
    m = m.to_empty(device="cpu")
    m.reset_parameters()
    assert torch.equal(m.scaling, torch.tensor([0.5, 0.5]))
    assert torch.isfinite(m(make((2, 5, 8), torch.float32, 1))).all()
    with torch.device("meta"):
        net = hk.nn.HopfieldNetwork(torch.empty(5, 4))
    assert net.stored_patterns.device.type == "meta"


@pytest.mark.parametrize("backend", [None, "torch"])
def test_double_works_as_in_hflayers(backend):
    """float64 runs on the reference (the automatic choice for float64; the kernels take 16/32-bit floats)."""
    m = _randomise(hk.nn.Hopfield(input_size=8, num_heads=2, update_steps_max=2, update_steps_eps=1e-9,
                                  backend=backend), 3).double()
    x = make((2, 5, 8), torch.float64, 4)
    out = m(x)
    assert out.dtype == torch.float64
    assert rel_err(out, restate(m, x, x, x)) < 1e-12
    layer = hk.nn.HopfieldLayer(input_size=8, quantity=4, backend=backend).double()
    assert layer(x).dtype == torch.float64
    net = hk.nn.HopfieldNetwork(make((6, 8), torch.float64, 5), 2.0, backend=backend)
    assert net(x[0]).dtype == torch.float64


@pytest.mark.parametrize("obj", [hk.nn.Hopfield, hk.nn.HopfieldLayer, hk.nn.HopfieldPooling, hk.nn.HopfieldNetwork,
                                 hk.nn.load_hflayers_state_dict, hk.nn.convert_hflayers_state_dict])
def test_public_objects_document_arguments_shapes_and_dtypes(obj):
    doc = obj.__doc__ or ""
    assert len(doc) > 80
    if isinstance(obj, type):
        assert "Args" in doc and "Shapes" in doc and "dtype" in doc
