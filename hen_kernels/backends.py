"""The one place that knows each backend: its forward, its backward, whether it loaded, when it is chosen.

A backend's forward computes a :class:`~hen_kernels.types.Partial` from the
normalised inputs of :mod:`hen_kernels.validation` (query (L, B, D), memory
(Lm, N, D), values (Lm, N, Dv), beta (L,) float32).  Its backward turns the
upstream gradients of ``out`` and ``lse`` into (dq, dx, dv, dbeta), float32,
from the inputs and the saved ``out`` and ``lse`` alone (no B x N matrix is
kept between the passes; :mod:`hen_kernels.autograd` wires it in).  Callers
never name a kernel: they reach a backend through :func:`resolve`, or, for
``hopfield_update``'s and ``hopfield_retrieve``'s plain CPU case, through
:func:`fast_update` and :func:`fast_retrieve`, which run what ``resolve`` would
pick there in one C++ call or decline.
"""
from __future__ import annotations

import functools
import glob
import importlib.machinery
import math
import os
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.autograd import forward_ad

from . import backward_cpu, reference, vmap_rules
from .constants import KERNEL_DTYPES, SIMILARITY_CODES
from .tracing import is_tracing
from .types import Partial, Retrieval
from .validation import API_DTYPES, FLOAT32_MAX, Inputs

ENV_BACKEND = "HEN_KERNELS_BACKEND"

# (query, memory, values, beta, similarity, offset, weights or None) -> Partial
ForwardImpl = Callable[..., Partial]
Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
# (dout, dlse, query, memory, values, beta, out, lse, similarity, weights or None, bank_grads) ->
# (dq, dx, dv, dbeta): dq and dbeta in float32, dx and dv in float32 or, with
# Backend.bank_grads_in_input_dtype, the bank's dtype.  bank_grads: "apart", dx and dv;
# "summed" (keys = values: memory is read as the values too), dx the bank's one gradient, dX + dV summed in
# float32, and dv empty; "none" (a bank that needs no gradient), dx and dv empty.  top: (L, B) int64, each
# query's top row of this bank (the forward's top_index less its offset; backward_cpu.top_row_gaps), or None.
BackwardImpl = Callable[..., Grads]


def bank_grads_wanted(keys_are_values: bool, need_memory: bool, need_values: bool) -> str:
    """The bank gradients a backward is asked for (BackwardImpl's bank_grads): a few queries' backward
    is bound by the bank-sized writes, so none for a frozen bank, and one for a bank that is keys and values
    (binding.cpp's UpdateFunction decides the same)."""
    return "none" if not (need_memory or need_values) else "summed" if keys_are_values else "apart"


def bank_grads_of(grads: Grads, bank_grads: str) -> Grads:
    """(dq, dx, dv, dbeta) computed apart, as ``bank_grads`` asks for them: the backward paths that
    always compute dX and dV (in float32, so the sum is float32's)."""
    dq, dx, dv, dbeta = grads
    if bank_grads == "summed":
        return dq, dx + dv, dv.new_empty(0), dbeta
    if bank_grads == "none":
        return dq, dx.new_empty(0), dv.new_empty(0), dbeta
    return grads


class Backend:
    """A named implementation of the partial update, forward and backward, for some device types.

    ``backward`` is None where the forward is plain differentiable PyTorch that
    autograd differentiates by itself (the reference).  ``dtypes`` are the input
    dtypes it computes (the kernels accumulate float32 inputs in float32; float64
    is the reference's alone).  ``bank_grads_in_input_dtype``: its backward returns dx
    and dv in the bank's dtype (else float32), as the op's fake implementation must say.
    ``split_queries_max``: where it is above 0 the backend reads query and bank views (Lo, Li,
    ·, ·) in place (validation.py): a forward alone at any number of queries, and where autograd
    records a graph up to this many queries per leading index, its backward laying the bank
    gradients out as the views; beyond, and where it is 0 (it cannot read them), copies
    (:meth:`Inputs.flat`).  ``lse_marks_out``: its lse is NaN wherever its out row is not finite
    (the CPU kernel's), so validation.check_scores need not read out.
    """

    def __init__(self, name: str, device_types: tuple[str, ...], *, forward: ForwardImpl,
                 backward: Optional[BackwardImpl], load: Optional[Callable[[], Optional[str]]] = None,
                 dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES, bank_grads_in_input_dtype: bool = False,
                 split_queries_max: int = 0, lse_marks_out: bool = False):
        self.name = name
        self.lse_marks_out = lse_marks_out
        self.device_types = device_types
        self.dtypes = dtypes
        self.bank_grads_in_input_dtype = bank_grads_in_input_dtype
        self.split_queries_max = split_queries_max
        self._forward = forward
        self.backward = backward
        self._load = load
        self._reason: Optional[str] = None
        self._loaded = load is None

    @property
    def unavailable_reason(self) -> Optional[str]:
        """None when usable, else why not (the extension failed to load, no GPU, ...)."""
        if not self._loaded:
            self._loaded = True
            assert self._load is not None
            self._reason = self._load()
        return self._reason

    def available(self) -> bool:
        return self.unavailable_reason is None

    def serves(self, device_type: str) -> bool:
        return self.available() and device_type in self.device_types

    def takes(self, inp: Inputs) -> bool:
        """Whether it computes these inputs (their dtype)."""
        return inp.query.dtype in self.dtypes

    @property
    def split_banks(self) -> bool:
        """Whether it reads split views at all."""
        return self.split_queries_max > 0

    def reads_split(self, inp: Inputs, with_graph: bool) -> bool:
        """Whether these inputs' split views go to it as they are: always for a forward alone, and with an
        autograd graph (``with_graph``) for few enough queries per leading index."""
        return self.split_banks and (not with_graph or inp.query.shape[-2] <= self.split_queries_max)

    def partial(self, inp: Inputs, offset: int = 0) -> Partial:
        """The forward on inputs in this backend's form (``autograd.partial`` flattens split banks for the others)."""
        return self._forward(inp.query, inp.memory, inp.values, inp.beta, inp.similarity, offset, inp.weights)


# --- torch: the reference ------------------------------------------------------------

def _torch_partial(q, x, v, beta, similarity, offset, weights):
    return reference.partial(q, x, beta, similarity, v, offset, weights)


# --- cpu: the fused C++ kernel in csrc/, registered as hen_kernels::partial ----------

# Queries per leading index up to which the CPU kernel reads split views (heads split from a
# projection's rows) in place rather than after a copy when autograd records a graph.  With few
# queries a call streams the bank once, and copying the bank (and its gradient back) costs about as
# much as the call; with many, the products dominate and the backward runs faster on contiguous
# tiles than on rows a head apart (float32: 1.3-1.6x on the op alone).  Measured (EPYC Zen 4,
# ad-hoc, interleaved, median of 15; a training step of the op on 16 banks of 2048 x (2 x 32)): in
# place 1.09-1.41x faster up to 16 queries, 0.94-1.23x at 24, 0.95-1.02x from 32 to 512 (bf16 and
# float32).  A forward alone reads them in place at any count: the op over SDPA's (batch, heads, L,
# d) views of one packed projection, 17-4096 queries a head, d 16-1024, ran 0.97-2.2x the time with
# the copies (EPYC Zen 4, AVX-512 and AVX2 forced, float32 and bf16; PERFORMANCE.md §5.19).
CPU_SPLIT_QUERIES_MAX = 16


def _extension_path() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        hits = glob.glob(os.path.join(here, "_C" + suffix))
        if hits:
            return hits[0]
    return None


_EXTENSION_ERROR: Optional[str] = None
_EXTENSION_TRIED = False
_UPDATE_OP = None  # hen_kernels::update (binding.cpp update_cpu; fast_update) once the extension has loaded
_RETRIEVE_OP = None  # hen_kernels::retrieve (binding.cpp retrieve_cpu; fast_retrieve), likewise
_SELF_ASSOCIATION_OP = None  # hen_kernels::self_association (self_association_cpu; fast_self_association), likewise


def load_extension() -> Optional[str]:
    """Load hen_kernels/_C once; None on success, else the reason it is missing."""
    global _EXTENSION_ERROR, _EXTENSION_TRIED
    if _EXTENSION_TRIED:
        return _EXTENSION_ERROR
    _EXTENSION_TRIED = True
    path = _extension_path()
    if path is None:
        _EXTENSION_ERROR = "the compiled extension hen_kernels/_C is not built (run `make install` or `pip install .`)"
        return _EXTENSION_ERROR
    # A _C built against another torch release can load and then misbehave: refuse it, loudly (build_info.py).
    import warnings

    from . import build_info

    _EXTENSION_ERROR = build_info.torch_mismatch(path)
    if _EXTENSION_ERROR is not None:
        warnings.warn(_EXTENSION_ERROR, RuntimeWarning, stacklevel=2)
        return _EXTENSION_ERROR
    try:
        torch.ops.load_library(path)
    except (OSError, RuntimeError) as e:
        _EXTENSION_ERROR = f"the compiled extension {path} failed to load: {e}"
        return _EXTENSION_ERROR
    _register_fake()
    vmap_rules.register_partial("hen_kernels::partial")
    global _UPDATE_OP, _RETRIEVE_OP, _SELF_ASSOCIATION_OP
    _UPDATE_OP = torch.ops.hen_kernels.update.default
    _RETRIEVE_OP = torch.ops.hen_kernels.retrieve.default
    _SELF_ASSOCIATION_OP = torch.ops.hen_kernels.self_association.default
    return None


def _register_fake() -> None:
    @torch.library.register_fake("hen_kernels::update")
    def _(query, memory, values, beta, similarity, split_queries_max):
        return []  # declined: fake tensors take the general path, which has its fake partial

    @torch.library.register_fake("hen_kernels::retrieve")
    def _(query, memory, values, beta, similarity, max_steps, tol, split_queries_max):
        return []  # declined, as update

    @torch.library.register_fake("hen_kernels::self_association")
    def _(input, in_weights, in_biases, norm_weights, norm_biases, norm_eps, packed, out_weight, out_bias, heads, beta,
          similarity, split_queries_max):
        return []  # declined, as update

    @torch.library.register_fake("hen_kernels::partial")
    def _(query, memory, values, beta, similarity, offset, weights=None):
        lead, b = math.prod(query.shape[:-2]), query.shape[-2]  # (a split query: (Lo, Li, B, D))
        f32 = dict(dtype=torch.float32, device=query.device)
        return (
            query.new_empty((lead, b, values.shape[-1]), **f32),
            query.new_empty((lead, b), **f32),
            query.new_empty((lead, b), **f32),
            query.new_empty((lead, b), dtype=torch.int64, device=query.device),
        )


def _cpu_available() -> Optional[str]:
    return load_extension()


def _extension_partial(q, x, v, beta, similarity, offset, weights):
    out, lse, top_score, top_index = torch.ops.hen_kernels.partial(
        q, x, v, beta, SIMILARITY_CODES[similarity], offset, weights
    )
    return Partial(out, lse, top_score, top_index)


# --- cuda: CUDA C++ kernels in csrc/, the CUDA implementation of the same op ------------

def _cuda_available() -> Optional[str]:
    reason = load_extension()
    if reason is not None:
        return reason
    if not torch._C._dispatch_has_kernel_for_dispatch_key("hen_kernels::partial", "CUDA"):
        return "the extension was built without CUDA (no nvcc, or a CPU-only torch at build time)"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


# --- triton: hen_kernels/triton/ -----------------------------------------------------

def _interpreting_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_available() -> Optional[str]:
    try:
        from . import triton as triton_backend
    except ImportError as e:
        return f"triton is not importable: {e}"
    vmap_rules.register_partial("hen_kernels::triton_partial")
    return triton_backend.unavailable_reason()


def _triton_partial(q, x, v, beta, similarity, offset, weights):
    from . import triton as triton_backend

    return triton_backend.partial(q, x, v, beta, similarity, offset, weights)


# --- backward: recomputed from the saved lse -------------------------------------------

def _streaming_backward(dout, dlse, q, x, v, beta, out, lse, similarity: str, weights=None,
                        bank_grads: str = "apart", top=None) -> Grads:
    """PyTorch over bank chunks of bounded size: any device, any D (backward_cpu.py)."""
    v = x if bank_grads == "summed" else v
    if q.dim() == 4 or x.dim() == 4:  # split views (the CPU backend's, on a build without brgemm): as (L, ·, ·)
        flat = [t.flatten(0, -3) for t in (q, x, v)]
        top = None if top is None else top.reshape(out.shape[:-1])
        dq, dx, dv, dbeta = backward_cpu.partial_backward(dout, dlse, *flat, beta, out, lse, similarity, weights,
                                                          top)
        grads = dq.view(q.shape), dx.view(x.shape), dv.view(v.shape), dbeta
    else:
        grads = backward_cpu.partial_backward(dout, dlse, q, x, v, beta, out, lse, similarity, weights, top)
    return bank_grads_of(grads, bank_grads)


@functools.lru_cache(maxsize=None)
def _cpu_has_brgemm() -> bool:
    """Whether the built CPU kernel has ATen's brgemm (fixed for the process: asked once)."""
    return "gemm=brgemm" in torch.ops.hen_kernels.cpu_info().split()


def _cpu_backward(dout, dlse, q, x, v, beta, out, lse, similarity: str, weights=None,
                  bank_grads: str = "apart", top=None) -> Grads:
    """The fused C++ backward (csrc/cpu/backward_kernel.cpp, on brgemm) where the build has it,
    else the streaming path; dx and dv in the bank's dtype either way (the C++ one writes
    16-bit rows directly where it can: no float32 N x D gradient to allocate; and only the bank
    gradients ``bank_grads`` asks for)."""
    if _cpu_has_brgemm():
        dq, dx, dv, terms = torch.ops.hen_kernels.cpu_partial_backward(dout, dlse, q, x, v, beta, out, lse,
                                                                   SIMILARITY_CODES[similarity], weights,
                                                                   bank_grads, top)
        return dq, dx, dv, backward_cpu.dbeta_from_terms(*terms, dlse.to(torch.float32))
    dq, dx, dv, dbeta = _streaming_backward(dout, dlse, q, x, v, beta, out, lse, similarity, weights,
                                            bank_grads, top)
    return dq, dx.to(x.dtype), dv.to(v.dtype), dbeta


def _gpu_backward(dout, dlse, q, x, v, beta, out, lse, similarity: str, weights=None,
                  bank_grads: str = "apart", top=None) -> Grads:
    """The fused Triton kernels where they serve these tensors and dims, else the streaming path.

    Which dims the fused kernels take is theirs to say (``triton.backward.serves``, from
    their register budget); the streaming path also serves CUDA tensors, so a forward on
    Triton or CUDA never lacks a backward.
    """
    if weights is None and BACKENDS["triton"].serves(q.device.type):
        # Looked up at call time, so a test can spy on the kernel's entry point.
        from .triton import backward as triton_backward

        if triton_backward.serves(q.dtype, q.shape[-1], v.shape[-1]):
            grads = triton_backward.partial_backward(dout, dlse, q, x, x if bank_grads == "summed" else v, beta, out,
                                                     lse, similarity, top)
            return bank_grads_of(grads, bank_grads)
    return _streaming_backward(dout, dlse, q, x, v, beta, out, lse, similarity, weights, bank_grads, top)


BACKENDS: Dict[str, Backend] = {
    "torch": Backend("torch", ("cpu", "cuda"), forward=_torch_partial, backward=None, dtypes=API_DTYPES),
    # Meta tensors (shapes only, as for a model built on the meta device) take the op's fake implementation.
    "cpu": Backend("cpu", ("cpu", "meta"), forward=_extension_partial, backward=_cpu_backward, load=_cpu_available,
                   bank_grads_in_input_dtype=True, split_queries_max=CPU_SPLIT_QUERIES_MAX, lse_marks_out=True),
    "cuda": Backend("cuda", ("cuda",), forward=_extension_partial, backward=_gpu_backward, load=_cuda_available),
    # Under TRITON_INTERPRET=1 Triton runs on CPU tensors (how the tests check it without a GPU).
    "triton": Backend("triton", ("cuda", "cpu") if _interpreting_triton() else ("cuda",),
                      forward=_triton_partial, backward=_gpu_backward, load=_triton_available),
}


def preference(device_type: str, inp: Inputs) -> tuple[str, ...]:
    """Backends to try for the automatic choice, fastest first, from the device and the shape.

    CUDA: the C++ split-bank kernel for the recall regime (few queries), Triton
    elsewhere.  Provisional until measured on a GPU (benchmarks/results/).
    """
    if device_type in ("cpu", "meta"):
        return ("cpu", "torch")
    if device_type == "cuda":
        recall = inp.query.shape[-2] <= 64
        return ("cuda", "triton", "torch") if recall else ("triton", "cuda", "torch")
    return ("torch",)


def available_backends() -> List[str]:
    return [name for name, b in BACKENDS.items() if b.available()]


def carries_tangents(inp: Inputs) -> bool:
    """Whether forward-mode AD (``torch.func.jvp``, ``jacfwd``, ``hessian``, ``torch.autograd.forward_ad``)
    may carry a tangent on an input.  The kernels' ops have no forward derivative, and PyTorch runs an op
    without one by dropping the tangents without a word (a zero jvp); the reference is plain PyTorch, which
    has them.  Any torch.func forward-mode transform counts: inside an inner grad (hessian's jacfwd over
    jacrev) its tangents ride a level that ``unpack_dual`` does not see, and reach the fused backward."""
    if forward_ad._current_level < 0:  # no dual level entered: no tangent anywhere (the common case, for free)
        return False
    if torch._C._are_functorch_transforms_active() and any(
            i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters()):
        return True
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None
               for t in (inp.query, inp.memory, inp.values, inp.beta, inp.weights))


def compiling_a_transform() -> bool:
    """Whether torch.compile is tracing a torch.func transform (grad, vmap, ...) with gradients on: there dynamo
    drops an autograd.Function's backward (pytorch/pytorch#193279; autograd.partial), so the automatic choice is
    the reference, plain PyTorch, which it differentiates right.  (Which transforms differentiate cannot be
    read while dynamo traces; with gradients off, under torch.no_grad, a compiled vmap keeps the kernel.)"""
    return torch.compiler.is_compiling() and torch.is_grad_enabled() and torch._C._are_functorch_transforms_active()


def resolve(backend: Optional[str], inp: Inputs) -> Backend:
    """The backend for these inputs: the one asked for, else $HEN_KERNELS_BACKEND, else the fastest;
    the reference wherever forward-mode AD carries a tangent (:func:`carries_tangents`) and where
    torch.compile traces a torch.func transform (:func:`compiling_a_transform`)."""
    device_type = inp.query.device.type
    asked = backend if backend is not None else os.environ.get(ENV_BACKEND) or None
    source = "backend" if backend is not None else ENV_BACKEND
    tangents = carries_tangents(inp)
    if (tangents or compiling_a_transform()) and asked in (None, "torch"):
        return BACKENDS["torch"]
    if asked is None:
        for name in preference(device_type, inp):
            if BACKENDS[name].serves(device_type) and BACKENDS[name].takes(inp):
                return BACKENDS[name]
        raise ValueError(f"query: no backend serves device type {device_type!r}")
    if not isinstance(asked, str):
        raise TypeError(f"backend: expected a str or None, got {type(asked).__name__}")
    if asked not in BACKENDS:
        raise ValueError(f"{source}: expected one of {sorted(BACKENDS)}, got {asked!r}")
    b = BACKENDS[asked]
    if not b.available():
        raise ValueError(f"{source}: {asked!r} is not available: {b.unavailable_reason}")
    if device_type not in b.device_types:
        raise ValueError(f"{source}: {asked!r} runs on {b.device_types} tensors, got tensors on {device_type}")
    if inp.query.dtype not in b.dtypes:
        raise ValueError(
            f"{source}: {asked!r} takes {', '.join(str(d).replace('torch.', '') for d in b.dtypes)} inputs, "
            f"got {str(inp.query.dtype).replace('torch.', '')}; use backend='torch' (the reference computes "
            "float64 in float64) or leave backend=None"
        )
    if tangents:  # (asked for a kernel by name: the reference returned above)
        raise NotImplementedError(
            f"{source}: {asked!r} has no forward-mode derivative (torch.func.jvp, jacfwd, torch.autograd.forward_ad "
            "tangents); leave backend=None or use backend='torch': the reference computes it"
        )
    return b


def _plain_cpu_code(query: object, memory: object, values: object, similarity: object,
                    backend: Optional[str]) -> Optional[int]:
    """The similarity's code where this call is the plain CPU case as Python sees it, else None.

    The plain case is what ``resolve`` sends to the "cpu" backend anyway, with nothing for
    Python to do around it: CPU tensors, a float beta and no weights (the callers' test), the
    "cpu" backend asked for or chosen (none asked for, here or in $HEN_KERNELS_BACKEND), no
    autocast, no tracing, no forward-mode dual level.  The C++ side checks the rest (dtypes,
    shapes, a finite lse; a graph to record: update records it with its own autograd
    function, retrieve declines) and declines rather than raising, so every check and message
    stays in :mod:`hen_kernels.validation`.  The same op, plan and thread count as the general
    path: the same bits.
    """
    if (
        type(similarity) is not str
        or not isinstance(query, torch.Tensor)
        or not isinstance(memory, torch.Tensor)
        or not (query.is_cpu and memory.is_cpu)
        or (values is not None and not (isinstance(values, torch.Tensor) and values.is_cpu))
        or (backend != "cpu" and (backend is not None or ENV_BACKEND in os.environ))
        or is_tracing()
        or forward_ad._current_level >= 0  # a dual level: tangents may ride on the inputs (carries_tangents)
    ):
        return None
    return SIMILARITY_CODES.get(similarity)


def plain_beta(beta: torch.Tensor) -> Optional[float]:
    """A beta tensor (one per head, say) as the one float the plain case takes, or None: a CPU tensor whose
    entries are one finite value > 0 (else the general path checks it, with its own message), which nothing
    differentiates (no gradient to record, no tangent), outside tracing and autocast (under which the
    general path casts and the op would return the autocast dtype)."""
    if (beta.device.type != "cpu" or (beta.requires_grad and torch.is_grad_enabled()) or is_tracing()
            or forward_ad._current_level >= 0 or torch.is_autocast_enabled("cpu")):
        return None
    values = beta.reshape(-1).tolist()
    first = values[0] if values else None
    if first is None or not 0 < first <= FLOAT32_MAX or any(v != first for v in values):
        return None
    return first


def _split_bound() -> int:
    """The CPU backend's split_queries_max as the ops' int argument (a float or an unbounded value moved there)."""
    return int(min(BACKENDS["cpu"].split_queries_max, 2**62))


def fast_update(query: object, memory: object, values: object, beta: float, similarity: object,
                backend: Optional[str]) -> Optional[torch.Tensor]:
    """``hopfield_update``'s plain CPU case (:func:`_plain_cpu_code`) in one C++ call, or None."""
    op = _UPDATE_OP
    code = None if op is None else _plain_cpu_code(query, memory, values, similarity, backend)
    if code is None:
        return None
    out = op(query, memory, values, beta, code, _split_bound())
    return out[0] if out else None


def fast_retrieve(query: object, memory: object, values: object, beta: float, similarity: object,
                  backend: Optional[str], max_steps: int, tol: Optional[float]) -> Optional[Retrieval]:
    """``hopfield_retrieve``'s plain CPU case: every step in one C++ call, or None.

    :func:`_plain_cpu_code`'s case with an int ``max_steps`` and a float or None ``tol``
    (the callers' test); the C++ side declines steps, tolerances and widths that
    ``check_steps`` and ``streaming.retrieve`` would refuse, so their messages keep their home.
    """
    op = _RETRIEVE_OP
    code = None if op is None else _plain_cpu_code(query, memory, values, similarity, backend)
    if code is None:
        return None
    r = op(query, memory, values, beta, code, max_steps, tol, _split_bound())
    return Retrieval(*r) if r else None


def fast_self_association(x: torch.Tensor, in_weights: Sequence[torch.Tensor],
                          in_biases: Sequence[Optional[torch.Tensor]], norm_weights: Sequence[Optional[torch.Tensor]],
                          norm_biases: Sequence[Optional[torch.Tensor]], norm_eps: Sequence[float], packed: bool,
                          out_weight: Optional[torch.Tensor], out_bias: Optional[torch.Tensor], heads: int,
                          beta: float, similarity: object, backend: Optional[str]) -> Optional[torch.Tensor]:
    """``nn.Hopfield``'s forward of one (batch, L, width) input for inference in one C++ call, or None.

    The caller's case (``Hopfield._plain_self_association``: q, k and v, in that order, from the
    ``in_weights`` and ``in_biases``, stacked into one product where ``packed``, else each after its
    LayerNorm (``norm_eps`` < 0: none); the out projection's weight and bias or None; one float beta;
    nothing to differentiate) where :func:`_plain_cpu_code` has it plain; the C++ side declines where
    ``hopfield_update``'s would, or where a graph would be recorded, and the general path then answers.
    """
    op = _SELF_ASSOCIATION_OP
    code = None if op is None else _plain_cpu_code(x, x, None, similarity, backend)
    if code is None:
        return None
    out = op(x, in_weights, in_biases, norm_weights, norm_biases, norm_eps, packed, out_weight, out_bias, heads,
             beta, code, _split_bound())
    return out[0] if out else None


# The C++ ops are registered when the package is imported (torch.ops.hen_kernels.partial exists
# from then on); a missing or broken extension is remembered here, not raised.
load_extension()
