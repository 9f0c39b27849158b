"""Bank benchmarks (DESIGN.md §6, issue 5): streamed MemoryBank updates, printed and written as bank.{md,json}.

    python -m hen_kernels.bench_bank [--out DIR] [--quick] [--repeats K]

Three regimes:

- ``host bank (GPU)``: the DESIGN.md §6 row.  A bf16 bank in pinned host memory,
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
- ``host bank (CPU)``: the same streaming over a bank in memory against one
  ``hk.hopfield_update`` over the whole tensor: the cost of chunking and merging.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from . import bank as bank_mod
from . import ops
from .bank import MemoryBank
from .bench import DEFAULT_OUT, _proc_kib, _reset_peak

MIB = 2 ** 20
GIB = 2 ** 30
HOST_TARGET = 0.80  # DESIGN.md §6: >= 80 % of measured pinned host-to-device bandwidth


# --- measurements ------------------------------------------------------------------

def _median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --- host bank on a GPU (DESIGN.md §6) ------------------------------------------------

def _empty_host_cache() -> None:
    """Free cached pinned host blocks (torch >= 2.9 names it torch._C._accelerator_emptyHostCache)."""
    fn = getattr(torch._C, "_accelerator_emptyHostCache", None) or getattr(torch._C, "_host_emptyCache", None)
    if fn is not None:
        fn()


def pinned_h2d_gbps(nbytes: int, repeats: int) -> float:
    """Measured pinned host-to-device copy bandwidth (GB/s), median over ``repeats`` copies."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    sec = _median_seconds(lambda: dst.copy_(src, non_blocking=True), repeats, torch.cuda.synchronize)
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
    rows: List[dict] = []
    bank = None
    try:
        for d in (1024,) if quick else (1024, 4096):
            n = bank_bytes // (d * 2)
            # two chunk buffers in flight: together at most half of what the GPU may hold
            chunk_rows = min(bank_mod.CHUNK_BYTES["cuda"], allowed // 4) // (d * 2)
            bank = None
            _empty_host_cache()  # hand the previous bank's pinned memory back first
            bank = MemoryBank(d, dtype=torch.bfloat16, device=dev, storage="host", chunk_rows=chunk_rows)
            bank._store.reserve(n)
            step = max(1, 256 * MIB // (d * 2))
            gen = torch.Generator(device=dev).manual_seed(d)
            for a in range(0, n, step):
                m = min(step, n - a)
                bank.add(torch.randn(m, d, device=dev, generator=gen, dtype=torch.bfloat16))
            for b in (1, 16, 64):
                q = torch.randn(b, d, device=dev, dtype=torch.bfloat16)
                beta = 1.0 / math.sqrt(d)
                sec = _median_seconds(lambda: bank.update(q, beta), repeats, torch.cuda.synchronize)
                gbps = bank.nbytes / sec / 1e9
                rows.append(dict(regime="host bank (GPU)", storage="host", dtype="bfloat16", B=b, N=n, D=d,
                                 bank_gib=bank.nbytes / GIB, gpu_allowed_gib=allowed / GIB,
                                 chunk_rows=bank.chunk_rows, ms=sec * 1e3, gbps=gbps, rows_per_s=n / sec,
                                 ceiling_gbps=h2d, ceiling="pinned H2D copy", ratio=gbps / h2d,
                                 target=HOST_TARGET, met=gbps / h2d >= HOST_TARGET))
                print(f"  host bank (GPU) B={b:<3} D={d:<5} {bank.nbytes / GIB:6.2f} GiB  {sec * 1e3:9.2f} ms  "
                      f"{gbps:7.2f} GB/s = {gbps / h2d:5.1%} of pinned H2D {h2d:.2f} GB/s", flush=True)
    finally:
        bank = None
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        torch.cuda.empty_cache()
    return rows


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
    for a in range(0, n, step):
        build.add(torch.randn(min(step, n - a), d, generator=g))
    build.close()
    build_s = time.perf_counter() - t0
    chunk_rows = max(1, limit // 8 // (d * 4))  # a window well inside the limit
    bank = MemoryBank.load(path, storage="disk", chunk_rows=chunk_rows, verify=False)
    queries = {b: torch.randn(b, d, generator=g) for b in (1, 8)}
    for q in queries.values():  # spin up the thread pool, its malloc arenas and every code path
        bank.update(q, 1.0)
    base_vm = _proc_kib("VmSize") * 1024
    base_rss = _proc_kib("VmRSS") * 1024
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
    try:
        for state in ("cold", "warm"):
            for b, q in queries.items():
                if state == "cold":
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                _reset_peak()
                t = time.perf_counter()
                out = bank.update(q, 1.0 / math.sqrt(d))
                sec = time.perf_counter() - t
                assert torch.isfinite(out).all()
                peak = _proc_kib("VmHWM") * 1024
                rows.append(dict(regime="disk bank (CPU)", storage="disk", cache=state, dtype="float32", B=b, N=n,
                                 D=d, bank_mib=bank.nbytes / MIB, limit_mib=limit / MIB, chunk_rows=chunk_rows,
                                 ms=sec * 1e3, gbps=bank.nbytes / sec / 1e9, rows_per_s=n / sec,
                                 peak_rss_mib=peak / MIB, extra_peak_rss_mib=(peak - base_rss) / MIB,
                                 base_rss_mib=base_rss / MIB, whole_bank_alloc_refused=whole_refused,
                                 cold_read_gbps=read_gbps,
                                 met=peak - base_rss < limit))
    finally:
        os.close(fd)
    return {"rows": rows, "build_s": build_s}


def disk_bank_cpu(quick: bool, limit_mib: Optional[int] = None, dim: int = 512) -> List[dict]:
    limit_mib = limit_mib or (64 if quick else 512)
    with tempfile.TemporaryDirectory(prefix="hen-bank-bench-", dir=os.environ.get("HEN_BENCH_TMP")) as tmp:
        cmd = [sys.executable, "-m", "hen_kernels.bench_bank", "--disk-child", "--dir", tmp,
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
    bank = MemoryBank(d, storage="host")
    bank.add(x)
    rows = []
    for b in (1, 8):
        q = torch.randn(b, d, generator=torch.Generator().manual_seed(b))
        beta = 1.0 / math.sqrt(d)
        t_bank = _median_seconds(lambda: bank.update(q, beta), repeats)
        t_one = _median_seconds(lambda: ops.hopfield_update(q, x, beta), repeats)
        err = float((bank.update(q, beta) - ops.hopfield_update(q, x, beta)).norm()
                    / ops.hopfield_update(q, x, beta).norm())
        rows.append(dict(regime="host bank (CPU)", storage="host", dtype="float32", B=b, N=n, D=d,
                         chunk_rows=bank.chunk_rows, ms=t_bank * 1e3, one_call_ms=t_one * 1e3,
                         gbps=bank.nbytes / t_bank / 1e9, rows_per_s=n / t_bank, ratio=t_one / t_bank,
                         rel_err=err))
        print(f"  host bank (CPU) B={b:<2} N={n} D={d}: streamed {t_bank * 1e3:8.2f} ms, one call "
              f"{t_one * 1e3:8.2f} ms ({t_one / t_bank:4.2f}x), rel err {err:.1e}", flush=True)
    return rows


# --- the report ----------------------------------------------------------------------

def _f(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# hen_kernels bank benchmark (DESIGN.md §6 host bank; issue 5 disk bank)",
        "",
        f"- machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} with {m['torch_threads']} "
        f"threads, GPU: {m['gpu'] or 'none'}; load average {m['load_average']} at the start"
        + (" (--quick: small sizes)" if report["quick"] else ""),
        "- GB/s = bank bytes / time (the bank read once); rows/s = N / time; median of "
        f"{report['repeats']} calls after a warm-up (the disk rows: one call each, cold then warm page cache)",
        "",
        "## host bank (GPU): bank in pinned host memory, 4x what the GPU may hold for the test",
        "",
    ]
    gpu = report["host_bank_gpu"]
    if gpu.get("skipped"):
        lines.append(f"SKIPPED: {gpu['skipped']}")
    else:
        lines += ["| B | N | D | bank GiB | GPU allowed GiB | chunk rows | ms | GB/s | pinned H2D GB/s | ratio "
                  "| target | met |", "|" + "---|" * 12]
        lines += [f"| {r['B']} | {r['N']} | {r['D']} | {r['bank_gib']:.2f} | {r['gpu_allowed_gib']:.2f} | "
                  f"{r['chunk_rows']} | {r['ms']:.2f} | {r['gbps']:.2f} | {r['ceiling_gbps']:.2f} | "
                  f"{r['ratio']:.1%} | >= {r['target']:.0%} | {'yes' if r['met'] else 'NO'} |" for r in gpu["rows"]]
    lines += ["", "## disk bank (CPU): a bank file 4x larger than an address-space limit (RLIMIT_AS)", ""]
    disk = report["disk_bank_cpu"]
    if disk.get("skipped"):
        lines.append(f"SKIPPED: {disk['skipped']}")
    else:
        lines += ["| cache | B | N | D | bank MiB | limit MiB | chunk rows | ms | M rows/s | GB/s | cold file read "
                  "GB/s | peak RSS MiB | extra peak RSS MiB | whole bank refused | under limit |", "|" + "---|" * 15]
        lines += [f"| {r['cache']} | {r['B']} | {r['N']} | {r['D']} | {r['bank_mib']:.0f} | {r['limit_mib']:.0f} | "
                  f"{r['chunk_rows']} | {r['ms']:.1f} | {r['rows_per_s'] / 1e6:.2f} | {r['gbps']:.2f} | "
                  f"{r['cold_read_gbps']:.2f} | "
                  f"{r['peak_rss_mib']:.0f} | {r['extra_peak_rss_mib']:.0f} | "
                  f"{'yes' if r['whole_bank_alloc_refused'] else 'no'} | {'yes' if r['met'] else 'NO'} |"
                  for r in disk["rows"]]
        lines += ["", "Cold: the file's page cache dropped with posix_fadvise(DONTNEED) before the call; cold file "
                      "read: a plain sequential read of the file after the same drop (the disk's ceiling); whole "
                      "bank refused: allocating the bank's size fails under the limit; peak RSS counts the mapped "
                      "file pages of the windows."]
    lines += ["", "## host bank (CPU): streamed chunks against one call over the whole tensor", ""]
    cpu = report["host_bank_cpu"]
    lines += ["| B | N | D | chunk rows | streamed ms | one call ms | one call / streamed | GB/s | rel err |",
              "|" + "---|" * 9]
    lines += [f"| {r['B']} | {r['N']} | {r['D']} | {r['chunk_rows']} | {r['ms']:.2f} | {r['one_call_ms']:.2f} | "
              f"{r['ratio']:.2f}x | {r['gbps']:.2f} | {r['rel_err']:.1e} |" for r in cpu["rows"]]
    return "\n".join(lines) + "\n"


def machine() -> dict:
    from .bench import cpu_model, load_average

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "gpu": gpu,
            "load_average": load_average()}


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
    os.makedirs(out_dir, exist_ok=True)
    Path(out_dir, "bank.json").write_text(json.dumps(report, indent=2) + "\n")
    Path(out_dir, "bank.md").write_text(md)
    print("\n" + md + f"\nwrote {Path(out_dir, 'bank.json')} and {Path(out_dir, 'bank.md')}")
    return report


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hen_kernels.bench_bank", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=DEFAULT_OUT, help=f"directory for bank.json and bank.md (default {DEFAULT_OUT})")
    p.add_argument("--quick", action="store_true", help="small sizes: seconds, for tests")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement after a warm-up (default 5)")
    p.add_argument("--limit-mib", type=int, default=None,
                   help="disk bank: address-space limit in MiB; the bank is 4x this (default 512, quick 64)")
    p.add_argument("--host-bank-gib", type=float, default=None, help="GPU host bank size in GiB (default 16, quick 1)")
    p.add_argument("--disk-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--bank-mib", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dim", type=int, default=512, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error("--repeats: expected an integer >= 1")
    if a.limit_mib is not None and a.limit_mib < 16:
        p.error("--limit-mib: expected at least 16")
    if a.disk_child:
        print(json.dumps(_disk_child(a)))
        return 0
    run(a.out, a.quick, a.repeats, a.limit_mib, a.host_bank_gib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
