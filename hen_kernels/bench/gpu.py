"""The GPU tables of docs/design.md §6 in bf16: layer, recall, bulk and steps, against the same run's baselines.

    python -m hen_kernels.bench gpu [--out DIR] [--quick] [--regimes layer,recall,bulk,steps]
                                    [--budget SECONDS] [--repeats K] [--try-all]

Every case times each available fused backend ("triton", "cuda") through
``hk.hopfield_update(..., backend=...)`` (``hk.hopfield_retrieve`` for the
steps rows) and, in the same process, the baselines: the reference ("torch"
backend, which materialises B x N scores: skipped with the reason where it
would not fit), ``torch.nn.functional.scaled_dot_product_attention`` with keys
= values = X under each SDPA backend separately (dot rows; a backend that
refuses the shape is reported "n/a: <its reason>"), and FlexAttention
(compiled) with a ``score_mod`` for the ℓ2 form, plain dot for dot rows.

Times are CUDA-event medians after a warm-up (and, for Triton, after its
autotuning).  TFLOP/s counts 4·B·N·D flops, GB/s the bank read once (N·D·2
bytes), per step.  Ceilings measured in the same run: a bf16 matmul, a
device-to-device copy (bytes read + written), a device read (a sum) and a
pinned host-to-device copy.  Before a fused or baseline result is timed, its
output on the first (up to 256) queries is checked against the float32
reference (relative error <= 2e-2, docs/design.md §5): a wrong result posts no time.

Writes ``gpu.json``, ``gpu.md`` and ``roofline.png`` under ``--out`` (default
benchmarks/results/) after every case, so a run stopped by a time limit keeps
what it measured.  Without a CUDA device it prints one line to stderr and
exits 2.  Exit 1 when a fused backend gave a wrong result or failed.

After the cases, each timed Triton kernel is compiled again for this GPU's
architecture with the config its autotuner picked, and gpu.md shows its
machine-code row (registers, spills, shared memory, occupancy, tensor-core
instructions) beside the measured time and the roofline floor (gpu_static;
``python -m hen_kernels.bench static`` is the full report).

This module runs the table; gpu_cases holds the cases and peers, gpu_measure
the timing and checking, gpu_report the targets, table and plot.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from . import common, gpu_static
from .common import DEFAULT_OUT
from .gpu_cases import (ELEM, FLEX_MAX_D, REGIMES, TOL, cases, fused_backends, limit_autotuning,
                        release_bank)
from .gpu_measure import ContextLost, machine, measure_ceilings, run_case
from .gpu_report import markdown, write

NO_GPU = "bench gpu: no CUDA device visible; GPU tables not measured"
INTERPRETED = ("bench gpu: TRITON_INTERPRET=1 is set: Triton would run in its CPU interpreter; "
               "unset it (or set TRITON_INTERPRET=0) to time the GPU")

def run(out: str = DEFAULT_OUT, quick: bool = False, regimes: Sequence[str] = REGIMES, repeats: int = 10,
        budget: Optional[float] = None, try_all: bool = False) -> int:
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(msg, flush=True)

    fused, unavailable = fused_backends()
    limited = limit_autotuning() if quick and "triton" in fused else []
    todo = cases(quick, regimes)
    report = {"machine": machine(), "quick": quick, "regimes": list(regimes), "repeats": repeats, "budget_s": budget,
              "fused_backends": fused, "unavailable": unavailable, "autotune_limited": limited,
              "tolerance": TOL, "ceilings": None, "cases": [], "skipped": [], "complete": False}
    m = report["machine"]
    log(f"bench gpu: {m['gpu']}, torch {m['torch']}, CUDA {m['cuda']}, triton {m['triton']}; fused: "
        f"{', '.join(fused) or 'none'}" + "".join(f"; {k} left out: {v}" for k, v in unavailable.items()))
    if not fused:
        log("bench gpu: WARNING: no fused backend is available; only the baselines are measured")
    target_s = 0.1 if quick else 0.3
    failed = False
    try:
        report["ceilings"] = c = measure_ceilings(quick, repeats)
        log(f"  ceilings: matmul {c['matmul_tflops']:.0f} TFLOP/s, copy {c['copy_gbps']:.0f} GB/s, "
            f"read {c['read_gbps']:.0f} GB/s, pinned H2D {c['h2d_gbps']:.1f} GB/s")
        write(report, out, plot=False)
        for i, case in enumerate(todo):
            spent = time.monotonic() - t0
            if budget is not None and spent > budget:
                report["skipped"].append({"name": case.name, "reason": f"time budget {budget:.0f} s spent"})
                log(f"[{i + 1}/{len(todo)}] {case.name}: skipped (time budget {budget:.0f} s spent)")
                continue
            log(f"[{i + 1}/{len(todo)}] {case.name}  ({case.flops / 1e12:.3g} TFLOP, bank "
                f"{case.N * case.D * ELEM / 2**20:.0f} MiB, {spent:.0f} s in)")
            try:
                rec = run_case(case, fused, repeats, target_s, try_all, log)
            except ContextLost as e:
                report["error"] = f"the CUDA context failed during {case.name}: {e}; later cases not measured"
                log("bench gpu: " + report["error"])
                failed = True
                break
            report["cases"].append(rec)
            failed |= any(mm["kind"] == "fused" and mm["status"] != "ok" and not mm["status"].startswith("n/a")
                          for mm in rec["measurements"].values())
            write(report, out, plot=False)
        else:
            report["complete"] = not report["skipped"]
        if "triton" in fused and not failed:
            static_rows(report, log)
    except KeyboardInterrupt:
        report["interrupted"] = True
        log("bench gpu: interrupted; writing what was measured")
    finally:
        release_bank()
        report["elapsed_s"] = time.monotonic() - t0
        write(report, out, plot=True)
    log("\n" + markdown(report))
    log(f"wrote {Path(out, 'gpu.json')}, {Path(out, 'gpu.md')}" + (", roofline.png" if report.get("roofline") else ""))
    if failed:
        log("bench gpu: a fused backend failed or gave a wrong result (see the status column)")
    return 1 if failed or report.get("interrupted") else 0


def static_rows(report: dict, log) -> None:
    """The machine code of every timed Triton kernel (its autotuned config compiled for this GPU's
    architecture), for gpu.md's table of static rows beside measured times (gpu_static)."""
    major = torch.cuda.get_device_capability()[0]
    report["static_arch"] = arch = 90 if major >= 9 else 80
    t0 = time.monotonic()
    try:
        report["static_rows"] = gpu_static.rows_for(report, arch, log)
    except Exception as e:  # noqa: BLE001 - the timings stand without it
        report["static_error"] = common.short_error(e)
    log(f"  machine code of {len(report.get('static_rows') or [])} timed kernels in {time.monotonic() - t0:.0f} s")


def parse_regimes(text: str) -> List[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in REGIMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(REGIMES)}, got {text!r}")
    return [r for r in REGIMES if r in names]


def main(argv: Optional[List[str]] = None) -> int:
    p = common.parser("gpu", __doc__, "gpu.json, gpu.md, roofline.png", "shrunken shapes, Triton autotuning "
                      "cut to one config: a smoke test, not the docs/design.md numbers", 10,
                      "least timed calls per timing")
    p.add_argument("--regimes", type=parse_regimes, default=list(REGIMES),
                   help=f"comma-separated subset of {','.join(REGIMES)} (default: all)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds; cases not started by then are listed as skipped (default: no limit)")
    p.add_argument("--try-all", action="store_true", help=f"also attempt FlexAttention for D > {FLEX_MAX_D}")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print(INTERPRETED, file=sys.stderr)
        return 2
    return run(a.out, a.quick, a.regimes, a.repeats, a.budget, a.try_all)

