"""Queries and banks split into heads: (batch, S, heads * d) viewed as (batch, heads, S, d), whose two
leading dims do not merge into one stride.  Every backend gives the reference's answer and gradients
on such views; the backends that read them in place (``Backend.split_banks``: the CPU kernel) copy no
bank, forward or backward, and lay the bank gradients out as the views (validation.py)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hen_kernels as hk
from hen_kernels import backends
from hen_kernels.constants import GRAD_TOLERANCE

from .conftest import SIMILARITIES, TOLERANCE, beta_for, kernel_backends, make, ref64, rel_err, require



@pytest.fixture(autouse=True)
def in_place_at_every_query_count(request, monkeypatch):
    """The backends that read split views take them at any number of queries here (their default,
    ``Backend.split_queries_max``, copies beyond a few), so every kernel path meets strided rows;
    tests marked ``default_rule`` keep the default."""
    if "default_rule" not in request.keywords:
        for b in backends.BACKENDS.values():
            if b.split_banks:
                monkeypatch.setattr(b, "split_queries_max", 10**9)

# (batch, S, heads, d, dv, queries per head): one query block with rows complete in a tile (the
# CPU backward stores them straight into the view), and more queries than a block (float32 rows
# summed over blocks, then laid out as the view); sizes off every block size.
CASES = [(3, 37, 4, 16, 16, 5), (2, 19, 3, 24, 8, 70)]


def _split(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, S, heads * d) -> (batch, heads, S, d), a view: the projection's heads."""
    b, s, hd = t.shape
    return t.view(b, s, heads, hd // heads).transpose(1, 2)


def _inputs(case, dtype, seed, same_values, on_patterns=True, split_query=True):
    """q (split from query rows, or contiguous), x and v (split from rows and vals), rows, vals."""
    b, s, h, d, dv, nq = case
    rows = make((b, s, h * d), dtype, seed)
    vals = rows if same_values else make((b, s, h * dv), dtype, seed + 1)
    x, v = _split(rows, h), _split(vals, h)
    assert not x.is_contiguous() and x.shape[:2] == (b, h)
    q = make((b, h, nq, d), dtype, seed + 2)
    if on_patterns:  # queries on stored patterns, recall's normal case
        q[:, :, : min(nq, s)] = x[:, :, : min(nq, s)]
    if split_query:
        q = _split(q.transpose(1, 2).reshape(b, nq, h * d), h)
    return q, x, v, rows, vals


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=["one-block", "many-blocks"])
@pytest.mark.parametrize("form", ["values=memory", "values split", "values contiguous", "memory contiguous",
                                  "query contiguous", "only the query split", "shared bank"])
def test_split_bank_views_match_the_reference(backend, similarity, dtype, case, form):
    """Any of query, memory and values split (the others are split to match, as views)."""
    b, s, h, d, dv, nq = case
    require(backend, b * h * nq, s, d * 8)
    same_values = form == "values=memory"
    q, x, v, _, _ = _inputs(case, dtype, 11, same_values, split_query=form != "query contiguous")
    assert q.is_contiguous() == (form == "query contiguous")
    if form == "values contiguous":
        v = v.contiguous()
    elif form == "memory contiguous":
        x = x.contiguous()
    elif form == "only the query split":
        x, v = x.contiguous(), v.contiguous()
    elif form == "shared bank":  # one (N, D) bank for every (batch, head)
        x, v = x[0, 0], v[0, 0]
    beta = beta_for(similarity, d, 1.0)
    p = hk.hopfield_partial(q, x, beta, similarity=similarity, values=None if same_values else v, offset=5,
                            backend=backend)
    want = ref64(q, x.contiguous(), beta, similarity, None if same_values else v.contiguous(), offset=5)
    assert rel_err(p.out, want.out) < TOLERANCE[dtype]
    assert rel_err(p.lse, want.lse) < TOLERANCE[dtype]
    if dtype == torch.float32:  # 16-bit scores may tie or swap near-equal rows
        assert torch.equal(p.top_index, want.top_index)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=["one-block", "many-blocks"])
def test_split_bank_gradients_match_the_reference(backend, similarity, dtype, case):
    b, s, h, d, dv, nq = case
    require(backend, b * h * nq, s, d * 8)
    # (not on the patterns: ℓ2's float64 reference gradient is NaN there, test_autograd.py checks the kernels')
    q, _, _, rows, vals = _inputs(case, dtype, 12, False, on_patterns=similarity == "dot")
    qrows = q.transpose(1, 2).reshape(b, nq, h * d)
    beta = beta_for(similarity, d, 1.0)
    g = torch.Generator().manual_seed(13)
    dout, dlse = torch.randn(b, h, nq, dv, generator=g), torch.randn(b, h, nq, generator=g)
    grads = {}
    for name, dt in ((backend, dtype), ("torch", torch.float64)):
        args = [t.detach().to(dt).requires_grad_() for t in (qrows, rows, vals)]
        p = hk.hopfield_partial(_split(args[0], h), _split(args[1], h), beta, similarity=similarity,
                                values=_split(args[2], h), backend=name)
        loss = (p.out * dout.to(p.out.dtype)).sum() + (p.lse * dlse.to(p.lse.dtype)).sum()
        grads[name] = torch.autograd.grad(loss, args)
    for what, got, want in zip(("query rows", "memory rows", "value rows"), grads[backend], grads["torch"]):
        assert got.dtype == dtype and got.shape == want.shape
        assert rel_err(got, want) < GRAD_TOLERANCE[dtype], what


@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_split_bank_gradients_without_brgemm(similarity, monkeypatch):
    """A CPU build without brgemm keeps the forward on split views and takes the streaming backward."""
    require("cpu")
    monkeypatch.setattr(backends, "_cpu_has_brgemm", lambda: False)
    test_split_bank_gradients_match_the_reference("cpu", similarity, torch.float32, CASES[0])


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_split_bank_views_in_retrieval_energy_and_weights(backend, similarity):
    """Multi-step retrieval feeds (L, B, D) states back against the split bank; weights ride along."""
    case = (2, 23, 3, 8, 8, 4)
    b, s, h, d, _, nq = case
    require(backend, b * h * nq, s, d * 8)
    q, x, _, _, _ = _inputs(case, torch.float32, 14, True)
    w = (torch.rand(b, h, nq, d, generator=torch.Generator().manual_seed(15)) > 0.3).float()
    beta = beta_for(similarity, d, 4.0)
    kw = dict(similarity=similarity, max_steps=3, weights=w)
    got = hk.hopfield_retrieve(q, x, beta, backend=backend, **kw)
    want = hk.hopfield_retrieve(q.double(), x.contiguous().double(), beta, backend="torch", **kw)
    assert rel_err(got.state, want.state) < TOLERANCE[torch.float32]
    assert torch.equal(got.steps, want.steps)
    # The energy of states on the patterns is lse's tiny difference from the best score: against the
    # same backend on the bank made contiguous (identical numbers but for the layout).
    e = hk.energy(q, x, beta, similarity=similarity, backend=backend)
    e_want = hk.energy(q, x.contiguous(), beta, similarity=similarity, backend=backend)
    assert rel_err(e, e_want) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("order", [(0, 2, 3, 1, 4), (0, 3, 2, 1, 4)], ids=["two-strides", "three-strides"])
def test_three_leading_dims_that_merge_into_two_strides_or_do_not(backend, order):
    """(batch, S, groups, heads, d) permuted to lead (batch, groups, heads): groups and heads merge into
    one stride (read in place, as (batch, groups * heads)), or in the other order none merge (a copy)."""
    require(backend, 2 * 12 * 3, 13, 8 * 8)
    rows = make((2, 13, 3, 4, 8), torch.float32, 18)
    x = rows.permute(order)
    q = make(x.shape[:3] + (3, 8), torch.float32, 19)
    got = hk.hopfield_partial(q, x, 0.5, backend=backend)
    want = ref64(q, x.contiguous(), 0.5, "dot")
    assert rel_err(got.out, want.out) < TOLERANCE[torch.float32]
    assert torch.equal(got.top_index, want.top_index)


class _BankCopies(TorchDispatchMode):
    """Records every op that copies a tensor of a bank's size (``.contiguous()`` and ``reshape`` copy by clone)."""

    COPIES = {"clone", "copy_", "_to_copy", "cat", "stack", "index_select", "gather"}

    def __init__(self, bank_numel: int):
        super().__init__()
        self.bank_numel, self.copies = bank_numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        tensors = [a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        tensors += [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]
        if name in self.COPIES and any(t.numel() == self.bank_numel for t in tensors):
            self.copies.append(str(func))
        return out


SPLIT_READERS = [b for b in backends.BACKENDS if backends.BACKENDS[b].split_banks]


@pytest.mark.parametrize("backend", SPLIT_READERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("similarity", ["dot", "l2"])
def test_split_bank_views_are_read_in_place(backend, dtype, similarity):
    """A training step through a split bank copies no bank, forward or backward; the gradient of the
    projection's rows arrives in their own layout (autograd's transposes of the view need no copy)."""
    case = (3, 37, 4, 16, 16, 5)
    b, s, h, d, dv, nq = case
    require(backend)
    rows = make((b, s, h * d), dtype, 16).requires_grad_()
    qrows = make((b, nq, h * d), dtype, 17).requires_grad_()
    q = _split(qrows, h)
    with _BankCopies(rows.numel()) as seen:
        out = hk.hopfield_update(q, _split(rows, h), beta_for(similarity, d, 1.0), similarity=similarity,
                                 backend=backend)
        out.float().square().sum().backward()
    assert seen.copies == []
    assert rows.grad.stride() == rows.stride()
    # The same check sees a copy where there is one: the bank made contiguous first.
    rows.grad = None
    with _BankCopies(rows.numel()) as seen:
        out = hk.hopfield_update(q, _split(rows, h).contiguous(), 1.0, similarity=similarity, backend=backend)
        out.float().square().sum().backward()
    assert seen.copies


def test_the_op_refuses_a_split_bank_that_does_not_cover_the_queries():
    require("cpu")
    q, x = torch.randn(6, 2, 8), torch.randn(2, 4, 5, 8)
    with pytest.raises(RuntimeError, match="Lo \\* Li = L"):
        torch.ops.hen_kernels.partial(q, x, x, torch.ones(6), 0, 0, None)


@pytest.mark.default_rule
@pytest.mark.parametrize("backend", SPLIT_READERS)
def test_split_views_are_copied_only_for_the_backward_of_many_queries(backend):
    """By default a split bank is read in place: by a forward alone at any number of queries, and where autograd
    records a graph up to ``split_queries_max`` queries per leading index (where that pays, backends.py),
    copied beyond; the answers are the same either way."""
    require(backend)
    most = backends.BACKENDS[backend].split_queries_max
    assert most >= 1
    rows = make((2, 50, 2 * 8), torch.float32, 20)
    for nq, graph, copied in ((most, True, False), (most + 1, True, True), (most + 1, False, False),
                              (4 * most, False, False)):
        q = make((2, 2, nq, 8), torch.float32, 21)
        bank = rows.clone().requires_grad_(graph)
        with _BankCopies(rows.numel()) as seen:
            out = hk.hopfield_update(q, _split(bank, 2), 0.5, backend=backend)
        assert bool(seen.copies) == copied, (nq, graph)
        assert rel_err(out.detach(), ref64(q, _split(rows, 2).contiguous(), 0.5, "dot").out) < TOLERANCE[torch.float32]
