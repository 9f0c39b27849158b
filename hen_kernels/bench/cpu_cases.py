"""The CPU table's cases and how each is timed: shapes, targets, banks, inputs, the timing rounds.

:mod:`hen_kernels.bench.cpu` runs the main table from these, :mod:`hen_kernels.bench.cpu_side`
the smaller ones; ``benchmarks/test_bench_cpu.py`` reuses them through :mod:`hen_kernels.bench.cpu`.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from .. import backends, ops, reference
from . import common, cpu_peers as peers

# docs/design.md §6, CPU rows: required peer_time / fused_time.
SDPA_TARGETS = {"recall": 1.2, "layer": 1.0, "bulk": 1.0}  # dot; l2sq (SDPA with the bias): 1.0 everywhere
PLAIN_TARGETS = {"recall": 1.6, "layer": 1.3, "bulk": 0.95}  # dot and l2sq; l2: 2.0
L2_PLAIN_TARGET = 2.0
BF16_OVER_FP32_TARGET = 1.5  # where the CPU has bf16 matrix instructions
SHAPES = [("recall", 1, 262144, 512), ("recall", 8, 262144, 512),
          ("layer", 64, 65536, 64), ("bulk", 64, 65536, 2048)]
SIMILARITIES = ("dot", "l2sq", "l2")
DTYPES = ("float32", "bfloat16")
QUICK_N = 4096
CHECK_TOL, KERNEL_TOL, KERNEL_GRAD_TOL = common.CHECK_TOL, common.KERNEL_TOL, common.KERNEL_GRAD_TOL
SLOW_PEER_S, SLOW_PEER_RATIO = 2.0, 20.0  # a peer this slow (seconds, and x the kernel) is timed once
# Short rows get more rounds, so that a burst of other work on this shared machine (a few
# hundred ms) cannot own the median: at least MIN_ROW_S of rounds, at most MAX_ROUNDS.
MIN_ROW_S, MAX_ROUNDS = 3.0, 25


@dataclass(frozen=True)
class Case:
    regime: str
    similarity: str
    dtype: str
    B: int
    N: int
    D: int
    banks: int = 1  # one (B queries, N x D bank) problem per leading index (the many-banks table)

    @property
    def name(self) -> str:
        lead = f"-L{self.banks}" if self.banks > 1 else ""
        return f"{self.regime}-{self.similarity}-{self.dtype}{lead}-B{self.B}-N{self.N}-D{self.D}"

    @property
    def flops(self) -> int:  # docs/design.md §6: 4·B·N·D per bank
        return 4 * self.banks * self.B * self.N * self.D

    @property
    def bytes(self) -> int:  # every bank read once, in its dtype
        return self.banks * self.N * self.D * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    @property
    def bound(self) -> str:
        """Which ceiling applies: memory for recall, matmul for the others."""
        return "read" if self.regime == "recall" else "matmul"


def cases(n: Optional[int] = None, similarities=SIMILARITIES, dtypes=DTYPES) -> List[Case]:
    """The §6 CPU cases, ordered so that cases sharing a bank are adjacent; ``n`` overrides N."""
    return [Case(regime, s, dt, b, n or big_n, d) for regime, b, big_n, d in SHAPES
            for dt in dtypes for s in similarities]


def fused_backend() -> str:
    """'cpu' when the csrc extension loaded, else 'torch' (the reference stands in)."""
    return "cpu" if "cpu" in ops.available_backends() else "torch"


def backend_label(backend: str) -> str:
    if backend == "torch":
        why = backends.BACKENDS["cpu"].unavailable_reason or "not chosen"
        return f"torch (the REFERENCE, not a fused kernel: 'cpu' unavailable: {why})"
    return backend


# --- inputs: one bank at a time, reused by every case of that shape and dtype --------

_BANK: dict = {}


def bank(n: int, d: int, dtype: str) -> torch.Tensor:
    """An (n, d) standard-normal bank in ``dtype``; banks of other shapes are dropped first."""
    if (n, d, dtype) not in _BANK:
        if not any(k[:2] == (n, d) for k in _BANK):
            _BANK.clear()
        for k in [k for k in _BANK if k[:2] == (n, d) and k[2] != "float32"]:
            del _BANK[k]
        common.trim_heap()
        if (n, d, "float32") not in _BANK:
            _BANK[(n, d, "float32")] = torch.randn(n, d, generator=torch.Generator().manual_seed(n * 7919 + d))
        _BANK[(n, d, dtype)] = _BANK[(n, d, "float32")].to(getattr(torch, dtype))
    return _BANK[(n, d, dtype)]


def release_bank() -> None:
    _BANK.clear()
    _FAISS.clear()
    common.trim_heap()


_FAISS: dict = {}


def faiss_index(case: Case, x: torch.Tensor) -> Optional[peers.FaissTop1]:
    key = (case.N, case.D, case.dtype, case.similarity == "dot")
    if peers.faiss_unavailable() is not None:
        return None
    if key not in _FAISS:
        _FAISS.clear()
        _FAISS[key] = peers.FaissTop1(x, case.similarity)
    return _FAISS[key]


def case_inputs(case: Case) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """(query (B, D), bank (N, D), beta); beta = 1/sqrt(D) keeps dot scores of order one."""
    q = torch.randn(case.B, case.D, generator=torch.Generator().manual_seed(case.B)).to(getattr(torch, case.dtype))
    return q, bank(case.N, case.D, case.dtype), 1.0 / math.sqrt(case.D)


def check(got: torch.Tensor, want: torch.Tensor, dtype: str, kernel: bool = False) -> Tuple[float, bool]:
    """``got``'s error relative to the float64 ``want``, and whether it is within the case dtype's tolerance
    (a NaN error is not): KERNEL_TOL for the kernel's own answer, CHECK_TOL for a peer's."""
    err = peers.rel_err(got, want)
    return err, err <= (KERNEL_TOL if kernel else CHECK_TOL)[dtype]


def float64_update(q: torch.Tensor, x: torch.Tensor, beta: float, similarity: str, steps: int = 1,
                   weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The side tables' check: ``steps`` updates by the reference (the specification) in float64 from the
    inputs as given (a 16-bit case's rounded values: its error is the computation's own)."""
    s, xd = q.double(), x.double()
    for _ in range(steps):
        s = reference.update(s, xd, beta, similarity, weights=weights)
    return s


def fused_call(q, x, beta, similarity, backend, **kw):
    return lambda: ops.hopfield_update(q, x, beta, similarity=similarity, backend=backend, **kw)


def median_ms(times: List[float]) -> float:
    return statistics.median(times) * 1e3


def iqr_over_median(times: List[float]) -> Optional[float]:
    """(Q3 - Q1) / median of the calls; None for fewer than two."""
    if len(times) < 2:
        return None
    q1, _, q3 = statistics.quantiles(times, n=4)
    return (q3 - q1) / statistics.median(times)


# --- the main table ----------------------------------------------------------------

def compile_first(fns: Dict[str, object]) -> None:
    """One untimed call of the torch.compile peer: its first call compiles, and would otherwise pass for
    a slow peer's (time_sparing_slow_peers: timed once, not at every repeat)."""
    if "compile" in fns:
        fns["compile"]()


def first_calls(fns: Dict[str, object]) -> Dict[str, float]:
    """Seconds of one call of each function (a warm-up that says which peers are slow)."""
    compile_first(fns)
    seconds = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        seconds[name] = time.perf_counter() - t0
    return seconds


# Peers timed after the interleaved rounds, each on its own: FAISS's OpenMP and BLAS pools spin on after
# each call (the kernel's layer call: 3.7 -> 5.9 ms), and with torch.compile's generated code in the
# rounds every other call ran up to 2x slower, both threads busy throughout (layer dot float32, EPYC Zen 4,
# 25 rounds, each call after an untimed one; the kernel's median: 12.2 ms in rounds with plain, SDPA's math
# backend and compile, 9.4 with plain and compile, 10.8 with SDPA and compile, against 5.8-6.0 with plain,
# SDPA and its math backend, or with compile alone; six processes of the first kind all slow, five of the
# second, four fast), which had the table show SDPA ahead where it is not.  (Most of that was glibc trimming
# the heap inside the kernel's call, which the kernel no longer invites: PERFORMANCE.md §5.22.)
APART_PEERS = ("compile", "faiss")


def time_sparing_slow_peers(fns: Dict[str, object], repeats: int, seconds: Dict[str, float],
                            min_row_s: float = MIN_ROW_S) -> common.Measured:
    """common.time_calls, except that a peer far slower than the kernel in its first call
    (``seconds``; bf16 matmuls without bf16 instructions take seconds) is timed once more,
    not ``repeats`` times, that short calls get more rounds (``min_row_s``), and that the
    APART_PEERS are timed after the interleaved rounds, each in rounds of its own."""
    slow = {k for k, t in seconds.items()
            if not k.startswith("fused") and t > SLOW_PEER_S and t > SLOW_PEER_RATIO * seconds["fused"]}
    apart = [k for k in fns if k in APART_PEERS and k not in slow]
    measured = common.time_calls({k: f for k, f in fns.items() if k not in slow and k not in apart}, repeats,
                                 rewarm=True, min_s=min_row_s, max_repeats=MAX_ROUNDS)
    for k in apart:
        measured.update(common.time_calls({k: fns[k]}, repeats, rewarm=True, min_s=min_row_s,
                                          max_repeats=MAX_ROUNDS))
    if slow:
        measured.update(common.time_calls({k: fns[k] for k in slow}, 1, warm_up=False))
    return measured
