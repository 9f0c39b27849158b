"""Fig. 2: recall quality (MSE, 1 - SSIM, identity accuracy) against beta, dot and ℓ2, per codec.

A bank of the first ``n_bank`` Fashion-MNIST images; ``n_queries`` of them, damaged
(``kinds``: "quarter" and "half" hidden in black, and "bottom, masked", the bottom half
hidden with its mask, hen/masks.py), are recalled for each beta in ``betas``, each
similarity and each codec.
MSE and 1 - SSIM compare the decoded recall with the decoded stored latent (the paper's
measure) over the first ``n_decode`` queries.  A KMN sweep over (r, α) on raw pixels is
reported beside it (the paper: KMNs are "highly sensitive to these settings").
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .. import metrics
from ..data import load_fashion_mnist, occlude, visible_mask
from ..layer import HEN
from ..kmn import KMN
from .common import (MIN_BANK, available_codecs, cached_encode, check_betas, check_count, clamp_queries, codec_by_name,
                     markdown_table, plt, write_results)

BETAS = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)
SIMILARITIES = ("dot", "l2")


def run(out: Path, *, quick: bool = False, n_bank: Optional[int] = None, n_queries: Optional[int] = None,
        n_decode: Optional[int] = None, betas: Optional[Sequence[float]] = None,
        kinds: Sequence[str] = ("quarter", "half", "bottom, masked"),
        codecs: Optional[Sequence[str]] = None, max_steps: int = 100, seed: int = 0, taef2_path=None,
        command: str = "hen experiment fig2") -> Dict:
    from tqdm.auto import tqdm

    # checked before any work (the KMN sweep at the end reshapes by these numbers)
    n_bank = check_count("n_bank", n_bank, MIN_BANK) or (150 if quick else 2000)
    n_queries = check_count("n_queries", n_queries) or (30 if quick else 300)
    n_decode = check_count("n_decode", n_decode) or (10 if quick else 100)
    betas = check_betas(betas) if betas else list(BETAS[::3] if quick else BETAS)
    codecs = available_codecs(codecs, taef2_path)
    images, _ = load_fashion_mnist(n=n_bank)
    n_bank = len(images)  # at most the 70,000 there are
    n_queries = clamp_queries("fig2", n_queries, n_bank)
    g = torch.Generator().manual_seed(seed)
    qidx = torch.randperm(n_bank, generator=g)[:n_queries]
    targets = images[qidx]
    rows: List[Dict] = []
    t0 = time.perf_counter()
    bar = tqdm(total=len(codecs) * len(kinds) * len(SIMILARITIES) * len(betas), desc="fig2", unit="recall")
    for cname in codecs:
        codec = codec_by_name(cname, taef2_path)
        full = cached_encode(codec, images, "fashion")
        recon = codec.decode(full[qidx[:n_decode]], progress=False)
        for kind in kinds:
            hidden = kind.split(",")[0]
            q = occlude(targets, hidden, seed=seed)
            if kind.endswith("masked"):
                qlat, qw = codec.encode_masked(q, visible_mask(tuple(q.shape[-2:]), hidden), progress=False)
            else:
                qlat, qw = codec.encode(q, progress=False), None
            for sim in SIMILARITIES:
                for beta in betas:
                    bar.set_postfix_str(f"{cname} {kind} {sim} beta={beta:g}")
                    hen = HEN(codec, beta=beta, similarity=sim, max_steps=max_steps, tol=1e-4, progress=False)
                    hen.store(latents=full)
                    r = hen.recall(latents=qlat, latent_weights=qw, decode=False)
                    dec = codec.decode(r.latents[:n_decode], progress=False)
                    rows.append(dict(codec=cname, kind=kind, similarity=sim, beta=beta,
                                     acc=metrics.identity_accuracy(r.index, qidx),
                                     mse=float(metrics.mse(dec, recon).mean()),
                                     ssim=float(metrics.one_minus_ssim(dec, recon).mean()),
                                     top_w=float(r.top_weight.mean()), steps=float(r.steps.float().mean())))
                    bar.update(1)
    bar.close()
    kmn_rows = []
    bank = images.reshape(n_bank, -1)
    med = float(torch.cdist(bank[:200], bank).median())
    for kind in [k for k in kinds if not k.endswith("masked")]:  # KMN has no masked form
        q = occlude(targets, kind, seed=seed).reshape(n_queries, -1)
        for rf in ((0.5, 1.0) if quick else (0.1, 0.3, 1.0, 3.0)):
            for alpha in (1.0, 2.0):
                kmn = KMN(bank, r=rf * med, alpha=alpha)
                res = kmn.retrieve(q, max_steps=max_steps, tol=1e-4)
                dec = res.state[:n_decode].reshape(-1, *images.shape[1:]).clamp(0, 1)
                kmn_rows.append(dict(kind=kind, r=rf * med, r_rel=rf, alpha=alpha,
                                     acc=metrics.identity_accuracy(res.index, qidx),
                                     mse=float(metrics.mse(dec, targets[:n_decode]).mean()),
                                     ssim=float(metrics.one_minus_ssim(dec, targets[:n_decode]).mean())))
    total = time.perf_counter() - t0
    _plot(out / "fig2.png", rows, codecs, kinds)
    body = (f"Bank: the first {n_bank} Fashion-MNIST images; {n_queries} queries; up to {max_steps} steps, "
            f"tol 1e-4; beta acts on normalised latents (hen/layer.py); MSE and 1-SSIM over {n_decode} queries "
            f"against the decoded stored latent. Total {total:.0f} s.\n\n"
            + markdown_table(rows, ["codec", "kind", "similarity", "beta", "acc", "mse", "ssim", "top_w", "steps"],
                             ["codec", "query", "sim", "beta", "identity acc", "MSE", "1-SSIM", "top weight",
                              "steps"])
            + "\n\n![fig2](fig2.png)\n\n## KMN (raw pixels), r relative to the median pairwise distance "
            f"{med:.2f}\n\n"
            + markdown_table(kmn_rows, ["kind", "r_rel", "alpha", "acc", "mse", "ssim"],
                             ["query", "r / median", "alpha", "identity acc", "MSE (vs image)", "1-SSIM"]) + "\n")
    write_results(out, "fig2", "Fig. 2: recall against beta (Fashion-MNIST)", command, body,
                  dict(rows=rows, kmn=kmn_rows, n_bank=n_bank, n_queries=n_queries, seconds=total))
    return dict(rows=rows, kmn=kmn_rows)


def _plot(path: Path, rows: List[Dict], codecs: Sequence[str], kinds: Sequence[str]) -> None:
    p = plt()
    fig, axes = p.subplots(len(kinds), 3, figsize=(13, 3.3 * len(kinds)), squeeze=False)
    for i, kind in enumerate(kinds):
        for j, (key, lab) in enumerate((("mse", "MSE"), ("ssim", "1 - SSIM"), ("acc", "identity accuracy"))):
            ax = axes[i][j]
            for c in codecs:
                for sim in SIMILARITIES:
                    pts = [(r["beta"], r[key]) for r in rows if r["codec"] == c and r["similarity"] == sim
                           and r["kind"] == kind]
                    ax.plot(*zip(*pts), marker="o", label=f"{sim}-{c}", linestyle="-" if sim == "l2" else "--")
            ax.set_xscale("log")
            ax.set_xlabel("beta (normalised latents)")
            ax.set_ylabel(lab)
            ax.set_title(f"{lab}, {kind}" + ("" if kind.endswith("masked") else " hidden"), fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    p.close(fig)
