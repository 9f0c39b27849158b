"""HEN: Hopfield Encoding Networks (Kashyap et al., "Modern Hopfield Networks meet Encoded Neural
Representations - Addressing Practical Considerations").

Content is encoded before it is stored and decoded after it is recalled (the paper's
Eqs. 5-7): ``store`` encodes images (and optionally their captions) into a
:class:`hen_kernels.MemoryBank`; ``recall`` encodes damaged images and runs the
Hopfield dynamics in latent space with the bank's public ``retrieve``; the image part
of the final state is decoded.  ``recall_text`` is the hetero-association of the
paper's §3.2: memories are ``[image latent; text latent]``, a query is
``[0; text latent]``, and the image part of the fixed point is decoded.

Normalisation (the paper: the two energy landscapes "must be appropriately
normalized"), explicit and the same for every codec:

1. each part (image, text) is centred by the per-dimension mean of the patterns of the
   first ``store`` call and divided by one scalar, the root-mean-square norm of those
   centred patterns, so a stored part has E‖x‖² = 1 whatever the codec or encoder; the
   text part is then multiplied by ``text_weight``;
2. when memories carry text, each part is followed by one *norm pad* coordinate
   ``c = (R² - ‖x‖²)^½`` (R = 1.5 x the largest stored norm of that part), so every
   stored part has the same norm R.  A query that lacks a part (the paper's zeros)
   leaves the part and its pad at 0, so that part adds the same ‖x‖² + c² = R² to the
   squared distance of every memory and drops out of the ranking: a caption query is
   matched on the caption alone, whatever the images' norms, and an image query on the
   image alone.  A query that has a part sets its pad to (R² - ‖q‖²)^½, which adds only
   (c_n - c_q)² ≈ (‖x_n‖² - ‖q‖²)² / 4R², a small term.  Without pads, the ℓ2 distance
   of ``[0; t]`` to ``[x_n; y_n]`` is ‖x_n‖² + ‖y_n - t‖², and the image with the smallest
   norm wins over the right caption.

Masked queries (``recall(images, mask=...)``, hen/masks.py): the codec turns the pixel
mask into per-feature weights of the image part, rescaled to mean 1 over the image part so
the weighted distance estimates the whole one and beta keeps its meaning (pads and text
parts weigh 0).  Only the *first* update is weighted (``weights=`` of
``MemoryBank.retrieve``): it lands on a stored pattern, complete, and the later steps
compare that full state as usual.  Measured on Fashion-MNIST training images (docs/hen.md,
``hen experiment masking``): keeping the weights for every step recalled exactly as often
from beta 30 up, and at most a point apart below, where both fail; dropping them lets the
later steps run the unweighted kernels.  Rescaling the weights recalls more at beta 30
(99.0 % against 97.6 %) and as often above.

Step 1 makes beta mean the same thing across codecs (a beta sweep compares like with
like) and makes the zero of a query's missing part the *mean* pattern.  The statistics
are kept (``image_norm``, ``text_norm``) and reused by later ``store`` calls, so a bank
can grow; with captions a later row longer than R is refused (``PartNorm.check_within``:
without its full pad it would rank wrongly), so the first store should be a sample of the data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from ..backends import resolve
from ..bank import MemoryBank
from ..bank._checks import check_path, check_rows
from ..bank.file_io import check_new_bank_path
from ..validation import check_inputs, check_similarity
from .codecs import ImageCodec, TextEncoder


@dataclass
class PartNorm:
    """x -> (x - mean) / scale * weight, and back."""

    mean: torch.Tensor
    scale: float
    weight: float = 1.0
    radius: float = 0.0
    fitted_rows: int = 0  # how many rows the statistics were fitted on (the first store's)

    @classmethod
    def fit(cls, z: torch.Tensor, weight: float = 1.0, enabled: bool = True) -> "PartNorm":
        if not enabled:
            norm = cls(torch.zeros(z.shape[1]), 1.0, weight)
        else:
            mean = z.mean(0)
            scale = float((z - mean).pow(2).sum(1).mean().sqrt())
            norm = cls(mean, scale if scale > 0 else 1.0, weight)
        norm.radius = 1.5 * float(norm.forward(z).norm(dim=1).max()) + 1e-6
        norm.fitted_rows = len(z)
        return norm

    def check_within(self, name: str, x: torch.Tensor) -> None:
        """Refuse normalised rows x longer than R: with pad 0 they would not have norm R, so a query lacking
        this part would not see it drop out of the ranking (a first store of 1-3 rows made R small enough
        that most later rows passed it, and recall then missed 49 of 50 stored images)."""
        norms = x.norm(dim=1)
        over = (norms > self.radius).nonzero().flatten()
        if over.numel():
            i = int(over[0])
            raise ValueError(
                f"{name}: {over.numel()} row(s) lie past the norm pad's radius R = {self.radius:.4g} that the "
                f"first store fitted on its {self.fitted_rows} row(s) (1.5 x their largest normalised norm), the "
                f"first row {i} at {float(norms[i]):.4g}; stored, they would rank wrongly against queries that "
                "lack a part.  Make the first store a sample of the data (its statistics are kept), or store "
                "these in a HEN of their own"
            )

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1): the norm pad (R² - ‖x‖²)^½ of normalised rows x (0 past R)."""
        return (self.radius ** 2 - x.pow(2).sum(1, keepdim=True)).clamp_min(0).sqrt()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (z.float() - self.mean) * (self.weight / self.scale)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * (self.scale / self.weight) + self.mean


@dataclass
class Recall:
    """What a recall returns, per query.

    ``images``: the decoded image part of the final state (None with ``decode=False``);
    ``latents``: that image part back in the codec's latent space; ``index``: the bank row
    that scored best at the last step; ``top_weight``: its softmax weight (≈1: one memory,
    small: a metastable mix); ``steps``, ``converged``: of the dynamics; ``state``: the
    final normalised state, both parts.
    """

    images: Optional[torch.Tensor]
    latents: torch.Tensor
    index: torch.Tensor
    top_weight: torch.Tensor
    steps: torch.Tensor
    converged: torch.Tensor
    state: torch.Tensor


class HEN:
    """A Hopfield Encoding Network over a :class:`~hen_kernels.MemoryBank`.

    ``HEN(codec, *, text_encoder=None, beta, similarity="l2", max_steps=100, tol=1e-4,
    normalize=True, text_weight=1.0, batch_size=256, dtype=torch.float32, device="cpu",
    storage="device", path=None, chunk_rows=None, backend=None, progress=None)``

    - ``codec``: an :class:`~hen_kernels.hen.codecs.ImageCodec` (identity for the raw-image MHN).
    - ``text_encoder``: a :class:`~hen_kernels.hen.codecs.TextEncoder`; needed for ``texts`` in
      ``store`` and for ``recall_text``.
    - ``beta``, ``similarity``: of the dynamics, in the normalised space (module docstring).
    - ``max_steps``, ``tol``: each query stops once max|s_new - s| <= tol.
    - ``normalize``: False stores the codec's latents as they are (no centring or scaling).
    - ``batch_size``: queries per retrieve call (a batch stops when all its queries have), an int >= 1.
    - ``dtype``, ``device``, ``storage``, ``path``, ``chunk_rows``, ``backend``: the bank's, checked here
      (the bank itself is built by the first ``store``).
    """

    def __init__(self, codec: ImageCodec, *, text_encoder: Optional[TextEncoder] = None, beta: float,
                 similarity: str = "l2", max_steps: int = 100, tol: Optional[float] = 1e-4,
                 normalize: bool = True, text_weight: float = 1.0, batch_size: int = 256,
                 dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu",
                 storage: str = "device", path=None, chunk_rows: Optional[int] = None,
                 backend: Optional[str] = None, progress: Optional[bool] = None):
        if not isinstance(codec, ImageCodec):
            raise TypeError(f"codec: expected an ImageCodec, got {type(codec).__name__}")
        if text_encoder is not None and not isinstance(text_encoder, TextEncoder):
            raise TypeError(f"text_encoder: expected a TextEncoder or None, got {type(text_encoder).__name__}")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0 < beta < math.inf):
            raise ValueError(f"beta: expected a finite float > 0, got {beta!r}")
        if isinstance(text_weight, bool) or not isinstance(text_weight, (int, float)) or not 0 < text_weight < math.inf:
            raise ValueError(f"text_weight: expected a finite float > 0, got {text_weight!r}")
        for arg, v in (("max_steps", max_steps), ("batch_size", batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{arg}: expected an int >= 1, got {v!r}")
        if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < math.inf):
            raise ValueError(f"tol: expected None or a finite float >= 0, got {tol!r}")
        self._bank_kw = dict(dtype=dtype, device=device, storage=storage, path=path, chunk_rows=chunk_rows,
                             similarity=similarity, beta=float(beta), backend=backend)
        # The bank is built by the first store(), after every image is encoded (minutes with a neural codec):
        # a throwaway one-column bank runs the bank's own checks of dtype, device, storage, chunk_rows and
        # similarity now, and resolve() those of the backend for that dtype and device.  A disk bank's file is
        # created only by store(), so here its path is only checked to be one where a bank can be created.
        disk = storage == "disk"
        probe = MemoryBank(1, **{**self._bank_kw, "storage": "host" if disk else storage,
                                 "path": None if disk else path})
        if disk:
            check_new_bank_path(check_path("path", path))
        z = torch.zeros(1, 1, dtype=probe.dtype, device=probe.device)
        resolve(backend, check_inputs(z, z, float(beta), similarity))
        self.codec = codec
        self.text_encoder = text_encoder
        self.beta = float(beta)
        self.similarity = check_similarity(similarity)
        self.max_steps = int(max_steps)
        self.tol = tol
        self.normalize = bool(normalize)
        self.text_weight = float(text_weight)
        self.batch_size = int(batch_size)
        self.progress = progress
        self.bank: Optional[MemoryBank] = None
        self.image_norm: Optional[PartNorm] = None
        self.text_norm: Optional[PartNorm] = None
        self.image_dim = 0
        self.text_dim = 0

    def __len__(self) -> int:
        return 0 if self.bank is None else len(self.bank)

    @property
    def has_text(self) -> bool:
        return self.text_dim > 0

    @property
    def row_dim(self) -> int:
        """Width of a bank row: the image part, then (with text) its pad, the text part and its pad."""
        return self.image_dim + (self.text_dim + 2 if self.has_text else 0)

    # --- encoding -------------------------------------------------------------------

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.codec.encode(images, progress=self.progress)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        if self.text_encoder is None:
            raise ValueError("text_encoder: this HEN has none; pass text_encoder=... to use captions")
        return self.text_encoder.encode(texts)

    # --- storing --------------------------------------------------------------------

    def store(self, images: Optional[torch.Tensor] = None, texts: Optional[Sequence[str]] = None, *,
              latents: Optional[torch.Tensor] = None, text_latents: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Encode and store images (and their captions); returns the bank ids.

        ``latents`` / ``text_latents`` give already-encoded parts (the experiments cache them), instead
        of ``images`` / ``texts``, not with them.  The first call fixes the normalisation and whether
        memories carry a text part.  Everything is checked before anything is fitted or stored, so a
        call that raises leaves the HEN as it was.
        """
        _one_of("images", images, "latents", latents)
        _one_of("texts", texts, "text_latents", text_latents)
        first = self.bank is None
        if not first and (texts is not None or text_latents is not None) != self.has_text:
            raise ValueError("texts: every store call must give captions, or none, like the first one")

        def check_captions(n: int) -> None:
            if texts is not None and len(texts) != n:
                raise ValueError(f"texts: expected {n} captions (one per image), got {len(texts)}")

        if latents is None:
            if images is None:
                raise ValueError("images: pass images or latents")
            if isinstance(images, torch.Tensor):  # before the images' encoding, which may take minutes
                check_captions(len(images))
            latents = self.encode_images(images)
        if not isinstance(latents, torch.Tensor) or latents.ndim != 2 or len(latents) == 0:
            raise ValueError(f"latents: expected a non-empty (N, D) tensor, got "
                             f"{tuple(getattr(latents, 'shape', ())) or type(latents).__name__}")
        if texts is not None:
            check_captions(len(latents))
            text_latents = self.encode_texts(texts)
        latents = _check_part("latents", latents, None if first else self.image_dim)
        if text_latents is not None:
            text_latents = _check_part("text_latents", text_latents, None if first else self.text_dim, len(latents))
        if first:  # fitted into locals: kept only once the rows are known to be storable
            image_norm = PartNorm.fit(latents, 1.0, self.normalize)
            text_norm = None if text_latents is None else PartNorm.fit(text_latents, self.text_weight, self.normalize)
        else:
            image_norm, text_norm = self.image_norm, self.text_norm
        rows = image_norm.forward(latents)
        if text_norm is not None:
            t = text_norm.forward(text_latents)
            if not first:
                image_norm.check_within("latents" if images is None else "images", rows)
                text_norm.check_within("text_latents" if texts is None else "texts", t)
            rows = torch.cat([rows, image_norm.pad(rows), t, text_norm.pad(t)], 1)
        dtype = self._bank_kw["dtype"]
        # (finite latents can still overflow the bank's dtype: refused here, before a first call builds the bank)
        rows = check_rows("latents", rows.to(dtype), rows.shape[1], dtype)
        if first:
            bank = MemoryBank(rows.shape[1], **self._bank_kw)
            ids = bank.add(rows.to(bank.device))
            self.bank, self.image_norm, self.text_norm = bank, image_norm, text_norm
            self.image_dim, self.text_dim = latents.shape[1], 0 if text_latents is None else text_latents.shape[1]
            return ids
        return self.bank.add(rows.to(self.bank.device))

    def stored_latents(self, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The image latents of stored rows (all, or ``index``: row numbers in [0, len(self))), in the codec's space.

        A negative index is refused, not read from the end: the kernels' ``top_index`` is -1 where no row
        matched, and reading it as "the last row" would hand back a stored image as if it had been recalled.
        """
        self._require_bank()
        if index is not None:
            index = torch.as_tensor(index)
            if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
                raise TypeError(f"index: expected integer row numbers, got {index.dtype}")
            out = index[(index < 0) | (index >= len(self))]
            if out.numel():
                raise IndexError(f"index: expected row numbers in [0, {len(self)}), got {int(out[0])}"
                                 + (" (a top_index of -1: no row matched)" if int(out[0]) == -1 else ""))
        rows, _ = self.bank.read()
        if index is not None:
            rows = rows[index]
        return self.image_norm.inverse(rows[:, :self.image_dim])

    # --- recalling ------------------------------------------------------------------

    def _require_bank(self) -> None:
        if self.bank is None or len(self.bank) == 0:
            raise ValueError("store: the bank is empty; store images first")

    def _retrieve(self, q: torch.Tensor, w: Optional[torch.Tensor]):
        """One batch: (state, top_index, top_weight, steps, converged); a weighted first step when ``w``."""
        kw = dict(similarity=self.similarity, tol=self.tol, progress=False)
        if w is None:
            r = self.bank.retrieve(q, self.beta, max_steps=self.max_steps, **kw)
            return r.state, r.top_index, r.top_weight, r.steps, r.converged
        first = self.bank.retrieve(q, self.beta, max_steps=1, weights=w, **kw)
        if self.max_steps == 1:
            return first.state, first.top_index, first.top_weight, first.steps, first.converged
        r = self.bank.retrieve(first.state, self.beta, max_steps=self.max_steps - 1, **kw)
        return r.state, r.top_index, r.top_weight, r.steps + first.steps, r.converged

    def _bank_rows(self, q: torch.Tensor, name: str, first: int) -> torch.Tensor:
        """Normalised query rows as the bank holds its rows.  A finite latent can leave the bank's range once
        normalised and cast (float64 latents past float32's, or a float16 bank's 65504): the kernels would answer
        it with NaN and index -1, decoded as if it were a recall."""
        rows = q.to(self.bank.dtype).to(self.bank.device)
        bad = ~torch.isfinite(rows).all(1)
        if bool(bad.any()):
            k = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name}: row {first + k} leaves the range of the bank's {self.bank.dtype} once "
                             "normalised: its latents lie far outside the stored ones'")
        return rows

    def _run(self, query: torch.Tensor, decode: bool, desc: str, weights: Optional[torch.Tensor] = None,
             name: str = "latents") -> Recall:
        from tqdm.auto import tqdm

        if not len(query):  # no queries: a defined empty answer, not a failed concatenation
            latents = torch.zeros(0, self.image_dim)
            none = torch.zeros(0, dtype=torch.int64)
            return Recall(images=self.codec.decode(latents) if decode else None, latents=latents, index=none,
                          top_weight=torch.zeros(0), steps=none, converged=torch.zeros(0, dtype=torch.bool),
                          state=torch.zeros(0, self.row_dim))
        parts = []
        show = self.progress if self.progress is not None else len(query) > 4 * self.batch_size
        for i in tqdm(range(0, len(query), self.batch_size), desc=desc, unit="batch", disable=not show, leave=False):
            q = self._bank_rows(query[i:i + self.batch_size], name, i)
            w = None if weights is None else weights[i:i + self.batch_size].to(self.bank.device)
            parts.append(self._retrieve(q, w))
        state, index, top_weight, steps, converged = (torch.cat(t).cpu() for t in zip(*parts))
        state = state.float()
        latents = self.image_norm.inverse(state[:, :self.image_dim])
        return Recall(
            images=self.codec.decode(latents, progress=self.progress) if decode else None,
            latents=latents,
            index=index,
            top_weight=top_weight.float(),
            steps=steps,
            converged=converged,
            state=state,
        )

    def image_query(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised query rows for image latents: ``[x; 0]`` when memories carry text."""
        q = self.image_norm.forward(latents)
        if self.has_text:
            q = torch.cat([q, self.image_norm.pad(q), torch.zeros(len(q), self.text_dim + 1)], 1)
        return q

    def image_weights(self, latent_weights: torch.Tensor, rows: Optional[int] = None) -> torch.Tensor:
        """(B, row_dim) float32 weights of a masked image query: the codec's latent weights rescaled to
        mean 1 over the image part, 0 for the pads and the text part (module docstring).  ``rows``: the
        number of queries they weigh, one row each."""
        w = latent_weights.float()
        if w.ndim != 2 or w.shape[1] != self.image_dim or (rows is not None and len(w) != rows):
            raise ValueError(f"latent_weights: expected ({'B' if rows is None else rows}, {self.image_dim}) "
                             f"(one row per query), got {tuple(w.shape)}")
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError("latent_weights: expected finite weights >= 0")
        total = w.sum(1, keepdim=True)
        if bool((total <= 0).any()):
            raise ValueError(f"mask: query {int((total[:, 0] <= 0).nonzero()[0])} shows no latent feature")
        w = w * (self.image_dim / total)
        if self.has_text:
            w = torch.cat([w, torch.zeros(len(w), self.text_dim + 2)], 1)
        return w.contiguous()

    def text_query(self, text_latents: torch.Tensor) -> torch.Tensor:
        """Normalised query rows for caption latents: ``[0; t]`` (the paper's §3.2), with its pads."""
        if not self.has_text:
            raise ValueError("texts: the stored memories carry no text part; store images with texts=...")
        t = self.text_norm.forward(_check_part("text_latents", text_latents, self.text_dim))
        return torch.cat([torch.zeros(len(t), self.image_dim + 1), t, self.text_norm.pad(t)], 1)

    def recall(self, queries: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None, *,
               latents: Optional[torch.Tensor] = None, latent_weights: Optional[torch.Tensor] = None,
               decode: bool = True) -> Recall:
        """Recall stored images from damaged ones (occluded, noisy), (N, C, H, W) in [0, 1].

        ``mask``: bool, broadcastable to (N, H, W), True where a pixel is known; the hidden
        pixels may hold anything (NaN included).  The first update then compares only what is
        known (module docstring).  ``latents`` (and, for a masked query, ``latent_weights``
        from ``codec.encode_masked``) give queries already encoded.
        """
        self._require_bank()
        _one_of("queries", queries, "latents", latents)
        if latents is None:
            if queries is None:
                raise ValueError("queries: pass images or latents")
            if mask is None:
                latents = self.encode_images(queries)
            else:
                latents, latent_weights = self.codec.encode_masked(queries, mask, progress=self.progress)
        elif mask is not None:
            raise ValueError("mask: give the images with mask=, or latents with latent_weights=, not latents and mask")
        latents = self._check_latents(latents)
        weights = None if latent_weights is None else self.image_weights(latent_weights, len(latents))
        return self._run(self.image_query(latents), decode, "recall", weights)

    def nearest(self, latents: torch.Tensor, latent_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(N,) the bank row nearest each encoded query (weighted like a masked first step): what a
        perfectly sharp one-step recall would return."""
        self._require_bank()
        q = self.image_query(self._check_latents(latents))
        w = None if latent_weights is None else self.image_weights(latent_weights, len(q))
        if not len(q):  # no queries: an empty answer, as recall() gives
            return torch.zeros(0, dtype=torch.int64)
        out = []
        for i in range(0, len(q), self.batch_size):
            kw = {} if w is None else dict(weights=w[i:i + self.batch_size].to(self.bank.device))
            r = self.bank.retrieve(self._bank_rows(q[i:i + self.batch_size], "latents", i), self.beta,
                                   similarity=self.similarity, max_steps=1, progress=False, **kw)
            out.append(r.top_index.cpu())
        return torch.cat(out)

    def _check_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return _check_part("latents", latents, self.image_dim)

    def recall_text(self, texts: Optional[Sequence[str]] = None, *, text_latents: Optional[torch.Tensor] = None,
                    decode: bool = True) -> Recall:
        """Hetero-association: recall the images stored with these captions."""
        self._require_bank()
        _one_of("texts", texts, "text_latents", text_latents)
        if text_latents is None:
            if texts is None:
                raise ValueError("texts: pass captions or text_latents")
            text_latents = self.encode_texts(texts)
        return self._run(self.text_query(text_latents), decode, "recall_text", name="text_latents")

    def __repr__(self) -> str:
        return (f"HEN(codec={self.codec.name!r}, text_encoder={getattr(self.text_encoder, 'name', None)!r}, "
                f"beta={self.beta:g}, similarity={self.similarity!r}, stored={len(self)}, "
                f"dim={self.image_dim}+{self.text_dim})")


def _one_of(name: str, value: object, other: str, other_value: object) -> None:
    """Refuse two ways of giving the same input: one would be silently ignored."""
    if value is not None and other_value is not None:
        raise ValueError(f"{name}, {other}: give {name} or {other}, not both")


def _check_part(name: str, t: object, width: Optional[int], rows: Optional[int] = None) -> torch.Tensor:
    """A part's latents: a floating (N, width) tensor (any width >= 1 when None; N = ``rows`` when given),
    finite, since one NaN row would give every query a NaN score."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 2 or (t.shape[1] != width if width is not None else t.shape[1] == 0) or (
            rows is not None and len(t) != rows):
        raise ValueError(f"{name}: expected a ({'N' if rows is None else rows}, {'D' if width is None else width}) "
                         f"tensor, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
    bad = ~torch.isfinite(t).all(1)
    if bool(bad.any()):
        raise ValueError(f"{name}: expected finite values, row {int(bad.nonzero()[0, 0])} holds NaN or inf")
    return t
