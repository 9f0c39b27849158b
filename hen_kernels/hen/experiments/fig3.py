"""Fig. 3: separability, the distributions of cos(query_i, memory_j) for i = j (self) and i != j (cross).

Queries are the first ``n`` Fashion-MNIST images with the given occlusion, encoded like
the memories.  Shown twice: on the encodings as they are (the paper's plot) and centred
by the memories' mean (what HEN's normalisation stores, hen/layer.py; for raw pixels the
uncentred cosine is dominated by the shared mean image).  The table adds d' and the
cosine nearest-neighbour accuracy.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from .. import metrics
from ..data import load_fashion_mnist, occlude
from .common import available_codecs, cached_encode, check_count, codec_by_name, markdown_table, plt, write_results


def run(out: Path, *, quick: bool = False, n: Optional[int] = None, kind: str = "half",
        codecs: Optional[Sequence[str]] = None, seed: int = 0, taef2_path=None,
        command: str = "hen experiment fig3") -> Dict:
    from tqdm.auto import tqdm

    n = check_count("n", n, 2) or (150 if quick else 2000)  # 2: the cross distribution needs a pair
    codecs = available_codecs(codecs, taef2_path)
    images, _ = load_fashion_mnist(n=n)
    queries = occlude(images, kind, seed=seed)
    rows, hists = [], {}
    t0 = time.perf_counter()
    for cname in tqdm(codecs, desc="fig3", unit="codec"):
        codec = codec_by_name(cname, taef2_path)
        mem = cached_encode(codec, images, "fashion")
        q = codec.encode(queries, progress=False)
        for view, (qq, mm) in (("raw", (q, mem)), ("centred", (q - mem.mean(0), mem - mem.mean(0)))):
            s, x = metrics.cosine_distributions(qq, mm, seed=seed)
            hists[cname, view] = (s, x)
            rows.append(dict(codec=cname, view=view, **metrics.separability(qq, mm, seed=seed)))
    total = time.perf_counter() - t0
    _plot(out / "fig3.png", hists, codecs, kind)
    body = (f"{n} Fashion-MNIST images; queries {kind}-occluded. Total {total:.0f} s.\n\n"
            + markdown_table(rows, ["codec", "view", "self_mean", "self_std", "cross_mean", "cross_std", "d_prime",
                                    "nn_accuracy"],
                             ["codec", "cosine on", "self mean", "self std", "cross mean", "cross std", "d'",
                              "cosine NN acc"])
            + "\n\n![fig3](fig3.png)\n")
    write_results(out, "fig3", "Fig. 3: query/memory cosine similarity (separability)", command, body,
                  dict(rows=rows, n=n, kind=kind, seconds=total))
    return dict(rows=rows)


def _plot(path: Path, hists, codecs: Sequence[str], kind: str) -> None:
    p = plt()
    views = ("raw", "centred")
    fig, axes = p.subplots(len(views), len(codecs), figsize=(4 * len(codecs), 3 * len(views)), squeeze=False)
    for i, view in enumerate(views):
        for j, c in enumerate(codecs):
            s, x = hists[c, view]
            ax = axes[i][j]
            bins = np.linspace(min(s.min(), x.min()), 1.0, 60)
            ax.hist(x, bins=bins, density=True, alpha=0.6, color="tab:blue", label="cross (i != j)")
            ax.hist(s, bins=bins, density=True, alpha=0.6, color="tab:red", label="self (i = j)")
            ax.set_title(f"{c}, cosine on {view} ({kind} queries)", fontsize=9)
            ax.set_xlabel("cosine similarity of query i and memory j")
            ax.set_ylabel("density")
            ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    p.close(fig)
