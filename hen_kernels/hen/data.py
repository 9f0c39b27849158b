"""Data that loads offline: Fashion-MNIST, the sample photos of scikit-image and scikit-learn, captions.

Images are float32 tensors in [0, 1], (N, C, H, W).

- :func:`load_fashion_mnist`: the 70,000 Fashion-MNIST images (Debian package
  ``dataset-fashion-mnist``: gzipped IDX files under /usr/share/datasets/fashion-mnist,
  or ``$HEN_FASHION_MNIST_DIR``), train then test, (N, 1, 28, 28), with labels.
- :func:`fashion_captions`: captions built from the labels ("a photo of a sneaker"),
  so they are *not* unique: ten captions for 70,000 images (the paper's uniqueness
  experiment needs exactly that).
- :func:`load_photos`: the real photos bundled with scikit-image and scikit-learn that
  load offline, centre-cropped square and resized, each with a short caption written
  for this project (:data:`PHOTO_CAPTIONS`).
- :func:`occlude`: the damaged queries of the experiments (half, quarter, noise, and each
  half hidden by name); :func:`visible_mask`: the pixels an occlusion leaves known.
"""
from __future__ import annotations

import functools
import gzip
import os
import struct
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..nn.arguments import check_int

FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_CLASSES = ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot")

# Captions written for this project, one per photo: what a person would type to find it.
PHOTO_CAPTIONS = {
    "astronaut": "an astronaut in a white spacesuit with the American flag behind her",
    "camera": "a black and white photo of a man with a camera on a tripod",
    "coffee": "a cup of coffee on a saucer with a spoon",
    "chelsea": "an orange tabby cat looking to the side",
    "coins": "rows of old coins on a dark background",
    "moon": "the grey cratered surface of the moon",
    "page": "a scanned page of printed text",
    "horse": "the black silhouette of a horse on white",
    "clock": "a round wall clock",
    "brick": "a wall of grey bricks",
    "grass": "a close-up of green grass blades",
    "gravel": "small stones of gravel seen from above",
    "rocket": "a rocket on the launch pad before lift-off",
    "hubble_deep_field": "distant galaxies in the Hubble deep field",
    "immunohistochemistry": "a stained tissue sample under a microscope",
    "retina": "a photograph of the back of a human eye",
    "text": "handwritten and printed letters on paper",
    "logo": "the scikit-image snake logo",
    "colorwheel": "a colour wheel with every hue",
    "microaneurysms": "a greyscale retina image with small dark spots",
    "stereo_motorcycle": "a red motorcycle parked in a room",
    "checkerboard": "a black and white checkerboard pattern",
    "cell": "a single cell under a phase contrast microscope",
    "eagle": "a bald eagle perched on a branch",
    "lily": "a lily flower in fluorescence microscopy",
    "skin": "a microscope slide of skin tissue stained pink",
    "sklearn_china": "a Chinese temple with trees in front",
    "sklearn_flower": "a pink flower in close-up",
}
SKIMAGE_PHOTOS = tuple(k for k in PHOTO_CAPTIONS if not k.startswith("sklearn_"))


def _fashion_dir() -> Path:
    cands = [os.environ.get("HEN_FASHION_MNIST_DIR"), *FASHION_DIRS]
    for c in cands:
        if c and (Path(c) / FASHION_FILES["train"][0]).is_file():
            return Path(c)
    raise FileNotFoundError(
        "Fashion-MNIST not found: install the Debian package (apt-get install -y dataset-fashion-mnist; "
        "`make demo` does it) or set HEN_FASHION_MNIST_DIR to a folder with the gzipped IDX files"
    )


@functools.lru_cache(maxsize=8)
def _read_idx(path: Path) -> np.ndarray:
    """The array of one gzipped IDX file (cached: decompressing 60,000 images takes a second)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated ({arr.size} bytes for shape {shape})")
    return arr.reshape(shape)


def fashion_mnist_available() -> bool:
    try:
        _fashion_dir()
        return True
    except FileNotFoundError:
        return False


def load_fashion_mnist(split: str = "all", n: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, 28, 28) float32 in [0, 1], labels (N,) int64); ``split`` "train", "test" or "all".

    "all" is the 60,000 training images then the 10,000 test images; ``n`` keeps the first n.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split: expected 'train', 'test' or 'all', got {split!r}")
    check_int("n", n, 0, optional=True)  # a negative n would slice from the end: all but the last |n|
    d = _fashion_dir()
    parts = ("train", "test") if split == "all" else (split,)
    if split == "all" and n is not None and n <= 60000:
        parts = ("train",)  # the first n of "all" are training images: skip the test file
    xs, ys = [], []
    for p in parts:
        xs.append(_read_idx(d / FASHION_FILES[p][0]))
        ys.append(_read_idx(d / FASHION_FILES[p][1]))
    x, y = np.concatenate(xs), np.concatenate(ys)
    if n is not None:
        x, y = x[:n], y[:n]
    images = torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)
    return images, torch.from_numpy(y.astype(np.int64))


def fashion_captions(labels: torch.Tensor) -> List[str]:
    """"a photo of a <class>" per label: ten distinct captions, shared by thousands of images."""
    return [f"a photo of a {FASHION_CLASSES[int(i)]}" for i in labels]


def _square(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(h, w)
    y, x = (h - s) // 2, (w - s) // 2
    return img[y:y + s, x:x + s]


def _to_rgb01(img: np.ndarray) -> np.ndarray:
    from skimage.color import gray2rgb, rgba2rgb
    from skimage.util import img_as_float

    img = img_as_float(np.asarray(img))
    if img.ndim == 2:
        img = gray2rgb(img)
    elif img.shape[-1] == 4:
        img = rgba2rgb(img)
    return img.astype(np.float32)


def load_photos(size: int = 64, names: Optional[Sequence[str]] = None,
                verbose: bool = False) -> Tuple[List[str], torch.Tensor, List[str]]:
    """(names, images (P, 3, size, size) in [0, 1], captions) for every photo that loads offline.

    Photos are centre-cropped to a square and resized with anti-aliasing.  Those that need a
    download (scikit-image fetches some with pooch) are skipped; a name not in
    :data:`PHOTO_CAPTIONS` raises ValueError.
    """
    import skimage.data
    from skimage.transform import resize

    wanted = list(PHOTO_CAPTIONS) if names is None else list(names)
    unknown = [n for n in wanted if n not in PHOTO_CAPTIONS]
    if unknown:  # before loading: the loop below skips a photo that fails, which would hide a misspelt name
        raise ValueError(f"names: expected some of {tuple(PHOTO_CAPTIONS)}, got unknown {unknown}")
    got_names, imgs, skipped = [], [], []
    sk_samples = None
    for name in wanted:
        try:
            if name.startswith("sklearn_"):
                if sk_samples is None:
                    from sklearn.datasets import load_sample_images

                    data = load_sample_images()
                    sk_samples = {Path(f).stem: im for f, im in zip(data.filenames, data.images)}
                img = sk_samples[name[len("sklearn_"):]]
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    img = getattr(skimage.data, name)()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:  # needs a download (under pytest skimage raises pytest's Skipped)
            skipped.append(name)
            continue
        if isinstance(img, tuple):  # stereo pair: the left image
            img = img[0]
        img = _square(_to_rgb01(img))
        img = resize(img, (size, size), anti_aliasing=True).astype(np.float32)
        got_names.append(name)
        imgs.append(np.clip(img, 0.0, 1.0))
    if verbose:
        print(f"loaded {len(imgs)} photos" + (f" (skipped {len(skipped)}: {', '.join(skipped)})" if skipped else ""))
    images = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return got_names, images, [PHOTO_CAPTIONS[n] for n in got_names]


QUERY_KINDS = ("half", "quarter", "noise")
HALVES = ("bottom", "top", "left", "right")  # which half is hidden
OCCLUSIONS = QUERY_KINDS + HALVES


def visible_mask(shape: Tuple[int, int], kind: str) -> torch.Tensor:
    """(H, W) bool: the pixels ``occlude(kind)`` leaves intact (all of them for noise).

    "half" hides the bottom half (as "bottom"); "quarter" the bottom-right quarter;
    "bottom", "top", "left", "right" the half of that name.
    """
    if kind not in OCCLUSIONS:
        raise ValueError(f"kind: expected one of {OCCLUSIONS}, got {kind!r}")
    h, w = shape
    m = torch.ones(h, w, dtype=torch.bool)
    if kind in ("half", "bottom"):
        m[h // 2:, :] = False
    elif kind == "top":
        m[:h // 2, :] = False
    elif kind == "left":
        m[:, :w // 2] = False
    elif kind == "right":
        m[:, w // 2:] = False
    elif kind == "quarter":
        m[h // 2:, w // 2:] = False
    return m


def occlude(images: torch.Tensor, kind: str, *, noise_std: float = 0.2, seed: int = 0,
            fill: float = 0.0) -> torch.Tensor:
    """Damaged copies of ``images`` (N, C, H, W) in [0, 1].

    - an occlusion (:func:`visible_mask`): the hidden pixels set to ``fill`` (black by
      default, as the paper's Fig. 1);
    - "noise": Gaussian noise of std ``noise_std`` added, clipped to [0, 1].
    """
    if kind == "noise":
        g = torch.Generator().manual_seed(seed)
        return (images + noise_std * torch.randn(images.shape, generator=g)).clamp_(0.0, 1.0)
    m = visible_mask(tuple(images.shape[-2:]), kind)
    return images.masked_fill(~m, fill)
