"""Choosing and launching the Triton kernels: the heuristic of docs/design.md §2's regimes.

* D and Dv <= REGISTER_TILE_MAX_DIM (256) -> ``small_d`` (layer regime): the
  query block, one bank tile and the accumulator fit in registers; BM = 64
  queries per program, or the next power of two >= 16 when there are fewer
  queries.
* otherwise -> ``tiled_d`` (bulk regime, and recall with large D): feature
  dims tiled, accumulator in global memory; BM = 64, or 16 for few queries.
* Bank splits: with P = L x ceil(B / BM) query-block programs, a GPU with S
  SMs is only filled when P >= 2 S.  Below that (the recall regime) the bank
  is cut into ceil(2 S / P) ranges, never shorter than MIN_SPLIT_ROWS,
  and ``combine`` merges them: its workspace is splits x B x Dv floats,
  independent of N.
* BN (and BK, BDV, warps, stages) are autotuned per shape key; under the
  interpreter a couple of configs are timed on the CPU.
"""
from __future__ import annotations

import torch
import triton

from ..constants import MIN_SPLIT_ROWS, REGISTER_TILE_MAX_DIM
from .combine import combine_kernel
from .common import INTERPRET
from .small_d import small_d_kernel
from .tiled_d import tiled_d_kernel


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(max(n, 1)))


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits, so the split path is exercised


def plan(L: int, B: int, N: int, D: int, Dv: int, device: torch.device) -> dict:
    small = D <= REGISTER_TILE_MAX_DIM and Dv <= REGISTER_TILE_MAX_DIM
    if small:
        bm = 64 if B >= 64 else _pow2(B)
    else:
        bm = 64 if B >= 64 else 16
    programs = L * triton.cdiv(max(B, 1), bm)
    want = triton.cdiv(2 * _sm_count(device), programs)
    splits = max(1, min(want, triton.cdiv(max(N, 1), MIN_SPLIT_ROWS)))
    rows_per_split = triton.cdiv(max(N, 1), splits)
    splits = triton.cdiv(max(N, 1), rows_per_split)
    return dict(kernel="small_d" if small else "tiled_d", BM=bm, splits=splits, rows_per_split=rows_per_split)


def launch(q: torch.Tensor, x: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, sim_code: int,
           offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (L, B, D), x (Lm, N, D), v (Lm, N, Dv), beta (L,) float32 -> (out, lse, top_score, top_index)."""
    L, B, D = q.shape
    N, Dv = x.shape[1], v.shape[2]
    # Keys = values: one load of each bank tile serves both products.
    values_are_memory = v.data_ptr() == x.data_ptr() and v.shape == x.shape and v.stride() == x.stride()
    q, x = q.contiguous(), x.contiguous()
    v = x if values_are_memory else v.contiguous()
    beta = beta.contiguous()
    f32 = dict(dtype=torch.float32, device=q.device)
    out = torch.zeros((L, B, Dv), **f32)
    lse = torch.empty((L, B), **f32)
    top_s = torch.empty((L, B), **f32)
    top_i = torch.empty((L, B), dtype=torch.int64, device=q.device)
    if L == 0 or B == 0:
        return out, lse, top_s, top_i

    p = plan(L, B, N, D, Dv, q.device)
    S = p["splits"]
    if S == 1:
        acc, m, s, ts, ti = out, lse, lse, top_s, top_i
    else:
        acc = torch.zeros((L, S, B, Dv), **f32)
        m, s, ts = (torch.empty((L, S, B), **f32) for _ in range(3))
        ti = torch.empty((L, S, B), dtype=torch.int64, device=q.device)

    common = dict(
        B=B, N=N, D=D, DV=Dv, rows_per_split=p["rows_per_split"], offset=offset,
        q_lead=q.stride(0), q_row=q.stride(1),
        x_lead=x.stride(0) if x.shape[0] > 1 else 0, x_row=x.stride(1),
        v_lead=v.stride(0) if v.shape[0] > 1 else 0, v_row=v.stride(1),
        SIM=sim_code, SPLITS=S, BM=p["BM"],
        UPCAST=INTERPRET and q.dtype == torch.bfloat16,
        PRECISION="ieee" if q.dtype == torch.float32 or INTERPRET else "tf32",
    )
    grid = (triton.cdiv(B, p["BM"]), S, L)
    if p["kernel"] == "small_d":
        small_d_kernel[grid](q, x, v, beta, acc, m, s, ts, ti, BD=_pow2(D), BDV=_pow2(Dv),
                             VALUES_ARE_MEMORY=values_are_memory, **common)
    else:
        tiled_d_kernel[grid](q, x, v, beta, acc, m, s, ts, ti, **common)
    if S > 1:
        bdv = min(_pow2(Dv), 1024)
        combine_kernel[(L * B, triton.cdiv(Dv, bdv))](acc, m, s, ts, ti, out, lse, top_s, top_i, B, Dv,
                                                     SPLITS=S, BS=_pow2(S, 2), BDV=bdv)
    return out, lse, top_s, top_i
