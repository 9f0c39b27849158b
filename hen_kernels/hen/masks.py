"""Masked queries: which pixels of a query are known, and what a codec makes of that.

A mask is boolean, True where the pixel is known, broadcastable to (B, H, W).  A codec
turns it into per-feature weights for the first Hopfield update (docs/hen.md, "Masked
queries"), so the similarity is taken over what the query knows:

- raw pixels: the mask itself, one weight per pixel and channel;
- spatial latents (TAEF2, diffusers autoencoders): each latent cell weighs the visible
  fraction of its footprint, the factor x factor pixels it covers in the padded frame
  (padding pixels count as the pixels they copy);
- latents without a spatial grid: a mask is refused.

Before a neural codec encodes a masked query, the hidden pixels are filled by
:func:`fill_hidden` (by default "mirror": the visible pixels reflected across the occlusion edge): the
encoder's receptive field reaches past a cell's footprint, so what fills the hidden part
leaks into the visible cells next to it, and a mirrored fill leaks least.  The fill was
chosen on Fashion-MNIST training images (docs/hen.md), never on the reported queries.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def check_mask(mask: object, images: torch.Tensor) -> torch.Tensor:
    """``mask`` as a (B, H, W) bool tensor for ``images`` (B, C, H, W); a named error otherwise."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a bool torch.Tensor broadcastable to (B, H, W), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: expected dtype torch.bool (True where the pixel is known), got {mask.dtype}")
    b, _, h, w = images.shape
    if mask.ndim == 4 and mask.shape[1] == 1:  # (B, 1, H, W), as images are laid out
        mask = mask[:, 0]
    try:
        out = torch.broadcast_to(mask, (b, h, w))
    except RuntimeError:
        raise ValueError(f"mask: expected a shape broadcastable to (B, H, W) = {(b, h, w)}, "
                         f"got {tuple(mask.shape)}") from None
    if b and not bool(out.reshape(b, -1).any(1).all()):
        i = int((~out.reshape(b, -1).any(1)).nonzero()[0])
        raise ValueError(f"mask: query {i} has no known pixel; a query must show something")
    return out.to(images.device)


def _mirror_sources(mask: torch.Tensor, mirror: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """(row, col) per pixel of the (H, W) mask: itself if known, else the pixel it copies.

    A hidden pixel k steps past its nearest known pixel p copies the pixel k - 1 steps
    before p, the mirror image through the occlusion edge; where that is outside the image
    or hidden too (or ``mirror`` is False), it copies p.
    """
    try:
        from scipy import ndimage
    except ImportError as e:  # a dependency of scikit-image, in the package's [hen] extra
        raise ImportError("mask: filling the hidden pixels of a masked query needs scipy (pip install scipy)") from e

    h, w = mask.shape
    hidden = (~mask).cpu().numpy()
    _, (iy, ix) = ndimage.distance_transform_edt(hidden, return_indices=True)
    iy, ix = torch.from_numpy(iy).long(), torch.from_numpy(ix).long()
    if not mirror:
        return iy, ix
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    dy, dx = yy - iy, xx - ix
    ry, rx = iy - dy + dy.sign(), ix - dx + dx.sign()
    inside = (ry >= 0) & (ry < h) & (rx >= 0) & (rx < w)
    ok = inside & mask.cpu()[ry.clamp(0, h - 1), rx.clamp(0, w - 1)]
    return torch.where(ok, ry, iy), torch.where(ok, rx, ix)


FILLS = ("mirror", "nearest", "black")


def mirror_fill(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``images`` (B, C, H, W) with every hidden pixel (``mask`` (B, H, W) False) replaced by its mirror image."""
    return fill_hidden(images, mask, "mirror")


def fill_hidden(images: torch.Tensor, mask: torch.Tensor, how: str = "mirror") -> torch.Tensor:
    """``images`` with the hidden pixels filled: "mirror" (the default, :func:`_mirror_sources`),
    "nearest" (the nearest known pixel) or "black" (0).

    Hidden pixels may hold anything (NaN included): they are never read.  Each distinct
    mask is worked out once.
    """
    if how not in FILLS:
        raise ValueError(f"fill: expected one of {FILLS}, got {how!r}")
    if how == "black":
        return images.masked_fill(~mask[:, None], 0.0)
    out = images.clone()
    h, w = mask.shape[-2:]
    if not len(mask):
        return out
    flat = mask.reshape(len(mask), h * w)
    uniq, inverse = torch.unique(flat, dim=0, return_inverse=True)
    for u in range(len(uniq)):
        m = uniq[u].reshape(h, w)
        if bool(m.all()):
            continue
        rows = (inverse == u).nonzero().squeeze(1)
        sy, sx = _mirror_sources(m, mirror=how == "mirror")
        hid = ~m.cpu()
        src = images[rows][..., sy[hid].to(images.device), sx[hid].to(images.device)]
        sub = out[rows]
        sub[..., hid.to(images.device)] = src
        out[rows] = sub
    return out


def footprint_weights(mask: torch.Tensor, pads: Tuple[int, int, int, int], factor: int,
                      grid: Tuple[int, int]) -> torch.Tensor:
    """(B, gh * gw): the visible fraction of each latent cell's factor x factor footprint.

    ``pads`` (left, right, top, bottom) is the codec's replicate padding, applied to the
    mask as to the image; ``grid`` the latent's (gh, gw), which must match the padded frame.
    """
    m = F.pad(mask[:, None].float(), pads, mode="replicate")
    frac = F.avg_pool2d(m, factor)[:, 0]
    if tuple(frac.shape[-2:]) != tuple(grid):
        raise ValueError(f"mask: the codec's latent grid {tuple(grid)} is not the padded image cut in "
                         f"{factor} x {factor} cells {tuple(frac.shape[-2:])}; this codec cannot take a mask")
    return frac.reshape(len(mask), frac.shape[-2] * frac.shape[-1])
