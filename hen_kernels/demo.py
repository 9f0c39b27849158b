"""Recall demo: store real photos in a Modern Hopfield bank and recall them from damaged queries.

    python -m hen_kernels.demo [--size S] [--distractors N] [--out DIR] [--quick] [--seed K]

The photos bundled with scikit-image (those that load offline) become grayscale
S x S images in [0, 1], flattened to D = S*S.  Random crops, rotations and mirror
images of the same photos are added as distractors, so the bank is large enough for
the timing to mean something and every photo has look-alikes.  Queries are the
photos with the bottom half hidden, a random quarter-sized block hidden, or Gaussian
noise added; each is retrieved with the public API (`hk.hopfield_retrieve`, automatic
backend) under the "l2" and "dot" similarities.  A recall is right when the winning
row is the photo's own and the recalled state is that pattern (MSE < 1e-4).

The bank is stored twice: as raw pixels, and standardised (each image minus its mean,
over its std).  On raw pixels a half-hidden photo is often nearer a flat, smooth
distractor than to itself (the hidden half is a grey patch, and a flat image is as
close to it as the photo is); the HEN paper's Fig. 1 shows the same failure of
raw-image Hopfield recall.  Standardised patterns mostly fix it, and make dot behave
like l2.  The "best" column separates the two causes of a miss: whether the query's
best-scoring row is its photo at all, and whether the dynamics then got there.

Writes `summary.json` (the table) and `recall_l2.png` (original, then query and l2
recalls for a few photos) to --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

import hen_kernels as hk

# Names in skimage.data tried in order; those needing a download (pooch) are skipped.
# `cat` is the same photo as `chelsea`, so it is left out.
PHOTO_NAMES = (
    "astronaut", "camera", "coffee", "chelsea", "coins", "moon", "page", "horse", "clock",
    "brick", "grass", "gravel", "rocket", "hubble_deep_field", "immunohistochemistry",
    "retina", "text", "logo", "colorwheel", "microaneurysms", "stereo_motorcycle",
    "checkerboard", "cell", "eagle", "lily", "skin",
)
KINDS = ("half", "block", "noise")
SIMILARITIES = ("l2", "dot")
REPRESENTATIONS = ("pixels", "standardized")
RIGHT_MSE = 1e-4  # a recalled state this close to its photo's pattern (mean squared error) counts
NOISE_STD = 0.1
MAX_STEPS = 10
TOL = 1e-4


def _to_gray(img: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2gray, rgba2rgb
    from skimage.util import img_as_float

    img = img_as_float(np.asarray(img))
    if img.ndim == 3 and img.shape[-1] == 4:
        img = rgba2rgb(img)
    if img.ndim == 3:
        img = rgb2gray(img)
    return img.astype(np.float32)


def load_photos(verbose: bool = True) -> Tuple[List[str], List[np.ndarray]]:
    """Grayscale float32 photos in [0, 1] at their own size, for every name that loads offline."""
    import skimage.data

    names, photos, skipped = [], [], []
    for name in PHOTO_NAMES:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            skipped.append(name)
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = loader()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:  # needs a download; under pytest skimage raises pytest's Skipped here
            skipped.append(name)
            continue
        if isinstance(img, tuple):  # stereo pair: keep the left image
            img = img[0]
        names.append(name)
        photos.append(_to_gray(img))
    if verbose:
        print(f"loaded {len(photos)} photos from skimage.data"
              + (f" (skipped {len(skipped)}: {', '.join(skipped)})" if skipped else ""))
    return names, photos


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    from skimage.transform import resize

    return resize(img, (size, size), anti_aliasing=True).astype(np.float32)


def build_bank(photos: Sequence[np.ndarray], size: int, n_distractors: int,
               rng: np.random.Generator) -> np.ndarray:
    """(P + n_distractors, S, S) images in [0, 1]: the P photos first, then the distractors.

    A distractor is a random square crop covering 35-70 % of a photo's side, rotated by
    a multiple of 90 degrees and mirrored at random, resized to S x S.  Nearly flat crops
    (std < 0.01) are drawn again, so every pattern can be standardised.
    """
    originals = [_resize(p, size) for p in photos]
    # Crop from a 4S x 4S copy: the same squashed aspect as the originals, and cheap to resize.
    work = [_resize(p, 4 * size) for p in photos]
    crops: List[np.ndarray] = []
    while len(crops) < n_distractors:
        src = work[rng.integers(len(work))]
        side = int(rng.uniform(0.35, 0.70) * 4 * size)
        y, x = rng.integers(0, 4 * size - side + 1, size=2)
        crop = np.rot90(src[y:y + side, x:x + side], int(rng.integers(4)))
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = _resize(np.ascontiguousarray(crop), size)
        if crop.std() >= 0.01:
            crops.append(crop)
    return np.stack(originals + crops)


def make_queries(originals: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Damaged copies of the originals, (P, S, S), in pixel space.

    Hidden pixels are set to the mean of the visible ones rather than 0: a black patch
    would pull the query toward dark patterns, a mean-grey one toward none in particular
    (and it becomes exactly 0, i.e. "no information", once the query is standardised).
    """
    q = originals.copy()
    p, s, _ = q.shape
    h = s // 2
    for i in range(p):
        if kind == "half":
            q[i, h:, :] = q[i, :h, :].mean()
        elif kind == "block":
            y, x = rng.integers(0, s - h + 1, size=2)
            mask = np.zeros((s, s), bool)
            mask[y:y + h, x:x + h] = True
            q[i][mask] = q[i][~mask].mean()
        elif kind == "noise":
            q[i] += rng.normal(0.0, NOISE_STD, size=(s, s)).astype(np.float32)
        else:
            raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    return q


def represent(images: np.ndarray, patterns: str) -> np.ndarray:
    """Flatten (n, S, S) images to (n, S*S) float32 patterns.

    "pixels": grey levels in [0, 1] as they are.  "standardized": each image minus its
    mean, over its std, so every pattern has the same norm sqrt(D): brightness and
    contrast stop deciding the match, l2 and dot rank patterns alike, and a hidden
    region filled with the mean becomes 0, which favours no pattern.
    """
    flat = images.reshape(len(images), -1).astype(np.float32)
    if patterns == "pixels":
        return flat
    mean = flat.mean(1, keepdims=True)
    return ((flat - mean) / np.maximum(flat.std(1, keepdims=True), 1e-6)).astype(np.float32)


def choose_beta(similarity: str, dim: int, scale: float) -> float:
    """Inverse temperature for hard (one-pattern) recall; ``scale`` is the bank's typical pixel std.

    l2: the score is -||x - s||, a distance that grows like sqrt(D) times the rms pixel
    difference.  Neighbouring patterns in this bank differ by at least ~1/4 of a pixel
    std in rms, a score gap of ~sqrt(D)·scale/4, and the softmax is one-hot once
    beta·gap >~ 20 nats: beta = 80 / (sqrt(D)·scale) (about 15 for 32 x 32 pixels).
    A query that starts between patterns is first pulled to a mix of its near
    neighbours; from there the nearest one wins and the next steps confirm it.

    dot: x·s = (||x||² + ||s||² - ||x - s||²)/2, so a gap g in distance at distance
    ~sqrt(D)·scale is a gap of ~g·sqrt(D)·scale in score: beta = 80 / (D·scale²).  On
    raw pixels dot still prefers bright patterns to similar ones (a brighter image has
    a larger x·s); on standardised patterns every norm is equal and dot ranks like l2.
    """
    if similarity == "l2":
        return 80.0 / (math.sqrt(dim) * scale)
    return 80.0 / (dim * scale * scale)


def _save_grid(path: Path, tiles: List[List[np.ndarray]]) -> None:
    """Tiles (rows x columns of S x S images in [0, 1]) with 2 px white gaps, as an 8-bit PNG."""
    from skimage.io import imsave

    s, gap = tiles[0][0].shape[0], 2
    rows, cols = len(tiles), len(tiles[0])
    grid = np.ones((rows * (s + gap) + gap, cols * (s + gap) + gap), np.float32)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            y, x = gap + r * (s + gap), gap + c * (s + gap)
            grid[y:y + s, x:x + s] = np.clip(tile, 0.0, 1.0)
    imsave(str(path), (grid * 255).round().astype(np.uint8), check_contrast=False)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m hen_kernels.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=None, help="image side S (default 64, 32 with --quick)")
    ap.add_argument("--distractors", type=int, default=None,
                    help="augmented distractor patterns (default 4000, 400 with --quick)")
    ap.add_argument("--out", default="demo_out", help="folder for summary.json and recall_l2.png")
    ap.add_argument("--quick", action="store_true", help="S = 32 and fewer distractors: a few seconds")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.size is None:
        args.size = 32 if args.quick else 64
    if args.distractors is None:
        args.distractors = 400 if args.quick else 4000
    if args.size < 4:
        ap.error("--size: expected an integer >= 4")
    if args.distractors < 0:
        ap.error("--distractors: expected an integer >= 0")
    return args


def run(args: argparse.Namespace) -> List[dict]:
    """Build the bank, run every (patterns, kind, similarity), print the table; returns its rows."""
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    names, photos = load_photos()
    if not photos:
        raise RuntimeError("no photo in skimage.data loaded offline")
    images = build_bank(photos, args.size, args.distractors, rng)
    p, n, dim = len(photos), len(images), args.size * args.size
    originals = images[:p]
    print(f"bank: {n} patterns x D = {dim} ({p} photos + {n - p} distractors, "
          f"{n * dim * 4 / 2**20:.1f} MiB float32), built in {time.perf_counter() - t0:.1f} s")

    avail = hk.available_backends()
    auto = next((b for b in ("cpu", "torch") if b in avail), "?")
    forced = os.environ.get("HEN_KERNELS_BACKEND")
    print(f"available backends: {avail}; backend=None picks the first of ('cpu', 'torch') available "
          f"for CPU tensors: {auto!r}" + (f" (overridden by HEN_KERNELS_BACKEND={forced})" if forced else ""))

    queries = {kind: make_queries(originals, kind, rng) for kind in KINDS}
    expected = torch.arange(p)
    rows, recalls = [], {}
    header = (f"{'patterns':<12} {'query':<6} {'sim':<4} {'beta':>8} {'best':>6} {'right':>6} "
              f"{'top_w':>6} {'steps':>5} {'ms':>7} {'queries/s':>9}")
    print("best: the query's best-scoring row is its photo; right: recall returned that row and a "
          f"state within MSE {RIGHT_MSE:g} of it")
    print(header)
    print("-" * len(header))
    for patterns in REPRESENTATIONS:
        bank = torch.from_numpy(represent(images, patterns))
        target = bank[:p]
        scale = float(bank.std(1).mean())
        hk.hopfield_retrieve(target[:1], bank, 1.0, similarity="l2")  # warm-up, not timed
        for kind in KINDS:
            q = torch.from_numpy(represent(queries[kind], patterns))
            for sim in SIMILARITIES:
                beta = choose_beta(sim, dim, scale)
                # top_index does not depend on beta: it is the exact best match of the query.
                best = hk.hopfield_partial(q, bank, 1.0, similarity=sim).top_index == expected
                t = time.perf_counter()
                r = hk.hopfield_retrieve(q, bank, beta, similarity=sim, max_steps=MAX_STEPS, tol=TOL)
                wall = time.perf_counter() - t
                mse = ((r.state - target) ** 2).mean(-1)
                right = (r.top_index == expected) & (mse < RIGHT_MSE)
                row = dict(patterns=patterns, kind=kind, similarity=sim, beta=beta, total=p,
                           best=int(best.sum()), right=int(right.sum()),
                           top_weight=float(r.top_weight.mean()), steps=float(r.steps.float().mean()),
                           wall_s=wall, queries_per_s=p / wall,
                           missed=[names[i] for i in range(p) if not bool(right[i])])
                rows.append(row)
                if sim == "l2":
                    state = r.state.numpy().reshape(p, args.size, args.size)
                    if patterns == "standardized":  # back to grey levels with the photo's own mean and std
                        state = state * originals.std((1, 2), keepdims=True) + originals.mean((1, 2), keepdims=True)
                    recalls[patterns, kind] = state
                print(f"{patterns:<12} {kind:<6} {sim:<4} {beta:>8.3g} {row['best']:>3}/{p:<2} "
                      f"{row['right']:>3}/{p:<2} {row['top_weight']:>6.3f} {row['steps']:>5.1f} "
                      f"{wall * 1e3:>7.1f} {row['queries_per_s']:>9.0f}")

    for row in rows:
        if row["missed"] and row["similarity"] == "l2":
            print(f"  {row['patterns']}/{row['kind']}/l2 missed: {', '.join(row['missed'])}")
    png = out / "recall_l2.png"
    _save_grid(png, [[originals[i]] + [t[i] for kind in KINDS for t in
                                       (queries[kind], recalls["pixels", kind], recalls["standardized", kind])]
                     for i in range(min(6, p))])
    summary = dict(size=args.size, photos=names, bank_rows=n, dim=dim, backends=avail,
                   auto_backend=auto, rows=rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {png} (per photo: original, then for {', '.join(KINDS)}: query, l2 recall on "
          f"pixels, l2 recall on standardized) and {out / 'summary.json'}; "
          f"total {time.perf_counter() - t0:.1f} s")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
