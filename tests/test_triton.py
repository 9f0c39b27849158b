"""The Triton backend's own contract: its heuristic picks the right kernel per regime, every
kernel path (split or not, small or tiled D) agrees with the reference, autotuning runs."""
import pytest
import torch

import hen_kernels as hk

from .conftest import SIMILARITIES, TOLERANCE, make, ref64, rel_err, require

triton_launch = pytest.importorskip("hen_kernels.triton.launch")


@pytest.fixture
def h100(monkeypatch):
    monkeypatch.setattr(triton_launch, "_sm_count", lambda device: 132)


@pytest.mark.parametrize(
    "shape, kernel, splits",
    [
        ((1, 16384, 16384, 64, 64), "small_d", (1, 2)),       # layer: query blocks fill the GPU
        ((1, 16384, 16384, 128, 128), "small_d", (1, 2)),
        ((1, 1, 2_000_000, 128, 128), "small_d", (64, 264)),  # recall, D <= 256: split the bank
        ((1, 16, 500_000, 1024, 1024), "tiled_d", (64, 264)), # recall, large D
        ((1, 64, 131072, 4096, 4096), "tiled_d", (64, 264)),
        ((1, 4096, 2**20, 1024, 1024), "tiled_d", (1, 8)),    # bulk: a few splits at most
    ],
)
def test_plan_picks_the_regime(h100, shape, kernel, splits):
    L, B, N, D, Dv = shape
    p = triton_launch.plan(L, B, N, D, Dv, torch.device("cuda"))
    assert p["kernel"] == kernel
    assert splits[0] <= p["splits"] <= splits[1]
    assert p["splits"] * p["rows_per_split"] >= N > (p["splits"] - 1) * p["rows_per_split"]
    # Workspace is splits x B x Dv: bounded independently of N.
    assert p["splits"] <= 2 * 132


@pytest.mark.parametrize(
    "similarity, dtype",
    [(s, torch.float32) for s in SIMILARITIES] + [("dot", torch.bfloat16), ("l2", torch.float16)],
    ids=str,
)
@pytest.mark.parametrize(
    "shape",
    [(2, 300, 40, 40), (2, 300, 40, 9), (3, 120, 300, 300), (3, 120, 20, 270)],
    ids=["small-d", "small-d-values", "tiled-d", "tiled-dv"],
)
@pytest.mark.parametrize("min_split_rows", [32, 10**9], ids=["split", "whole"])
def test_every_kernel_path(monkeypatch, similarity, dtype, shape, min_split_rows):
    require("triton")
    monkeypatch.setattr(triton_launch, "MIN_SPLIT_ROWS", min_split_rows)
    b, n, d, dv = shape
    q, x = make((2, b, d), dtype, 1), make((n, d), dtype, 2)
    v = None if dv == d else make((n, dv), dtype, 3)
    beta = 0.5 if similarity == "l2" else 0.5 / d**0.5
    p = hk.hopfield_partial(q, x, beta, similarity=similarity, values=v, offset=11, backend="triton")
    ref = ref64(q, x, beta, similarity, v, offset=11)
    plan = triton_launch.plan(2, b, n, d, dv, q.device)
    assert (plan["splits"] > 1) == (min_split_rows == 32)
    assert rel_err(p.out, ref.out) <= TOLERANCE[dtype]
    assert rel_err(p.lse, ref.lse) <= TOLERANCE[dtype]
    assert torch.equal(p.top_index, ref.top_index)


def test_autotuner_times_configs_under_the_interpreter():
    require("triton")
    from hen_kernels.triton.small_d import small_d_kernel

    assert len(small_d_kernel.configs) >= 2
    hk.hopfield_partial(torch.randn(3, 24), torch.randn(50, 24), 0.3, backend="triton")
    assert small_d_kernel.cache, "the autotuner chose a config (timed with the CPU timer)"
