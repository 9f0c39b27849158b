"""How masked queries are made: the choices behind ``HEN.recall(images, mask=...)``, measured on
Fashion-MNIST *training* images that none of the reported experiments query.

The bank: training images ``first`` .. ``first + n_bank`` (54,000-59,999 by default; table1's
queries come from the first 6,000, so no reported query is used here); ``n_queries`` of them
(seed 1) with a half hidden are recalled (ℓ2, TAEF2, up to 100 steps) under each choice:

- ``padding``: TAEF2 needs sides that are multiples of 8, so 28 x 28 images are padded to
  32 x 32: "end" (right and bottom, 28 + 4) puts the middle of the image inside latent row 1;
  "centre" (2 + 28 + 2) puts it on the boundary between rows 1 and 2;
- ``fill``: what the encoder sees in the hidden half ("mirror", "nearest", "black");
- ``cells``: a latent cell's weight is the visible fraction of its 8 x 8 footprint
  ("fraction"), or 1 only when all of it is visible ("whole");
- ``steps``: the weights in the first update only ("first"), or in every update ("all");
- ``rescale``: the weights rescaled to mean 1 (so beta keeps its meaning), or not;
- ``beta``.

The unmasked queries (half and quarter hidden in black, noise) are recalled under both
paddings too, to show that the padding the package ships does not cost them anything.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ... import ops
from .. import metrics
from ..codecs import ImageCodec, TAEF2Codec
from ..data import HALVES, load_fashion_mnist, occlude, visible_mask
from ..layer import HEN
from ..masks import FILLS
from .common import (UsageError, available_codecs, cached_encode, check_betas, check_count, clamp_queries,
                     markdown_table, write_results)

BETAS = (10.0, 30.0, 100.0, 200.0)
BETA = 200.0


def _recall(hen: HEN, lat: torch.Tensor, w: Optional[torch.Tensor], *, beta: float, steps: str, rescale: bool,
            max_steps: int) -> torch.Tensor:
    """Final best row per query under one variant of the weighted dynamics (ops directly, any variant)."""
    rows, _ = hen.bank.read()
    q = hen.image_query(lat)
    kw = dict(similarity="l2", tol=1e-4)
    if w is None:
        return ops.hopfield_retrieve(q, rows, beta, max_steps=max_steps, **kw).top_index
    w = hen.image_weights(w) if rescale else w.float().contiguous()
    if steps == "all":
        return ops.hopfield_retrieve(q, rows, beta, max_steps=max_steps, weights=w, **kw).top_index
    first = ops.hopfield_retrieve(q, rows, beta, max_steps=1, weights=w, **kw)
    return ops.hopfield_retrieve(first.state, rows, beta, max_steps=max_steps - 1, **kw).top_index


def run(out: Path, *, quick: bool = False, first: int = 54000, n_bank: Optional[int] = None,
        n_queries: Optional[int] = None, betas: Sequence[float] = BETAS, max_steps: int = 100, seed: int = 1,
        halves: Sequence[str] = HALVES, fills: Sequence[str] = FILLS, codecs: Sequence[str] = ("taef2",),
        taef2_path=None, command: str = "hen experiment masking") -> Dict:
    from tqdm.auto import tqdm

    # checked before any work
    n_bank = check_count("n_bank", n_bank) or (300 if quick else 6000)
    n_queries = clamp_queries("masking", check_count("n_queries", n_queries) or (40 if quick else 1000), n_bank)
    betas = check_betas(betas)
    if list(codecs) != ["taef2"]:
        raise UsageError(f"codecs: this experiment measures TAEF2's masked queries only; got {list(codecs)}")
    available_codecs(["taef2"], taef2_path)  # TAEF2 asked for by name: raises if its weights cannot load
    train, _ = load_fashion_mnist("train")
    if not 0 <= first <= len(train) - n_bank:
        raise UsageError(f"first, n_bank: expected 0 <= first and first + n_bank <= {len(train)} (training "
                         f"images only), got first {first}, n_bank {n_bank}")
    bank_img = train[first:first + n_bank]
    g = torch.Generator().manual_seed(seed)
    qidx = torch.randperm(n_bank, generator=g)[:n_queries]
    targets = bank_img[qidx]
    rows: List[Dict] = []
    t0 = time.perf_counter()
    plan = [(p, h, f) for p in ("centre", "end") for h in halves for f in fills]
    dyn_fill = "mirror" if "mirror" in fills else fills[0]
    bar = tqdm(total=len(plan) + 2 * 3 + len(halves) * len(betas) * 4, desc="masking", unit="recall")
    hens = {}
    for padding in ("centre", "end"):
        codec = TAEF2Codec(taef2_path, padding=padding)
        hen = HEN(codec, beta=BETA, similarity="l2", max_steps=max_steps, progress=False)
        hen.store(latents=cached_encode(codec, bank_img, f"fashion-train{first}"))
        hens[padding] = hen
        for kind in ("half", "quarter", "noise"):
            lat = codec.encode(occlude(targets, kind, seed=0), progress=False)
            idx = _recall(hen, lat, None, beta=BETA, steps="first", rescale=True, max_steps=max_steps)
            rows.append(dict(table="unmasked", padding=padding, query=kind,
                             acc=metrics.identity_accuracy(idx, qidx)))
            bar.update(1)
    for padding, half, fill in plan:
        hen = hens[padding]
        hen.codec.fill = fill
        lat, w = hen.codec.encode_masked(occlude(targets, half), visible_mask(tuple(targets.shape[-2:]), half),
                                         progress=False)
        for cells in ("fraction", "whole"):
            wc = w if cells == "fraction" else (w >= 1).float()
            if not bool((wc.sum(1) > 0).all()):
                continue
            idx = _recall(hen, lat, wc, beta=BETA, steps="first", rescale=True, max_steps=max_steps)
            rows.append(dict(table="encoding", padding=padding, query=half, fill=fill, cells=cells,
                             acc=metrics.identity_accuracy(idx, qidx)))
        if padding == "centre" and fill == dyn_fill:
            for beta in betas:
                for steps in ("first", "all"):
                    for rescale in (True, False):
                        idx = _recall(hen, lat, w, beta=beta, steps=steps, rescale=rescale, max_steps=max_steps)
                        rows.append(dict(table="dynamics", query=half, beta=f"{beta:g}", steps=steps, rescale=rescale,
                                         acc=metrics.identity_accuracy(idx, qidx)))
                        bar.update(1)
            hen.codec.fill = ImageCodec.fill
            if fill == ImageCodec.fill:
                shipped = hen.recall(latents=lat, latent_weights=w, decode=False).index  # what HEN.recall does
                rows.append(dict(table="shipped", query=half, acc=metrics.identity_accuracy(shipped, qidx)))
        hen.codec.fill = ImageCodec.fill
        bar.update(1)
    bar.close()
    total = time.perf_counter() - t0

    def pick(table):
        return [r for r in rows if r["table"] == table]

    enc = {}
    for r in pick("encoding"):
        enc.setdefault((r["padding"], r["fill"], r["cells"]), {})[r["query"]] = r["acc"]
    enc_rows = [dict(padding=p, fill=f, cells=c, **v, mean=sum(v.values()) / len(v)) for (p, f, c), v in enc.items()]
    dyn = {}
    for r in pick("dynamics"):
        dyn.setdefault((r["beta"], r["steps"], r["rescale"]), {})[r["query"]] = r["acc"]
    dyn_rows = [dict(beta=b, steps=s, rescale=str(x), **v, mean=sum(v.values()) / len(v))
                for (b, s, x), v in dyn.items()]
    unm = {}
    for r in pick("unmasked"):
        unm.setdefault(r["padding"], {})[r["query"]] = r["acc"]
    unm_rows = [dict(padding=p, **v) for p, v in unm.items()]
    shipped = {r["query"]: r["acc"] for r in pick("shipped")}
    body = (
        f"Bank: Fashion-MNIST training images {first}-{first + n_bank - 1} ({n_bank}); {n_queries} of them "
        f"(seed {seed}) as queries, none of which any reported experiment queries. TAEF2, ℓ2, up to "
        f"{max_steps} steps, tol 1e-4. Identity accuracy per hidden half. Total {total:.0f} s.\n\n"
        "## Encoding: padding, fill, cell weights (weights in the first update, rescaled; beta "
        f"{BETA:g})\n\n"
        + markdown_table(enc_rows, ["padding", "fill", "cells", *halves, "mean"],
                         ["padding", "fill", "cells", *(f"{h} hidden" for h in halves), "mean"])
        + f"\n\n## Dynamics (centre padding, {dyn_fill} fill, footprint fractions)\n\n"
        + markdown_table(dyn_rows, ["beta", "steps", "rescale", *halves, "mean"],
                         ["beta", "weighted updates", "rescaled to mean 1", *(f"{h} hidden" for h in halves), "mean"])
        + "\n\n## What `HEN.recall(images, mask=...)` ships (centre, mirror, fraction, first update, rescaled, "
        f"beta {BETA:g})\n\n"
        + markdown_table([dict(**shipped)], list(halves), [f"{h} hidden" for h in halves])
        + "\n\n## Unmasked queries under each padding (beta " + f"{BETA:g})\n\n"
        + markdown_table(unm_rows, ["padding", "half", "quarter", "noise"],
                         ["padding", "half hidden (black)", "quarter hidden (black)", "noise"]) + "\n")
    write_results(out, "masking", "Masked queries: the choices, measured on training images", command, body,
                  dict(rows=rows, first=first, n_bank=n_bank, n_queries=n_queries, seconds=total))
    return dict(rows=rows)
