"""The constants that the dispatch, the kernels and the checks must agree on, each defined once.

A leaf module: it imports nothing from the package, so the dispatch, the
Triton kernels, the checks and the tests can all import it without a cycle.
"""
import torch

# The similarities of docs/design.md §1, in the order of their integer codes.
SIMILARITIES = ("dot", "l2", "l2sq")

# The codes the kernels take: csrc's enum hen::Similarity and the SIM constexpr of the Triton kernels.
SIMILARITY_CODES = {"dot": 0, "l2": 1, "l2sq": 2}

# Largest D and Dv the register-tile Triton kernels serve (the small_d forward and the fused
# backward): the query block, one bank tile and the accumulator must fit in registers.  It is
# also the head dimension where fast attention kernels stop (docs/design.md §1).
REGISTER_TILE_MAX_DIM = 256

# Shortest range of rows the Triton launcher gives one program when it splits a walked range
# (the bank, or the queries in the backward) to fill the GPU: 4 tiles of 128 rows, so every
# program still walks several tiles.
MIN_SPLIT_ROWS = 4 * 128

# How the Triton kernels pick a config on a GPU (hen_kernels/triton/configs.py): "all" compiles and times
# every config the rules keep, once per launch key; "first" runs the first one untimed (`hen check` and the
# test suite, where compiling them all first took minutes on the H200).
AUTOTUNE_ENV = "HEN_TRITON_AUTOTUNE"
AUTOTUNE_MODES = ("all", "first")

# docs/design.md §5.1: where the expanded ℓ2 form |q|² + |x|² - 2 q·x falls below this
# fraction of |q|² + |x|², it may have lost more than a few bits to cancellation, and the
# kernels recompute d² directly as Σ w (q - x)².  csrc/hopfield_params.h kL2DirectBelow
# holds the same number (tests/test_layout.py ties the two).
L2_DIRECT_BELOW = 1.0 / 16.0

# docs/design.md §4: the smallest beta applied in float32 (every kernel; the reference but for float64
# inputs).  A similarity past the float32 range is scored -inf (no weight): the right answer while
# beta x FLOAT32_MAX is far past float32's logit rounding, 2^-24 |t| (§5); below ~1e-31 such a row
# could have carried weight, and below float32's smallest normal beta is 0 there.  csrc/
# hopfield_params.h kFloat32MinBeta holds the same number (tests/test_layout.py ties the two).
FLOAT32_MIN_BETA = 1e-30

# docs/design.md §5: the largest ‖out - ref‖ / ‖ref‖ against a float64 reference, per input
# dtype.  The tests (tests/conftest.py) and `hen check` (hen_kernels/check/) both read it here.
# float64 is computed in float64 throughout (reference and streaming paths), so it is held to
# a few float64 roundings amplified by the softmax, not to a float32 budget.
TOLERANCE = {
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
    torch.float64: 1e-12,
}
# docs/design.md §5: float32's own floor where the logits t = beta·sim are large.  Each of the few
# float32 operations that form a logit (sim's sum, the square root of "l2", the product with beta)
# rounds it by up to 2^-24 |t|, and the softmax weights move by the logits' absolute errors: rounding
# the exact logits once to float32 moves the output by 5e-6 at |t| ~ 380 ("l2", 5 x 300 x 4096,
# beta 4), every backend's float32 included.  So float32's bound is the larger of 1e-5 and
# FLOAT32_LOGIT_ROUNDINGS x 2^-24 x |t| (above |t| ~ 84), |t| read off the reference's lse.
FLOAT32_LOGIT_ROUNDINGS = 2


def output_tolerance(dtype: torch.dtype, lse: torch.Tensor) -> float:
    """TOLERANCE[dtype], or for float32 the logits' rounding floor when that is larger; ``lse``: the
    reference's (|lse| is within log N of the largest logit that carries weight)."""
    finite = lse[torch.isfinite(lse)]
    if dtype != torch.float32 or finite.numel() == 0:
        return TOLERANCE[dtype]
    return max(TOLERANCE[dtype], FLOAT32_LOGIT_ROUNDINGS * 2.0**-24 * float(finite.abs().max()))


# The fused backward's gradients against float64 autograd through the reference: a longer chain
# than the forward (two more products, the softmax Jacobian), so a few times its budget
# (tests/test_autograd.py, `hen check`).
GRAD_TOLERANCE = {dt: 4 * tol for dt, tol in TOLERANCE.items()}

# docs/design.md §5.1: a 16-bit bank's output against float64 as a fraction of the spread of its
# rows, for rows far from the origin (16 +- 0.25 per feature) and soft weights.  bfloat16: a convex
# combination of the rows keeps 3x within it; normalised by the softmax's own sum instead of the sum
# of the rounded weights, the CPU kernel missed it 4x.  float16 rounds weights to 2^-12, near
# float32's own accumulation error on such rows (up to 4.5e-4 of the spread, the reference backend
# included): its bound is that floor with a 2x margin, which catches a gross error but not the
# 2^-12 scaling (the CUDA emulator's convex-mma-f16 case does).  The tests (tests/test_kernels.py)
# and `hen check` read it here.
CONVEX_BOUND = {
    torch.float16: 1e-3,
    torch.bfloat16: 2e-3,
}

# The dtypes the kernels take (the float32-accumulating ones); float64 is served by the
# reference alone (docs/design.md §4).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
