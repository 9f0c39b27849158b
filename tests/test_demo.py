"""`hen demo --quick` (what `make demo` runs, smaller) stores real photos and recalls them."""
import json

import pytest

pytest.importorskip("skimage")
pytest.importorskip("matplotlib")

from hen_kernels.hen import demo  # noqa: E402
from hen_kernels.hen.taef2 import find_taef2_dir  # noqa: E402


def test_defaults():
    a = demo.parse_args(["--quick"])
    assert (a.size, a.distractors) == (32, 40)
    a = demo.parse_args([])
    assert (a.size, a.distractors, a.out) == (64, 200, "demo_out")
    with pytest.raises(SystemExit):
        demo.parse_args(["--size", "30"])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_out")
    codecs = "image,taef2" if find_taef2_dir() else "image"
    assert demo.main(["--quick", "--out", str(out), "--codecs", codecs, "--text", "pixel"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    return out, summary, {(r["codec"], r["query"]): r for r in summary["rows"]}


def test_captions_and_noise_recall(quick_run):
    _, summary, rows = quick_run
    p = len(summary["photos"])
    assert p >= 15 and summary["bank_rows"] == p + 40
    for (codec, query), r in rows.items():
        assert r["total"] == p and 0 <= r["right"] <= p
        if query == "caption":
            assert r["right"] == p, (codec, r["missed"])  # every photo from its caption alone
    assert rows["image", "noise"]["right"] >= 0.75 * p  # noise std 0.2 on 32 x 32 photos among look-alike crops
    # the half-hidden photo with its mask: the known half finds it, where the black half misleads
    assert rows["image", "half, masked"]["right"] == p
    assert rows["image", "half, masked"]["right"] > rows["image", "half"]["right"]


@pytest.mark.skipif(find_taef2_dir() is None, reason="TAEF2 weights absent (set HEN_TAEF2_DIR)")
def test_hen_beats_raw_pixels_on_occlusion(quick_run):
    # the paper's Fig. 1: half-hidden photos fall into metastable states on raw pixels,
    # and come back when stored as TAEF2 latents
    _, summary, rows = quick_run
    p = len(summary["photos"])
    assert rows["taef2", "half"]["right"] >= p - 3
    assert rows["taef2", "half"]["right"] > rows["image", "half"]["right"] + p // 3
    assert rows["taef2", "quarter"]["right"] >= rows["image", "quarter"]["right"]
    assert rows["taef2", "half, masked"]["right"] >= p - 1


def test_png_written(quick_run):
    from skimage.io import imread

    out, _, _ = quick_run
    img = imread(out / "recall.png")
    assert img.ndim == 3 and img.shape[0] > 300 and img.std() > 10


@pytest.mark.parametrize("argv", [["--size", "12", "--distractors", "-3"], ["--size", "0", "--distractors", "0"],
                                  ["--quick", "--beta", "0"], ["--quick", "--beta", "nan"],
                                  ["--quick", "--codecs", "image,pixels"]])
def test_hen_demo_checks_every_value_before_any_work(argv, tmp_path, capsys):
    # `hen demo` parses with the hen parser and hands demo.run its namespace, --size and --distractors filled in
    from hen_kernels import cli

    out = tmp_path / "out"
    codecs = [] if "--codecs" in argv else ["--codecs", "image"]
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", *argv, *codecs, "--out", str(out)])
    assert e.value.code == 2 and "hen demo: error:" in capsys.readouterr().err
    assert not out.exists()
