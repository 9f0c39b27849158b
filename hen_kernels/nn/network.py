"""``HopfieldNetwork``: the seed's plain recurrent modern Hopfield network over a stored bank."""
from __future__ import annotations

import contextlib
import numbers
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .. import ops
from ..validation import check_beta_value, check_similarity
from . import arguments as A


def _check_rows(name: str, patterns: object, width: Optional[int]) -> Tensor:
    if not isinstance(patterns, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor (N, D), got {type(patterns).__name__}")
    if patterns.dtype not in A.FLOATING:
        raise TypeError(f"{name}: expected a floating tensor (float16, bfloat16, float32 or float64), got "
                        f"{patterns.dtype}; nothing is cast silently: convert it first (e.g. .float())")
    d = "D" if width is None else width
    if patterns.dim() != 2 or patterns.shape[1] == 0 or (width is not None and patterns.shape[1] != width):
        raise ValueError(f"{name}: expected shape (N, {d}), got {tuple(patterns.shape)}")
    if patterns.device.type != "meta":
        bad = ~torch.isfinite(patterns.detach()).all(-1)
        if bool(bad.any()):
            rows = bad.nonzero().flatten()[:5].tolist()
            raise ValueError(f"{name}: rows {rows}{' ...' if int(bad.sum()) > 5 else ''} hold NaN or inf; "
                             "a stored pattern must be finite")
    return patterns


@contextlib.contextmanager
def _named_scaling():
    """The ops' checks name beta; this module's argument is ``scaling``."""
    try:
        yield
    except (TypeError, ValueError) as e:
        if not str(e).startswith("beta:"):
            raise
        raise type(e)("scaling:" + str(e)[len("beta:"):]) from None


class HopfieldNetwork(nn.Module):
    """The recurrent modern Hopfield network: ξ <- softmax(β sim(X, ξ)) X until a fixed point.

    Args:
        patterns: the stored patterns X (N, D), float16 / bfloat16 / float32 / float64, finite; copied.
        scaling: beta, a float > 0 or a tensor broadcastable to the states' leading dims.
        similarity: ``"dot"``, ``"l2"`` (-‖x - ξ‖) or ``"l2sq"`` (-½‖x - ξ‖²).
        update_steps_max: at most this many updates (int >= 1).
        update_steps_eps: a state stops once max|Δξ| <= eps (float >= 0).
        trainable: store X as a parameter (gradients through the fused backward) instead of a buffer.
        backend: hen_kernels backend (None = automatic).

    Shapes: :meth:`forward` takes states (..., B, D) of the bank's dtype and device and returns them
    updated (same shape and dtype); with ``return_info`` also the :class:`hen_kernels.Retrieval` and the
    energy (..., B) (float32, float64 for a float64 bank).  :meth:`store` appends rows to a buffer bank.
    """

    def __init__(self, patterns: Tensor, scaling: Union[float, Tensor] = 1.0, *, similarity: str = "dot",
                 update_steps_max: int = 100, update_steps_eps: float = 1e-4, trainable: bool = False,
                 backend: Optional[str] = None):
        super().__init__()
        patterns = _check_rows("patterns", patterns, None)
        if isinstance(scaling, Tensor):
            if not scaling.is_floating_point():
                raise TypeError(f"scaling: expected a float or a floating tensor, got a {scaling.dtype} tensor")
        elif isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
            raise TypeError(f"scaling: expected a float > 0 or a tensor, got {type(scaling).__name__} {scaling!r}")
        else:
            with _named_scaling():
                scaling = check_beta_value(scaling, patterns.dtype)
        self.similarity = check_similarity(similarity)
        self.update_steps_max = A.check_int("update_steps_max", update_steps_max, 1)
        self.update_steps_eps = A.check_real("update_steps_eps", update_steps_eps, low=0.0)
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"backend: expected None or a backend name (str), got {type(backend).__name__}")
        self.backend = backend
        self.scaling = scaling
        if A.check_bool("trainable", trainable):
            self.stored_patterns = nn.Parameter(patterns.detach().clone())
        else:
            self.register_buffer("stored_patterns", patterns.detach().clone())

    def store(self, patterns: Tensor) -> None:
        """Append ``patterns`` (N', D) to a buffer bank: the bank's dtype and device, finite rows."""
        if isinstance(self.stored_patterns, nn.Parameter):
            raise TypeError("store: the patterns are a trainable parameter; build a new network instead")
        bank = self.stored_patterns
        patterns = _check_rows("patterns", patterns, bank.shape[1])
        if patterns.dtype != bank.dtype:
            raise TypeError(f"patterns: dtype {patterns.dtype} differs from the bank's {bank.dtype}; nothing is "
                            f"cast silently: pass patterns.to({bank.dtype})")
        if patterns.device != bank.device:
            raise ValueError(f"patterns: expected a tensor on {bank.device} (the bank's device), got {patterns.device}")
        self.stored_patterns = torch.cat([bank, patterns.detach()])

    def _check_state(self, state: object) -> Tensor:
        bank = self.stored_patterns
        if not isinstance(state, Tensor):
            raise TypeError(f"state: expected a torch.Tensor (..., B, {bank.shape[1]}), got {type(state).__name__}")
        if state.dim() < 2 or state.shape[-1] != bank.shape[1]:
            raise ValueError(f"state: expected shape (..., B, {bank.shape[1]}) (D of the stored patterns), "
                             f"got {tuple(state.shape)}")
        if state.dtype != bank.dtype:
            raise TypeError(f"state: dtype {state.dtype} differs from the stored patterns' {bank.dtype}; nothing "
                            "is cast silently")
        if bank.shape[0] == 0:
            raise ValueError("stored_patterns: the network holds no patterns (N = 0); store() some first")
        return state

    def energy(self, state: Tensor) -> Tensor:
        """E(ξ) of docs/design.md §1 for states (..., B, D): (..., B)."""
        state = self._check_state(state)
        with _named_scaling():
            return ops.energy(state, self.stored_patterns, self.scaling, similarity=self.similarity,
                              backend=self.backend)

    def forward(self, state: Tensor, return_info: bool = False):
        """Iterate ``state`` (..., B, D) to a fixed point (at most ``update_steps_max`` updates)."""
        state = self._check_state(state)
        with _named_scaling():
            r = ops.hopfield_retrieve(state, self.stored_patterns, self.scaling, similarity=self.similarity,
                                      max_steps=self.update_steps_max, tol=self.update_steps_eps, backend=self.backend)
        if not return_info:
            return r.state
        return r.state, r, self.energy(r.state.detach())
