"""What the machine-code report compiles: each Triton kernel with the arguments its launcher passes for the
docs/design.md §6 shapes (from ``launch.plan`` at the GPU's SM count), for every autotune config and
the dtypes, similarities, values and weights choices, in three sizes:

* ``smoke``: one case per kernel;
* ``rep``: the representative set of the default test run (every config the autotuner may pick at
  the layer headline shape, the other dtypes, similarities, weights, values and widths at one
  config, the recall, bulk, combine and backward plans): about 70 compiles per architecture;
* ``full``: every kept config x dtype x similarity x values x weights x width (16 to 256) x query
  block, the D-tiled, combine and backward kernels likewise (``make bench``, and tests marked slow);
* ``full-tf32``: the forward launches of ``full`` with float32 operands (float32 inputs, weighted
  scores) at one tf32 product, torch's "high" float32 matmul precision (``full`` compiles tf32x3).

``--with-pruned`` adds the configs configs.py keeps from the autotuner, so the report shows why.
"""
from __future__ import annotations

import itertools
from typing import Iterable, List, Optional

import torch
import triton

from ..constants import SIMILARITY_CODES
from ..triton import backward, configs
from ..triton.launch import combine_constexprs, constexprs, plan
from ..triton.combine import combine_kernel
from ..triton.small_d import small_d_kernel
from ..triton.tiled_d import tiled_d_kernel
from .static_compile import Case

SM_COUNT = {80: 108, 90: 132}  # A100 SXM, H100 SXM
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
SUBSETS = ("smoke", "rep", "full", "full-tf32")


def _config_label(cfg: triton.Config) -> dict:
    return dict(cfg.kwargs)


def forward_cases(arch: int, dt: str, sim: str, B: int, N: int, D: int, Dv: int, vam: bool, weights: bool,
                  regime: str, configs_wanted: Optional[Iterable[int]] = None, with_pruned: bool = False,
                  L: int = 1, precision: Optional[str] = None, sm_count: Optional[int] = None) -> List[Case]:
    """The main kernel of the plan for this shape (small_d or tiled_d), one case per config."""
    dtype = DTYPES[dt]
    precision = precision or "tf32x3"
    p = plan(L, B, N, D, Dv, torch.device("cuda"), dtype, precision, sm_count=sm_count or SM_COUNT[arch],
             weighted=weights)
    if vam:
        Dv = D
    cx = constexprs(p, dtype, SIMILARITY_CODES[sim], D, Dv, vam, weights, interpret=False)
    elt = torch.empty((), dtype=dtype).element_size()
    args = dict(q_ptr=PTR[dt], x_ptr=PTR[dt], v_ptr=PTR[dt], w_ptr="*fp32" if weights else PTR[dt], beta_ptr="*fp32",
                B=B, N=N, D=D, DV=Dv, rows_per_split=p["rows_per_split"], offset=0,
                q_lead=B * D, q_row=D, x_lead=0, x_row=D, v_lead=0, v_row=Dv, w_lead=B * D, w_row=D)
    if p["kernel"] == "small_d":
        kernel = small_d_kernel
        args.update(out_ptr="*fp32", m_ptr="*fp32", l_ptr="*fp32", top_s_ptr="*fp32", top_i_ptr="*i64")
    else:
        kernel = tiled_d_kernel
        args.update(acc_ptr="*fp32", m_ptr="*fp32", l_ptr="*fp32", top_s_ptr="*fp32", top_i_ptr="*i64")
    if p["kernel"] == "small_d":
        reasons = [configs.small_d_rule(cfg, arch, elt, p["BM"], cx["BD"], cx["BDV"], vam, weights, precision,
                                        SIMILARITY_CODES[sim]) for cfg in kernel.configs]
    else:
        reasons = [configs.tiled_d_rule(cfg, arch, elt, p["BM"], weights, precision, SIMILARITY_CODES[sim])
                   for cfg in kernel.configs]
    out = []
    for i, (cfg, why) in enumerate(zip(kernel.configs, configs.runnable(kernel.configs, reasons))):
        if configs_wanted is not None and i not in configs_wanted:
            continue
        bank_tile = (cfg.kwargs["BN"] * (cx["BD"] + (0 if vam else cx["BDV"])) * elt if p["kernel"] == "small_d"
                     else None)
        if why and not with_pruned:
            continue
        label = dict(regime=regime, dtype=dt, sim=sim, VAM=vam, W=weights, B=B, D=D, DV=Dv, BM=p["BM"],
                     SPLITS=p["splits"], PREC=precision if (dt == "fp32" or weights) else "-", **_config_label(cfg))
        out.append(Case(p["kernel"], kernel.fn, args, dict(cx, **cfg.kwargs), cfg.num_warps, cfg.num_stages,
                        label, pruned=why, expect={"bank_tile_bytes": bank_tile} if bank_tile else {}))
    return out


def combine_cases(arch: int, splits: int, Dv: int, regime: str) -> List[Case]:
    cx = combine_constexprs(splits, Dv)
    args = dict(acc_ptr="*fp32", m_ptr="*fp32", l_ptr="*fp32", ts_ptr="*fp32", ti_ptr="*i64", out_ptr="*fp32",
                lse_ptr="*fp32", top_s_ptr="*fp32", top_i_ptr="*i64", B=64, DV=Dv, n_splits=splits)
    # launch.py passes no num_warps / num_stages: the JIT defaults (4, 3).
    label = dict(regime=regime, dtype="fp32", D=Dv, DV=Dv, SPLITS=splits, BS=cx["BS"], BDV=cx["BDV"])
    return [Case("combine", combine_kernel, args, cx, 4, 3, label)]


def backward_cases(arch: int, which: str, dt: str, sim: str, B: int, N: int, D: int, vam: bool, regime: str,
                   configs_wanted: Optional[Iterable[int]] = None, with_pruned: bool = False,
                   L: int = 1, precision: str = "tf32x3") -> List[Case]:
    dtype = DTYPES[dt]
    Dv = D
    if not backward.serves(dtype, D, Dv, precision):
        return []
    cx = backward.constexprs(dtype, SIMILARITY_CODES[sim], D, Dv, vam, precision, interpret=False)
    elt = torch.empty((), dtype=dtype).element_size()
    kernel = backward.dq_kernel if which == "dq" else backward.dkv_kernel
    args = dict(q_ptr=PTR[dt], x_ptr=PTR[dt], v_ptr=PTR[dt], beta_ptr="*fp32", dout_ptr="*fp32", lse_ptr="*fp32",
                delta_ptr="*fp32", top_ptr="*i32", gap_ptr="*fp32", B=B, N=N, D=D, DV=Dv, rows_per_split=N if which == "dq" else B,
                q_lead=B * D, q_row=D, x_lead=0, x_row=D, v_lead=0, v_row=Dv)
    if which == "dq":
        args.update(dq_ptr="*fp32", dbeta_ptr="*fp32")
        extra = {}
    else:
        args.update(dx_ptr="*fp32", dv_ptr="*fp32", L=L)
        extra = dict(SHARED=L > 1)
    reasons = [configs.backward_rule(cfg, arch, elt, cx["BD"], cx["BDV"], vam, precision, which, cx["SIM"])
               for cfg in kernel.configs]
    out = []
    for i, (cfg, why) in enumerate(zip(kernel.configs, configs.runnable(kernel.configs, reasons))):
        if configs_wanted is not None and i not in configs_wanted:
            continue
        if why and not with_pruned:
            continue
        label = dict(regime=regime, dtype=dt, sim=sim, VAM=vam, W=False, B=B, D=D, DV=Dv,
                     PREC=precision if dt == "fp32" else "-", **_config_label(cfg))
        out.append(Case(which, kernel.fn, args, dict(cx, **extra, **cfg.kwargs), cfg.num_warps, cfg.num_stages,
                        label, pruned=why))
    return out


def _layer(arch, dt, sim, D, **kw):
    return forward_cases(arch, dt, sim, 16384, 16384, D, D, True, False, "layer", **kw)


def cases(subset: str, arch: int, with_pruned: bool = False) -> List[Case]:
    if subset not in SUBSETS:
        raise ValueError(f"subset: expected one of {SUBSETS}, got {subset!r}")
    wp = dict(with_pruned=with_pruned)
    recall_n = lambda d: 2**30 // (d * 2)  # noqa: E731  (a 1 GiB bf16 bank, docs/design.md §6)
    out: List[Case] = []
    if subset == "smoke":
        out += _layer(arch, "bf16", "l2", 128, configs_wanted=[9])
        out += forward_cases(arch, "bf16", "l2", 16, recall_n(1024), 1024, 1024, True, False, "recall",
                             configs_wanted=[0])
        out += combine_cases(arch, 2 * SM_COUNT[arch], 128, "recall")
        out += backward_cases(arch, "dq", "bf16", "l2", 4096, 4096, 128, True, "layer-bwd", configs_wanted=[0])
        out += backward_cases(arch, "dkv", "bf16", "l2", 4096, 4096, 128, True, "layer-bwd", configs_wanted=[0])
        return out
    if subset == "rep":
        # layer headline (bf16, keys = values, D = 128, l2): every BN x warps at 3 stages; dot at D = 64
        out += _layer(arch, "bf16", "l2", 128, configs_wanted=[1, 4, 7, 10, 13, 16, 19, 22], **wp)
        out += _layer(arch, "bf16", "dot", 64, configs_wanted=[7, 16], **wp)
        one = [9]  # BN 32, 8 warps, 2 stages
        for dt, sim in (("fp16", "l2sq"), ("fp32", "l2"), ("fp32", "dot")):
            out += _layer(arch, dt, sim, 128, configs_wanted=one, **wp)
        out += forward_cases(arch, "bf16", "l2", 16384, 16384, 256, 256, False, False, "layer Dv", configs_wanted=one,
                             **wp)
        for dt in ("bf16", "fp32"):  # HEN masked recall: weighted ℓ2, few queries
            out += forward_cases(arch, dt, "l2", 16, recall_n(128), 128, 128, True, True, "recall W",
                                 configs_wanted=[4], **wp)
        for B in (1, 64):
            out += forward_cases(arch, "bf16", "dot", B, recall_n(128), 128, 128, True, False, "recall",
                                 configs_wanted=one, **wp)
        for D, B in ((1024, 16), (4096, 64)):
            out += forward_cases(arch, "bf16", "l2", B, recall_n(D), D, D, True, False, "recall",
                                 configs_wanted=[0, 10], **wp)
        out += forward_cases(arch, "bf16", "l2", 16, recall_n(512), 512, 512, True, True, "recall W",
                             configs_wanted=[0], **wp)
        out += forward_cases(arch, "bf16", "dot", 4096, 2**20, 1024, 1024, True, False, "bulk",
                             configs_wanted=[0, 10, 18], **wp)
        for splits, Dv in ((2 * SM_COUNT[arch], 128), (8, 4096)):
            out += combine_cases(arch, splits, Dv, "recall")
        for which, picks in (("dq", [12, 14, 18, 0]), ("dkv", [0, 3, 6])):
            out += backward_cases(arch, which, "bf16", "l2", 4096, 4096, 128, True, "layer-bwd",
                                  configs_wanted=picks, **wp)
            out += backward_cases(arch, which, "fp32", "dot", 4096, 4096, 64, True, "layer-bwd",
                                  configs_wanted=picks[-1:], **wp)
        return out
    # full: every kept config for each combination the launcher can produce.  Widths by their power-of-two
    # class; l2sq compiles like l2 but for its last instructions, and fp16 like bf16 but for the MMA's
    # input type, so both appear at the widths the layer regime uses.
    sims = ("dot", "l2")
    tf32 = subset == "full-tf32"

    def forward(dt, sim, B, D, Dv, vam, w):
        if not tf32:
            return forward_cases(arch, dt, sim, B, 2**20, D, Dv, vam, w, "full", **wp)
        if dt == "fp32" or w:  # the launches whose products take float32 operands
            return forward_cases(arch, dt, sim, B, 2**20, D, Dv, vam, w, "full", precision="tf32", **wp)
        return []

    for dt, sim, vam, w, D, B in itertools.product(("bf16", "fp32"), sims, (True, False), (False, True),
                                                   (32, 64, 128, 256), (16, 16384)):
        out += forward(dt, sim, B, D, D if vam else max(16, D // 2), vam, w)
    for dt, sim, D in itertools.product(("fp16", "bf16"), ("l2sq",) + sims, (64, 128)):
        if dt == "fp16" or sim == "l2sq":
            out += forward(dt, sim, 16384, D, D, True, False)
    for dt, sim, w, B in itertools.product(("bf16", "fp32"), sims, (False, True), (16, 4096)):
        out += forward(dt, sim, B, 1024, 1024, True, w)
    if tf32:
        return out
    for splits, Dv in itertools.product((2, 8, 2 * SM_COUNT[arch], 1024), (16, 128, 1024, 4096)):
        out += combine_cases(arch, splits, Dv, "full")
    for which, dt, sim, vam, D in itertools.product(("dq", "dkv"), ("bf16", "fp32"), sims, (True, False),
                                                    (32, 64, 128, 256)):
        # float32 past BACKWARD_TF32X3_MAX_DIM: served at one tf32 product only
        precision = "tf32x3" if backward.serves(DTYPES[dt], D, D, "tf32x3") else "tf32"
        out += backward_cases(arch, which, dt, sim, 4096, 4096, D, vam, "full", precision=precision, **wp)
    return out
