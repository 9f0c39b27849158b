"""The GPU table beside the machine-code report: for every timed Triton call, the kernel the plan chose,
compiled for this GPU's architecture with the config the autotuner picked (hen_kernels.bench.static's
tools), its static row (registers, spills, shared memory, occupancy, tensor-core instructions, global
bytes per bank tile) next to the measured time and the roofline floor from the ceilings measured in the
same run.  So a static prediction and a measurement sit in one row of gpu.md.

``rows_for`` compiles (a second or two each, no kernel runs); ``join`` and ``markdown`` are pure and
tests drive them with a synthetic report.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

from .common import num, table
from .gpu_cases import GpuCase

CONFIG_KEYS = ("BN", "BK", "BDV")


def timed_kernels(report: dict) -> List[dict]:
    """One entry per case whose Triton time was measured with a known plan and autotuned config."""
    out = []
    for r in report["cases"]:
        m = r["measurements"].get("triton")
        plan, cfg = r.get("triton_plan"), (m or {}).get("autotuned")
        if not m or m.get("status") != "ok" or not plan or not isinstance(cfg, dict):
            continue
        case = GpuCase(r["regime"], r["similarity"], r["B"], r["N"], r["D"], r.get("steps", 1))
        out.append(dict(case=case.name, regime=case.regime, sim=case.similarity, B=case.B, N=case.N, D=case.D,
                        ms=m["ms"], flops=case.flops, bytes=case.bytes, kernel=plan["kernel"], BM=plan["BM"],
                        SPLITS=plan["splits"], config=cfg))
    return out


def entry_key(e: dict) -> tuple:
    """What identifies a compiled kernel: kernel, query block, splits, similarity, width, config."""
    c = e["config"]
    return (e["kernel"], e["BM"], e["SPLITS"], e["sim"], e["D"], tuple(sorted(c["kwargs"].items())),
            c["num_warps"], c["num_stages"])


def row_key(r: dict) -> tuple:
    config = tuple(sorted((k, r[k]) for k in CONFIG_KEYS if k in r))
    return (r["kernel"], r["BM"], r["SPLITS"], r["sim"], r["D"], config, r["num_warps"], r["num_stages"])


def rows_for(report: dict, arch: int, log: Callable[[str], None] = print) -> List[dict]:
    """Compile each timed kernel for ``arch`` with its autotuned config (needs triton without its interpreter)."""
    from . import static_compile

    sms = report["machine"].get("sm_count")
    with static_compile.compiling():
        return [row for e in timed_kernels(report) for row in _compile_entry(e, arch, sms, log)]


def _compile_entry(e: dict, arch: int, sms: Optional[int], log: Callable[[str], None]) -> List[dict]:
    from . import static_cases, static_compile

    cfg = e["config"]
    cases = [c for c in static_cases.forward_cases(arch, "bf16", e["sim"], e["B"], e["N"], e["D"], e["D"], True, False,
                                                   e["regime"], with_pruned=True, sm_count=sms)
             if c.num_warps == cfg["num_warps"] and c.num_stages == cfg["num_stages"]
             and all(c.constexprs.get(k) == v for k, v in cfg["kwargs"].items())]
    if not cases:
        log(f"  static: no compiled case matches {e['case']} {cfg}")
        return []
    row = static_compile.compile_case(cases[0], arch)
    row.update(case=e["case"], sim=e["sim"], D=e["D"], SPLITS=e["SPLITS"])
    return [row]


def join(report: dict, rows: List[dict]) -> List[dict]:
    """Each timed kernel with its static row (None when none matches) and its roofline floor."""
    by_key = {row_key(r): r for r in rows}
    c = report.get("ceilings") or {}
    out = []
    for e in timed_kernels(report):
        floors = {}
        if c.get("read_gbps"):
            floors["HBM"] = e["bytes"] / (c["read_gbps"] * 1e9) * 1e3
        if c.get("matmul_tflops"):
            floors["tensor cores"] = e["flops"] / (c["matmul_tflops"] * 1e12) * 1e3
        bound = max(floors, key=floors.get) if floors else None
        out.append(dict(e, static=by_key.get(entry_key(e)), floor_ms=floors.get(bound), bound=bound))
    return out


def _cfg(e: dict) -> str:
    c = e["config"]
    return " ".join(f"{k}{v}" for k, v in c["kwargs"].items()) + f" w{c['num_warps']} s{c['num_stages']}"


def markdown(joined: List[dict], arch: Optional[int]) -> List[str]:
    if not joined:
        return []
    lines = ["", f"## Timed Triton kernels beside their machine code (sm_{arch}, the autotuned config "
             "compiled here; `python -m hen_kernels.bench static` has the rest)", ""]
    rows = []
    for e in joined:
        s: Optional[Dict] = e["static"]
        if s is None or "error" in s:
            static = ["n/a"] * 6 if s is None else [s["error"][:60]] + [""] * 5
        else:
            mma = " ".join(f"{k} {s['hot_loop'][k]}" for k in ("HGMMA", "HMMA") if s["hot_loop"].get(k)) or "none"
            static = [str(s["regs"]), str(s["spill_stores"]), f"{s['smem'] / 1024:.0f}",
                      f"{s['blocks_per_sm']} ({s['limiter'][:4]})", mma, f"{s['hot_loop_load_bytes'] / 1024:.1f}"]
        rows.append([e["case"], f"{e['kernel']} BM{e['BM']} S{e['SPLITS']}", _cfg(e)] + static
                    + [num(e["floor_ms"], ".3f") + (f" ({e['bound']})" if e["bound"] else ""), f"{e['ms']:.3f}",
                       num(None if not e["floor_ms"] else e["floor_ms"] / e["ms"], ".0%")])
    lines += table(["case", "kernel", "autotuned config", "regs", "spill B", "smem KiB", "blk/SM", "MMA (loop)",
                    "KiB/iter", "floor ms", "measured ms", "floor / measured"], rows)
    return lines
