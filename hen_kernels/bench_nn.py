"""Hopfield layers: forward and forward+backward time and peak memory, fused against the reference.

    python -m hen_kernels.bench_nn [--out DIR] [--quick] [--repeats K]

Each case runs twice with the same inputs: ``fused`` (the automatic backend,
``cpu`` on CPU tensors and ``triton`` / ``cuda`` on GPU ones, with the fused
backward of ``hen_kernels.autograd``) and ``reference`` (``backend="torch"``:
plain PyTorch that holds the B x N association matrix and lets autograd keep
it for the backward).  Cases are at layer-regime shapes (DESIGN.md §2, D <= 256):
the functional update, a ``HopfieldLayer`` lookup over a large learned bank
and ``HopfieldPooling`` over long bags.  Memory is the peak resident memory
above the level before the call on the CPU (VmHWM, as ``bench.py``), and
``torch.cuda.max_memory_allocated`` above it on a GPU.  The table goes to
``benchmarks/results/nn.md`` (and ``nn.json``); nothing asserts on time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch

from . import bench, ops
from . import nn as hnn

DEFAULT_OUT = os.path.join("benchmarks", "results")
MIB = 2 ** 20


@dataclass(frozen=True)
class Case:
    kind: str  # "update" | "layer" | "pooling"
    similarity: str
    batch: int  # queries (update), batch (layer, pooling)
    length: int  # state patterns per batch item (layer), bag length (pooling); unused for update
    bank: int  # N: stored patterns (update, layer); = length for pooling
    dim: int
    heads: int = 1

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.similarity}-b{self.batch}-l{self.length}-n{self.bank}-d{self.dim}-h{self.heads}"


def cases(quick: bool, device: torch.device) -> List[Case]:
    if quick:
        return [Case("update", "dot", 64, 0, 512, 32), Case("layer", "l2", 4, 16, 256, 32, 2),
                Case("pooling", "dot", 8, 128, 128, 32, 2)]
    if device.type == "cuda":
        return [Case("update", s, 16384, 0, 16384, d) for s in ("dot", "l2") for d in (64, 128)] + [
            Case("layer", "dot", 64, 256, 16384, 128, 2), Case("pooling", "dot", 256, 4096, 4096, 128, 2)]
    return [Case("update", "dot", 1024, 0, 32768, 64), Case("update", "l2", 1024, 0, 32768, 64),
            Case("layer", "dot", 32, 64, 16384, 64), Case("pooling", "dot", 64, 2048, 2048, 64, 2)]


def _dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build(case: Case, backend: Optional[str], device: torch.device):
    """(module or None, inputs, call) for one case; ``call(grad)`` runs forward (+ backward when grad)."""
    g = torch.Generator().manual_seed(0)
    dt = _dtype(device)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt)

    if case.kind == "update":
        q, x = rnd(case.batch, case.dim), rnd(case.bank, case.dim)
        beta = 1.0 if case.similarity == "l2" else case.dim ** -0.5
        params = [q, x]

        def forward():
            return ops.hopfield_update(q, x, beta, similarity=case.similarity, backend=backend)
    else:
        common = dict(input_size=case.dim, num_heads=case.heads, hidden_size=case.dim // case.heads,
                      similarity=case.similarity, backend=backend)
        if case.kind == "layer":
            torch.manual_seed(0)
            module = hnn.HopfieldLayer(quantity=case.bank, **common)
            inp = rnd(case.batch, case.length, case.dim)
        else:
            torch.manual_seed(0)
            module = hnn.HopfieldPooling(quantity=1, **common)
            inp = rnd(case.batch, case.length, case.dim)
        module = module.to(device=device, dtype=dt)
        params = list(module.parameters())

        def forward():
            return module(inp)

    def call(grad: bool):
        if not grad:
            with torch.no_grad():
                return forward()
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        out = forward()
        out.float().square().mean().backward()
        return out

    return call


def _measure(fns: Dict[str, Callable[[], object]], repeats: int, device: torch.device):
    if device.type != "cuda":
        return bench.time_calls(fns, repeats)
    result = {}
    for k, fn in fns.items():
        fn()
        torch.cuda.synchronize()
        times, peaks = [], []
        for _ in range(repeats):
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            peaks.append(torch.cuda.max_memory_allocated() - before)
            del out
        result[k] = (times, max(peaks))
    return result


def run_case(case: Case, device: torch.device, repeats: int) -> dict:
    row = dict(asdict(case), name=case.name)
    calls = {"fused": build(case, None, device), "reference": build(case, "torch", device)}
    for mode, grad in (("fwd", False), ("fwd+bwd", True)):
        measured = _measure({who: (lambda c=c, grad=grad: c(grad)) for who, c in calls.items()}, repeats, device)
        for who, (times, extra) in measured.items():
            row[f"{mode}_{who}_ms"] = statistics.median(times) * 1e3
            row[f"{mode}_{who}_mib"] = None if extra is None else extra / MIB
        row[f"{mode}_speedup"] = row[f"{mode}_reference_ms"] / row[f"{mode}_fused_ms"]
    return row


def _fmt(v, f):
    return "n/a" if v is None else format(v, f)


def markdown(report: dict) -> str:
    lines = [
        f"# Hopfield layers: fused vs reference ({report['device']}, {report['dtype']})",
        "",
        f"Fused backend: {report['fused_backend']}. Command: `{report['command']}`. "
        f"Median of {report['repeats']} calls; load average {report['load']}.",
        "",
        "| case | fwd fused ms | fwd ref ms | fwd speedup | fwd+bwd fused ms | fwd+bwd ref ms | fwd+bwd speedup "
        "| fwd+bwd fused MiB | fwd+bwd ref MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['name']} | {r['fwd_fused_ms']:.1f} | {r['fwd_reference_ms']:.1f} | {r['fwd_speedup']:.2f}x "
            f"| {r['fwd+bwd_fused_ms']:.1f} | {r['fwd+bwd_reference_ms']:.1f} | {r['fwd+bwd_speedup']:.2f}x "
            f"| {_fmt(r['fwd+bwd_fused_mib'], '.1f')} | {_fmt(r['fwd+bwd_reference_mib'], '.1f')} |")
    lines += [
        "",
        "- case: kind-similarity-b(batch or queries)-l(states per item / bag length)-n(stored patterns)-d(dim)-h(heads).",
        "- MiB: peak memory above the level before the call (CPU: resident set, VmHWM; GPU: allocator peak).",
        "- reference = `backend=\"torch\"`: holds the B x N association matrix, and autograd keeps it for backward.",
    ]
    return "\n".join(lines) + "\n"


def run(out: str = DEFAULT_OUT, quick: bool = False, repeats: int = 3, device: Optional[str] = None) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for case in cases(quick, dev):
        rows.append(run_case(case, dev, repeats))
        print(f"{case.name}: fwd {rows[-1]['fwd_speedup']:.2f}x, fwd+bwd {rows[-1]['fwd+bwd_speedup']:.2f}x",
              file=sys.stderr)
    from . import backends
    from .validation import check_inputs

    x = torch.zeros(2, 8, device=dev, dtype=_dtype(dev))
    report = dict(
        device=(torch.cuda.get_device_name(dev) if dev.type == "cuda" else bench.cpu_model()),
        dtype=str(_dtype(dev)).replace("torch.", ""),
        fused_backend=backends.resolve(None, check_inputs(x, x, 1.0, "dot")).name,
        repeats=repeats, quick=quick, load=bench.load_average(),
        command="python -m hen_kernels.bench_nn" + (" --quick" if quick else ""),
        rows=rows,
    )
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "nn.json"), "w") as f:
        json.dump(report, f, indent=2)
    md = markdown(report)
    with open(os.path.join(out, "nn.md"), "w") as f:
        f.write(md)
    print(md)
    return report


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    run(args.out, args.quick, args.repeats, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
