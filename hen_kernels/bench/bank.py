"""Bank benchmarks (docs/design.md §6, issue 5): streamed MemoryBank updates, printed and written as bank.{md,json}.

    python -m hen_kernels.bench bank [--out DIR] [--quick] [--repeats K]

Three regimes:

- ``host bank (GPU)``: the docs/design.md §6 row.  A bf16 bank in pinned host memory,
  4x larger than the GPU memory this process is allowed for the test
  (``torch.cuda.set_per_process_memory_fraction``), streamed to the GPU by
  ``MemoryBank(storage="host")``; achieved GB/s (bank bytes / time) against the
  measured pinned host-to-device copy bandwidth, target >= 80 %.  Without a CUDA
  device it is skipped, with the reason printed and recorded.
- ``disk bank (CPU)``: a bank file 4x larger than an address-space limit set with
  ``setrlimit(RLIMIT_AS)`` in a child process (so the whole bank cannot even be
  mapped, let alone read, inside the limit), streamed by
  ``MemoryBank.load(path, storage="disk")``; rows per second, GB/s and peak
  resident memory, cold (page cache of the file dropped first) and warm.
- ``host bank (CPU)``: the same streaming over a bank in memory, in chunks of 64 MiB
  (``chunk_rows`` set: by default a host bank on a CPU device is one call), against one
  ``hk.hopfield_update`` over the whole tensor: the cost of chunking and merging.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import torch

from .. import ops, reference
from ..bank import CHUNK_BYTES, MemoryBank
from . import common
from .common import DEFAULT_OUT, GIB, KERNEL_TOL, MIB, median_seconds, proc_kib
from .cpu_cases import check, float64_update

HOST_TARGET = 0.80  # docs/design.md §6: >= 80 % of measured pinned host-to-device bandwidth


# --- host bank on a GPU (docs/design.md §6) ------------------------------------------------

def _empty_host_cache() -> None:
    """Free cached pinned host blocks (torch >= 2.9 names it torch._C._accelerator_emptyHostCache)."""
    fn = getattr(torch._C, "_accelerator_emptyHostCache", None) or getattr(torch._C, "_host_emptyCache", None)
    if fn is not None:
        fn()


def pinned_h2d_gbps(nbytes: int, repeats: int) -> float:
    """Measured pinned host-to-device copy bandwidth (GB/s), median over ``repeats`` copies."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    sec = median_seconds(lambda: dst.copy_(src, non_blocking=True), repeats, torch.cuda.synchronize)
    return nbytes / sec / 1e9


def host_bank_gpu(quick: bool, repeats: int, bank_gib: Optional[float] = None) -> List[dict]:
    """The §6 host-bank rows; raises RuntimeError with the reason when no CUDA device is present."""
    if not torch.cuda.is_available():
        raise RuntimeError("the host-bank regime streams a pinned host bank to a GPU: no CUDA device is "
                           "available (torch.cuda.is_available() is False)")
    dev = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(dev).total_memory
    bank_bytes = int((bank_gib if bank_gib is not None else (1 if quick else 16)) * GIB)
    allowed = bank_bytes // 4  # the bank is 4x what the GPU may hold for this test
    h2d = pinned_h2d_gbps(min(bank_bytes, 1 * GIB), repeats)  # the ceiling, before the cap
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, allowed / total), dev)
    try:
        rows, answers = _host_bank_rows(dev, bank_bytes, allowed, (1024,) if quick else (1024, 4096), repeats, h2d,
                                        torch.cuda.synchronize)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        torch.cuda.empty_cache()
    # The check, with the cap lifted.
    _check_host_bank_rows(dev, rows, answers)
    return rows


def _host_bank_rows(dev: torch.device, bank_bytes: int, allowed: int, dims, repeats: int, h2d: float, sync):
    """The timed rows, and each (N, D)'s B -> (query, the streamed output) for the check.  ``dev`` a CUDA device
    (a CPU one runs the same code, for the tests)."""
    rows: List[dict] = []
    answers: Dict[Tuple[int, int], dict] = {}
    for d in dims:
        n = bank_bytes // (d * 2)
        # two chunk buffers in flight: together at most half of what the GPU may hold
        chunk_rows = min(CHUNK_BYTES["cuda"], allowed // 4) // (d * 2)
        if dev.type == "cuda":
            _empty_host_cache()  # hand the previous bank's pinned memory back first
        bank = MemoryBank(d, dtype=torch.bfloat16, device=dev, storage="host", chunk_rows=chunk_rows)
        bank._store.reserve(n)
        for block in _gpu_rows(dev, n, d):
            bank.add(block)
        answers[n, d] = {}
        for b in (1, 16, 64):
            q = torch.randn(b, d, device=dev, dtype=torch.bfloat16)
            beta = 1.0 / math.sqrt(d)
            sec = median_seconds(lambda: bank.update(q, beta), repeats, sync)
            answers[n, d][b] = (q, bank.update(q, beta))
            gbps = bank.nbytes / sec / 1e9
            rows.append(dict(regime="host bank (GPU)", storage="host", dtype="bfloat16", B=b, N=n, D=d,
                             bank_gib=bank.nbytes / GIB, gpu_allowed_gib=allowed / GIB,
                             chunk_rows=bank.chunk_rows, ms=sec * 1e3, gbps=gbps, rows_per_s=n / sec,
                             ceiling_gbps=h2d, ceiling="pinned H2D copy", ratio=gbps / h2d,
                             target=HOST_TARGET, met=gbps / h2d >= HOST_TARGET))
            print(f"  host bank (GPU) B={b:<3} D={d:<5} {bank.nbytes / GIB:6.2f} GiB  {sec * 1e3:9.2f} ms  "
                  f"{gbps:7.2f} GB/s = {gbps / h2d:5.1%} of pinned H2D {h2d:.2f} GB/s", flush=True)
        bank = None
    return rows, answers


def _check_host_bank_rows(dev: torch.device, rows: List[dict], answers: Dict[Tuple[int, int], dict]) -> None:
    """Each row's output against the float64 reference over the same rows, made again from their seed."""
    for (n, d), by_b in answers.items():
        want = _float64_reference(_gpu_rows(dev, n, d), {b: q for b, (q, _) in by_b.items()}, 1.0 / math.sqrt(d))
        for r in rows:
            if r["D"] == d:
                r["rel_err"], r["check_ok"] = check(by_b[r["B"]][1], want[r["B"]], "bfloat16", kernel=True)
                print(f"  host bank (GPU) B={r['B']:<3} D={d:<5} rel err {r['rel_err']:.1e}"
                      + ("" if r["check_ok"] else " WRONG"), flush=True)


def _gpu_rows(dev: torch.device, n: int, d: int):
    """The GPU host bank's rows, block by block, as they are added (and made again to check)."""
    gen = torch.Generator(device=dev).manual_seed(d)
    step = max(1, 256 * MIB // (d * 2))
    for a in range(0, n, step):
        yield torch.randn(min(step, n - a), d, device=dev, generator=gen, dtype=torch.bfloat16)


def _float64_reference(blocks, queries: Dict[int, torch.Tensor], beta: float) -> Dict[int, torch.Tensor]:
    """The float64 reference's output for each query batch over a bank too large to hold whole in float64:
    block by block, the partials merged (ops.merge_partials, checked on its own by hen check's chunked merge)."""
    parts: Dict[int, list] = {b: [] for b in queries}
    for x in blocks:
        for b, q in queries.items():
            parts[b].append(reference.partial(q.double(), x.double(), beta))
    return {b: ops.merge_partials(p).finalize() for b, p in parts.items()}


# --- disk bank on the CPU, under an address-space limit ----------------------------------

def _disk_child(args: argparse.Namespace) -> dict:
    """Runs in a child process: build the bank file, set RLIMIT_AS, stream it, report."""
    d, limit = args.dim, args.limit_mib * MIB
    n = args.bank_mib * MIB // (d * 4)
    path = os.path.join(args.dir, "disk-bank.hkb")
    t0 = time.perf_counter()
    build = MemoryBank(d, storage="disk", path=path)
    step = max(1, 16 * MIB // (d * 4))
    g = torch.Generator().manual_seed(0)
    for block in _disk_rows(g, n, d, step):
        build.add(block)
    build.close()
    build_s = time.perf_counter() - t0
    chunk_rows = max(1, limit // 8 // (d * 4))  # a window well inside the limit
    bank = MemoryBank.load(path, storage="disk", chunk_rows=chunk_rows, verify=False)
    queries = {b: torch.randn(b, d, generator=g) for b in (1, 8)}
    for q in queries.values():  # spin up the thread pool, its malloc arenas and every code path
        bank.update(q, 1.0)
    base_vm = proc_kib("VmSize") * 1024
    base_rss = proc_kib("VmRSS") * 1024
    resource.setrlimit(resource.RLIMIT_AS, (base_vm + limit, resource.RLIM_INFINITY))
    try:
        torch.empty(bank.nbytes, dtype=torch.uint8)
        whole_refused = False
    except (RuntimeError, MemoryError):
        whole_refused = True  # the limit is real: the bank cannot be held in memory
    rows = []
    fd = os.open(path, os.O_RDONLY)
    # The disk's own ceiling: a cold sequential read of the file into one reused buffer.
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    buf = bytearray(8 * MIB)
    t = time.perf_counter()
    while os.readv(fd, [buf]) > 0:
        pass
    read_gbps = os.path.getsize(path) / (time.perf_counter() - t) / 1e9
    del buf
    outs = []
    try:
        for state in ("cold", "warm"):
            for b, q in queries.items():
                if state == "cold":
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                common.reset_peak()
                t = time.perf_counter()
                out = bank.update(q, 1.0 / math.sqrt(d))
                sec = time.perf_counter() - t
                outs.append(out)
                peak = proc_kib("VmHWM") * 1024
                rows.append(dict(regime="disk bank (CPU)", storage="disk", cache=state, dtype="float32", B=b, N=n,
                                 D=d, bank_mib=bank.nbytes / MIB, limit_mib=limit / MIB, chunk_rows=chunk_rows,
                                 ms=sec * 1e3, gbps=bank.nbytes / sec / 1e9, rows_per_s=n / sec,
                                 peak_rss_mib=peak / MIB, extra_peak_rss_mib=(peak - base_rss) / MIB,
                                 base_rss_mib=base_rss / MIB, whole_bank_alloc_refused=whole_refused,
                                 cold_read_gbps=read_gbps,
                                 met=peak - base_rss < limit))
    finally:
        os.close(fd)
    # The check, with the limit lifted: the rows made again from the seed (not read back through the bank's
    # own code), the reference in float64 block by block, merged.
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    want = _float64_reference(_disk_rows(torch.Generator().manual_seed(0), n, d, step), queries, 1.0 / math.sqrt(d))
    for r, out in zip(rows, outs):
        r["rel_err"], r["check_ok"] = check(out, want[r["B"]], "float32", kernel=True)
    return {"rows": rows, "build_s": build_s}


def _disk_rows(g: torch.Generator, n: int, d: int, step: int):
    """The disk bank's rows, block by block, as the child writes them (and makes them again to check)."""
    for a in range(0, n, step):
        yield torch.randn(min(step, n - a), d, generator=g)


def disk_bank_cpu(quick: bool, limit_mib: Optional[int] = None, dim: int = 512) -> List[dict]:
    limit_mib = limit_mib or (64 if quick else 512)
    with tempfile.TemporaryDirectory(prefix="hen-bank-bench-", dir=os.environ.get("HEN_BENCH_TMP")) as tmp:
        cmd = [sys.executable, "-m", "hen_kernels.bench", "bank", "--disk-child", "--dir", tmp,
               "--limit-mib", str(limit_mib), "--bank-mib", str(4 * limit_mib), "--dim", str(dim)]
        # Few malloc arenas: each thread's arena reserves 64 MiB of address space, which RLIMIT_AS counts.
        env = dict(os.environ, MALLOC_ARENA_MAX="2")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"the disk-bank child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    for r in result["rows"]:
        print(f"  disk bank (CPU) {r['cache']:<4} B={r['B']:<2} {r['bank_mib']:7.0f} MiB under a "
              f"{r['limit_mib']:.0f} MiB limit: {r['ms']:9.1f} ms  {r['rows_per_s'] / 1e6:6.2f} M rows/s  "
              f"{r['gbps']:5.2f} GB/s (cold file read {r['cold_read_gbps']:.2f} GB/s)  "
              f"peak RSS +{r['extra_peak_rss_mib']:.0f} MiB", flush=True)
    return result["rows"]


# --- host bank on the CPU: the cost of streaming ---------------------------------------

def host_bank_cpu(quick: bool, repeats: int) -> List[dict]:
    n, d = (16384 if quick else 262144), 512
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(1))
    # 64 MiB chunks, as a disk bank's windows (a host bank on a CPU device is one call by default)
    bank = MemoryBank(d, storage="host", chunk_rows=CHUNK_BYTES["cpu"] // (d * 4))
    bank.add(x)
    rows = []
    for b in (1, 8):
        q = torch.randn(b, d, generator=torch.Generator().manual_seed(b))
        beta = 1.0 / math.sqrt(d)
        # Interleaved, each call after an untimed one of its own: the ratio is the cost of
        # streaming, not of a drift in machine load between two blocks of calls (two runs on one
        # VM, one block after the other, read 0.59x and 0.79x at B = 1).
        measured = common.time_calls({"streamed": lambda: bank.update(q, beta),
                                      "one call": lambda: ops.hopfield_update(q, x, beta)}, repeats, rewarm=True)
        t_bank, t_one = (statistics.median(measured[k][0]) for k in ("streamed", "one call"))
        err, ok = check(bank.update(q, beta), float64_update(q, x, beta, "dot"), "float32", kernel=True)
        rows.append(dict(regime="host bank (CPU)", storage="host", dtype="float32", B=b, N=n, D=d,
                         chunk_rows=bank.chunk_rows, ms=t_bank * 1e3, one_call_ms=t_one * 1e3,
                         gbps=bank.nbytes / t_bank / 1e9, rows_per_s=n / t_bank, ratio=t_one / t_bank,
                         rel_err=err, check_ok=ok))
        print(f"  host bank (CPU) B={b:<2} N={n} D={d}: streamed {t_bank * 1e3:8.2f} ms, one call "
              f"{t_one * 1e3:8.2f} ms ({t_one / t_bank:4.2f}x), rel err {err:.1e}", flush=True)
    return rows


# --- the report ----------------------------------------------------------------------

GPU_COLUMNS = [  # (header, row -> cell)
    ("B", lambda r: str(r["B"])),
    ("N", lambda r: str(r["N"])),
    ("D", lambda r: str(r["D"])),
    ("bank GiB", lambda r: f"{r['bank_gib']:.2f}"),
    ("GPU allowed GiB", lambda r: f"{r['gpu_allowed_gib']:.2f}"),
    ("chunk rows", lambda r: str(r["chunk_rows"])),
    ("ms", lambda r: f"{r['ms']:.2f}"),
    ("GB/s", lambda r: f"{r['gbps']:.2f}"),
    ("pinned H2D GB/s", lambda r: f"{r['ceiling_gbps']:.2f}"),
    ("ratio", lambda r: f"{r['ratio']:.1%}"),
    ("target", lambda r: f">= {r['target']:.0%}"),
    ("met", lambda r: "yes" if r["met"] else "NO"),
    ("rel err", lambda r: _err_cell(r)),
]
DISK_COLUMNS = [
    ("cache", lambda r: r["cache"]),
    ("B", lambda r: str(r["B"])),
    ("N", lambda r: str(r["N"])),
    ("D", lambda r: str(r["D"])),
    ("bank MiB", lambda r: f"{r['bank_mib']:.0f}"),
    ("limit MiB", lambda r: f"{r['limit_mib']:.0f}"),
    ("chunk rows", lambda r: str(r["chunk_rows"])),
    ("ms", lambda r: f"{r['ms']:.1f}"),
    ("M rows/s", lambda r: f"{r['rows_per_s'] / 1e6:.2f}"),
    ("GB/s", lambda r: f"{r['gbps']:.2f}"),
    ("cold file read GB/s", lambda r: f"{r['cold_read_gbps']:.2f}"),
    ("peak RSS MiB", lambda r: f"{r['peak_rss_mib']:.0f}"),
    ("extra peak RSS MiB", lambda r: f"{r['extra_peak_rss_mib']:.0f}"),
    ("whole bank refused", lambda r: "yes" if r["whole_bank_alloc_refused"] else "no"),
    ("rel err", lambda r: _err_cell(r)),
    ("under limit", lambda r: "yes" if r["met"] else "NO"),
]
CPU_COLUMNS = [
    ("B", lambda r: str(r["B"])),
    ("N", lambda r: str(r["N"])),
    ("D", lambda r: str(r["D"])),
    ("chunk rows", lambda r: str(r["chunk_rows"])),
    ("streamed ms", lambda r: f"{r['ms']:.2f}"),
    ("one call ms", lambda r: f"{r['one_call_ms']:.2f}"),
    ("one call / streamed", lambda r: f"{r['ratio']:.2f}x"),
    ("GB/s", lambda r: f"{r['gbps']:.2f}"),
    ("rel err", lambda r: _err_cell(r)),
]


def _err_cell(r: dict) -> str:
    if "check_ok" not in r:  # a GPU row of a report from before its check
        return "not checked"
    return f"{r['rel_err']:.1e}" + ("" if r["check_ok"] else " (WRONG)")


def wrong_rows(report: dict) -> List[str]:
    """The rows whose streamed output failed its check against float64."""
    return [f"{part}: B={r['B']}" + (f" D={r['D']}" if part == "host_bank_gpu" else "")
            + (f" {r['cache']}" if "cache" in r else "")
            for part in ("host_bank_gpu", "disk_bank_cpu", "host_bank_cpu") for r in report[part]["rows"]
            if not r.get("check_ok", True)]


def _section(title: str, part: dict, columns) -> List[str]:
    """One regime's heading and table, or why it was skipped."""
    lines = ["", "## " + title, ""]
    if part.get("skipped"):
        return lines + [f"SKIPPED: {part['skipped']}"]
    return lines + common.table([h for h, _ in columns], [[cell(r) for _, cell in columns] for r in part["rows"]])


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# hen_kernels bank benchmark (docs/design.md §6 host bank; issue 5 disk bank)",
        "",
        f"- machine: {m['cpu']} ({m['isa']}), {m['logical_cpus']} logical CPUs, torch {m['torch']} with "
        f"{m['torch_threads']} threads, GPU: {m['gpu'] or 'none'}; load average {m['load_average']} at the start"
        + (" (--quick: small sizes)" if report["quick"] else ""),
        "- GB/s = bank bytes / time (the bank read once); rows/s = N / time; median of "
        f"{report['repeats']} calls after a warm-up (the disk rows: one call each, cold then warm page cache)",
    ]
    gpu = report["host_bank_gpu"]
    lines += _section("host bank (GPU): bank in pinned host memory, 4x what the GPU may hold for the test",
                      gpu, GPU_COLUMNS)
    if not gpu.get("skipped"):
        lines += ["", "rel err: the output of one more call against the float64 reference over the same rows, "
                      "made again from their seed on the GPU after the cap is lifted (WRONG past "
                      f"{KERNEL_TOL['bfloat16']:g})."]
    disk = report["disk_bank_cpu"]
    lines += _section("disk bank (CPU): a bank file 4x larger than an address-space limit (RLIMIT_AS)",
                      disk, DISK_COLUMNS)
    if not disk.get("skipped"):
        lines += ["", "Cold: the file's page cache dropped with posix_fadvise(DONTNEED) before the call; cold file "
                      "read: a plain sequential read of the file after the same drop (the disk's ceiling); whole "
                      "bank refused: allocating the bank's size fails under the limit; peak RSS counts the mapped "
                      "file pages of the windows; rel err: the output against the float64 reference over the same "
                      "rows, made again from their seed (WRONG past " + f"{KERNEL_TOL['float32']:g})."]
    lines += _section("host bank (CPU): streamed chunks against one call over the whole tensor",
                      report["host_bank_cpu"], CPU_COLUMNS)
    lines += ["", "Streamed and one call take turns, each timed call right after an untimed call of the same "
                  "function; one call / streamed above 1: streaming the bank in chunks was faster; rel err: the "
                  f"streamed output against the float64 reference (WRONG past {KERNEL_TOL['float32']:g})."]
    wrong = wrong_rows(report)
    if wrong:
        lines += ["", f"**WRONG OUTPUT** in {len(wrong)} row(s): " + "; ".join(wrong) + "."]
    return "\n".join(lines) + "\n"


def machine() -> dict:
    return dict(common.host(), gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)


def run(out_dir: str = DEFAULT_OUT, quick: bool = False, repeats: int = 5,
        disk_limit_mib: Optional[int] = None, host_bank_gib: Optional[float] = None) -> dict:
    """Run every regime, print the table, write bank.json and bank.md under ``out_dir``."""
    info = machine()
    print(f"hen_kernels bank bench: {info['cpu']}, torch {info['torch']}, GPU {info['gpu'] or 'none'}", flush=True)
    report: Dict[str, object] = {"machine": info, "quick": quick, "repeats": repeats}
    try:
        report["host_bank_gpu"] = {"rows": host_bank_gpu(quick, repeats, host_bank_gib)}
    except RuntimeError as e:
        if torch.cuda.is_available():
            raise
        print(f"  host bank (GPU): skipped: {e}", flush=True)
        report["host_bank_gpu"] = {"skipped": str(e), "rows": []}
    report["disk_bank_cpu"] = {"rows": disk_bank_cpu(quick, disk_limit_mib)}
    report["host_bank_cpu"] = {"rows": host_bank_cpu(quick, repeats)}
    md = markdown(report)
    js, mdp = common.write_report(out_dir, "bank", report, md)
    print("\n" + md + f"\nwrote {js} and {mdp}")
    return report


def main(argv: Optional[List[str]] = None) -> int:
    p = common.parser("bank", __doc__, "bank.json and bank.md", "small sizes: seconds, for tests",
                      5, "timed calls per measurement after a warm-up")
    p.add_argument("--limit-mib", type=int, default=None,
                   help="disk bank: address-space limit in MiB; the bank is 4x this (default 512, quick 64)")
    p.add_argument("--host-bank-gib", type=float, default=None, help="GPU host bank size in GiB (default 16, quick 1)")
    p.add_argument("--disk-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--bank-mib", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dim", type=int, default=512, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.limit_mib is not None and a.limit_mib < 16:
        p.error("--limit-mib: expected at least 16")
    if a.disk_child:
        print(json.dumps(_disk_child(a)))
        return 0
    wrong = wrong_rows(run(a.out, a.quick, a.repeats, a.limit_mib, a.host_bank_gib))
    if wrong:
        print("bench bank: the streamed output failed its check in " + "; ".join(wrong), file=sys.stderr)
    return 1 if wrong else 0
