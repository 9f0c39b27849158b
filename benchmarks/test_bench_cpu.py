"""pytest-benchmark suite over the docs/design.md §6 CPU cases (the same ones `make bench` runs).

    pytest benchmarks/ --benchmark-only            # N = 16384: a minute or two
    HEN_BENCH_FULL=1 pytest benchmarks/ --benchmark-only   # the docs/design.md shapes
    HEN_BENCH_N=65536 pytest benchmarks/ --benchmark-only  # any other N

"fused" is hk.hopfield_update on the "cpu" backend when the extension is built,
else on the "torch" reference (the benchmark's extra_info says which);
"baseline" is softmax(beta * sim(X, s)) @ X.  Nothing here asserts on time.
"""
import os

import pytest
import torch

from hen_kernels.bench import cpu as bench

SMALL_N = 16384


def _n():
    if os.environ.get("HEN_BENCH_FULL", "") not in ("", "0"):
        return None
    return int(os.environ.get("HEN_BENCH_N", SMALL_N))


CASES = bench.cases(_n())


@pytest.fixture(scope="module", autouse=True)
def _free_bank():
    yield
    bench.release_bank()


@pytest.mark.parametrize("which", ["fused", "baseline"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cpu(benchmark, case, which):
    backend = bench.fused_backend()
    fused, baseline = bench.case_callables(case, backend)
    fn = fused if which == "fused" else baseline
    benchmark.group = case.name
    benchmark.extra_info.update(
        which=which,
        backend=backend if which == "fused" else "baseline",
        fused_is_reference=backend == "torch",
        gflop=case.flops / 1e9,
        bank_gb=case.bytes / 1e9,
        target_ratio=case.target,
    )
    with torch.no_grad():
        out = benchmark(fn)
    assert out.shape == (case.B, case.D)
