"""``hopfield_update``'s and ``hopfield_retrieve``'s one-call CPU paths (backends.fast_update and
fast_retrieve, binding.cpp update_cpu and retrieve_cpu).

The plain case (CPU tensors, a float beta, no weights, no autocast; for retrieve no
graph, for update a graph recorded in C++) skips Python's checks, views and
autograd.Function: it must answer with the general path's bits, gradients included, and
decline (an empty list from the op) wherever the general path has something to check,
compute or raise, so that every message keeps its one home in validation.py.
"""
from __future__ import annotations

import pytest
import torch

import hen_kernels as hk
from hen_kernels import backends
from hen_kernels.constants import SIMILARITY_CODES

from .conftest import DTYPES, SIMILARITIES, make, require

pytestmark = pytest.mark.usefixtures("_cpu_backend")


@pytest.fixture
def _cpu_backend(monkeypatch):
    require("cpu")
    monkeypatch.delenv("HEN_KERNELS_BACKEND", raising=False)


def op(query, memory, values=None, beta=0.5, similarity="dot"):
    return torch.ops.hen_kernels.update.default(query, memory, values, beta, SIMILARITY_CODES[similarity],
                                               backends.BACKENDS["cpu"].split_queries_max)


def general(query, memory, beta, **kw):
    """The general path: a tensor beta is not the plain case."""
    return hk.hopfield_update(query, memory, torch.tensor(beta), **kw)


def _forbid_general(monkeypatch):
    def refuse(*args, **kw):
        raise AssertionError("the plain case reached the general path")

    monkeypatch.setattr(backends, "resolve", refuse)


# (query shape, bank shape, values' last dim or None for keys = values): shared and per-leading
# banks, N and D off every block size, one to three leading dims (SDPA's (batch, heads, ...)).
SHAPES = [
    ((3, 24), (197, 24), None),
    ((1, 64), (2000, 64), None),
    ((2, 5, 17), (300, 17), None),
    ((4, 9, 33), (4, 130, 33), 20),
    ((3, 6, 16), (3, 130, 16), None),
    ((70, 16), (75, 16), 7),
    ((2, 3, 5, 17), (300, 17), None),
    ((2, 2, 9, 33), (2, 2, 130, 33), 20),
    ((2, 1, 3, 4, 16), (2, 1, 3, 50, 16), None),
]


def shaped(shape, dtype):
    """(query, memory, values or None) for one of SHAPES, the first query on a stored pattern."""
    qs, xs, dv = shape
    x = make(xs, dtype, 1)
    v = None if dv is None else make(xs[:-1] + (dv,), dtype, 2)
    q = make(qs, dtype, 3)
    q[..., 0, :] = x[..., 0, :]  # recall's normal case
    return q, x, v


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_plain_call_is_one_call_with_the_general_paths_bits(shape, similarity, dtype, monkeypatch):
    q, x, v = shaped(shape, dtype)
    want = general(q, x, 0.7, similarity=similarity, values=v)
    _forbid_general(monkeypatch)
    got = hk.hopfield_update(q, x, 0.7, similarity=similarity, values=v)
    assert got.dtype == q.dtype and got.shape == want.shape
    assert torch.equal(got, want)
    assert torch.equal(hk.hopfield_update(q, x, 0.7, similarity=similarity, values=v, backend="cpu"), want)


def test_strided_inputs_and_values_that_are_the_memory(monkeypatch):
    x = make((40, 130), torch.float32, 1)[:, ::2]  # rows 2 elements apart: copied to unit stride
    q = make((6, 65), torch.float32, 2)
    want = general(q, x, 1.3)
    _forbid_general(monkeypatch)
    assert torch.equal(hk.hopfield_update(q, x, 1.3), want)
    assert torch.equal(hk.hopfield_update(q, x, 1.3, values=x), want)
    assert torch.equal(hk.hopfield_update(q.t().contiguous().t(), x, 1.3), want)


def _projection(dtype, b, s, heads, d, seed):
    """A (batch, S, heads * d) projection's output: a leaf, split into heads by ``_heads``."""
    return make((b, s, heads * d), dtype, seed)


def _heads(t, heads):
    """(batch, heads, S, d) views, heads a row apart in each token: batch and heads do not merge into one stride."""
    b, s, hd = t.shape
    return t.view(b, s, heads, hd // heads).transpose(1, 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("queries", [3, 40], ids=["few", "many"])
@pytest.mark.parametrize("bank", ["split", "shared"])
def test_heads_split_from_a_projection(bank, queries, dtype, monkeypatch):
    """SDPA's usual inputs, (batch, heads, L, d) views of projections: the plain path hands the kernel what the
    general path hands it (split views read in place up to the backend's split_queries_max queries, copies
    beyond), so the same bits, gradients included."""
    base = [_projection(dtype, 2, n, 3, d, seed) for n, d, seed in ((queries, 16, 1), (70, 16, 2), (70, 8, 3))]
    if bank == "shared":
        base[1:] = [make((70, 16), dtype, 2), make((70, 8), dtype, 3)]
    as_input = [lambda t: _heads(t, 3)] + [(lambda t: t) if bank == "shared" else (lambda t: _heads(t, 3))] * 2
    assert len(op(*(f(t) for f, t in zip(as_input, base)))) == 1
    dout = make((2, 3, queries, 8), dtype, 4)

    def gradients(beta):
        leaves = [t.detach().clone().requires_grad_() for t in base]
        q, k, v = (f(t) for f, t in zip(as_input, leaves))
        out = hk.hopfield_update(q, k, beta, values=v)
        out.backward(dout)
        return [out.detach()] + [t.grad for t in leaves]

    want = gradients(torch.tensor(0.7))
    _forbid_general(monkeypatch)
    got = gradients(0.7)
    for name, a, b in zip(("out", "query", "memory", "values"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), name


@pytest.mark.parametrize("bound", [0, 10**9], ids=["always copied", "always in place"])
def test_split_heads_follow_the_backends_bound(bound, monkeypatch):
    """The bound is the backend's (tests/test_split_banks.py moves it): both paths follow it alike."""
    monkeypatch.setattr(backends.BACKENDS["cpu"], "split_queries_max", bound)
    q = _heads(_projection(torch.float32, 2, 40, 3, 16, 1), 3)
    k = _heads(_projection(torch.float32, 2, 70, 3, 16, 2), 3)
    want = general(q, k, 0.7)
    _forbid_general(monkeypatch)
    assert torch.equal(hk.hopfield_update(q, k, 0.7), want)


@pytest.mark.parametrize("bank", ["negative view", "zero tensor"])
@pytest.mark.parametrize("graph", [False, True], ids=["no graph", "graph"])
def test_banks_whose_data_are_not_their_values_answer_as_their_values(bank, graph):
    """A negative view (``conj().imag`` of a complex tensor) and a zero tensor: their data is not their values
    until a fallback materialises them, which runs after update's Autograd kernel (the plain path then
    declines; it read a negative view un-negated, and a zero tensor's missing data crashed)."""
    q = make((4, 8), torch.float32, 1)
    x = make((10, 8), torch.float32, 2)
    k = torch._neg_view(x) if bank == "negative view" else torch._efficientzerotensor(x.shape)
    if graph:
        q.requires_grad_()
    want = hk.hopfield_update(q, k.clone(), 0.7)  # (materialised: an ordinary tensor)
    assert torch.equal(hk.hopfield_update(q, k, 0.7), want)
    assert torch.equal(hk.hopfield_update(q, k, torch.tensor(0.7)), want)
    if not graph:
        assert torch.equal(hk.hopfield_retrieve(q, k, 0.7, max_steps=2).state,
                           hk.hopfield_retrieve(q, k.clone(), 0.7, max_steps=2).state)


def test_a_conjugate_imaginary_part_is_negated():
    q = make((4, 1), torch.float32, 1)
    k = torch.complex(make((10,), torch.float32, 2), make((10,), torch.float32, 3)).conj().imag.unsqueeze(-1)
    assert k.is_neg()
    assert torch.equal(hk.hopfield_update(q, k, 0.7), hk.hopfield_update(q, k.clone(), 0.7))


def test_leading_dims_in_three_strides_are_copied():
    """Leading dims that merge into neither one stride nor two: a copy on both paths, whatever the count."""
    x = make((4, 3, 2, 5, 8), torch.float32, 1).permute(2, 1, 0, 3, 4)
    q = make((2, 3, 4, 6, 8), torch.float32, 2)
    assert torch.equal(op(q, x)[0], general(q, x, 0.5))


def test_a_retrieval_over_split_views_read_in_place_is_the_general_paths():
    q, k = _heads(_projection(torch.float32, 2, 3, 3, 16, 1), 3), _heads(_projection(torch.float32, 2, 70, 3, 16, 2), 3)
    assert retrieve_op(q, k) == []
    assert len(retrieve_op(q.contiguous(), k.contiguous())) == 6


def test_a_retrieval_over_split_views_of_many_queries_is_one_call_on_copies():
    """Beyond split_queries_max queries a head retrieve's loop takes copies, as before a forward alone read split
    views in place at any count: one C++ call, the general path's bits."""
    most = backends.BACKENDS["cpu"].split_queries_max
    q = _heads(_projection(torch.float32, 2, most + 4, 3, 16, 1), 3)
    k = _heads(_projection(torch.float32, 2, 70, 3, 16, 2), 3)
    got = retrieve_op(q, k)
    assert len(got) == 6
    want = hk.hopfield_retrieve(q, k, torch.tensor(0.5), max_steps=3)
    assert torch.equal(got[0], want.state)


SELF_VIEWS = {"2-d": ((40, 8), lambda t: t), "3-d": ((2, 40, 8), lambda t: t),
              "ones lead": ((40, 8), lambda t: t.view(1, 1, 40, 8)),
              "split heads": ((2, 40, 24), lambda t: _heads(t, 3))}


@pytest.mark.parametrize("values", ["memory", "own"])
@pytest.mark.parametrize("view", SELF_VIEWS)
def test_self_association_has_the_general_paths_gradient_bits(view, values, monkeypatch):
    """The query is the bank (one tensor in two or three places): its gradient is dq + (dx + dv) on both paths."""
    shape, as_query = SELF_VIEWS[view]
    base = make(shape, torch.float32, 1)

    def gradient(beta):
        leaf = base.detach().clone().requires_grad_()
        q = as_query(leaf)
        hk.hopfield_update(q, q, beta, values=None if values == "memory" else q * 2).square().sum().backward()
        return leaf.grad

    want = gradient(torch.tensor(0.7))
    _forbid_general(monkeypatch)
    assert torch.equal(gradient(0.7), want)


def _declined_cases(call):
    q, x = make((3, 8), torch.float32, 0), make((10, 8), torch.float32, 1)
    nan_q = q.clone()
    nan_q[1, 2] = float("nan")
    return {
        "float64": lambda: call(q.double(), x.double()),
        "dtypes differ": lambda: call(q, x.bfloat16()),
        "empty bank": lambda: call(q, x[:0]),
        "no queries": lambda: call(q[:0], x),
        "depths differ": lambda: call(q, x[:, :7]),
        "values rows differ": lambda: call(q, x, values=x[:9]),
        "4-d query, 3-d bank": lambda: call(q[None, None], x[None]),
        "2-d query, 3-d bank": lambda: call(q, x[None]),
        "leading sizes differ": lambda: call(q.expand(2, 3, 8), x.expand(3, 10, 8)),
        "beta 0": lambda: call(q, x, beta=0.0),
        "beta nan": lambda: call(q, x, beta=float("nan")),
        "beta past float32": lambda: call(q, x, beta=1e39),
        "scores past float32": lambda: call(q, x, beta=3e38),  # lse inf: the general path raises
        "nan query": lambda: call(nan_q, x),  # lse nan: the general path answers NaN for that row
        "sparse": lambda: call(q.to_sparse(), x),
        "meta": lambda: call(q.to("meta"), x.to("meta")),
    }


@pytest.mark.parametrize("graph", [False, True], ids=["no graph", "graph"])
@pytest.mark.parametrize("case", list(_declined_cases(op)))
@pytest.mark.parametrize("call", ["update", "retrieve"])
def test_declines_whatever_the_general_path_must_check_or_compute(call, case, graph):
    def needing_grad(*args, **kw):  # the same cases with a graph to record (update's autograd kernel)
        args = [a.detach().requires_grad_() if a.is_floating_point() and not a.is_sparse else a for a in args]
        return {"update": op, "retrieve": retrieve_op}[call](*args, **kw)

    assert _declined_cases(needing_grad if graph else {"update": op, "retrieve": retrieve_op}[call])[case]() == []


def test_retrieval_declines_a_graph():
    q, x = make((3, 8), torch.float32, 0).requires_grad_(), make((10, 8), torch.float32, 1)
    assert retrieve_op(q, x) == []
    with torch.no_grad():
        assert len(retrieve_op(q, x)) == 6


def test_declines_under_autocast():
    q, x = make((3, 8), torch.float32, 0), make((10, 8), torch.float32, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert op(q, x) == [] and retrieve_op(q, x) == []
    assert len(op(q, x)) == 1 and len(retrieve_op(q, x)) == 6


@pytest.mark.parametrize("graph", [False, True], ids=["no graph", "graph"])
def test_declined_calls_answer_and_raise_as_the_general_path(graph):
    q, x = make((3, 8), torch.float32, 0), make((10, 8), torch.float32, 1)
    q[1, 2] = float("nan")
    q.requires_grad_(graph)
    out = hk.hopfield_update(q, x, 0.5)
    assert out[1].isnan().all() and out[[0, 2]].isfinite().all()
    assert (out.grad_fn is not None) == graph
    with pytest.raises(ValueError, match="^beta:"):
        hk.hopfield_update(q, x, 3e38)
    with pytest.raises(ValueError, match="^memory:"):
        hk.hopfield_update(q, x[:0], 0.5)


def test_an_asked_backend_or_the_environment_steers_past_it(monkeypatch):
    q, x = make((3, 8), torch.float32, 0), make((10, 8), torch.float32, 1)

    def refuse(*args, **kw):
        raise AssertionError("fast path taken")

    monkeypatch.setattr(backends, "_UPDATE_OP", refuse)
    want = hk.hopfield_update(q, x, 0.5, backend="torch")
    monkeypatch.setenv("HEN_KERNELS_BACKEND", "torch")
    assert torch.equal(hk.hopfield_update(q, x, 0.5), want)
    monkeypatch.delenv("HEN_KERNELS_BACKEND")
    with pytest.raises(AssertionError, match="fast path taken"):  # (the patch does reach the plain case)
        hk.hopfield_update(q, x, 0.5)


def test_fake_tensors_are_declined():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert op(torch.empty(3, 8), torch.empty(10, 8)) == []
        assert retrieve_op(torch.empty(3, 8), torch.empty(10, 8)) == []


def _gradients(q, x, v, beta, similarity, dout, needs=("query", "memory", "values")):
    """The update's output and the gradients of <out, dout> for the inputs named in ``needs``."""
    leaves = {"query": q, "memory": x, "values": v}
    leaves = {k: t.detach().clone().requires_grad_(k in needs) if t is not None else None for k, t in leaves.items()}
    out = hk.hopfield_update(leaves["query"], leaves["memory"], beta, similarity=similarity, values=leaves["values"])
    out.backward(dout)
    return [out.detach()] + [None if t is None else t.grad for t in leaves.values()]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_plain_call_with_a_graph_has_the_general_paths_gradient_bits(shape, similarity, dtype, monkeypatch):
    q, x, v = shaped(shape, dtype)
    dout = make(q.shape[:-1] + ((x if v is None else v).shape[-1],), dtype, 9)
    want = _gradients(q, x, v, torch.tensor(0.7), similarity, dout)
    assert want[2].abs().sum() > 0  # (a gradient to compare; a query's may round to 0 on a one-hot softmax)
    _forbid_general(monkeypatch)
    got = _gradients(q, x, v, 0.7, similarity, dout)
    for name, a, b in zip(("out", "query", "memory", "values"), got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert torch.equal(a, b), name


@pytest.mark.parametrize("needs", [("query",), ("memory",), ("values",), ("memory", "values")], ids=str)
def test_plain_call_with_a_graph_gives_gradients_to_what_needs_them(needs, monkeypatch):
    q, x, v = shaped(SHAPES[3], torch.float32)
    dout = make(q.shape[:-1] + (v.shape[-1],), torch.float32, 9)
    want = _gradients(q, x, v, torch.tensor(0.7), "l2sq", dout, needs)
    _forbid_general(monkeypatch)
    got = _gradients(q, x, v, 0.7, "l2sq", dout, needs)
    for name, a, b in zip(("query", "memory", "values"), got[1:], want[1:]):
        assert (a is None) == (name not in needs) == (b is None), name
        assert a is None or torch.equal(a, b), name


@pytest.mark.parametrize("beta", [0.5, "tensor"], ids=["plain", "general"])
def test_double_backward_fails_when_taken_not_silently(beta):
    # create_graph leaves the kernels' gradient without a graph: taken again, it must raise, not
    # count as a constant (here the q² term would hide that: its gradient has a graph).
    q, x = make((3, 8), torch.float32, 0).requires_grad_(), make((10, 8), torch.float32, 1)
    out = hk.hopfield_update(q, x, torch.tensor(0.5) if beta == "tensor" else beta)
    (g,) = torch.autograd.grad(out.square().sum() + q.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()
    # torch.autograd.grad runs only the nodes on paths to the inputs asked for: the error node lay off them
    # (it held the gradients' detached copies alone) and the second derivative came back without the
    # kernels' term, silently; so did the double-backward jvp/hvp of torch.autograd.functional
    with pytest.raises(RuntimeError, match="differentiate twice"):
        torch.autograd.grad(g.sum(), q)
    f = lambda q: hk.hopfield_update(q, x, torch.tensor(0.5) if beta == "tensor" else beta).square().sum()  # noqa
    with pytest.raises(RuntimeError, match="differentiate twice"):
        torch.autograd.functional.hvp(f, q.detach(), torch.ones(3, 8))
    with pytest.raises(RuntimeError, match="differentiate twice"):  # (the wrappers' requires_grad said False)
        torch.func.grad(lambda q: torch.func.grad(f)(q).sum())(q.detach())


def test_in_place_changes_to_the_output_as_the_general_path(monkeypatch):
    # float32: the saved output changed, so backward refuses; bfloat16: a cast, free to change.
    x = make((10, 8), torch.float32, 1)
    for beta in (0.5, torch.tensor(0.5)):
        for q in (make((3, 8), torch.float32, 0), make((2, 3, 8), torch.float32, 0)):
            out = hk.hopfield_update(q.requires_grad_(), x, beta)
            out.mul_(2)
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                out.sum().backward()
        q = make((3, 8), torch.bfloat16, 0).requires_grad_()
        out = hk.hopfield_update(q, x.bfloat16(), beta)
        out.mul_(2)
        out.sum().backward()
        assert q.grad is not None


@pytest.mark.parametrize("changed", ["query", "memory"])
@pytest.mark.parametrize("beta", [0.5, "tensor"], ids=["plain", "general"])
def test_inputs_changed_in_place_before_backward_are_caught(beta, changed):
    q, x = make((3, 8), torch.float32, 0).requires_grad_(), make((10, 8), torch.float32, 1).requires_grad_()
    q2, x2 = q * 1, x * 1  # (non-leaf: free to change in place)
    out = hk.hopfield_update(q2, x2, torch.tensor(0.5) if beta == "tensor" else beta)
    with torch.no_grad():
        (q2 if changed == "query" else x2).add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_a_graph_is_recorded_where_inputs_need_grad():
    q = make((3, 8), torch.float32, 0).requires_grad_()
    x = make((10, 8), torch.float32, 1)
    out = hk.hopfield_update(q, x, 0.5)
    assert out.grad_fn is not None
    with torch.no_grad():
        assert len(op(q, x)) == 1


# --- hopfield_retrieve ---------------------------------------------------------------------

def retrieve_op(query, memory, values=None, beta=0.5, similarity="dot", max_steps=3, tol=None):
    return torch.ops.hen_kernels.retrieve.default(query, memory, values, beta, SIMILARITY_CODES[similarity],
                                                 max_steps, tol, backends.BACKENDS["cpu"].split_queries_max)


# (max_steps, tol): one step, every query to the end, and queries that stop at different steps.
STEPS = [(1, None), (4, None), (6, 0.0), (8, 1e-3)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_plain_retrieval_is_one_call_with_the_general_paths_bits(shape, similarity, dtype, monkeypatch):
    q, x, v = shaped(shape, dtype)
    steps = STEPS if v is None else STEPS[:1]  # more steps need Dv = D (general path's message below)
    want = {s: hk.hopfield_retrieve(q, x, torch.tensor(0.7), similarity=similarity, values=v, max_steps=s[0],
                                    tol=s[1]) for s in steps}
    with monkeypatch.context() as m:
        _forbid_general(m)
        for (max_steps, tol), w in want.items():
            got = hk.hopfield_retrieve(q, x, 0.7, similarity=similarity, values=v, max_steps=max_steps, tol=tol)
            assert type(got) is hk.Retrieval
            for field, a, b in zip(hk.Retrieval._fields, got, w):
                assert a.dtype == b.dtype and a.shape == b.shape, field
                assert torch.equal(a, b), field
    if v is not None:
        with pytest.raises(ValueError, match="^values: multi-step"):
            hk.hopfield_retrieve(q, x, 0.7, similarity=similarity, values=v, max_steps=2)


def test_queries_that_stop_at_different_steps_keep_their_own_last_update(monkeypatch):
    x = make((64, 16), torch.float32, 1)
    q = make((6, 16), torch.float32, 2) * 0.3
    q[0] = x[5]  # on a stored pattern: still from the first step
    want = hk.hopfield_retrieve(q, x, torch.tensor(2.0), max_steps=12, tol=1e-4)
    assert want.steps.unique().numel() > 1  # the case this test is for
    _forbid_general(monkeypatch)
    got = hk.hopfield_retrieve(q, x, 2.0, max_steps=12, tol=1e-4)
    for field, a, b in zip(hk.Retrieval._fields, got, want):
        assert torch.equal(a, b), field


@pytest.mark.parametrize("plain", [True, False], ids=["fast", "general"])
def test_a_retrieval_without_tol_is_its_chain_of_updates(plain):
    # Both paths skip the bookkeeping of the steps before the last (tol=None): held here to
    # what those steps mean, not to each other.
    x = make((90, 12), torch.bfloat16, 1)
    q = make((5, 12), torch.bfloat16, 2)
    beta = 1.5 if plain else torch.tensor(1.5)
    r = hk.hopfield_retrieve(q, x, beta, max_steps=4)
    s = q
    for _ in range(4):
        prev, s = s, hk.hopfield_update(s, x, 1.5)
    last = hk.hopfield_partial(prev, x, 1.5)
    assert torch.equal(r.state, s) and torch.equal(r.steps, torch.full((5,), 4))
    assert torch.equal(r.converged, (s.float() - prev.float()).abs().amax(-1) <= 0)
    assert torch.equal(r.lse, last.lse) and torch.equal(r.top_index, last.top_index)
    assert torch.equal(r.top_weight, last.top_weight)


def test_steps_and_tolerances_past_the_ops_types_take_the_general_path():
    q, x = make((3, 8), torch.float32, 0), make((10, 8), torch.float32, 1)
    r = hk.hopfield_retrieve(q, x, 0.5, max_steps=2**70, tol=1e-2)  # stops once every query converged
    assert r.converged.all()
    with pytest.raises(ValueError, match="^max_steps:"):
        hk.hopfield_retrieve(q, x, 0.5, max_steps=-2**70)
    with pytest.raises(TypeError, match="^query:"):
        hk.hopfield_retrieve(q.tolist(), x, 0.5, tol=10**400)


@pytest.mark.parametrize("case", ["no steps", "tol below 0", "tol nan", "tol inf", "steps into another width"])
def test_retrieval_declines_steps_and_tolerances_the_general_path_refuses(case):
    q, x = make((3, 8), torch.float32, 0), make((10, 8), torch.float32, 1)
    kw = {"no steps": dict(max_steps=0), "tol below 0": dict(tol=-1e-3), "tol nan": dict(tol=float("nan")),
          "tol inf": dict(tol=float("inf")), "steps into another width": dict(values=x[:, :5], max_steps=2)}[case]
    assert retrieve_op(q, x, **kw) == []
    assert len(retrieve_op(q, x)) == 6


def test_declined_retrievals_answer_and_raise_as_the_general_path():
    q, x = make((3, 8), torch.float32, 0), make((10, 8), torch.float32, 1)
    with pytest.raises(ValueError, match="^max_steps:"):
        hk.hopfield_retrieve(q, x, 0.5, max_steps=0)
    with pytest.raises(TypeError, match="^max_steps:"):
        hk.hopfield_retrieve(q, x, 0.5, max_steps=2.0)
    with pytest.raises(ValueError, match="^tol:"):
        hk.hopfield_retrieve(q, x, 0.5, tol=float("nan"))
    with pytest.raises(ValueError, match="^beta:"):
        hk.hopfield_retrieve(q, x, 3e38)
    q[1, 2] = float("nan")
    r = hk.hopfield_retrieve(q, x, 0.5, max_steps=3)
    assert r.state[1].isnan().all() and r.state[[0, 2]].isfinite().all()


def test_an_asked_backend_or_the_environment_steers_retrieval_past_it(monkeypatch):
    q, x = make((3, 8), torch.float32, 0), make((10, 8), torch.float32, 1)

    def refuse(*args, **kw):
        raise AssertionError("fast path taken")

    monkeypatch.setattr(backends, "_RETRIEVE_OP", refuse)
    want = hk.hopfield_retrieve(q, x, 0.5, max_steps=3, backend="torch")
    monkeypatch.setenv("HEN_KERNELS_BACKEND", "torch")
    assert torch.equal(hk.hopfield_retrieve(q, x, 0.5, max_steps=3).state, want.state)
    monkeypatch.delenv("HEN_KERNELS_BACKEND")
    with pytest.raises(AssertionError, match="fast path taken"):  # (the patch does reach the plain case)
        hk.hopfield_retrieve(q, x, 0.5, max_steps=3)


# --- one beta for every head (the layers, hen_kernels/nn/association.py) ------------------------------

def test_a_beta_tensor_is_one_float_only_where_nothing_else_needs_the_tensor():
    """backends.plain_beta: one finite value > 0 in every entry, nothing differentiating it (a gradient to
    record, a forward-mode tangent), no tracing, no autocast; anything else is left to the general path."""
    assert backends.plain_beta(torch.tensor([0.5, 0.5])) == 0.5
    assert backends.plain_beta(torch.tensor(0.25)) == 0.25  # (0-d)
    assert backends.plain_beta(torch.tensor([0.3, 0.3], dtype=torch.bfloat16)) == float(torch.tensor(0.3).bfloat16())
    for other in ([0.5, 0.4], [0.0, 0.0], [-1.0], [float("nan")], [float("inf")], [1e39], []):
        assert backends.plain_beta(torch.tensor(other, dtype=torch.float64)) is None, other
    trained = torch.tensor([0.5, 0.5], requires_grad=True)
    assert backends.plain_beta(trained) is None
    with torch.no_grad():
        assert backends.plain_beta(trained) == 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert backends.plain_beta(torch.tensor([0.5])) is None
    with torch.autograd.forward_ad.dual_level():
        assert backends.plain_beta(torch.tensor([0.5])) is None
    assert backends.plain_beta(torch.tensor([0.5], device="meta")) is None
