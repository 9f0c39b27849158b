"""The hk.nn modules' argument checks, in the user's terms (hflayers' names, the user's shapes).

Constructor arguments are checked once, when the module is built: a wrong
type is a ``TypeError`` and a wrong value a ``ValueError``, each naming the
argument and what was expected, where hflayers asserts or lets torch fail
later.  Forward inputs are checked against the module before any projection,
so a wrong width or batch says ``input[1] (state patterns)`` and ``(batch, L,
8)``, never an internal head-split shape.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

# update_steps_max=None (or negative, hflayers' other spelling of "no limit") means
# "until update_steps_eps": bounded here so a non-contracting configuration still returns.
UNBOUNDED_STEPS = 1000

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return value


def check_int(name: str, value: object, minimum: int, *, optional: bool = False) -> Optional[int]:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        what = "an int or None" if optional else "an int"
        raise TypeError(f"{name}: expected {what} >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return int(value)


def check_real(name: str, value: object, *, low: float, high: float = math.inf, high_open: bool = False) -> float:
    """A finite Python (or 0-d tensor) real number in [low, high], or [low, high) with ``high_open``."""
    if isinstance(value, Tensor) and value.dim() == 0 and value.is_floating_point() and value.device.type != "meta":
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__} {value!r}")
    v = float(value)
    above = v >= high if high_open else v > high
    if not math.isfinite(v) or v < low or above:
        raise ValueError(f"{name}: expected a finite float in [{low}, {high}{')' if high_open else ']'}, got {value!r}")
    return v


def check_dropout(value: object) -> float:
    return check_real("dropout", value, low=0.0, high=1.0, high_open=True)


def check_scaling(scaling: object, num_heads: int, default: float) -> Tuple[float, ...]:
    """beta per head as Python floats (checked before any tensor exists, so a meta device build works)."""
    if scaling is None:
        return (default,) * num_heads
    if isinstance(scaling, Tensor):
        if not scaling.is_floating_point():
            raise TypeError(f"scaling: expected a float or a floating tensor, got a {scaling.dtype} tensor")
        if scaling.dim() > 1 or (scaling.dim() == 1 and scaling.shape[0] != num_heads):
            raise ValueError(f"scaling: expected a float or one entry per head ({num_heads},), "
                             f"got shape {tuple(scaling.shape)}")
        if scaling.device.type == "meta":
            return (default,) * num_heads  # no values to read: reset_parameters() is the user's next call
        values = scaling.detach().double().expand(num_heads).tolist()
    elif isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling: expected a float > 0 or a tensor of one per head, got {type(scaling).__name__} "
                        f"{scaling!r}")
    else:
        values = [float(scaling)] * num_heads
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"scaling: expected every entry finite and > 0, got {values}")
    return tuple(values)


def _per_head(name: str, value: object, num_heads: int, integral: bool) -> Optional[List[float]]:
    """A 0-d or (num_heads,) tensor as one Python number per head (hflayers' tensor form); None if not a tensor."""
    if not isinstance(value, Tensor):
        return None
    kind = "an integer" if integral else "a floating"
    if integral == value.is_floating_point() or value.dtype == torch.bool:
        raise TypeError(f"{name}: expected {kind} tensor (one entry per head), got dtype {value.dtype}")
    if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != num_heads):
        raise ValueError(f"{name}: expected one entry per head ({num_heads},), got shape {tuple(value.shape)}")
    if value.device.type == "meta":
        raise ValueError(f"{name}: a meta tensor holds no values; pass an int, a float or a CPU tensor")
    return value.detach().expand(num_heads).tolist()


def check_steps_max(value: object, num_heads: int) -> Tuple[int, ...]:
    """Updates per head: an int, None, or an integer tensor of one per head; None or < 0 means no limit."""
    per_head = _per_head("update_steps_max", value, num_heads, integral=True)
    if per_head is None:
        if value is None:
            per_head = [-1] * num_heads
        elif isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"update_steps_max: expected an int, None or an integer tensor of one per head, "
                            f"got {type(value).__name__} {value!r}")
        else:
            per_head = [int(value)] * num_heads
    return tuple(UNBOUNDED_STEPS if s < 0 else min(int(s), UNBOUNDED_STEPS) for s in per_head)


def check_steps_eps(value: object, num_heads: int) -> Tuple[float, ...]:
    """Stopping threshold per head: a float >= 0 or a floating tensor of one per head."""
    per_head = _per_head("update_steps_eps", value, num_heads, integral=False)
    if per_head is None:
        per_head = [check_real("update_steps_eps", value, low=0.0)] * num_heads
    if not all(math.isfinite(e) and e >= 0 for e in per_head):
        raise ValueError(f"update_steps_eps: expected every entry finite and >= 0, got {per_head}")
    return tuple(float(e) for e in per_head)


class HeadGroup(NamedTuple):
    """Heads that share their number of updates and their threshold: one multi-step call serves them."""

    heads: Tuple[int, ...]
    steps: int
    eps: float


@functools.lru_cache(maxsize=64)  # called at every forward with the module's (steps, eps) tuples
def head_groups(steps: Tuple[int, ...], eps: Tuple[float, ...]) -> Tuple[HeadGroup, ...]:
    groups: dict = {}
    for h, key in enumerate(zip(steps, eps)):
        groups.setdefault(key, []).append(h)
    return tuple(HeadGroup(tuple(hs), s, e) for (s, e), hs in groups.items())


def check_activation(name: object) -> Optional[Callable[[Tensor], Tensor]]:
    """hflayers' ``association_activation``: the name of a torch function applied to the output."""
    if name is None:
        return None
    if not isinstance(name, str):
        raise TypeError(f"association_activation: expected None or the name of a torch function "
                        f"(e.g. 'tanh'), got {type(name).__name__}")
    fn = getattr(torch, name, None)
    if not callable(fn):
        raise ValueError(f"association_activation: torch has no function {name!r} (hflayers looks the name up "
                         f"on torch, e.g. 'relu', 'tanh', 'sigmoid')")
    try:
        with torch.device("cpu"):
            ok = isinstance(fn(torch.zeros(1, 2)), Tensor)
    except Exception:  # noqa: BLE001 - any failure means the function cannot be applied alone
        ok = False
    if not ok:
        raise ValueError(f"association_activation: torch.{name} cannot be applied to a tensor alone "
                         f"(it needs more arguments); use an element-wise function such as 'tanh'")
    return fn


def layer_norm(enabled: object, affine: object, size: Optional[int], eps: object, what: str) -> Optional[nn.LayerNorm]:
    enabled = check_bool(f"normalize_{what}", enabled)
    affine = check_bool(f"normalize_{what}_affine", affine)
    eps = check_real(f"normalize_{what}_eps", eps, low=0.0)
    if affine and not enabled:
        raise ValueError(f"normalize_{what}_affine: affine normalization needs normalize_{what}=True "
                         f"(hflayers: it has no effect without the normalization)")
    if not enabled:
        return None
    if size is None:
        raise ValueError(f"normalize_{what}: the {what.replace('_', ' ')} size is needed to set up its normalization")
    return nn.LayerNorm(size, eps=eps, elementwise_affine=affine)


# --- forward inputs --------------------------------------------------------------------------------


class Role(NamedTuple):
    """One input of a module as the user sees it: its name in the error and its three axes."""

    name: str  # "input", "input[1]", ...
    what: str  # "state patterns"
    length: str  # "L" or "S"
    width: int  # the feature width the module expects


def layout(role: Role, batch_first: bool) -> str:
    axes = ("batch", role.length) if batch_first else (role.length, "batch")
    return f"({axes[0]}, {axes[1]}, {role.width})"


def check_pattern(t: object, role: Role, batch_first: bool, like: Tensor) -> Tensor:
    """A (batch, length, width) input (or (length, batch, width)) of the module's dtype and device."""
    label = f"{role.name} ({role.what})"
    if not isinstance(t, Tensor):
        raise TypeError(f"{label}: expected a torch.Tensor {layout(role, batch_first)}, got {type(t).__name__}")
    if t.dtype not in FLOATING:
        raise TypeError(f"{label}: expected a floating tensor, got dtype {t.dtype}")
    if t.dim() != 3 or t.shape[-1] != role.width:
        first = "batch_first=True" if batch_first else "batch_first=False"
        raise ValueError(f"{label}: expected shape {layout(role, batch_first)} ({first}), got {tuple(t.shape)}")
    if t.device != like.device and like.device.type != "meta":
        raise ValueError(f"{label}: expected a tensor on {like.device} (the module's device), got {t.device}")
    if t.dtype != like.dtype and not torch.is_autocast_enabled(t.device.type):
        raise TypeError(f"{label}: dtype {t.dtype} differs from the module's {like.dtype}; nothing is cast "
                        f"silently: convert the module (e.g. .to({t.dtype})) or the input (.to({like.dtype}))")
    return t


def check_same(roles_and_sizes: Sequence[Tuple[Role, int]], axis: str) -> None:
    """Every input that has ``axis`` (batch, or S shared by stored patterns and projections) agrees."""
    if not roles_and_sizes:
        return
    (first, size0), rest = roles_and_sizes[0], roles_and_sizes[1:]
    for role, size in rest:
        if size != size0:
            raise ValueError(f"{role.name} ({role.what}): {axis} is {size}, but {first.name} ({first.what}) has "
                             f"{axis} = {size0}; they must agree")


def check_mask_dtype(name: str, mask: object, allow_float: bool) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(mask).__name__}")
    ok = mask.dtype in (torch.bool, torch.uint8) or (allow_float and mask.dtype in FLOATING)
    if not ok:
        kinds = "bool, uint8 or floating" if allow_float else "bool or uint8"
        raise TypeError(f"{name}: expected a {kinds} mask, got dtype {mask.dtype}")
    return mask.bool() if mask.dtype == torch.uint8 else mask


ScalingArg = Optional[Union[float, Tensor]]
StepsArg = Optional[Union[int, Tensor]]
EpsArg = Union[float, Tensor]
