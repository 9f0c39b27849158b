"""The recall demo (`python -m hen_kernels.demo --quick`) runs and really recalls the photos."""
import json

import pytest

pytest.importorskip("skimage")

from hen_kernels import demo  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_out")
    assert demo.main(["--quick", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = {(r["patterns"], r["kind"], r["similarity"]): r for r in summary["rows"]}
    return out, summary, rows


def test_quick_defaults():
    args = demo.parse_args(["--quick"])
    assert (args.size, args.distractors) == (32, 400)
    args = demo.parse_args([])
    assert (args.size, args.distractors, args.out) == (64, 4000, "demo_out")


def test_bank_and_table(quick_run):
    _, summary, rows = quick_run
    assert len(summary["photos"]) >= 10  # the bundled photos that load offline
    assert summary["bank_rows"] == len(summary["photos"]) + 400
    assert summary["dim"] == 32 * 32
    assert summary["auto_backend"] in summary["backends"]
    assert len(rows) == len(demo.REPRESENTATIONS) * len(demo.KINDS) * len(demo.SIMILARITIES)
    for r in rows.values():
        assert r["total"] == len(summary["photos"])
        assert 0 <= r["right"] <= r["total"] and 1 <= r["steps"] <= demo.MAX_STEPS


def test_noisy_queries_are_recalled(quick_run):
    # Noise keeps every pixel's information: each noisy photo comes back exactly, on raw
    # pixels and standardised alike (state within MSE 1e-4 of the stored pattern).
    _, _, rows = quick_run
    for patterns in demo.REPRESENTATIONS:
        r = rows[patterns, "noise", "l2"]
        assert r["right"] == r["total"], (patterns, r["missed"])
    r = rows["standardized", "noise", "dot"]
    assert r["right"] == r["total"], r["missed"]


def test_standardized_recall_lands_on_the_best_match(quick_run):
    # On standardised patterns the dynamics converge to the query's exact best-scoring row
    # whenever that row is the photo, for every kind of damage and both similarities.
    _, _, rows = quick_run
    for kind in demo.KINDS:
        for sim in demo.SIMILARITIES:
            r = rows["standardized", kind, sim]
            assert r["right"] == r["best"], (kind, sim, r)


def test_half_occluded_l2(quick_run):
    # Half-hidden photos are the hard case: a flat look-alike can be nearer than the photo
    # itself (not every one comes back, even with standardised patterns; see the module
    # docstring).  Standardising must recover almost all of them and clearly beat raw pixels.
    _, _, rows = quick_run
    std, pix = rows["standardized", "half", "l2"], rows["pixels", "half", "l2"]
    assert std["right"] >= std["total"] - 2, std["missed"]
    assert std["right"] > pix["right"] + std["total"] // 4


def test_png_written(quick_run):
    from skimage.io import imread

    out, summary, _ = quick_run
    img = imread(out / "recall_l2.png")
    rows, cols = min(6, len(summary["photos"])), 1 + 3 * len(demo.KINDS)
    assert img.shape == (rows * 34 + 2, cols * 34 + 2)
    assert img.std() > 10  # not blank
