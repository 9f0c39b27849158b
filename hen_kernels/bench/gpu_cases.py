"""The GPU benchmark's cases and their peers: the docs/design.md §6 shapes in bf16, their
inputs, the fused backends to time, and the baselines (SDPA backends, FlexAttention)
run beside them.  Measuring is gpu_measure's; the table, gpu_report's.
"""
from __future__ import annotations

import gc
import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import backends, ops
from ..constants import AUTOTUNE_ENV

DTYPE = torch.bfloat16
ELEM = 2  # bytes per bf16 element
FUSED = ("triton", "cuda")
SDPA = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
REGIMES = ("layer", "recall", "bulk", "steps")
TOL = 2e-2          # docs/design.md §5, bf16
CHECK_ROWS = 256    # queries checked against the float32 reference
FLEX_MAX_D = 256    # FlexAttention is not attempted above this head dim unless --try-all

# docs/design.md §6 shapes; quick ones shrink every dimension.
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
    def flops(self) -> int:  # docs/design.md §6: 4·B·N·D per step
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


# --- inputs: one bank on the device at a time -----------------------------------------

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


def release_bank() -> None:
    _BANK.clear()


def reference_bytes(case: GpuCase) -> int:
    """Peak memory of the reference (float32 B x N scores and a few temporaries, float32 bank copies)."""
    return 6 * case.B * case.N * 4 + 2 * case.N * case.D * 4 + 4 * case.B * case.D * 4


def math_bytes(case: GpuCase) -> int:
    """SDPA's MATH backend: B x N scores, their softmax and a float32 upcast, to be safe."""
    return 4 * case.B * case.N * 4 + case.N * case.D * 4


# --- the fused backends --------------------------------------------------------------------

def fused_backends() -> Tuple[List[str], Dict[str, str]]:
    """The fused backends to time, and why each of the others is left out."""
    avail = ops.available_backends()
    names = [b for b in FUSED if b in avail]
    why = {b: backends.BACKENDS[b].unavailable_reason or "unavailable" for b in FUSED if b not in avail}
    return names, why


def limit_autotuning() -> List[str]:
    """Each Triton kernel runs the first config its rules keep, untimed (--quick: compile less)."""
    os.environ[AUTOTUNE_ENV] = "first"
    return ["small_d_kernel", "tiled_d_kernel", "dq_kernel", "dkv_kernel"]


def triton_plan(case: GpuCase) -> Optional[dict]:
    try:
        from ..triton.launch import plan

        return plan(1, case.B, case.N, case.D, case.D, torch.device("cuda"), DTYPE)
    except Exception:  # noqa: BLE001
        return None


def triton_best_config(kernel: str) -> Optional[dict]:
    """The config the autotuner ran last for ``kernel``: its block sizes, warps and stages (gpu_static
    compiles it for the report row beside the measured time)."""
    try:
        from ..triton import small_d, tiled_d

        tuner = {"small_d": small_d.small_d_kernel, "tiled_d": tiled_d.tiled_d_kernel}[kernel]
        cfg = getattr(tuner, "best_config", None)
        return None if cfg is None else dict(kwargs=dict(cfg.kwargs), num_warps=cfg.num_warps,
                                             num_stages=cfg.num_stages)
    except Exception:  # noqa: BLE001
        return None


# --- the peers ----------------------------------------------------------------------------

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

