"""`make bench`: the CPU tables of docs/design.md §6, printed and written as JSON, Markdown and a picture.

    python -m hen_kernels.bench cpu [--out DIR] [--quick] [--repeats K] [--emulate-avx2] [--no-compile]
                                    [--no-side] [--threads T] [--only REGEX] [--name STEM] [--from-json PATH]

Every case times the fused kernel, ``hk.hopfield_update(..., backend=<fused>)``, against
the peers of :mod:`hen_kernels.bench.cpu_peers` (plain PyTorch, SDPA's flash and math
backends, torch.compile, FAISS top-1) on the same inputs, interleaved in one process,
each first checked against a float64 computation.  Then: multi-step retrieval against
5 chained calls of each peer, the weighted similarity's cost, the cost of the ℓ2
recompute of docs/design.md §5.1, and many banks (leading dims) against SDPA
(:mod:`hen_kernels.bench.cpu_side`; the cases and their timing rounds are
:mod:`hen_kernels.bench.cpu_cases`).  The machine's matmul and memory-read ceilings are
measured in the same run and each row says what fraction of its ceiling it reaches;
:mod:`hen_kernels.bench.cpu_plot` draws the table beside it (cpu.png).

``--emulate-avx2`` runs the same tables in a child process that sees an AVX2-only CPU
(ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS, ATEN_CPU_CAPABILITY, FAISS_OPT_LEVEL and
the kernel's HEN_KERNELS_CPU_ISA) and writes cpu_avx2.{json,md,png}.

Other code (``benchmarks/test_bench_cpu.py``, tests/test_bench.py) reuses :func:`cases`,
:func:`case_inputs` and :func:`run_case`.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import asdict
from datetime import date
from typing import Dict, List, Optional

import torch

from .. import ops
from . import common, cpu_plot, cpu_peers as peers
from .common import DEFAULT_OUT, MIB, num
# The cases and the smaller tables live in cpu_cases and cpu_side; their names are
# re-exported here for the code that drives this table (tests, benchmarks/test_bench_cpu.py).
from .cpu_cases import (BF16_OVER_FP32_TARGET, CHECK_TOL, DTYPES, KERNEL_GRAD_TOL, KERNEL_TOL,  # noqa: F401
                        L2_PLAIN_TARGET, MAX_ROUNDS, MIN_ROW_S, PLAIN_TARGETS, QUICK_N, SDPA_TARGETS,
                        SHAPES, SIMILARITIES, SLOW_PEER_RATIO, SLOW_PEER_S, Case, bank, backend_label,
                        case_inputs, cases, check, compile_first, faiss_index, fused_backend,
                        fused_call, iqr_over_median, median_ms, release_bank, time_sparing_slow_peers)
from .cpu_side import (L2_RULE_MAX_COST, L2_RULE_REPEATS, MANY_BANK_PEERS, MANY_BANKS, STEPS,  # noqa: F401
                       many_bank_cases, run_l2_rule, run_many_banks, run_steps, run_weighted, side_cases,
                       weight_sets)

# --- the main table ----------------------------------------------------------------

def run_case(case: Case, backend: Optional[str] = None, repeats: int = 5, compile_peer: bool = True,
             min_row_s: float = MIN_ROW_S) -> dict:
    """Check and time the fused kernel and every peer on one case; one row as a dict."""
    backend = backend or fused_backend()
    q, x, beta = case_inputs(case)
    which = tuple(p for p in peers.PEERS[case.similarity] if compile_peer or p != "compile")
    index = faiss_index(case, x) if "faiss" in which else None
    fns = {"fused": fused_call(q, x, beta, case.similarity, backend)}
    if case.dtype != "float32":
        # The kernel on the float32 bank these rows were rounded from, timed in the same
        # interleaved rounds: the bf16-over-fp32 target compares calls minutes apart otherwise,
        # and this machine's speed drifts by more than the margins in question.
        fns["fused_fp32"] = fused_call(q.float(), bank(case.N, case.D, "float32"), beta, case.similarity, backend)
    fns.update(peers.peer_callables(q, x, beta, case.similarity, which, index))
    row = dict(asdict(case), name=case.name, fused_backend=backend, peers={})
    with torch.no_grad():
        # The check, in float64: for float32 rows the float32 expression is the plain peer itself (whose check
        # then could not fail), and its ℓ2 expansion cancels where the kernel's does not.
        want = peers.plain(q.double(), x.double(), beta, case.similarity)
        top = ops.hopfield_partial(q, x, beta, similarity=case.similarity, backend=backend).top_index
        compile_first(fns)
        timed, seconds = {}, {}
        for name, fn in fns.items():
            t0 = time.perf_counter()
            got = fn()
            seconds[name] = time.perf_counter() - t0
            if name == "faiss":
                agree = float((got == top).double().mean())
                row["peers"][name] = {"top1_agrees": agree, "ok": True}
            elif name == "fused_fp32":  # checked by the float32 rows; only its time is wanted here
                pass
            else:
                err, ok = check(got, want, case.dtype, kernel=name == "fused")
                if name == "fused":
                    row["rel_err"], row["check_ok"] = err, ok
                else:
                    row["peers"][name] = {"rel_err": err, "ok": ok}
            del got
            timed[name] = fn  # a peer that fails its check is still timed, and marked
        measured = time_sparing_slow_peers(timed, repeats, seconds, min_row_s)  # FAISS and compile apart
    for name, (times, extra) in measured.items():
        ms = median_ms(times)
        if name == "fused":
            row.update(fused_ms=ms, fused_gflops=case.flops / ms / 1e6, fused_gbps=case.bytes / ms / 1e6,
                       fused_extra_mib=None if extra is None else extra / MIB, fused_calls=len(times),
                       fused_times_ms=[t * 1e3 for t in times], fused_iqr=iqr_over_median(times))
        elif name == "fused_fp32":
            row["own_fp32_ms"] = ms
        else:
            row["peers"][name].update(ms=ms, ratio=None, extra_mib=None if extra is None else extra / MIB,
                                       calls=len(times))
    for name, pr in row["peers"].items():
        pr["ratio"] = pr["ms"] / row["fused_ms"]
    return row


def add_targets(rows: List[dict], ceilings: dict, info: Dict[str, str]) -> None:
    """Each row's targets (docs/design.md §6) and its fraction of the machine's ceiling."""
    fp32 = {(r["regime"], r["B"], r["similarity"]): r for r in rows if r["dtype"] == "float32"}
    for r in rows:
        t = []
        p = r["peers"]
        if r["similarity"] in ("dot", "l2sq") and "sdpa" in p:
            need = SDPA_TARGETS[r["regime"]] if r["similarity"] == "dot" else 1.0
            t.append(("SDPA" if r["similarity"] == "dot" else "SDPA+bias", p["sdpa"]["ratio"], need,
                      p["sdpa"]["ok"]))
        if "plain" in p:
            need = L2_PLAIN_TARGET if r["similarity"] == "l2" else PLAIN_TARGETS[r["regime"]]
            t.append(("plain", p["plain"]["ratio"], need, p["plain"]["ok"]))
        f = fp32.get((r["regime"], r["B"], r["similarity"]))
        # Interleaved with this row's calls where measured so (older reports: the float32 row's time).
        own_ms = r.get("own_fp32_ms", f["fused_ms"] if f is not None else None)
        if r["dtype"] == "bfloat16" and own_ms is not None and info.get("vnni_bf16") == "1":
            t.append(("own fp32", own_ms / r["fused_ms"], BF16_OVER_FP32_TARGET, True))
        # A peer whose answer failed the float32 check sets no target (met: None), it is only reported.
        r["targets"] = [dict(peer=n, ratio=v, target=need, met=(v >= need) if ok else None) for n, v, need, ok in t]
        # A row whose own answer failed the check meets nothing, however fast; nor does a row with no target.
        r["met"] = (False if not r.get("check_ok", True)
                    else common.verdict(x["met"] for x in r["targets"]) if r["targets"] else None)
        if r["regime"] == "recall":
            best = max(ceilings["read_gbps"], ceilings.get("read_gbps_after", 0.0))
            r["ceiling"], r["fraction"] = "read", r["fused_gbps"] / best
        else:  # the better of the two measurements: a shared machine's speed drifts
            # 16-bit rows against the bf16 matmul where the kernel has bf16 matrix instructions;
            # elsewhere it widens to float32 products, and the float32 matmul is its ceiling.
            bf16_units = r["dtype"] != "float32" and info.get("vnni_bf16") == "1"
            key = "matmul_bf16_gflops" if bf16_units else "matmul_gflops"
            best = max(ceilings[key], ceilings.get(key + "_after", 0.0))
            r["ceiling"], r["fraction"] = key, r["fused_gflops"] / best


# --- the report ------------------------------------------------------------------------

PEER_COLS = ("plain", "sdpa", "sdpa_math", "compile")


def _peer_cell(r: dict, name: str) -> str:
    p = r["peers"].get(name)
    if p is None:
        return "-"
    once = "¹" if p.get("calls") == 1 else ""  # timed once: far slower than the kernel
    return common.ratio(p["ratio"]) + once + ("" if p.get("ok", True) else " (WRONG)")  # (older multi-step: unchecked)


def _own_err_cell(r: dict) -> str:
    if "rel_err" not in r:  # multi-step and l2 rule rows of reports before 2026-12-06
        return "not checked"
    return num(r["rel_err"], ".1e") + ("" if r.get("check_ok", True) else " (WRONG)")


def wrong_outputs(report: dict) -> List[str]:
    """The rows of every table whose own output failed its check (reports before 2026-12-06 judged only
    the main table's)."""
    tables = (("rows", "main"), ("steps", "multi-step"), ("weighted", "weighted"), ("l2_rule", "l2 rule"),
              ("many_banks", "many banks"))
    return [f"{what}: {r['name']}" for key, what in tables for r in report.get(key) or ()
            if not r.get("check_ok", True)]


def _faiss_cell(r: dict) -> str:
    p = r["peers"].get("faiss")
    if p is None or "ms" not in p:
        return "-"
    return f"{p['ms']:.2f} ms, top-1 {100 * p['top1_agrees']:.0f}%"


def _targets_cell(r: dict) -> str:
    verdict = {True: "yes", False: "NO", None: "unverified: peer wrong"}
    return "; ".join(f"{t['peer']} {t['ratio']:.2f}x/{t['target']:.2f}x {verdict[t['met']]}" for t in r["targets"])


COLUMNS = [  # (header, row -> cell); first five and last fixed (tests/test_bench.py)
    ("regime", lambda r: r["regime"]),
    ("sim", lambda r: r["similarity"]),
    ("B", lambda r: str(r["B"])),
    ("N", lambda r: str(r["N"])),
    ("D", lambda r: str(r["D"])),
    ("dtype", lambda r: r["dtype"]),
    ("fused ms", lambda r: num(r["fused_ms"], ".2f")),
    ("IQR", lambda r: f"{100 * r['fused_iqr']:.0f}%" if r.get("fused_iqr") is not None else "-"),
    ("GFLOP/s", lambda r: num(r["fused_gflops"], ".1f")),
    ("GB/s", lambda r: num(r["fused_gbps"], ".2f")),
    ("of ceiling", lambda r: f"{100 * r['fraction']:.0f}% {'read' if r['ceiling'] == 'read' else 'matmul'}"),
    ("extra MiB", lambda r: num(r["fused_extra_mib"], ".1f")),
    ("rel err", lambda r: _own_err_cell(r)),
] + [(f"vs {p}", (lambda p: lambda r: _peer_cell(r, p))(p)) for p in PEER_COLS] + [
    ("faiss top-1", _faiss_cell),
    ("targets (ratio/target)", _targets_cell),
    ("met", lambda r: common.met_cell(r["met"])),
]


def bf16_side(ceilings: dict) -> str:
    """The bfloat16 matmul's side in the header where it differs from float32's (cpu_peers.matmul_side)."""
    n16 = ceilings.get("matmul_bf16_shape", ceilings["matmul_shape"])[0]
    if n16 == ceilings["matmul_shape"][0]:
        return ""
    return f"({n16}^3: at {ceilings['matmul_shape'][0]}^3 a call would take over {peers.LONGEST_MATMUL_S:g} s) "


def read_way(ceilings: dict) -> str:
    """How the read ceiling was read (older reports: a sum only)."""
    way = ceilings.get("read_way")
    return f"{way}, the fastest of a sum and matrix-vector products" if way else "sum"


def read_after(ceilings: dict) -> str:
    """The read ceiling measured again after the cases (older reports: not measured)."""
    after = ceilings.get("read_gbps_after")
    return f" ({after:.2f} after)" if after is not None else ""


def markdown(report: dict) -> str:
    m, c = report["machine"], report["ceilings"]
    emulated = m.get("emulated")
    lines = [
        "# hen_kernels CPU benchmark (docs/design.md §6)" + (" — AVX2 EMULATED" if emulated else ""),
        "",
        f"- machine: {m['cpu']} ({m['isa']}), {m['logical_cpus']} logical CPUs, torch {m['torch']} "
        f"with {m['torch_threads']} threads, Python {m['python']}, load average {m['load_average']} at the "
        f"start and {m.get('load_average_end')} at the end; allocator: {m.get('allocator', 'not recorded')}",
        f"- kernel: {m['cpu_info']}; {m['matrix_units']}"
        + (f"; EMULATED AVX2-only CPU: {emulated}" if emulated else ""),
        f"- fused: {m['fused_backend_label']}; peers (ratio = peer ms / fused ms, above 1: fused is faster): "
        "plain `softmax(beta*sim)@X` (beta on the query for dot; the ℓ2 forms by the expansion in float32 "
        "scores, the bank's |x|^2 computed once, untimed, as SDPA's bias is), SDPA flash "
        "and math backends (l2sq: with the bias -beta/2 |x|^2; SDPA's flash kernel ran one query on one thread "
        "(131072 x 512 float32 on an EPYC Zen 4: 32 ms on one thread, 34-38 on two; eight queries 56-66 and "
        "44-47 ms): what a user calling it gets, and the B = 1 recall ratios grow with the core count), torch.compile(plain) (compiled before its first timed "
        "call), FAISS exact top-1 (its time; how often its top-1 equals top_index); compile and FAISS are "
        "timed after the interleaved rounds, each in rounds of its own: FAISS's thread pools spin on after each "
        "call, and with the compiled code in the rounds every other call ran up to 2x slower (cpu_cases.py, "
        "APART_PEERS); "
        "\"own fp32\": the kernel on the float32 bank the bf16 one was rounded from, timed in the same "
        "interleaved rounds as the bf16 call",
        f"- median of {report['repeats']} or more interleaved calls after a warm-up (short rows: at least "
        f"{MIN_ROW_S:g} s of rounds, at most {MAX_ROUNDS}), each right after an untimed call "
        "of the same function (so that each finds the caches as it leaves them, not as a peer streaming half a GiB "
        "left them)"
        + (f" (--quick: N = {QUICK_N}, not the docs/design.md shapes)" if report["quick"] else "")
        + (f" (--only {report['only']}: the other rows not run)" if report.get("only") else "")
        # (reports made before 2026-12-06 checked against the float32 expression, the plain peer itself)
        + f"; each output checked against {report.get('check_reference', 'float32')} plain PyTorch first (rel "
        + "err; WRONG: the kernel off by more than its stated accuracy, "
        + ", ".join(f"{k} {report.get('kernel_tol', CHECK_TOL)[k]:g}" for k in DTYPES)
        + ", a peer by more than " + ", ".join(f"{k} {CHECK_TOL[k]:g}" for k in DTYPES)
        + "; a row whose own output is WRONG meets no target)",
        f"- ceilings, same run, best of {report['repeats']} calls: float32 matmul ({c['matmul_shape'][0]}^3) {c['matmul_gflops']:.1f} GFLOP/s "
        f"({c['matmul_gflops_after']:.1f} after the cases), bfloat16 matmul "
        f"{bf16_side(c)}{c['matmul_bf16_gflops']:.1f} "
        f"({c.get('matmul_bf16_gflops_after', float('nan')):.1f} after) "
        f"GFLOP/s, memory read {c['read_gbps']:.2f} GB/s{read_after(c)} ({c['read_mib']} MiB, {read_way(c)}); "
        "recall rows against the read ceiling (bank bytes / time), layer and bulk rows against the matmul of the "
        "products they run (bfloat16 where the kernel has bf16 matrix instructions, else float32); each against the "
        "better of its two measurements; these are torch's own rates, not bounds: above 100 % the kernel "
        "outran them",
        "- GFLOP/s = 4·B·N·D / time; GB/s = bank bytes / time; extra MiB = peak resident memory above the "
        "level before the call",
        f"- ¹ a peer over {SLOW_PEER_S:g} s and {SLOW_PEER_RATIO:g}x the kernel in its check call is timed once "
        "more, not at every repeat",
        *([f"- regenerated {report['regenerated']} (--from-json): the measurements are the JSON's; the method "
            "text above is the code's on that day and may describe a later method than the run used"]
          if report.get("regenerated") else []),
        "- IQR: the interquartile range of the kernel's timed calls in the row over their median (each call's time "
        "is in the JSON, `fused_times_ms`): how steady the machine was during the row; on these shared VMs 5-20 % "
        "is common, and a row now and then runs disturbed throughout",
        "",
    ]
    lines += common.table([h for h, _ in COLUMNS], [[cell(r) for _, cell in COLUMNS] for r in report["rows"]])
    met = sum(r["met"] is True for r in report["rows"])
    unverified = sum(r["met"] is None for r in report["rows"])
    lines += ["", f"{met} of {len(report['rows'])} rows meet every target" +
              (f" ({unverified} unverified: a peer's answer failed its check, or no peer ran)." if unverified
               else ".")]
    wrong = wrong_outputs(report)
    if wrong:
        lines += ["", f"**WRONG OUTPUT**: the kernel's own answer failed its check in {len(wrong)} row(s): "
                  + "; ".join(wrong) + ".  Its times there say nothing."]
    if report.get("plot"):
        lines += ["", f"![the rows against their peers and ceilings]({report['plot']})"]
    elif report.get("plot_error"):
        lines += ["", f"(no picture: {report['plot_error']})"]
    if report.get("steps"):
        lines += ["", f"## Multi-step retrieval ({STEPS} steps) against {STEPS} chained calls of each peer", ""]
        lines += _side_table(report["steps"], ["fused ms", "fused / (5 x one step)", "rel err"] +
                             [f"vs {p}" for p in peers.UPDATE_PEERS],
                             lambda r: [num(r["fused_ms"], ".2f"), num(r["per_step_overhead"], ".2f"),
                                        _own_err_cell(r)] + [_peer_cell(r, p) for p in peers.UPDATE_PEERS])
    if report.get("weighted"):
        lines += ["", "## Weighted similarity against the unweighted kernel: one half mask for every query "
                  "(0/1, HEN's occluded recall) and weights of each query's own (uniform in [0.5, 1.5))", ""]
        lines += _side_table(report["weighted"], ["mask ms", "own ms", "unweighted ms", "mask cost", "own cost",
                                                  "vs plain (mask)", "rel err (mask / own)"],
                             lambda r: [num(r["weighted_ms"], ".2f"), num(r.get("per_query_ms"), ".2f"),
                                        num(r["unweighted_ms"], ".2f"), common.ratio(r["cost"]),
                                        common.ratio(r.get("per_query_cost")), _weighted_plain_cell(r),
                                        num(r["rel_err"], ".1e") + " / " + num(r.get("per_query_rel_err"), ".1e")
                                        + ("" if r.get("check_ok", True) else " (WRONG)")])
        lines += ["", "cost: weighted time / unweighted time.  A mask's w∘q is a bfloat16 where q is, so 16-bit "
                  "products take it, and one mask for all sums w∘x∘x once a row; weights of each query's own "
                  "take float32 score products and, for ℓ2, a second product X∘X times w."]
    if report.get("l2_rule"):
        lines += ["", "## docs/design.md §5.1 ℓ2 recompute: the kernel with and without it "
                  f"(target: at most {100 * L2_RULE_MAX_COST:.0f}% on random data; median of "
                  f"{max(report['repeats'], L2_RULE_REPEATS)} interleaved calls)", ""]
        lines += _side_table(report["l2_rule"], ["random ms", "without ms", "cost", "on-pattern ms",
                                                 "without ms ", "cost ", "rel err (with)", "met"],
                             lambda r: [num(r["random_ms"], ".2f"), num(r["random_without_ms"], ".2f"),
                                        f"{100 * r['cost']:+.1f}%", num(r["on_pattern_ms"], ".2f"),
                                        num(r["on_pattern_without_ms"], ".2f"),
                                        f"{100 * r['on_pattern_cost']:+.1f}%", _own_err_cell(r),
                                        "yes" if r["met"] and r.get("check_ok", True) else "NO"])
    if report.get("many_banks"):
        lines += ["", "## Many banks, one per leading index (batch x heads; SDPA takes them as heads), dot", ""]
        lines += common.table(
            ["banks", "B", "N", "D", "dtype", "fused ms", "GB/s", "rel err"] + [f"vs {p}" for p in MANY_BANK_PEERS],
            [[str(r["banks"]), str(r["B"]), str(r["N"]), str(r["D"]), r["dtype"], num(r["fused_ms"], ".2f"),
              num(r["gbps"], ".1f"), _own_err_cell(r)] + [_peer_cell(r, p) for p in MANY_BANK_PEERS]
             for r in report["many_banks"]])
        lines += ["", "GB/s: the banks' bytes / time (each bank read once).  One query per bank is attention "
                  "decoding and HopfieldPooling's learned query: memory-bound, as the recall rows."]
    if report.get("warning"):
        lines.append("WARNING: " + report["warning"])
    if m["fused_is_reference"]:
        lines.append("The fused column is the PyTorch reference: these ratios say nothing about the fused kernel.")
    return "\n".join(lines) + "\n"


def _weighted_plain_cell(r: dict) -> str:
    err = r.get("plain_rel_err")  # reports before 2026-12-06 hold no plain_ok
    ok = r.get("plain_ok", err is None or err <= CHECK_TOL[r["dtype"]])
    return common.ratio(r["ratio"]) + ("" if ok else " (WRONG)")


def _side_table(rows: List[dict], headers: List[str], cells) -> List[str]:
    head = ["regime", "sim", "B", "N", "D", "dtype"]
    return common.table(head + headers, [[r["regime"], r["similarity"], str(r["B"]), str(r["N"]), str(r["D"]),
                                          r["dtype"]] + cells(r) for r in rows])


def machine(backend: str) -> dict:
    info = peers.cpu_info()
    host = common.host()
    return dict(host, fused_backend=backend, fused_backend_label=backend_label(backend),
                fused_is_reference=backend == "torch", memory_measured=common.memory_measured(),
                cpu_info=" ".join(f"{k}={v}" for k, v in info.items()) or "n/a",
                matrix_units=peers.matrix_units(info, host["isa"]),
                emulated=common.emulated())


def run(out: str = DEFAULT_OUT, quick: bool = False, repeats: int = 5, compile_peer: bool = True,
        side: bool = True, name: Optional[str] = None, only: Optional[str] = None) -> dict:
    """Run every table, print progress and the report, write cpu.json and cpu.md (cpu_avx2.* when
    emulated; ``name``.* when given)."""
    backend = fused_backend()
    info = machine(backend)
    print(f"hen_kernels bench: {info['cpu']}, torch {info['torch']}, {info['torch_threads']} threads, "
          f"fused = {info['fused_backend_label']}, {info['cpu_info']}", flush=True)
    report = {"machine": info, "quick": quick, "repeats": repeats, "check_reference": "float64",
              "kernel_tol": KERNEL_TOL,
              "ceilings": peers.measure_ceilings(quick, repeats), "rows": [], "steps": [], "weighted": [],
              "l2_rule": [], "many_banks": []}
    n = QUICK_N if quick else None
    keep = (lambda c: re.search(only, c.name) is not None) if only else (lambda c: True)
    if only:
        report["only"] = only
    try:
        for case in filter(keep, cases(n)):
            r = run_case(case, backend, repeats, compile_peer, 0.0 if quick else MIN_ROW_S)
            report["rows"].append(r)
            print(f"  {case.name:<44} fused {r['fused_ms']:9.2f} ms  " + "  ".join(
                f"{k} {v['ratio']:.2f}x" for k, v in r["peers"].items() if v.get("ratio")), flush=True)
        if side:
            for case in filter(keep, side_cases(n, ("dot",), DTYPES)):
                report["steps"].append(run_steps(case, backend, repeats, compile_peer, 0.0 if quick else MIN_ROW_S))
            if backend == "cpu":
                for case in filter(keep, side_cases(n, ("dot", "l2"), DTYPES)):
                    report["weighted"].append(run_weighted(case, backend, repeats))
                for case in filter(keep, side_cases(n, ("l2",), DTYPES)):
                    report["l2_rule"].append(run_l2_rule(case, backend, repeats))
            rows, banks = (QUICK_N // 8, 4) if quick else (None, None)
            for case in filter(keep, many_bank_cases(rows, DTYPES, banks)):
                report["many_banks"].append(run_many_banks(case, backend, repeats))
            print("  side tables done", flush=True)
    finally:
        release_bank()
    c = report["ceilings"]
    # A kernel that leaves threads spinning (raw OpenMP did, docs/design.md §7) slows every later
    # torch call, the peers included; measure the matmul again to catch it.
    c["matmul_gflops_after"] = after = peers.matmul_gflops(torch.float32, quick, repeats)
    c["matmul_bf16_gflops_after"] = peers.matmul_gflops(torch.bfloat16, quick, repeats,
                                                        c["matmul_bf16_shape"][0])
    c["read_gbps_after"] = peers.read_ceiling(peers.read_buffer(quick), repeats)[0]
    if max(after, c["matmul_gflops"]) > 2 * min(after, c["matmul_gflops"]):
        report["warning"] = (f"torch matmul ran at {c['matmul_gflops']:.1f} GFLOP/s before the cases and "
                             f"{after:.1f} after: other work on the machine, or a kernel that slows later "
                             "torch calls (raw OpenMP did, docs/design.md §7); the timings are suspect")
    info["load_average_end"] = common.load_average()
    finish(report, out, name)
    return report


def finish(report: dict, out: str, name: Optional[str] = None) -> None:
    """The targets and ceiling fractions from the measurements, then cpu.{json,md} (cpu_avx2.* when
    emulated, ``name``.* when given).  ``--from-json`` calls it on a saved report: the Markdown again, nothing re-measured."""
    info = report["machine"]
    kernel = dict(kv.split("=", 1) for kv in info["cpu_info"].split() if "=" in kv)
    add_targets(report["rows"], report["ceilings"], kernel)
    stem = name or ("cpu_avx2" if info["emulated"] else "cpu")
    report["plot"] = None
    report.pop("plot_error", None)
    try:
        os.makedirs(out, exist_ok=True)
        cpu_plot.draw(os.path.join(out, stem + ".png"), report)
        report["plot"] = stem + ".png"
    except Exception as e:  # noqa: BLE001 - a picture must not cost the tables (no matplotlib, say)
        report["plot_error"] = common.short_error(e)
    md = markdown(report)
    js, mdp = common.write_report(out, stem, report, md)
    print("\n" + md + f"\nwrote {js}, {mdp}" + (f" and {report['plot']}" if report["plot"] else ""))


def main(argv: Optional[List[str]] = None) -> int:
    p = common.parser("cpu", __doc__, "cpu.json, cpu.md and cpu.png", f"tiny shapes (N = {QUICK_N}): seconds, for tests",
                      5, "timed calls per measurement, after one warm-up")
    common.add_emulate_avx2(p, "cpu_avx2.{json,md,png}")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile peer (minutes to compile)")
    p.add_argument("--no-side", action="store_true", help="only the main table")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for every peer and the kernel (default: torch's own choice)")
    p.add_argument("--only", metavar="REGEX",
                   help="only the cases whose name matches (bulk-.*-float32, say); the header says so")
    p.add_argument("--name", metavar="STEM",
                   help="write STEM.json, STEM.md and STEM.png instead (one table per kind of CPU: cpu_zen4, say)")
    p.add_argument("--from-json", metavar="PATH",
                   help="re-make the tables and the picture of a saved cpu.json or cpu_avx2.json (no measurement)")
    a = p.parse_args(argv)
    if a.from_json:
        with open(a.from_json) as f:
            report = json.load(f)
        report["regenerated"] = f"{date.today().isoformat()} from {os.path.basename(a.from_json)}"
        finish(report, a.out, a.name)
        return 0
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    if a.emulate_avx2 and not common.emulated():
        return common.rerun_emulated("cpu", argv)
    wrong = wrong_outputs(run(a.out, a.quick, a.repeats, not a.no_compile, not a.no_side, a.name, a.only))
    if wrong:
        print(f"bench cpu: the kernel's answer failed its check in {len(wrong)} row(s): " + "; ".join(wrong),
              file=sys.stderr)
    return 1 if wrong else 0
