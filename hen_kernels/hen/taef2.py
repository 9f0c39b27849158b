"""TAEF2: a tiny image autoencoder (distilled from the FLUX.2 VAE), written from its README.

The weights are data kept outside the repository (``taef2_encoder.pth`` and
``taef2_decoder.pth``, plain float16 ``state_dict``s whose keys are
``nn.Sequential`` indices).  :func:`find_taef2_dir` looks for them in the
``path`` argument, else in ``$HEN_TAEF2_DIR``: the package never guesses a folder
outside itself, so where the weights live is the caller's (or the Makefile's) choice.

Architecture (the README's words, as modules):

- ``Block(pooled)``: ``ReLU(conv(ReLU(conv(ReLU(conv(x))))) + x)`` on 64 channels;
  a pooled block first adds ``pool(x)`` = 1x1 conv 64->256, GroupNorm(4, 256), ReLU,
  1x1 conv 256->64 to ``x``.
- encoder: conv 3->64, Block, then three times (stride-2 conv, 3 Blocks; the last
  three pooled), conv 64->32: a latent of 32 x H/8 x W/8.
- decoder: soft clamp ``tanh(z/3)*3``, conv 32->64, ReLU, 3 pooled Blocks, then
  (upsample x2, conv, 3 Blocks) twice, upsample x2, conv, Block, conv 64->3.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
from torch import nn

ENCODER_FILE = "taef2_encoder.pth"
DECODER_FILE = "taef2_decoder.pth"
LATENT_CHANNELS = 32
SCALE = 8  # spatial downsampling factor


def _conv(i: int, o: int, **kw) -> nn.Conv2d:
    return nn.Conv2d(i, o, 3, padding=1, **kw)


class _Pool(nn.Sequential):
    def __init__(self, c: int = 64, hidden: int = 256):
        super().__init__(nn.Conv2d(c, hidden, 1, bias=False), nn.GroupNorm(4, hidden), nn.ReLU(),
                         nn.Conv2d(hidden, c, 1, bias=False))


class Block(nn.Module):
    """Three 3x3 convs with an identity skip; ``pooled`` adds a 1x1 bottleneck branch first."""

    def __init__(self, c: int = 64, pooled: bool = False):
        super().__init__()
        self.conv = nn.Sequential(_conv(c, c), nn.ReLU(), _conv(c, c), nn.ReLU(), _conv(c, c))
        self.pool = _Pool(c) if pooled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return torch.relu(self.conv(x) + x)


class SoftClamp(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z / 3) * 3


def make_encoder() -> nn.Sequential:
    """RGB in [0, 1] (N, 3, H, W), H and W multiples of 8 -> latent (N, 32, H/8, W/8)."""
    c = 64
    return nn.Sequential(
        _conv(3, c), Block(c),
        _conv(c, c, stride=2, bias=False), Block(c), Block(c), Block(c),
        _conv(c, c, stride=2, bias=False), Block(c), Block(c), Block(c),
        _conv(c, c, stride=2, bias=False), Block(c, True), Block(c, True), Block(c, True),
        _conv(c, LATENT_CHANNELS),
    )


def make_decoder() -> nn.Sequential:
    """Latent (N, 32, h, w) -> RGB (N, 3, 8h, 8w), not yet clamped to [0, 1]."""
    c = 64
    up = lambda: nn.Upsample(scale_factor=2, mode="nearest")  # noqa: E731
    return nn.Sequential(
        SoftClamp(), _conv(LATENT_CHANNELS, c), nn.ReLU(),
        Block(c, True), Block(c, True), Block(c, True),
        up(), _conv(c, c, bias=False), Block(c), Block(c), Block(c),
        up(), _conv(c, c, bias=False), Block(c), Block(c), Block(c),
        up(), _conv(c, c, bias=False), Block(c),
        _conv(c, 3),
    )


def find_taef2_dir(path: Optional[Union[str, os.PathLike]] = None) -> Optional[Path]:
    """The folder holding both weight files: ``path`` when given (and only it), else ``$HEN_TAEF2_DIR``;
    None when that folder lacks either file."""
    folder = path if path is not None else os.environ.get("HEN_TAEF2_DIR") or None
    if folder is None:
        return None
    ok = (Path(folder) / ENCODER_FILE).is_file() and (Path(folder) / DECODER_FILE).is_file()
    return Path(folder) if ok else None


def load_taef2(path: Optional[Union[str, os.PathLike]] = None, *, dtype: torch.dtype = torch.float32,
               device: Union[str, torch.device] = "cpu") -> Tuple[nn.Sequential, nn.Sequential]:
    """(encoder, decoder) in eval mode with the weights loaded strictly (every key matched).

    Raises FileNotFoundError naming the places looked in when the weights are not found.
    """
    d = find_taef2_dir(path)
    if d is None:
        raise FileNotFoundError(
            f"TAEF2 weights ({ENCODER_FILE}, {DECODER_FILE}) not found: looked in path={path!r}, "
            f"$HEN_TAEF2_DIR={os.environ.get('HEN_TAEF2_DIR')!r}"
        )
    enc, dec = make_encoder(), make_decoder()
    for module, name in ((enc, ENCODER_FILE), (dec, DECODER_FILE)):
        sd = torch.load(d / name, map_location="cpu", weights_only=True)
        module.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return enc, dec
