"""The CPU table as a picture: each row's speed against every peer, its targets, and its share of the
machine's measured ceiling (``STEM.png`` next to ``STEM.md``; ``bench cpu --from-json`` redraws it).

One row per case of the main table.  Left: peer time / kernel time on a log axis (right of 1: the kernel
is faster), a marker per peer, the target as a bar of the peer's colour; a red ring marks a missed
target, a cross a peer whose answer failed its float32 check (timed, not trusted).  Right: the
kernel's fraction of the read or matmul ceiling the same run measured (cpu.py ``add_targets``).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

# peer key in a row -> (legend label, colour, marker); "own fp32" lives in the targets, not the peers
PEER_STYLE: Dict[str, Tuple[str, str, str]] = {
    "sdpa": ("SDPA (flash; l2sq with bias)", "#1f77b4", "o"),
    "sdpa_math": ("SDPA math", "#7fb2dc", "o"),
    "plain": ("plain PyTorch", "#8c564b", "s"),
    "compile": ("torch.compile(plain)", "#9467bd", "^"),
    "own fp32": ("own float32 (bf16 rows)", "#2ca02c", "D"),
}
# the target names cpu.add_targets gives -> the peer they belong to
TARGET_PEER = {"SDPA": "sdpa", "SDPA+bias": "sdpa", "plain": "plain", "own fp32": "own fp32"}
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def row_label(r: dict) -> str:
    return f"{r['regime']} {r['similarity']} B={r['B']} D={r['D']} {SHORT_DTYPE.get(r['dtype'], r['dtype'])}"


def row_points(r: dict) -> List[Tuple[str, float, Optional[float], Optional[bool], bool]]:
    """(peer, ratio, target or None, target met or None, answer checked) for each peer of the row."""
    targets = {TARGET_PEER[t["peer"]]: t for t in r.get("targets", [])}
    pts = []
    for key in PEER_STYLE:
        if key == "own fp32":
            t = targets.get(key)
            if t is not None:
                pts.append((key, t["ratio"], t["target"], t["met"], True))
            continue
        p = r["peers"].get(key)
        if p is None or p.get("ratio") is None:
            continue
        t = targets.get(key)
        pts.append((key, p["ratio"], t["target"] if t else None, t["met"] if t else None, bool(p["ok"])))
    return pts


def title(report: dict) -> str:
    m = report["machine"]
    emulated = " (AVX2 EMULATED)" if m.get("emulated") else ""
    quick = " (--quick shapes)" if report.get("quick") else ""
    return (f"hen_kernels CPU kernel against its peers{emulated}{quick}\n{m['cpu']} ({m['isa']}), "
            f"torch {m['torch']}, {m['torch_threads']} threads; median of {report['repeats']}+ interleaved calls")


def draw(path: str, report: dict) -> None:
    """Write the figure to ``path`` (matplotlib, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    ys = list(range(len(rows)))[::-1]  # the table's first row on top
    fig, (ax, axc) = plt.subplots(1, 2, figsize=(12, 0.32 * len(rows) + 2.2), sharey=True,
                                  gridspec_kw={"width_ratios": [3, 1]})
    seen = set()
    for y, r in zip(ys, rows):
        for key, ratio, target, met, ok in row_points(r):
            label, color, marker = PEER_STYLE[key]
            if target is not None:
                ax.plot([target, target], [y - 0.35, y + 0.35], color=color, lw=1.2, alpha=0.8)
            style = dict(color=color, s=34, zorder=3, label=None if key in seen else label)
            if not ok:
                ax.scatter([ratio], [y], marker="x", **style)
            else:
                ax.scatter([ratio], [y], marker=marker, **style)
                if met is False:
                    ax.scatter([ratio], [y], marker="o", s=150, facecolors="none", edgecolors="red",
                               linewidths=1.5, zorder=4, label=None if "missed" in seen else "target missed")
                    seen.add("missed")
            seen.add(key)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("peer time / hen_kernels time (log; right of 1: hen_kernels faster); "
                  "bars: targets, red ring: target missed, x: peer's answer failed its check")
    ax.set_yticks(ys)
    ax.set_yticklabels([row_label(r) for r in rows], fontsize=7)
    ax.grid(True, axis="x", which="both", alpha=0.25)
    ax.xaxis.label.set_size(7)

    fractions = [100 * r.get("fraction", 0.0) for r in rows]
    colors = ["#8c8c8c" if r.get("ceiling") == "read" else "#ff7f0e" for r in rows]
    axc.barh(ys, fractions, color=colors, height=0.6)
    axc.axvline(100, color="black", lw=0.8)
    axc.set_xlabel("% of ceiling (grey: read, orange: matmul)", fontsize=7)
    axc.grid(True, axis="x", alpha=0.25)
    fig.suptitle(title(report), fontsize=8)
    # Below the axes, where no row's points can sit under it.
    fig.legend(*ax.get_legend_handles_labels(), fontsize=7, loc="lower center", ncol=6, frameon=False)
    fig.tight_layout(rect=(0, 0.035, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
