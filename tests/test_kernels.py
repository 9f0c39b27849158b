"""Every kernel backend against the reference (docs/design.md §5)."""
import itertools
import os

import pytest
import torch

import hen_kernels as hk
from hen_kernels import backends, streaming
from hen_kernels.check.cases import far_from_the_origin, tied_bank
from hen_kernels.constants import CONVEX_BOUND, output_tolerance

from .conftest import (BETA_LEVELS, DTYPES, MAKE_DEVICE, SIMILARITIES, TOLERANCE, beta_for,
                       interpreted, kernel_backends, make, ref64, rel_err, require)
from .pending import backend_params, marks

# Not multiples of any block size, plus the edges: B = 1, N = 1, D = 1 and D up to 4096.
SHAPES = [(1, 1, 1), (3, 17, 3), (17, 129, 64), (1, 1000, 129), (64, 257, 17), (5, 70, 300), (5, 300, 4096),
          (2, 3000, 512)]


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
    tol = output_tolerance(dtype, ref.lse)
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


# A 16-bit value product rounds each weight by up to 2^-9 (bfloat16) or 2^-12 (float16) of itself.
# Normalised by the softmax's own sum, the output moved by that fraction of the rows' distance from
# the origin; normalised by the sum of the weights as rounded it stays a convex combination of the
# rows (docs/design.md §5.1).  CONVEX_BOUND is in units of the rows' spread (its comment says why
# only bfloat16's tells the two normalisations apart here).


def convex_cases():
    """Every backend, 16-bit dtype, similarity and shape; under the Triton interpreter, whose autotuner
    runs every config of each new key (~10 s), three: both kernels, both dtypes, split banks."""
    shapes = [(1, 600, 64), (5, 600, 64), (1, 600, 300), (1, 3000, 64), (70, 3000, 64)]
    interpreted_cases = {((5, 600, 64), torch.float16, "dot"), ((5, 600, 64), torch.bfloat16, "l2"),
                         ((1, 600, 300), torch.bfloat16, "l2sq")}
    for backend, dtype, sim, shape in itertools.product(kernel_backends(), (torch.bfloat16, torch.float16),
                                                        SIMILARITIES, shapes):
        if interpreted(backend) and (shape, dtype, sim) not in interpreted_cases:
            continue
        yield pytest.param(backend, dtype, sim, shape, id="%s-%s-%s-B%d-N%d-D%d" % (backend, str(dtype)[6:], sim,
                                                                                   *shape))


@pytest.mark.parametrize("backend,dtype,similarity,shape", list(convex_cases()))
def test_16bit_output_stays_a_convex_combination_far_from_the_origin(backend, dtype, similarity, shape):
    """Rows at 16 +- 0.25 per feature, soft weights (scores spread by about 1): every element of out
    within CONVEX_BOUND x their spread of float64's; lse from the exact sum.  One query, a few, two query
    blocks; one bank split and several (the CPU splits N = 3000, Triton N = 600)."""
    B, N, D = shape
    require(backend, B, N, D)
    off, lse_err = far_from_the_origin(backend, MAKE_DEVICE["device"], dtype, similarity, B, N, D)
    assert off <= CONVEX_BOUND[dtype], f"out off float64 by {off:.2e} x the rows' spread"
    assert lse_err <= 1e-5


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
    # NaN never wins: no row, on every backend alike (the reference's argmax once said row 0).
    assert p.top_index[2] == -1 and torch.isneginf(p.top_score[2])
    assert torch.equal(p.top_index[keep], clean.top_index[keep])
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


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
@pytest.mark.parametrize("beta", [1e-3, 1e-5, 1e-7, 1e-12])
def test_dot_energy_at_small_beta(backend, beta):
    """-lse/beta + log(N)/beta cancels at small beta: in float32 lse's rounding alone moved E by 0.3 at
    beta 1e-6 over 1000 rows, and to the wrong sign at 1e-8.  The energy tends to ½‖s‖² - meanₙ x·s +
    ½ maxₙ‖xₙ‖² as beta -> 0."""
    require(backend)
    s, x = make((2, 5, 48), torch.float32, 21), make((1000, 48), torch.float32, 22)
    got = hk.energy(s, x, beta, backend=backend)
    s64, x64 = s.double(), x.double()
    sims = s64 @ x64.T
    limit = 0.5 * (s64 * s64).sum(-1) - sims.mean(-1) + 0.5 * (x64 * x64).sum(-1).max()
    # E - limit = -(1/beta) log meanₙ exp(beta (sim - mean sim)) ≈ -beta/2 · varₙ(sim) at small beta
    want = limit - beta / 2 * sims.var(-1, unbiased=False)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


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


# --- docs/design.md §5.1: the numerics every backend follows (issues 13, 14) -----------------

def lse_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """lse's error as a relative error of Σ exp: |Δlse| / max(1, |lse|), the worst row.

    ‖Δ‖/‖ref‖ is ill-posed where lse ≈ 0 (a query on its pattern: lse = log(1 + tiny)).
    """
    ref = ref.double()
    return float(((got.double() - ref).abs() / ref.abs().clamp_min(1)).max())


def check_numerics(p, ref, dtype, what: str) -> None:
    tol = TOLERANCE[dtype]
    assert not torch.isnan(p.out).any(), what
    assert rel_err(p.out, ref.out) <= tol, f"{what}: out {rel_err(p.out, ref.out):.2e} > {tol}"
    assert lse_err(p.lse, ref.lse) <= tol, f"{what}: lse {lse_err(p.lse, ref.lse):.2e} > {tol}"
    assert lse_err(p.top_score, ref.top_score) <= tol, f"{what}: top_score"
    assert_top_index(p, ref, tol)


@pytest.mark.parametrize("backend, similarity", [
    pytest.param(b, sim, marks=marks(b, f"{sim}_near"), id=f"{b}-{sim}")
    for b in ["torch"] + kernel_backends() for sim in ("l2", "l2sq")])
def test_l2_near_stored_patterns(backend, similarity):
    """Queries on, next to and far from stored patterns (issue 13.1), each dtype at its tolerance."""
    require(backend)
    for dtype in DTYPES:
        x = make((200, 64), dtype, 30)
        on = x[:8]
        next_to = (x[8:16].double() + 1e-3 * make((8, 64), torch.float64, 31)).to(dtype)
        far = make((8, 64), dtype, 32, scale=3.0)
        for name, q in (("on", on), ("next to", next_to), ("far from", far)):
            # logits of O(10-100): float32 rounding of larger scores alone would cost 1e-5 in out
            for beta in ((0.3, 3.0) if similarity == "l2" else (0.03, 0.3)):
                p = hk.hopfield_partial(q, x, beta, similarity=similarity, backend=backend)
                check_numerics(p, ref64(q, x, beta, similarity), dtype, f"{dtype} {name} beta {beta}")


def _bank_far_from_origin(d=32, n=50, seed=33):
    """‖x‖ ≈ 1e4, patterns ≈ 0.1 apart, queries within 1e-3 of patterns 0, 7, 21, 49 (float32)."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(d, generator=g, dtype=torch.float64)
    centre *= 1e4 / centre.norm()
    spread = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = centre + 0.1 / 2**0.5 * spread / spread.norm(dim=1, keepdim=True)
    rows = torch.tensor([0, 7, 21, 49])
    step = torch.randn(len(rows), d, generator=g, dtype=torch.float64)
    q = x[rows] + 1e-3 * step / step.norm(dim=1, keepdim=True)
    dev = MAKE_DEVICE["device"]
    return q.float().to(dev), x.float().to(dev), rows.to(dev)


@pytest.mark.parametrize("similarity", ["l2", "l2sq"])
@pytest.mark.parametrize("backend", backend_params(["torch"] + kernel_backends(), "l2_far"))
def test_l2_bank_far_from_the_origin(backend, similarity):
    """The right pattern with top weight ≈ 1 and the right lse, where the expansion cancels (float32 only:
    half precision cannot hold a 1e-3 step at 1e4)."""
    require(backend)
    q, x, rows = _bank_far_from_origin()
    beta = 1e3 if similarity == "l2" else 1e5  # beta·(gap to the runner-up) ≈ 100 nats
    p = hk.hopfield_partial(q, x, beta, similarity=similarity, backend=backend)
    ref = ref64(q, x, beta, similarity)
    assert torch.equal(ref.top_index, rows) and bool((ref.top_weight > 0.999).all())
    assert torch.equal(p.top_index, rows), p.top_index.tolist()
    assert (p.top_weight.double() - ref.top_weight).abs().max() <= TOLERANCE[torch.float32]
    check_numerics(p, ref, torch.float32, "far from the origin")


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("backend", backend_params(["torch"] + kernel_backends(), "ties"))
def test_exact_ties_go_to_the_smallest_global_row(backend, similarity):
    """Identical rows score identically wherever they fall in a tile, block or split (issue 13.3)."""
    require(backend)
    slow = interpreted(backend)  # the Triton interpreter: 0.1-0.5 s a call
    for dtype in (torch.float32,) if slow else (torch.float32, torch.bfloat16):
        for n_before, n_tied, d in ((0, 3, 16), (13, 300, 16), (69, 300, 17), (1, 129, 64)):
            q, x = tied_bank(n_before, n_tied, d, dtype, MAKE_DEVICE["device"], 34 + d, slow, queries=64)
            beta = beta_for(similarity, d, 1.0)
            if slow:
                q = q[:5]
            for b in (1, 5) if slow else (1, 5, 64):
                p = hk.hopfield_partial(q[:b], x, beta, similarity=similarity, backend=backend)
                assert bool((p.top_index == n_before).all()), (dtype, n_before, n_tied, d, b, p.top_index.unique())
            for rows in (70,) if slow else (70, 13):
                parts = [hk.hopfield_partial(q, x[i:i + rows], beta, similarity=similarity, offset=i,
                                             backend=backend) for i in range(0, x.shape[0], rows)]
                m = hk.merge_partials(parts)
                assert bool((m.top_index == n_before).all()), (dtype, n_before, n_tied, d, rows, m.top_index.unique())


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("backend", backend_params(["torch"] + kernel_backends(), "weights"))
def test_weights_match_the_reference(backend, similarity):
    """Per-query feature weights (issue 14.1), zero weights included, whole bank and merged chunks."""
    require(backend)
    slow = interpreted(backend)  # the Triton interpreter: ~1 s per 1e5 of B·N·D
    for dtype in (torch.float32, torch.bfloat16) if slow else DTYPES:
        for b, n, d in ((1, 1, 1), (3, 17, 3), (17, 129, 64)) + (() if slow else ((5, 300, 300),)):
            q, x, v = make((2, b, d), dtype, 40), make((n, d), dtype, 41), make((n, 7), dtype, 42)
            w = make((2, b, d), torch.float32, 43).abs()
            w[0, 0, : (d + 1) // 2] = 0  # a query that knows only part of its pattern
            # One 0/1 mask for every query of a leading index, another for the next: the CPU
            # kernel's shared-weights and 16-bit-cue paths.
            masks = torch.zeros(2, b, d)
            masks[0, :, : (d + 1) // 2] = 1
            masks[1, :, d // 2:] = 1
            beta = beta_for(similarity, d, 1.0)
            for kind, ww in (("weights", w), ("masks", masks)):
                ref = hk.hopfield_partial(q.double(), x.double(), beta, similarity=similarity, values=v.double(),
                                          weights=ww, backend="torch")
                p = hk.hopfield_partial(q, x, beta, similarity=similarity, values=v, weights=ww, backend=backend)
                check_numerics(p, ref, dtype, f"{dtype} {kind} B{b} N{n} D{d}")
                cut = n // 3
                parts = [hk.hopfield_partial(q, x[lo:hi], beta, similarity=similarity, values=v[lo:hi], weights=ww,
                                             offset=lo, backend=backend) for lo, hi in ((0, cut), (cut, n))]
                check_numerics(hk.merge_partials(parts), ref, dtype, f"{dtype} {kind} merged B{b} N{n} D{d}")


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
def test_many_chunks_merge_like_the_whole(backend):
    """2,500 rows merged from 1-row chunks (issue 13.2) meet the tolerance of one call over the whole
    bank, and merge_partials rounds once: its float32 result is the float64 merge rounded."""
    require(backend)
    if interpreted(backend):
        pytest.skip("the merge is the same Python for every backend; ~30 interpreted calls would take ~25 s")
    n, d = 2500, 48
    q, x = make((8, d), torch.float32, 50), make((n, d), torch.float32, 51)
    ref = ref64(q, x, 0.7, "dot")
    whole = hk.hopfield_partial(q, x, 0.7, backend=backend)
    assert rel_err(whole.out, ref.out) <= TOLERANCE[torch.float32]
    for rows in (1, 7, 333):
        parts = [hk.hopfield_partial(q, x[i:i + rows], 0.7, offset=i, backend=backend) for i in range(0, n, rows)]
        merged = hk.merge_partials(parts)
        assert rel_err(merged.out, ref.out) <= TOLERANCE[torch.float32], rows
        assert lse_err(merged.lse, ref.lse) <= TOLERANCE[torch.float32], rows
        assert torch.equal(merged.top_index, ref.top_index)
        exact = streaming.merge_partials([streaming.to_float64(p) for p in parts])
        assert torch.equal(merged.out, exact.out.float()) and torch.equal(merged.lse, exact.lse.float())
        running = streaming.to_float64(parts[0])  # a bank's running merge, one chunk at a time
        for p in parts[1:]:
            running = streaming.merge_partials([running, streaming.to_float64(p)])
        assert rel_err(streaming.round_partial(running).out, ref.out) <= TOLERANCE[torch.float32], rows


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
def test_scores_beyond_float32_are_refused_by_name(backend, similarity):
    """beta·sim past 3.4e38 (issue 13.6) is refused by beta's name, never returned as NaN; a NaN query
    still gets its NaN answer alone, and a beta just inside the range computes."""
    require(backend)
    q, x = make((3, 8), torch.float32, 52), make((20, 8), torch.float32, 53)
    for fn in (hk.hopfield_update, hk.hopfield_partial, hk.energy):
        with pytest.raises(ValueError, match="^beta: beta·sim leaves the float32 range"):
            fn(q, x, 3e38, similarity=similarity, backend=backend)
    with pytest.raises(ValueError, match="^beta: beta·sim leaves the float32 range"):
        hk.hopfield_retrieve(q, x, 3e38, similarity=similarity, max_steps=2, backend=backend)
    q_nan = q.clone()
    q_nan[1, 3] = float("nan")
    out = hk.hopfield_update(q_nan, x, 0.5, similarity=similarity, backend=backend)
    assert torch.isnan(out[1]).all() and not torch.isnan(out[[0, 2]]).any()
    p = hk.hopfield_partial(q, x, 1e30, similarity=similarity, backend=backend)  # |beta·sim| < 3.4e38 here
    assert torch.isfinite(p.lse).all() and not torch.isnan(p.out).any()
