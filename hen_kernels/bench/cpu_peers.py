"""What the CPU table compares the fused kernel with, and the machine's ceilings.

Each peer is what an engineer choosing a CPU library would reach for, written
the way its documentation suggests, in the inputs' dtype:

* ``plain``: ``softmax(beta * sim(X, s)) @ X``, matmul, softmax, matmul, with the
  B x N scores in memory (the ℓ2 forms from the expansion |s|² + |x|² - 2 s.x, in
  float32 scores with the bank's |x|² computed once, untimed, as SDPA's bias is;
  beta on the query for dot);
* ``sdpa`` / ``sdpa_math``: ``scaled_dot_product_attention`` with keys = values = X,
  on its fused CPU flash kernel (oneDNN brgemm, AMX where present) and on the math
  backend; ``l2sq`` is SDPA with the additive bias -beta/2 |x|² (the -|s|²/2 term
  is constant per query and drops out of the softmax); ``l2`` it cannot express;
* ``compile``: ``torch.compile`` of ``plain`` (compiled once per shape, untimed);
* ``faiss``: FAISS exact top-1 (``IndexFlatIP`` for dot, ``IndexFlatL2`` for the ℓ2
  forms), the beta -> infinity limit of recall: a float32 index (16-bit banks are
  widened), timed on the search alone.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from . import common
from .common import MIB

Fn = Callable[[], torch.Tensor]

# Peers by similarity (SDPA cannot express l2; FAISS gives a top-1, not an update).
PEERS = {
    "dot": ("plain", "sdpa", "sdpa_math", "compile", "faiss"),
    "l2sq": ("plain", "sdpa", "sdpa_math", "compile", "faiss"),
    "l2": ("plain", "compile", "faiss"),
}
UPDATE_PEERS = ("plain", "sdpa", "sdpa_math", "compile")  # peers that return the updated state


def squared_norms(t: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """|t|² of each row, reduced without the N x D temporary that ``(t * t).sum(-1)`` makes."""
    return torch.linalg.vector_norm(t, dim=-1, keepdim=keepdim).square()


def bank_squared_norms(x: torch.Tensor) -> torch.Tensor:
    """|x_n|² in float32, computed once per bank outside the timed calls (as SDPA's l2sq bias is): a
    user recalling from a fixed bank keeps them, and a 16-bit |x|² (or its norm squared) is off by
    one rounding of 2^-8 relative, which the expansion's cancellation turns into a wrong answer at
    D = 2048 (0.11 relative where the check allows 0.05)."""
    return squared_norms(x.float())


def plain_logits(q: torch.Tensor, x: torch.Tensor, beta: float, similarity: str,
                 x_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """beta * sim(x_n, s_b) as a user would write it: dot in the inputs' dtype, beta on the query (as SDPA
    does: one pass over the B x N scores fewer); the ℓ2 forms from the expansion |s|² + |x|² - 2 s.x with
    the bank's norms ``x_sq`` (bank_squared_norms) and the query's in float32, so the scores are float32."""
    if similarity == "dot":
        return (beta * q) @ x.transpose(-1, -2)
    if x_sq is None:
        x_sq = bank_squared_norms(x)
    sq = squared_norms(q.float(), keepdim=True) + x_sq.unsqueeze(-2) - 2 * (q @ x.transpose(-1, -2))
    return (-0.5 * beta) * sq if similarity == "l2sq" else -beta * sq.clamp_min(0).sqrt()


def plain(q: torch.Tensor, x: torch.Tensor, beta: float, similarity: str,
          x_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
    return torch.softmax(plain_logits(q, x, beta, similarity, x_sq), -1).to(x.dtype) @ x


def plain_weighted(q: torch.Tensor, x: torch.Tensor, beta: float, similarity: str, w: torch.Tensor) -> torch.Tensor:
    """The weighted similarity of docs/design.md §4 written plainly: the score product in the bank's dtype
    (the float32 weights meet the query first, w∘q rounded once to a 16-bit bank's dtype); the ℓ2 forms'
    Σ_d w_d x_d² as the float32 product (X∘X) w^T, the one N x D temporary their expansion needs."""
    wq = (w * q.float()).to(x.dtype)
    if similarity == "dot":
        s = (beta * wq) @ x.mT
    else:
        sq = ((w * q.float() * q.float()).sum(-1, keepdim=True) + (x.float().square() @ w.mT).mT
              - 2 * (wq @ x.mT))
        s = (-0.5 * beta) * sq if similarity == "l2sq" else -beta * sq.clamp_min(0).sqrt()
    return (torch.softmax(s, -1).to(x.dtype) @ x).to(q.dtype)


_COMPILED: Dict[tuple, Callable] = {}


def compiled(similarity: str, q: torch.Tensor, x: torch.Tensor) -> Callable:
    """torch.compile(plain) for this similarity and these shapes and dtype.  Dynamo keeps one
    cache per code object with a recompile limit (8): past it, it would silently run eager,
    so each new case starts from a reset."""
    key = (similarity, tuple(q.shape), tuple(x.shape), q.dtype)
    if key not in _COMPILED:
        torch._dynamo.reset()
        _COMPILED.clear()
        _COMPILED[key] = torch.compile(lambda q, x, beta, x_sq=None: plain(q, x, beta, similarity, x_sq),
                                       dynamic=False)
    return _COMPILED[key]


def sdpa_runner(backend=None) -> Callable:
    """SDPA on q (..., B, D) and x (..., N, D), the leading dims (one bank each) as its heads, on
    ``backend`` (an SDPBackend), or with none forced, as a user calls it (sdpa_kernel's context
    costs ~20 µs a call: nothing at the main table's sizes, most of a call on a small bank)."""
    from torch.nn.attention import sdpa_kernel

    def run(q, x, beta, mask):
        # (batch, heads, ·, ·) inputs as they are: SDPA reads split heads in place, a reshape would copy them
        q4, x4 = (t if t.dim() == 4 else t.reshape((1, -1) + t.shape[-2:]) for t in (q, x))
        with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q4, x4, x4, attn_mask=mask, scale=beta)
        return out.reshape(q.shape[:-1] + out.shape[-1:])
    return run


def l2sq_bias(x: torch.Tensor, beta: float, b: int) -> torch.Tensor:
    """-beta/2 |x|², broadcast over the queries (expanded, not copied), in x's dtype: (1, banks, b, N)."""
    s = (-0.5 * beta * bank_squared_norms(x)).to(x.dtype)
    s = s.reshape(1, -1, 1, s.shape[-1])
    return s.expand(1, s.shape[1], b, s.shape[-1])


class FaissTop1:
    """An exact FAISS index over one bank, searched for the top-1 row of each query."""

    def __init__(self, x: torch.Tensor, similarity: str):
        import faiss  # imported here: an optional dependency

        faiss.omp_set_num_threads(torch.get_num_threads())
        self.index = (faiss.IndexFlatIP if similarity == "dot" else faiss.IndexFlatL2)(x.shape[1])
        self.index.add(x.float().numpy())

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        _, idx = self.index.search(q.float().numpy(), 1)
        return torch.from_numpy(idx[:, 0])


def faiss_unavailable() -> Optional[str]:
    try:
        import faiss  # noqa: F401
    except ImportError as e:
        return f"faiss is not installed ({e}); pip install faiss-cpu"
    return None


def peer_callables(q: torch.Tensor, x: torch.Tensor, beta: float, similarity: str,
                   which: Tuple[str, ...], faiss_index: Optional[FaissTop1]) -> Dict[str, Fn]:
    """Zero-argument calls of the peers in ``which`` on these inputs (the update, or for faiss a top-1)."""
    from torch.nn.attention import SDPBackend

    mask = l2sq_bias(x, beta, q.shape[-2]) if similarity == "l2sq" else None
    x_sq = None if similarity == "dot" else bank_squared_norms(x)  # once per bank, untimed
    fns: Dict[str, Fn] = {}
    for name in which:
        if name == "plain":
            fns[name] = lambda: plain(q, x, beta, similarity, x_sq)
        elif name == "sdpa":
            run = sdpa_runner(SDPBackend.FLASH_ATTENTION)
            fns[name] = lambda run=run: run(q, x, beta, mask)
        elif name == "sdpa_math":
            run = sdpa_runner(SDPBackend.MATH)
            fns[name] = lambda run=run: run(q, x, beta, mask)
        elif name == "compile":
            fn = compiled(similarity, q, x)
            fns[name] = lambda fn=fn: fn(q, x, beta, x_sq)
        elif name == "faiss" and faiss_index is not None:
            fns[name] = lambda: faiss_index(q)
    return fns


# --- the machine's ceilings, measured in the same run --------------------------------

def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` calls after a warm-up: a ceiling is what the machine can do
    (on a loaded machine a median would report the load instead)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# The matmul ceiling's side, and the side it falls back to where a call at that side would take
# over LONGEST_MATMUL_S: bfloat16 on a CPU without 16-bit matrix instructions (or with them
# masked, --emulate-avx2) multiplies at 0.2-0.4 GFLOP/s, 40-90 s a 2048^3 call, twelve of
# them a run, for a ceiling the table then does not use (it takes float32's there).
MATMUL_N, QUICK_MATMUL_N = 2048, 512
LONGEST_MATMUL_S = 2.0


def square_operands(n: int, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)


def matmul_side(dtype: torch.dtype, quick: bool) -> int:
    """The side of the square matmul that measures ``dtype``'s ceiling: MATMUL_N (QUICK_MATMUL_N with
    --quick), or QUICK_MATMUL_N where one call of that side would take over LONGEST_MATMUL_S."""
    if quick:
        return QUICK_MATMUL_N
    a, b = square_operands(QUICK_MATMUL_N, dtype)
    a @ b
    t0 = time.perf_counter()
    a @ b
    scaled = (time.perf_counter() - t0) * (MATMUL_N / QUICK_MATMUL_N) ** 3
    return QUICK_MATMUL_N if scaled > LONGEST_MATMUL_S else MATMUL_N


def matmul_gflops(dtype: torch.dtype, quick: bool, repeats: int, n: Optional[int] = None) -> float:
    n = n or matmul_side(dtype, quick)
    a, b = square_operands(n, dtype)
    return 2 * n ** 3 / best_seconds(lambda: a @ b, repeats) / 1e9


# Row lengths (floats) of the matrix-vector products that read the buffer of the read ceiling.
READ_GEMV_ROWS = (2048, 8192)


def read_buffer(quick: bool) -> torch.Tensor:
    """The read ceiling's buffer: float32, larger than the caches, --quick's too (at 16 MiB it had been read
    from a 32 MiB L3 at twice memory's rate, and the quick rows' fractions of it were the cache's)."""
    return torch.randn((128 if quick else 512) * MIB // 4)


def read_ceiling(buf: torch.Tensor, repeats: int) -> Tuple[float, str]:
    """GB/s reading buf once, the best of a sum (one stream a thread) and matrix-vector
    products over it (the BLAS reads several rows at once: on the Xeon of cpu.md 30-33 GB/s
    against the sum's 20-22), and the way that read fastest."""
    ways = {"sum": buf.sum}
    for k in READ_GEMV_ROWS:
        m, v = buf.view(-1, k), torch.ones(k)
        ways[f"matrix-vector, rows of {k}"] = lambda m=m, v=v: m @ v
    seconds = {name: best_seconds(f, repeats) for name, f in ways.items()}
    fastest = min(seconds, key=seconds.get)
    return buf.numel() * buf.element_size() / seconds[fastest] / 1e9, fastest


def measure_ceilings(quick: bool, repeats: int) -> dict:
    """float32 and bfloat16 matmul GFLOP/s (and the side each was measured at) and memory read
    GB/s (read_ceiling over a buffer larger than the caches), each the best of its calls."""
    buf = read_buffer(quick)
    read_gbps, read_way = read_ceiling(buf, repeats)
    n, n16 = matmul_side(torch.float32, quick), matmul_side(torch.bfloat16, quick)
    return {"matmul_gflops": matmul_gflops(torch.float32, quick, repeats, n),
            "matmul_bf16_gflops": matmul_gflops(torch.bfloat16, quick, repeats, n16),
            "matmul_shape": [n, n, n], "matmul_bf16_shape": [n16, n16, n16],
            "read_gbps": read_gbps, "read_mib": buf.numel() * 4 // MIB, "read_way": read_way}


def cpu_info() -> Dict[str, str]:
    """The kernel's own report (hen_kernels::cpu_info): isa, products, 16-bit VNNI, OpenMP."""
    try:
        return dict(item.split("=", 1) for item in torch.ops.hen_kernels.cpu_info().split())
    except (AttributeError, RuntimeError):
        return {}


def matrix_units(info: Dict[str, str], isa_flags: str) -> str:
    """Which units the 16-bit products run on, in words, for the table's header."""
    if info.get("vnni_bf16") != "1":
        return "no 16-bit matrix instructions used (bf16 widened to float32 products)"
    unit = "AMX" if "amx_bf16" in isa_flags.split() else "AVX-512 BF16"
    words = f"bf16 products on {unit} (oneDNN brgemm, VNNI operands)"
    if info.get("bf16_pairs") == "1":
        words += "; for few queries the kernel's own, on AVX-512 BF16's pair dot product"
    return words


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    d = want.norm().item()
    e = (got.double() - want).norm().item()
    return e / d if d else e


def finite(v: float) -> Optional[float]:
    return v if v is not None and math.isfinite(v) else None
