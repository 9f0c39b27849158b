"""What every benchmark program shares: the results folder, the machine it ran on,
timing, resident memory from /proc, number formatting, Markdown tables and the
report files.  Each program (cpu, bank, nn, gpu) keeps only its own cases.
"""
from __future__ import annotations

import argparse
import ctypes
import gzip
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ..constants import GRAD_TOLERANCE, TOLERANCE

DEFAULT_OUT = os.path.join("benchmarks", "results")
MIB = 2 ** 20
GIB = 2 ** 30
# A bench output (the kernel's, and each peer's before it is timed) must agree with float64 from the
# same rounded inputs this well, relative (Frobenius), by the inputs' dtype: a check for wrong answers
# and unfair peers; the kernels' stated accuracy (constants.TOLERANCE) is what the tests hold them to.
CHECK_TOL = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
# The kernel's own answers (not a whole module's, bench nn) are held to its stated accuracy, as the tests hold it:
# a kernel 10x worse than it says passed CHECK_TOL, which is a peer's check that it answers the same question.
KERNEL_TOL = {name: TOLERANCE[getattr(torch, name)] for name in CHECK_TOL}
# ... its gradients to theirs (bfloat16's stated 8e-2 is looser than CHECK_TOL: the tighter of the two)
KERNEL_GRAD_TOL = {name: min(GRAD_TOLERANCE[getattr(torch, name)], tol) for name, tol in CHECK_TOL.items()}

# The CPU flags that decide which kernels a CPU can run fast (docs/design.md §6: the
# header names the ISA, since the CPU machines differ from session to session).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "asimd", "sve")


# Process-wide settings that change what a large CPU allocation costs.  glibc hands a block
# above its mmap threshold (32 MiB at most) back to the OS when it is freed, so the next call
# that allocates one pays first-touch page faults again: with the mmap and trim thresholds raised,
# HopfieldPooling ran 2-3x faster, the fused layer and its dense peer alike (docs/nn.md); jemalloc
# (LD_PRELOAD) only with MALLOC_CONF keeping its freed pages.
ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX", "MALLOC_CONF",
                 "THP_MEM_ALLOC_ENABLE", "LD_PRELOAD")

# What an AVX2-only CPU would run, on an AVX-512 machine: oneDNN, MKL, ATen's own kernels,
# FAISS and the CPU kernel each capped at AVX2 (HEN_BENCH_EMULATED marks the child process).
EMULATED_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                "FAISS_OPT_LEVEL": "avx2", "HEN_KERNELS_CPU_ISA": "avx2", "HEN_BENCH_EMULATED": "avx2"}


def emulated() -> Optional[str]:
    """The AVX2 emulation settings when this process runs under them (for the report header), else None."""
    if not os.environ.get("HEN_BENCH_EMULATED"):
        return None
    return ", ".join(f"{k}={v}" for k, v in EMULATED_ENV.items() if k != "HEN_BENCH_EMULATED")


def rerun_emulated(program: str, argv: Optional[Sequence[str]]) -> int:
    """Run ``python -m hen_kernels.bench program`` with the options ``argv`` (sys.argv when None) less
    --emulate-avx2, in a child process that sees an AVX2-only CPU; its exit status."""
    argv = [x for x in (sys.argv[1:] if argv is None else argv) if x not in ("--emulate-avx2", program)]
    # Inductor's cache keys miss ATEN_CPU_CAPABILITY: kernels compiled for one instruction set
    # were found by the other, giving wrong answers and crashes.  The child gets a cache of its own.
    with tempfile.TemporaryDirectory(prefix="torchinductor_avx2_") as cache:
        env = dict(os.environ, **EMULATED_ENV, TORCHINDUCTOR_CACHE_DIR=cache)
        return subprocess.call([sys.executable, "-m", "hen_kernels.bench", program, *argv], env=env)


def add_emulate_avx2(p: argparse.ArgumentParser, writes: str) -> None:
    p.add_argument("--emulate-avx2", action="store_true",
                   help=f"run in a child process that sees an AVX2-only CPU (EMULATED_ENV); writes {writes}")


# --- the machine ---------------------------------------------------------------------

def _cpuinfo(key: str) -> Optional[str]:
    """The first value of ``key`` in /proc/cpuinfo (Linux), else None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == key:
                    return line.split(":", 1)[1].strip()
    except (OSError, IndexError):
        pass
    return None


def cpu_model() -> str:
    """The CPU's name, with its x86 family and model where /proc/cpuinfo gives them.

    The name alone can hide a generation: these VMs' "AMD EPYC" has been a Zen 4
    and a Zen 5 (family 26), whose AVX-512 units differ in width.
    """
    name = _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown"
    family, model = _cpuinfo("cpu family"), _cpuinfo("model")
    return f"{name} (family {family}, model {model})" if family and model else name


def isa() -> str:
    """The notable vector and matrix extensions this CPU reports, e.g. "avx2 fma avx512f"."""
    flags = set((_cpuinfo("flags") or _cpuinfo("Features") or "").split())
    return " ".join(f for f in ISA_FLAGS if f in flags) or "unknown"


def load_average() -> Optional[List[float]]:
    """1, 5 and 15 minute load averages: other work on the machine skews every timing."""
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def allocator() -> str:
    """The allocator settings of ALLOCATOR_ENV this process runs with ("defaults" when none is set)."""
    set_here = [f"{k}={os.environ[k]}" for k in ALLOCATOR_ENV if os.environ.get(k)]
    return ", ".join(set_here) if set_here else "defaults"


def host() -> dict:
    """The machine description every report starts from; each program adds its own fields."""
    return {
        "cpu": cpu_model(),
        "isa": isa(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "python": platform.python_version(),
        "load_average": load_average(),
        "allocator": allocator(),
    }


# --- resident memory from /proc/self (Linux); None where unavailable -----------------

def proc_kib(field: str) -> Optional[int]:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM, VmSize)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak() -> bool:
    """Reset VmHWM to the current VmRSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Hand free heap pages back (glibc) so that a reused buffer shows up in VmHWM again."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_measured() -> bool:
    """Whether :func:`time_calls` can report peak memory on the CPU here."""
    return proc_kib("VmRSS") is not None and reset_peak()


# --- timing --------------------------------------------------------------------------

def median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time of ``repeats`` calls after one warm-up; ``sync`` waits for a device."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


Measured = Dict[str, Tuple[List[float], Optional[int]]]


def time_calls(fns: Dict[str, Callable[[], object]], repeats: int, device: Optional[torch.device] = None,
               warm_up: bool = True, rewarm: bool = False, min_s: float = 0.0,
               max_repeats: Optional[int] = None) -> Measured:
    """Per name: (seconds per timed call, peak extra bytes or None).

    Extra bytes are the peak above the level before the call: on the CPU the
    resident set (VmHWM reset, VmRSS before, VmHWM after, all outside the
    timer); on a CUDA device the allocator's peak.  ``warm_up=False`` when the
    caller has just called each function (a check of its answer, say).
    ``rewarm``: every timed CPU call comes right after an untimed call of the same
    function, so each finds the caches and thread pools as it leaves them, not as
    the previous function did (a peer streaming half a GiB evicts a layer-sized
    bank that the call after it then reads from memory, and the call after that
    one finds it cached).  ``min_s``: on the CPU, rounds go on past ``repeats``
    until they have taken that many seconds, up to ``max_repeats`` rounds (the
    clock, not an estimate from first calls, which run cold and slow).
    """
    if device is not None and device.type == "cuda":
        return _time_calls_cuda(fns, repeats)
    # Calls take turns, so that a change in machine load hits all of them alike; the
    # heap is trimmed after the warm-ups so that buffers they freed count again.
    if warm_up:
        for fn in fns.values():
            fn()
    trim_heap()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    extra: Dict[str, List[int]] = {k: [] for k in fns}
    most = max(repeats, max_repeats or repeats)
    start, rounds = time.perf_counter(), 0
    while rounds < repeats or (rounds < most and time.perf_counter() - start < min_s):
        rounds += 1
        for k, fn in fns.items():
            if rewarm:
                fn()  # its result is dropped at once
            ok = reset_peak()
            before = proc_kib("VmRSS")
            t0 = time.perf_counter()
            out = fn()
            times[k].append(time.perf_counter() - t0)
            peak = proc_kib("VmHWM")
            del out
            if ok and before is not None and peak is not None:
                extra[k].append(max(peak - before, 0) * 1024)
    return {k: (times[k], max(extra[k]) if extra[k] else None) for k in fns}


def _time_calls_cuda(fns: Dict[str, Callable[[], object]], repeats: int) -> Measured:
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


# --- text ----------------------------------------------------------------------------

def num(v: Optional[float], fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def ratio(v: Optional[float], fmt: str = ".2f") -> str:
    return "n/a" if v is None else format(v, fmt) + "x"


def verdict(oks) -> Optional[bool]:
    """A row's verdict from its targets' (True: met, False: missed, None: unverified, e.g. the peer's
    answer failed its check): any miss is a miss, then any unverified target leaves the row unverified."""
    oks = list(oks)
    return False if False in oks else (None if None in oks else True)


def met_cell(m: Optional[bool]) -> str:
    return "yes" if m is True else ("NO" if m is False else "unverified")


def short_error(e: BaseException) -> str:
    """An exception on one line, at most 400 characters: fit for a table cell or a log."""
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}"[:400]


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], align: Optional[Sequence[str]] = None) -> List[str]:
    """The lines of a Markdown table; ``align`` holds one separator cell per column ("---", "---:")."""
    # A "|" inside a cell (an error message, say) would split its row.
    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"

    return [line(headers), "|" + "|".join(align or ["---"] * len(headers)) + "|"] + [line(r) for r in rows]


# --- the command line ----------------------------------------------------------------

def _at_least_one(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return v


def parser(program: str, doc: str, writes: str, quick: str, repeats: int, repeats_help: str) -> argparse.ArgumentParser:
    """The options every program takes: --out (where ``writes`` go), --quick, --repeats."""
    p = argparse.ArgumentParser(prog=f"python -m hen_kernels.bench {program}", description=doc.split("\n")[0])
    p.add_argument("--out", default=DEFAULT_OUT, help=f"directory for {writes} (default {DEFAULT_OUT})")
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--repeats", type=_at_least_one, default=repeats, help=f"{repeats_help} (default {repeats})")
    return p


def cpu_table_head(title: str, machine: dict, kernel: str) -> List[str]:
    """A CPU table's first lines: its title (marked when its AVX2 run was emulated), the machine, the kernel."""
    emulated_env = machine.get("emulated")
    return [title + (" — AVX2 EMULATED" if emulated_env else ""), "",
            f"- machine: {machine['cpu']} ({machine['isa']}), torch {machine['torch']} with "
            f"{machine['torch_threads']} threads"
            + (f"; EMULATED AVX2-only CPU: {emulated_env}" if emulated_env else ""),
            f"- kernel: {kernel}"]


def run_cpu_table(program: str, doc: str, quick: str, repeats: int, repeats_help: str,
                  measure: Callable[[bool, int], dict], markdown: Callable[[dict], str],
                  argv: Optional[Sequence[str]]) -> int:
    """main() of a CPU program with --out, --quick, --repeats, --emulate-avx2 and --name: measure,
    write PROGRAM.{json,md} (PROGRAM_avx2.* when emulated, STEM.* with --name), print the table."""
    p = parser(program, doc, f"{program}.json and {program}.md", quick, repeats, repeats_help)
    add_emulate_avx2(p, f"{program}_avx2.{{json,md}}")
    p.add_argument("--name", metavar="STEM", help="write STEM.json and STEM.md")
    a = p.parse_args(argv)
    if a.emulate_avx2 and not emulated():
        return rerun_emulated(program, argv)
    report = measure(a.quick, a.repeats)
    md = markdown(report)
    js, mdp = write_report(a.out, a.name or (f"{program}_avx2" if emulated() else program), report, md)
    print("\n" + md + f"\nwrote {js} and {mdp}")
    return 0


# --- the report files ----------------------------------------------------------------

def _finite(v):
    """JSON without NaN or infinities (json.dumps would write invalid JSON)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def write_report(out: str, name: str, report: dict, md: str, gzipped: bool = False) -> Tuple[Path, Path]:
    """Write ``name``.json (``name``.json.gz, compact, when ``gzipped``) and ``name``.md under ``out``; their
    paths."""
    os.makedirs(out, exist_ok=True)
    js, mdp = Path(out, name + (".json.gz" if gzipped else ".json")), Path(out, name + ".md")
    if gzipped:
        with gzip.open(js, "wt") as f:
            json.dump(_finite(report), f, separators=(",", ":"))
    else:
        js.write_text(json.dumps(_finite(report), indent=2) + "\n")
    mdp.write_text(md)
    return js, mdp
