"""The CPU kernel's own paths (csrc/cpu/): every product engine and instruction set against float64,
and the numerics of docs/design.md §5.1 (ℓ2 near stored patterns, ties, weights) in the tiles.

tests/test_kernels.py holds the automatic choice to the reference; here
``hen_kernels::partial_with_plan_hints`` forces each path on this one machine:
the brgemm microkernels (16-bit on AMX / AVX-512 BF16 where the CPU has them),
the hand-written products (bfloat16 widened to float32, and on AVX-512 BF16's pair
dot product where the CPU has it; the scores as dot products or with the bank tile turned,
lane_scores), and the AVX-512, AVX2 and baseline copies of the tile kernel.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import hen_kernels as hk
from hen_kernels import backends, backward_cpu, reference

from .conftest import SIMILARITIES, TOLERANCE, make, rel_err, require


@pytest.fixture(autouse=True)
def _cpu_backend():
    require("cpu")


def info():
    return dict(item.split("=") for item in torch.ops.hen_kernels.cpu_info().split())


ISAS = {"avx512": 3, "avx2": 2, "baseline": 1}


def kernels(full_only=False):
    """Plan-hint strings for the paths this machine can run: the planner's mix (hand-written
    products for few queries, microkernels beyond), and each kind of product forced, on
    the best instruction set; with ``full_only=False`` also on every lower one."""
    if backends.BACKENDS["cpu"].unavailable_reason is not None:
        return ["auto"]  # every test skips, saying why
    best = info()["cpu_isa"]
    # lanes: the hand-written products with the scores of lane_scores (the bank tile turned)
    gemms = ["auto", "brgemm", "hand", "lanes"] if info()["gemm"] == "brgemm" else ["hand", "lanes"]
    if info().get("bf16_pairs") == "1":  # bfloat16 on AVX-512 BF16's pair dot product
        gemms.append("pairs")
    paths = [f"{g}:{best}" for g in gemms]
    if not full_only:
        paths += [f"{g}:{isa}" for g in gemms for isa, level in ISAS.items() if level < ISAS[best]]
    return paths


def skip_unless_it_runs(kernel, dtype):
    """Forced pairs on another dtype or a lower isa are refused (test_forced_pairs_run_or_are_refused)."""
    if kernel.startswith("pairs") and (dtype != torch.bfloat16 or kernel.split(":")[-1] != "avx512"):
        pytest.skip("the pair dot product takes a bfloat16 bank at isa avx512")


def hinted(q, x, beta, sim, kernel, values=None, weights=None, offset=0, query_block=0, splits=0):
    """One Partial through the op with the planner's choices forced; q (B, D), x (N, D)."""
    skip_unless_it_runs(kernel, x.dtype)
    v = x if values is None else values
    w = None if weights is None else weights[None]
    out, lse, ts, ti = torch.ops.hen_kernels.partial_with_plan_hints(
        q[None], x[None], v[None], torch.tensor([float(beta)]), hk.constants.SIMILARITY_CODES[sim], offset, w,
        kernel, query_block, splits)
    return hk.Partial(out[0], lse[0], ts[0], ti[0])


def ref64(q, x, beta, sim, values=None, weights=None, offset=0):
    v = None if values is None else values.double()
    return reference.partial(q.double(), x.double(), beta, sim, v, offset, weights)


def direct64(q, x, beta, sim):
    """The Partial from sum_d (x_d - q_d)² taken term by term in float64 (B x N x D: small cases):
    exact at zero distance, where even the reference's float64 expansion leaves ~1e-8 under the root."""
    q, x = q.double(), x.double()
    d2 = ((x.unsqueeze(0) - q.unsqueeze(1)) ** 2).sum(-1)
    t = beta * (-d2.sqrt() if sim == "l2" else -0.5 * d2)
    lse = torch.logsumexp(t, -1)
    top_score, top_index = t.max(-1)
    return hk.Partial(torch.exp(t - lse[:, None]) @ x, lse, top_score, top_index)


def check(p, ref, dtype):
    tol = TOLERANCE[dtype]
    assert not torch.isnan(p.out).any()
    assert rel_err(p.out, ref.out) <= tol
    # lse near 0 (a query on its pattern at large beta: log(1 + tiny)) is a float32 rounding
    # of 1 away from exact, so lse and top_score are held to tol * max(|ref|, 1).
    assert torch.all((p.lse.double() - ref.lse).abs() <= tol * ref.lse.abs().clamp_min(1))
    assert torch.all((p.top_score.double() - ref.top_score).abs() <= tol * ref.top_score.abs().clamp_min(1))
    margin = (p.top_score.double() - ref.top_score).abs() <= tol * ref.top_score.abs().clamp_min(1)
    assert torch.all((p.top_index == ref.top_index) | margin)


def test_cpu_info_names_the_paths():
    i = info()
    assert i["isa"] in ISAS and i["cpu_isa"] in ISAS and ISAS[i["isa"]] <= ISAS[i["cpu_isa"]]
    assert i["gemm"] in ("brgemm", "hand")
    assert i["vnni_bf16"] in ("0", "1") and i["vnni_f16"] in ("0", "1")


SHAPES = [(1, 1, 1), (3, 17, 3), (17, 300, 64), (1, 513, 130), (70, 257, 17), (5, 70, 300), (2, 130, 1030)]
LOWER_ISA_SHAPES = [(3, 17, 3), (17, 300, 64), (5, 70, 300), (64, 70, 512)]  # the last: restrided float tiles (rows.h)
DTYPES3 = [torch.float32, torch.float16, torch.bfloat16]


def lower_isa_paths():
    return [k for k in kernels() if k not in kernels(full_only=True)]


@pytest.mark.parametrize("kernel", kernels(full_only=True))
@pytest.mark.parametrize("dtype", DTYPES3, ids=str)
@pytest.mark.parametrize("sim", SIMILARITIES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%d-N%d-D%d" % s)
def test_every_path_matches_float64(kernel, dtype, sim, shape):
    check_shape(kernel, dtype, sim, shape)


@pytest.mark.parametrize("kernel", lower_isa_paths() or ["auto"])
@pytest.mark.parametrize("dtype", DTYPES3, ids=str)
@pytest.mark.parametrize("sim", SIMILARITIES)
@pytest.mark.parametrize("shape", LOWER_ISA_SHAPES, ids=lambda s: "B%d-N%d-D%d" % s)
def test_lower_instruction_sets_match_float64(kernel, dtype, sim, shape):
    """The AVX2 and baseline copies of the tile kernel, as a machine without AVX-512 runs them."""
    if kernel not in lower_isa_paths():
        pytest.skip("no lower instruction set than this CPU's baseline")
    check_shape(kernel, dtype, sim, shape)


def check_shape(kernel, dtype, sim, shape):
    b, n, d = shape
    q, x = make((b, d), dtype, 1), make((n, d), dtype, 2)
    for level in (1e-3, 1.0, 4.0):
        beta = level if sim == "l2" else level / math.sqrt(d)
        check(hinted(q, x, beta, sim, kernel), ref64(q, x, beta, sim), dtype)


@pytest.mark.parametrize("kernel", kernels())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sim", SIMILARITIES)
# 256: float tiles on padded rows; 44 and 27: rows (on every vector width but the baseline's) and
# value rows that end in a partial vector (finish_dots' and value_columns_rest's TailStep); 33: an
# odd depth, which the VNNI products take from tiles given a zero column.
@pytest.mark.parametrize("d,dv", [(48, 11), (44, 27), (256, 256), (33, 21)], ids=["D48", "D44", "D256", "D33"])
def test_every_path_takes_weights_values_splits_and_blocks(kernel, dtype, sim, d, dv):
    b, n = 37, 700
    q, x, v = make((b, d), dtype, 3), make((n, d), dtype, 4), make((n, dv), dtype, 5)
    w = make((b, d), torch.float32, 6).abs()
    w[0, : d // 2] = 0  # a query that knows only half its pattern
    # One mask for every query (the ℓ2 tiles then sum w∘x∘x a row, not a product), and the
    # same but for one query inside and the last of the batch (no shortcut then).
    shared = w[0].expand(b, d).contiguous()
    almost = shared.clone()
    almost[[4, b - 1], d // 2] += 0.5
    beta = 0.7 if sim == "l2" else 1.0 / math.sqrt(d)
    for weights in (None, w, shared, almost):
        ref = ref64(q, x, beta, sim, v, weights, offset=9)
        for qb, splits in ((0, 0), (5, 3), (64, 7)):
            p = hinted(q, x, beta, sim, kernel, v, weights, offset=9, query_block=qb, splits=splits)
            check(p, ref, dtype)


@pytest.mark.parametrize("kernel", kernels(full_only=True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_query_gets_the_same_bits_in_any_query_block(kernel, dtype):
    """make_plan takes 128 queries a block for short rows on the matrix units when there are
    tiles enough (8 heads of ViT's 197 tokens), else 64: a query's output must not depend on
    which block it is in."""
    skip_unless_it_runs(kernel, dtype)
    heads = 8
    q, x = make((heads, 197, 64), dtype, 7), make((heads, 197, 64), dtype, 8)
    beta = torch.full((heads,), 1.0 / 8)
    blocks = [torch.ops.hen_kernels.partial_with_plan_hints(q, x, x, beta, 0, 0, None, kernel, qb, 0)
              for qb in (0, 64, 128, 197)]
    for h in range(heads):
        check(hk.Partial(*(t[h] for t in blocks[0])), ref64(q[h], x[h], 1.0 / 8, "dot"), dtype)
    for p in blocks[1:]:
        for got, want in zip(p, blocks[0]):
            assert torch.equal(got, want)


@pytest.mark.parametrize("kernel", kernels())
@pytest.mark.parametrize("sim", SIMILARITIES)
# 1 and 3 queries: each query's scores laid along the rows (row_scores), one or several a tile
@pytest.mark.parametrize("nq", [40, 3, 1])
@pytest.mark.parametrize("d", [16, 7, 37])  # 7, 37: rows that end in a partial vector (TailStep)
def test_identical_rows_tie_to_the_smallest_index_anywhere(kernel, sim, nq, d):
    """docs/design.md §5.1: one score per row whatever its place in a tile, split or chunk."""
    g = torch.Generator().manual_seed(0)
    row = torch.randn(1, d, generator=g)
    q = (row + 0.1 * torch.randn(40, d, generator=g))[:nq]
    x = torch.randn(600, d, generator=g) * 0.01  # far from every query: the repeated row wins
    pos = torch.tensor([3, 64, 65, 200, 255, 256, 299, 511, 599])
    x[pos] = row
    beta = 1.0
    want = torch.full((nq,), 3)
    for splits in (0, 1, 5):
        p = hinted(q, x, beta, sim, kernel, splits=splits)
        assert torch.equal(p.top_index, want)
    # Chunks of any size, merged: the same scores, the same first row.
    whole = hinted(q, x, beta, sim, kernel)
    for size in (70, 64, 1, 299):
        parts = [hinted(q, x[lo:lo + size], beta, sim, kernel, offset=lo) for lo in range(0, 600, size)]
        merged = hk.merge_partials(parts)
        assert torch.equal(merged.top_index, want)
        assert torch.equal(merged.top_score, whole.top_score)
    # Only the repeated rows: every score equal, bit for bit, and row 0 wins.
    only = row.repeat(300, 1)
    p = hinted(q, only, beta, sim, kernel)
    assert torch.equal(p.top_index, torch.zeros(nq, dtype=torch.int64))
    parts = [hinted(q, only[lo:lo + 70], beta, sim, kernel, offset=lo) for lo in range(0, 300, 70)]
    assert all(torch.equal(part.top_score, p.top_score) for part in parts)
    assert torch.equal(hk.merge_partials(parts).top_index, p.top_index)


@pytest.mark.parametrize("kernel", kernels())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sim", ["l2", "l2sq"])
def test_l2_near_and_far_from_the_origin(kernel, dtype, sim):
    """Queries on, next to and far from stored patterns, and a bank far from the origin (issue 13)."""
    tol = TOLERANCE[dtype]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 64, generator=g).to(dtype)
    near = (x[:8].float() + 1e-3 * torch.randn(8, 64, generator=g)).to(dtype)
    for q in (x[:8], near, torch.randn(8, 64, generator=g).to(dtype)):
        for beta in (0.3, 30.0):
            check(hinted(q, x, beta, sim, kernel), direct64(q, x, beta, sim), dtype)
    # A bank around 1e4 with patterns 0.1 apart and queries within 1e-3 of one of them.
    centre = 1e4 * torch.randn(1, 64, generator=g) / 8
    far = (centre + 0.1 * torch.randn(50, 64, generator=g)).float()
    qf = far[[3, 17, 40]] + 1e-3 * torch.randn(3, 64, generator=g)
    beta = 1e3 if sim == "l2" else 1e4
    p = hinted(qf, far, beta, sim, kernel)
    assert torch.equal(p.top_index, torch.tensor([3, 17, 40]))
    ref = direct64(qf, far, beta, sim)
    assert rel_err(p.out, ref.out) <= 1e-5
    assert (p.lse.double() - ref.lse).abs().max() <= 1e-3 * ref.lse.abs().max().clamp_min(1)


@pytest.mark.parametrize("kernel", kernels())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sim", ["l2", "l2sq"])
def test_one_mask_for_every_query_on_stored_patterns(kernel, dtype, sim):
    """HEN's occluded recall: cues on (and next to) stored patterns, the same half visible in each."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 64, generator=g).to(dtype)
    rows = torch.tensor([5, 64, 299, 150, 0, 200, 7, 31, 100])
    near = (x[rows].float() + 1e-3 * torch.randn(len(rows), 64, generator=g)).to(dtype)
    hidden = torch.randn(len(rows), 32, generator=g).to(dtype)  # what the cue says where nobody looks
    half = torch.cat([torch.ones(32), torch.zeros(32)])
    for w_row in (half, torch.rand(64, generator=g) + 0.1):
        w = w_row.expand(len(rows), 64).contiguous()
        cues = [x[rows], near] + ([torch.cat([x[rows, :32], hidden], 1)] if w_row is half else [])
        for i, q in enumerate(cues):
            for beta in (0.3, 30.0):
                p = hinted(q, x, beta, sim, kernel, weights=w)
                check(p, ref64(q, x, beta, sim, weights=w), dtype)
                if beta == 30.0 and i != 1:  # on its pattern where the weights look: that row
                    assert torch.equal(p.top_index, rows)


@pytest.mark.parametrize("kernel", kernels())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("b,d", [(9, 64), (40, 48), (1, 130)])
def test_a_mask_on_the_dot_product_is_the_masked_cue_bit_for_bit(kernel, dtype, b, d):
    """Σ w q x with w in {0, 1} is the dot product of the cue w∘q: the same products run on both
    (a bfloat16 cue times a mask is a bfloat16, so the 16-bit products take it), one mask a
    query or one for all."""
    g = torch.Generator().manual_seed(5)
    q, x = make((b, d), dtype, 21), make((700, d), dtype, 22)
    for w in ((torch.rand(b, d, generator=g) < 0.5).float(), torch.arange(d).lt(d // 2).float().expand(b, d)):
        cue = (q.float() * w).to(dtype)
        for splits in (0, 3):
            got = hinted(q, x, 0.3, "dot", kernel, weights=w.contiguous(), splits=splits)
            want = hinted(cue, x, 0.3, "dot", kernel, splits=splits)
            for a, e in zip(got, want):
                assert torch.equal(a, e)


@pytest.mark.parametrize("kernel", kernels())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sim", SIMILARITIES)
def test_hard_retrieval_is_exact_on_every_path(kernel, dtype, sim):
    """At large beta the best row's weight is exactly 1 and the rest underflow: out is the pattern."""
    x = make((300, 64), dtype, 13)
    rows = torch.tensor([0, 17, 299, 150, 64, 255])
    q = (x[rows].float() + 0.05 * make((6, 64), torch.float32, 14)).to(dtype)
    for beta in (1e2, 1e4):
        p = hinted(q, x, beta, sim, kernel)
        assert torch.equal(p.top_index, rows)
        assert torch.equal(p.out, x[rows].float())


@pytest.mark.parametrize("kernel", kernels())
@pytest.mark.parametrize("sim", SIMILARITIES)
@pytest.mark.parametrize("nq", [20, 3])  # 3: each query's scores along the rows, its state its own
def test_nan_query_stays_in_its_lane(kernel, sim, nq):
    q, x = make((nq, 40), torch.float32, 15), make((500, 40), torch.float32, 16)
    clean = hinted(q, x, 0.2, sim, kernel, splits=3)
    bad = q.clone()
    bad[2, 7] = float("nan")
    p = hinted(bad, x, 0.2, sim, kernel, splits=3)
    keep = torch.arange(nq) != 2
    assert torch.equal(p.out[keep], clean.out[keep]) and torch.equal(p.lse[keep], clean.lse[keep])
    assert torch.isnan(p.out[2]).all() and torch.isnan(p.lse[2])


@pytest.mark.parametrize("kernel", kernels())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sim", SIMILARITIES)
def test_nan_bank_row_reaches_every_query(kernel, dtype, sim):
    # One NaN score among finite ones never wins the max; its weight (NaN) must still
    # make the query's answer NaN, in whichever tile and split it sits.
    q, x = make((20, 40), dtype, 17), make((700, 40), dtype, 18)
    for row in (0, 333, 699):
        bad = x.clone()
        bad[row, 5] = float("nan")
        p = hinted(q, bad, 0.2, sim, kernel, splits=3)
        assert torch.isnan(p.out).all() and torch.isnan(p.lse).all(), row
        want = reference.partial(q.double(), bad.double(), 0.2, sim)
        assert torch.isnan(want.lse).all()


@pytest.mark.parametrize("kernel", kernels())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("splits", [1, 3])
def test_an_out_that_is_not_finite_has_a_nan_lse(kernel, dtype, splits):
    """A bank entry of inf in a row scored -inf leaves every lse finite yet adds 0 · inf = NaN to every
    out, and values near the float32 maximum overflow the unnormalised sum: the kernel's lse is NaN
    wherever its out is not finite (split or not), so that a check of lse alone (the one-call paths')
    finds every such answer."""
    q, x = make((20, 40), dtype, 19), make((700, 40), dtype, 20)
    q[:, 5] = -q[:, 5].abs() - 0.5
    for row in (0, 333, 699):
        bad = x.clone()
        bad[row, 5] = float("inf")  # scored -inf against every query
        p = hinted(q, bad, 0.2, "dot", kernel, splits=splits)
        assert torch.isfinite(p.top_score).all(), row  # the row itself never wins
        assert torch.isnan(p.out).any(-1).all() and torch.isnan(p.lse).all(), row
    # a split whose rows all score -inf: combine() skips it, and had dropped its NaN with it
    halves = make((1024, 40), dtype, 21)
    halves[512:, 5] = float("inf")
    p = hinted(q, halves, 0.2, "dot", kernel, splits=2 * splits)
    assert torch.isnan(p.lse).all() and torch.isnan(p.out).any(-1).all()
    huge = torch.full((700, 8), 3e38, dtype=dtype)
    p = hinted(q, x, 1e-3, "dot", kernel, values=huge, splits=splits)
    assert (~torch.isfinite(p.out)).any(-1).all() and torch.isnan(p.lse).all()


def test_hints_are_checked_by_name():
    q, x = torch.randn(2, 8), torch.randn(5, 8)
    for bad in ("fast", "brgemm:avx9", "hand:", "portable"):
        with pytest.raises(ValueError, match="partial_with_plan_hints"):
            hinted(q, x, 1.0, "dot", bad)


@pytest.mark.parametrize("kernel", kernels(full_only=True))
def test_16bit_softmax_weights_are_rounded_to_nearest(kernel):
    """Where the value product takes P in bfloat16, each weight is exp(t - m) rounded to nearest: with the
    values the identity, out / out[top] is the stored P.  Truncation had passed every test (the sum
    taken as stored keeps a convex combination: the output moved by 1.5e-4, within bfloat16's 2e-2)."""
    require("cpu")
    skip_unless_it_runs(kernel, torch.bfloat16)
    n = 128
    for b, d in ((1, 64), (3, 20), (8, 64), (40, 128)):  # the hand-written, lane, pair and matrix paths
        q, x = make((b, d), torch.bfloat16, 80 + b), make((n, d), torch.bfloat16, 90 + d)
        beta = 0.5 / d ** 0.5
        p = hinted(q, x, beta, "dot", kernel, values=torch.eye(n, dtype=torch.bfloat16))
        stored = p.out.double() / p.out.double().gather(1, p.top_index.unsqueeze(1))  # P_top is exactly 1
        t = beta * (q.double() @ x.double().T)
        e = torch.exp(t - t.amax(1, keepdim=True))
        # each weight kept in float32 (to a few roundings of its own) or rounded to bfloat16's nearest
        as_float32 = (stored - e).abs() <= 1e-6 * e
        nearest = (stored - e.float().bfloat16().double()).abs() <= 1e-6 * e
        # (an exp of the kernel's own a rounding from a tie may round the other way: a handful of the weights)
        assert float((as_float32 | nearest).double().mean()) >= 0.99, (kernel, b, d)


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("kernel", kernels(full_only=True))
def test_weighted_16bit_scores_keep_float32_accuracy(kernel, similarity):
    """Weights that are not powers of two make w∘q a float32 that bfloat16 cannot hold: the score products
    then take float32 operands (weighted_cue_is_16bit), and the scores stay float32-accurate.  Taking w∘q
    as a bfloat16 anyway had passed every test: bfloat16's tolerance (2e-2) is sized for the output."""
    require("cpu")
    skip_unless_it_runs(kernel, torch.bfloat16)
    n, d = 300, 64
    for b in (1, 8, 40):
        q, x = make((b, d), torch.bfloat16, 100 + b), make((n, d), torch.bfloat16, 101)
        w = 0.1 + torch.rand(b, d, generator=torch.Generator().manual_seed(102))
        beta = 1.0 / d ** 0.5
        p, ref = hinted(q, x, beta, similarity, kernel, weights=w), ref64(q, x, beta, similarity, weights=w)
        for got, want in ((p.top_score, ref.top_score), (p.lse, ref.lse)):
            err = ((got.double() - want).abs() / want.abs().clamp_min(1)).max().item()
            assert err <= TOLERANCE[torch.float32], (kernel, similarity, b, err)


def test_forced_pairs_run_or_are_refused():
    """Pairs forced on a float32 bank or at a lower isa had run the widened products under their name."""
    if info().get("bf16_pairs") != "1":
        pytest.skip("no AVX-512 BF16 pair dot product here")
    q, x = torch.randn(2, 8), torch.randn(5, 8)
    out = torch.ops.hen_kernels.partial_with_plan_hints
    beta = torch.tensor([1.0])
    out(q[None].bfloat16(), x[None].bfloat16(), x[None].bfloat16(), beta, 0, 0, None, "pairs:avx512", 0, 0)
    for dtype, kernel in ((torch.float32, "pairs"), (torch.float16, "pairs"), (torch.bfloat16, "pairs:avx2")):
        qq, xx = q[None].to(dtype), x[None].to(dtype)
        with pytest.raises(ValueError, match="pair dot product takes a bfloat16 bank at isa avx512"):
            out(qq, xx, xx, beta, 0, 0, None, kernel, 0, 0)


def test_automatic_choice_sends_weights_to_the_cpu_kernel(monkeypatch):
    monkeypatch.delenv(backends.ENV_BACKEND, raising=False)
    q, x = torch.randn(3, 8), torch.randn(20, 8)
    inp = hk.validation.check_inputs(q, x, 1.0, "dot", weights=torch.ones(3, 8))
    assert backends.resolve(None, inp).name == "cpu"


# --- the backward op (hen_kernels::cpu_partial_backward) ------------------------------------

def grads64(q, x, v, beta, sim, dout, dlse, weights=None):
    """(dq, dx, dv, dbeta) of <out, dout> + <lse, dlse> through the reference, in float64."""
    q64, x64, v64 = (t.detach().double().requires_grad_() for t in (q, x, v))
    b64 = beta.detach().double().requires_grad_()
    p = reference.partial(q64, x64, b64, sim, v64, weights=weights)
    loss = (p.out * dout.double()).sum() + (p.lse * dlse.double()).sum()
    return torch.autograd.grad(loss, (q64, x64, v64, b64))


def dbeta_scale(q, x, v, beta, sim, dout, dlse, weights=None) -> float:
    """Σ |dt s| in float64: the size of the terms dbeta sums.  Their sum can cancel far below it (queries of
    both signs), and float32 sums them to a few ulps of it, not of the sum: the scale dbeta is judged at."""
    q64, x64, v64, b64 = (t.double() for t in (q, x, v, beta))
    s = reference.similarity(q64, x64, sim, None if weights is None else weights.double())
    p = torch.softmax(b64.view(-1, 1, 1) * s, -1)
    dp = dout.double() @ v64.transpose(-1, -2)
    dt = p * (dp - (p * dp).sum(-1, keepdim=True) + dlse.double().unsqueeze(-1))
    return (dt * s).abs().sum().item()


def with_dbeta(grads, dlse):
    """The op's (dq, dx, dv, dbeta's terms) as (dq, dx, dv, dbeta)."""
    dq, dx, dv, terms = grads
    assert terms.shape == (4,) + dlse.shape
    return dq, dx, dv, backward_cpu.dbeta_from_terms(*terms, dlse)


def backward_op(q, x, v, beta, sim, dout, dlse, weights=None):
    """The op on (L, B, D) inputs, with out and lse from the forward op; dbeta from its terms."""
    code = hk.constants.SIMILARITY_CODES[sim]
    out, lse, _, _ = torch.ops.hen_kernels.partial(q, x, v, beta, code, 0, weights)
    return with_dbeta(torch.ops.hen_kernels.cpu_partial_backward(dout, dlse, q, x, v, beta, out, lse, code, weights),
                      dlse)


# The gradient of a 16-bit output reaches the op as that dtype's values in float32 (the
# 16-bit dP and dV products take it then); any other dout keeps them in float32.
DOUTS = {"dout32": lambda t, dtype: t, "dout16": lambda t, dtype: t.to(dtype).float()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("sim", SIMILARITIES)
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared-bank", "own-bank"])
@pytest.mark.parametrize("dout_kind", DOUTS)
@pytest.mark.parametrize("Dv", [11, 12])  # an odd Dv keeps dP on float32 products
def test_backward_op_matches_float64_autograd(dtype, sim, weighted, shared, dout_kind, Dv):
    if info()["gemm"] != "brgemm":
        pytest.skip("the CPU backward op needs brgemm")
    if dtype == torch.float32 and dout_kind == "dout16":
        pytest.skip("float32 has no 16-bit products")
    L, B, N, D = 2, 37, 300, 24
    q = make((L, B, D), dtype, 1)
    x = make((1 if shared else L, N, D), dtype, 2)
    v = make((1 if shared else L, N, Dv), dtype, 3)
    beta = torch.tensor([0.3, 0.7]) if sim == "l2" else torch.tensor([0.2, 0.1])
    w = make((L, B, D), torch.float32, 4).abs() if weighted else None
    dout, dlse = DOUTS[dout_kind](make((L, B, Dv), torch.float32, 5), dtype), make((L, B), torch.float32, 6)
    got = backward_op(q, x, v, beta, sim, dout, dlse, w)
    want = grads64(q, x, v, beta, sim, dout, dlse, w)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for name, g, r in zip(("dq", "dx", "dv", "dbeta"), got, want):
        # The bank's gradients in its dtype (16-bit rows written directly where a tile holds
        # all of a row's terms: one query block and a bank per leading index, "own-bank").
        assert g.dtype == (dtype if name in ("dx", "dv") else torch.float32) and g.shape == r.shape, name
        assert rel_err(g, r) <= tol, (name, rel_err(g, r))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sim", SIMILARITIES)
@pytest.mark.parametrize("shared", [True, False], ids=["shared-bank", "own-bank"])
@pytest.mark.parametrize("B", [1, 3, 37])  # the hand-written products (1 and 3 queries in float32), brgemm's
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
def test_backward_op_writes_the_bank_gradients_asked_for(dtype, sim, shared, B, weighted):
    """bank_grads "summed": the bank is the values too, and dx is its one gradient, dX + dV (dv empty);
    "none": a frozen bank, no bank gradient (dx and dv empty).  dq and dbeta's terms are the "apart" call's,
    bit for bit, either way."""
    if info()["gemm"] != "brgemm":
        pytest.skip("the CPU backward op needs brgemm")
    L, N, D = 2, 300, 24
    q, x = make((L, B, D), dtype, 21), make((1 if shared else L, N, D), dtype, 22)
    beta = torch.tensor([0.3, 0.7]) if sim == "l2" else torch.tensor([0.2, 0.1])
    w = make((L, B, D), torch.float32, 23).abs() if weighted else None
    dout, dlse = make((L, B, D), torch.float32, 24), make((L, B), torch.float32, 25)
    code = hk.constants.SIMILARITY_CODES[sim]
    out, lse, _, _ = torch.ops.hen_kernels.partial(q, x, x, beta, code, 0, w)
    op = torch.ops.hen_kernels.cpu_partial_backward
    apart = op(dout, dlse, q, x, x, beta, out, lse, code, w, "apart")
    # `values` unread when summed: an unrelated tensor of the bank's shape stands in for it.
    summed = op(dout, dlse, q, x, torch.full_like(x, float("nan")), beta, out, lse, code, w, "summed")
    frozen = op(dout, dlse, q, x, x, beta, out, lse, code, w, "none")
    assert summed[2].numel() == 0 and summed[1].dtype == dtype and summed[1].shape == x.shape
    assert frozen[1].numel() == 0 and frozen[2].numel() == 0
    for got in (summed, frozen):
        assert torch.equal(got[0], apart[0]) and torch.equal(got[3], apart[3])
    want = grads64(q, x, x, beta, sim, dout, dlse, w)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert rel_err(summed[1], want[1] + want[2]) <= tol
    # In float32, as the two gradients apart summed (their roundings apart); bf16 rounds the sum once.
    assert rel_err(summed[1], apart[1].float() + apart[2].float()) <= (1e-6 if dtype == torch.float32 else 1e-2)
    with pytest.raises(RuntimeError, match="bank_grads must be"):
        op(dout, dlse, q, x, x, beta, out, lse, code, w, "both")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N", [40, 300, 450])
@pytest.mark.parametrize("B", [8, 64])
def test_backward_of_a_small_bank_split_into_one_tile_a_thread(dtype, N, B):
    """One bank of fewer rows than two tiles a thread: make_backward_plan cuts it into tiles of
    about N / threads rows (four threads here: splits of 16-128 rows, the last one short)."""
    if info()["gemm"] != "brgemm":
        pytest.skip("the CPU backward op needs brgemm")
    q, x = make((1, B, 64), dtype, 11), make((1, N, 64), dtype, 12)
    beta = torch.tensor([0.125])
    dout, dlse = make((1, B, 64), torch.float32, 13), make((1, B), torch.float32, 14)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        got = backward_op(q, x, x, beta, "dot", dout, dlse)
    finally:
        torch.set_num_threads(threads)
    want = grads64(q, x, x, beta, "dot", dout, dlse)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for name, g, r in zip(("dq", "dx", "dv", "dbeta"), got, want):
        assert rel_err(g, r) <= tol, (name, rel_err(g, r))


def test_backward_op_with_values_being_the_memory_and_many_splits():
    if info()["gemm"] != "brgemm":
        pytest.skip("the CPU backward op needs brgemm")
    q, x = make((1, 70, 33), torch.float32, 7), make((1, 2000, 33), torch.float32, 8)
    beta = torch.tensor([0.15])
    dout, dlse = make((1, 70, 33), torch.float32, 9), make((1, 70), torch.float32, 10)
    for sim in SIMILARITIES:
        got = backward_op(q, x, x, beta, sim, dout, dlse)
        want = grads64(q, x, x, beta, sim, dout, dlse)  # x and v the same tensor: dx and dv apart
        for g, r in zip(got, want):
            assert rel_err(g, r) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("sim", SIMILARITIES)
@pytest.mark.parametrize("B", [1, 2, 4])
@pytest.mark.parametrize("D", [8, 15, 16, 24, 33, 40])
@pytest.mark.parametrize("shared", [True, False], ids=["shared-bank", "own-bank"])
def test_backward_of_few_queries_matches_float64_autograd(dtype, sim, B, D, shared):
    """Few queries take hand-written products (BackwardPlan::hand; short rows up to 2 queries), from 2
    queries on rows of fewer than 32 elements (17 with AVX2) by lane_scores (lanes_x, lanes_v: Dv = 21
    takes them where D does not): a tail tile, odd and even D, values apart, several leading indices, a
    query on a stored row (next to it for ℓ2)."""
    if info()["gemm"] != "brgemm":
        pytest.skip("the CPU backward op needs brgemm")
    L, N, Dv = 3, 300, 21
    q = make((L, B, D), dtype, 21)
    x = make((1 if shared else L, N, D), dtype, 22)
    on = x[0, 7].float() + (0.05 * make((D,), torch.float32, 23) if sim == "l2" else 0)
    q[0, 0] = on.to(dtype)
    v = make((1 if shared else L, N, Dv), dtype, 24)
    beta = torch.tensor([0.3, 0.5, 0.7]) if sim == "l2" else torch.tensor([0.2, 0.1, 0.3])
    dout = make((L, B, Dv), torch.float32, 25).to(dtype).float()
    dlse = make((L, B), torch.float32, 26)
    got = backward_op(q, x, v, beta, sim, dout, dlse)
    want = grads64(q, x, v, beta, sim, dout, dlse)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for name, g, r in zip(("dq", "dx", "dv", "dbeta"), got, want):
        assert rel_err(g, r) <= tol, (name, rel_err(g, r))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sim", ["l2sq", "l2"])
@pytest.mark.parametrize("B", [1, 3, 8, 40])  # few queries' hand-written products, and brgemm's
@pytest.mark.parametrize("beta", [0.1, 0.2, 0.4])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
def test_backward_of_queries_on_stored_rows(dtype, sim, B, beta, weighted):
    """Each query on a stored row (ℓ2: next to it), the softmax mostly there: that row's term of dq
    and dX is G_j (x_j - q), near 0.  Formed as G . q - colsum(G) x, it was float32's rounding of
    |G_j| |x_j|: 1e-2 of dq and dX, up to 1.4x for one query; the near pairs are summed as
    differences now."""
    if info()["gemm"] != "brgemm":
        pytest.skip("the CPU backward op needs brgemm")
    N, D, Dv = 64, 64, 5
    x, v = make((1, N, D), dtype, 41), make((1, N, Dv), dtype, 42)
    rows = x[0, torch.randperm(N, generator=torch.Generator().manual_seed(46))[:B]].float()
    q = (rows + (0.05 * make((B, D), torch.float32, 43) if sim == "l2" else 0)).to(dtype)[None]
    betas = torch.tensor([beta])
    w = make((1, B, D), torch.float32, 47).abs() + 0.5 if weighted else None
    dout, dlse = make((1, B, Dv), torch.float32, 44).to(dtype).float(), make((1, B), torch.float32, 45)
    got = backward_op(q, x, v, betas, sim, dout, dlse, w)
    want = grads64(q, x, v, betas, sim, dout, dlse, w)
    tol = hk.constants.GRAD_TOLERANCE[dtype]
    for name, g, r in zip(("dq", "dx", "dv"), got, want):
        assert rel_err(g, r) <= tol, (name, rel_err(g, r))
    # (dbeta: 0.067 summed from terms of 156 in all at beta 0.2, l2 (8 queries): float32 gets it to ~4e-6)
    scale = max(abs(want[3].item()), dbeta_scale(q, x, v, betas, sim, dout, dlse, w))
    assert abs(got[3].item() - want[3].item()) <= tol * scale, (got[3], want[3], scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("sim", SIMILARITIES)
@pytest.mark.parametrize("values", ["memory", "own"])
def test_backward_16bit_products_against_float32_ones(dtype, sim, values, monkeypatch):
    """Where the forward takes bfloat16 products, the backward takes them too (G rounded to 16 bits,
    P too for dV): within the 16-bit budget of float64 autograd, as the float32 products are
    (``torch.backends.mkldnn.enabled = False``: no 16-bit brgemm), and not bit for bit those.
    float16 keeps the float32 products (G would overflow its range): bit for bit.
    Queries on stored patterns (the ℓ2 subgradient), several query blocks, a tail row tile."""
    key = "vnni_bf16" if dtype == torch.bfloat16 else "vnni_f16"
    if info().get(key) != "1":
        pytest.skip(f"no 16-bit brgemm for {dtype} here ({key}=0)")
    B, N, D = 70, 700, 40
    x = make((1, N, D), dtype, 11)
    q = make((1, B, D), dtype, 12)
    # Every third query on a stored row (ℓ2: next to it, where float64 autograd has a gradient).
    on = x[0, 5:5 + 3 * ((B + 2) // 3):3][: q[0, ::3].shape[0]].float()
    if sim == "l2":
        on = on + 0.05 * make(on.shape, torch.float32, 16)
    q[0, ::3] = on.to(dtype)
    v = x if values == "memory" else make((1, N, 26), dtype, 13)
    beta = torch.tensor([0.4 if sim == "l2" else 0.15])
    dout = make((1, B, v.shape[-1]), torch.float32, 14).to(dtype).float()
    dlse = make((1, B), torch.float32, 15)
    code = hk.constants.SIMILARITY_CODES[sim]
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    out, lse, _, _ = torch.ops.hen_kernels.partial(q, x, v, beta, code, 0, None)  # one forward for both

    def backward():
        return with_dbeta(torch.ops.hen_kernels.cpu_partial_backward(dout, dlse, q, x, v, beta, out, lse, code, None),
                          dlse)

    wide = backward()
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", True)
    fast = backward()
    want = grads64(q, x, v, beta, sim, dout, dlse)
    for name, f, w32, r in zip(("dq", "dx", "dv", "dbeta"), fast, wide, want):
        # 16-bit inputs, float32 products; dx and dv come back in the 16-bit dtype (its rounding: ~1.6e-3)
        assert rel_err(w32, r) <= (3e-3 if name in ("dx", "dv") else 1e-3), (name, rel_err(w32, r))
        # bfloat16 G and P: at most 2e-3 measured; 1.4e-2 for ℓ2's dX when its colsum took the
        # float G while the product took the rounded one.
        assert rel_err(f, r) <= 5e-3, (name, rel_err(f, r))
    same = [torch.equal(f, w32) for f, w32 in zip(fast, wide)]
    assert (not all(same)) if dtype == torch.bfloat16 else all(same)


@pytest.mark.parametrize("sim", SIMILARITIES)
def test_backward_16bit_dq_of_a_bank_far_from_the_origin(sim, monkeypatch):
    """dq = Σ_j G_j x_j nearly cancels (Σ_j G_j = β dlse); G rounded to bfloat16 alone left
    Σ_j (rounding)_j x_j, 1.9e-2 of dq for rows 3 + 0.3 N(0, 1).  With the remainder's product
    dq is as close as the float32 products' (7.5e-5 and 6.8e-5 measured, dot)."""
    if info().get("vnni_bf16") != "1":
        pytest.skip("no bfloat16 brgemm here")
    B, N, D = 64, 2000, 64
    x = (3 + 0.3 * make((1, N, D), torch.float32, 1)).bfloat16()
    q = (3 + 0.3 * make((1, B, D), torch.float32, 2)).bfloat16()
    beta = torch.tensor([1.0 if sim == "dot" else 2.0])
    dout, dlse = make((1, B, D), torch.float32, 3).bfloat16().float(), make((1, B), torch.float32, 4)
    code = hk.constants.SIMILARITY_CODES[sim]
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    out, lse, _, _ = torch.ops.hen_kernels.partial(q, x, x, beta, code, 0, None)
    wide = torch.ops.hen_kernels.cpu_partial_backward(dout, dlse, q, x, x, beta, out, lse, code, None)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", True)
    fast = torch.ops.hen_kernels.cpu_partial_backward(dout, dlse, q, x, x, beta, out, lse, code, None)
    want = grads64(q, x, x, beta, sim, dout, dlse)
    assert rel_err(fast[0], want[0]) <= max(1e-3, 3 * rel_err(wide[0], want[0]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_backward_of_a_loss_scaled_gradient_stays_finite(dtype):
    """A loss-scaled dout (AMP's GradScaler starts at 65536; float16 holds dout up to 65504, so
    4096 there), dP = V . dout beyond float16's range: no overflow on any product path."""
    if info()["gemm"] != "brgemm":
        pytest.skip("the CPU backward op needs brgemm")
    q, x = make((1, 70, 32), dtype, 17), make((1, 500, 32), dtype, 18)
    beta = torch.tensor([0.2])
    dout = (make((1, 70, 32), torch.float32, 19) * (65536 if dtype == torch.bfloat16 else 4096)).to(dtype).float()
    dlse = torch.zeros(1, 70)
    got = backward_op(q, x, x, beta, "dot", dout, dlse)
    want = grads64(q, x, x, beta, "dot", dout, dlse)
    for name, g, r in zip(("dq", "dx", "dv", "dbeta"), got, want):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, r) <= 5e-3, (name, rel_err(g, r))


# Run in a fresh process: the backward's instruction set is read once (HEN_KERNELS_CPU_ISA).
_LOWER_ISA_BACKWARD = """
import torch, hen_kernels as hk
from hen_kernels import reference
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for own in (True, False):  # own bank per leading index: 16-bit rows written directly
        g = torch.Generator().manual_seed(3)
        q = torch.randn(2, 5, 12, generator=g).to(dtype).requires_grad_()
        x = torch.randn(*((2,) if own else ()), 40, 12, generator=g).to(dtype).requires_grad_()
        got = torch.autograd.grad(hk.hopfield_update(q, x, 0.3, similarity="l2sq", backend="cpu").float().sum(), (q, x))
        q64, x64 = (t.detach().double().requires_grad_() for t in (q, x))
        want = torch.autograd.grad(reference.partial(q64, x64, 0.3, "l2sq").out.sum(), (q64, x64))
        for a, b in zip(got, want):
            assert a.dtype == dtype, (a.dtype, dtype)
            err = ((a.double() - b).norm() / b.norm()).item()
            assert err < (1e-4 if dtype == torch.float32 else 3e-2), (dtype, own, err)
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_backward_on_lower_instruction_sets(isa):
    """The backward on the AVX2 and baseline copies, every dtype (the baseline copy has no
    float16 conversion: its 16-bit rows must not be asked of it)."""
    if info()["gemm"] != "brgemm":
        pytest.skip("the CPU backward op needs brgemm")
    if ISAS[isa] > ISAS[info()["cpu_isa"]]:
        pytest.skip(f"this CPU has no {isa}")
    env = dict(os.environ, HEN_KERNELS_CPU_ISA=isa)
    proc = subprocess.run([sys.executable, "-c", _LOWER_ISA_BACKWARD], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


# Run in a fresh process: the shapes are counted only where HEN_KERNELS_COUNT_BRGEMM_SHAPES=1 was
# set before the first product.  Two threads, so that the planner cuts every length alike anywhere.
_SHAPES_OVER_LENGTHS = """
import json, torch, hen_kernels as hk
torch.set_num_threads(2)
seen = torch.ops.hen_kernels.brgemm_shapes_seen
counts = {}
for dtype in (torch.float32, torch.bfloat16):
    for grad in (False, True):
        before = seen()
        for length in range(1, 301):
            x = torch.randn(2, 4, length, 16).to(dtype).requires_grad_(grad)
            out = hk.hopfield_update(x, x, 0.25, values=x, backend="cpu")
            if grad:
                out.float().sum().backward()
        counts["%s %s" % (str(dtype)[6:], "backward" if grad else "forward")] = seen() - before
print(json.dumps(counts))
"""


def test_sequence_lengths_meet_a_few_dozen_brgemm_shapes():
    """ATen compiles and keeps a brgemm per distinct shape and thread for the process's life, so
    every new sequence length that met new shapes cost a compile and memory.  The products take
    their queries in steps of 8 and a tail's rows in steps of 16 (hopfield_cpu.h, brgemm_queries):
    self-attention over the lengths 1-300 met 340-343 forward shapes before and 678-838 more in
    the backward; 78-100 and 7-102 now (AVX-512, and AVX2 forced, where bfloat16 widened to float32
    meets float32's shapes)."""
    if info()["gemm"] != "brgemm":
        pytest.skip("this build has no brgemm")
    env = dict(os.environ, HEN_KERNELS_COUNT_BRGEMM_SHAPES="1")
    # The copy the CPU runs by default: the baseline one (4 lanes, x86 with brgemm only where
    # forced) pads queries to 4 and met 174 forward shapes.
    env.pop("HEN_KERNELS_CPU_ISA", None)
    proc = subprocess.run([sys.executable, "-c", _SHAPES_OVER_LENGTHS], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = json.loads(proc.stdout)
    assert counts["float32 forward"] > 0, counts  # counted, and the products were brgemm's
    assert max(counts.values()) <= 120, counts


def test_brgemm_shapes_are_not_counted_unless_asked():
    env = {k: v for k, v in os.environ.items() if k != "HEN_KERNELS_COUNT_BRGEMM_SHAPES"}
    code = "import torch, hen_kernels; print(torch.ops.hen_kernels.brgemm_shapes_seen())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "-1", (proc.stdout, proc.stderr[-2000:])
