"""Where the CPU kernel's own products stop beating brgemm: the measurements behind `hand_up_to` and `lanes_win`.

    python -m hen_kernels.bench crossover [--out DIR] [--quick] [--repeats K] [--emulate-avx2] [--name STEM]

For each dtype, row depth D and query count B, the CPU kernel is timed with its tile
products forced (``hen_kernels::partial_with_plan_hints``): oneDNN's brgemm for both
products, and each hand-written kind this CPU runs (``hand``; bfloat16 also ``pairs``,
AVX-512 BF16's pair dot product, where the CPU has it; up to D = 64, ``lanes``: the
scores with the bank tile turned, lane_scores).  Each cell is brgemm's time over
the hand-written one's (above 1: the hand-written products win), on a bank of 2^25
elements (64 MiB in bfloat16), calls interleaved, median of ``--repeats``.
csrc/cpu/hopfield_cpu.cpp's ``hand_up_to`` and ``lanes_win`` say which limits the planner uses; this
table is how to check them on a new kind of CPU.  Writes crossover.{json,md} (or STEM.*);
``--emulate-avx2`` measures what an AVX2-only CPU would run (as ``bench cpu --emulate-avx2``)
and writes crossover_avx2.{json,md}.
"""
import statistics
from typing import List, Optional

import torch

from . import common
from .cpu_peers import cpu_info

DEPTHS = (8, 16, 24, 32, 48, 64, 128, 256, 512, 1024)  # 8, 24, 48: rows that end in a partial vector
LANES_DEPTH_MAX = 64  # the lane products' sums grow a vector of work per element of depth: short rows only
QUERIES = (1, 2, 4, 8, 16, 32)
BANK_ELEMENTS = 2 ** 25
QUICK_ELEMENTS = 2 ** 16


def kinds(dtype: torch.dtype, info: dict, D: int) -> List[str]:
    """The hand-written product kinds this CPU runs for ``dtype`` at depth ``D``."""
    pairs = ["pairs"] if dtype == torch.bfloat16 and info.get("bf16_pairs") == "1" else []
    return ["hand"] + pairs + (["lanes"] if D <= LANES_DEPTH_MAX else [])


def forced(q: torch.Tensor, x: torch.Tensor, kernel: str):
    beta = torch.tensor([1.0 / q.shape[-1] ** 0.5])
    return lambda: torch.ops.hen_kernels.partial_with_plan_hints(q[None], x[None], x[None], beta, 0, 0, None,
                                                                 kernel, 0, 0)


def measure(quick: bool, repeats: int) -> dict:
    info = cpu_info()
    if info.get("gemm") != "brgemm":
        raise SystemExit("crossover: this build has no brgemm (not x86, or a torch without it): nothing to compare")
    report = {"machine": dict(common.host(), cpu_info=torch.ops.hen_kernels.cpu_info(), emulated=common.emulated()),
              "quick": quick, "repeats": repeats, "cells": []}
    elements = report["bank_elements"] = QUICK_ELEMENTS if quick else BANK_ELEMENTS
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for D in DEPTHS:
            x = torch.randn(elements // D, D, generator=gen).to(dtype)
            for B in QUERIES:
                q = x[:B] + 0.01  # near stored rows, as in recall
                fns = {"brgemm": forced(q, x, "brgemm"), **{k: forced(q, x, k) for k in kinds(dtype, info, D)}}
                ms = {k: statistics.median(t) * 1e3 for k, (t, _) in common.time_calls(fns, repeats, rewarm=True).items()}
                cell = {"dtype": str(dtype).replace("torch.", ""), "D": D, "B": B, "N": x.shape[0], "ms": ms}
                report["cells"].append(cell)
                print(f"  {cell['dtype']:<9} D {D:5d} B {B:3d}  " + "  ".join(
                    f"{k} {v:8.2f} ms" for k, v in ms.items()), flush=True)
    return report


def markdown(report: dict) -> str:
    title = "# CPU kernel: brgemm time / hand-written time (above 1: the hand-written products win)"
    lines = common.cpu_table_head(title, report["machine"], report["machine"]["cpu_info"])
    lines += [f"- bank of {report['bank_elements']} elements, median of {report['repeats']} interleaved "
              "calls, each after an untimed call of the same function" + (" (--quick)" if report["quick"] else ""),
              "- the planner's limits: `hand_up_to` and `lanes_win` in csrc/cpu/hopfield_cpu.cpp", ""]
    dtypes = sorted({c["dtype"] for c in report["cells"]}, key=lambda d: d != "float32")
    for dtype in dtypes:
        cells = [c for c in report["cells"] if c["dtype"] == dtype]
        for kind in dict.fromkeys(k for c in cells for k in c["ms"] if k != "brgemm"):
            lines += [f"## {dtype}, {kind}", ""]
            rows = []
            for D in DEPTHS:
                row = {c["B"]: c["ms"]["brgemm"] / c["ms"][kind] for c in cells if c["D"] == D and kind in c["ms"]}
                if row:
                    rows.append([str(D)] + [common.ratio(row.get(B)) for B in QUERIES])
            lines += common.table(["D"] + [f"B = {B}" for B in QUERIES], rows) + [""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    return common.run_cpu_table("crossover", __doc__, f"a bank of {QUICK_ELEMENTS} elements: seconds, for tests", 5,
                                "timed calls per cell", measure, markdown, argv)
