"""Every kernel backend against the reference (docs/design.md §5)."""
import os

import pytest
import torch

import hen_kernels as hk
from hen_kernels import backends

from .conftest import (BETA_LEVELS, DTYPES, MAKE_DEVICE, SIMILARITIES, TOLERANCE, beta_for, device_of,
                       kernel_backends, make, ref64, rel_err, require)

# Not multiples of any block size, plus the edges: B = 1, N = 1, D = 1 and D up to 4096.
SHAPES = [(1, 1, 1), (3, 17, 3), (17, 129, 64), (1, 1000, 129), (64, 257, 17), (5, 70, 300), (5, 300, 4096),
          (2, 3000, 512)]


@pytest.fixture(autouse=True)
def _inputs_on_the_backends_device(request):
    """The shared cases below run every backend on its own device: `make` puts the
    data where the test's backend runs (the GPU for cuda and compiled Triton)."""
    params = getattr(request.node, "callspec", None)
    backend = params.params.get("backend") if params else None
    MAKE_DEVICE["device"] = device_of(backend) if backend else "cpu"
    yield
    MAKE_DEVICE["device"] = "cpu"


def test_cpu_extension_is_built():
    """The suite must not pass by skipping: the C++ backend loads unless deliberately left out."""
    if os.environ.get("HEN_KERNELS_SKIP_EXT") == "1":
        pytest.skip("HEN_KERNELS_SKIP_EXT=1: built without the extension")
    assert backends.BACKENDS["cpu"].unavailable_reason is None
    assert "cpu" in hk.available_backends()
    info = dict(item.split("=") for item in torch.ops.hen_kernels.cpu_info().split())
    assert info["isa"] in ("avx512", "avx2", "baseline")
    if "OpenMP" in torch.__config__.parallel_info():
        assert info["openmp"] != "none", "the kernel's at::parallel_for would run on one thread"


def test_cpu_is_the_automatic_choice_for_cpu_tensors(monkeypatch):
    require("cpu")
    monkeypatch.delenv(backends.ENV_BACKEND, raising=False)
    q = torch.randn(2, 8)
    inp = hk.validation.check_inputs(q, torch.randn(5, 8), 1.0, "dot")
    assert backends.resolve(None, inp).name == "cpu"
    monkeypatch.setenv(backends.ENV_BACKEND, "torch")
    assert backends.resolve(None, inp).name == "torch"


def check_partial(p, ref, dtype, top=True):
    tol = TOLERANCE[dtype]
    assert p.out.dtype == torch.float32 and p.lse.dtype == torch.float32 and p.top_index.dtype == torch.int64
    assert not torch.isnan(p.out).any()
    assert rel_err(p.out, ref.out) <= tol
    assert rel_err(p.lse, ref.lse) <= tol
    assert rel_err(p.top_score, ref.top_score) <= tol
    if top:
        # top_index must agree wherever the best score beats the runner-up by more than the error.
        assert_top_index(p, ref, tol)


def assert_top_index(p, ref, tol):
    agree = p.top_index == ref.top_index
    margin_ok = (p.top_score.double() - ref.top_score).abs() <= tol * ref.top_score.abs().clamp_min(1)
    assert torch.all(agree | margin_ok)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%d-N%d-D%d" % s)
def test_partial_matches_reference(backend, dtype, similarity, shape):
    require(backend, *shape)
    b, n, d = shape
    q, x = make((b, d), dtype, 1), make((n, d), dtype, 2)
    for level in BETA_LEVELS:
        beta = beta_for(similarity, d, level)
        p = hk.hopfield_partial(q, x, beta, similarity=similarity, backend=backend)
        check_partial(p, ref64(q, x, beta, similarity), dtype)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_values_differ_from_memory_and_leading_dims(backend, dtype, similarity):
    require(backend)
    q = make((2, 3, 5, 33), dtype, 3)
    x_shared, x_own = make((70, 33), dtype, 4), make((2, 3, 70, 33), dtype, 5)
    v_shared, v_own = make((70, 11), dtype, 6), make((2, 3, 70, 11), dtype, 7)
    beta = torch.tensor([[0.05, 0.1, 0.2], [0.3, 0.02, 0.15]], device=q.device)
    for x, v in ((x_shared, v_shared), (x_own, v_own), (x_own, None)):
        p = hk.hopfield_partial(q, x, beta, similarity=similarity, values=v, backend=backend, offset=7)
        assert p.out.shape == (2, 3, 5, 11 if v is not None else 33)
        check_partial(p, ref64(q, x, beta, similarity, v, offset=7), dtype)
        out = hk.hopfield_update(q, x, beta, similarity=similarity, values=v, backend=backend)
        assert out.dtype == dtype
        assert rel_err(out, ref64(q, x, beta, similarity, v).out) <= 2 * TOLERANCE[dtype]


@pytest.mark.parametrize("backend", kernel_backends())
def test_non_contiguous_inputs(backend):
    require(backend)
    q = make((9, 40), torch.float32, 8)[::2, :33]
    x = make((100, 66), torch.float32, 9)[:, ::2]
    p = hk.hopfield_partial(q, x, 0.2, similarity="l2", backend=backend)
    check_partial(p, ref64(q, x, 0.2, "l2"), torch.float32)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("chunks", [[1], [1, 1], [3, 1, 2], [1, 5, 1, 1]])
def test_any_split_of_the_bank_merges_to_the_whole(backend, similarity, chunks):
    require(backend)
    n, d = 600, 48
    q, x = make((2, 7, d), torch.float32, 10), make((n, d), torch.float32, 11)
    v = make((n, 5), torch.float32, 12)
    beta = beta_for(similarity, d, 1.0)
    whole = hk.hopfield_partial(q, x, beta, similarity=similarity, values=v, backend=backend)
    bounds = torch.tensor([0] + chunks).cumsum(0) * n // sum(chunks)  # CPU: slice bounds only
    parts = [
        hk.hopfield_partial(q, x[lo:hi], beta, similarity=similarity, values=v[lo:hi], offset=int(lo),
                            backend=backend)
        for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist())
    ]
    merged = hk.merge_partials(parts[::-1])
    check_partial(merged, whole, torch.float32)
    assert torch.equal(merged.top_index, whole.top_index)


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("d", [16, 512, 4096])
def test_hard_retrieval_returns_the_exact_pattern(backend, dtype, similarity, d):
    n = 300
    require(backend, 4, n, d)
    x = make((n, d), dtype, 13)
    rows = torch.tensor([0, 17, 299, 150], device=x.device)
    noise = make((4, d), torch.float32, 14, scale=0.05)
    q = (x[rows].float() + noise).to(dtype)
    for beta in (1e2, 1e4):
        r = hk.hopfield_retrieve(q, x, beta, similarity=similarity, max_steps=3, tol=0.0, backend=backend)
        assert torch.equal(r.top_index, rows)
        assert torch.equal(r.state, x[rows]), "hard retrieval must land exactly on the stored pattern"
        assert torch.all(r.converged) and torch.all(r.top_weight > 0.999)


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_nan_query_leaves_other_queries_intact(backend, similarity):
    require(backend)
    q, x = make((6, 40), torch.float32, 15), make((500, 40), torch.float32, 16)
    beta = beta_for(similarity, 40, 1.0)
    clean = hk.hopfield_partial(q, x, beta, similarity=similarity, backend=backend)
    q_bad = q.clone()
    q_bad[2, 7] = float("nan")
    p = hk.hopfield_partial(q_bad, x, beta, similarity=similarity, backend=backend)
    keep = torch.tensor([0, 1, 3, 4, 5], device=q.device)
    torch.testing.assert_close(p.out[keep], clean.out[keep], rtol=0, atol=0)
    torch.testing.assert_close(p.lse[keep], clean.lse[keep], rtol=0, atol=0)
    assert torch.isnan(p.out[2]).all() and torch.isnan(p.lse[2])
    r = hk.hopfield_retrieve(q_bad, x, beta, similarity=similarity, max_steps=4, tol=1e-6, backend=backend)
    r_clean = hk.hopfield_retrieve(q, x, beta, similarity=similarity, max_steps=4, tol=1e-6, backend=backend)
    torch.testing.assert_close(r.state[keep], r_clean.state[keep], rtol=0, atol=0)
    assert not r.converged[2]


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
@pytest.mark.parametrize("similarity", ["dot", "l2sq"])
@pytest.mark.parametrize("beta", [0.05, 0.5, 5.0])
def test_energy_never_increases(backend, similarity, beta):
    require(backend)
    x = make((200, 24), torch.float32, 17)
    s = make((16, 24), torch.float32, 18)
    e = hk.energy(s, x, beta, similarity=similarity, backend=backend)
    for _ in range(6):
        s = hk.hopfield_update(s, x, beta, similarity=similarity, backend=backend)
        e_next = hk.energy(s, x, beta, similarity=similarity, backend=backend)
        assert torch.all(e_next <= e + 1e-4 * e.abs().clamp_min(1)), (e_next - e).max()
        e = e_next


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_energy_matches_reference(backend, similarity):
    require(backend)
    s, x = make((3, 9, 24), torch.float32, 19), make((150, 24), torch.float32, 20)
    got = hk.energy(s, x, 0.3, similarity=similarity, backend=backend)
    want = hk.energy(s, x, 0.3, similarity=similarity, backend="torch")
    assert got.shape == (3, 9) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", kernel_backends())
def test_retrieve_matches_reference_and_stops_per_query(backend):
    require(backend)
    x = make((400, 32), torch.float32, 21)
    q = torch.cat([x[:3] + 0.01 * make((3, 32), torch.float32, 22), make((4, 32), torch.float32, 23)])
    kw = dict(similarity="l2", max_steps=20, tol=1e-5)
    got = hk.hopfield_retrieve(q, x, 2.0, backend=backend, **kw)
    want = hk.hopfield_retrieve(q, x, 2.0, backend="torch", **kw)
    assert torch.equal(got.steps, want.steps) and torch.equal(got.converged, want.converged)
    assert torch.equal(got.top_index, want.top_index)
    assert rel_err(got.state, want.state) <= 1e-4
    assert got.steps.max() > got.steps.min(), "queries near a pattern stop before the others"


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("n", [0, 1])
def test_tiny_and_empty_banks(backend, n):
    require(backend)
    q, x = make((4, 5), torch.float32, 24), make((n, 5), torch.float32, 25)
    p = hk.hopfield_partial(q, x, 1.0, backend=backend, offset=3)
    if n == 0:
        assert torch.all(p.out == 0) and torch.all(torch.isneginf(p.lse)) and torch.all(p.top_index == -1)
    else:
        torch.testing.assert_close(p.out, x.expand(4, 5))
        assert torch.all(p.top_index == 3)


@pytest.mark.parametrize("backend", kernel_backends())
def test_zero_queries(backend):
    require(backend)
    p = hk.hopfield_partial(make((0, 8), torch.float32, 0), make((10, 8), torch.float32, 0), 1.0, backend=backend)
    assert p.out.shape == (0, 8) and p.lse.shape == (0,)


@pytest.mark.parametrize("backend", ["cpu"])
def test_uses_all_threads_and_agrees_with_one(backend):
    require(backend)
    q, x = make((3, 64), torch.float32, 26), make((20000, 64), torch.float32, 27)
    many = hk.hopfield_partial(q, x, 0.2, backend=backend)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = hk.hopfield_partial(q, x, 0.2, backend=backend)
    finally:
        torch.set_num_threads(threads)
    check_partial(many, one, torch.float32)
