"""The machine-code report as Markdown: the checks, one table per Triton kernel, the pruned configs and
the CUDA C++ kernels (the rows themselves come from static_compile and static_cuda)."""
from __future__ import annotations

from typing import Dict, List

from .common import table
from .static_spill import costly_spill

CONFIG_KEYS = ("BN", "BK", "BDV", "BS", "BM")
SPILL_LEGEND = ("costly (bold; bench/static_spill.py): a frame left when ptxas may take all 255 registers, or spill "
                "code in the bank loop; '(ptxas)': bytes ptxas chose to spill outside that loop, holding the kernel "
                "to fewer registers for more resident blocks")


def _config(r: dict) -> str:
    kind = r["kernel"]
    keys = {"small_d": ("BN",), "tiled_d": ("BN", "BK", "BDV"), "combine": ("BS", "BDV"),
            "dq": ("BM", "BN"), "dkv": ("BM", "BN")}[kind]
    return " ".join(f"{k}{r[k]}" for k in keys if k in r) + f" w{r['num_warps']} s{r['num_stages']}"


def _mma(counts: Dict[str, int]) -> str:
    parts = [f"{k} {counts[k]}" for k in ("HGMMA", "HMMA") if counts.get(k)]
    if counts.get("MMA.TF32"):
        parts.append("(tf32)")
    return " ".join(parts) or "none"


def _mufu(counts: Dict[str, int]) -> str:
    return " ".join(f"{k[5:].lower()} {v}" for k, v in counts.items() if k.startswith("MUFU")) or "-"


def _bytes(n: int) -> str:
    return f"{n / 1024:.1f} K" if n >= 1024 else str(n)


def _acc_loop(r: dict) -> str:
    """tiled_d's accumulator traffic: the loop that both loads and stores global memory, per iteration."""
    loops = [x for x in r.get("loops_detail", []) if x.get("store_bytes")]
    if not loops:
        return "-"
    x = loops[0]
    return f"ld {_bytes(x['load_bytes'])} / st {_bytes(x['store_bytes'])}"


def _spill(r: dict) -> str:
    """Stack bytes: bold where they cost (static_spill), "(ptxas)" where ptxas traded them for occupancy."""
    if not r["spills"]:
        return "0"
    return f"**{r['stack']}**" if costly_spill(r) else f"{r['stack']} (ptxas)"


def _triton_table(rows: List[dict], kernel: str) -> List[str]:
    heads = ["sm", "regime", "dtype", "sim", "VAM", "W", "D", "BM", "S", "prec", "config", "regs", "spill B",
             "smem KiB", "blk/SM", "MMA (loop)", "MUFU (loop)", "loads B/iter", "async", "t s"]
    if kernel == "tiled_d":
        heads.insert(-1, "acc loop B/iter")
    out = []
    for r in rows:
        if "error" in r:
            out.append([str(r["arch"]), r.get("regime", ""), r.get("dtype", ""), r.get("sim", "-"),
                        "", "", str(r.get("D", "")), "", "", "", _config(r), "ERROR", r["error"][:120]]
                       + [""] * (len(heads) - 13))
            continue
        cells = [str(r["arch"]), r.get("regime", ""), r.get("dtype", ""), r.get("sim", "-"),
                 "y" if r.get("VAM") else ("n" if "VAM" in r else "-"), "y" if r.get("W") else "-",
                 str(r.get("D", "")), str(r.get("BM", "-")), str(r.get("SPLITS", "-")), r.get("PREC", "-"),
                 _config(r), str(r["regs"]),
                 _spill(r),
                 ("**%.1f**" if not r["smem_ok"] else "%.1f") % (r["smem"] / 1024),
                 f"{r['blocks_per_sm']} ({r['limiter'][:4]})", _mma(r["hot_loop"]), _mufu(r["hot_loop"]),
                 _bytes(r["hot_loop_load_bytes"]), "cp.async" if r["hot_loop"].get("LDGSTS") else "ldg"]
        if kernel == "tiled_d":
            cells.append(_acc_loop(r))
        cells.append(f"{r['compile_s']:.1f}")
        out.append(cells)
    return table(heads, out)


def _cuda_table(rows: List[dict]) -> List[str]:
    out = []
    for r in rows:
        occ = "; ".join(f"{k}: {v['blocks_per_sm']} blk ({v['limiter'][:4]})" + (f", {v['smem'] // 1024} KiB"
                                                                               if "smem" in v else "")
                        for k, v in (r.get("occupancy") or {}).items())
        out.append([str(r["arch"]), r["kernel"][:80], str(r["regs"]), str(r["stack"]), str(r["threads"]),
                    _mma(r["sass"]), _mufu(r["sass"]), str(r["sass"].get("LDGSTS", 0)), occ or "-"])
    return table(["sm", "kernel", "regs", "stack B", "threads", "MMA", "MUFU", "cp.async", "occupancy per SM"], out)


def summary(report: dict) -> str:
    lines = []
    for key, c in report["checks"].items():
        lines.append(f"  {'ok  ' if c['ok'] else 'FAIL'} {key}: {c['checked']} checked"
                     + (f", {len(c['failures'])} failed: " + "; ".join(c["failures"][:3]) if c["failures"] else ""))
    return "bench static checks:\n" + "\n".join(lines)


def markdown(report: dict) -> str:
    rows = report["rows"]
    kept = [r for r in rows if r.get("pruned") is None]
    pruned = [r for r in rows if r.get("pruned") is not None]
    lines = [
        "# Machine-code report: Triton and CUDA C++ kernels compiled for sm_80 and sm_90 (no GPU)",
        "",
        *_header(report, rows),
        f"- regs and spill: ptxas -v (spill: stack bytes; {SPILL_LEGEND}); smem: the kernel's shared memory "
        "(bold: over the per-block limit, "
        "227 KiB sm_90, 163 KiB sm_80); blk/SM: resident blocks per SM and what limits them (regs, smem, "
        "threads); MMA / MUFU (loop): tensor-core and special-function instructions in the hot loop (the "
        "innermost loop with tensor-core instructions, nested loops such as the ℓ2 recompute excluded); "
        "loads B/iter: global bytes one program requests per iteration of that loop (LDG/LDGSTS width x "
        "threads); async: cp.async (LDGSTS) or plain loads; acc loop (tiled_d): the accumulator's global "
        "load/store bytes per BDV slice; t s: compile seconds on this CPU",
        f"- CUDA C++: {report.get('cuda_so') or 'not read (no built extension)'}",
        "",
        "## Checks",
        "",
    ]
    lines += table(["check", "rule", "rows", "result"],
                   [[k, c["rule"], str(c["checked"]), "ok" if c["ok"] else "FAIL: " + "; ".join(c["failures"][:5])]
                    for k, c in report["checks"].items()])
    for kernel in ("small_d", "tiled_d", "combine", "dq", "dkv"):
        ks = [r for r in kept if r["kernel"] == kernel]
        if ks:
            lines += ["", f"## Triton `{kernel}` ({len(ks)} compiles)", ""]
            lines += _triton_table(ks, kernel)
    if pruned:
        lines += ["", f"## Configs kept from the autotuner ({len(pruned)}; hen_kernels/triton/configs.py)", ""]
        lines += table(["sm", "kernel", "shape", "config", "rule says", "compiled: stack B", "smem KiB"],
                       [[str(r["arch"]), r["kernel"], f"{r.get('dtype')} {r.get('sim', '')} D{r.get('D')} "
                         f"BM{r.get('BM', '-')} VAM {r.get('VAM', '-')} W {r.get('W', '-')}", _config(r),
                         r["pruned"], r.get("error") or _spill(r),
                         "%.1f" % (r["smem"] / 1024) if "smem" in r else "-"] for r in pruned])
    if report["cuda"]:
        lines += ["", "## CUDA C++ kernels of the built extension", ""]
        lines += _cuda_table(report["cuda"])
    return "\n".join(lines) + "\n"


def _header(report: dict, rows: List[dict]) -> List[str]:
    m = report["machine"]
    return [
        f"- command: `{report['command']}` ({report['subset']} set, {len(rows)} Triton compiles, "
        f"{report['elapsed_s']:.0f} s)",
        f"- triton {m['triton']}, {report.get('ptxas') or 'ptxas ?'}, torch {m['torch']}, Python {m['python']}; "
        f"compiled on {m['cpu']} ({m['isa']}), no GPU",
    ]


def summary_markdown(report: dict) -> str:
    """The full matrix in counts (its rows are in static.json.gz): per kernel and architecture, the configs
    compiled, kept for the autotuner, with a costly spill or too much shared memory among those kept, and
    with bytes ptxas spilled for occupancy; then every kept config that fails a check."""
    rows = report["rows"]
    out = []
    for kernel in ("small_d", "tiled_d", "combine", "dq", "dkv"):
        for arch in sorted({r["arch"] for r in rows}):
            rs = [r for r in rows if r["kernel"] == kernel and r["arch"] == arch]
            if not rs:
                continue
            ok = [r for r in rs if "error" not in r]
            kept = [r for r in ok if r.get("pruned") is None]
            pruned = [r for r in ok if r.get("pruned") is not None]
            out.append([kernel, str(arch), str(len(rs)), str(len(rs) - len(ok)), str(len(kept)),
                        str(sum(bool(costly_spill(r)) for r in kept)), str(sum(not r["smem_ok"] for r in kept)),
                        str(sum(r["spills"] and not costly_spill(r) for r in kept)),
                        str(sum(bool(costly_spill(r)) or not r["smem_ok"] for r in pruned)), str(len(pruned))])
    lines = ["# Machine-code report, the whole matrix: counts (rows in static.json.gz)", ""]
    lines += _header(report, rows)
    lines += [f"- spill: {SPILL_LEGEND}", "", "## Checks", ""]
    lines += table(["check", "rule", "rows", "result"],
                   [[k, c["rule"], str(c["checked"]), "ok" if c["ok"] else f"FAIL ({len(c['failures'])})"]
                    for k, c in report["checks"].items()])
    lines += ["", "## Per kernel", ""]
    lines += table(["kernel", "sm", "compiled", "errors", "kept", "kept: costly spill", "kept: smem over",
                    "kept: ptxas trade", "pruned: would fail", "pruned"], out)
    failures = [f for c in report["checks"].values() for f in c["failures"]]
    if failures:
        lines += ["", f"## Failures ({len(failures)})", ""] + [f"- {f}" for f in failures]
    return "\n".join(lines) + "\n"
