"""pytest-benchmark suite over the CPU cases of `make bench` (hen_kernels/bench/cpu.py), at smaller N.

    pytest benchmarks/ --benchmark-only                    # N = 16384: a few minutes
    HEN_BENCH_FULL=1 pytest benchmarks/ --benchmark-only   # the docs/design.md shapes
    HEN_BENCH_N=65536 pytest benchmarks/ --benchmark-only  # any other N

Each case is timed for the fused kernel ("fused": hk.hopfield_update on the "cpu"
backend when the extension is built, else the "torch" reference, as extra_info
says) and for every peer the table compares it with: plain PyTorch, SDPA's flash
and math backends (l2sq with the -beta/2 |x|² bias), torch.compile(plain) and
FAISS exact top-1; plus multi-step retrieval against chained peer calls and the
weighted similarity.  Each output is checked against float32 first.  Nothing here
asserts on time.
"""
import os

import pytest
import torch

from hen_kernels import ops
from hen_kernels.bench import cpu as bench
from hen_kernels.bench import cpu_peers as peers

SMALL_N = 16384


def _n():
    if os.environ.get("HEN_BENCH_FULL", "") not in ("", "0"):
        return None
    return int(os.environ.get("HEN_BENCH_N", SMALL_N))


CASES = bench.cases(_n())
# FAISS is timed last, in a test of its own at the end of this file: its thread pools spin on after each
# call and slowed whatever ran next (cpu.py's run_case times it apart for the same reason).
WHO = ("fused",) + tuple(p for p in peers.PEERS["dot"] if p != "faiss")


@pytest.fixture(scope="module", autouse=True)
def _free_bank():
    yield
    bench.release_bank()


def _call(case, who):
    q, x, beta = bench.case_inputs(case)
    backend = bench.fused_backend()
    if who == "fused":
        return bench.fused_call(q, x, beta, case.similarity, backend), backend
    return peers.peer_callables(q, x, beta, case.similarity, (who,), None)[who], who


@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cpu(benchmark, case, who):
    if who not in ("fused",) + peers.PEERS[case.similarity]:
        pytest.skip(f"{who} does not compute {case.similarity}")
    fn, label = _call(case, who)
    with torch.no_grad():
        out = fn()  # warm-up (torch.compile compiles here) and the float32 check
        q, x, beta = bench.case_inputs(case)
        err = peers.rel_err(out.float(), peers.plain(q.float(), x.float(), beta, case.similarity))
        benchmark.extra_info["rel_err"] = err
        if who == "fused":
            assert err <= bench.KERNEL_TOL[case.dtype]
        benchmark.group = case.name
        benchmark.extra_info.update(which=who, backend=label, gflop=case.flops / 1e9, bank_gb=case.bytes / 1e9)
        benchmark(fn)


STEP_CASES = bench.side_cases(_n(), ("dot",), bench.DTYPES)


@pytest.mark.parametrize("who", ("fused",) + peers.UPDATE_PEERS)
@pytest.mark.parametrize("case", STEP_CASES, ids=[c.name for c in STEP_CASES])
def test_cpu_steps(benchmark, case, who):
    """bench.STEPS steps of retrieval against as many chained calls of a peer."""
    q, x, beta = bench.case_inputs(case)
    backend = bench.fused_backend()
    if who == "fused":
        def fn():
            return ops.hopfield_retrieve(q, x, beta, similarity=case.similarity, max_steps=bench.STEPS,
                                         backend=backend).state
    else:
        def fn():
            s = q
            for _ in range(bench.STEPS):
                s = peers.peer_callables(s, x, beta, case.similarity, (who,), None)[who]()
            return s
    with torch.no_grad():
        fn()
        benchmark.group = f"steps-{case.name}"
        benchmark.extra_info.update(which=who, steps=bench.STEPS)
        benchmark(fn)


WEIGHTED_CASES = bench.side_cases(_n(), ("dot", "l2"), bench.DTYPES)


@pytest.mark.parametrize("who", ("mask", "per_query", "unweighted", "plain_mask"))
@pytest.mark.parametrize("case", WEIGHTED_CASES, ids=[c.name for c in WEIGHTED_CASES])
def test_cpu_weighted(benchmark, case, who):
    q, x, beta = bench.case_inputs(case)
    w = bench.weight_sets(case)
    backend = bench.fused_backend()
    fn = {"mask": bench.fused_call(q, x, beta, case.similarity, backend, weights=w["mask"]),
          "per_query": bench.fused_call(q, x, beta, case.similarity, backend, weights=w["per_query"]),
          "unweighted": bench.fused_call(q, x, beta, case.similarity, backend),
          "plain_mask": lambda: peers.plain_weighted(q, x, beta, case.similarity, w["mask"])}[who]
    with torch.no_grad():
        fn()
        benchmark.group = f"weighted-{case.name}"
        benchmark.extra_info.update(which=who, backend=backend)
        benchmark(fn)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cpu_faiss(benchmark, case):
    """FAISS exact top-1 (the beta -> infinity limit of recall), in the same groups as test_cpu's cases;
    last in the file (WHO says why)."""
    reason = peers.faiss_unavailable()
    if reason:
        pytest.skip(reason)
    q, x, beta = bench.case_inputs(case)
    index = bench.faiss_index(case, x)
    with torch.no_grad():
        out = index(q)
        top = ops.hopfield_partial(q, x, beta, similarity=case.similarity, backend=bench.fused_backend())
        benchmark.extra_info["top1_agrees"] = float((out == top.top_index).double().mean())
        benchmark.group = case.name
        benchmark.extra_info.update(which="faiss", backend="faiss", gflop=case.flops / 1e9, bank_gb=case.bytes / 1e9)
        benchmark(lambda: index(q))
