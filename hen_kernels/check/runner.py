"""Run the contract cases on this machine and print one table: backend x device x dtype, pass or fail.

The targets are every backend that loaded, on every device it serves here
(Triton on CPU tensors only under TRITON_INTERPRET=1, the GPU backends where a
CUDA device is visible).  A compiled extension that is present but cannot be
used (built against another torch, failed to load) is a failure: the user
would silently get the reference instead of the kernels.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import hen_kernels as hk
from hen_kernels import backends, build_info
from hen_kernels.bench import common
from hen_kernels.check.cases import DTYPES, Result, Target
from hen_kernels.check.catalog import CASES
from hen_kernels.constants import AUTOTUNE_ENV, AUTOTUNE_MODES

DTYPE_NAMES = {d: str(d).replace("torch.", "") for d in DTYPES}
DEVICES = ("cpu", "cuda")


@dataclass
class Row:
    """Every result of one backend on one device in one dtype."""

    backend: str
    device: str
    dtype: str
    results: List[Result] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False  # stopped by a time limit: the results so far, not every case

    @property
    def failures(self) -> List[Result]:
        return [r for r in self.results if not r.ok]

    @property
    def worst(self) -> Optional[Result]:
        """The result closest to (or furthest past) its tolerance; exact promises count as 0 or inf."""
        def ratio(r: Result) -> float:
            if r.tolerance == 0:
                return 0.0 if r.ok else math.inf
            return r.error / r.tolerance
        return max(self.results, key=ratio, default=None)


@dataclass
class Report:
    machine: dict
    rows: List[Row]
    problems: List[str]  # a failure outside any row: an extension that is there but unusable
    notes: List[str]  # what was not checked, and why
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.problems and all(not row.failures for row in self.rows) and bool(self.rows)


def machine() -> dict:
    info = common.host()
    info["hen_kernels"] = hk.__version__
    info["backends"] = hk.available_backends()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["triton_autotune"] = os.environ.get(AUTOTUNE_ENV, "all")
    path = backends._extension_path()
    info["extension"] = path
    info["extension_build"] = build_info.read(path) if path else None
    if "cpu" in info["backends"]:
        info["cpu_kernel"] = torch.ops.hen_kernels.cpu_info()
    return info


def extension_problem() -> Optional[str]:
    """Why the compiled kernels are there but cannot serve, or None (absent on purpose counts as fine)."""
    path = backends._extension_path()
    if path is None:
        return None
    mismatch = build_info.torch_mismatch(path)
    if mismatch is not None:
        return mismatch
    return backends.load_extension()


def _interpreted_products() -> str:
    from hen_kernels.triton import interpreted_products

    if interpreted_products.EMULATED:
        return ("triton cpu: Triton's interpreter, its float32 products (tf32, tf32x3) emulated as a GPU's "
                "tensor cores compute them (hen_kernels/triton/interpreted_products.py)")
    return ("triton cpu: Triton's interpreter with numpy's float32 products: this triton's interpreter could not "
            "be hooked, so a float32 answer that only holds at full float32 products is not seen here")


def targets(only_backends: Optional[Sequence[str]], only_devices: Optional[Sequence[str]]) -> Tuple[List[Tuple[str, str]], List[str]]:
    """(backend, device) pairs to check, and a note for each backend or device left out."""
    pairs, notes = [], []
    for name, b in backends.BACKENDS.items():
        if only_backends and name not in only_backends:
            continue
        if not b.available():
            notes.append(f"{name}: not checked: {b.unavailable_reason}")
            continue
        for device in b.device_types:
            if device == "meta":  # shapes without numbers (tests/test_torch_conventions.py): nothing to measure
                continue
            if (only_devices and device not in only_devices) or (device == "cuda" and not torch.cuda.is_available()):
                continue
            pairs.append((name, device))
            if name == "triton" and device == "cpu":
                notes.append(_interpreted_products())
    if not torch.cuda.is_available() and (not only_devices or "cuda" in only_devices):
        notes.append("cuda: no CUDA device is visible: nothing was checked on a GPU")
    return pairs, notes


def run_target(t: Target, quick: bool, log=None, only_cases: Optional[Sequence[str]] = None,
               row: Optional[Row] = None) -> Row:
    """Every case of ``t``, into ``row`` as they finish (what an interrupt leaves is reported)."""
    row = row or Row(t.backend, t.device, DTYPE_NAMES[t.dtype])
    start = time.monotonic()
    for name, case in CASES:
        if only_cases and name not in only_cases:
            continue
        try:
            row.results.extend(case(t, quick))
        except Exception as e:  # a kernel that raises fails its case; the other cases still run
            row.results.append(Result(f"{name}: raised", math.inf, 0.0, False, common.short_error(e)))
        finally:
            row.seconds = time.monotonic() - start
    if t.device == "cuda":
        torch.cuda.synchronize()
    row.seconds = time.monotonic() - start
    if log:
        log(f"  {t.backend:7s} {t.device:5s} {row.dtype:9s} {len(row.results):4d} cases "
            f"{'ok' if not row.failures else f'{len(row.failures)} FAILED'} ({row.seconds:.1f} s)")
    return row


def run(quick: bool = False, only_backends: Optional[Sequence[str]] = None,
        only_devices: Optional[Sequence[str]] = None, dtypes: Sequence[torch.dtype] = DTYPES, log=None,
        only_cases: Optional[Sequence[str]] = None) -> Report:
    """Check every backend (or ``only_backends``) on every device it serves here, in each dtype."""
    start = time.monotonic()
    problem = extension_problem()
    pairs, notes = targets(only_backends, only_devices)
    rows, untaken, problems = [], {}, [problem] if problem else []
    todo = []
    for b, d in pairs:
        takes = backends.BACKENDS[b].dtypes
        for dt in dtypes:
            if dt in takes:
                todo.append(Target(b, d, dt))
            else:
                untaken.setdefault(DTYPE_NAMES[dt], set()).add(b)
    try:
        for t in todo:
            rows.append(Row(t.backend, t.device, DTYPE_NAMES[t.dtype]))
            run_target(t, quick, log, only_cases, rows[-1])
    except KeyboardInterrupt:  # a time limit (scripts/gpu_run.sh): report what was checked
        rows[-1].interrupted = True
        left = [f"{t.backend} {t.device} {DTYPE_NAMES[t.dtype]}" for t in todo[len(rows):]]
        problems.append(f"interrupted: {rows[-1].backend} {rows[-1].device} {rows[-1].dtype} after "
                        f"{len(rows[-1].results)} cases" + (f"; not checked: {', '.join(left)}" if left else ""))
        if not rows[-1].results:
            rows.pop()
    for name, names in sorted(untaken.items()):
        notes.append(f"{name}: not checked on {', '.join(sorted(names))}: the backend does not take it")
    return Report(machine(), rows, problems, notes, time.monotonic() - start)


def _fmt(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.2e}"


def table(report: Report) -> str:
    lines = []
    for row in report.rows:
        w = row.worst
        if w is None:
            continue
        err = "exact" if w.tolerance == 0 and w.ok else _fmt(w.error)
        tol = "exact" if w.tolerance == 0 else _fmt(w.tolerance)
        verdict = "pass" if not row.failures else f"FAIL ({len(row.failures)})"
        lines.append([row.backend, row.device, row.dtype, str(len(row.results)), err, tol, w.case,
                      verdict + (" (interrupted)" if row.interrupted else ""), f"{row.seconds:.1f}"])
    head = ["backend", "device", "dtype", "cases", "max error", "tolerance", "nearest its tolerance", "result", "s"]
    return "\n".join(common.table(head, lines, ["---", "---", "---", "---:", "---:", "---:", "---", "---", "---:"]))


def render(report: Report) -> str:
    m = report.machine
    out = [f"hen check: hen_kernels {m['hen_kernels']}, torch {m['torch']}, triton {m['triton']}, "
           f"Python {m['python']}",
           f"CPU: {m['cpu']} ({m['isa']}); GPU: {m.get('gpu', 'none visible')}"
           + (f" (Triton autotuning: {m['triton_autotune']})" if m.get("triton_autotune") else ""),
           f"backends: {', '.join(m['backends'])}; extension: {m['extension'] or 'not built'}"
           + (f" (built against torch {m['extension_build'].get('torch')})" if m.get("extension_build") else ""),
           "error: ‖got − ref‖ / ‖ref‖ against the float64 reference (docs/design.md §5); each row shows "
           "its case nearest its tolerance",
           "", table(report), ""]
    for row in report.rows:
        for r in row.failures:
            out.append(f"FAIL {row.backend} {row.device} {row.dtype}: {r.case}: {r.note or _fmt(r.error)}")
    out += [f"FAIL {p}" for p in report.problems]
    out += [f"note: {n}" for n in report.notes]
    if not report.rows:
        out.append("FAIL nothing was checked")
    verdict = "all cases pass" if report.ok else "FAILED"
    out.append(f"hen check: {verdict} ({sum(len(r.results) for r in report.rows)} cases, {report.seconds:.0f} s)")
    return "\n".join(out)


def to_json(report: Report) -> dict:
    def clean(v):
        return None if isinstance(v, float) and not math.isfinite(v) else v

    rows = [{"backend": r.backend, "device": r.device, "dtype": r.dtype, "seconds": r.seconds, "ok": not r.failures,
             "interrupted": r.interrupted,
             "results": [{k: clean(v) for k, v in asdict(x).items()} for x in r.results]} for r in report.rows]
    return {"ok": report.ok, "machine": report.machine, "rows": rows, "problems": report.problems,
            "notes": report.notes, "seconds": report.seconds}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hen check", description=(
        "Check every available backend on every device against the float64 reference: every dtype and "
        "similarity, chunked merges, NaN isolation, inf bank rows refused, multi-step retrieval, feature weights. "
        "Prints a table and exits 1 on any failure."))
    p.add_argument("--quick", action="store_true", help="fewer and smaller shapes (under a minute on a CPU)")
    p.add_argument("--backend", action="append", choices=sorted(backends.BACKENDS),
                   help="check only this backend (repeatable; default: every available one)")
    p.add_argument("--device", action="append", choices=DEVICES, help="check only this device (repeatable)")
    p.add_argument("--dtype", action="append", choices=sorted(DTYPE_NAMES.values()),
                   help="check only this dtype (repeatable; default: all four, float64 where a backend takes it)")
    p.add_argument("--case", action="append", choices=[name for name, _ in CASES],
                   help="run only this group of cases (repeatable; default: all)")
    p.add_argument("--json", metavar="PATH", help="also write every result as JSON to PATH")
    p.add_argument("--autotune", choices=AUTOTUNE_MODES, default=None, help=(
        f"Triton's autotuning on a GPU: 'first' runs the first config the rules keep, untimed; 'all' times every "
        f"one, compiling up to 24 per launch shape first (default: ${AUTOTUNE_ENV}, else 'first')"))
    p.add_argument("-q", "--quiet", action="store_true", help="print the table only, no progress lines")
    a = p.parse_args(argv)
    if a.json:  # before the run, which can take minutes: the JSON is written only after it
        folder = os.path.dirname(os.path.abspath(a.json))
        if os.path.isdir(a.json):
            p.error(f"--json: {a.json!r} is a folder; expected a file path")
        if not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
            p.error(f"--json: cannot write {a.json!r}: {folder!r} is not a writable folder")
    return a


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    by_name = {v: k for k, v in DTYPE_NAMES.items()}
    dtypes = [by_name[n] for n in a.dtype] if a.dtype else list(DTYPES)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # Correctness, not speed: each kept config is correct; compiling all of them first took minutes on a GPU.
    # (for the check only: a caller's own later calls keep their setting)
    before = os.environ.get(AUTOTUNE_ENV)
    os.environ[AUTOTUNE_ENV] = a.autotune or before or "first"
    try:
        report = run(a.quick, a.backend, a.device, dtypes, None if a.quiet else log, a.case)
    finally:
        if before is None:
            del os.environ[AUTOTUNE_ENV]
        else:
            os.environ[AUTOTUNE_ENV] = before
    print(render(report), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(to_json(report), f, indent=1, default=str)
    return 0 if report.ok else 1
