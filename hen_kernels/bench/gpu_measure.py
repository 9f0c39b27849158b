"""Measuring on the GPU: CUDA-event timing, the machine and its ceilings, and one
case's measurements, each output checked against the float32 reference before
it is timed.
"""
from __future__ import annotations

import gc
import math
import statistics
import warnings
from dataclasses import asdict
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .. import ops, reference
from . import common
from .common import GIB, MIB, short_error
from .gpu_cases import (CHECK_ROWS, DTYPE, ELEM, FLEX_MAX_D, SDPA, TOL, GpuCase, case_inputs, flex_fn, math_bytes,
                        rates, reference_bytes, sdpa_fn, triton_best_config, triton_plan)


# --- timing ----------------------------------------------------------------------------

def time_ms(fn: Callable[[], object], min_reps: int = 10, target_s: float = 0.3, max_reps: int = 200) -> List[float]:
    """Milliseconds of each timed call (CUDA events), after two warm-up calls.

    Calls are issued back to back without a host sync in between, so host-side
    overhead overlaps the previous call's GPU work, as in a real loop.  The
    count aims at ``target_s`` of GPU time, at least ``min_reps`` (3 for calls
    over 50 ms) and at most ``max_reps``.
    """
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    b.synchronize()
    est = max(a.elapsed_time(b), 1e-3)
    lo = min_reps if est < 50 else min(min_reps, 3)
    n = int(max(lo, min(max_reps, target_s * 1e3 / est)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


# --- the machine and its ceilings ---------------------------------------------------------

def machine() -> dict:
    """The GPU, its CUDA stack, and the host it sits in."""
    props = torch.cuda.get_device_properties(0)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return dict(
        common.host(),
        gpu=props.name,
        sm_count=props.multi_processor_count,
        memory_gib=props.total_memory / GIB,
        l2_mib=getattr(props, "L2_cache_size", 0) / MIB or None,
        capability=f"{props.major}.{props.minor}",
        cuda=torch.version.cuda,
        cudnn=cudnn,
    )


def measure_ceilings(quick: bool, repeats: int) -> dict:
    """bf16 matmul TFLOP/s; device copy GB/s (read + written), device read GB/s (a sum); pinned H2D GB/s."""
    n = 4096 if quick else 8192
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, device="cuda", dtype=DTYPE, generator=g)
    b = torch.randn(n, n, device="cuda", dtype=DTYPE, generator=g)
    t_mm = statistics.median(time_ms(lambda: a @ b, repeats))
    del a, b
    nbytes = (2 ** 28 if quick else 2 ** 30)
    src = torch.randn(nbytes // ELEM, device="cuda", dtype=DTYPE, generator=g)
    dst = torch.empty_like(src)
    t_copy = statistics.median(time_ms(lambda: dst.copy_(src), repeats))
    t_read = statistics.median(time_ms(src.sum, repeats))
    del dst
    hbytes = 2 ** 26 if quick else 2 ** 29
    host = torch.empty(hbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(hbytes, dtype=torch.uint8, device="cuda")
    t_h2d = statistics.median(time_ms(lambda: dev.copy_(host, non_blocking=True), repeats))
    del src, host, dev
    torch.cuda.empty_cache()
    return {
        "matmul_tflops": 2 * n ** 3 / (t_mm * 1e-3) / 1e12, "matmul_shape": [n, n, n],
        "copy_gbps": 2 * nbytes / (t_copy * 1e-3) / 1e9, "copy_mib": nbytes // MIB,
        "read_gbps": nbytes / (t_read * 1e-3) / 1e9,
        "h2d_gbps": hbytes / (t_h2d * 1e-3) / 1e9, "h2d_mib": hbytes // MIB,
    }


# --- one case ------------------------------------------------------------------------------

class ContextLost(RuntimeError):
    """The CUDA context failed (an illegal access, say): nothing after it can be measured."""


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    denom = ref.norm().item()
    diff = (got.double() - ref).norm().item()
    return diff if denom == 0 else diff / denom


def free_bytes() -> int:
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def _check_context() -> None:
    try:
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001
        raise ContextLost(short_error(e)) from e


def measure(kind: str, fn: Callable[[], torch.Tensor], rows: Callable[[torch.Tensor], torch.Tensor],
            ref: Optional[torch.Tensor], repeats: int, target_s: float) -> dict:
    """Run ``fn`` once (compiling, autotuning), check its output rows against ``ref``, then time it.

    A baseline that refuses the shape is "n/a: <reason>" (the warnings torch gave
    with the refusal, then the exception); a fused backend that raises is "error: ...".
    """
    m: Dict[str, object] = {"kind": kind, "ms": None, "rel_err": None}
    failure: Optional[BaseException] = None
    out = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = fn()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - a backend refusing the shape, out of memory, a kernel failing
            failure = e
    if failure is not None:
        _check_context()
        if isinstance(failure, torch.cuda.OutOfMemoryError):
            m["status"] = "n/a: out of GPU memory (" + short_error(failure)[:120] + ")"
            return m
        said = [" ".join(str(w.message).split()) for w in caught]
        reasons = [r for r in dict.fromkeys(said) if r] + [short_error(failure)]
        m["status"] = ("n/a: " if kind in ("sdpa", "flex") else "error: ") + "; ".join(reasons)[:600]
        return m
    if ref is not None:
        err = rel_err(rows(out), ref)
        m["rel_err"] = err if math.isfinite(err) else None
        if not (math.isfinite(err) and err <= TOL):
            m["status"] = f"WRONG: rel err {err:.3g} > {TOL} against the float32 reference"
            return m
    del out
    times = time_ms(fn, repeats, target_s)
    m.update(status="ok", ms=statistics.median(times), min_ms=min(times), reps=len(times))
    return m


def run_case(case: GpuCase, fused: Sequence[str], repeats: int, target_s: float, try_all: bool,
             log: Callable[[str], None]) -> dict:
    """Every measurement of one case: fused backends first, then the baselines."""
    rec = dict(asdict(case), name=case.name, flops=case.flops, bytes=case.bytes, intensity=case.intensity,
               beta=case.beta, measurements={})
    meas: Dict[str, dict] = rec["measurements"]
    plan = triton_plan(case) if "triton" in fused else None
    rec["triton_plan"] = plan
    q, x = case_inputs(case)
    beta, sim = case.beta, case.similarity
    k = min(case.B, CHECK_ROWS)
    rec["checked_rows"] = k

    def done(label: str) -> None:
        m = meas[label]
        tf, gb = rates(case, m["ms"] if m["kind"] != "one-step" else None)
        m["tflops"], m["gbps"] = tf, gb
        if m["status"] == "ok":
            err = "" if m["rel_err"] is None else f", rel err {m['rel_err']:.1e}"
            rate = f" ({tf:.1f} TFLOP/s, {gb:.0f} GB/s)" if tf is not None else ""
            log(f"    {label:<24} {m['ms']:10.3f} ms{rate}{err}")
        else:
            log(f"    {label:<24} {m['status'][:150]}")

    # The float32 reference on the first k queries: what every output is checked against.
    x32 = x.float()
    ref1 = reference.partial(q[:k].float(), x32, beta, sim).out
    del x32
    free_bytes()
    first = lambda out: out[:k].float()  # noqa: E731
    if case.steps > 1:
        refT = ops.hopfield_retrieve(q[:k], x, beta, similarity=sim, max_steps=case.steps, backend="torch").state
        for b in fused:
            meas[b] = measure("fused", lambda b=b: ops.hopfield_retrieve(
                q, x, beta, similarity=sim, max_steps=case.steps, backend=b).state, first, refT, repeats, target_s)
            done(b)
            meas[f"{b}:1-step"] = measure("one-step", lambda b=b: ops.hopfield_update(
                q, x, beta, similarity=sim, backend=b), first, ref1, repeats, target_s)
            done(f"{b}:1-step")
        return rec

    for b in fused:
        meas[b] = measure("fused", lambda b=b: ops.hopfield_update(q, x, beta, similarity=sim, backend=b),
                          first, ref1, repeats, target_s)
        if b == "triton" and plan is not None:
            meas[b]["autotuned"] = triton_best_config(plan["kernel"])
        done(b)

    need, free = reference_bytes(case), free_bytes()
    if need <= 0.8 * free:
        meas["torch"] = measure("reference", lambda: ops.hopfield_update(q, x, beta, similarity=sim, backend="torch"),
                                first, ref1, repeats, target_s)
    else:
        meas["torch"] = {"kind": "reference", "ms": None, "rel_err": None,
                         "status": f"n/a: materialises B x N scores: ~{need / 2**30:.0f} GiB needed, "
                                   f"{free / 2**30:.0f} GiB free"}
    done("torch")

    q4, x4 = q.view(1, 1, case.B, case.D), x.view(1, 1, case.N, case.D)
    sdpa_rows = lambda out: out[0, 0, :k].float()  # noqa: E731
    for name in SDPA:
        label = "sdpa:" + name
        if sim != "dot":
            meas[label] = {"kind": "sdpa", "ms": None, "rel_err": None,
                           "status": "n/a: SDPA scores are dot products only (ℓ2 would need a B x N bias)"}
        elif name == "MATH" and math_bytes(case) > 0.8 * free_bytes():
            meas[label] = {"kind": "sdpa", "ms": None, "rel_err": None,
                           "status": f"n/a: MATH materialises B x N scores: ~{math_bytes(case) / 2**30:.0f} GiB"}
        else:
            meas[label] = measure("sdpa", sdpa_fn(q4, x4, beta, name), sdpa_rows, ref1, repeats, target_s)
        done(label)

    if case.D > FLEX_MAX_D and not try_all:
        meas["flex"] = {"kind": "flex", "ms": None, "rel_err": None,
                        "status": f"n/a: not attempted for D > {FLEX_MAX_D} (FlexAttention's templates target "
                                  "head dims up to 256; --try-all attempts it)"}
    else:
        meas["flex"] = measure("flex", flex_fn(q4, x4, beta, sim), sdpa_rows, ref1, repeats, target_s)
    done("flex")
    return rec

