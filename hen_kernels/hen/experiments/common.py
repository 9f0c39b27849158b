"""Shared pieces of the experiments: caches, tables, plots, and the fixed settings."""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ...checksums import row_checksums


def cache_dir() -> Path:
    """Where encoded latents are cached between runs: $HEN_CACHE_DIR or ~/.cache/hen_kernels."""
    d = Path(os.environ.get("HEN_CACHE_DIR") or Path.home() / ".cache" / "hen_kernels")
    d.mkdir(parents=True, exist_ok=True)
    return d


def cached_encode(codec, images: torch.Tensor, key: Optional[str], progress: bool = True) -> torch.Tensor:
    """``codec.encode(images)``, cached on disk under ``key`` (None: no cache).  The identity codec is never cached.

    ``key`` names a data set in a fixed order, so the first n rows of a cached longer run are reused, but only
    where the checksums of the images they were encoded from (``row_checksums``, kept with them) equal the
    images' own: a photo that did not load this time, or another set under the same key, had been handed the
    latents of other images.
    """
    if key is None or codec.name == "image":
        return codec.encode(images, progress=progress)
    tag = codec.cache_tag  # changes whenever the codec's latents would (e.g. its padding)
    n = len(images)
    rows = row_checksums(images.reshape(n, -1)).cpu()
    path = cache_dir() / f"{tag}-{key}-{n}.pt"  # the first n of data set `key`
    runs = sorted((int(f.stem.rsplit("-", 1)[1]), f) for f in cache_dir().glob(f"{tag}-{key}-*.pt")
                  if f.stem.rsplit("-", 1)[1].isdigit() and int(f.stem.rsplit("-", 1)[1]) >= n
                  and f.stem.rsplit("-", 1)[0] == f"{tag}-{key}")
    for _, f in runs:  # the shortest run whose first n rows came from these images
        cached = torch.load(f, weights_only=True)
        if (isinstance(cached, dict) and len(cached.get("latents", ())) >= n
                and torch.equal(cached.get("rows", torch.empty(0))[:n], rows)):
            codec._remember(images)
            if hasattr(codec, "_latent_shape") and codec._latent_shape is None:
                codec.encode(images[:1])
            return cached["latents"][:n]
    z = codec.encode(images, progress=progress)
    tmp = path.with_suffix(".tmp")
    torch.save({"latents": z, "rows": rows}, tmp)
    os.replace(tmp, path)
    return z


class UsageError(ValueError):
    """An experiment's request refused before any result is written (a bad option, a codec asked for that cannot
    load): ``hen experiment`` prints it as a usage error, exit 2, without a traceback."""


def check_codec_names(names: Sequence[str]) -> List[str]:
    """``names`` if each is one ``make_codec`` takes (image, taef2, diffusers:PATH), else UsageError."""
    names = list(names)
    bad = [n for n in names if n not in ("image", "taef2") and not (n.startswith("diffusers:") and n[10:])]
    if bad or not names:
        raise UsageError(f"codecs: expected some of image, taef2, diffusers:PATH, got {names}")
    return names


# The smallest bank table1 and fig2 take: their KMN baseline's radius is the median pairwise distance, the
# diagonal's zeros included, and that is 0 (which KMN refuses) for 1 or 2 images.
MIN_BANK = 3


def check_count(name: str, value: Optional[int], minimum: int = 1) -> Optional[int]:
    """An optional int >= minimum (None: the experiment's default), as UsageError."""
    from ...nn.arguments import check_int

    try:
        return check_int(name, value, minimum, optional=True)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None


def check_betas(betas: Sequence[float]) -> List[float]:
    from ...validation import check_beta_value

    try:
        return [check_beta_value(b) for b in betas]
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_out_folder(out: str) -> str:
    """A results folder that exists or can be made, as UsageError where not: a file there, or a folder this
    process cannot make, had ended a run (after its work) in a traceback.  Nothing is made here: a folder made
    and removed again in its nearest existing ancestor says whether the run can make it."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"out: {out!r} is a file, not a folder")
    ancestor = next(p for p in (path, *path.absolute().parents) if p.exists())
    try:
        os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=".hen-out-"))
    except OSError as e:
        raise UsageError(f"out: cannot make or write the folder {out!r} (in {str(ancestor)!r}: "
                         f"{e.strerror or e})") from None
    return out


def clamp_queries(experiment: str, n_queries: int, n_images: int) -> int:
    """At most ``n_images`` queries (each is a distinct stored image), saying so when fewer than asked."""
    if n_queries > n_images:
        print(f"{experiment}: {n_queries} queries asked, but the queries are drawn from {n_images} images: "
              f"using {n_images}")
    return min(n_queries, n_images)


def codec_by_name(name: str, taef2_path=None):
    from ..codecs import make_codec

    try:
        return make_codec(name, taef2_path=taef2_path)
    except FileNotFoundError as e:  # weights or a model folder asked for: results without it would mislead
        raise UsageError(f"codec {name!r} cannot load: {e}") from None


def available_codecs(names: Optional[Sequence[str]], taef2_path=None,
                     default: Sequence[str] = ("image", "taef2")) -> List[str]:
    """The codecs to run.  ``names`` None: those of ``default`` that can run here (TAEF2 needs its weights,
    downloaded if allowed), printing why one is left out.  Codecs named by the caller must all run: one that
    cannot raises UsageError, so no table is written without it."""
    from ..taef2 import find_taef2, missing_message

    out = []
    for n in check_codec_names(default if names is None else names):
        if n == "taef2":
            where, why = find_taef2(taef2_path, download=True)
            if where is None:
                if names is not None:
                    raise UsageError(f"codec taef2 cannot load: {missing_message(taef2_path, why)}")
                print(f"skipping codec taef2: {missing_message(taef2_path, why)}")
                continue
        out.append(n)
    return out


def fmt(v, digits: int = 3) -> str:
    if isinstance(v, float):
        if v != v:
            return "–"
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(rows: List[Dict], columns: Sequence[str], headers: Optional[Sequence[str]] = None,
                   digits: int = 3) -> str:
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, ""), digits) for c in columns) + " |")
    return "\n".join(lines)


def write_results(out: Path, name: str, title: str, command: str, body: str, data: Dict) -> Path:
    """``name.md`` (title, the command that made it, the body) and ``name.json`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{name}.md"
    md.write_text(f"# {title}\n\nMade by `{command}` on {time.strftime('%Y-%m-%d')} "
                  f"({os.cpu_count()} CPU cores, torch {torch.__version__}).\n\n{body.rstrip()}\n")
    (out / f"{name}.json").write_text(json.dumps(data, indent=1, default=float))
    return md


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as p

    return p


def image_grid(path: Path, columns: Sequence[torch.Tensor], labels: Sequence[str], rows: int = 6,
               scale: int = 2, marks: Optional[Sequence[Optional[Sequence[Optional[str]]]]] = None,
               row_labels: Optional[Sequence[str]] = None) -> None:
    """A PNG grid: one column per tensor of images (N, C, H, W), the first ``rows`` images of each.

    ``marks[j][i]``, when a string, flags image i of column j as wrong: a red frame and the string
    under it (e.g. which memory a recall returned instead).
    """
    p = plt()
    rows = min(rows, *(len(c) for c in columns))
    fig, axes = p.subplots(rows, len(columns), figsize=(scale * len(columns) * 0.8, scale * rows * 0.8),
                           squeeze=False)
    for j, (col, lab) in enumerate(zip(columns, labels)):
        for i in range(rows):
            ax = axes[i][j]
            img = col[i].float().clamp(0, 1)
            if img.shape[0] == 1:
                ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img.permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            mark = marks[j][i] if marks is not None and marks[j] is not None else None
            if mark:
                for side in ax.spines.values():
                    side.set_edgecolor("red")
                    side.set_linewidth(3)
                ax.set_xlabel(f"✗ {mark}", fontsize=6, color="red")
            if i == 0:
                ax.set_title(lab, fontsize=7)
            if j == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[i], fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    p.close(fig)
