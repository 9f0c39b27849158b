"""The GPU tables of DESIGN.md §6 in bf16: layer, recall, bulk and steps, against the same run's baselines.

    python -m hen_kernels.bench_gpu [--out DIR] [--quick] [--regimes layer,recall,bulk,steps]
                                    [--budget SECONDS] [--repeats K] [--try-all]

Every case times each available fused backend ("triton", "cuda") through
``hk.hopfield_update(..., backend=...)`` (``hk.hopfield_retrieve`` for the
steps rows) and, in the same process, the baselines: the reference ("torch"
backend, which materialises B x N scores: skipped with the reason where it
would not fit), ``torch.nn.functional.scaled_dot_product_attention`` with keys
= values = X under each SDPA backend separately (dot rows; a backend that
refuses the shape is reported "n/a: <its reason>"), and FlexAttention
(compiled) with a ``score_mod`` for the ℓ2 form, plain dot for dot rows.

Times are CUDA-event medians after a warm-up (and, for Triton, after its
autotuning).  TFLOP/s counts 4·B·N·D flops, GB/s the bank read once (N·D·2
bytes), per step.  Ceilings measured in the same run: a bf16 matmul, a
device-to-device copy (bytes read + written), a device read (a sum) and a
pinned host-to-device copy.  Before a fused or baseline result is timed, its
output on the first (up to 256) queries is checked against the float32
reference (relative error <= 2e-2, DESIGN.md §5): a wrong result posts no time.

Writes ``gpu.json``, ``gpu.md`` and ``roofline.png`` under ``--out`` (default
benchmarks/results/) after every case, so a run stopped by a time limit keeps
what it measured.  Without a CUDA device it prints one line to stderr and
exits 2.  Exit 1 when a fused backend gave a wrong result or failed.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import backends, ops, reference
from .bench import DEFAULT_OUT, _num, load_average

NO_GPU = "bench_gpu: no CUDA device visible; GPU tables not measured"
INTERPRETED = ("bench_gpu: TRITON_INTERPRET=1 is set: Triton would run in its CPU interpreter; "
               "unset it (or set TRITON_INTERPRET=0) to time the GPU")

DTYPE = torch.bfloat16
ELEM = 2  # bytes per bf16 element
FUSED = ("triton", "cuda")
SDPA = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
REGIMES = ("layer", "recall", "bulk", "steps")
TOL = 2e-2          # DESIGN.md §5, bf16
CHECK_ROWS = 256    # queries checked against the float32 reference
FLEX_MAX_D = 256    # FlexAttention is not attempted above this head dim unless --try-all

# DESIGN.md §6 shapes; quick ones shrink every dimension.
FULL = dict(layer_bn=16384, layer_d=(64, 128), recall_b=(1, 16, 64), recall_d=(128, 1024, 4096),
            bank_bytes=2 ** 30, bulk=(4096, 2 ** 20, 1024), steps=100, steps_b=16)
QUICK = dict(layer_bn=2048, layer_d=(64, 128), recall_b=(1, 16, 64), recall_d=(128, 1024, 4096),
             bank_bytes=2 ** 26, bulk=(512, 2 ** 15, 1024), steps=10, steps_b=16)
TARGET_TEXT = {
    "layer-dot": ">= 1.0x best SDPA",
    "layer-l2": ">= 1.5x flex; >= 0.9x own dot",
    "recall": ">= 85% of copy GB/s; >= 1.5x best SDPA if D <= 256",
    "bulk": ">= 70% of matmul TFLOP/s",
    "steps": "T steps <= 1.05x T x 1 step",
}


@dataclass(frozen=True)
class GpuCase:
    regime: str
    similarity: str
    B: int
    N: int
    D: int
    steps: int = 1

    @property
    def name(self) -> str:
        base = f"{self.regime}-{self.similarity}-B{self.B}-N{self.N}-D{self.D}"
        return base + (f"-T{self.steps}" if self.steps > 1 else "")

    @property
    def flops(self) -> int:  # DESIGN.md §6: 4·B·N·D per step
        return 4 * self.B * self.N * self.D * self.steps

    @property
    def bytes(self) -> int:  # the bank read once per step, bf16
        return self.N * self.D * ELEM * self.steps

    @property
    def intensity(self) -> float:  # flops per byte: 2·B for bf16
        return self.flops / self.bytes

    @property
    def beta(self) -> float:
        # Score spreads of order one on standard-normal data: 1/sqrt(D) for dot, 1 for l2.
        return 1.0 / math.sqrt(self.D) if self.similarity == "dot" else 1.0

    @property
    def target_key(self) -> str:
        return f"layer-{self.similarity}" if self.regime == "layer" else self.regime


def cases(quick: bool = False, regimes: Sequence[str] = REGIMES) -> List[GpuCase]:
    """The §6 GPU cases of the chosen regimes, in run order (cases sharing a bank are adjacent)."""
    s = QUICK if quick else FULL
    out: List[GpuCase] = []
    if "layer" in regimes:
        n = s["layer_bn"]
        out += [GpuCase("layer", sim, n, n, d) for d in s["layer_d"] for sim in ("dot", "l2")]
    if "recall" in regimes:
        out += [GpuCase("recall", "dot", b, s["bank_bytes"] // (d * ELEM), d)
                for d in s["recall_d"] for b in s["recall_b"]]
    if "bulk" in regimes:
        b, n, d = s["bulk"]
        out.append(GpuCase("bulk", "dot", b, n, d))
    if "steps" in regimes:
        out += [GpuCase("steps", "dot", s["steps_b"], s["bank_bytes"] // (d * ELEM), d, s["steps"])
                for d in s["recall_d"]]
    return out


def rates(case: GpuCase, ms: Optional[float]) -> Tuple[Optional[float], Optional[float]]:
    """(TFLOP/s, GB/s) of one timing of ``case``."""
    if ms is None or not ms > 0:
        return None, None
    s = ms * 1e-3
    return case.flops / s / 1e12, case.bytes / s / 1e9


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
    props = torch.cuda.get_device_properties(0)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "gpu": props.name,
        "sm_count": props.multi_processor_count,
        "memory_gib": props.total_memory / 2 ** 30,
        "l2_mib": getattr(props, "L2_cache_size", 0) / 2 ** 20 or None,
        "capability": f"{props.major}.{props.minor}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "triton": triton_version,
        "python": platform.python_version(),
        "load_average": load_average(),
    }


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
        "copy_gbps": 2 * nbytes / (t_copy * 1e-3) / 1e9, "copy_mib": nbytes // 2 ** 20,
        "read_gbps": nbytes / (t_read * 1e-3) / 1e9,
        "h2d_gbps": hbytes / (t_h2d * 1e-3) / 1e9, "h2d_mib": hbytes // 2 ** 20,
    }


def fused_backends() -> Tuple[List[str], Dict[str, str]]:
    """The fused backends to time, and why each of the others is left out."""
    avail = ops.available_backends()
    names = [b for b in FUSED if b in avail]
    why = {b: backends.BACKENDS[b].unavailable_reason or "unavailable" for b in FUSED if b not in avail}
    return names, why


def limit_autotuning(n: int) -> List[str]:
    """Keep only the first ``n`` configs of each Triton kernel's autotuner (--quick: compile less)."""
    done = []
    try:
        from .triton import small_d, tiled_d
    except Exception:  # noqa: BLE001 - triton unusable: nothing to limit
        return done
    for mod, name in ((small_d, "small_d_kernel"), (tiled_d, "tiled_d_kernel")):
        tuner = getattr(mod, name, None)
        if tuner is not None and isinstance(getattr(tuner, "configs", None), list):
            tuner.configs = tuner.configs[:n]
            done.append(name)
    return done


def triton_plan(case: GpuCase) -> Optional[dict]:
    try:
        from .triton.launch import plan

        return plan(1, case.B, case.N, case.D, case.D, torch.device("cuda"))
    except Exception:  # noqa: BLE001
        return None


def triton_best_config(kernel: str) -> Optional[str]:
    try:
        from .triton import small_d, tiled_d

        tuner = {"small_d": small_d.small_d_kernel, "tiled_d": tiled_d.tiled_d_kernel}[kernel]
        cfg = getattr(tuner, "best_config", None)
        return None if cfg is None else str(cfg)
    except Exception:  # noqa: BLE001
        return None


# --- one case ------------------------------------------------------------------------------

class ContextLost(RuntimeError):
    """The CUDA context failed (an illegal access, say): nothing after it can be measured."""


_BANK: dict = {}


def bank(n: int, d: int) -> torch.Tensor:
    if (n, d) not in _BANK:
        _BANK.clear()
        gc.collect()
        torch.cuda.empty_cache()
        g = torch.Generator(device="cuda").manual_seed(n * 7919 + d)
        _BANK[(n, d)] = torch.randn(n, d, device="cuda", dtype=DTYPE, generator=g)
    return _BANK[(n, d)]


def case_inputs(case: GpuCase) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(case.B * 31 + case.D)
    return torch.randn(case.B, case.D, device="cuda", dtype=DTYPE, generator=g), bank(case.N, case.D)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    denom = ref.norm().item()
    diff = (got.double() - ref).norm().item()
    return diff if denom == 0 else diff / denom


def free_bytes() -> int:
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def reference_bytes(case: GpuCase) -> int:
    """Peak memory of the reference (float32 B x N scores and a few temporaries, float32 bank copies)."""
    return 6 * case.B * case.N * 4 + 2 * case.N * case.D * 4 + 4 * case.B * case.D * 4


def math_bytes(case: GpuCase) -> int:
    """SDPA's MATH backend: B x N scores, their softmax and a float32 upcast, to be safe."""
    return 4 * case.B * case.N * 4 + case.N * case.D * 4


def _short(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}"[:400]


def _check_context() -> None:
    try:
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001
        raise ContextLost(_short(e)) from e


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
            m["status"] = "n/a: out of GPU memory (" + _short(failure)[:120] + ")"
            return m
        said = [" ".join(str(w.message).split()) for w in caught]
        reasons = [r for r in dict.fromkeys(said) if r] + [_short(failure)]
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


def sdpa_fn(q4: torch.Tensor, x4: torch.Tensor, beta: float, name: str) -> Callable[[], torch.Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = getattr(SDPBackend, name)
    f = torch.nn.functional.scaled_dot_product_attention

    def call() -> torch.Tensor:
        with sdpa_kernel([be]):
            return f(q4, x4, x4, scale=beta)

    return call


_FLEX = None


def flex_fn(q4: torch.Tensor, x4: torch.Tensor, beta: float, similarity: str) -> Callable[[], torch.Tensor]:
    """Compiled FlexAttention: plain dot (scale = beta) or the ℓ2 form through a score_mod."""
    global _FLEX
    if _FLEX is None:
        import torch._dynamo.config as dynamo_config
        from torch.nn.attention.flex_attention import flex_attention

        for knob in ("cache_size_limit", "recompile_limit"):  # one compile per shape, many shapes
            if hasattr(dynamo_config, knob):
                setattr(dynamo_config, knob, max(getattr(dynamo_config, knob), 64))
        _FLEX = torch.compile(flex_attention, dynamic=False)
    flex = _FLEX
    if similarity == "dot":
        return lambda: flex(q4, x4, x4, scale=beta)
    qn = q4.float().square().sum(-1).reshape(-1)  # ‖q‖², (B,)
    xn = x4.float().square().sum(-1).reshape(-1)  # ‖x‖², (N,)

    def l2(score, b, h, q_idx, kv_idx):
        return -beta * torch.sqrt(torch.clamp(qn[q_idx] + xn[kv_idx] - 2.0 * score, min=0.0))

    return lambda: flex(q4, x4, x4, score_mod=l2, scale=1.0)


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


# --- targets, table, plot ------------------------------------------------------------------

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
            best = max(sdpa, key=sdpa.get) if sdpa else None
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
            oks = [x["met"] for x in t]
            row["met"] = False if False in oks else (None if None in oks else True)
            rows.append(row)
    return rows


def _ratio(v: Optional[float], fmt: str = ".2f") -> str:
    return "n/a" if v is None else format(v, fmt) + "x"


def _target_cell(t: dict) -> str:
    if t["value"] is None:
        return t["text"] + ": n/a"
    v = t["value"]
    shown = f"{v:.0%}" if "%" in t["text"] else f"{v:.2f}"
    return f"{t['text']}: {shown}"


def _met(m: Optional[bool]) -> str:
    return "yes" if m is True else ("NO" if m is False else "n/a")


COLUMNS = [  # (header, row -> cell)
    ("regime", lambda r: r["regime"]),
    ("sim", lambda r: r["similarity"]),
    ("B", lambda r: str(r["B"])),
    ("N", lambda r: str(r["N"])),
    ("D", lambda r: str(r["D"]) + (f" (T={r['steps']})" if r["steps"] > 1 else "")),
    ("backend", lambda r: r["backend"] + (f" ({r['plan']})" if r["plan"] else "")),
    ("ms", lambda r: _num(r["ms"], ".3f") if r["status"] == "ok" else r["status"][:60]),
    ("TFLOP/s", lambda r: _num(r["tflops"], ".1f")),
    ("GB/s", lambda r: _num(r["gbps"], ".0f")),
    ("rel err", lambda r: _num(r["rel_err"], ".1e")),
    ("vs ref", lambda r: _ratio(r["ratios"].get("torch"))),
    ("vs best SDPA", lambda r: _ratio(r["ratios"].get(r["best_sdpa"])) + (
        f" ({r['best_sdpa'][5:].split('_')[0]})" if r["best_sdpa"] else "")),
    ("vs flex", lambda r: _ratio(r["ratios"].get("flex"))),
    ("target", lambda r: "; ".join(_target_cell(t) for t in r["targets"])),
    ("met", lambda r: _met(r["met"])),
]
BASELINES = ["torch"] + ["sdpa:" + s for s in SDPA] + ["flex"]


def _baseline_cell(m: Optional[dict]) -> str:
    if m is None:
        return "-"
    if m["status"] == "ok":
        return f"{m['ms']:.3f} ms"
    return m["status"].replace("|", "/")[:90]


def markdown(report: dict) -> str:
    m, c = report["machine"], report.get("ceilings") or {}
    rows = report["rows"]
    fused = ", ".join(report["fused_backends"]) or "none"
    left = "; ".join(f"{k}: {v}" for k, v in report["unavailable"].items())
    lines = [
        "# hen_kernels GPU benchmark (DESIGN.md §6, bf16)",
        "",
        f"- device: {m['gpu']} ({m['sm_count']} SMs, {m['memory_gib']:.0f} GiB, L2 {_num(m['l2_mib'], '.0f')} MiB, "
        f"sm_{m['capability'].replace('.', '')}); torch {m['torch']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}, "
        f"triton {m['triton']}, Python {m['python']}",
        f"- fused backends timed: {fused}" + (f" (left out: {left})" if left else ""),
        f"- median of CUDA-event timings after a warm-up (Triton: after autotuning); at least "
        f"{report['repeats']} calls per timing; no L2 flush between calls (recall and bulk banks exceed L2)"
        + ("; --quick: shrunken shapes and Triton autotuning cut to the first config: NOT the DESIGN shapes, "
           "timings not representative" if report["quick"] else ""),
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
        "| " + " | ".join(h for h, _ in COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(cell(r).replace("|", "/") for _, cell in COLUMNS) + " |" for r in rows]
    met = sum(r["met"] is True for r in rows)
    lines += ["", f"{met} of {len(rows)} rows meet their target."]
    base_cases = [r for r in report["cases"] if r["steps"] == 1]
    if base_cases:
        lines += ["", "## Baselines (same run)", "",
                  "| case | " + " | ".join(BASELINES) + " |", "|" + "|".join("---" for _ in range(len(BASELINES) + 1)) + "|"]
        lines += ["| " + r["name"] + " | " + " | ".join(_baseline_cell(r["measurements"].get(b)) for b in BASELINES) + " |"
                  for r in base_cases]
    skipped = report.get("skipped") or []
    if skipped:
        lines += ["", f"Not measured ({len(skipped)}): " + "; ".join(f"{s['name']} ({s['reason']})" for s in skipped)]
    if report.get("interrupted"):
        lines.append("The run was interrupted: the table holds the cases finished before that.")
    if report.get("error"):
        lines.append("ERROR: " + report["error"])
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


# --- the run ---------------------------------------------------------------------------------

def _clean(v):
    """JSON without NaN or infinities."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def write(report: dict, out: str, plot: bool) -> None:
    report["rows"] = evaluate(report)
    os.makedirs(out, exist_ok=True)
    if plot:
        try:
            report["roofline"] = roofline(os.path.join(out, "roofline.png"), report)
        except Exception as e:  # noqa: BLE001 - a plot must not cost the tables
            report["roofline"] = None
            report["roofline_error"] = _short(e)
    Path(out, "gpu.json").write_text(json.dumps(_clean(report), indent=2) + "\n")
    Path(out, "gpu.md").write_text(markdown(report))


def run(out: str = DEFAULT_OUT, quick: bool = False, regimes: Sequence[str] = REGIMES, repeats: int = 10,
        budget: Optional[float] = None, try_all: bool = False) -> int:
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(msg, flush=True)

    fused, unavailable = fused_backends()
    limited = limit_autotuning(1) if quick and "triton" in fused else []
    todo = cases(quick, regimes)
    report = {"machine": machine(), "quick": quick, "regimes": list(regimes), "repeats": repeats, "budget_s": budget,
              "fused_backends": fused, "unavailable": unavailable, "autotune_limited": limited,
              "tolerance": TOL, "ceilings": None, "cases": [], "skipped": [], "complete": False}
    m = report["machine"]
    log(f"bench_gpu: {m['gpu']}, torch {m['torch']}, CUDA {m['cuda']}, triton {m['triton']}; fused: "
        f"{', '.join(fused) or 'none'}" + "".join(f"; {k} left out: {v}" for k, v in unavailable.items()))
    if not fused:
        log("bench_gpu: WARNING: no fused backend is available; only the baselines are measured")
    target_s = 0.1 if quick else 0.3
    failed = False
    try:
        report["ceilings"] = c = measure_ceilings(quick, repeats)
        log(f"  ceilings: matmul {c['matmul_tflops']:.0f} TFLOP/s, copy {c['copy_gbps']:.0f} GB/s, "
            f"read {c['read_gbps']:.0f} GB/s, pinned H2D {c['h2d_gbps']:.1f} GB/s")
        write(report, out, plot=False)
        for i, case in enumerate(todo):
            spent = time.monotonic() - t0
            if budget is not None and spent > budget:
                report["skipped"].append({"name": case.name, "reason": f"time budget {budget:.0f} s spent"})
                log(f"[{i + 1}/{len(todo)}] {case.name}: skipped (time budget {budget:.0f} s spent)")
                continue
            log(f"[{i + 1}/{len(todo)}] {case.name}  ({case.flops / 1e12:.3g} TFLOP, bank "
                f"{case.N * case.D * ELEM / 2**20:.0f} MiB, {spent:.0f} s in)")
            try:
                rec = run_case(case, fused, repeats, target_s, try_all, log)
            except ContextLost as e:
                report["error"] = f"the CUDA context failed during {case.name}: {e}; later cases not measured"
                log("bench_gpu: " + report["error"])
                failed = True
                break
            report["cases"].append(rec)
            failed |= any(mm["kind"] == "fused" and mm["status"] != "ok" and not mm["status"].startswith("n/a")
                          for mm in rec["measurements"].values())
            write(report, out, plot=False)
        else:
            report["complete"] = not report["skipped"]
    except KeyboardInterrupt:
        report["interrupted"] = True
        log("bench_gpu: interrupted; writing what was measured")
    finally:
        _BANK.clear()
        report["elapsed_s"] = time.monotonic() - t0
        write(report, out, plot=True)
    log("\n" + markdown(report))
    log(f"wrote {Path(out, 'gpu.json')}, {Path(out, 'gpu.md')}" + (", roofline.png" if report.get("roofline") else ""))
    if failed:
        log("bench_gpu: a fused backend failed or gave a wrong result (see the status column)")
    return 1 if failed or report.get("interrupted") else 0


def parse_regimes(text: str) -> List[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in REGIMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(REGIMES)}, got {text!r}")
    return [r for r in REGIMES if r in names]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hen_kernels.bench_gpu", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=DEFAULT_OUT, help=f"directory for gpu.json, gpu.md, roofline.png (default {DEFAULT_OUT})")
    p.add_argument("--quick", action="store_true",
                   help="shrunken shapes, Triton autotuning cut to one config: a smoke test, not the DESIGN numbers")
    p.add_argument("--regimes", type=parse_regimes, default=list(REGIMES),
                   help=f"comma-separated subset of {','.join(REGIMES)} (default: all)")
    p.add_argument("--repeats", type=int, default=10, help="least timed calls per timing (default 10)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds; cases not started by then are listed as skipped (default: no limit)")
    p.add_argument("--try-all", action="store_true", help=f"also attempt FlexAttention for D > {FLEX_MAX_D}")
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error("--repeats: expected an integer >= 1")
    if not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print(INTERPRETED, file=sys.stderr)
        return 2
    return run(a.out, a.quick, a.regimes, a.repeats, a.budget, a.try_all)


if __name__ == "__main__":
    sys.exit(main())
