"""The Triton backend's own contract: its heuristic picks the right kernel per regime, every kernel path
(split or not, small or tiled D, weighted or not) agrees with a float64 oracle, the ℓ2 rule and the ties
of docs/design.md §5.1 hold on every path, autotuning runs."""
import pytest
import torch

import hen_kernels as hk

from .conftest import MAKE_DEVICE, SIMILARITIES, TOLERANCE, make, rel_err, require

triton_launch = pytest.importorskip("hen_kernels.triton.launch")
GPU_BACKEND = "triton"  # every test here runs it: on a GPU, tensors are made there (tests/conftest.py)
from hen_kernels.triton import configs  # noqa: E402


@pytest.fixture
def h100(monkeypatch):
    monkeypatch.setattr(triton_launch, "_sm_count", lambda device: 132)


def direct64(q, x, beta, similarity, v=None, w=None, offset=0):
    """The update in float64 with d² formed directly as Σ w (q - x)²: exact where the expanded form
    cancels (a query on a pattern, a bank far from the origin), unlike any expansion."""
    q, x = q.double(), x.double()
    v = x if v is None else v.double()
    w = torch.ones_like(q) if w is None else w.double()
    if similarity == "dot":
        s = (w * q) @ x.transpose(-1, -2)
    else:
        d2 = (w.unsqueeze(-2) * (q.unsqueeze(-2) - x.unsqueeze(-3)) ** 2).sum(-1)
        s = -d2.sqrt() if similarity == "l2" else -0.5 * d2
    t = beta * s
    lse = torch.logsumexp(t, -1)
    top_score, top_index = t.max(-1)
    return hk.Partial(torch.exp(t - lse.unsqueeze(-1)) @ v, lse, top_score, top_index + offset)


def check(p, ref, dtype, what=""):
    tol = TOLERANCE[dtype]
    assert rel_err(p.out, ref.out) <= tol, f"{what}: out {rel_err(p.out, ref.out):.2e}"
    lse = ((p.lse.double() - ref.lse).abs() / ref.lse.abs().clamp_min(1)).max().item()
    assert lse <= tol, f"{what}: lse {lse:.2e}"
    assert torch.equal(p.top_index, ref.top_index), what


@pytest.mark.parametrize(
    "shape, dtype, precision, kernel, bm, splits",
    [
        # layer: 256 query blocks fill 132 SMs (one resident block each): no split, no combine
        ((1, 16384, 16384, 64, 64), torch.bfloat16, "tf32x3", "small_d", 64, (1, 1)),
        ((1, 16384, 16384, 128, 128), torch.bfloat16, "tf32x3", "small_d", 64, (1, 1)),
        ((1, 1, 2_000_000, 128, 128), torch.bfloat16, "tf32x3", "small_d", 16, (528, 528)),  # recall: split the bank
        ((1, 16, 500_000, 1024, 1024), torch.bfloat16, "tf32x3", "tiled_d", 16, (528, 528)),  # recall, large D
        ((1, 64, 131072, 4096, 4096), torch.bfloat16, "tf32x3", "tiled_d", 64, (132, 132)),
        ((1, 4096, 2**20, 1024, 1024), torch.bfloat16, "tf32x3", "tiled_d", 64, (3, 3)),  # bulk: a few splits
        # float32: 16-query blocks at float32 accuracy (tf32x3), the D-tiled kernel past FP32_MAX_DIM
        ((1, 4096, 4096, 128, 128), torch.float32, "tf32x3", "small_d", 16, (1, 1)),
        ((1, 4096, 4096, 128, 128), torch.float32, "tf32", "small_d", 64, (3, 3)),
        # ... in the D-tiled kernel too (no 64-query float32 config compiled without spills); tf32 keeps 64
        ((1, 4096, 4096, 256, 256), torch.float32, "tf32x3", "tiled_d", 16, (1, 1)),
        ((1, 4096, 4096, 256, 256), torch.float32, "tf32", "tiled_d", 64, (3, 3)),
        # weighted: float32 score products, like float32 inputs
        ((1, 16, 2**20, 128, 128), "weighted", "tf32x3", "small_d", 16, (132, 132)),
        ((1, 16, 2**20, 256, 256), "weighted", "tf32x3", "tiled_d", 16, (132, 132)),
        ((1, 4096, 2**20, 1024, 1024), "weighted", "tf32x3", "tiled_d", 16, (1, 1)),
        # ... and at one tf32 product in either kernel (64-query weighted ℓ2 launches kept no clean config)
        ((1, 4096, 2**20, 1024, 1024), "weighted", "tf32", "tiled_d", 16, (1, 1)),
        ((1, 16384, 2**20, 128, 128), "weighted", "tf32", "small_d", 16, (1, 1)),
    ],
)
def test_plan_picks_the_regime(h100, shape, dtype, precision, kernel, bm, splits):
    L, B, N, D, Dv = shape
    weighted = dtype == "weighted"
    dtype = torch.bfloat16 if weighted else dtype
    p = triton_launch.plan(L, B, N, D, Dv, torch.device("cuda"), dtype, precision, weighted=weighted)
    assert (p["kernel"], p["BM"], p["precision"]) == (kernel, bm, precision)
    assert splits[0] <= p["splits"] <= splits[1]
    assert p["splits"] * p["rows_per_split"] >= N > (p["splits"] - 1) * p["rows_per_split"]
    # Workspace is splits x B x Dv: bounded independently of N.
    assert p["splits"] <= max(configs.RESIDENT_PER_SM.values()) * 132


def test_float32_precision_follows_torch():
    """tf32x3 (float32 accuracy) by default; one tf32 product only where torch allows tf32 for matmuls."""
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert triton_launch.fp32_precision() == "tf32x3"
        torch.set_float32_matmul_precision("high")
        assert triton_launch.fp32_precision() == "tf32"
    finally:
        torch.set_float32_matmul_precision(old)


PATHS = [(2, 300, 40, 40), (2, 300, 40, 9), (3, 120, 300, 300), (3, 120, 20, 270)]
PATH_IDS = ["small-d", "small-d-values", "tiled-d", "tiled-dv"]


@pytest.mark.parametrize(
    "similarity, dtype",
    [(s, torch.float32) for s in SIMILARITIES] + [("dot", torch.bfloat16), ("l2", torch.float16)],
    ids=str,
)
@pytest.mark.parametrize("shape", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("min_split_rows", [32, 10**9], ids=["split", "whole"])
@pytest.mark.interpreter_cross("shape", "min_split_rows")
def test_every_kernel_path(monkeypatch, similarity, dtype, shape, min_split_rows):
    _path(monkeypatch, similarity, dtype, shape, min_split_rows, weighted=False)


@pytest.mark.parametrize("similarity, dtype", [("l2", torch.float32), ("dot", torch.bfloat16), ("l2sq", torch.float16)],
                         ids=str)
@pytest.mark.parametrize("shape", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("min_split_rows", [32, 10**9], ids=["split", "whole"])
@pytest.mark.interpreter_cross("shape", "min_split_rows")
def test_weights_on_every_kernel_path(monkeypatch, similarity, dtype, shape, min_split_rows):
    """Per-query feature weights (issue 14.1), zero weights included, fused into both kernels, split or not."""
    _path(monkeypatch, similarity, dtype, shape, min_split_rows, weighted=True)


def _path(monkeypatch, similarity, dtype, shape, min_split_rows, weighted):
    require("triton")
    monkeypatch.setattr(triton_launch, "MIN_SPLIT_ROWS", min_split_rows)
    b, n, d, dv = shape
    q, x = make((2, b, d), dtype, 1), make((n, d), dtype, 2)
    v = None if dv == d else make((n, dv), dtype, 3)
    w = make((2, b, d), torch.float32, 4).abs() if weighted else None
    if weighted:
        w[0, 0, : d // 2] = 0  # a query that sees half its features
    beta = 0.5 if similarity == "l2" else 0.5 / d**0.5
    p = hk.hopfield_partial(q, x, beta, similarity=similarity, values=v, weights=w, offset=11, backend="triton")
    plan = triton_launch.plan(2, b, n, d, dv, q.device, dtype, weighted=weighted)
    assert (plan["splits"] > 1) == (min_split_rows == 32)
    check(p, direct64(q, x, beta, similarity, v, w, offset=11), dtype)


def _randn(g, *shape):
    """float64 draws from the CPU generator ``g``, on the device the tests' tensors go to."""
    return torch.randn(shape, generator=g, dtype=torch.float64, device="cpu").to(MAKE_DEVICE["device"])


def _far_bank(n, d, seed):
    """‖x‖ ≈ 1e4, rows ≈ 0.1 apart, queries 1e-3 from rows 0, n // 2 and n - 1 (float32): every pair's expanded
    d² cancels to float32 noise, the direct form is exact."""
    g = torch.Generator().manual_seed(seed)
    centre = _randn(g, d)
    x = centre * 1e4 / centre.norm() + 0.1 * _randn(g, n, d) / d**0.5
    rows = torch.tensor([0, n // 2, n - 1], device=x.device)
    q = x[rows] + 1e-3 * _randn(g, 3, d) / d**0.5
    return q.float(), x.float(), rows


@pytest.mark.parametrize("similarity", ["l2", "l2sq"])
@pytest.mark.parametrize("d", [40, 300], ids=["small-d", "tiled-d"])
@pytest.mark.parametrize("min_split_rows", [32, 10**9], ids=["split", "whole"])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weights"])
@pytest.mark.interpreter_cross("d", "min_split_rows", "weighted")
def test_l2_direct_recompute_on_every_path(monkeypatch, similarity, d, min_split_rows, weighted):
    """docs/design.md §5.1: queries on and next to stored patterns, and a bank far from the origin, meet the
    float32 tolerance on every kernel path (the expanded form alone misses it by orders of magnitude)."""
    require("triton")
    monkeypatch.setattr(triton_launch, "MIN_SPLIT_ROWS", min_split_rows)
    x = make((120, d), torch.float32, 5)
    near = torch.cat([x[:4], (x[4:8].double() + 1e-3 * make((4, d), torch.float64, 6)).float()])
    qf, xf, rows = _far_bank(120, d, 7)
    for name, q, bank, beta in (("near", near, x, 3.0), ("far", qf, xf, 300.0 if similarity == "l2" else 3e4)):
        w = make(q.shape, torch.float32, 8).abs() + 0.5 if weighted else None
        p = hk.hopfield_partial(q, bank, beta, similarity=similarity, weights=w, backend="triton")
        ref = direct64(q, bank, beta, similarity, w=w)
        check(p, ref, torch.float32, name)
        if name == "far":
            assert torch.equal(p.top_index, rows) and bool((ref.top_weight > 0.9).all())


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [16, 300], ids=["small-d", "tiled-d"])
def test_ties_across_tiles_splits_and_the_combine(monkeypatch, similarity, dtype, d):
    """Identical best rows spread over many tiles and more splits than the combine walks at once: the smallest
    global row wins, and out and lse still match (docs/design.md §5.1)."""
    require("triton")
    monkeypatch.setattr(triton_launch, "MIN_SPLIT_ROWS", 16)
    monkeypatch.setattr(triton_launch, "_sm_count", lambda device: 64)
    g = torch.Generator().manual_seed(9)
    best = _randn(g, 1, d)
    x = torch.cat([-best + _randn(g, 37, d), best.repeat(500, 1), -best + _randn(g, 5, d)]).to(dtype)
    q = (2 * best + 0.3 * _randn(g, 5, d)).to(dtype)
    beta = 1.0 if similarity == "l2" else 1.0 / d**0.5
    plan = triton_launch.plan(1, 5, x.shape[0], d, d, q.device, dtype)
    assert plan["splits"] > configs.COMBINE_BS
    p = hk.hopfield_partial(q, x, beta, similarity=similarity, offset=1000, backend="triton")
    assert bool((p.top_index == 1037).all()), p.top_index.tolist()
    check(p, direct64(q, x, beta, similarity, offset=1000), dtype)
    # One walk over every tile (no splits): ties across the tiles of one walk, which 16-row splits of one
    # tile each never meet (a later tile winning ties had passed).
    monkeypatch.setattr(triton_launch, "MIN_SPLIT_ROWS", 10**9)
    p = hk.hopfield_partial(q, x, beta, similarity=similarity, offset=1000, backend="triton")
    assert bool((p.top_index == 1037).all()), p.top_index.tolist()


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("shape", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("min_split_rows", [32, 10**9], ids=["split", "whole"])
@pytest.mark.parametrize("matmul_precision", ["highest", "high"], ids=["tf32x3", "tf32"])
@pytest.mark.interpreter_cross("shape", "min_split_rows")
def test_a_query_whose_other_weights_underflow_gets_its_stored_row(monkeypatch, similarity, shape, min_split_rows,
                                                                   matmul_precision):
    """docs/design.md §5 (hard retrieval returns the exact pattern) on every kernel path, values of their
    own included, in float32, whose value product a GPU takes at tf32x3: 1·v keeps ~22 of v's 24 bits
    there (hen_kernels/triton/interpreted_products.py emulates it under the interpreter; the first GPU
    run found it), and 11 at tf32, where torch allows it (launch.fp32_precision)."""
    require("triton")
    monkeypatch.setattr(triton_launch, "MIN_SPLIT_ROWS", min_split_rows)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(matmul_precision)
    try:
        _assert_lands_on_stored_rows(similarity, shape, min_split_rows)
    finally:
        torch.set_float32_matmul_precision(old)


def _assert_lands_on_stored_rows(similarity, shape, min_split_rows):
    _, n, d, dv = shape
    x = make((n, d), torch.float32, 12)
    v = x if dv == d else make((n, dv), torch.float32, 13)
    rows = torch.tensor([0, 17, n // 2, n - 1], device=x.device)
    q = x[rows] + make((4, d), torch.float32, 14, scale=0.01)
    p = hk.hopfield_partial(q, x, 1e3, similarity=similarity, values=None if dv == d else v, offset=11,
                            backend="triton")
    assert (triton_launch.plan(1, 4, n, d, dv, q.device, torch.float32)["splits"] > 1) == (min_split_rows == 32)
    assert torch.equal(p.top_index, rows + 11)
    assert torch.equal(p.out, v[rows]), (p.out - v[rows]).abs().max().item()


def test_backward_near_stored_patterns():
    """The fused backward recomputes the forward's P with the same ℓ2 rule: patterns 0.01 apart and queries 3e-3
    from them (d² ~ 1e-4 against ‖x‖² ~ 30).  The softmax nearly saturates here (top weight 0.94-0.99 at beta 3e3),
    which amplifies float32 rounding in dout·v - Δ for every float32 backward (the streaming one included), so
    the bound is 1.5e-3, not the 4e-5 of well-conditioned cases; P from the expanded form misses it (3e-3)."""
    require("triton")
    d = 32
    x = (make((1, d), torch.float64, 10) + 0.01 * make((64, d), torch.float64, 11)).float()
    q = (x[:6].double() + 3e-3 * make((6, d), torch.float64, 12)).float()
    for sim, beta in (("l2sq", 3e3), ("l2", 60.0)):
        grads = {}
        for kind, (qq, xx) in (("triton", (q, x)), ("float64", (q.double(), x.double()))):
            qq, xx = qq.clone().requires_grad_(), xx.clone().requires_grad_()
            out = hk.hopfield_update(qq, xx, beta, similarity=sim, backend="triton" if kind == "triton" else "torch")
            (out * torch.linspace(-1, 1, d, dtype=out.dtype)).sum().backward()
            grads[kind] = (qq.grad, xx.grad)
        for name, got, want in zip(("query", "memory"), grads["triton"], grads["float64"]):
            assert want.norm() > 1e-2, "the softmax is not saturated: gradients of order one"
            assert rel_err(got, want) <= 1.5e-3, (sim, name, rel_err(got, want))


def test_autotuner_times_configs_under_the_interpreter():
    require("triton")
    if not triton_launch.INTERPRET:
        pytest.skip("a GPU times the configs with triton's own do_bench (tests/conftest.py runs the first only)")
    from hen_kernels.triton.small_d import small_d_kernel

    assert len(small_d_kernel.configs) >= 2
    hk.hopfield_partial(torch.randn(3, 24), torch.randn(50, 24), 0.3, backend="triton")
    assert small_d_kernel.cache, "the autotuner chose a config (timed with the CPU timer)"


@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_interpreted_float32_products_are_the_gpus(similarity):
    """Under the interpreter this package's kernels multiply float32 as a GPU's tensor cores do
    (hen_kernels/triton/interpreted_products.py): one tf32 product (torch's "high") misses by ~1e-4,
    three (tf32x3, "highest") hold float32's 1e-5, where numpy's float32 products would hold both.
    The forward and the backward launchers both run them."""
    require("triton")
    if not triton_launch.INTERPRET:
        pytest.skip("a GPU computes its own products")
    q, x, v = make((5, 40), torch.float32, 1), make((70, 40), torch.float32, 2), make((70, 24), torch.float32, 3)
    beta = 1.0 if similarity == "l2" else 0.5
    ref = direct64(q, x, beta, similarity, v)
    errors = {}
    old = torch.get_float32_matmul_precision()
    try:
        for precision in ("high", "highest"):
            torch.set_float32_matmul_precision(precision)
            qq = q.clone().requires_grad_()
            out = hk.hopfield_update(qq, x, beta, similarity=similarity, values=v, backend="triton")
            out.sum().backward()
            q64 = q.double().requires_grad_()
            direct64(q64, x, beta, similarity, v).out.sum().backward()
            errors[precision] = (rel_err(out, ref.out), rel_err(qq.grad, q64.grad))
    finally:
        torch.set_float32_matmul_precision(old)
    (out_tf32, dq_tf32), (out_x3, dq_x3) = errors["high"], errors["highest"]
    assert out_x3 <= TOLERANCE[torch.float32] and dq_x3 <= 1e-4, errors
    assert out_tf32 > 1e-5 and dq_tf32 > 1e-5, f"tf32 as exact as float32: numpy's products, not the GPU's {errors}"


def test_other_interpreted_kernels_keep_numpys_products():
    """The emulation is this package's: a user's own interpreted tl.dot at tf32, launched in the same process,
    still gets numpy's float32 matmul (what the interpreter documents)."""
    require("triton")
    if not triton_launch.INTERPRET:
        pytest.skip("the interpreter's products only")
    import triton
    import triton.language as tl

    @triton.jit
    def user_dot(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
        idx = tl.arange(0, N)[:, None] * N + tl.arange(0, N)[None, :]
        c = tl.dot(tl.load(a_ptr + idx), tl.load(b_ptr + idx), input_precision="tf32")
        tl.store(c_ptr + idx, c)

    a, b = make((16, 16), torch.float32, 4), make((16, 16), torch.float32, 5)
    c = torch.empty_like(a)
    hk.hopfield_update(a, b, 0.5, backend="triton")  # the package's launch before and around it changes nothing
    user_dot[(1,)](a, b, c, N=16)
    assert rel_err(c, a.double() @ b.double()) < 1e-6


def test_pruning_never_leaves_the_autotuner_empty():
    """Even a shape no config fits keeps the least demanding one (the autotuner needs one to run)."""
    cfgs = [configs._cfg(8, 4, BN=128), configs._cfg(4, 2, BN=16)]
    reasons = [configs.small_d_rule(c, 80, 4, 64, 256, 256, False, True, "tf32x3", 1) for c in cfgs]
    assert all(reasons), "both configs are too big for sm_80 here"
    assert configs._keep(cfgs, reasons) == [cfgs[1]]


def _tile_shapes(cfgs, *names):
    """The distinct tile shapes of a GPU config list (warps and stages do not change an interpreted answer)."""
    return sorted({tuple(c.kwargs[n] for n in names) for c in cfgs})


_GPU_TILES = ([("small_d", t) for t in _tile_shapes(configs.GPU_SMALL_D, "BN")]
              + [("tiled_d", t) for t in _tile_shapes(configs.GPU_TILED_D, "BN", "BK", "BDV")]
              + [("backward", t) for t in _tile_shapes(configs.GPU_BACKWARD, "BM", "BN")])


@pytest.mark.parametrize("kernel, tile", _GPU_TILES, ids=[f"{k}-{'x'.join(map(str, t))}" for k, t in _GPU_TILES])
def test_each_gpu_tile_shape_under_the_interpreter(monkeypatch, kernel, tile):
    """The interpreter runs one or two configs per kernel; a GPU picks among the lists of configs.py, whose
    wider tiles (BN up to 128, BK 64, BDV 128) meet their masks only there.  Each of their tile shapes here,
    on ragged sizes (bank splits of 50 rows, D = 300 and Dv = 130 past whole BK and BDV tiles), against float64."""
    require("triton")
    if not triton_launch.INTERPRET:
        pytest.skip("on a GPU test_every_kept_config runs every config the rules keep")
    import importlib

    module = importlib.import_module(f"hen_kernels.triton.{kernel}")
    tuners = {"small_d": ["small_d_kernel"], "tiled_d": ["tiled_d_kernel"], "backward": ["dq_kernel", "dkv_kernel"]}
    names = {"small_d": ("BN",), "tiled_d": ("BN", "BK", "BDV"), "backward": ("BM", "BN")}[kernel]
    for tuner in tuners[kernel]:
        autotuner = getattr(module, tuner)
        monkeypatch.setattr(autotuner, "configs", [configs._cfg(4, 1, **dict(zip(names, tile)))])
        monkeypatch.setattr(autotuner, "cache", {})
    monkeypatch.setattr(triton_launch, "MIN_SPLIT_ROWS", 50)
    d, dv = (300, 130) if kernel == "tiled_d" else (40, 24)
    q, x, v = make((3, d), torch.float32, 1), make((150, d), torch.float32, 2), make((150, dv), torch.float32, 3)
    for similarity in ("dot", "l2"):
        beta = 1.0 if similarity == "l2" else 0.5 / d**0.5
        qq, xx, vv = (t.clone().requires_grad_(kernel == "backward") for t in (q, x, v))
        p = hk.hopfield_partial(qq, xx, beta, similarity=similarity, values=vv, offset=3, backend="triton")
        ref = direct64(q, x, beta, similarity, v, offset=3)
        check(p, ref, torch.float32, f"{kernel} {tile} {similarity}")
        if kernel == "backward":
            (p.out * torch.linspace(-1, 1, dv)).sum().backward()
            q64, x64, v64 = (t.double().requires_grad_() for t in (q, x, v))
            (direct64(q64, x64, beta, similarity, v64).out * torch.linspace(-1, 1, dv)).sum().backward()
            for name, got, want in (("q", qq, q64), ("x", xx, x64), ("v", vv, v64)):
                assert rel_err(got.grad, want.grad) <= 1e-4, (tile, similarity, name, rel_err(got.grad, want.grad))


# (kernel, its autotuner's module attribute, B, N, D, similarity): one launch each, split where it can be
_EVERY_CONFIG = [("small_d", "small_d_kernel", 64, 3000, 128, "l2"),
                 ("tiled_d", "tiled_d_kernel", 16, 3000, 512, "dot"),
                 ("backward", "dq_kernel", 64, 1000, 64, "l2"), ("backward", "dkv_kernel", 64, 1000, 64, "l2")]


@pytest.mark.slow
@pytest.mark.parametrize("module, tuner, B, N, D, similarity", _EVERY_CONFIG, ids=[c[1] for c in _EVERY_CONFIG])
def test_every_kept_config(monkeypatch, module, tuner, B, N, D, similarity):
    """On a GPU, every config the rules keep for a launch gives the reference's answer, not only the one
    autotuning picks (the suite runs the first: tests/conftest.py).  The interpreter's lists are run whole."""
    require("triton")
    if triton_launch.INTERPRET:
        pytest.skip("under the interpreter each kernel has one or two configs, and the suite runs them all")
    import importlib

    from hen_kernels.constants import AUTOTUNE_ENV

    monkeypatch.setenv(AUTOTUNE_ENV, "first")  # the other kernels of the call: one config each
    kernel = getattr(importlib.import_module(f"hen_kernels.triton.{module}"), tuner)
    q = make((B, D), torch.bfloat16, 1).cuda().requires_grad_()
    x = make((N, D), torch.bfloat16, 2).cuda().requires_grad_()
    beta = 0.5 if similarity == "l2" else 0.5 / D**0.5

    def run():
        q.grad = x.grad = None
        p = hk.hopfield_partial(q, x, beta, similarity=similarity, backend="triton")
        if module == "backward":
            (p.out.float().square().sum() + p.lse.sum()).backward()
        return p

    # One call through the rules, to learn what they keep for this launch (only the first of them is run).
    kept, prune = [], kernel.early_config_prune

    def spy(cfgs, nargs, **kw):
        monkeypatch.setenv(AUTOTUNE_ENV, "all")
        kept.extend(prune(cfgs, nargs, **kw))
        monkeypatch.setenv(AUTOTUNE_ENV, "first")
        return kept[:1]

    monkeypatch.setattr(kernel, "early_config_prune", spy)
    monkeypatch.setattr(kernel, "cache", {})
    run()
    assert kept, "the rules kept no config"
    q64, x64 = q.detach().double().requires_grad_(), x.detach().double().requires_grad_()
    ref = hk.hopfield_partial(q64, x64, beta, similarity=similarity, backend="torch")
    (ref.out.square().sum() + ref.lse.sum()).backward()
    everything = list(kernel.configs)
    for cfg in kept:
        monkeypatch.setattr(kernel, "configs", [cfg])  # one config: run as it is, untimed
        p = run()
        what = f"{tuner} {cfg}"
        assert rel_err(p.out, ref.out.detach()) <= TOLERANCE[torch.bfloat16], what
        if module == "backward":
            assert rel_err(q.grad, q64.grad) <= 4 * TOLERANCE[torch.bfloat16], what
            assert rel_err(x.grad, x64.grad) <= 4 * TOLERANCE[torch.bfloat16], what
    monkeypatch.setattr(kernel, "configs", everything)


def test_autotuning_choices_are_kept_on_disk_on_a_gpu(monkeypatch):
    """On a GPU a later process reads each launch key's choice back instead of timing every config again
    (docs/design.md §6.1); under the interpreter the CPU timer's choices are not worth keeping."""
    from hen_kernels.triton import common

    seen = []
    monkeypatch.setattr(common.triton, "autotune", lambda **kw: seen.append(kw) or (lambda fn: fn))
    for interpret in (False, True):
        monkeypatch.setattr(common, "INTERPRET", interpret)
        common.autotune([configs._cfg(4, 1, BN=16)], key=["N"], prune=configs.prune_small_d)
    assert seen[0].get("cache_results") is True and "prune_configs_by" in seen[0]
    assert not seen[1].get("cache_results") and "do_bench" in seen[1]
