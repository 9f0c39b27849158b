"""Argument checks for the public API (docs/design.md §4) and the one normalised form backends see.

Every backend receives ``query`` as (L, B, D), ``memory`` as (Lm, N, D) and
``values`` as (Lm, N, Dv) with Lm ∈ {1, L}, and ``beta`` as an (L,) float32
tensor (float64 for float64 inputs), where L is the product of the query's
leading dims.  One exception, for the backends that read it
(``Backend.reads_split``): a query or bank view whose leading dims do not merge
into one stride, as heads split from a projection's rows are ((batch, S,
heads * d) viewed as (batch, heads, S, d)), comes as (Lo, Li, ·, ·) with
Lo · Li = L, the same view, rather than a copy; then the other inputs come
split alike, except a bank shared by every leading index, which stays (1, N, ·)
(:meth:`Inputs.flat` makes the copies for the other backends).
Nothing is silently broadcast, truncated or cast: anything else
is refused here with an error that names the argument.  The one cast there is,
torch.autocast's, follows the rule scaled_dot_product_attention follows
(:func:`autocast_inputs`).
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch

from .constants import FLOAT32_MIN_BETA, KERNEL_DTYPES, SIMILARITIES
from .tracing import cannot_read, checks_in_graph

# What the kernels take (and a MemoryBank stores); float64 is the reference's alone (docs/design.md §4).
FLOAT_DTYPES = KERNEL_DTYPES
API_DTYPES = FLOAT_DTYPES + (torch.float64,)

# beta is applied in float32 by every kernel: a larger value would be inf there.
FLOAT32_MAX = torch.finfo(torch.float32).max
INT64_MAX = torch.iinfo(torch.int64).max


class Inputs(NamedTuple):
    query: torch.Tensor  # (L, B, D), or a view (Lo, Li, B, D) with Lo * Li = L (see the module docstring)
    memory: torch.Tensor  # (Lm, N, D), or (Lo, Li, N, D) split as the query (when either is split and Lm = L)
    values: torch.Tensor  # (Lm, N, Dv), or (Lo, Li, N, Dv) likewise
    beta: torch.Tensor  # (L,) float32; float64 for float64 inputs
    similarity: str
    lead: torch.Size  # the query's leading dims, restored on the way out
    weights: Optional[torch.Tensor] = None  # (L, B, D) float32, non-negative; None: unweighted

    @property
    def bank_rows(self) -> int:
        return self.memory.shape[-2]

    def flat(self) -> "Inputs":
        """The same inputs with the query (L, B, D) and the banks (Lm, N, ·): a copy of a split view."""
        if self.query.dim() == 3 and self.memory.dim() == 3:  # (values too: _lead_views gives both one form)
            return self
        query = self.query.flatten(0, -3)
        memory = self.memory.flatten(0, -3)
        values = memory if self.values is self.memory else self.values.flatten(0, -3)
        return self._replace(query=query, memory=memory, values=values)  # (keys = values stay one tensor)


def _lead_view(t: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """A (..., R, C) tensor under the query's leading dims as (L, R, C) where they merge into one
    stride (a view), as (Lo, Li, R, C) where they merge into two (a view), else as a copy (L, R, C)."""
    if len(lead) == 1:  # (L, R, C) already: no reshape to dispatch (a few µs of a small call, three times)
        return t
    rows = t.shape[-2:]
    groups: list = []  # the leading dims merged where their strides allow: [size, stride] each
    for size, stride in zip(t.shape[:len(lead)], t.stride()[:len(lead)]):
        if size == 1:
            continue
        if groups and groups[-1][1] == size * stride:
            groups[-1] = [groups[-1][0] * size, stride]
        else:
            groups.append([size, stride])
    if len(groups) == 2 and t.numel() > 0:
        return t.view((groups[0][0], groups[1][0]) + rows)
    return t.reshape((math.prod(lead),) + rows)


def _lead_views(tensors: list, lead: torch.Size) -> list:
    """``_lead_view`` of each, in one form: where any is split (Lo, Li, ·, ·), all are, with the same
    (Lo, Li) (a one-stride tensor splits as a view; one split otherwise is copied).  A tensor given
    twice (keys = values) stays one tensor."""
    views = {id(t): _lead_view(t, lead) for t in tensors}  # (the tensors live on: ids stay theirs)
    split = next((v.shape[:2] for v in views.values() if v.dim() == 4), None)
    if split is not None:
        views = {k: v if v.dim() == 4 and v.shape[:2] == split else v.flatten(0, -3).view(split + v.shape[-2:])
                 for k, v in views.items()}
    return [views[id(t)] for t in tensors]


def _tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in API_DTYPES:
        raise TypeError(f"{name}: expected dtype float32, float16, bfloat16 or float64, got {t.dtype}")
    return t


def check_similarity(similarity: object) -> str:
    if not isinstance(similarity, str):
        raise TypeError(f"similarity: expected a str, one of {SIMILARITIES}, got {type(similarity).__name__}")
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity: expected one of {SIMILARITIES}, got {similarity!r}")
    return similarity




def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype torch.autocast casts to on this device type, None where it is off."""
    try:
        on = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta, say)
        return None
    return torch.get_autocast_dtype(device_type) if on else None


def _autocast_note(device: torch.device) -> str:
    """Where autocast is on, what it did: a float64 input stays float64 while the others are cast."""
    dt = autocast_dtype(device.type)
    return "" if dt is None else (f" after autocast (which casts float32 and 16-bit inputs to {dt} and leaves "
                                  "float64 ones as they are; pass inputs of one dtype)")


def autocast_inputs(query: object, memory: object, values: object) -> tuple[object, object, object]:
    """Under torch.autocast, the inputs cast as scaled_dot_product_attention's are.

    SDPA is on autocast's lower-precision list: its floating inputs other than float64
    are cast to the autocast dtype (so a bfloat16 query meets a float32 bank), and the
    result comes back in that dtype.  The ops do the same, then compute as always
    (float32 accumulation, float32 Partials) with autocast off inside.
    """
    if not isinstance(query, torch.Tensor):
        return query, memory, values
    dt = autocast_dtype(query.device.type)
    if dt is None:
        return query, memory, values

    def cast(t: object) -> object:
        eligible = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dt) if eligible else t

    return cast(query), cast(memory), cast(values)


def check_beta_value(beta: numbers.Real, dtype: torch.dtype = torch.float32) -> float:
    """A float beta: finite, > 0 and, applied in float32 (every kernel; the reference on anything but
    float64 inputs), from FLOAT32_MIN_BETA to the float32 maximum."""
    try:
        b = float(beta)
    except OverflowError:
        raise ValueError(
            f"beta: expected a finite float > 0, got an int too large for a float ({len(str(int(beta)))} digits)"
        ) from None
    # comparisons alone (NaN fails them): on a float torch.compile made symbolic (its second value, in a
    # sweep) they become guards, where math.isfinite broke a fullgraph trace
    if not 0 < b < math.inf:
        raise ValueError(f"beta: expected a finite float > 0, got {b}")
    if b > FLOAT32_MAX:
        raise ValueError(f"beta: expected at most {FLOAT32_MAX:.4e} (the kernels apply beta in float32), got {b:.4e}")
    if b < FLOAT32_MIN_BETA and dtype != torch.float64:
        raise ValueError(_below_min_beta(b))
    return b


def _below_min_beta(b: float) -> str:
    return (f"beta: expected at least {FLOAT32_MIN_BETA:.0e} where it is applied in float32, got {b:.4e}: below "
            "it beta·sim stays small even for a similarity past the float32 range, which is scored -inf "
            "(docs/design.md §4); float64 inputs take any beta > 0")


# A float beta's (L,) tensor, made once per (value, L, device, dtype, inference mode): torch.full
# costs ~2 µs of the ~40 a call on a small bank takes.  Nothing writes to beta (the kernels and
# the backwards read it), so the calls may share it; an inference tensor is kept apart, since
# autograd refuses to save one for backward; under tracing the graph makes its own.
_FLOAT_BETAS: dict = {}
_FLOAT_BETAS_MAX = 64


def _float_beta(b: float, numel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Not kept when made under a graph capture either: its fill would only run at the graph's replay.
    if cannot_read(device):
        return torch.full((numel,), b, dtype=dtype, device=device)
    key = (b, numel, device, dtype, torch.is_inference_mode_enabled())
    t = _FLOAT_BETAS.get(key)
    if t is None:
        if len(_FLOAT_BETAS) >= _FLOAT_BETAS_MAX:  # (a beta swept over many values: no unbounded growth)
            _FLOAT_BETAS.clear()
        t = _FLOAT_BETAS[key] = torch.full((numel,), b, dtype=dtype, device=device)
    return t


def check_beta(beta: object, lead: torch.Size, device: torch.device,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """beta as an (L,) tensor of ``dtype`` (float32; float64 for float64 inputs) on ``device``."""
    numel = math.prod(lead)
    if type(beta) is float:  # (the common case, before the slower ABC check of numbers.Real)
        return _float_beta(check_beta_value(beta, dtype), numel, device, dtype)
    if isinstance(beta, bool) or not isinstance(beta, (numbers.Real, torch.Tensor)):
        raise TypeError(f"beta: expected a float > 0 or a floating tensor, got {type(beta).__name__}")
    if not isinstance(beta, torch.Tensor):
        return _float_beta(check_beta_value(beta, dtype), numel, device, dtype)
    if not beta.is_floating_point():
        raise TypeError(f"beta: expected a floating tensor, got {beta.dtype}")
    if beta.device != device and not (beta.dim() == 0 and beta.device.type == "cpu"):
        raise ValueError(
            f"beta: expected a tensor on {device} (the query's device) or a 0-d CPU tensor, got {beta.device}"
        )
    # torch.broadcast_shapes(beta.shape, lead) == lead, without its ~25 µs (a layer's every call)
    bs = beta.shape
    if len(bs) > len(lead) or not all(s == 1 or s == n for s, n in zip(reversed(bs), reversed(lead))):
        raise ValueError(
            f"beta: expected a shape broadcastable to the query's leading dims {tuple(lead)}, got {tuple(bs)}"
        )
    b = beta.detach()
    if not cannot_read(b.device) and b.device.type != "meta" and b.numel():
        # One reduction, two reads (a NaN makes both NaN, and fails the test): a third of the ops
        # of testing each entry, where beta is a small per-head tensor on every call of a layer.
        lo, hi = (float(t) for t in torch.aminmax(b))
        if not (lo > 0 and hi < math.inf):
            raise ValueError("beta: expected every entry finite and > 0")
        if lo < FLOAT32_MIN_BETA and dtype != torch.float64:
            raise ValueError(_below_min_beta(lo))
        if b.dtype == torch.float64 and dtype != torch.float64 and hi > FLOAT32_MAX:
            raise ValueError(
                f"beta: expected every entry at most {FLOAT32_MAX:.4e} (the kernels apply beta in float32), "
                f"got {hi:.4e}"
            )
    elif checks_in_graph(b.device) and b.numel():
        lo, hi = torch.aminmax(b)
        torch._assert_async((lo > 0) & (hi < math.inf), "beta: expected every entry finite and > 0")
        if dtype != torch.float64:
            torch._assert_async((lo >= FLOAT32_MIN_BETA) & (hi <= FLOAT32_MAX),
                                f"beta: expected every entry in [{FLOAT32_MIN_BETA:.0e}, {FLOAT32_MAX:.4e}] "
                                "where it is applied in float32 (docs/design.md §4)")
    return beta.to(device=device, dtype=dtype).expand(lead).reshape(numel)


def check_weights(weights: object, query: torch.Tensor) -> Optional[torch.Tensor]:
    """Per-query feature weights (docs/design.md §4): float32, the query's shape and device, >= 0."""
    if weights is None:
        return None
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights: expected a torch.Tensor or None, got {type(weights).__name__}")
    if weights.layout != torch.strided:
        raise TypeError(f"weights: expected a dense (strided) tensor, got layout {weights.layout}")
    if weights.dtype != torch.float32:
        raise TypeError(f"weights: expected dtype float32, got {weights.dtype}")
    if weights.shape != query.shape:
        raise ValueError(
            f"weights: expected shape {tuple(query.shape)} (the query's: one weight per query feature), "
            f"got {tuple(weights.shape)}"
        )
    if weights.device != query.device:
        raise ValueError(f"weights: expected device {query.device} (the query's), got {weights.device}")
    if weights.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "weights: no gradient flows to the feature weights; pass weights.detach() "
            "(gradients to query, memory, values and beta are supported)"
        )
    w = weights.detach()
    if checks_in_graph(w.device):
        torch._assert_async(((w >= 0) & torch.isfinite(w)).all(), "weights: expected every entry finite and >= 0")
    elif not cannot_read(w.device) and w.device.type != "meta" and not bool(((w >= 0) & torch.isfinite(w)).all()):
        raise ValueError("weights: expected every entry finite and >= 0")
    return weights


def check_inputs(
    query: object,
    memory: object,
    beta: object,
    similarity: object,
    values: object = None,
    *,
    weights: object = None,
    allow_empty_bank: bool = False,
) -> Inputs:
    q = _tensor("query", query)
    x = _tensor("memory", memory)
    # (shape, dtype and device read once: each read builds a Python object, on every call)
    qs, xs, dtype, device = q.shape, x.shape, q.dtype, q.device
    if len(qs) < 2:
        raise ValueError(f"query: expected shape (..., B, D), got {tuple(qs)}")
    if qs[-1] == 0:
        raise ValueError("query: expected a feature dim D >= 1, got D = 0")
    lead, (b, d) = qs[:-2], qs[-2:]
    if len(xs) != 2 and len(xs) != len(qs):
        per_lead = "(" + ", ".join([str(n) for n in lead] + ["N", str(d)]) + ")"
        raise ValueError(
            f"memory: expected shape (N, {d})" + (f" or {per_lead}" if lead else "")
            + f" to match query {tuple(qs)}, got {tuple(xs)}"
        )
    if xs[-1] != d:
        raise ValueError(f"memory: expected last dim {d} (the query's D), got shape {tuple(xs)}")
    if len(xs) > 2 and xs[:-2] != lead:
        raise ValueError(
            f"memory: expected leading dims {tuple(lead)} (the query's), got {tuple(xs[:-2])}; "
            "pass an (N, D) bank to share it across leading dims"
        )
    if x.dtype != dtype:
        raise TypeError(f"memory: expected dtype {dtype} (the query's), got {x.dtype}{_autocast_note(device)}")
    if x.device != device:
        raise ValueError(f"memory: expected device {device} (the query's), got {x.device}")
    n = xs[-2]
    if n == 0 and not allow_empty_bank:
        raise ValueError("memory: the bank is empty (N = 0); an update needs at least one stored pattern")
    if values is None:
        v = x
    else:
        v = _tensor("values", values)
        vs = v.shape
        if len(vs) != len(xs) or vs[:-1] != xs[:-1]:
            raise ValueError(
                f"values: expected shape {tuple(xs[:-1]) + ('Dv',)} (memory's leading dims and N), "
                f"got {tuple(vs)}"
            )
        if vs[-1] == 0:
            raise ValueError("values: expected a value dim Dv >= 1, got Dv = 0")
        if v.dtype != dtype:
            raise TypeError(f"values: expected dtype {dtype} (the query's), got {v.dtype}{_autocast_note(device)}")
        if v.device != device:
            raise ValueError(f"values: expected device {device} (the query's), got {v.device}")
    sim = check_similarity(similarity)
    beta_vec = check_beta(beta, lead, device, torch.float64 if dtype == torch.float64 else torch.float32)
    w = check_weights(weights, q)
    num_lead = math.prod(lead)
    lm = 1 if len(xs) == 2 else num_lead
    if lm == 1:
        memory = x.unsqueeze(0) if len(xs) == 2 else x.reshape(lm, n, d)
        values = memory if v is x else v.unsqueeze(0) if v.dim() == 2 else v.reshape(lm, n, v.shape[-1])
        # (a (B, D) query, the common case, skips _lead_views' bookkeeping: 6 of ~80 µs a small call)
        query = q.unsqueeze(0) if not lead else _lead_views([q], lead)[0]
    else:
        query, memory, values = _lead_views([q, x, v], lead)
    return Inputs(
        query=query,
        memory=memory,
        values=values,
        beta=beta_vec,
        similarity=sim,
        lead=lead,
        weights=None if w is None else w.reshape(num_lead, b, d),
    )


def check_offset(offset: object, rows: int = 1) -> int:
    """A chunk's first global row; every row of a chunk of ``rows`` rows must have an int64 index."""
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral):
        raise TypeError(f"offset: expected an int, got {type(offset).__name__}")
    if offset < 0:
        raise ValueError(f"offset: expected an int >= 0, got {offset}")
    last = int(offset) + max(int(rows), 1) - 1
    if last > INT64_MAX:
        raise ValueError(
            f"offset: expected offset + N - 1 <= 2**63 - 1 (top_index is int64), got offset {offset} "
            f"with N = {rows} rows"
        )
    return int(offset)


def check_scores(lse: torch.Tensor, out: Optional[torch.Tensor], inp: Inputs,
                 top_score: Optional[torch.Tensor] = None) -> None:
    """Refuse a result that finite queries would get as NaN or inf, naming its cause.

    From a finite query and a finite bank a non-empty chunk's lse is finite unless some
    |beta·sim| exceeded the float32 range (lse >= the best score > -inf, lse <= the best
    score + log N), and its out is a convex combination of finite value rows.  So where a
    finite query's lse or out is not finite, either the bank holds inf or NaN (named:
    ``memory`` or ``values``; a row scored -inf still adds 0 · inf = NaN to every query's
    out, so one such row poisons every answer), or beta·sim overflowed (named ``beta``), or
    values near the range's end summed past it (named ``values``).
    Queries holding NaN or inf keep their NaN answer (docs/design.md §4).  ``out`` None: the
    backend's lse is NaN wherever its out is not finite (``Backend.lse_marks_out``: the CPU
    kernel's), so lse alone tells.  The check costs a reduction over lse (and out) and, only when
    it fires, one over the query and one over the bank.  Compiled into the graph under torch.compile on CPU
    tensors (tracing.checks_in_graph, without the search for the cause); skipped under other tracing,
    functorch transforms and CUDA graph capture (tracing.cannot_read).
    """
    if inp.bank_rows == 0 or lse.numel() == 0 or lse.device.type == "meta":
        return
    if checks_in_graph(lse.device):
        _assert_scores_in_graph(lse, out, inp)
        return
    if cannot_read(lse.device):
        return
    # One reduction (two where out is read) and one read in the common case: a finite sum means every
    # element is finite (a sum of finite values that overflows sends it to the exact test below, which
    # finds none).
    # In lse's own dtype: a float64 sum cost 3 of the ~40 µs a call on a small bank takes.
    # (detached only where it records a graph: each op through the dispatcher is ~1 µs here)
    lse_d = lse.detach() if lse.requires_grad else lse
    out_d = None if out is None else out.detach() if out.requires_grad else out
    if math.isfinite(float(lse_d.sum() if out_d is None else lse_d.sum() + out_d.sum())):
        return
    q, finite, bad = _unanswered(lse_d, out_d, inp)
    culprits = bad.nonzero()  # none: NaN only where queries hold NaN/inf
    if not culprits.numel():
        return
    for name, bank in (("memory", inp.memory), ("values", inp.values)):
        rows = ~torch.isfinite(bank.detach().flatten(0, -3)).all(-1)  # (Lm, N)
        if bool(rows.any()):
            first = tuple(int(i) for i in rows.nonzero()[0])
            raise ValueError(
                f"{name}: expected finite rows, got {int(rows.sum())} row(s) holding inf or NaN, the first at "
                f"(leading index, row) {first}; every query's softmax reads every row (a row scored -inf "
                f"still adds 0 · inf), so {culprits.shape[0]} finite query row(s) would be answered with NaN"
            )
    first = tuple(int(i) for i in culprits[0])
    wide = q.dtype == torch.float64
    big = torch.finfo(torch.float64 if wide else torch.float32).max
    # A kernel sums the weighted value rows before it divides by the weights' sum: up to N times the
    # largest entry, which only values near the range's end can take past it (the CPU kernel's lse is
    # then NaN too, as for any out that is not finite).  A best score that is not finite says that
    # beta·sim overflowed, whatever the values.
    scores_overflowed = top_score is not None and bool(
        (~torch.isfinite(top_score.detach()).reshape(finite.shape) & bad).any())
    largest = float(inp.values.detach().abs().amax())
    if not scores_overflowed and largest * inp.bank_rows >= big:
        raise ValueError(
            f"values: entries up to {largest:.3e} over {inp.bank_rows} rows can take the softmax's weighted "
            f"sum past the {'float64' if wide else 'float32'} range (the kernels sum it before they divide); "
            f"{culprits.shape[0]} finite query row(s) would be answered with inf or NaN, the first at "
            f"(leading index, row) {first}.  Rescale the values"
        )
    raise ValueError(
        f"beta: beta·sim leaves the {'float64' if wide else 'float32'} range "
        f"(|beta·sim| > {big:.3e}, or for the ℓ2 forms the squared distance itself) for {culprits.shape[0]} "
        f"finite query row(s), the first at (leading index, row) {first}; the softmax would be NaN there.  "
        "Lower beta or rescale the query and memory"
    )


def _unanswered(lse: torch.Tensor, out: Optional[torch.Tensor], inp: Inputs):
    """(the query as (L, B, D), which of its rows are finite, which finite ones got an lse or out not finite)."""
    q = inp.query.detach().flatten(0, -3)  # (L, B, D): a copy of a split query, here only
    finite = torch.isfinite(q).all(-1)
    if inp.weights is not None:
        finite &= torch.isfinite(inp.weights.detach()).all(-1)
    bad = ~torch.isfinite(lse.detach()).reshape(finite.shape)
    if out is not None:
        bad |= ~torch.isfinite(out.detach()).all(-1).reshape(finite.shape)
    return q, finite, bad & finite


def _assert_scores_in_graph(lse: torch.Tensor, out: Optional[torch.Tensor], inp: Inputs) -> None:
    """check_scores compiled: the same refusal, without the search for its cause (which reads values)."""
    torch._assert_async(~_unanswered(lse, out, inp)[2].any(),
                        "a finite query row would be answered with NaN or inf: the bank (memory or values) holds "
                        "inf or NaN, or beta·sim left the float range; run the call eagerly to have it named")


def check_steps(max_steps: object, tol: object) -> tuple[int, Optional[float]]:
    if isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Integral):
        raise TypeError(f"max_steps: expected an int, got {type(max_steps).__name__}")
    if max_steps < 1:
        raise ValueError(f"max_steps: expected an int >= 1, got {max_steps}")
    if tol is None:
        return int(max_steps), None
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        raise TypeError(f"tol: expected a float >= 0 or None, got {type(tol).__name__}")
    if not (math.isfinite(float(tol)) and tol >= 0):
        raise ValueError(f"tol: expected a finite float >= 0, got {tol}")
    return int(max_steps), float(tol)
