"""Table 1: raw-image MHN against HEN codecs as the bank grows (Fashion-MNIST).

The bank holds the first N Fashion-MNIST images (train then test) for each N in
``sizes``; the same ``n_queries`` images, drawn at random from the first min(sizes),
are damaged three ways (half occluded, a quarter occluded, noisy) and recalled with
ℓ2 similarity.  Per (codec, N, kind):

- ``acc``: identity accuracy (the recalled row is the stored image's own row);
- ``nn``: the fraction whose query is nearest (in the stored representation) to its own
  memory, i.e. the accuracy a perfectly sharp one-step recall would have;
- ``mse``, ``1-ssim``: between the decoded recall and the decoded stored latent (the
  paper's measure: 0 means the memory came back exactly), over the first ``n_decode``
  queries; ``top_w``: the mean softmax weight of the winning row; ``steps``.

An extra row per (N, kind), ``visible-NN``, is the nearest neighbour on raw pixels using
only the visible pixels: whether the query identifies the image at all.  A KMN row (raw
pixels, exponential kernel) is added for banks of at most ``kmn_max`` images.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .. import metrics
from ..data import QUERY_KINDS, load_fashion_mnist, occlude, visible_mask
from ..layer import HEN
from ..kmn import KMN
from .common import available_codecs, cached_encode, codec_by_name, markdown_table, plt, write_results

SIZES = (6000, 10000, 15000, 70000)
QUICK_SIZES = (150, 300)
BETA = 200.0


def visible_nn(bank: torch.Tensor, queries: torch.Tensor, kind: str) -> torch.Tensor:
    """Index of the nearest bank image to each query, measured on the visible pixels only."""
    m = visible_mask(tuple(bank.shape[-2:]), kind).expand(bank.shape[1:]).reshape(-1)
    b = bank.reshape(len(bank), -1)[:, m]
    q = queries.reshape(len(queries), -1)[:, m]
    out = []
    for i in range(0, len(q), 512):
        out.append(torch.cdist(q[i:i + 512], b).argmin(1))
    return torch.cat(out)


def run(out: Path, *, quick: bool = False, sizes: Optional[Sequence[int]] = None, n_queries: Optional[int] = None,
        n_decode: Optional[int] = None, codecs: Sequence[str] = ("image", "taef2"), beta: float = BETA,
        max_steps: int = 100, kmn_max: Optional[int] = None, seed: int = 0, taef2_path=None,
        command: str = "hen experiment table1") -> Dict:
    from tqdm.auto import tqdm

    sizes = list(sizes or (QUICK_SIZES if quick else SIZES))
    n_queries = n_queries or (40 if quick else 1000)
    n_decode = n_decode or (20 if quick else 200)
    kmn_max = kmn_max if kmn_max is not None else (150 if quick else 6000)
    images, labels = load_fashion_mnist(n=max(sizes))
    sizes = [min(s, len(images)) for s in sizes]
    g = torch.Generator().manual_seed(seed)
    qidx = torch.randperm(min(sizes), generator=g)[:n_queries]
    targets = images[qidx]
    queries = {k: occlude(targets, k, seed=seed) for k in QUERY_KINDS}
    codecs = available_codecs(codecs, taef2_path)
    rows: List[Dict] = []
    t_all = time.perf_counter()
    work = [(c, n) for c in codecs for n in sizes]
    bar = tqdm(total=len(work) * len(QUERY_KINDS), desc="table1", unit="recall")
    for cname in codecs:
        codec = codec_by_name(cname, taef2_path)
        full = cached_encode(codec, images, "fashion")
        qlat = {k: cached_encode(codec, q, None, progress=False) for k, q in queries.items()}
        for n in sizes:
            hen = HEN(codec, beta=beta, similarity="l2", max_steps=max_steps, tol=1e-4, progress=False)
            hen.store(latents=full[:n])
            recon = codec.decode(full[qidx[:n_decode]], progress=False)
            for kind in QUERY_KINDS:
                bar.set_postfix_str(f"{cname} N={n} {kind}")
                t = time.perf_counter()
                r = hen.recall(latents=qlat[kind], decode=False)
                wall = time.perf_counter() - t
                nn = hen.bank.partial(hen.image_query(qlat[kind]).to(hen.bank.dtype), 1.0,
                                      similarity="l2", progress=False).top_index
                dec = codec.decode(r.latents[:n_decode], progress=False)
                rows.append(dict(codec=cname, N=n, kind=kind, beta=beta,
                                 acc=metrics.identity_accuracy(r.index, qidx),
                                 nn=metrics.identity_accuracy(nn, qidx),
                                 mse=float(metrics.mse(dec, recon).mean()),
                                 ssim=float(metrics.one_minus_ssim(dec, recon).mean()),
                                 top_w=float(r.top_weight.mean()), steps=float(r.steps.float().mean()),
                                 queries_per_s=len(qidx) / wall, dim=hen.image_dim))
                bar.update(1)
    bar.close()
    # what the queries themselves allow: nearest neighbour on the visible pixels
    for n in sizes:
        for kind in QUERY_KINDS:
            idx = visible_nn(images[:n], queries[kind], kind)
            rows.append(dict(codec="visible-NN", N=n, kind=kind, acc=metrics.identity_accuracy(idx, qidx)))
    # KMN on raw pixels, on the banks small enough for an N x N pseudo-inverse
    for n in [s for s in sizes if s <= kmn_max]:
        bank = images[:n].reshape(n, -1)
        r = float(torch.cdist(bank[:200], bank).median())
        kmn = KMN(bank, r=r, alpha=1.0)
        for kind in QUERY_KINDS:
            q = queries[kind].reshape(len(qidx), -1)
            res = kmn.retrieve(q, max_steps=max_steps, tol=1e-4)
            dec = res.state[:n_decode].reshape(-1, *images.shape[1:]).clamp(0, 1)
            rows.append(dict(codec="kmn", N=n, kind=kind, acc=metrics.identity_accuracy(res.index, qidx),
                             mse=float(metrics.mse(dec, targets[:n_decode]).mean()),
                             ssim=float(metrics.one_minus_ssim(dec, targets[:n_decode]).mean()),
                             steps=float(res.steps.float().mean()), r=r, alpha=1.0))
    total = time.perf_counter() - t_all
    _plot(out / "table1.png", rows, sizes, codecs)
    cols = ["codec", "N", "kind", "acc", "nn", "mse", "ssim", "top_w", "steps", "queries_per_s"]
    heads = ["codec", "bank N", "query", "identity acc", "nearest is own", "MSE", "1-SSIM", "top weight",
             "steps", "queries/s"]
    body = (f"{len(qidx)} queries (drawn from the first {min(sizes)} images), ℓ2 similarity, beta = {beta:g} "
            f"(normalised latents, hen/layer.py), up to {max_steps} steps, tol 1e-4; MSE and 1-SSIM over the first "
            f"{n_decode} queries, against the decoded stored latent (for `kmn`: against the image). "
            f"`visible-NN`: nearest neighbour on raw pixels using only the visible pixels. "
            f"Total {total:.0f} s.\n\n" + markdown_table(rows, cols, heads) + "\n\n![table1](table1.png)\n")
    write_results(out, "table1", "Table 1: raw-image MHN vs HEN as the bank grows (Fashion-MNIST)", command, body,
                  dict(rows=rows, sizes=sizes, n_queries=len(qidx), beta=beta, seconds=total))
    return dict(rows=rows)


def _plot(path: Path, rows: List[Dict], sizes: Sequence[int], codecs: Sequence[str]) -> None:
    p = plt()
    fig, axes = p.subplots(1, len(QUERY_KINDS), figsize=(4 * len(QUERY_KINDS), 3.2), squeeze=False)
    for ax, kind in zip(axes[0], QUERY_KINDS):
        for c in list(codecs) + ["visible-NN", "kmn"]:
            pts = [(r["N"], r["acc"]) for r in rows if r["codec"] == c and r["kind"] == kind]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=c, linestyle="--" if c in ("visible-NN", "kmn") else "-")
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{kind} queries")
        ax.set_xlabel("bank size N")
        ax.set_ylabel("identity accuracy")
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    p.close(fig)
