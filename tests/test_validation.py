"""The public API's input contract (docs/design.md §4).

Every bad input to ``hopfield_update``, ``hopfield_partial``, ``hopfield_retrieve``,
``energy`` and ``merge_partials`` must raise a ``ValueError`` or ``TypeError``
whose message starts with the offending argument's name (``energy`` calls its
first argument ``state``).  The positive tests pin down what *is* accepted:
shared and per-leading banks, every documented form of ``beta``, inputs that
require grad with ``backend=None``, and an empty chunk for ``hopfield_partial``.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

import hen_kernels as hk
from hen_kernels import Partial, backends, reference, validation

from .conftest import require

D, N, B = 4, 5, 3
LEAD = (2,)  # the default query's leading dims


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    """The automatic choice must not be steered by the caller's environment."""
    monkeypatch.delenv("HEN_KERNELS_BACKEND", raising=False)


def _base() -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(
        query=torch.randn(LEAD + (B, D), generator=g),
        memory=torch.randn(N, D, generator=g),
        beta=1.5,
    )


def _with_entry(t: torch.Tensor, row: int, col: int, value: float) -> torch.Tensor:
    t = t.clone()
    t[..., row, col] = value
    return t


def _named(arg: str) -> str:
    """A match pattern for a message that starts with ``arg:``."""
    return "^" + re.escape(arg) + ":"


# --- the checks every one of update / partial / retrieve / energy shares ----------

# (id, overrides, exception, argument named).  An override is a value, or a
# callable taking the base inputs; "values", "similarity" and "backend" are passed
# by keyword.  Cases that touch ``values`` do not apply to energy (it takes none).
COMMON = [
    # query
    ("query-not-tensor", {"query": lambda b: b["query"].tolist()}, TypeError, "query"),
    ("query-none", {"query": None}, TypeError, "query"),
    ("query-float64-memory-float32", {"query": lambda b: b["query"].double()}, TypeError, "memory"),
    ("query-float16-memory-float64", {"query": lambda b: b["query"].half(), "memory": lambda b: b["memory"].double()},
     TypeError, "memory"),
    ("query-int64", {"query": lambda b: b["query"].long()}, TypeError, "query"),
    ("query-int32", {"query": lambda b: b["query"].int()}, TypeError, "query"),
    ("query-bool", {"query": lambda b: b["query"] > 0}, TypeError, "query"),
    ("query-complex", {"query": lambda b: b["query"].to(torch.complex64)}, TypeError, "query"),
    ("query-1d", {"query": torch.randn(D)}, ValueError, "query"),
    ("query-0d", {"query": torch.tensor(1.0)}, ValueError, "query"),
    ("query-D0", {"query": torch.randn(2, B, 0), "memory": torch.randn(N, 0)}, ValueError, "query"),
    # memory
    ("memory-not-tensor", {"memory": lambda b: b["memory"].numpy()}, TypeError, "memory"),
    ("memory-none", {"memory": None}, TypeError, "memory"),
    ("memory-float64", {"memory": lambda b: b["memory"].double()}, TypeError, "memory"),
    ("memory-int", {"memory": lambda b: b["memory"].long()}, TypeError, "memory"),
    ("memory-wrong-D", {"memory": torch.randn(N, D + 1)}, ValueError, "memory"),
    ("memory-wrong-D-per-leading", {"memory": torch.randn(2, N, D - 1)}, ValueError, "memory"),
    ("memory-1d", {"memory": torch.randn(D)}, ValueError, "memory"),
    ("memory-too-many-dims", {"memory": torch.randn(1, 2, N, D)}, ValueError, "memory"),
    ("memory-3d-for-2d-query", {"query": torch.randn(B, D), "memory": torch.randn(1, N, D)},
     ValueError, "memory"),
    ("memory-leading-differs", {"memory": torch.randn(3, N, D)}, ValueError, "memory"),
    ("memory-leading-1-not-broadcast", {"memory": torch.randn(1, N, D)}, ValueError, "memory"),
    ("memory-leading-differs-4d",
     {"query": torch.randn(2, 3, B, D), "memory": torch.randn(3, 2, N, D)}, ValueError, "memory"),
    ("memory-float16-vs-float32", {"memory": lambda b: b["memory"].half()}, TypeError, "memory"),
    ("memory-bfloat16-vs-float16",
     {"query": lambda b: b["query"].half(), "memory": lambda b: b["memory"].bfloat16()},
     TypeError, "memory"),
    ("memory-device", {"memory": lambda b: b["memory"].to("meta")}, ValueError, "memory"),
    # values
    ("values-not-tensor", {"values": [[1.0] * D] * N}, TypeError, "values"),
    ("values-float64", {"values": torch.randn(N, D, dtype=torch.float64)}, TypeError, "values"),
    ("values-int", {"values": torch.ones(N, D, dtype=torch.int64)}, TypeError, "values"),
    ("values-wrong-N", {"values": torch.randn(N + 1, 2)}, ValueError, "values"),
    ("values-wrong-N-short", {"values": torch.randn(N - 1, D)}, ValueError, "values"),
    ("values-1d", {"values": torch.randn(N)}, ValueError, "values"),
    ("values-wrong-leading",
     {"memory": torch.randn(2, N, D), "values": torch.randn(3, N, 2)}, ValueError, "values"),
    ("values-wrong-N-per-leading",
     {"memory": torch.randn(2, N, D), "values": torch.randn(2, N + 2, 2)}, ValueError, "values"),
    ("values-float16-vs-float32", {"values": torch.randn(N, 2).half()}, TypeError, "values"),
    ("values-bfloat16-vs-float32", {"values": torch.randn(N, 2).bfloat16()}, TypeError, "values"),
    ("values-Dv0", {"values": torch.randn(N, 0)}, ValueError, "values"),
    ("values-device", {"values": torch.randn(N, 2, device="meta")}, ValueError, "values"),
    # similarity
    ("similarity-unknown", {"similarity": "cosine"}, ValueError, "similarity"),
    ("similarity-wrong-case", {"similarity": "DOT"}, ValueError, "similarity"),
    ("similarity-empty", {"similarity": ""}, ValueError, "similarity"),
    ("similarity-none", {"similarity": None}, TypeError, "similarity"),
    ("similarity-int", {"similarity": 0}, TypeError, "similarity"),
    # beta
    ("beta-zero", {"beta": 0.0}, ValueError, "beta"),
    ("beta-int-zero", {"beta": 0}, ValueError, "beta"),
    ("beta-negative", {"beta": -1.0}, ValueError, "beta"),
    ("beta-inf", {"beta": math.inf}, ValueError, "beta"),
    ("beta-overflow-inf", {"beta": 1e400}, ValueError, "beta"),
    ("beta-int-beyond-float", {"beta": 10**400}, ValueError, "beta"),
    ("beta-beyond-float32", {"beta": 1e39}, ValueError, "beta"),
    ("beta-tensor-float64-beyond-float32", {"beta": torch.tensor(1e39, dtype=torch.float64)}, ValueError, "beta"),
    # below FLOAT32_MIN_BETA a similarity past the float32 range (scored -inf) could carry weight; below
    # float32's smallest normal beta would be 0 in the kernels
    ("beta-below-float32-min", {"beta": 1e-35}, ValueError, "beta"),
    ("beta-subnormal-in-float32", {"beta": 1e-44}, ValueError, "beta"),
    ("beta-tensor-below-float32-min", {"beta": torch.tensor([1.0, 1e-40], dtype=torch.float64)[1]}, ValueError,
     "beta"),
    ("beta-overflows-dot-scores", {"beta": 3e38}, ValueError, "beta"),
    ("beta-overflows-l2-scores", {"beta": 3e38, "similarity": "l2"}, ValueError, "beta"),
    ("scores-overflow-from-large-entries",
     {"query": lambda b: b["query"] * 1e20, "memory": lambda b: b["memory"] * 1e20}, ValueError, "beta"),
    ("l2-scores-overflow-from-large-entries",
     {"query": lambda b: b["query"] * 1e20, "memory": lambda b: b["memory"] * 1e20, "similarity": "l2sq"},
     ValueError, "beta"),
    # a bank row holding NaN makes every lse NaN; the message names the bank, not beta
    ("memory-nan-row", {"memory": lambda b: _with_entry(b["memory"], 3, 1, math.nan)}, ValueError, "memory"),
    ("beta-nan", {"beta": math.nan}, ValueError, "beta"),
    ("beta-bool", {"beta": True}, TypeError, "beta"),
    ("beta-str", {"beta": "1.0"}, TypeError, "beta"),
    ("beta-none", {"beta": None}, TypeError, "beta"),
    ("beta-list", {"beta": [1.0, 1.0]}, TypeError, "beta"),
    ("beta-int-tensor", {"beta": torch.tensor([1, 2])}, TypeError, "beta"),
    ("beta-int-tensor-0d", {"beta": torch.tensor(2)}, TypeError, "beta"),
    ("beta-bool-tensor", {"beta": torch.tensor(True)}, TypeError, "beta"),
    ("beta-complex-tensor", {"beta": torch.tensor(1 + 0j)}, TypeError, "beta"),
    ("beta-shape-not-broadcastable", {"beta": torch.ones(3)}, ValueError, "beta"),
    ("beta-shape-too-many-dims", {"beta": torch.ones(1, 2)}, ValueError, "beta"),
    ("beta-shape-includes-B", {"beta": torch.ones(2, B)}, ValueError, "beta"),
    ("beta-shape-for-unbatched-query", {"query": torch.randn(B, D), "beta": torch.ones(1)},
     ValueError, "beta"),
    ("beta-tensor-zero-entry", {"beta": torch.tensor([1.0, 0.0])}, ValueError, "beta"),
    ("beta-tensor-negative-entry", {"beta": torch.tensor([-1.0, 2.0])}, ValueError, "beta"),
    ("beta-tensor-nan-entry", {"beta": torch.tensor([1.0, math.nan])}, ValueError, "beta"),
    ("beta-tensor-inf-entry", {"beta": torch.tensor([math.inf, 1.0])}, ValueError, "beta"),
    ("beta-tensor-0d-zero", {"beta": torch.tensor(0.0)}, ValueError, "beta"),
    ("beta-tensor-device", {"beta": torch.ones(2, device="meta")}, ValueError, "beta"),
    # backend
    ("backend-unknown", {"backend": "numpy"}, ValueError, "backend"),
    ("backend-empty-str", {"backend": ""}, ValueError, "backend"),
    ("backend-not-str", {"backend": 1}, TypeError, "backend"),
    ("backend-not-str-list", {"backend": ["torch"]}, TypeError, "backend"),
    ("backend-cpu-float64",
     {"query": lambda b: b["query"].double(), "memory": lambda b: b["memory"].double(), "backend": "cpu"},
     ValueError, "backend"),
]

EMPTY_BANK = [
    ("memory-empty-bank", {"memory": torch.randn(0, D)}, ValueError, "memory"),
    ("memory-empty-bank-per-leading", {"memory": torch.randn(2, 0, D)}, ValueError, "memory"),
    ("memory-empty-bank-with-values",
     {"memory": torch.randn(0, D), "values": torch.randn(0, 2)}, ValueError, "memory"),
]

FUNCS = {
    "update": hk.hopfield_update,
    "partial": hk.hopfield_partial,
    "retrieve": hk.hopfield_retrieve,
    "energy": hk.energy,
}


def _call(fn_name: str, overrides: dict):
    args = _base()
    for k, v in overrides.items():
        args[k] = v(args) if callable(v) else v
    query, memory, beta = args.pop("query"), args.pop("memory"), args.pop("beta")
    return FUNCS[fn_name](query, memory, beta, **args)


def _cases():
    for fn_name in FUNCS:
        table = COMMON + (EMPTY_BANK if fn_name != "partial" else [])
        for case_id, overrides, exc, arg in table:
            if fn_name == "energy":
                if "values" in overrides:
                    continue
                arg = "state" if arg == "query" else arg
            yield pytest.param(fn_name, overrides, exc, arg, id=f"{fn_name}-{case_id}")


@pytest.mark.parametrize("fn_name, overrides, exc, arg", list(_cases()))
def test_bad_input_names_the_argument(fn_name, overrides, exc, arg):
    with pytest.raises(exc, match=_named(arg)):
        _call(fn_name, overrides)


@pytest.mark.parametrize("fn_name", ["update", "partial", "retrieve"])
@pytest.mark.parametrize("similarity", ["dot", "l2", "l2sq"])
@pytest.mark.parametrize("backend", ["torch", "cpu", None])
@pytest.mark.parametrize("bad", ["memory-inf", "values-inf", "values-nan"])
def test_a_bank_row_holding_inf_is_refused_by_name(fn_name, similarity, backend, bad):
    """A row scored -inf (an inf entry against queries of the other sign) leaves every lse finite, yet adds
    0 · inf = NaN to every query's out: each backend and path refuses it, naming the bank (the CPU one-call
    paths and the general path alike), where the fused path had answered NaN and the reference had named beta."""
    require(backend or "torch", B, N, D)
    args = _base()
    args["query"][..., 1] = -args["query"][..., 1].abs()
    if bad == "memory-inf":
        args["memory"] = _with_entry(args["memory"], 3, 1, math.inf)
    else:
        args["values"] = _with_entry(torch.randn(N, 3), 3, 2, math.inf if bad == "values-inf" else math.nan)
    query, memory, beta = args.pop("query"), args.pop("memory"), args.pop("beta")
    with pytest.raises(ValueError, match=_named(bad.split("-")[0])):
        FUNCS[fn_name](query, memory, beta, similarity=similarity, backend=backend, **args)


@pytest.mark.parametrize("backend", ["cpu", None])
def test_values_whose_weighted_sum_overflows_are_refused_by_name(backend):
    """Value entries near the float32 maximum: the kernel sums the weighted rows before it divides,
    so the sum can overflow where the answer would not (it answered inf)."""
    require(backend or "torch", B, N, D)
    args = _base()
    values = torch.full((N, 3), 3e38)
    with pytest.raises(ValueError, match=_named("values")):
        hk.hopfield_update(args["query"], args["memory"], 1e-3, values=values, backend=backend)
    # large values that would have summed within range, beta·sim past it: beta is named, not the values
    with pytest.raises(ValueError, match=_named("beta")):
        hk.hopfield_update(args["query"] * 1e20, args["memory"] * 1e20, 1.0, values=values / 3, backend=backend)


def test_a_nan_query_beside_a_finite_bank_keeps_its_nan_answer_alone():
    args = _base()
    args["query"][..., 0, 2] = math.nan
    out = hk.hopfield_update(args["query"], args["memory"], args["beta"])
    assert out[..., 0, :].isnan().all() and torch.isfinite(out[..., 1:, :]).all()


def test_float64_inputs_take_any_positive_beta():
    """FLOAT32_MIN_BETA binds where beta is applied in float32; the float64 reference takes 1e-35 and answers
    the uniform average it tends to."""
    q, x = torch.randn(3, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    torch.testing.assert_close(hk.hopfield_update(q, x, 1e-35), x.mean(0).expand(3, 4))
    with pytest.raises(ValueError, match="^beta: expected at least 1e-30"):
        hk.hopfield_update(q.float(), x.float(), 1e-35)


def test_a_bank_of_the_wrong_rank_is_told_the_shapes_it_may_have():
    with pytest.raises(ValueError) as e:
        hk.hopfield_update(torch.randn(5, 8), torch.randn(8), 0.5)
    assert str(e.value) == "memory: expected shape (N, 8) to match query (5, 8), got (8,)"
    with pytest.raises(ValueError) as e:
        hk.hopfield_update(torch.randn(2, 5, 8), torch.randn(8), 0.5)
    assert str(e.value) == "memory: expected shape (N, 8) or (2, N, 8) to match query (2, 5, 8), got (8,)"


def test_table_covers_every_public_function():
    ids = {fn for fn, *_ in (p.values for p in _cases())}
    assert ids == set(FUNCS)


# --- the environment variable ------------------------------------------------------

@pytest.mark.parametrize("fn_name", list(FUNCS))
def test_env_backend_unknown_names_the_variable(fn_name, monkeypatch):
    monkeypatch.setenv("HEN_KERNELS_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match=_named("HEN_KERNELS_BACKEND")) as info:
        _call(fn_name, {})
    assert "no-such-backend" in str(info.value)


@pytest.mark.parametrize("fn_name", list(FUNCS))
def test_explicit_backend_beats_env(fn_name, monkeypatch):
    monkeypatch.setenv("HEN_KERNELS_BACKEND", "no-such-backend")
    _call(fn_name, {"backend": "torch"})


@pytest.mark.parametrize("fn_name", list(FUNCS))
def test_env_backend_empty_means_automatic(fn_name, monkeypatch):
    monkeypatch.setenv("HEN_KERNELS_BACKEND", "")
    _call(fn_name, {})


@pytest.mark.parametrize("fn_name", ["update", "partial", "retrieve"])
def test_env_backend_torch_is_used(fn_name, monkeypatch):
    monkeypatch.setenv("HEN_KERNELS_BACKEND", "torch")
    _call(fn_name, {})


def test_cpu_backend_with_grad_or_refused_when_unavailable():
    """'cpu' is differentiable where it is built; where it is not, a named ValueError."""
    q = _base()["query"].requires_grad_()
    if "cpu" not in hk.available_backends():
        with pytest.raises(ValueError, match=_named("backend")):
            hk.hopfield_update(q, _base()["memory"], 1.0, backend="cpu")
        return
    hk.hopfield_update(q, _base()["memory"], 1.0, backend="cpu").sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


# --- hopfield_partial: offset, and the empty chunk -----------------------------------

@pytest.mark.parametrize(
    "offset, exc",
    [
        pytest.param(-1, ValueError, id="negative"),
        pytest.param(1.0, TypeError, id="float"),
        pytest.param(2.5, TypeError, id="fractional-float"),
        pytest.param(True, TypeError, id="bool"),
        pytest.param(False, TypeError, id="bool-false"),
        pytest.param("3", TypeError, id="str"),
        pytest.param(None, TypeError, id="none"),
        pytest.param(torch.tensor(2), TypeError, id="tensor"),
        pytest.param(2**64, ValueError, id="beyond-int64"),
        pytest.param(2**63, ValueError, id="int64-max-plus-1"),
        pytest.param(2**63 - 2, ValueError, id="last-row-beyond-int64"),
    ],
)
def test_partial_bad_offset(offset, exc):
    with pytest.raises(exc, match=_named("offset")):
        _call("partial", {"offset": offset})


@pytest.mark.parametrize("offset", [0, 7, 2**63 - N])
def test_partial_offset_shifts_top_index(offset):
    b = _base()
    p0 = hk.hopfield_partial(b["query"], b["memory"], b["beta"])
    p = hk.hopfield_partial(b["query"], b["memory"], b["beta"], offset=offset)
    assert torch.equal(p.top_index, p0.top_index + offset)


@pytest.mark.parametrize("offset", [0, 11])
@pytest.mark.parametrize(
    "memory, values, dv",
    [
        pytest.param(torch.randn(0, D), None, D, id="shared"),
        pytest.param(torch.randn(2, 0, D), None, D, id="per-leading"),
        pytest.param(torch.randn(0, D), torch.randn(0, 3), 3, id="shared-values"),
        pytest.param(torch.randn(2, 0, D), torch.randn(2, 0, 6), 6, id="per-leading-values"),
    ],
)
def test_partial_empty_bank_is_the_identity(memory, values, dv, offset):
    b = _base()
    p = hk.hopfield_partial(b["query"], memory, b["beta"], values=values, offset=offset)
    assert isinstance(p, Partial)
    assert p.out.shape == LEAD + (B, dv)
    assert p.lse.shape == p.top_score.shape == p.top_index.shape == LEAD + (B,)
    assert torch.equal(p.out, torch.zeros_like(p.out))
    assert bool(torch.isneginf(p.lse).all())
    assert bool(torch.isneginf(p.top_score).all())
    assert p.top_index.dtype == torch.int64
    assert bool((p.top_index == -1).all())
    # merging it with a real chunk changes nothing
    full_values = None if values is None else torch.randn(memory.shape[:-2] + (N, dv))
    full = hk.hopfield_partial(b["query"], torch.randn(memory.shape[:-2] + (N, D)), b["beta"],
                               values=full_values)
    for merged in (hk.merge_partials([p, full]), hk.merge_partials([full, p])):
        torch.testing.assert_close(merged.out, full.out)
        torch.testing.assert_close(merged.lse, full.lse)
        assert torch.equal(merged.top_index, full.top_index)


def test_partial_all_empty_merge_stays_empty():
    b = _base()
    p = hk.hopfield_partial(b["query"], torch.randn(0, D), b["beta"])
    m = hk.merge_partials([p, p])
    assert torch.equal(m.out, torch.zeros_like(m.out))
    assert bool(torch.isneginf(m.lse).all())
    assert bool((m.top_index == -1).all())


# --- hopfield_retrieve: max_steps, tol, Dv -------------------------------------------

@pytest.mark.parametrize(
    "overrides, exc, arg",
    [
        pytest.param({"max_steps": 0}, ValueError, "max_steps", id="max_steps-0"),
        pytest.param({"max_steps": -3}, ValueError, "max_steps", id="max_steps-negative"),
        pytest.param({"max_steps": 2.0}, TypeError, "max_steps", id="max_steps-float"),
        pytest.param({"max_steps": True}, TypeError, "max_steps", id="max_steps-bool"),
        pytest.param({"max_steps": None}, TypeError, "max_steps", id="max_steps-none"),
        pytest.param({"max_steps": "2"}, TypeError, "max_steps", id="max_steps-str"),
        pytest.param({"max_steps": torch.tensor(2)}, TypeError, "max_steps", id="max_steps-tensor"),
        pytest.param({"tol": -1e-3}, ValueError, "tol", id="tol-negative"),
        pytest.param({"tol": math.nan}, ValueError, "tol", id="tol-nan"),
        pytest.param({"tol": math.inf}, ValueError, "tol", id="tol-inf"),
        pytest.param({"tol": "0.1"}, TypeError, "tol", id="tol-str"),
        pytest.param({"tol": True}, TypeError, "tol", id="tol-bool"),
        pytest.param({"tol": torch.tensor(0.1)}, TypeError, "tol", id="tol-tensor"),
        pytest.param({"max_steps": 2, "values": torch.randn(N, D + 1)}, ValueError, "values",
                     id="multi-step-Dv-ne-D"),
        pytest.param({"max_steps": 3, "tol": 1e-4, "values": torch.randn(N, 2)}, ValueError,
                     "values", id="multi-step-tol-Dv-ne-D"),
        pytest.param({"max_steps": 2, "memory": torch.randn(2, N, D), "values": torch.randn(2, N, 1)},
                     ValueError, "values", id="multi-step-per-leading-Dv-ne-D"),
    ],
)
def test_retrieve_bad_steps(overrides, exc, arg):
    with pytest.raises(exc, match=_named(arg)):
        _call("retrieve", overrides)


@pytest.mark.parametrize("tol", [None, 0, 0.0, 1e-3])
def test_retrieve_accepts_tol(tol):
    r = _call("retrieve", {"max_steps": 3, "tol": tol})
    assert r.state.shape == LEAD + (B, D)
    assert r.steps.shape == LEAD + (B,)


@pytest.mark.parametrize("tol", [None, 1e-3])
def test_retrieve_single_step_Dv_ne_D(tol):
    """Either answer is a fair contract: a (..., B, Dv) state, or a ValueError naming values."""
    try:
        r = _call("retrieve", {"max_steps": 1, "tol": tol, "values": torch.randn(N, D + 3)})
    except ValueError as e:
        assert re.match(_named("values"), str(e)), str(e)
    else:
        assert r.state.shape == LEAD + (B, D + 3)


# --- merge_partials ------------------------------------------------------------------

def _partial(lead=LEAD, b=B, dv=D, n=N, offset=0) -> Partial:
    g = torch.Generator().manual_seed(1)
    return hk.hopfield_partial(torch.randn(lead + (b, D), generator=g), torch.randn(n, D, generator=g),
                               1.0, values=torch.randn(n, dv, generator=g), offset=offset)


@pytest.mark.parametrize(
    "make, exc, arg",
    [
        pytest.param(lambda: [], ValueError, "partials", id="empty-list"),
        pytest.param(lambda: (), ValueError, "partials", id="empty-tuple"),
        pytest.param(lambda: None, TypeError, "partials", id="none"),
        pytest.param(lambda: 3, TypeError, "partials", id="int"),
        pytest.param(lambda: _partial(), TypeError, "partials", id="bare-partial"),
        pytest.param(lambda: iter([_partial()]), TypeError, "partials", id="iterator"),
        pytest.param(lambda: (p for p in [_partial()]), TypeError, "partials", id="generator"),
        pytest.param(lambda: {0: _partial()}, TypeError, "partials", id="dict"),
        pytest.param(lambda: {_partial().lse.sum().item()}, TypeError, "partials", id="set"),
        pytest.param(lambda: [_partial(), "not a partial"], TypeError, "partials[1]", id="str-item"),
        pytest.param(lambda: [None], TypeError, "partials[0]", id="none-item"),
        pytest.param(lambda: [_partial(), tuple(_partial())], TypeError, "partials[1]",
                     id="plain-tuple-item"),
        pytest.param(lambda: [_partial(), _partial().out], TypeError, "partials[1]", id="tensor-item"),
        pytest.param(lambda: [_partial(), _partial(b=B + 1)], ValueError, "partials[1]",
                     id="mismatched-B"),
        pytest.param(lambda: [_partial(), _partial(dv=D + 1)], ValueError, "partials[1]",
                     id="mismatched-Dv"),
        pytest.param(lambda: [_partial(), _partial(lead=(3,))], ValueError, "partials[1]",
                     id="mismatched-leading"),
        pytest.param(lambda: [_partial(), _partial(), _partial(lead=())], ValueError, "partials[2]",
                     id="mismatched-ndim"),
        pytest.param(lambda: [_partial(), Partial(*(t.to("meta") for t in _partial()))], ValueError,
                     "partials[1]", id="mismatched-device"),
    ],
)
def test_merge_bad_input(make, exc, arg):
    with pytest.raises(exc, match=_named(arg)):
        hk.merge_partials(make())


def test_merge_accepts_list_and_tuple():
    a, b = _partial(n=N), _partial(n=2, offset=N)
    for seq in ([a, b], (a, b)):
        m = hk.merge_partials(seq)
        assert isinstance(m, Partial)
        assert m.out.shape == a.out.shape


# --- what is accepted: leading dims, banks, beta forms --------------------------------

BT, H = 2, 3


def _loop_reference(query, memory, beta_lead, similarity, values=None):
    """reference.update / reference.energy, one leading index at a time."""
    lead = query.shape[:-2]
    out = torch.empty(lead + (query.shape[-2], (values if values is not None else memory).shape[-1]))
    en = torch.empty(lead + (query.shape[-2],))
    for idx in torch.cartesian_prod(*(torch.arange(s) for s in lead)).reshape(-1, len(lead)).tolist():
        idx = tuple(idx)
        x = memory if memory.dim() == 2 else memory[idx]
        v = None if values is None else (values if values.dim() == 2 else values[idx])
        b = float(beta_lead[idx])
        out[idx] = reference.update(query[idx], x, b, similarity, v)
        en[idx] = reference.energy(query[idx], x, b, similarity)
    return out, en


@pytest.mark.parametrize("similarity", ["dot", "l2", "l2sq"])
@pytest.mark.parametrize("per_leading", [False, True], ids=["shared-bank", "per-leading-bank"])
@pytest.mark.parametrize("with_values", [False, True], ids=["no-values", "values"])
def test_leading_dims_banks_match_loop(similarity, per_leading, with_values):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(BT, H, B, D, generator=g)
    bank_lead = (BT, H) if per_leading else ()
    x = torch.randn(bank_lead + (N, D), generator=g)
    v = torch.randn(bank_lead + (N, 6), generator=g) if with_values else None
    beta = 0.8
    out = hk.hopfield_update(q, x, beta, similarity=similarity, values=v)
    want, want_e = _loop_reference(q, x, torch.full((BT, H), beta), similarity, v)
    assert out.shape == q.shape[:-1] + (want.shape[-1],)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    e = hk.energy(q, x, beta, similarity=similarity)
    assert e.dtype == torch.float32 and e.shape == (BT, H, B)
    torch.testing.assert_close(e, want_e, atol=1e-4, rtol=1e-5)
    p = hk.hopfield_partial(q, x, beta, similarity=similarity, values=v)
    torch.testing.assert_close(p.finalize(), want, atol=1e-5, rtol=1e-5)
    if v is None:  # retrieve with Dv != D: see test_retrieve_single_step_Dv_ne_D
        r = hk.hopfield_retrieve(q, x, beta, similarity=similarity)
        torch.testing.assert_close(r.state, want, atol=1e-5, rtol=1e-5)


_BETA_LEAD = torch.tensor([[0.5, 1.0, 2.0], [3.0, 0.25, 1.5]])  # (BT, H)

BETA_FORMS = [
    pytest.param(lambda: 1.25, lambda: torch.full((BT, H), 1.25), id="float"),
    pytest.param(lambda: 2, lambda: torch.full((BT, H), 2.0), id="int"),
    pytest.param(lambda: torch.tensor(0.75), lambda: torch.full((BT, H), 0.75), id="0d-tensor"),
    pytest.param(lambda: torch.tensor(0.75, dtype=torch.float64), lambda: torch.full((BT, H), 0.75),
                 id="0d-float64-tensor"),
    pytest.param(lambda: _BETA_LEAD.clone(), lambda: _BETA_LEAD, id="leading-shape"),
    pytest.param(lambda: _BETA_LEAD[0].clone(), lambda: _BETA_LEAD[0].expand(BT, H), id="shape-H"),
    pytest.param(lambda: _BETA_LEAD[:, :1].clone(), lambda: _BETA_LEAD[:, :1].expand(BT, H),
                 id="shape-Bt-1"),
    pytest.param(lambda: torch.tensor([[1.75]]), lambda: torch.full((BT, H), 1.75), id="shape-1-1"),
    pytest.param(lambda: _BETA_LEAD.half(), lambda: _BETA_LEAD.half().float(), id="float16-tensor"),
]


@pytest.mark.parametrize("per_leading", [False, True], ids=["shared-bank", "per-leading-bank"])
@pytest.mark.parametrize("make_beta, make_lead", BETA_FORMS)
def test_beta_forms_match_loop(make_beta, make_lead, per_leading):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(BT, H, B, D, generator=g)
    x = torch.randn(((BT, H) if per_leading else ()) + (N, D), generator=g)
    beta = make_beta()
    want, want_e = _loop_reference(q, x, make_lead(), "dot")
    torch.testing.assert_close(hk.hopfield_update(q, x, beta), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hk.energy(q, x, beta), want_e, atol=1e-4, rtol=1e-5)
    r = hk.hopfield_retrieve(q, x, beta, max_steps=1)
    torch.testing.assert_close(r.state, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_accepted_dtypes_keep_the_query_dtype(dtype):
    b = _base()
    q, x = b["query"].to(dtype), b["memory"].to(dtype)
    out = hk.hopfield_update(q, x, 1.0, values=torch.randn(N, 2).to(dtype))
    assert out.dtype == dtype and out.shape == LEAD + (B, 2)
    assert hk.energy(q, x, 1.0).dtype == torch.float32
    assert hk.hopfield_retrieve(q, x, 1.0, max_steps=2).state.dtype == dtype


def test_unbatched_query_is_accepted():
    b = _base()
    q = b["query"][0]
    out = hk.hopfield_update(q, b["memory"], torch.tensor(1.5))
    torch.testing.assert_close(out, reference.update(q, b["memory"], 1.5), atol=1e-5, rtol=1e-5)
    assert hk.energy(q, b["memory"], 1.5).shape == (B,)


# --- gradients with backend=None -----------------------------------------------------

def test_grad_flows_with_automatic_backend():
    g = torch.Generator().manual_seed(4)
    q0 = torch.randn(BT, H, B, D, generator=g)
    x0 = torch.randn(N, D, generator=g)
    beta0 = _BETA_LEAD[0].clone()

    q, x, beta = (t.clone().requires_grad_() for t in (q0, x0, beta0))
    out = hk.hopfield_update(q, x, beta)  # backend=None
    assert out.requires_grad
    (out * torch.arange(out.numel()).reshape(out.shape).sin()).sum().backward()

    qr, xr, br = (t.clone().requires_grad_() for t in (q0, x0, beta0))
    want = reference.update(qr, xr, br.expand(BT, H))
    (want * torch.arange(want.numel()).reshape(want.shape).sin()).sum().backward()

    for got, ref in ((q.grad, qr.grad), (x.grad, xr.grad), (beta.grad, br.grad)):
        assert got is not None and bool(torch.isfinite(got).all())
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fn_name", ["partial", "retrieve", "energy"])
def test_grad_flows_through_other_entry_points(fn_name):
    b = _base()
    q = b["query"].requires_grad_()
    res = _call(fn_name, {"query": q})
    t = {"partial": lambda r: r.out, "retrieve": lambda r: r.state, "energy": lambda r: r}[fn_name](res)
    t.sum().backward()
    assert q.grad is not None and bool(torch.isfinite(q.grad).all())
    assert bool((q.grad != 0).any())


def test_no_grad_context_ignores_requires_grad():
    b = _base()
    q = b["query"].requires_grad_()
    with torch.no_grad():
        out = hk.hopfield_update(q, b["memory"], 1.0)
    assert not out.requires_grad


@pytest.mark.parametrize("backend", hk.available_backends())
def test_float_beta_from_inference_mode_does_not_reach_a_call_with_grad(backend):
    # A float beta's tensor is made once and shared by later calls (validation._float_beta);
    # one made under inference_mode is an inference tensor, which autograd refuses to save.
    b = _base()
    with torch.inference_mode():
        hk.hopfield_update(b["query"], b["memory"], 1.75, backend=backend)
    x = b["memory"].clone().requires_grad_()
    hk.hopfield_update(b["query"], x, 1.75, backend=backend).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def test_float_beta_tensors_stay_bounded_and_unchanged():
    b = _base()
    for i in range(200):  # a sweep of beta: the shared tensors are capped, each call gets its own value
        out = hk.hopfield_update(b["query"], b["memory"], 0.5 + i / 100)
    assert len(validation._FLOAT_BETAS) <= validation._FLOAT_BETAS_MAX
    ref = hk.hopfield_update(b["query"], b["memory"], torch.tensor(0.5 + 199 / 100))  # (a tensor beta: not shared)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


# --- gaps found in review, now refused by name -----------------------------------------

@pytest.mark.parametrize("fn_name", list(FUNCS))
@pytest.mark.parametrize("arg", ["query", "memory"])
def test_sparse_input_is_refused(fn_name, arg):
    name = "state" if (fn_name == "energy" and arg == "query") else arg
    with pytest.raises((TypeError, ValueError), match=_named(name)):
        _call(fn_name, {arg: lambda b: b[arg].to_sparse()})


@pytest.mark.parametrize("fn_name", list(FUNCS))
def test_0d_beta_on_unreadable_device_is_refused(fn_name):
    with pytest.raises((TypeError, ValueError), match=_named("beta")):
        _call(fn_name, {"beta": torch.tensor(1.0, device="meta")})


@pytest.fixture
def meta_unserved(monkeypatch):
    """A device type no backend serves: meta, taken from the cpu backend (whose op gives meta tensors their
    shapes) for the test."""
    monkeypatch.setattr(backends.BACKENDS["cpu"], "device_types", ("cpu",))


def test_unsupported_device_with_tensor_beta_is_refused(meta_unserved):
    b = _base()
    q, x = b["query"].to("meta"), b["memory"].to("meta")
    with pytest.raises(ValueError, match=r"^(query|beta):"):
        hk.hopfield_update(q, x, torch.ones(LEAD, device="meta"))


def test_unsupported_device_with_float_beta_is_refused(meta_unserved):
    b = _base()
    with pytest.raises(ValueError, match=_named("query")):
        hk.hopfield_update(b["query"].to("meta"), b["memory"].to("meta"), 1.0)


@pytest.mark.parametrize("field", ["top_score", "top_index"])
def test_merge_mismatched_top_fields_are_refused(field):
    p = _partial()
    bad = p._replace(**{field: getattr(p, field)[..., :1]})
    with pytest.raises(ValueError, match=_named("partials[1]")):
        hk.merge_partials([p, bad])


@pytest.mark.parametrize("where", ["first", "second"])
def test_merge_partial_with_non_tensor_fields_is_refused(where):
    bad = Partial(1, 2, 3, 4)
    seq = [bad, _partial()] if where == "first" else [_partial(), bad]
    with pytest.raises(TypeError, match=r"^partials\[[01]\]"):
        hk.merge_partials(seq)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64, "float16"])
def test_finalize_refuses_what_is_no_state(dtype):
    """A state rounded to integers or booleans (or named by a string) is refused, not cast."""
    p = _partial()
    with pytest.raises(TypeError, match="^dtype: expected a floating torch.dtype"):
        p.finalize(dtype)
    assert p.finalize(torch.bfloat16).dtype == torch.bfloat16 and p.finalize() is p.out
