"""The contract cases of docs/design.md §4-§5, run against every backend on every device it serves.

Each case draws standard-normal data on the CPU (the same numbers on every
device), runs one backend through the public API and compares with the
reference computed in float64 on the CPU, by ‖got − ref‖ / ‖ref‖ against the
dtype's tolerance (docs/design.md §5).  Exact promises (NaN isolation, hard
retrieval landing on the stored pattern, the empty bank) count as error 0 when
kept and fail outright when not.  A case yields one :class:`Result` per
comparison; an exception inside a case is a failed result, never a crash.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Tuple

import torch

import hen_kernels as hk
from hen_kernels import reference, streaming
from hen_kernels.constants import CONVEX_BOUND, SIMILARITIES, TOLERANCE, output_tolerance

# ‖out − ref‖ / ‖ref‖ against float64, per input dtype (docs/design.md §5; one home:
# hen_kernels.constants).  Float32 inputs run in IEEE float32 on every backend (the Triton
# kernels use tf32 only for 16-bit inputs), so no tf32 allowance applies.
DTYPES: Tuple[torch.dtype, ...] = tuple(TOLERANCE)
# A multi-step retrieval feeds each output back: float32 states agree to this after 20 steps.
RETRIEVE_TOLERANCE = 1e-4

# Logit spreads of O(level) for standard-normal data (beta·sim well conditioned, so a float32
# error of 1e-5 is a fair demand): beta = level for "l2", level/√D for the others.
BETA_LEVELS = (1e-3, 1.0, 4.0)
QUICK_BETA_LEVELS = (1e-3, 4.0)

# B, N, D: not multiples of any block size, plus the edges (B = N = D = 1) and D up to 4096; (4, 300, 20):
# a few queries on short rows (the CPU kernel's lane score products, its queries x rows softmax).
# (70, 257, 17): more queries than one 64-query block (a last block dropped had passed every other shape).
# (2, 1100, 300): on a GPU, bank splits of 550 rows (MIN_SPLIT_ROWS 512) in the D-tiled kernel, no whole
# number of tiles (a split's end ignored in its last tile had passed --quick).
SHAPES = ((1, 1, 1), (3, 17, 3), (17, 129, 64), (1, 1000, 129), (64, 257, 17), (70, 257, 17), (5, 70, 300),
          (5, 300, 4096), (2, 3000, 512), (4, 300, 20))
QUICK_SHAPES = ((1, 1, 1), (3, 17, 3), (17, 129, 64), (70, 257, 17), (5, 70, 300), (2, 1100, 300))

# Triton's interpreter (TRITON_INTERPRET=1, Triton on CPU tensors) takes ~1 s per 1e5 of
# B·N·D: larger cases are left to a GPU.
INTERPRETER_WORK = 200_000


@dataclass
class Result:
    """One comparison: ``error`` against ``tolerance`` (0 and 0 for an exact promise kept)."""

    case: str
    error: float
    tolerance: float
    ok: bool
    note: str = ""


@dataclass(frozen=True)
class Target:
    """One backend on one device, with the dtype under test."""

    backend: str
    device: str
    dtype: torch.dtype

    @property
    def interpreted(self) -> bool:
        return self.backend == "triton" and self.device == "cpu"

    def too_big(self, *sizes: int) -> bool:
        return self.interpreted and math.prod(sizes) > INTERPRETER_WORK


def make(shape: Sequence[int], dtype: torch.dtype, seed: int, device="cpu", scale: float = 1.0) -> torch.Tensor:
    """Standard-normal data drawn on the CPU in float64, rounded to ``dtype``, then moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def beta_for(similarity: str, d: int, level: float) -> float:
    return level if similarity == "l2" else level / d**0.5


def _cpu64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().to("cpu", torch.float64)


def ref64(query, memory, beta, similarity, values=None, offset=0, weights=None) -> hk.Partial:
    """The reference on float64 CPU copies of the (already rounded) inputs."""
    b = _cpu64(beta) if isinstance(beta, torch.Tensor) else beta
    kw = {} if weights is None else {"weights": _cpu64(weights)}
    return reference.partial(_cpu64(query), _cpu64(memory), b, similarity, _cpu64(values), offset, **kw)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """‖got − ref‖ / ‖ref‖ in float64 (the plain norm of the difference when ref is 0)."""
    ref = ref.detach().to("cpu", torch.float64)
    diff = (got.detach().to("cpu", torch.float64) - ref).norm().item()
    denom = ref.norm().item()
    return diff if denom == 0 else diff / denom


def scores64(query, memory, beta, similarity, weights=None) -> torch.Tensor:
    """beta·sim of every query and bank row, (..., B, N), in float64 on the CPU."""
    b = _cpu64(beta) if isinstance(beta, torch.Tensor) else beta
    kw = {} if weights is None else {"weights": _cpu64(weights)}
    return reference.scores(_cpu64(query), _cpu64(memory), b, similarity, **kw)


def top_index_kept(p: hk.Partial, ref: hk.Partial, scores: torch.Tensor, offset: int, tol: float) -> bool:
    """Every top_index is the reference's row, or a row whose exact score ties the best within ``tol``."""
    got = p.top_index.cpu()
    if torch.equal(got, ref.top_index):
        return True
    rows = got - offset
    valid = (rows >= 0) & (rows < scores.shape[-1])
    at = scores.expand(got.shape + scores.shape[-1:]).gather(-1, rows.clamp(0, scores.shape[-1] - 1).unsqueeze(-1))
    tie = (ref.top_score - at.squeeze(-1)) <= tol * ref.top_score.abs().clamp_min(1)
    return bool(torch.all((got == ref.top_index) | (valid & tie)))


def log_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest |got − ref| / max(|ref|, 1), element by element: lse and top_score are logarithms,
    whose rounding is absolute near 0 (an lse of 1e-4, log of a sum of weights 1.0001, is a few float32
    roundings of 1 off in any kernel, 1e-3 of itself).  Equal infinities count as 0."""
    got, ref = got.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    if got.numel() == 0:
        return 0.0
    err = torch.where(got == ref, 0.0, (got - ref).abs() / ref.abs().clamp_min(1))
    return float(err.max())


def compare_partial(case: str, p: hk.Partial, ref: hk.Partial, tol: float, scores: torch.Tensor,
                    offset: int = 0) -> Result:
    """out (‖out − ref‖ / ‖ref‖), lse and top_score (log_err) within ``tol``, no NaN, and top_index the
    reference's row wherever no other row's exact score (``scores``, (..., B, N) float64) ties the best
    within ``tol``."""
    errors = {"out": rel_err(p.out, ref.out), **{f: log_err(getattr(p, f), getattr(ref, f)) for f in ("lse", "top_score")}}
    worst = max(errors, key=errors.get)
    notes = [] if errors[worst] <= tol else [f"{worst} off by {errors[worst]:.2e}"]
    if bool(torch.isnan(p.out).any()) or bool(torch.isnan(p.lse).any()):
        notes.append("NaN in the output")
    if not top_index_kept(p, ref, scores, offset, tol):
        notes.append("top_index is not the best row")
    return Result(case, errors[worst], tol, not notes, "; ".join(notes))


def exact(case: str, kept: bool, what: str) -> Result:
    return Result(case, 0.0 if kept else math.inf, 0.0, kept, "" if kept else what)


# --- the cases: each (target, quick) -> results --------------------------------------------

def case_partial(t: Target, quick: bool) -> Iterator[Result]:
    for b, n, d in QUICK_SHAPES if quick else SHAPES:
        if t.too_big(b, n, d):
            continue
        q, x = make((b, d), t.dtype, 1, t.device), make((n, d), t.dtype, 2, t.device)
        for sim in SIMILARITIES:
            for level in QUICK_BETA_LEVELS if quick else BETA_LEVELS:
                beta = beta_for(sim, d, level)
                # rows numbered from 5 (an offset ignored by one kernel path had passed every other case)
                p = hk.hopfield_partial(q, x, beta, similarity=sim, offset=5, backend=t.backend)
                ref = ref64(q, x, beta, sim, offset=5)
                yield compare_partial(f"partial {sim} B{b} N{n} D{d} beta{beta:.3g}", p, ref,
                                      output_tolerance(t.dtype, ref.lse),
                                      scores64(q, x, beta, sim), offset=5)


def case_values_and_leading_dims(t: Target, quick: bool) -> Iterator[Result]:
    """values ≠ memory, a bank per leading index or shared, a beta per leading index, an offset, and
    banks that are heads split from a projection's rows (two leading strides, read in place)."""
    tol = TOLERANCE[t.dtype]
    q = make((2, 3, 5, 33), t.dtype, 3, t.device)
    x_shared, x_own = make((70, 33), t.dtype, 4, t.device), make((2, 3, 70, 33), t.dtype, 5, t.device)
    v_shared, v_own = make((70, 11), t.dtype, 6, t.device), make((2, 3, 70, 11), t.dtype, 7, t.device)
    x_heads = make((2, 70, 3, 33), t.dtype, 8, t.device).transpose(1, 2)  # (2, 3, 70, 33), a view
    v_heads = make((2, 70, 3, 11), t.dtype, 9, t.device).transpose(1, 2)
    # a bank stored feature-major ((70, 33) with strides (1, 70)): a kernel that takes its rows as contiguous
    # read another bank and passed every other case
    x_cols, v_cols = make((33, 70), t.dtype, 15, t.device).t(), make((11, 70), t.dtype, 16, t.device).t()
    beta = torch.tensor([[0.05, 0.1, 0.2], [0.3, 0.02, 0.15]], device=t.device)
    for sim in SIMILARITIES:
        for label, x, v in (("shared bank", x_shared, v_shared), ("own bank", x_own, v_own), ("values=None", x_own, None),
                            ("heads split from rows", x_heads, v_heads), ("bank stored transposed", x_cols, v_cols)):
            p = hk.hopfield_partial(q, x, beta, similarity=sim, values=v, offset=7, backend=t.backend)
            ref = ref64(q, x, beta, sim, v, offset=7)
            yield compare_partial(f"leading dims {sim} {label}", p, ref, tol, scores64(q, x, beta, sim), offset=7)
            out = hk.hopfield_update(q, x, beta, similarity=sim, values=v, backend=t.backend)
            if out.dtype != t.dtype:
                yield exact(f"update {sim} {label}", False, f"returned {out.dtype}, not the query's {t.dtype}")
            else:
                # The update rounds the float32 result to the query's dtype once more.
                err = rel_err(out, ref.out)
                yield Result(f"update {sim} {label}", err, 2 * tol, err <= 2 * tol)


def case_chunked_merge(t: Target, quick: bool) -> Iterator[Result]:
    """Partials of chunks of the bank, merged in reverse order, equal one call over the whole bank."""
    tol = TOLERANCE[t.dtype]
    n, d = 600, 48
    q, x, v = make((2, 7, d), t.dtype, 10, t.device), make((n, d), t.dtype, 11, t.device), make((n, 5), t.dtype, 12, t.device)
    splits = ([3, 1, 2],) if quick else ([1, 1], [3, 1, 2], [1, 5, 1, 1])
    for sim in SIMILARITIES:
        beta = beta_for(sim, d, 1.0)
        ref = ref64(q, x, beta, sim, v)
        whole = hk.hopfield_partial(q, x, beta, similarity=sim, values=v, backend=t.backend)
        # (600 rows: a kernel may split them over threads or blocks and combine; float32 had no other such call)
        yield compare_partial(f"whole bank {sim}", whole, ref, tol, scores64(q, x, beta, sim))
        for chunks in splits:
            bounds = [sum(chunks[:i]) * n // sum(chunks) for i in range(len(chunks) + 1)]
            parts = [hk.hopfield_partial(q, x[lo:hi], beta, similarity=sim, values=v[lo:hi], offset=lo,
                                         backend=t.backend) for lo, hi in zip(bounds[:-1], bounds[1:])]
            merged = hk.merge_partials(parts[::-1])
            case = f"merge {sim} chunks {chunks}"
            r = compare_partial(case, merged, ref, tol, scores64(q, x, beta, sim))
            if r.ok and not torch.equal(merged.top_index, whole.top_index):
                r = Result(case, r.error, tol, False, "top_index of the merge differs from the whole bank's")
            yield r


def tied_bank(n_before: int, n_tied: int, d: int, dtype: torch.dtype, device, seed: int, grid: bool,
              queries: int = 5) -> Tuple[torch.Tensor, ...]:
    """(queries, bank): ``n_before`` worse rows, ``n_tied`` identical best rows, 5 worse; ``queries`` near the
    best.  ``grid`` puts every entry on a grid of 1/16 (|v| < 8), where each product and each sum over d <= 64
    is exact in float32 in any order: Triton's interpreter computes tl.dot by NumPy's matmul, whose BLAS may
    round identical columns of one tile differently (seen on an AMD Zen 5 with OpenBLAS 0.3.31: the
    emulator's rounding, not the kernel's tie rule).  Compiled kernels keep the random data: there a tail
    path that rounds a row differently is exactly what is looked for."""
    g = torch.Generator().manual_seed(seed)
    best = torch.randn(1, d, generator=g, dtype=torch.float64)
    worse = lambda k: -best + 0.5 * torch.randn(k, d, generator=g, dtype=torch.float64)  # noqa: E731
    x = torch.cat([worse(n_before), best.repeat(n_tied, 1), worse(5)])
    q = 2 * best + 0.3 * torch.randn(queries, d, generator=g, dtype=torch.float64)
    if grid:
        q, x = ((v * 16).round().clamp(-127, 127) / 16 for v in (q, x))
    return q.to(dtype).to(device), x.to(dtype).to(device)


def case_exact_ties(t: Target, quick: bool) -> Iterator[Result]:
    """Identical rows score identically wherever they fall in a tile, block or thread's split, so a
    tie goes to the smallest row exactly (compare_partial lets top_index take any row that ties the
    best within the tolerance: a kernel preferring the later tile passed it), in one call and merged."""
    for n_before, d in ((69, 17), (1, 64)):
        q, x = tied_bank(n_before, 300, d, t.dtype, t.device, 34 + d, t.interpreted)
        for sim in SIMILARITIES:
            beta = beta_for(sim, d, 1.0)
            p = hk.hopfield_partial(q, x, beta, similarity=sim, backend=t.backend)
            parts = [hk.hopfield_partial(q, x[i:i + 70], beta, similarity=sim, offset=i, backend=t.backend)
                     for i in range(0, x.shape[0], 70)]
            m = hk.merge_partials(parts)
            kept = bool((p.top_index == n_before).all()) and bool((m.top_index == n_before).all())
            yield exact(f"exact ties {sim} rows {n_before}-{n_before + 299} D{d}", kept,
                        f"top_index {sorted(set(p.top_index.tolist()) | set(m.top_index.tolist()))}, "
                        f"not the first tied row {n_before}")


def case_bank_chunks(t: Target, quick: bool) -> Iterator[Result]:
    """A MemoryBank streamed in chunks of 70 rows (each chunk's rows numbered from its offset in the
    bank), in device and host storage: the reference's answer, and the one call's top_index exactly."""
    n, d = 600, 48
    if t.dtype == torch.float64 or t.too_big(14, n, d):
        return  # a bank holds float32, float16 or bfloat16 rows
    tol = TOLERANCE[t.dtype]
    q, x, v = make((2, 7, d), t.dtype, 26, t.device), make((n, d), t.dtype, 27, t.device), make((n, 5), t.dtype, 28, t.device)
    for storage in ("device", "host"):
        bank = hk.MemoryBank(d, value_dim=5, dtype=t.dtype, device=t.device, storage=storage, chunk_rows=70,
                             backend=t.backend)
        bank.add(x, v)
        for sim in SIMILARITIES:
            beta = beta_for(sim, d, 1.0)
            got = bank.partial(q, beta, similarity=sim)
            case = f"bank in chunks {storage} {sim}"
            r = compare_partial(case, got, ref64(q, x, beta, sim, v), tol, scores64(q, x, beta, sim))
            whole = hk.hopfield_partial(q, x, beta, similarity=sim, values=v, backend=t.backend)
            if r.ok and not torch.equal(got.top_index, whole.top_index):
                r = Result(case, r.error, tol, False, "top_index differs from one call over the whole bank")
            yield r


def case_near_stored_rows(t: Target, quick: bool) -> Iterator[Result]:
    """ℓ2 queries 1e-3 a feature from stored rows (recall's normal case): the expansion
    ‖s‖² + ‖x‖² - 2 s·x cancels there, and the kernels recompute those distances directly
    (docs/design.md §5.1); without it float32 was still within its tolerance but for the gradients."""
    n, d = 300, 64
    x = make((n, d), t.dtype, 29, t.device)
    rows = torch.tensor([0, 17, 299, 150, 64], device=t.device)
    q = (x[rows].to(torch.float64) + make((5, d), torch.float64, 35, t.device, scale=1e-3)).to(t.dtype)
    for sim in ("l2", "l2sq"):
        for level in (1.0, 4.0):
            beta = beta_for(sim, d, level)
            p = hk.hopfield_partial(q, x, beta, similarity=sim, backend=t.backend)
            ref = ref64(q, x, beta, sim)
            yield compare_partial(f"near stored rows {sim} beta{beta:.3g}", p, ref, output_tolerance(t.dtype, ref.lse),
                                  scores64(q, x, beta, sim))


# float64 (the reference alone) expands the ℓ2 forms about the mean of the finite queries
# (reference.l2_centre), so a NaN query moves the others' float64 answers by an ulp or so;
# they are held to the float64 tolerance there, and to bit equality in every kernel dtype.
def _isolation(case: str, dtype: torch.dtype, got: Sequence[torch.Tensor], clean: Sequence[torch.Tensor],
               poisoned: bool) -> Result:
    if dtype != torch.float64:
        kept = all(torch.equal(a, b) for a, b in zip(got, clean))
        return exact(case, kept and poisoned, "the other queries changed" if not kept else "the NaN query is not NaN")
    err = max(rel_err(a, b) for a, b in zip(got, clean))
    tol = TOLERANCE[dtype]
    ok = err <= tol and poisoned
    return Result(case, err, tol, ok, "" if ok else "the other queries changed" if err > tol else "the NaN query is not NaN")


def case_nan_isolation(t: Target, quick: bool) -> Iterator[Result]:
    """A NaN in one query leaves every other query's answer as without it."""
    q, x = make((6, 40), t.dtype, 15, t.device), make((500, 40), t.dtype, 16, t.device)
    keep = torch.tensor([0, 1, 3, 4, 5], device=t.device)
    bad = q.clone()
    bad[2, 7] = float("nan")
    for sim in SIMILARITIES:
        beta = beta_for(sim, 40, 1.0)
        clean = hk.hopfield_partial(q, x, beta, similarity=sim, backend=t.backend)
        p = hk.hopfield_partial(bad, x, beta, similarity=sim, backend=t.backend)
        poisoned = bool(torch.isnan(p.out[2]).all()) and bool(torch.isnan(p.lse[2]))
        yield _isolation(f"NaN isolation {sim} partial", t.dtype, (p.out[keep], p.lse[keep]),
                         (clean.out[keep], clean.lse[keep]), poisoned)
        kw = dict(similarity=sim, max_steps=4, tol=1e-6, backend=t.backend)
        r, r_clean = hk.hopfield_retrieve(bad, x, beta, **kw), hk.hopfield_retrieve(q, x, beta, **kw)
        yield _isolation(f"NaN isolation {sim} retrieve", t.dtype, (r.state[keep],), (r_clean.state[keep],),
                         not bool(r.converged[2]))


def case_inf_bank(t: Target, quick: bool) -> Iterator[Result]:
    """A bank row holding inf, scored -inf against every query (so every lse stays finite), still adds
    0 · inf = NaN to every answer: the call is refused naming ``memory``, never answered with NaN."""
    q, x = make((6, 40), t.dtype, 17, t.device), make((500, 40), t.dtype, 18, t.device)
    q[:, 7] = -q[:, 7].abs() - 0.5
    x[321, 7] = float("inf")
    for sim in SIMILARITIES:
        try:
            out = hk.hopfield_update(q, x, beta_for(sim, 40, 1.0), similarity=sim, backend=t.backend)
            yield exact(f"inf bank row {sim} refused", False,
                        f"answered ({int(torch.isnan(out).any(-1).sum())} of 6 rows NaN), not refused")
        except ValueError as e:
            yield exact(f"inf bank row {sim} refused", str(e).startswith("memory:"), f"refused naming another: {e}")


def case_hard_retrieval(t: Target, quick: bool) -> Iterator[Result]:
    """At beta 1e2 and 1e4, queries near stored rows land exactly on those rows."""
    n = 300
    for d in (16, 512) if quick else (16, 512, 4096):
        if t.too_big(4, n, d):
            continue
        x = make((n, d), t.dtype, 13, t.device)
        rows = torch.tensor([0, 17, 299, 150], device=t.device)
        q = (x[rows].float() + make((4, d), torch.float32, 14, t.device, scale=0.05)).to(t.dtype)
        for sim in SIMILARITIES:
            for beta in (1e2, 1e4):
                r = hk.hopfield_retrieve(q, x, beta, similarity=sim, max_steps=3, tol=0.0, backend=t.backend)
                kept = (torch.equal(r.top_index, rows) and torch.equal(r.state, x[rows])
                        and bool(r.converged.all()) and bool((r.top_weight > 0.999).all()))
                yield exact(f"hard retrieval {sim} D{d} beta{beta:g}", kept, "did not land exactly on the pattern")


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half a unit in the last place of 1: the largest relative error of rounding to ``dtype``."""
    return torch.finfo(dtype).eps / 2


def case_softmax_weights(t: Target, quick: bool) -> Iterator[Result]:
    """Two rows weighted 0.3 and 0.7, the first's value all ones and the second's zero: the output is the first
    weight as the kernel rounds it, within two units of a 16-bit dtype's rounding (one for the weight, one for
    the output; float16 weights taken as bfloat16, 2.6e-3 off, had passed float16's 5e-3), float32 within its
    tolerance.  0.3 and 0.7 round by different fractions, so a kernel that divides by the rounded weights' sum
    cannot hide a coarser rounding (1/3 and 2/3 would)."""
    a = 4.0
    beta = math.log(0.7 / 0.3) / a  # scores 0 and a: weights 0.3 and 0.7
    q = torch.tensor([[1.0, 0.0, 0.0]], dtype=t.dtype, device=t.device)
    x = torch.tensor([[0.0, 0.0, 0.0], [a, 0.0, 0.0]], dtype=t.dtype, device=t.device)
    v = torch.tensor([[1.0] * 8, [0.0] * 8], dtype=t.dtype, device=t.device)
    # a 16-bit kernel rounds the weights to the inputs' dtype for its value product (docs/design.md §5), and its
    # output once more
    tol = 2 * unit_roundoff(t.dtype) if t.dtype.itemsize == 2 else TOLERANCE[t.dtype]
    out = hk.hopfield_update(q, x, beta, values=v, backend=t.backend)
    err = rel_err(out, torch.full((1, 8), 0.3, dtype=torch.float64))
    yield Result("softmax weights 0.3 / 0.7", err, tol, err <= tol)


def case_multi_step(t: Target, quick: bool) -> Iterator[Result]:
    """20 steps with per-query stopping: the same steps, convergence and rows as the reference."""
    if t.dtype != torch.float32:
        return  # 16-bit states round differently each step; hard retrieval covers them
    x = make((400, 32), t.dtype, 21, t.device)
    q = torch.cat([x[:3] + 0.01 * make((3, 32), t.dtype, 22, t.device), make((4, 32), t.dtype, 23, t.device)])
    got = hk.hopfield_retrieve(q, x, 2.0, similarity="l2", max_steps=20, tol=1e-5, backend=t.backend)
    x64 = _cpu64(x)
    want = streaming.retrieve(lambda s: reference.partial(s, x64, 2.0, "l2"), _cpu64(q), value_dim=32,
                              max_steps=20, tol=1e-5)
    same = (torch.equal(got.steps.cpu(), want.steps) and torch.equal(got.converged.cpu(), want.converged)
            and torch.equal(got.top_index.cpu(), want.top_index))
    err = rel_err(got.state, want.state)
    note = "" if same else "steps, convergence or top rows differ from the reference"
    if err > RETRIEVE_TOLERANCE:
        note = (note + "; " if note else "") + f"state off by {err:.2e}"
    yield Result("multi-step retrieval l2, 20 steps", err, RETRIEVE_TOLERANCE, not note, note)


def case_energy(t: Target, quick: bool) -> Iterator[Result]:
    if t.dtype != torch.float32:
        return
    s, x = make((3, 9, 24), t.dtype, 19, t.device), make((150, 24), t.dtype, 20, t.device)
    for sim in SIMILARITIES:
        got = hk.energy(s, x, 0.3, similarity=sim, backend=t.backend)
        err = rel_err(got, reference.energy(_cpu64(s), _cpu64(x), 0.3, sim))
        yield Result(f"energy {sim}", err, TOLERANCE[t.dtype], err <= TOLERANCE[t.dtype])


def case_edges(t: Target, quick: bool) -> Iterator[Result]:
    """An empty bank, a bank of one row, no queries."""
    q = make((4, 5), t.dtype, 24, t.device)
    p = hk.hopfield_partial(q, make((0, 5), t.dtype, 25, t.device), 1.0, offset=3, backend=t.backend)
    kept = bool((p.out == 0).all()) and bool(torch.isneginf(p.lse).all()) and bool((p.top_index == -1).all())
    yield exact("empty bank", kept, "an empty bank must give out 0, lse -inf, top_index -1")
    x = make((1, 5), t.dtype, 25, t.device)
    p = hk.hopfield_partial(q, x, 1.0, offset=3, backend=t.backend)
    kept = rel_err(p.out, x.expand(4, 5)) <= TOLERANCE[t.dtype] and bool((p.top_index == 3).all())
    yield exact("one-row bank", kept, "a one-row bank must return that row")
    p = hk.hopfield_partial(make((0, 8), t.dtype, 0, t.device), make((10, 8), t.dtype, 0, t.device), 1.0,
                            backend=t.backend)
    yield exact("no queries", tuple(p.out.shape) == (0, 8), f"got out of shape {tuple(p.out.shape)}")


def case_weights(t: Target, quick: bool) -> Iterator[Result]:
    """Per-query feature weights (docs/design.md §4), some features hidden (weight 0)."""
    tol = TOLERANCE[t.dtype]
    # (3, 60, 150): past 128 features, where kernels tile the rows' depth (weights missing from one tile
    # path's ‖x‖² had passed)
    for b, n, d in ((5, 200, 40), (3, 60, 150)) if quick else ((9, 700, 130), (3, 60, 150)):
        # two leading indices, each with weights of its own (one set read for both had passed (B, D) weights)
        q, x, v = (make((2, b, d), t.dtype, 30, t.device), make((n, d), t.dtype, 31, t.device),
                   make((n, 7), t.dtype, 32, t.device))
        w = make((2, b, d), torch.float32, 33, t.device).abs()
        w[0, 0, : d // 2] = 0
        for sim in SIMILARITIES:
            beta = beta_for(sim, d, 1.0)
            p = hk.hopfield_partial(q, x, beta, similarity=sim, values=v, weights=w, backend=t.backend)
            yield compare_partial(f"weights {sim} B{b} N{n} D{d}", p, ref64(q, x, beta, sim, v, weights=w), tol,
                                  scores64(q, x, beta, sim, w))
    b, n, d = (5, 200, 40) if quick else (9, 700, 130)
    x = make((n, d), t.dtype, 31, t.device)
    rows = torch.tensor([3, 100, 42], device=t.device)
    qh = x[rows].clone()
    qh[:, d // 2:] = 5.0  # the hidden half says something else entirely
    wh = torch.zeros(qh.shape, dtype=torch.float32, device=t.device)
    wh[:, : d // 2] = 1
    for sim in SIMILARITIES:
        r = hk.hopfield_retrieve(qh, x, 1e3, similarity=sim, weights=wh, max_steps=2, backend=t.backend)
        yield exact(f"weights {sim} hidden half", torch.equal(r.top_index, rows), "recalled the wrong rows")


def far_from_the_origin(backend: str, device: str, dtype: torch.dtype, sim: str, b: int, n: int, d: int
                        ) -> Tuple[float, float]:
    """One 16-bit bank with rows at 16 +- 0.25 per feature, soft weights (scores spread by about 1):
    (the largest error of out against float64 in units of the rows' spread, the largest error of lse
    relative to max(1, |lse|)).  A convex combination of the rows keeps the first within CONVEX_BOUND
    (docs/design.md §5.1); lse comes from the exact sum."""
    spread = 0.25
    x = (16 + make((n, d), torch.float64, 31, device, scale=spread)).to(dtype)
    if sim == "dot":
        q, beta = make((b, d), dtype, 32, device), 4 / d ** 0.5
    else:
        q = (16 + make((b, d), torch.float64, 32, device, scale=spread)).to(dtype)
        beta = 4.0 if sim == "l2" else 11.3 / d ** 0.5
    got = hk.hopfield_partial(q, x, beta, similarity=sim, backend=backend)
    want = ref64(q, x, beta, sim)
    off = (_cpu64(got.out) - want.out).abs().max().item() / spread
    lse = ((_cpu64(got.lse) - want.lse).abs() / want.lse.abs().clamp_min(1)).max().item()
    return off, lse


def case_far_from_the_origin(t: Target, quick: bool) -> Iterator[Result]:
    """16-bit banks far from the origin (far_from_the_origin): out within CONVEX_BOUND of the rows'
    spread of float64's, element by element; float32 has no 16-bit weights to round and is not asked."""
    if t.dtype not in CONVEX_BOUND:
        return
    shapes = ((1, 600), (5, 600)) if quick else ((1, 600), (5, 600), (70, 3000))
    for b, n in ((5, 600),) if t.interpreted else shapes:  # ~4 s a call under Triton's interpreter
        for sim in SIMILARITIES:
            off, _ = far_from_the_origin(t.backend, t.device, t.dtype, sim, b, n, 64)
            bound = CONVEX_BOUND[t.dtype]
            yield Result(f"far from the origin {sim} B{b} N{n}", off, bound, off <= bound,
                         "" if off <= bound else "out scaled off the rows (error in units of their spread)")
