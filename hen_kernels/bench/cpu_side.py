"""The CPU bench's smaller tables: multi-step retrieval, the weighted similarity, the ℓ2 rule's
cost, and many banks (leading dims) against SDPA."""
from __future__ import annotations

import math
import os
from dataclasses import asdict
from typing import Dict, List, Optional

import torch

from .. import ops
from . import common, cpu_peers as peers
from .cpu_cases import (MIN_ROW_S, SHAPES, Case, case_inputs, check, first_calls, float64_update, fused_call,
                        median_ms, time_sparing_slow_peers)

L2_RULE_MAX_COST = 0.05  # §5.1 recompute: within 5% of the kernel without it, on random data
L2_RULE_REPEATS = 21
STEPS = 5
# Cases of the smaller tables: (regime, B) among SHAPES.
SIDE_SHAPES = (("recall", 8), ("layer", 64))
# Many small banks, one per leading index (batch x heads), dot: (banks, B, N, D).  One query
# each is attention decoding and HopfieldPooling's learned query; 16 each, per-item banks.
MANY_BANKS = ((128, 1, 2048, 64), (64, 16, 2048, 64))
MANY_BANK_PEERS = ("plain", "sdpa", "sdpa_math")


def side_cases(n: Optional[int], similarities, dtypes) -> List[Case]:
    shapes = {(r, b): (big_n, d) for r, b, big_n, d in SHAPES}
    return [Case(r, s, dt, b, n or shapes[(r, b)][0], shapes[(r, b)][1])
            for r, b in SIDE_SHAPES for dt in dtypes for s in similarities]


def run_steps(case: Case, backend: str, repeats: int, compile_peer: bool, min_row_s: float = MIN_ROW_S) -> dict:
    """STEPS-step retrieval (tol=None: every step taken) against STEPS chained calls of each peer, each
    final state checked against STEPS float64 reference updates first (a peer that fails is still timed,
    and marked; the kernel failing fails the row)."""
    q, x, beta = case_inputs(case)
    which = tuple(p for p in peers.UPDATE_PEERS if p in peers.PEERS[case.similarity]
                  and (compile_peer or p != "compile"))
    one = peers.peer_callables(q, x, beta, case.similarity, which, None)

    def chain(step_peer):
        def run():
            s = q
            for _ in range(STEPS):
                s = peers.peer_callables(s, x, beta, case.similarity, (step_peer,), None)[step_peer]()
            return s
        return run

    fns = {"fused": lambda: ops.hopfield_retrieve(q, x, beta, similarity=case.similarity, max_steps=STEPS,
                                                  backend=backend).state,
           "fused_one_step": fused_call(q, x, beta, case.similarity, backend)}
    fns.update({name: chain(name) for name in one})
    with torch.no_grad():
        want = float64_update(q, x, beta, case.similarity, STEPS)
        checks = {k: check(f(), want, case.dtype, kernel=k == "fused") for k, f in fns.items()
                  if k != "fused_one_step"}
        del want
        measured = time_sparing_slow_peers(fns, repeats, first_calls(fns), min_row_s)
    ms = {k: median_ms(v[0]) for k, v in measured.items()}
    return dict(asdict(case), name=case.name, steps=STEPS, fused_ms=ms["fused"],
                per_step_overhead=ms["fused"] / (STEPS * ms["fused_one_step"]),
                rel_err=checks["fused"][0], check_ok=checks["fused"][1],
                peers={k: dict(ms=v, ratio=v / ms["fused"], rel_err=checks[k][0], ok=checks[k][1])
                       for k, v in ms.items() if not k.startswith("fused")})


def weight_sets(case: Case) -> Dict[str, torch.Tensor]:
    """The weights the weighted table times: one half mask for every query (0/1: HEN's occluded
    recall, where the kernel keeps its 16-bit products and sums w∘x∘x once a row) and weights of
    each query's own (uniform in [0.5, 1.5): the float32 products over every query)."""
    mask = torch.ones(case.B, case.D)
    mask[:, case.D // 2:] = 0.0
    own = 0.5 + torch.rand(case.B, case.D, generator=torch.Generator().manual_seed(7))
    return {"mask": mask, "per_query": own}


def run_weighted(case: Case, backend: str, repeats: int) -> dict:
    """The weighted similarity (``weight_sets``) against the unweighted kernel and plain PyTorch."""
    q, x, beta = case_inputs(case)
    w = weight_sets(case)
    fns = {"mask": fused_call(q, x, beta, case.similarity, backend, weights=w["mask"]),
           "per_query": fused_call(q, x, beta, case.similarity, backend, weights=w["per_query"]),
           "unweighted": fused_call(q, x, beta, case.similarity, backend),
           "plain_mask": lambda: peers.plain_weighted(q, x, beta, case.similarity, w["mask"])}
    with torch.no_grad():
        # each against the reference in float64, the plain peer too (in a 16-bit dtype it rounds as it goes)
        want = {k: float64_update(q, x, beta, case.similarity, weights=w[k]) for k in w}
        checks = {k: check(fns[k](), want[k], case.dtype, kernel=True) for k in w}
        plain_err = check(fns["plain_mask"](), want["mask"], case.dtype)
        del want
        measured = common.time_calls(fns, repeats, rewarm=True)
    ms = {k: median_ms(v[0]) for k, v in measured.items()}
    return dict(asdict(case), name=case.name, weighted_ms=ms["mask"], per_query_ms=ms["per_query"],
                unweighted_ms=ms["unweighted"], cost=ms["mask"] / ms["unweighted"],
                per_query_cost=ms["per_query"] / ms["unweighted"], plain_weighted_ms=ms["plain_mask"],
                ratio=ms["plain_mask"] / ms["mask"], rel_err=checks["mask"][0],
                per_query_rel_err=checks["per_query"][0], check_ok=checks["mask"][1] and checks["per_query"][1],
                plain_rel_err=plain_err[0], plain_ok=plain_err[1])


def run_l2_rule(case: Case, backend: str, repeats: int) -> dict:
    """The §5.1 recompute's cost: the kernel with it and without it (HEN_KERNELS_CPU_L2_DIRECT=0),
    on random queries, and with every query on a stored pattern (one pair each recomputed)."""
    q, x, beta = case_inputs(case)
    on = x[torch.arange(case.B) * 7 % case.N].clone()

    def without(qq):
        def run():
            os.environ["HEN_KERNELS_CPU_L2_DIRECT"] = "0"
            try:
                return ops.hopfield_update(qq, x, beta, similarity=case.similarity, backend=backend)
            finally:
                del os.environ["HEN_KERNELS_CPU_L2_DIRECT"]
        return run

    fns = {"random": fused_call(q, x, beta, case.similarity, backend), "random_without": without(q),
           "on_pattern": fused_call(on, x, beta, case.similarity, backend), "on_pattern_without": without(on)}
    with torch.no_grad():  # a few per cent between two versions of one kernel: more calls than the peers get
        # the kernel as shipped (with the rule) against float64; without it, on a pattern, it may well be off
        checks = {k: check(fns[k](), float64_update(qq, x, beta, case.similarity), case.dtype, kernel=True)
                  for k, qq in (("random", q), ("on_pattern", on))}
        measured = common.time_calls(fns, max(repeats, L2_RULE_REPEATS))
    ms = {k: median_ms(v[0]) for k, v in measured.items()}
    cost = ms["random"] / ms["random_without"] - 1
    return dict(asdict(case), name=case.name, **{f"{k}_ms": v for k, v in ms.items()}, cost=cost,
                on_pattern_cost=ms["on_pattern"] / ms["on_pattern_without"] - 1,
                target=L2_RULE_MAX_COST, met=cost <= L2_RULE_MAX_COST,
                rel_err=max(e for e, _ in checks.values()), check_ok=all(ok for _, ok in checks.values()))


def many_bank_cases(n: Optional[int], dtypes, banks: Optional[int] = None) -> List[Case]:
    """MANY_BANKS as cases; ``n`` and ``banks`` override N and the bank count (the quick run)."""
    return [Case("banks", "dot", dt, b, n or big_n, d, banks or count)
            for count, b, big_n, d in MANY_BANKS for dt in dtypes]


def run_many_banks(case: Case, backend: str, repeats: int) -> dict:
    """Banks of their own per leading index (q (L, B, D), X (L, N, D)): the fused kernel against
    plain PyTorch and SDPA, which takes the leading index as its heads; each checked first."""
    g = torch.Generator().manual_seed(case.banks * case.N + case.B)
    q, x = (torch.randn(case.banks, rows, case.D, generator=g).to(getattr(torch, case.dtype))
            for rows in (case.B, case.N))
    beta = 1.0 / math.sqrt(case.D)
    fns = {"fused": fused_call(q, x, beta, "dot", backend)}
    fns.update(peers.peer_callables(q, x, beta, "dot", MANY_BANK_PEERS, None))
    with torch.no_grad():
        want = float64_update(q, x, beta, "dot")
        checks = {k: check(f(), want, case.dtype, kernel=k == "fused") for k, f in fns.items()}
        measured = common.time_calls(fns, repeats, rewarm=True)
    ms = {k: median_ms(v[0]) for k, v in measured.items()}
    return dict(asdict(case), name=case.name, fused_ms=ms["fused"], rel_err=checks["fused"][0],
                check_ok=checks["fused"][1], gbps=case.bytes / ms["fused"] / 1e6,
                peers={k: dict(ms=v, ratio=v / ms["fused"], rel_err=checks[k][0], ok=checks[k][1])
                       for k, v in ms.items() if k != "fused"})
