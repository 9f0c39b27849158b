"""The autotune configs of every Triton kernel and the rules that keep only those a GPU runs well.

A config is kept for a launch when its tiles fit the target: the shared
memory it asks for stays within the architecture's per-block limit, and the
registers it needs stay within 255 per thread, so nothing spills to local
memory.  The rules are estimates in the kernels' own terms (tile elements
per thread, pipelined tile bytes); the machine-code report
(``python -m hen_kernels.bench static``, benchmarks/results/static/) compiles
the configs they keep for sm_80 and sm_90 and tests/test_static.py asserts
that none spills or exceeds shared memory, and that the rules drop the ones
the report saw fail.  The autotuner prunes with them at run time
(``prune_*``), from the launch's arguments and the device's capability.

The rules cannot foresee every spill: where a kernel needs a little over 128
registers at 8 warps (or 96-128 at 4), ptxas may hold it to 128 for one more
block per SM and spill a few bytes instead.  The report tells these trades from
shortage by compiling such a config again with ``.maxnreg 255``
(bench/static_spill.py): the trades stay, since which runs faster is
for a GPU to say.  The rules are drawn on the whole matrix (benchmarks/results/static/full/ and
full-backward/, every config of every launch, pruned ones included; full-tf32/ the kept ones at one tf32
product): every launch keeps configs that
compile clean, and the few kept configs of the forward kernels that still spill are listed in
benchmarks/PERFORMANCE.md §7.2 (the backward's none, §7.3; tests/test_static.py holds the rules to them).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import triton

from ..constants import AUTOTUNE_ENV, AUTOTUNE_MODES
from .common import INTERPRET

# Per-architecture limits (CUDA occupancy calculator terms): registers, shared memory per SM and the
# most one block may opt in to (bytes), threads and blocks per SM.
ARCHS: Dict[int, dict] = {
    80: dict(name="A100", regs=65536, smem_sm=167936, smem_block=166912, threads=2048, blocks=32),
    90: dict(name="H100", regs=65536, smem_sm=233472, smem_block=232448, threads=2048, blocks=32),
}
RESERVED_SMEM = 1024  # per block, taken by the driver on sm_80 and later
MAX_REGISTERS = 255  # per thread, sm_80 and sm_90

# float32 inputs: the register tile kernels serve D, Dv up to this (their float32 operands take twice the
# registers of 16-bit ones; at 256 every config spilled in the report), the D-tiled kernel beyond.
FP32_MAX_DIM = 128

# The fused backward serves D, Dv up to this: at 256 no dq config stays within the register budget below
# (the report saw 324-4268 B spilled there), so wider calls take the streaming backward.
BACKWARD_MAX_DIM = 128
# ... and float32 inputs at tf32x3 (launch.fp32_precision's default) up to this: dkv keeps its bank rows'
# tiles in registers across the query loop, and with each operand split in two for three tf32 products
# every config of 6 of its 8 launches at 128 spilled (the least demanding left 40-176 B with all 255
# registers; at one tf32 product they take 78-184: PERFORMANCE.md §7.3).
BACKWARD_TF32X3_MAX_DIM = 64

# Resident programs per SM the launch plan counts on (launch.plan splits the bank until the GPU holds
# that many per SM): the fewest the report shows among the configs kept for each kind of launch.
# 64-query blocks and float32 ones (16 queries at tf32x3) keep configs of up to 255 registers per thread:
# one block of 8 warps (two of 4) per SM.  16-bit blocks of fewer queries (recall) are counted at four.
RESIDENT_PER_SM = {"layer": 1, "recall": 4}

# combine: splits walked BS at a time, output slices of at most BDV columns (BS x BDV floats per program).
COMBINE_BS = 16
COMBINE_BDV = 256


def _cfg(num_warps, num_stages, **kw):
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


# The GPU's lists, and the interpreter's (one or two each: an interpreted launch costs seconds; the GPU's tile
# shapes are run under the interpreter by tests/test_triton.py::test_each_gpu_tile_shape_under_the_interpreter).
GPU_SMALL_D: List[triton.Config] = [_cfg(w, s, BN=bn) for bn in (16, 32, 64, 128) for w in (4, 8) for s in (2, 3, 4)]
# wider bank tiles with more warps: the accumulator's round trip through global memory shrinks as 1 / BN
GPU_TILED_D: List[triton.Config] = [_cfg(w, s, BN=bn, BK=bk, BDV=bdv) for bn, w in ((32, 4), (64, 8), (128, 8))
                                    for bk in (32, 64) for bdv in (64, 128) for s in (2, 3)]
GPU_BACKWARD: List[triton.Config] = [_cfg(w, s, BM=bm, BN=bn) for bm in (16, 32) for bn in (16, 32, 64)
                                     for w in (4, 8) for s in (1, 2)]
SMALL_D = [_cfg(4, 1, BN=16), _cfg(4, 1, BN=32)] if INTERPRET else GPU_SMALL_D
TILED_D = [_cfg(4, 1, BN=16, BK=32, BDV=32)] if INTERPRET else GPU_TILED_D
BACKWARD = [_cfg(4, 1, BM=16, BN=16)] if INTERPRET else GPU_BACKWARD


def combine_bdv(dv: int) -> int:
    return min(COMBINE_BDV, max(16, triton.next_power_of_2(max(dv, 1))))


def _rows_per_warp(m: int, warps: int) -> int:
    """Rows of an M x K tensor-core operand each warp holds: warps tile M in 16-row steps first, and a block
    of 16 rows is held whole by every warp (so its registers do not shrink with more warps)."""
    return m // min(warps, max(1, m // 16))


def _smem_rule(arch: int, smem: float) -> Optional[str]:
    if smem + RESERVED_SMEM > ARCHS[arch]["smem_block"]:
        return f"shared memory ~{int(smem) // 1024} KiB > {ARCHS[arch]['smem_block'] // 1024} KiB"
    return None


# The rules below estimate the float32 words per thread a config keeps live: the accumulator, the score
# tile and its exponentials, the tensor-core A operands (in registers, split in two for tf32x3), the
# bank tile's float32 copy for ‖x‖².  The limits are where the whole compile matrix
# (benchmarks/results/static/full/) saw ptxas start to spill at 255 registers; configs above them are
# kept from the autotuner.  ptxas is not linear in these terms: the named rules after each estimate drop
# what the matrix saw spill below it.
SMALL_D_WORDS = 200
TILED_D_WORDS = 270
DQ_WORDS = 210
DKV_WORDS = 150


def small_d_rule(cfg: triton.Config, arch: int, elt: int, BM: int, BD: int, BDV: int, VAM: bool,
                 has_weights: bool, precision: str, sim: int) -> Optional[str]:
    bn, warps, stages = cfg.kwargs["BN"], cfg.num_warps, cfg.num_stages
    threads = 32 * warps
    fp32_ops = elt == 4 or has_weights  # the score product's operands are float32
    split = 2 if (fp32_ops and precision == "tf32x3") else 1
    smem = (stages * bn * (BD + (0 if VAM else BDV)) * elt + BM * BD * (4 if fp32_ops else elt)
            + (2 * bn * BD * 4 if has_weights else 0))
    why = _smem_rule(arch, smem)
    if why:
        return why
    rows = _rows_per_warp(BM, warps)
    # ℓ2 forms: the squared distance and the norms' sum beside the score tile, and the bank tile in float32
    tiles = 3 + (2 if sim != 0 else 0)
    words = (rows * BD * (4 if fp32_ops else elt) / 4 / 32 * split + rows * bn * elt / 4 / 32 * split
             + (BM * BDV + tiles * BM * bn + (bn * BD if sim != 0 else 0)) / threads)
    if words > SMALL_D_WORDS:
        return f"~{int(words)} registers of tiles per thread > {SMALL_D_WORDS}"
    # The limits below are where the whole compile matrix (benchmarks/results/static/full/) saw configs the
    # estimate keeps run out of registers (PERFORMANCE.md §7.2).
    if not fp32_ops and BM == 64 and BD >= 256 and warps < 8:
        return "64 queries of 16 bits at D >= 256: 8 warps (4 spilled in the compile matrix)"
    if not fp32_ops and sim != 0 and BM == 64 and BD >= 128 and bn > 32:
        return "16-bit ℓ2 forms, 64 queries at D >= 128: BN <= 32"
    if fp32_ops and bn > 64:
        return "float32 operands: BN <= 64"
    if has_weights and sim != 0 and bn > 32:
        return "weighted ℓ2 forms: BN <= 32"
    # Weighted products hold w, w∘q and the bank tile in float32 besides the usual tiles: a bank tile stays
    # within 2048 elements, and at D >= 128 the ℓ2 forms need 8 warps to share them.  At D <= 64 both warp
    # counts stay: on sm_90 ptxas trades some launches of either down to 128 registers with spills in the bank
    # loop, and each launch keeps clean configs of one or the other (PERFORMANCE.md §7.2).
    if has_weights and bn * BD > 2048:
        return "weighted: BN x BD <= 2048"
    if has_weights and sim != 0 and BD >= 128 and warps < 8:
        return "weighted ℓ2 forms at D >= 128: 8 warps"
    # At BN x BD = 2048 the weighted kernel sits at 255 registers: with the value product's weights put
    # back on their exact sum (common.stored_weights) the report saw 3 stages spill 8 B on sm_80.
    if has_weights and arch == 80 and stages == 3 and bn * BD >= 2048:
        return "weighted, sm_80, 3 stages: spilled in the report"
    # ~192 words of the 200 here: triton 3.6's ptxas (the GPU's) spilled 112 B on sm_90 (BN 32, 8 warps, 2 stages;
    # 3.8 none, and 3.6 none before the kernel's later changes: the report's MUFU column gained reciprocals).
    if arch == 90 and sim != 0 and not fp32_ops and BM == 64 and BD >= 256 and bn >= 32:
        return "sm_90, 16-bit ℓ2 forms, 64 queries at D >= 256: BN 32 spilled under triton 3.6 in the report"
    # One tf32 product (torch's "high"; static/full-tf32/) keeps float32 operands in 64-query blocks:
    if fp32_ops and split == 1 and sim != 0 and BM == 64 and bn > 32:
        return "float32 operands, ℓ2 forms, 64 queries at one tf32 product: BN <= 32"
    return None


def tiled_d_rule(cfg: triton.Config, arch: int, elt: int, BM: int, has_weights: bool, precision: str,
                 sim: int) -> Optional[str]:
    bn, bk, bdv, warps, stages = cfg.kwargs["BN"], cfg.kwargs["BK"], cfg.kwargs["BDV"], cfg.num_warps, cfg.num_stages
    threads = 32 * warps
    fp32_ops = elt == 4 or has_weights
    split = 2 if (fp32_ops and precision == "tf32x3") else 1
    why = _smem_rule(arch, stages * (BM * bk + bn * bk) * (4 if fp32_ops else elt) + bn * bdv * elt)
    if why:
        return why
    # Tiles spread over the block (the score tile, its exponentials and probabilities; for the ℓ2 forms the
    # norms' sum, d² and the recompute's tile, and for weighted ℓ2 the ⟨w, x∘x⟩ accumulator; the accumulator
    # slice read, rescaled and written; the bank and value operands) and the tensor-core A operands that
    # every warp holds whole for its query rows (the BK slice of w∘q, and of w for weighted ℓ2; the softmax
    # weights for the value product, split in two for a float32 bank at tf32x3).
    weighted_l2 = has_weights and sim != 0
    elt_ops = 4 if fp32_ops else elt
    split_v = 2 if (elt == 4 and precision == "tf32x3") else 1
    rows = _rows_per_warp(BM, warps)
    a_operands = (rows * bk * split * elt_ops * (2 if weighted_l2 else 1) + rows * bn * split_v * elt) / 4 / 32
    tiles = 3 + (3 if sim != 0 else 0) + (1 if weighted_l2 else 0)
    spread = (BM * bn * tiles + 3 * BM * bdv + bn * bk * split * elt_ops / 4 * (2 if weighted_l2 else 1)
              + bn * bdv * split_v * elt / 4) / threads
    words = a_operands + spread
    if words > TILED_D_WORDS:
        return f"~{int(words)} registers of tiles per thread > {TILED_D_WORDS}"
    # Where the whole compile matrix (benchmarks/results/static/full/) saw configs the estimate keeps spill
    # (PERFORMANCE.md §7.2):
    if has_weights and elt == 2 and stages > 2:
        return "weighted 16-bit inputs: 2 stages (3 spilled in the compile matrix)"
    if weighted_l2 and bn > 64:
        return "weighted ℓ2 forms: BN <= 64"
    if arch == 80 and elt == 2 and sim != 0 and BM == 64 and (warps < 8 or bdv > 64):
        return "sm_80, 16-bit ℓ2 forms, 64 queries: 8 warps and BDV 64"
    # ptxas's trades: it held these to 128-168 registers for more blocks per SM and spilled inside the bank
    # loop (float32 operands on 4 warps also ran out of all 255 for weighted ℓ2).
    if fp32_ops and warps < 8:
        return "float32 operands: 8 warps (on 4 ptxas held 128-168 registers and spilled in the bank loop)"
    if (elt == 2 or split == 1) and sim != 0 and BM == 16 and stages == 3:
        return ("16-bit inputs or one tf32 product, ℓ2 forms, 16 queries at 3 stages: ptxas held 128 registers and "
                "spilled in the bank loop")
    if arch == 90 and fp32_ops and split == 1 and BM == 16 and bn * bdv > 8192:
        return ("sm_90, float32 operands at one tf32 product, 16 queries: BN x BDV <= 8192 (ptxas held 128 registers "
                "and spilled in the bank loop)")
    return None


def backward_rule(cfg: triton.Config, arch: int, elt: int, BD: int, BDV: int, VAM: bool, precision: str,
                  kernel: str = "dq", sim: int = 0) -> Optional[str]:
    bm, bn, warps, stages = cfg.kwargs["BM"], cfg.kwargs["BN"], cfg.num_warps, cfg.num_stages
    threads = 32 * warps
    split = 2 if (elt == 4 and precision == "tf32x3") else 1
    e = elt / 4
    why = _smem_rule(arch, max(1, stages) * (bm + bn) * (BD + BDV) * elt)
    if why:
        return why
    if kernel == "dq":
        if elt == 2 and bm == 16 and BD >= 128:
            return "dq: 16-query blocks of 16 bits at D >= 128 got an 8-32 B stack frame from triton 3.6's ptxas (the GPU's)"
        if bm == 32 and warps == 4 and BD >= 128:
            return ("dq: 32-query blocks on 4 warps at D >= 128 spill 8-16 B under triton 3.6 since each query's top "
                    "row leaves the products (248-255 registers before)")
        words = ((bm * BD + bm * BDV + bm * BD * e + 4 * bm * bn) / threads
                 + _rows_per_warp(bm, warps) * (BD + BDV + bn) * e / 32 * split)
        limit = DQ_WORDS
    else:
        words = ((bn * (BD + BDV) + bn * BD * e + bm * BDV + bm * BD * e + 4 * bm * bn) / threads
                 + (_rows_per_warp(bn, warps) * bm * e * 2 + _rows_per_warp(bm, warps) * BD * e) / 32 * split)
        limit = DKV_WORDS
    if words > limit:
        return f"~{int(words)} registers of tiles per thread > {limit}"
    # Where the backward's whole compile matrix (benchmarks/results/static/full-backward/) saw configs the
    # estimate keeps spill (PERFORMANCE.md §7.3): the ℓ2 forms' extra tiles (d², the heaviest row's mask and
    # its G, the centred operand) and tf32x3's split operands outgrow it on the (BM, BN) tile, at every D.
    if kernel == "dq":
        if elt == 2 and sim != 0 and bm * bn > 1024:
            return "dq, 16-bit ℓ2 forms: BM x BN <= 1024"
        if elt == 4 and sim != 0 and bm > 16:
            return "dq, float32 ℓ2 forms: 16-query blocks"
        if split == 2 and bm * bn > 512:
            return "dq, float32 at tf32x3: BM x BN <= 512"
    else:
        # dkv holds its bank rows' tiles and both accumulators while it walks the queries
        if (split == 2 or sim != 0) and (bm > 16 or bn > 32):
            return "dkv, float32 at tf32x3 or ℓ2 forms: 16-query blocks and BN <= 32"
        if split == 2 and sim != 0 and BD <= 32 and bn > 16:
            return "dkv, float32 ℓ2 forms at tf32x3, D <= 32: BN 16 (BN 32 spilled there, not at 64)"
    return None


# ---- run-time pruning --------------------------------------------------------------------------

def _arch(t) -> int:
    import torch

    major, minor = torch.cuda.get_device_capability(t.device)
    return 90 if major >= 9 else 80


def autotune_mode() -> str:
    """constants.AUTOTUNE_ENV's mode: a GPU's first call of each launch key compiles and times every config
    the rules keep (up to 24, ~1-3 s of ptxas each), or runs the first untimed."""
    mode = os.environ.get(AUTOTUNE_ENV, "all")
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"{AUTOTUNE_ENV}: expected one of {', '.join(AUTOTUNE_MODES)}, got {mode!r}")
    return mode


def runnable(configs, reasons) -> list:
    """The reasons with the least demanding config's cleared when every config has one: the autotuner is
    never left empty-handed, and that config still runs (slowly).  The machine-code report marks kept
    configs by this too."""
    if all(r is not None for r in reasons):
        least = min(configs, key=lambda c: (sum(c.kwargs.values()), c.num_stages, -c.num_warps))
        return [None if c is least else r for c, r in zip(configs, reasons)]
    return list(reasons)


def _keep(configs, reasons) -> List[triton.Config]:
    kept = [c for c, r in zip(configs, runnable(configs, reasons)) if r is None]
    return kept[:1] if autotune_mode() == "first" else kept


def prune_small_d(configs, named_args, **kw) -> List[triton.Config]:
    q = named_args["q_ptr"]
    elt, arch = q.element_size(), _arch(q)
    return _keep(configs, [small_d_rule(c, arch, elt, kw["BM"], kw["BD"], kw["BDV"], kw["VALUES_ARE_MEMORY"],
                                        kw["HAS_WEIGHTS"], kw["PRECISION"], kw["SIM"]) for c in configs])


def prune_tiled_d(configs, named_args, **kw) -> List[triton.Config]:
    q = named_args["q_ptr"]
    elt, arch = q.element_size(), _arch(q)
    return _keep(configs, [tiled_d_rule(c, arch, elt, kw["BM"], kw["HAS_WEIGHTS"], kw["PRECISION"], kw["SIM"])
                           for c in configs])


def prune_backward(configs, named_args, **kw) -> List[triton.Config]:
    q = named_args["q_ptr"]
    elt, arch = q.element_size(), _arch(q)
    kernel = "dkv" if "SHARED" in kw else "dq"
    return _keep(configs, [backward_rule(c, arch, elt, kw["BD"], kw["BDV"], kw["VALUES_ARE_MEMORY"], kw["PRECISION"],
                                         kernel, kw["SIM"]) for c in configs])
