"""HEN demo (`hen demo`, `make demo`): store real photos, recall them from damaged images and from captions.

    hen demo [--quick] [--size S] [--distractors N] [--codecs image,taef2] [--text minilm|pixel] [--out DIR]

The photos bundled with scikit-image and scikit-learn (those that load offline) become
S x S RGB images, each with a caption written for this project.  Random crops of them
(rotated, mirrored, resized) are added as distractors, each with a caption of its own, so
every photo has look-alikes.  For each codec (raw pixels: the paper's image MHN; TAEF2:
HEN) the photos and distractors are stored with their captions in a HEN, then recalled
from the photo with its bottom half hidden (black, as it is), the same half hidden and
masked (``recall(images, mask=...)``: only the known top half is compared), its
bottom-right quarter hidden, noise added, and from its caption alone ([0; text], the
paper's hetero-association).

Printed per (codec, query): identity accuracy (the recalled row is the photo's own),
1 - SSIM and MSE of the decoded recall against the original photo, the mean top
weight, steps, and throughput (queries/s of the Hopfield recall; and end to end, with
encoding and decoding).  Writes ``summary.json`` and ``recall.png`` (per photo: original,
half-hidden query, its recall by each codec unmasked and masked, and the recall from the
caption; a wrong recall is framed in red and labelled with the photo it returned) to --out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from .. import ops
from ..validation import check_beta_value
from . import metrics
from .codecs import IdentityCodec, PixelTextEncoder, SentenceEncoder, TAEF2Codec
from .data import load_photos, occlude, visible_mask
from .experiments.common import check_out_folder
from .layer import HEN

KINDS = ("half", "quarter", "noise")
MASKED = "half, masked"  # the half-hidden query with its mask
BETA = 200.0


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--size", type=int, default=None, help="image side S (default 64, 32 with --quick)")
    ap.add_argument("--distractors", type=int, default=None,
                    help="augmented distractor photos (default 200, 40 with --quick)")
    ap.add_argument("--codecs", default="image,taef2", help="comma-separated: image, taef2 (default both)")
    ap.add_argument("--text", default="minilm", choices=("minilm", "pixel"),
                    help="caption encoder: sentence embeddings (default) or pixelised text")
    ap.add_argument("--beta", type=float, default=BETA, help=f"inverse temperature (default {BETA:g})")
    ap.add_argument("--out", default="demo_out", help="folder for summary.json and recall.png")
    ap.add_argument("--quick", action="store_true", help="S = 32 and fewer distractors")
    ap.add_argument("--seed", type=int, default=0)


CODECS = ("image", "taef2")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hen demo", description=__doc__.splitlines()[0])
    add_arguments(ap)
    return ap


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = _parser()
    return finish_args(ap, ap.parse_args(argv))


def finish_args(ap, args):
    """Fills the defaults that depend on --quick and refuses bad values (``ap.error``: exit 2), before any work."""
    if args.size is None:
        args.size = 32 if args.quick else 64
    if args.distractors is None:
        args.distractors = 40 if args.quick else 200
    if args.size < 8 or args.size % 8:
        ap.error(f"--size: expected a multiple of 8, at least 8, got {args.size}")
    if args.distractors < 0:
        ap.error(f"--distractors: expected an integer >= 0, got {args.distractors}")
    try:
        check_beta_value(args.beta)
    except ValueError as e:
        ap.error(f"--{e}")
    try:
        check_out_folder(args.out)
    except ValueError as e:
        ap.error(f"--{e}")
    unknown = [c for c in args.codecs.split(",") if c and c not in CODECS]
    if unknown or not args.codecs.strip(","):
        ap.error(f"--codecs: expected some of {', '.join(CODECS)}, got {args.codecs!r}")
    return args


def distractors(photos: torch.Tensor, n: int, rng: np.random.Generator) -> torch.Tensor:
    """Random square crops (35-70 % of the side) of the photos, rotated by k·90°, maybe mirrored, resized."""
    import torch.nn.functional as F

    s = photos.shape[-1]
    out = []
    while len(out) < n:
        src = photos[int(rng.integers(len(photos)))]
        side = int(rng.uniform(0.35, 0.70) * s)
        y, x = (int(v) for v in rng.integers(0, s - side + 1, size=2))
        crop = torch.rot90(src[:, y:y + side, x:x + side], int(rng.integers(4)), dims=(1, 2))
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        crop = F.interpolate(crop[None], size=(s, s), mode="bilinear", align_corners=False)[0].clamp(0, 1)
        if float(crop.std()) >= 0.02:
            out.append(crop)
    return torch.stack(out) if out else photos[:0]


def run(args: argparse.Namespace) -> List[dict]:
    args = finish_args(_parser(), args)  # always: `hen demo` parses with its own parser and comes here
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    names, photos, captions = load_photos(args.size, verbose=True)
    if not len(names):
        raise RuntimeError("no photo loaded offline from scikit-image or scikit-learn")
    extra = distractors(photos, args.distractors, rng)
    images = torch.cat([photos, extra])
    texts = captions + [f"a cropped and turned detail, number {j}" for j in range(len(extra))]
    p = len(names)
    print(f"bank: {len(images)} images {tuple(images.shape[1:])} ({p} photos + {len(extra)} distractor crops), "
          f"each with a caption; backends {ops.available_backends()}")

    codecs = []
    for c in (x for x in args.codecs.split(",") if x):  # finish_args refused any other name
        if c == "image":
            codecs.append(IdentityCodec())
        else:
            try:
                codecs.append(TAEF2Codec())
            except FileNotFoundError as e:
                print(f"skipping taef2: {e}")
                continue
    queries = {k: occlude(photos, k, seed=args.seed) for k in KINDS}
    half_mask = visible_mask(tuple(photos.shape[-2:]), "half")
    expected = torch.arange(p)
    rows, grid = [], {}
    head = (f"{'codec':<6} {'query':<12} {'acc':>7} {'1-SSIM':>7} {'MSE':>7} {'top_w':>6} {'steps':>5} "
            f"{'recall q/s':>10} {'e2e q/s':>8}")
    print("acc: the recalled row is the photo's own; 1-SSIM and MSE: decoded recall vs the original photo")
    print(head)
    print("-" * len(head))
    for codec in codecs:
        if args.text == "minilm":
            try:
                text = SentenceEncoder()
                text.model  # load now, so a missing package shows here
            except ImportError as e:
                print(f"{e}; using pixelised text")
                text = PixelTextEncoder(codec, tuple(images.shape[1:]))
        else:
            text = PixelTextEncoder(codec, tuple(images.shape[1:]))
        hen = HEN(codec, text_encoder=text, beta=args.beta, similarity="l2", max_steps=100, tol=1e-4,
                  progress=False)
        t = time.perf_counter()
        hen.store(images, texts)
        store_s = time.perf_counter() - t
        for kind in KINDS[:1] + (MASKED,) + KINDS[1:] + ("caption",):
            t = time.perf_counter()
            if kind == "caption":
                lat = hen.encode_texts(captions)
                t1 = time.perf_counter()
                r = hen.recall_text(text_latents=lat, decode=False)
            elif kind == MASKED:
                lat, w = codec.encode_masked(queries["half"], half_mask)
                t1 = time.perf_counter()
                r = hen.recall(latents=lat, latent_weights=w, decode=False)
            else:
                lat = hen.encode_images(queries[kind])
                t1 = time.perf_counter()
                r = hen.recall(latents=lat, decode=False)
            t2 = time.perf_counter()
            recalled = codec.decode(r.latents)
            t3 = time.perf_counter()
            row = dict(codec=codec.name, query=kind, text=text.name, total=p,
                       right=int((r.index == expected).sum()), **{
                           "accuracy": metrics.identity_accuracy(r.index, expected),
                           "one_minus_ssim": float(metrics.one_minus_ssim(recalled, photos).mean()),
                           "mse": float(metrics.mse(recalled, photos).mean())},
                       top_weight=float(r.top_weight.mean()), steps=float(r.steps.float().mean()),
                       recall_qps=p / (t2 - t1), e2e_qps=p / (t3 - t), store_s=store_s,
                       missed=[names[i] for i in range(p) if int(r.index[i]) != i])
            rows.append(row)
            grid[codec.name, kind] = recalled, r.index
            print(f"{codec.name:<6} {kind:<12} {row['right']:>3}/{p:<3} {row['one_minus_ssim']:>7.3f} "
                  f"{row['mse']:>7.4f} {row['top_weight']:>6.3f} {row['steps']:>5.1f} {row['recall_qps']:>10.0f} "
                  f"{row['e2e_qps']:>8.0f}")
    for row in rows:
        if row["missed"]:
            print(f"  {row['codec']}/{row['query']} missed: {', '.join(row['missed'])}")
    from .experiments.common import image_grid

    cols, labels, marks = [photos, queries["half"]], ["original", "half hidden"], [None, None]
    for kind, what in (("half", "recall"), (MASKED, "masked recall"), ("caption", "from caption")):
        for codec in codecs:
            img, idx = grid[codec.name, kind]
            cols.append(img)
            labels.append(f"{codec.name} {what}")
            marks.append([None if int(j) == i else f"got {_label(int(j), names)}" for i, j in enumerate(idx)])
    # one failure of every column that has one, then other failures, then successes: the picture
    # shows what went wrong as well as what came back
    firsts = [next(i for i in range(p) if m[i]) for m in marks if m is not None and any(m)]
    wrong = [i for i in range(p) if any(m is not None and m[i] for m in marks)]
    picked = list(dict.fromkeys(firsts + wrong + list(range(p))))
    order = torch.tensor(picked[:min(6, p)])
    png = out / "recall.png"
    image_grid(png, [c[order] for c in cols], labels, rows=len(order),
               marks=[None if m is None else [m[i] for i in order.tolist()] for m in marks],
               row_labels=[names[i] for i in order.tolist()])
    summary = dict(size=args.size, photos=names, captions=captions, bank_rows=len(images),
                   backends=ops.available_backends(), beta=args.beta, rows=rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {png} and {out / 'summary.json'}; total {time.perf_counter() - t0:.1f} s")
    return rows


def _label(j: int, names: Sequence[str]) -> str:
    return names[j] if j < len(names) else f"crop {j - len(names)}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
