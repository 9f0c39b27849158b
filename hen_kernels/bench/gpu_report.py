"""The GPU benchmark's report: each case's rows against the docs/design.md §6 targets,
the Markdown table, the roofline plot and the files under --out.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

from . import common, gpu_static
from .common import num, ratio
from .gpu_cases import CHECK_ROWS, SDPA, TARGET_TEXT, TOL, GpuCase, rates


def _ok_ms(m: Optional[dict]) -> Optional[float]:
    return m["ms"] if m and m.get("status") == "ok" else None


def evaluate(report: dict) -> List[dict]:
    """One row per (case, fused backend): rates, ratio to every baseline, the §6 target and whether it is met."""
    c = report.get("ceilings") or {}
    dot_ms = {(r["B"], r["N"], r["D"], lab): _ok_ms(m)
              for r in report["cases"] if r["regime"] == "layer" and r["similarity"] == "dot"
              for lab, m in r["measurements"].items()}
    rows = []
    for r in report["cases"]:
        case = GpuCase(r["regime"], r["similarity"], r["B"], r["N"], r["D"], r["steps"])
        meas = r["measurements"]
        for lab, m in meas.items():
            if m["kind"] != "fused":
                continue
            ms = _ok_ms(m)
            tf, gb = rates(case, ms)
            row = dict(case=case.name, regime=case.regime, similarity=case.similarity, B=case.B, N=case.N,
                       D=case.D, steps=case.steps, intensity=case.intensity, backend=lab, ms=ms, tflops=tf, gbps=gb,
                       rel_err=m.get("rel_err"), status=m["status"], ratios={}, targets=[])
            plan = r.get("triton_plan") if lab == "triton" else None
            row["plan"] = f"{plan['kernel']} BM{plan['BM']} S{plan['splits']}" if plan else ""
            if ms is not None:
                for blab, bm in meas.items():
                    if bm["kind"] in ("reference", "sdpa", "flex") and _ok_ms(bm) is not None:
                        row["ratios"][blab] = bm["ms"] / ms
            sdpa = {k: v for k, v in row["ratios"].items() if k.startswith("sdpa:")}
            # ratios are SDPA's ms over ours: the fastest SDPA backend has the smallest
            best = min(sdpa, key=sdpa.get) if sdpa else None
            row["best_sdpa"] = best
            t = row["targets"]

            def target(text: str, value: Optional[float], ok: Optional[bool]) -> None:
                t.append({"text": text, "value": value, "met": ok})

            key = case.target_key
            if ms is None:
                target(TARGET_TEXT[key], None, False)
            elif key == "layer-dot":
                v = sdpa.get(best) if best else None
                target("best SDPA / ours >= 1.0x", v, None if v is None else v >= 1.0)
            elif key == "layer-l2":
                v = row["ratios"].get("flex")
                target("flex / ours >= 1.5x", v, None if v is None else v >= 1.5)
                d = dot_ms.get((case.B, case.N, case.D, lab))
                target("own dot / own l2 >= 0.9x", None if d is None else d / ms, None if d is None else d / ms >= 0.9)
            elif key == "recall":
                cp = c.get("copy_gbps")
                v = None if not cp else gb / cp
                target("bank GB/s / copy GB/s >= 85%", v, None if v is None else v >= 0.85)
                if case.D <= 256:
                    v = sdpa.get(best) if best else None
                    target("best SDPA / ours >= 1.5x", v, None if v is None else v >= 1.5)
            elif key == "bulk":
                mm = c.get("matmul_tflops")
                v = None if not mm else tf / mm
                target("TFLOP/s / matmul TFLOP/s >= 70%", v, None if v is None else v >= 0.70)
            elif key == "steps":
                one = _ok_ms(meas.get(f"{lab}:1-step"))
                v = None if one is None else ms / (case.steps * one)
                row["one_step_ms"] = one
                target(f"T steps / ({case.steps} x 1 step) <= 1.05", v, None if v is None else v <= 1.05)
            row["met"] = common.verdict(x["met"] for x in t)
            rows.append(row)
    return rows


def _target_cell(t: dict) -> str:
    if t["value"] is None:
        return t["text"] + ": n/a"
    v = t["value"]
    shown = f"{v:.0%}" if "%" in t["text"] else f"{v:.2f}"
    return f"{t['text']}: {shown}"


COLUMNS = [  # (header, row -> cell)
    ("regime", lambda r: r["regime"]),
    ("sim", lambda r: r["similarity"]),
    ("B", lambda r: str(r["B"])),
    ("N", lambda r: str(r["N"])),
    ("D", lambda r: str(r["D"]) + (f" (T={r['steps']})" if r["steps"] > 1 else "")),
    ("backend", lambda r: r["backend"] + (f" ({r['plan']})" if r["plan"] else "")),
    ("ms", lambda r: num(r["ms"], ".3f") if r["status"] == "ok" else r["status"][:60]),
    ("TFLOP/s", lambda r: num(r["tflops"], ".1f")),
    ("GB/s", lambda r: num(r["gbps"], ".0f")),
    ("rel err", lambda r: num(r["rel_err"], ".1e")),
    ("vs ref", lambda r: ratio(r["ratios"].get("torch"))),
    ("vs best SDPA", lambda r: ratio(r["ratios"].get(r["best_sdpa"])) + (
        f" ({r['best_sdpa'][5:].split('_')[0]})" if r["best_sdpa"] else "")),
    ("vs flex", lambda r: ratio(r["ratios"].get("flex"))),
    ("target", lambda r: "; ".join(_target_cell(t) for t in r["targets"])),
    ("met", lambda r: common.met_cell(r["met"])),
]
BASELINES = ["torch"] + ["sdpa:" + s for s in SDPA] + ["flex"]


def _baseline_cell(m: Optional[dict]) -> str:
    if m is None:
        return "-"
    if m["status"] == "ok":
        return f"{m['ms']:.3f} ms"
    return m["status"][:90]


def markdown(report: dict) -> str:
    m, c = report["machine"], report.get("ceilings") or {}
    rows = report["rows"]
    fused = ", ".join(report["fused_backends"]) or "none"
    left = "; ".join(f"{k}: {v}" for k, v in report["unavailable"].items())
    lines = [
        "# hen_kernels GPU benchmark (docs/design.md §6, bf16)",
        "",
        f"- device: {m['gpu']} ({m['sm_count']} SMs, {m['memory_gib']:.0f} GiB, L2 {num(m['l2_mib'], '.0f')} MiB, "
        f"sm_{m['capability'].replace('.', '')}); torch {m['torch']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}, "
        f"triton {m['triton']}, Python {m['python']}",
        f"- fused backends timed: {fused}" + (f" (left out: {left})" if left else ""),
        f"- median of CUDA-event timings after a warm-up (Triton: after autotuning); at least "
        f"{report['repeats']} calls per timing; no L2 flush between calls (recall and bulk banks exceed L2)"
        + ("; --quick: shrunken shapes and Triton autotuning cut to the first config its rules keep: "
           "NOT the docs/design.md shapes, timings not representative" if report["quick"] else ""),
    ]
    if c:
        lines.append(
            f"- ceilings (this run): bf16 matmul ({c['matmul_shape'][0]}^3) {c['matmul_tflops']:.0f} TFLOP/s; "
            f"device copy {c['copy_gbps']:.0f} GB/s (read + written, {c['copy_mib']} MiB); device read (sum) "
            f"{c['read_gbps']:.0f} GB/s; pinned host-to-device {c['h2d_gbps']:.1f} GB/s ({c['h2d_mib']} MiB)")
    lines += [
        "- TFLOP/s = 4·B·N·D·T / time; GB/s = bank bytes N·D·2·T / time (T = steps, 1 except the steps rows); "
        "vs X = X's ms / ours (> 1: ours faster); every timed output was first checked on its first "
        f"min(B, {CHECK_ROWS}) queries against the float32 reference (rel err <= {TOL}): a wrong one is not timed",
        "- steps rows: `hk.hopfield_retrieve(max_steps=T)` against T x one `hk.hopfield_update`",
        "",
    ]
    lines += common.table([h for h, _ in COLUMNS], [[cell(r) for _, cell in COLUMNS] for r in rows])
    met = sum(r["met"] is True for r in rows)
    lines += ["", f"{met} of {len(rows)} rows meet their target."]
    base_cases = [r for r in report["cases"] if r["steps"] == 1]
    if base_cases:
        lines += ["", "## Baselines (same run)", ""]
        lines += common.table(["case"] + BASELINES,
                              [[r["name"]] + [_baseline_cell(r["measurements"].get(b)) for b in BASELINES]
                               for r in base_cases])
    skipped = report.get("skipped") or []
    if skipped:
        lines += ["", f"Not measured ({len(skipped)}): " + "; ".join(f"{s['name']} ({s['reason']})" for s in skipped)]
    if report.get("interrupted"):
        lines.append("The run was interrupted: the table holds the cases finished before that.")
    if report.get("error"):
        lines.append("ERROR: " + report["error"])
    if report.get("static_rows") is not None or report.get("static_error"):
        lines += gpu_static.markdown(gpu_static.join(report, report.get("static_rows") or []),
                                     report.get("static_arch"))
        if report.get("static_error"):
            lines.append(f"Machine code not read: {report['static_error']}")
    if report.get("roofline"):
        lines += ["", f"![roofline](roofline.png) ({report['roofline']}: x = flops per bank byte, y = TFLOP/s, "
                  "log-log; the roof is min(measured matmul, measured copy bandwidth x intensity); "
                  "orange: triton, green: cuda)"]
    return "\n".join(lines) + "\n"


COLORS = {"triton": (230, 120, 0), "cuda": (0, 150, 60)}
OTHER = (110, 110, 110)


def roofline_points(report: dict) -> List[Tuple[float, float, str, str]]:
    """(intensity, TFLOP/s, backend, label) of every measured fused row."""
    return [(r["intensity"], r["tflops"], r["backend"], r["case"]) for r in report["rows"] if r["tflops"] is not None]


def roofline_matplotlib(path: str, points, matmul_tflops: float, copy_gbps: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bw = copy_gbps / 1e3
    ridge = matmul_tflops / bw
    xs = [p[0] for p in points] + [ridge / 10, ridge * 10]
    lo, hi = min(xs) / 2, max(xs) * 2
    fig, ax = plt.subplots(figsize=(9, 6))
    ax.plot([lo, ridge, hi], [lo * bw, matmul_tflops, matmul_tflops], color="black", lw=1.5,
            label=f"roof: copy {copy_gbps:.0f} GB/s, matmul {matmul_tflops:.0f} TFLOP/s")
    for backend in sorted({p[2] for p in points}):
        pts = [p for p in points if p[2] == backend]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=30, label=backend,
                   color=[c / 255 for c in COLORS.get(backend, OTHER)], zorder=3)
        for ai, tf, _, name in pts:
            ax.annotate(name.split("-N")[0] + "-D" + name.split("-D")[-1], (ai, tf), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (flops per bank byte)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def roofline(path: str, report: dict) -> Optional[str]:
    """Write the roofline PNG (matplotlib); None without measured ceilings."""
    c = report.get("ceilings")
    if not c:
        return None
    title = f"hen_kernels roofline, {report['machine'].get('gpu', '?')} (bf16, measured ceilings)"
    roofline_matplotlib(path, roofline_points(report), c["matmul_tflops"], c["copy_gbps"], title)
    return "matplotlib"


def write(report: dict, out: str, plot: bool) -> None:
    report["rows"] = evaluate(report)
    if plot:
        os.makedirs(out, exist_ok=True)
        try:
            report["roofline"] = roofline(os.path.join(out, "roofline.png"), report)
        except Exception as e:  # noqa: BLE001 - a plot must not cost the tables
            report["roofline"] = None
            report["roofline_error"] = common.short_error(e)
    common.write_report(out, "gpu", report, markdown(report))

