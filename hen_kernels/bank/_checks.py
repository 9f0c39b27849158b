"""Argument checks and the progress bar the banks share (errors name the argument, docs/design.md §4)."""
from __future__ import annotations

import numbers
import os
from typing import Optional, Union

import torch

from ..validation import FLOAT_DTYPES, check_beta_value

PathLike = Union[str, "os.PathLike[str]"]

PROGRESS_DELAY_S = 2.0  # the automatic progress bar shows only once a call has run this long


def check_int(name: str, v: object, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {v}")
    return int(v)


def check_dtype(dtype: object) -> torch.dtype:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype, got {type(dtype).__name__}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")
    return dtype


def check_device(device: object) -> torch.device:
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device: expected a str or torch.device, got {type(device).__name__}")
    try:
        d = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device: {e}") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {d} asked for, but CUDA is not available on this machine")
        if d.index is None:
            d = torch.device("cuda", torch.cuda.current_device())
    elif d.type != "cpu":
        raise ValueError(f"device: expected 'cpu' or a CUDA device, got {d}")
    return d


def check_beta_default(beta: object) -> Optional[float]:
    if beta is None:
        return None
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"beta: expected a float > 0 or None as the bank's default, got {type(beta).__name__}")
    return check_beta_value(beta)


def check_rows(name: str, t: object, width: int, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (the bank's), got {t.dtype}")
    if t.dim() != 2 or t.shape[1] != width:
        raise ValueError(f"{name}: expected shape (M, {width}), got {tuple(t.shape)}")
    if t.numel() and not bool(torch.isfinite(t).all()):
        row = int((~torch.isfinite(t)).any(1).nonzero()[0, 0])
        raise ValueError(
            f"{name}: expected finite entries, row {row} holds NaN or inf (one such row would poison every query)"
        )
    return t.detach()


def check_path(name: str, path: object) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, progress: Optional[bool], desc: str, unit: str = "chunk"):
    """A tqdm bar: always with progress=True, never with False; None shows it on a terminal after 2 s."""
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress: expected a bool or None, got {type(progress).__name__}")
    if progress is False or total <= 0:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", leave=False, dynamic_ncols=True,
                delay=0.0 if progress else PROGRESS_DELAY_S, disable=False if progress else None)
