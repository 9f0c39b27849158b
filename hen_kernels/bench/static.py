"""The machine-code report: every Triton kernel compiled for sm_80 and sm_90 without a GPU, with the CUDA C++
kernels of the built extension beside them (registers, spills, shared memory, occupancy, tensor-core,
MUFU, async-copy and global-memory instructions), and the checks the tests hold them to.

    python -m hen_kernels.bench static [--subset smoke|rep|full|full-tf32] [--arch 80,90] [--jobs N]
                                       [--with-pruned] [--cuda-so PATH|none] [--out DIR]

Writes ``static.json`` and ``static.md`` under --out (default benchmarks/results/static/); the full
matrix writes ``static.json.gz`` without each row's SASS detail, and a summary as static.md.  Exit 1
when a check fails: a compile error, a config the autotuner may pick that spills (costly_spill) or exceeds the
architecture's shared memory, a 16-bit layer kernel without tensor cores, a float32 product off the
tensor cores, a small_d bank tile loaded more than once per program (values = memory).

Registers and spills come from ptxas's own log (-v), shared memory from the compiled kernel, the
instruction mix from cuobjdump's SASS; occupancy is the CUDA occupancy calculator's arithmetic.
Nothing here runs a kernel: a GPU run (scripts/gpu_run.sh) adds measured times beside these rows
(``bench gpu`` writes them into gpu.md, joined by kernel and config).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from typing import List, Optional

from .static_spill import costly_spill

STATIC_OUT = os.path.join("benchmarks", "results", "static")
# A full-matrix row's machine-code detail (SASS mix, loops), left out of its stored report (~10^4 rows)
BULKY_FIELDS = ("sass", "hot_loop", "loops_detail", "ttir_loads")


def _restart_without_interpreter(argv: List[str]) -> int:
    """triton's interpreter cannot compile: run this program again in a process without it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.call([sys.executable, "-m", "hen_kernels.bench", "static", *argv], env=env)


def checks(rows: List[dict], cuda_rows: List[dict]) -> dict:
    """The assertions of the report, each {"ok": bool, "rule": text, "failures": [row summaries]}."""
    def name(r: dict) -> str:
        keys = ("kernel", "arch", "regime", "dtype", "sim", "VAM", "W", "D", "BM", "SPLITS", "PREC", "BN", "BK",
                "BDV", "BS", "num_warps", "num_stages")
        return " ".join(f"{k}={r[k]}" for k in keys if k in r)

    kept = [r for r in rows if r.get("pruned") is None]
    out = {}

    def check(key: str, rule: str, bad: List[dict], why=lambda r: "") -> None:
        out[key] = dict(ok=not bad, rule=rule, checked=None, failures=[name(r) + why(r) for r in bad])

    check("compiles", "every kept config compiles for sm_80 and sm_90",
          [r for r in kept if "error" in r], lambda r: f": {r['error']}")
    ok = [r for r in kept if "error" not in r]
    check("no_spills", "no config the autotuner may pick spills when it may take all 255 registers, or in its "
          "bank loop (the bytes ptxas spills below the ceiling to fit more blocks, outside that loop, are shown, "
          "not failed)",
          [r for r in ok if costly_spill(r)], lambda r: f": {costly_spill(r)}")
    check("smem_fits", "no config the autotuner may pick asks for more shared memory than one block may use",
          [r for r in ok if not r["smem_ok"]], lambda r: f": {r['smem']} > {r['smem_limit']}")
    # the instruction checks read the SASS detail, which a stored full matrix leaves out (BULKY_FIELDS): its rows
    # can be judged again for spills and shared memory, not for these
    detailed = [r for r in ok if "sass" in r]
    mma16 = [r for r in detailed if r["kernel"] in ("small_d", "tiled_d") and r.get("dtype") in ("bf16", "fp16")
             and not r.get("W") and r.get("BM") == 64]
    check("tensor_cores_16bit", "16-bit forward kernels with 64-query blocks run their products on HGMMA (sm_90, "
          "wgmma) and HMMA (sm_80) inside the bank loop",
          [r for r in mma16 if not r["hot_loop"].get("HGMMA" if r["arch"] == 90 else "HMMA")])
    f32 = [r for r in detailed if r["kernel"] in ("small_d", "tiled_d", "dq", "dkv")
           and (r.get("dtype") == "fp32" or r.get("W"))]
    check("tensor_cores_fp32", "float32 products (float32 inputs, weighted scores) run on tf32 tensor cores "
          "(HMMA/HGMMA .TF32), never on the FMA pipe", [r for r in f32 if not r["sass"].get("MMA.TF32")])
    once = [r for r in detailed if r["kernel"] == "small_d" and r.get("VAM")]
    check("bank_tile_once", "small_d with values = memory loads each bank tile once per program: one tt.load "
          "in the bank loop (TTIR; the ℓ2 recompute's column loads sit one loop deeper) and, where the tile "
          "arrives by cp.async, BN x BD x element bytes of LDGSTS per iteration of the bank loop (SASS)",
          [r for r in once if (r["ttir_loads"][1:2] != [1] or
                               r["bank_loop_async_bytes"] not in (0, r["bank_tile_bytes"]))],
          lambda r: f": TTIR loads per depth {r['ttir_loads']}, {r['bank_loop_async_bytes']} B of cp.async per "
                    f"iteration, tile {r['bank_tile_bytes']} B")
    check("cuda_no_spills", "the CUDA C++ kernels spill nothing (stack 0)", [r for r in cuda_rows if r["spills"]])
    mma = [r for r in cuda_rows if r["kernel"].startswith("mma_kernel")]
    check("cuda_mma_tensor_cores", "the CUDA mma kernel issues HMMA on both architectures",
          [r for r in mma if not r["sass"].get("HMMA")])
    for key, rows_checked in (("compiles", kept), ("no_spills", ok), ("smem_fits", ok), ("tensor_cores_16bit", mma16),
                              ("tensor_cores_fp32", f32), ("bank_tile_once", once), ("cuda_no_spills", cuda_rows),
                              ("cuda_mma_tensor_cores", mma)):
        out[key]["checked"] = len(rows_checked)
    return out


def run(subset: str, archs: List[int], jobs: int, out: str, with_pruned: bool, cuda_so: Optional[str],
        kernels: Optional[List[str]], keep: Optional[str], argv: List[str], dry_run: bool = False) -> int:
    from . import common, static_cases, static_compile, static_cuda, static_report

    cases = {a: static_cases.cases(subset, a, with_pruned) for a in archs}
    if kernels:
        cases = {a: [c for c in cs if c.kernel in kernels] for a, cs in cases.items()}
    total = sum(len(c) for c in cases.values())
    print(f"bench static: triton {common.triton_version()}, {total} compiles ({subset}, sm_"
          + ", sm_".join(map(str, archs)) + f", {jobs} at a time)", flush=True)
    if dry_run:
        import collections

        for a, cs in cases.items():
            print(f"  sm_{a}: " + ", ".join(f"{k} {n}" for k, n in collections.Counter(c.kernel for c in cs).items()))
        return 0
    t0 = time.monotonic()

    def progress(i: int, n: int, row: dict) -> None:
        if i % 10 == 0 or i == n or "error" in row:
            print(f"  [{i}/{n}] {time.monotonic() - t0:.0f} s" + (f"  ERROR {row['kernel']} sm_{row['arch']}: "
                                                                  f"{row['error']}" if "error" in row else ""),
                  flush=True)

    rows: List[dict] = []
    for a in archs:
        for r, c in zip(static_compile.compile_all(cases[a], [a], jobs, keep, progress), cases[a]):
            r.update(c.expect)
            rows.append(r)
    cuda_rows: List[dict] = []
    so = static_cuda.extension_path() if cuda_so is None else (None if cuda_so == "none" else cuda_so)
    if kernels and "cuda" not in kernels:
        so = None
    if so:
        try:
            cuda_rows = static_cuda.report(so, archs, jobs)
        except (OSError, subprocess.CalledProcessError) as e:
            print(f"bench static: the CUDA kernels of {so} could not be read: {common.short_error(e)}")
    report = dict(machine=common.host(), ptxas=_ptxas_version(), subset=subset, archs=archs,
                  command="python -m hen_kernels.bench static " + " ".join(argv), cuda_so=so,
                  elapsed_s=round(time.monotonic() - t0, 1), rows=rows, cuda=cuda_rows,
                  checks=checks(rows, cuda_rows))
    if subset.startswith("full"):
        report["rows"] = [{k: v for k, v in r.items() if k not in BULKY_FIELDS} for r in rows]
        js, mdp = common.write_report(out, "static", report, static_report.summary_markdown(report), gzipped=True)
    else:
        js, mdp = common.write_report(out, "static", report, static_report.markdown(report))
    failed = [k for k, c in report["checks"].items() if not c["ok"]]
    print(static_report.summary(report))
    print(f"wrote {js}, {mdp}")
    return 1 if failed else 0


def rejudge(path: str) -> int:
    """A stored report judged again by today's configs.py, without compiling: each row's ``pruned`` from the
    rules, then the checks and the markdown.  The rows must be the configs today's plan and config lists
    compile; a row they no longer make means the matrix must be compiled again."""
    from . import common, static_cases, static_report

    report = load(path)
    cases = [(a, c) for a in report["archs"] for c in static_cases.cases(report["subset"], a, with_pruned=True)]
    fields = {c.kernel: tuple(sorted(c.label)) for _, c in cases}

    def key(kernel: str, arch: int, row: dict, warps: int, stages: int) -> tuple:
        return (kernel, arch, tuple(row.get(k) for k in fields.get(kernel, ())), warps, stages)

    verdict = {key(c.kernel, a, c.label, c.num_warps, c.num_stages): c.pruned for a, c in cases}
    stale, changed, seen = [], 0, set()
    for r in report["rows"]:
        k = key(r["kernel"], r["arch"], r, r["num_warps"], r["num_stages"])
        if k not in verdict:
            stale.append(r)
            continue
        seen.add(k)
        changed += r.get("pruned") != verdict[k]
        r["pruned"] = verdict[k]
    # every config the autotuner may now pick must have been compiled (of the kernels the report holds), and
    # every config of the plan where the report was compiled --with-pruned
    held = {r["kernel"] for r in report["rows"]}
    every = "--with-pruned" in report["command"]
    missing = [k for k, why in verdict.items() if (why is None or every) and k not in seen and k[0] in held]
    if stale or missing:
        first = (f"{stale[0]['kernel']} sm_{stale[0]['arch']} BM={stale[0].get('BM')}" if stale else
                 f"{missing[0][0]} sm_{missing[0][1]}")
        print(f"bench static --rejudge: {len(stale)} rows of {path} are configs today's plan no longer compiles and "
              f"{len(missing)} configs it should hold are not in it (those today's rules keep; with --with-pruned, every "
              f"one; the first: {first}): compile the matrix again")
        return 2
    if "--rejudge" not in report["command"]:
        report["command"] += " (judged again by configs.py: python -m hen_kernels.bench static --rejudge)"
    stored_checks, report["checks"] = report["checks"], checks(report["rows"], report.get("cuda", []))
    if not any("sass" in r for r in report["rows"]):
        # the instruction checks need the SASS a stored full matrix leaves out: the compiling run's verdicts stand
        for name in ("tensor_cores_16bit", "tensor_cores_fp32", "bank_tile_once"):
            if name in stored_checks:
                report["checks"][name] = dict(stored_checks[name], rule=stored_checks[name]["rule"].split(" (as the")[0]
                                              + " (as the compiling run judged it: these rows keep no SASS)")
    full = str(path).endswith(".gz")
    md = (static_report.summary_markdown if full else static_report.markdown)(report)
    js, mdp = common.write_report(os.path.dirname(str(path)) or ".", "static", report, md, gzipped=full)
    print(f"bench static --rejudge: {changed} rows marked otherwise")
    print(static_report.summary(report))
    print(f"wrote {js}, {mdp}")
    return 1 if any(not c["ok"] for c in report["checks"].values()) else 0


def load(path) -> dict:
    """A stored report, static.json or the full matrix's static.json.gz."""
    with (gzip.open(path, "rt") if str(path).endswith(".gz") else open(path)) as f:
        return json.load(f)


def _ptxas_version() -> Optional[str]:
    from .static_compile import _tool

    try:
        text = subprocess.run([_tool("ptxas"), "--version"], capture_output=True, text=True).stdout
    except OSError:
        return None
    return text.strip().splitlines()[-1] if text.strip() else None


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter's config lists are not the GPU's
        return _restart_without_interpreter(argv)
    from .static_cases import SUBSETS

    p = argparse.ArgumentParser(prog="python -m hen_kernels.bench static", description=__doc__.split("\n")[0])
    p.add_argument("--subset", default="rep", choices=SUBSETS,
                   help="smoke: one case per kernel; rep: the default test run's set; full: the whole matrix; "
                   "full-tf32: its forward launches with float32 operands at one tf32 product")
    p.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    p.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)), help="compiles at a time")
    p.add_argument("--out", default=STATIC_OUT, help=f"directory for static.json and static.md (default {STATIC_OUT})")
    p.add_argument("--with-pruned", action="store_true",
                   help="also compile the configs configs.py keeps from the autotuner (the report says why)")
    p.add_argument("--cuda-so", default=None, help="the built extension to read (default: hen_kernels/_C*.so; "
                   "'none' leaves the CUDA C++ kernels out)")
    p.add_argument("--kernels", default="", help="comma-separated subset of small_d,tiled_d,combine,dq,dkv,cuda "
                   "(default: all; cuda: the built extension's CUDA C++ kernels)")
    p.add_argument("--keep", default=None, help="directory to keep each compile's TTIR, TTGIR and PTX in")
    p.add_argument("--dry-run", action="store_true", help="count the compiles and stop")
    p.add_argument("--rejudge", metavar="REPORT", default=None,
                   help="judge a stored static.json or static.json.gz again by today's rules, without compiling")
    a = p.parse_args(argv)
    if a.rejudge:
        return rejudge(a.rejudge)
    try:
        archs = [int(x) for x in a.arch.split(",") if x]
    except ValueError:
        p.error(f"--arch: expected e.g. 80,90, got {a.arch!r}")
    from ..triton.configs import ARCHS

    bad = [x for x in archs if x not in ARCHS]
    if bad or not archs:
        p.error(f"--arch: expected a subset of {sorted(ARCHS)}, got {a.arch!r}")
    if a.keep:
        os.makedirs(a.keep, exist_ok=True)
    kernels = [k for k in a.kernels.split(",") if k] or None
    return run(a.subset, archs, max(1, a.jobs), a.out, a.with_pruned, a.cuda_so, kernels, a.keep, argv, a.dry_run)


if __name__ == "__main__":
    sys.exit(main())
