"""Choosing and launching the Triton kernels: the heuristic of docs/design.md §2's regimes.

* D and Dv <= REGISTER_TILE_MAX_DIM (256) -> ``small_d`` (layer regime): the
  query block, one bank tile and the accumulator fit in registers; BM = 64
  queries per program, or the next power of two >= 16 when there are fewer
  queries.  float32 inputs and weighted calls (float32 score products) take
  the D-tiled kernel beyond D = 128 (configs.FP32_MAX_DIM).
* otherwise -> ``tiled_d`` (bulk regime, and recall with large D): feature
  dims tiled, accumulator in global memory; BM = 64, or 16 for few queries.
* float32 operands at float32 accuracy (tf32x3), and weighted calls at
  either precision, take BM = 16 in either kernel: tf32x3 splits each
  operand in two, and the machine-code report saw 64-query blocks of them
  spill in every config (weighted ones at one tf32 product too).
* Bank splits: with P = L x ceil(B / BM) query-block programs, a GPU with S
  SMs holding R programs each (configs.RESIDENT_PER_SM: 1 for 64-query or
  float32 blocks, 4 for 16-bit blocks of fewer queries, from the
  machine-code report) is only filled when P >= R S.  Below that (the recall
  regime) the bank is cut into ceil(R S / P) ranges, never shorter than
  MIN_SPLIT_ROWS, and ``combine`` merges them: its workspace is splits x B x
  Dv floats, independent of N.  The layer regime (B = N = 16384: 256 blocks
  of 64 queries on 132 SMs) is not split.
* BN (and BK, BDV, warps, stages) are autotuned per shape key among the
  configs ``configs.py`` keeps for the device; under the interpreter a couple
  of configs are timed on the CPU.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from ..constants import MIN_SPLIT_ROWS, REGISTER_TILE_MAX_DIM
from . import configs
from .combine import combine_kernel
from .common import INTERPRET
from .interpreted_products import as_on_gpu
from .small_d import small_d_kernel
from .tiled_d import tiled_d_kernel


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(max(n, 1)))


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits, so the split path is exercised


def fp32_precision() -> str:
    """input_precision of every float32 tensor-core product (float32 inputs, and the weighted score
    products of 16-bit inputs): "tf32x3" (three tf32 products, float32 accuracy: docs/design.md §5's
    1e-5) unless torch was told that tf32 is good enough for float32 matmuls
    (``torch.set_float32_matmul_precision("high")``), then "tf32" (one product, 1e-3).  Plain
    "ieee" products run on the FMA pipe and spill registers in every config (the machine-code
    report, benchmarks/results/static/)."""
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def plan(L: int, B: int, N: int, D: int, Dv: int, device: torch.device, dtype: torch.dtype = torch.bfloat16,
         precision: Optional[str] = None, sm_count: Optional[int] = None, weighted: bool = False) -> dict:
    precision = precision or fp32_precision()
    # float32 operands: float32 inputs, and the weighted score products of any input
    fp32 = dtype == torch.float32 or weighted
    small = max(D, Dv) <= (configs.FP32_MAX_DIM if fp32 else REGISTER_TILE_MAX_DIM)
    if weighted or (fp32 and precision == "tf32x3"):
        # tf32x3 splits every float32 operand in two: 16-query blocks keep them in registers.  In the
        # D-tiled kernel too: the whole compile matrix (benchmarks/results/static/full/) found no
        # 64-query config of float32 or weighted operands free of spills on sm_80 at any width, nor a
        # weighted ℓ2 one on sm_90, while every 16-query launch had clean configs (PERFORMANCE.md §7.2).
        # Weighted launches at one tf32 product as well: at 64 queries 7 D-tiled launches kept no config
        # that compiles clean, nor 3 register-tile ones under triton 3.6 (weighted ℓ2 at D = 128;
        # static/full-tf32/, static/triton-3.6/full-tf32/, PERFORMANCE.md §7.4).  Weighted calls are
        # masked recall: few queries.
        bm = 16
    elif small:
        bm = 64 if B >= 64 else _pow2(B)
    else:
        bm = 64 if B >= 64 else 16
    programs = L * triton.cdiv(max(B, 1), bm)
    # Split while the query blocks cannot give every SM the programs it holds at once (configs.py,
    # from the machine-code report's occupancy): a split costs a workspace and the combine pass.
    resident = configs.RESIDENT_PER_SM["recall" if (bm < 64 and not fp32) else "layer"]
    want = triton.cdiv(resident * (sm_count or _sm_count(device)), programs)
    splits = max(1, min(want, triton.cdiv(max(N, 1), MIN_SPLIT_ROWS)))
    rows_per_split = triton.cdiv(max(N, 1), splits)
    splits = triton.cdiv(max(N, 1), rows_per_split)
    return dict(kernel="small_d" if small else "tiled_d", BM=bm, splits=splits, rows_per_split=rows_per_split,
                precision=precision)


def constexprs(p: dict, dtype: torch.dtype, sim_code: int, D: int, Dv: int, values_are_memory: bool,
               has_weights: bool, interpret: bool = INTERPRET) -> dict:
    """The compile-time arguments of the plan's kernel, as the launcher passes them (the machine-code
    report compiles the same ones: hen_kernels/bench/static_cases.py)."""
    cx = dict(SIM=sim_code, SPLIT=int(p["splits"] > 1), BM=p["BM"], HAS_WEIGHTS=has_weights,
              UPCAST=interpret and dtype == torch.bfloat16, PRECISION=p["precision"])
    if p["kernel"] == "small_d":
        cx.update(BD=_pow2(D), BDV=_pow2(Dv), VALUES_ARE_MEMORY=values_are_memory)
    return cx


def combine_constexprs(splits: int, Dv: int) -> dict:
    # (the split count itself is a run-time argument: one compile serves every bank size)
    return dict(BS=min(_pow2(splits, 2), configs.COMBINE_BS), BDV=configs.combine_bdv(Dv))


@as_on_gpu
def launch(q: torch.Tensor, x: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, sim_code: int,
           offset: int, weights: Optional[torch.Tensor] = None,
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (L, B, D), x (Lm, N, D), v (Lm, N, Dv), beta (L,) float32, weights (L, B, D) float32 or None
    -> (out, lse, top_score, top_index)."""
    L, B, D = q.shape
    N, Dv = x.shape[1], v.shape[2]
    # Keys = values: one load of each bank tile serves both products.
    values_are_memory = v.data_ptr() == x.data_ptr() and v.shape == x.shape and v.stride() == x.stride()
    q, x = q.contiguous(), x.contiguous()
    v = x if values_are_memory else v.contiguous()
    w = q if weights is None else weights.contiguous()  # an unread stand-in when unweighted
    beta = beta.contiguous()
    f32 = dict(dtype=torch.float32, device=q.device)
    out = torch.zeros((L, B, Dv), **f32)
    lse = torch.empty((L, B), **f32)
    top_s = torch.empty((L, B), **f32)
    top_i = torch.empty((L, B), dtype=torch.int64, device=q.device)
    if L == 0 or B == 0:
        return out, lse, top_s, top_i

    p = plan(L, B, N, D, Dv, q.device, q.dtype, weighted=weights is not None)
    S = p["splits"]
    if S == 1:
        acc, m, s, ts, ti = out, lse, lse, top_s, top_i
    else:
        acc = torch.zeros((L, S, B, Dv), **f32)
        m, s, ts = (torch.empty((L, S, B), **f32) for _ in range(3))
        ti = torch.empty((L, S, B), dtype=torch.int64, device=q.device)

    args = dict(
        B=B, N=N, D=D, DV=Dv, rows_per_split=p["rows_per_split"], offset=offset,
        q_lead=q.stride(0), q_row=q.stride(1),
        x_lead=x.stride(0) if x.shape[0] > 1 else 0, x_row=x.stride(1),
        v_lead=v.stride(0) if v.shape[0] > 1 else 0, v_row=v.stride(1),
        w_lead=w.stride(0), w_row=w.stride(1),
        **constexprs(p, q.dtype, sim_code, D, Dv, values_are_memory, weights is not None),
    )
    grid = (triton.cdiv(B, p["BM"]), S, L)
    kernel = small_d_kernel if p["kernel"] == "small_d" else tiled_d_kernel
    kernel[grid](q, x, v, w, beta, acc, m, s, ts, ti, **args)
    if S > 1:
        cx = combine_constexprs(S, Dv)
        combine_kernel[(L * B, triton.cdiv(Dv, cx["BDV"]))](acc, m, s, ts, ti, out, lse, top_s, top_i, B, Dv, S, **cx)
    return out, lse, top_s, top_i
