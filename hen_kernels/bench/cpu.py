"""`make bench`: the CPU table of docs/design.md §6, printed and written as JSON and Markdown.

    python -m hen_kernels.bench [cpu] [--out DIR] [--quick] [--repeats K]

Every case times the fused kernel, ``hk.hopfield_update(..., backend=<fused>)``,
against the plain PyTorch baseline ``softmax(beta * sim(X, s)) @ X`` (matmul,
softmax, matmul, with the B x N score matrix in memory).  The fused backend is
"cpu" (csrc) when the extension is built; otherwise the reference ("torch")
stands in and every output says so.

Other code (``benchmarks/test_bench_cpu.py``) reuses :func:`cases`,
:func:`case_callables` and :func:`run_case`.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Tuple

import torch

from .. import backends, ops
from ..reference import similarity as sim
from . import common
from .common import DEFAULT_OUT, MIB, num

# docs/design.md §6, CPU rows: required baseline_time / fused_time per regime.
TARGETS = {"recall": 1.6, "layer": 1.3, "bulk": 0.95}
# (regime, B, N, D), float32; each is run for every similarity in TIMED_SIMILARITIES.
SHAPES = [("recall", 1, 262144, 512), ("recall", 8, 262144, 512),
          ("layer", 64, 65536, 64), ("bulk", 64, 65536, 2048)]
TIMED_SIMILARITIES = ("dot", "l2")
QUICK_N = 4096


@dataclass(frozen=True)
class Case:
    regime: str
    similarity: str
    B: int
    N: int
    D: int

    @property
    def name(self) -> str:
        return f"{self.regime}-{self.similarity}-B{self.B}-N{self.N}-D{self.D}"

    @property
    def flops(self) -> int:  # docs/design.md §6: 4·B·N·D
        return 4 * self.B * self.N * self.D

    @property
    def bytes(self) -> int:  # the bank read once, float32
        return self.N * self.D * 4

    @property
    def target(self) -> float:
        return TARGETS[self.regime]


def cases(n: Optional[int] = None) -> List[Case]:
    """The §6 CPU cases, ordered so that cases sharing a bank are adjacent; ``n`` overrides N."""
    return [Case(regime, s, b, n or big_n, d) for regime, b, big_n, d in SHAPES for s in TIMED_SIMILARITIES]


def fused_backend() -> str:
    """'cpu' when the csrc extension loaded, else 'torch' (the reference stands in)."""
    return "cpu" if "cpu" in ops.available_backends() else "torch"


def backend_label(backend: str) -> str:
    if backend == "torch":
        why = backends.BACKENDS["cpu"].unavailable_reason or "not chosen"
        return f"torch (the REFERENCE, not a fused kernel: 'cpu' unavailable: {why})"
    return backend


# --- inputs: one bank at a time, reused by every case of that shape ------------------

_BANK: dict = {}


def bank(n: int, d: int) -> torch.Tensor:
    """A float32 (n, d) standard-normal bank; the previous bank is dropped first."""
    if (n, d) not in _BANK:
        _BANK.clear()
        common.trim_heap()
        _BANK[(n, d)] = torch.randn(n, d, generator=torch.Generator().manual_seed(n * 7919 + d))
    return _BANK[(n, d)]


def release_bank() -> None:
    _BANK.clear()
    common.trim_heap()


def case_inputs(case: Case) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """(query (B, D), bank (N, D), beta); beta = 1/sqrt(D) keeps dot scores of order one."""
    q = torch.randn(case.B, case.D, generator=torch.Generator().manual_seed(case.B))
    return q, bank(case.N, case.D), 1.0 / math.sqrt(case.D)


def baseline(q: torch.Tensor, x: torch.Tensor, beta: float, similarity: str) -> torch.Tensor:
    """The plain PyTorch expression of docs/design.md §6."""
    return torch.softmax(beta * sim(q, x, similarity), -1) @ x


def case_callables(case: Case, backend: str) -> Tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    """(fused, baseline) zero-argument calls on this case's inputs."""
    q, x, beta = case_inputs(case)

    def fused() -> torch.Tensor:
        return ops.hopfield_update(q, x, beta, similarity=case.similarity, backend=backend)

    return fused, lambda: baseline(q, x, beta, case.similarity)


def run_case(case: Case, backend: Optional[str] = None, repeats: int = 5) -> dict:
    """Time and measure one case, fused and baseline; one table row as a dict."""
    backend = backend or fused_backend()
    fused, base = case_callables(case, backend)
    row = dict(asdict(case), name=case.name, fused_backend=backend)
    with torch.no_grad():
        f, b = fused(), base()
        row["rel_err"] = float((f - b).norm() / b.norm())
        del f, b
        measured = common.time_calls({"baseline": base, "fused": fused}, repeats)
    for who, (times, extra) in measured.items():
        t = statistics.median(times)
        row[f"{who}_ms"] = t * 1e3
        row[f"{who}_gflops"] = case.flops / t / 1e9
        row[f"{who}_gbps"] = case.bytes / t / 1e9
        row[f"{who}_extra_mib"] = None if extra is None else extra / MIB
    row["ratio"] = row["baseline_ms"] / row["fused_ms"]
    row["target"] = case.target
    row["met"] = row["ratio"] >= case.target
    return row


# --- the machine ---------------------------------------------------------------------

def matmul_gflops(quick: bool, repeats: int) -> float:
    """This machine's float32 square matmul GFLOP/s (n = 512 quick, else 2048)."""
    n = 512 if quick else 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / common.median_seconds(lambda: a @ b, repeats) / 1e9


def measure_ceilings(quick: bool, repeats: int) -> dict:
    """Float32 matmul GFLOP/s and memory read GB/s (a sum over a buffer larger than the caches)."""
    buf = torch.randn((16 if quick else 512) * MIB // 4)
    t_rd = common.median_seconds(buf.sum, repeats)
    n = 512 if quick else 2048
    return {"matmul_gflops": matmul_gflops(quick, repeats), "matmul_shape": [n, n, n],
            "read_gbps": buf.numel() * 4 / t_rd / 1e9, "read_mib": buf.numel() * 4 // MIB}


def machine(backend: str) -> dict:
    return dict(common.host(), fused_backend=backend, fused_backend_label=backend_label(backend),
                fused_is_reference=backend == "torch", memory_measured=common.memory_measured())


# --- the table -----------------------------------------------------------------------

COLUMNS = [  # (header, row -> cell)
    ("regime", lambda r: r["regime"]),
    ("sim", lambda r: r["similarity"]),
    ("B", lambda r: str(r["B"])),
    ("N", lambda r: str(r["N"])),
    ("D", lambda r: str(r["D"])),
    ("fused ms", lambda r: num(r["fused_ms"], ".2f")),
    ("base ms", lambda r: num(r["baseline_ms"], ".2f")),
    ("fused GFLOP/s", lambda r: num(r["fused_gflops"], ".1f")),
    ("base GFLOP/s", lambda r: num(r["baseline_gflops"], ".1f")),
    ("fused GB/s", lambda r: num(r["fused_gbps"], ".2f")),
    ("base GB/s", lambda r: num(r["baseline_gbps"], ".2f")),
    ("fused extra MiB", lambda r: num(r["fused_extra_mib"], ".1f")),
    ("base extra MiB", lambda r: num(r["baseline_extra_mib"], ".1f")),
    ("rel err", lambda r: num(r["rel_err"], ".1e")),
    ("ratio", lambda r: common.ratio(r["ratio"])),
    ("target", lambda r: ">= " + num(r["target"], ".2f") + "x"),
    ("met", lambda r: "yes" if r["met"] else "NO"),
]


def markdown(report: dict) -> str:
    m, c = report["machine"], report["ceilings"]
    lines = [
        "# hen_kernels CPU benchmark (docs/design.md §6)",
        "",
        f"- machine: {m['cpu']} ({m['isa']}), {m['logical_cpus']} logical CPUs, torch {m['torch']} "
        f"with {m['torch_threads']} threads, Python {m['python']}, load average {m['load_average']} at the start",
        f"- fused: {m['fused_backend_label']}; baseline: `torch.softmax(beta * sim(X, s), -1) @ X`",
        f"- float32; median of {report['repeats']} calls after a warm-up"
        + (" (--quick: N = %d, not the docs/design.md shapes)" % QUICK_N if report["quick"] else ""),
        f"- ceilings: float32 matmul ({c['matmul_shape'][0]}^3) {c['matmul_gflops']:.1f} GFLOP/s before the "
        f"cases and {c['matmul_gflops_after']:.1f} after, "
        f"memory read {c['read_gbps']:.2f} GB/s ({c['read_mib']} MiB sum)",
        "- GFLOP/s = 4·B·N·D / time; GB/s = bank bytes (N·D·4) / time; extra MiB = peak resident "
        "memory above the level before the call (VmHWM - VmRSS); ratio = base ms / fused ms",
        "",
    ]
    lines += common.table([h for h, _ in COLUMNS], [[cell(r) for _, cell in COLUMNS] for r in report["rows"]])
    met = sum(r["met"] for r in report["rows"])
    lines += ["", f"{met} of {len(report['rows'])} rows meet their target."]
    if report.get("warning"):
        lines.append("WARNING: " + report["warning"])
    if m["fused_is_reference"]:
        lines.append("The fused column is the PyTorch reference: these ratios say nothing about the fused kernel.")
    return "\n".join(lines) + "\n"


def run(out: str = DEFAULT_OUT, quick: bool = False, repeats: int = 5) -> dict:
    """Run every case, print progress and the table, write cpu.json and cpu.md under ``out``."""
    backend = fused_backend()
    info = machine(backend)
    print(f"hen_kernels bench: {info['cpu']}, torch {info['torch']}, {info['torch_threads']} threads, "
          f"fused = {info['fused_backend_label']}", flush=True)
    report = {"machine": info, "quick": quick, "repeats": repeats,
              "ceilings": measure_ceilings(quick, repeats), "rows": []}
    try:
        for case in cases(QUICK_N if quick else None):
            r = run_case(case, backend, repeats)
            report["rows"].append(r)
            print(f"  {case.name:<32} fused {r['fused_ms']:9.2f} ms  base {r['baseline_ms']:9.2f} ms  "
                  f"ratio {r['ratio']:5.2f}x (target {case.target}x: {'met' if r['met'] else 'NOT met'})",
                  flush=True)
    finally:
        release_bank()
    # A kernel that leaves threads spinning (raw OpenMP did, docs/design.md §7) slows every later
    # torch call, the baselines included; measure the matmul again to catch it.
    c = report["ceilings"]
    c["matmul_gflops_after"] = after = matmul_gflops(quick, repeats)
    if max(after, c["matmul_gflops"]) > 2 * min(after, c["matmul_gflops"]):
        report["warning"] = (f"torch matmul ran at {c['matmul_gflops']:.1f} GFLOP/s before the cases and "
                             f"{after:.1f} after: other work on the machine, or a kernel that slows later "
                             "torch calls (raw OpenMP did, docs/design.md §7); the timings are suspect")
    md = markdown(report)
    js, mdp = common.write_report(out, "cpu", report, md)
    print("\n" + md + f"\nwrote {js} and {mdp}")
    return report


def main(argv: Optional[List[str]] = None) -> int:
    p = common.parser("cpu", __doc__, "cpu.json and cpu.md", f"tiny shapes (N = {QUICK_N}): seconds, for tests",
                      5, "timed calls per measurement, after one warm-up")
    a = p.parse_args(argv)
    run(a.out, a.quick, a.repeats)
    return 0
