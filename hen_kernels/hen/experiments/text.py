"""Table 2 (text to image) and the uniqueness experiment, on real photos with captions.

The bank: the sample photos of scikit-image and scikit-learn (28 x 28 RGB, as the
paper downsamples COCO), each stored with its own caption (data.PHOTO_CAPTIONS), plus
``distractors`` Fashion-MNIST images (grey repeated to RGB) stored with their label
captions ("a photo of a sneaker": ten captions, shared).  Queries are the photos'
captions, as ``[0; text latent]``.

- table2: identity accuracy, MSE and 1 - SSIM (decoded recall against the decoded
  stored latent), per image codec, text encoder (sentence embeddings; the paper's
  pixelised text, encoded with the image codec) and bank size.
- uniqueness: photo pairs (a, b) stored with one caption (a's) for both; the query
  with that caption ends in a mix of the two (top weight ≈ 0.5, the decoded image far
  from both and close to the decoded mean of their latents), while the same bank with
  unique captions recalls a exactly.  And a Fashion-MNIST label caption, shared by
  hundreds of images, recalls a blurred class average.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from .. import metrics
from ..codecs import PixelTextEncoder, SentenceEncoder
from ..data import fashion_captions, load_fashion_mnist, load_photos
from ..layer import HEN
from .common import (available_codecs, cached_encode, check_betas, check_count, codec_by_name, image_grid,
                     markdown_table, plt, write_results)

SIZE = 28
BETA = 200.0


def text_encoder(name: str, codec):
    if name == "minilm":
        return SentenceEncoder()
    if name == "pixel":
        return PixelTextEncoder(codec, (3, SIZE, SIZE))
    raise ValueError(f"text encoder: expected 'minilm' or 'pixel', got {name!r}")


def encode_unique(enc, texts: Sequence[str]) -> torch.Tensor:
    """enc.encode over the distinct texts only, gathered back in order."""
    uniq = list(dict.fromkeys(texts))
    z = enc.encode(uniq)
    pos = {t: i for i, t in enumerate(uniq)}
    return z[torch.tensor([pos[t] for t in texts])]


def caption_data(n_distractors: int):
    names, photos, captions = load_photos(SIZE)
    if n_distractors:
        fx, fy = load_fashion_mnist(n=n_distractors)
        images = torch.cat([photos, fx.expand(-1, 3, -1, -1)])
        captions = captions + fashion_captions(fy)
    else:
        images = photos
    return names, images, captions


def run_table2(out: Path, *, quick: bool = False, distractors: Optional[Sequence[int]] = None,
               codecs: Optional[Sequence[str]] = None, texts: Sequence[str] = ("minilm", "pixel"),
               beta: float = BETA, max_steps: int = 100, taef2_path=None,
               command: str = "hen experiment table2") -> Dict:
    from tqdm.auto import tqdm

    distractors = ([check_count("distractors", d, 0) for d in distractors] if distractors
                   else [0, 100] if quick else [0, 1000, 5000, 10000])
    beta = check_betas([beta])[0]
    codecs = available_codecs(codecs, taef2_path)
    names, images, captions = caption_data(max(distractors))
    p = len(names)
    rows, grids, misses = [], {}, {}
    t0 = time.perf_counter()
    bar = tqdm(total=len(codecs) * len(texts) * len(distractors), desc="table2", unit="recall")
    for cname in codecs:
        codec = codec_by_name(cname, taef2_path)
        lat = cached_encode(codec, images, f"captioned-{SIZE}")
        recon = codec.decode(lat[:p], progress=False)
        for tname in texts:
            enc = text_encoder(tname, codec)
            tlat = encode_unique(enc, captions)
            for d in distractors:
                bar.set_postfix_str(f"{cname} {tname} N={p + d}")
                hen = HEN(codec, text_encoder=enc, beta=beta, similarity="l2", max_steps=max_steps, progress=False)
                hen.store(latents=lat[:p + d], text_latents=tlat[:p + d])
                t = time.perf_counter()
                r = hen.recall_text(text_latents=tlat[:p])
                wall = time.perf_counter() - t
                rows.append(dict(codec=cname, text=tname, N=p + d, queries=p,
                                 acc=metrics.identity_accuracy(r.index, torch.arange(p)),
                                 mse=float(metrics.mse(r.images, recon).mean()),
                                 ssim=float(metrics.one_minus_ssim(r.images, recon).mean()),
                                 top_w=float(r.top_weight.mean()), steps=float(r.steps.float().mean()),
                                 seconds=wall))
                if d == max(distractors):
                    grids[cname, tname] = r.images
                    misses[cname, tname] = [None if int(j) == i else f"got row {int(j)}" for i, j in enumerate(r.index)]
                    if tname == "pixel":
                        grids["caption"] = enc.render(captions[:p])
                bar.update(1)
    bar.close()
    total = time.perf_counter() - t0
    cols = [images[:p]] + ([grids["caption"]] if "caption" in grids else [])
    labels = ["original"] + (["pixelised caption"] if "caption" in grids else [])
    for (c, t), v in ((k, v) for k, v in grids.items() if k != "caption"):
        cols.append(v)
        labels.append(f"{c} / {t}")
    marks = [None] * (len(cols) - len(misses)) + list(misses.values())  # wrong recalls framed in red
    image_grid(out / "table2.png", cols, labels, rows=8, marks=marks)
    body = (f"{p} photos with their own captions, plus Fashion-MNIST distractors with label captions; bank "
            f"N = photos + distractors; queries: the {p} photo captions as [0; text]; ℓ2, beta = {beta:g}, "
            f"norm pads (hen/layer.py). MSE / 1-SSIM against the decoded stored latent. Total {total:.0f} s.\n\n"
            + markdown_table(rows, ["codec", "text", "N", "acc", "mse", "ssim", "top_w", "steps"],
                             ["image codec", "text encoder", "bank N", "identity acc", "MSE", "1-SSIM",
                              "top weight", "steps"])
            + "\n\nRecalls from captions at the largest bank:\n\n![table2](table2.png)\n")
    write_results(out, "table2", "Table 2: text to image (hetero-association)", command, body,
                  dict(rows=rows, photos=names, seconds=total))
    return dict(rows=rows)


def one_step_weight(hen: HEN, text_latents: torch.Tensor) -> torch.Tensor:
    """Top weight after one update from ``[0; t]`` (the bank's public ``partial``)."""
    q = hen.text_query(text_latents).to(hen.bank.dtype)
    return hen.bank.partial(q, hen.beta, similarity=hen.similarity, progress=False).top_weight.float().cpu()


def run_uniqueness(out: Path, *, quick: bool = False, distractors: Optional[int] = None,
                   codecs: Optional[Sequence[str]] = None, texts: Sequence[str] = ("pixel", "minilm"),
                   beta: float = BETA, max_steps: int = 100, taef2_path=None,
                   command: str = "hen experiment uniqueness") -> Dict:
    from tqdm.auto import tqdm

    distractors = check_count("distractors", distractors, 0)
    distractors = distractors if distractors is not None else (100 if quick else 1000)
    beta = check_betas([beta])[0]
    codecs = available_codecs(codecs, taef2_path, default=("taef2", "image"))
    names, images, captions = caption_data(distractors)
    p = len(names)
    pairs = [(i, i + 1) for i in range(0, p - 1, 2)][: (3 if quick else 100)]
    rows, label_rows, pics = [], [], {}
    t0 = time.perf_counter()
    bar = tqdm(total=len(codecs) * len(texts) * (len(pairs) + 1), desc="uniqueness", unit="bank")
    for cname in codecs:
        codec = codec_by_name(cname, taef2_path)
        lat = cached_encode(codec, images, f"captioned-{SIZE}")
        for tname in texts:
            enc = text_encoder(tname, codec)
            tlat = encode_unique(enc, captions)
            for a, b in pairs:
                bar.set_postfix_str(f"{cname} {tname} pair {a},{b}")
                shared = tlat.clone()
                shared[b] = tlat[a]
                res, first = {}, {}
                for mode, t in (("unique", tlat), ("shared", shared)):
                    hen = HEN(codec, text_encoder=enc, beta=beta, similarity="l2", max_steps=max_steps,
                              progress=False)
                    hen.store(latents=lat, text_latents=t)
                    res[mode] = hen.recall_text(text_latents=tlat[a:a + 1])
                    first[mode] = one_step_weight(hen, tlat[a:a + 1])
                ra, rb = codec.decode(lat[[a, b]], progress=False).split(1)
                mix = codec.decode(lat[[a, b]].mean(0, keepdim=True), progress=False)
                for mode, r in res.items():
                    rows.append(dict(codec=cname, text=tname, pair=f"{names[a]}+{names[b]}", mode=mode,
                                     top_w=float(r.top_weight[0]), top_w_1=float(first[mode][0]),
                                     index_in_pair=int(r.index[0]) in (a, b), ends_on_a=int(r.index[0]) == a,
                                     mse_a=float(metrics.mse(r.images, ra)[0]),
                                     mse_b=float(metrics.mse(r.images, rb)[0]),
                                     mse_mix=float(metrics.mse(r.images, mix)[0])))
                if (cname, tname) not in pics:
                    pics[cname, tname] = [ra, rb, res["unique"].images, res["shared"].images, mix]
                bar.update(1)
            # a label caption shared by many Fashion-MNIST images
            if distractors:
                hen = HEN(codec, text_encoder=enc, beta=beta, similarity="l2", max_steps=max_steps, progress=False)
                hen.store(latents=lat, text_latents=tlat)
                q = list(dict.fromkeys(captions[p:]))
                r = hen.recall_text(q)
                w1 = one_step_weight(hen, hen.encode_texts(q))
                label_rows += [dict(codec=cname, text=tname, caption=c, top_w=float(w), top_w_1=float(v),
                                    sharing=captions.count(c)) for c, w, v in zip(q, r.top_weight, w1)]
                pics[cname, tname, "labels"] = r.images
            bar.update(1)
    bar.close()
    total = time.perf_counter() - t0
    summary = []
    for cname in codecs:
        for tname in texts:
            for mode in ("unique", "shared"):
                sel = [r for r in rows if r["codec"] == cname and r["text"] == tname and r["mode"] == mode]
                if sel:
                    summary.append(dict(codec=cname, text=tname, mode=mode, pairs=len(sel),
                                        top_w_1=sum(r["top_w_1"] for r in sel) / len(sel),
                                        top_w=sum(r["top_w"] for r in sel) / len(sel),
                                        ends_on_a=sum(r["ends_on_a"] for r in sel) / len(sel),
                                        mse_a=sum(r["mse_a"] for r in sel) / len(sel),
                                        mse_b=sum(r["mse_b"] for r in sel) / len(sel),
                                        mse_mix=sum(r["mse_mix"] for r in sel) / len(sel)))
    _plot(out / "uniqueness.png", pics)
    lab = []
    for c in codecs:
        for t in texts:
            sel = [r for r in label_rows if r["codec"] == c and r["text"] == t]
            if sel:
                lab.append(dict(codec=c, text=t, captions=len(sel), sharing=sum(r["sharing"] for r in sel) / len(sel),
                                top_w_1=sum(r["top_w_1"] for r in sel) / len(sel),
                                top_w=sum(r["top_w"] for r in sel) / len(sel)))
    body = (f"{len(pairs)} photo pairs (a, b); bank: {p} photos + {distractors} Fashion-MNIST images with label "
            f"captions. `unique`: every photo stored with its own caption; `shared`: b stored with a's caption. "
            f"Query: a's caption. MSE of the decoded recall against the decoded stored a, b and the decoded "
            f"mean of their latents. ℓ2, beta = {beta:g}. Total {total:.0f} s.\n\n"
            + "`top weight, step 1`: the softmax weight of the best row after the first update (0.5: an even "
            "mix of a and b); `top weight, end`: after the dynamics settle; `ends on a`: the fraction whose final "
            "best row is a (the shared caption cannot choose: the even mix is a saddle, and rounding decides "
            "which of the two, if either, the state falls into).\n\n"
            + markdown_table(summary, ["codec", "text", "mode", "pairs", "top_w_1", "top_w", "ends_on_a", "mse_a",
                                       "mse_b", "mse_mix"],
                             ["codec", "text", "captions", "pairs", "top weight, step 1", "top weight, end",
                              "ends on a", "MSE to a", "MSE to b", "MSE to mix"], digits=4)
            + "\n\nFashion-MNIST label captions (each shared by many images):\n\n"
            + markdown_table(lab, ["codec", "text", "captions", "sharing", "top_w_1", "top_w"],
                             ["codec", "text", "captions", "images per caption", "top weight, step 1",
                              "top weight, end"], digits=4)
            + "\n\n![uniqueness](uniqueness.png)\n")
    write_results(out, "uniqueness", "Uniqueness of association", command, body,
                  dict(rows=rows, summary=summary, labels=label_rows, seconds=total))
    return dict(rows=rows, summary=summary, labels=label_rows)


def _plot(path: Path, pics) -> None:
    p = plt()
    keys = [k for k in pics if len(k) == 2]
    fig, axes = p.subplots(len(keys), 5 + 1, figsize=(12, 2.2 * len(keys)), squeeze=False)
    for i, k in enumerate(keys):
        imgs = list(pics[k]) + ([pics[k + ("labels",)][:1]] if k + ("labels",) in pics else [None])
        titles = ["stored a", "stored b", "recall (unique)", "recall (shared)", "mean of a, b", "label caption"]
        for j, (img, t) in enumerate(zip(imgs, titles)):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if img is not None:
                ax.imshow(img[0].permute(1, 2, 0).clamp(0, 1).numpy())
            if i == 0:
                ax.set_title(t, fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{k[0]} codec\n{k[1]} text", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    p.close(fig)
