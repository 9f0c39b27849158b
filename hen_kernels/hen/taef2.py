"""TAEF2: a tiny image autoencoder (distilled from the FLUX.2 VAE), written from its README.

Where the weights come from, in this order (:func:`find_taef2`):

1. the ``source`` argument, and only it when given: a folder, a weights file, or a hub id
   such as ``"madebyollin/taef2"``;
2. ``$HEN_TAEF2_DIR`` (a folder or a file), and only it when set;
3. the Hugging Face hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
   ``~/.cache/huggingface/hub``), offline, for ``madebyollin/taef2``;
4. a download of ``taef2.safetensors`` from ``madebyollin/taef2`` into that cache, when
   ``huggingface_hub`` is installed, ``$HF_HUB_OFFLINE`` is not set and the network allows.

Two weight layouts load: the published ``taef2.safetensors`` (one file; keys
``encoder.layers.N...`` and ``decoder.layers.N...``, the decoder's counted without its
parameter-free clamp) and a folder with ``taef2_encoder.pth`` / ``taef2_decoder.pth``
(plain float16 ``state_dict``s keyed by ``nn.Sequential`` index).  Either is loaded with
every key matched.

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
import re
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

ENCODER_FILE = "taef2_encoder.pth"
DECODER_FILE = "taef2_decoder.pth"
HUB_REPO = "madebyollin/taef2"
HUB_FILE = "taef2.safetensors"
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




# --- where the weights are ------------------------------------------------------------

Source = Union[str, "os.PathLike[str]"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def missing_message(source: Optional[Source] = None, reason: str = "") -> str:
    """What to tell a user without the weights: where they are published and how to point at them."""
    looked = (f"the path {str(source)!r}" if source is not None else
              f"$HEN_TAEF2_DIR={os.environ['HEN_TAEF2_DIR']!r}" if os.environ.get("HEN_TAEF2_DIR") else
              f"the hub cache {hub_cache_dir()} (for {HUB_REPO})")
    return (
        f"TAEF2 weights not found (looked in {looked}{'; ' + reason if reason else ''}). They are published at "
        f"https://huggingface.co/{HUB_REPO} ({HUB_FILE}, MIT licence). With huggingface_hub installed "
        f"(pip install huggingface_hub) and network access, TAEF2Codec() downloads them into the hub cache once; "
        f"offline, download {HUB_FILE} elsewhere and pass its folder (TAEF2Codec('FOLDER')) or set "
        f"HEN_TAEF2_DIR=FOLDER, or copy a hub cache that holds it and set HF_HUB_CACHE."
    )


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (as huggingface_hub reads it)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _weights_at(place: Path) -> Optional[Path]:
    """The weights a folder or a .safetensors file holds (the folder for the .pth pair, else the file), or None."""
    if place.is_file():
        return place if place.suffix == ".safetensors" else None
    if (place / ENCODER_FILE).is_file() and (place / DECODER_FILE).is_file():
        return place
    if (place / HUB_FILE).is_file():
        return place / HUB_FILE
    return None


def cached_hub_file(repo: str, filename: str, revision: str = "main") -> Optional[Path]:
    """``filename`` of hub repo ``repo`` in the local hub cache (its documented layout), without the network."""
    root = hub_cache_dir() / f"models--{repo.replace('/', '--')}"
    ref = root / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    f = root / "snapshots" / commit / filename
    return f if f.is_file() else None


def hub_download(repo: str, filename: str) -> Tuple[Optional[Path], str]:
    """(path, "") after downloading into the hub cache, or (None, why not)."""
    if hub_offline():
        return None, "HF_HUB_OFFLINE is set"
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return None, "huggingface_hub is not installed"
    try:
        return Path(hf_hub_download(repo, filename, cache_dir=str(hub_cache_dir()))), ""
    except Exception as e:  # no network, unknown repo, ...: the caller reports it with the other places
        return None, f"download from {repo} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def is_hub_id(source: Source) -> bool:
    return isinstance(source, str) and not Path(source).exists() and bool(_HUB_ID.match(source))


def find_taef2(source: Optional[Source] = None, *, download: bool = False) -> Tuple[Optional[Path], str]:
    """(where the weights are, "") or (None, why not), in the module docstring's order.

    ``download=False`` never touches the network (what ``hen info`` and the tests' skips use).
    """
    if source is not None:
        if is_hub_id(source):
            hit = cached_hub_file(str(source), HUB_FILE)
            if hit is None and download:
                return hub_download(str(source), HUB_FILE)
            return hit, "" if hit else "not in the hub cache"
        return _weights_at(Path(source)), ""
    env = os.environ.get("HEN_TAEF2_DIR")
    if env:
        return _weights_at(Path(env)), ""
    hit = cached_hub_file(HUB_REPO, HUB_FILE)
    if hit is None and download:
        return hub_download(HUB_REPO, HUB_FILE)
    return hit, ""


def find_taef2_dir(path: Optional[Source] = None) -> Optional[Path]:
    """Where the weights are (a folder of the .pth pair or a weights file), without any download; None if absent."""
    return find_taef2(path, download=False)[0]


def _split_safetensors(sd: Dict[str, torch.Tensor], enc: nn.Sequential,
                       dec: nn.Sequential) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """The published file's two halves, keyed like our modules.

    Its decoder indices omit the parameter-free clamp, so they are shifted to put the first
    convolution where our decoder has it; the shift is measured from the tensors, not assumed.
    """
    out = []
    for part, module in (("encoder", enc), ("decoder", dec)):
        sub = {}
        for k, v in sd.items():
            m = re.match(rf"^{part}\.(?:layers\.)?(\d+)\.(.+)$", k)
            if m:
                sub[int(m.group(1)), m.group(2)] = v
        if not sub:
            raise ValueError(f"{HUB_FILE}: no {part} tensors (expected keys like '{part}.layers.0.weight')")
        first_file = min(i for i, _ in sub)
        first_ours = min(int(k.split(".")[0]) for k in module.state_dict())
        shift = first_ours - first_file
        out.append({f"{i + shift}.{rest}": v for (i, rest), v in sub.items()})
    return out[0], out[1]


def _read_weights(path: Path, read):
    """``read(path)``, where a file that does not read (cut short, another format) is a ValueError naming it;
    torch's and safetensors' own messages named neither the file nor what it was meant to hold."""
    try:
        return read(path)
    except Exception as e:  # (torch's RuntimeError and UnpicklingError, safetensors' SafetensorError, EOFError...)
        raise ValueError(f"source: {path} does not read as TAEF2 weights (a download cut short, or another "
                         f"file?): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def load_taef2(source: Optional[Source] = None, *, download: bool = True, dtype: torch.dtype = torch.float32,
               device: Union[str, torch.device] = "cpu") -> Tuple[nn.Sequential, nn.Sequential]:
    """(encoder, decoder) in eval mode, every weight key matched.

    ``source``: a folder, a weights file or a hub id (module docstring); None looks in
    ``$HEN_TAEF2_DIR``, the hub cache, then (``download=True``) downloads.  Raises
    FileNotFoundError saying where the weights are published and how to point at them.
    """
    where, why = find_taef2(source, download=download)
    if where is None:
        raise FileNotFoundError(missing_message(source, why))
    enc, dec = make_encoder(), make_decoder()
    if where.is_dir():
        parts = [_read_weights(where / name, lambda f: torch.load(f, map_location="cpu", weights_only=True))
                 for name in (ENCODER_FILE, DECODER_FILE)]
    elif where.suffix == ".safetensors":
        from safetensors.torch import load_file

        parts = _split_safetensors(_read_weights(where, lambda f: load_file(str(f))), enc, dec)
    else:
        raise ValueError(f"source: {where} is not a TAEF2 weights file ({HUB_FILE}, or a folder with "
                         f"{ENCODER_FILE} and {DECODER_FILE})")
    for module, sd, name in ((enc, parts[0], "encoder"), (dec, parts[1], "decoder")):
        try:
            module.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        except RuntimeError as e:
            raise ValueError(f"source: the {name} weights in {where} do not fit TAEF2: {e}") from None
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return enc, dec
