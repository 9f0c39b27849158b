"""Per-query feature weights (docs/design.md §4): the reference against a float64 restatement, and the API's checks.

Kernel backends are compared with the reference in tests/test_kernels.py once they take weights.
"""
import math

import pytest
import torch

import hen_kernels as hk
from hen_kernels import reference

from .conftest import SIMILARITIES, make, rel_err


def restated(q, x, beta, sim, w, v=None):
    """softmax(beta · sim_w) @ V from the definition, in float64 and B x N x D (small cases only)."""
    q, x, w = q.double(), x.double(), w.double()
    v = x if v is None else v.double()
    diff = x.unsqueeze(-3) - q.unsqueeze(-2)  # (B, N, D)
    if sim == "dot":
        s = (w.unsqueeze(-2) * q.unsqueeze(-2) * x.unsqueeze(-3)).sum(-1)
    else:
        d2 = (w.unsqueeze(-2) * diff * diff).sum(-1)
        s = -d2.sqrt() if sim == "l2" else -0.5 * d2
    return torch.softmax(beta * s, -1) @ v


@pytest.mark.parametrize("sim", SIMILARITIES)
@pytest.mark.parametrize("b,n,d", [(1, 5, 3), (7, 33, 17), (4, 129, 64)])
def test_reference_weights_match_the_definition(sim, b, n, d):
    q, x = make((b, d), torch.float32, 1), make((n, d), torch.float32, 2)
    w = make((b, d), torch.float32, 3).abs()
    w[0, : d // 2] = 0  # a query that knows only part of its pattern
    beta = 1.0 if sim == "l2" else 1.0 / math.sqrt(d)
    got = hk.hopfield_update(q, x, beta, similarity=sim, weights=w, backend="torch")
    assert rel_err(got, restated(q, x, beta, sim, w)) <= 1e-5


def test_unit_weights_change_nothing():
    q, x = make((5, 16), torch.float32, 1), make((40, 16), torch.float32, 2)
    for sim in SIMILARITIES:
        plain = hk.hopfield_update(q, x, 0.3, similarity=sim, backend="torch")
        ones = hk.hopfield_update(q, x, 0.3, similarity=sim, weights=torch.ones_like(q), backend="torch")
        assert rel_err(ones, plain) <= 1e-6


def test_masked_features_are_ignored():
    """A query that sees only the first half recalls the pattern agreeing there, whatever the rest says."""
    x = make((50, 8), torch.float32, 4)
    q = x[7].clone().unsqueeze(0)
    q[0, 4:] = 100.0  # garbage in the hidden half
    w = torch.zeros_like(q)
    w[0, :4] = 1
    for sim in SIMILARITIES:
        r = hk.hopfield_retrieve(q, x, 1e3, similarity=sim, weights=w, backend="torch")
        assert int(r.top_index) == 7


@pytest.mark.parametrize("bad,err,msg", [
    (torch.ones(3, 4, dtype=torch.float64), TypeError, "float32"),
    (torch.ones(3, 5), ValueError, "shape"),
    (-torch.ones(3, 4), ValueError, ">= 0"),
    (torch.full((3, 4), math.nan), ValueError, "finite"),
    ("w", TypeError, "Tensor"),
])
def test_bad_weights_are_refused_by_name(bad, err, msg):
    with pytest.raises(err, match=msg) as e:
        hk.hopfield_update(torch.ones(3, 4), torch.ones(6, 4), 1.0, weights=bad)
    assert str(e.value).startswith("weights:")


def test_weights_requiring_grad_are_refused():
    w = torch.ones(3, 4, requires_grad=True)
    with pytest.raises(ValueError, match="weights: no gradient"):
        hk.hopfield_update(torch.ones(3, 4), torch.ones(6, 4), 1.0, weights=w)


def test_gradients_to_the_query_take_the_weights():
    q = make((3, 6), torch.float64, 1).float().requires_grad_()
    x = make((20, 6), torch.float32, 2)
    w = make((3, 6), torch.float32, 3).abs()
    for sim in SIMILARITIES:
        out = hk.hopfield_update(q, x, 0.5, similarity=sim, weights=w, backend="torch")
        (g,) = torch.autograd.grad(out.sum(), q)
        q64 = q.detach().double().requires_grad_()
        (g64,) = torch.autograd.grad(restated(q64, x, 0.5, sim, w).sum(), q64)
        assert rel_err(g, g64) <= 1e-4


def test_energy_takes_the_weights():
    x = make((30, 5), torch.float32, 2)
    s = make((2, 5), torch.float32, 1)
    w = torch.ones_like(s)
    e1 = hk.energy(s, x, 0.7, weights=w, backend="torch")
    e0 = hk.energy(s, x, 0.7, backend="torch")
    assert torch.allclose(e1, e0)
    w[:, 2:] = 0
    assert not torch.allclose(hk.energy(s, x, 0.7, weights=w, backend="torch"), e0)


def test_l2_near_stored_patterns_meets_float32_tolerance():
    """docs/design.md §5.1: the query on or next to a stored pattern is recall's normal case."""
    x = torch.randn(200, 64, generator=torch.Generator().manual_seed(0))
    for q in (x[:8], x[:8] + 1e-3 * torch.randn(8, 64, generator=torch.Generator().manual_seed(1))):
        for sim in ("l2", "l2sq"):
            got = reference.update(q, x, 0.3, sim)
            want = reference.update(q.double(), x.double(), 0.3, sim)
            assert rel_err(got, want) <= 1e-5
