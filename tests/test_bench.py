"""`python -m hen_kernels.bench cpu --quick` (and `crossover --quick`, `shapes --quick`) run, and write one sensible row
per case."""
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hen_kernels import ops
from hen_kernels.bench import cpu as bench
from hen_kernels.bench import crossover, shapes
from hen_kernels.bench.cpu_peers import cpu_info

from .conftest import require

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_writes_json_and_markdown(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "hen_kernels.bench", "cpu", "--quick", "--repeats", "2", "--no-compile",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "cpu.json").read_text())
    md = (out / "cpu.md").read_text()

    expected = bench.cases(bench.QUICK_N)
    rows = report["rows"]
    assert [r["name"] for r in rows] == [c.name for c in expected]
    assert {(r["regime"], r["similarity"], r["dtype"]) for r in rows} == {
        (regime, s, dt) for regime in ("recall", "layer", "bulk") for s in ("dot", "l2sq", "l2")
        for dt in ("float32", "bfloat16")
    }
    assert report["quick"] is True and report["repeats"] == 2
    m = report["machine"]
    assert m["fused_backend"] in ("cpu", "torch")
    assert m["fused_is_reference"] == (m["fused_backend"] == "torch")
    assert m["torch_threads"] >= 1 and m["cpu"] and m["isa"] and m["matrix_units"]
    assert {"matmul_gflops", "matmul_bf16_gflops", "matmul_gflops_after", "read_gbps"} <= set(report["ceilings"])
    for c in report["ceilings"].values():
        assert not isinstance(c, float) or (math.isfinite(c) and c > 0)

    for case, r in zip(expected, rows):
        t = r["fused_ms"]
        assert math.isfinite(t) and t > 0, (case.name, t)
        assert math.isclose(r["fused_gflops"], case.flops / (t * 1e-3) / 1e9, rel_tol=1e-9)
        assert math.isclose(r["fused_gbps"], case.bytes / (t * 1e-3) / 1e9, rel_tol=1e-9)
        assert r["fused_extra_mib"] is None or (math.isfinite(r["fused_extra_mib"]) and r["fused_extra_mib"] >= 0)
        assert r["fused_backend"] == m["fused_backend"]
        # Every timed call is kept, the median is theirs, and so is the IQR.
        calls = r["fused_times_ms"]
        assert len(calls) == r["fused_calls"] and math.isclose(statistics.median(calls), t, rel_tol=1e-9)
        q1, _, q3 = statistics.quantiles(calls, n=4)
        assert math.isclose(r["fused_iqr"], (q3 - q1) / t, rel_tol=1e-9, abs_tol=1e-12)
        # Every peer the similarity allows was checked and timed (SDPA cannot express l2).
        want = {"plain", "sdpa", "sdpa_math"} if case.similarity != "l2" else {"plain"}
        assert want <= set(r["peers"])
        for name, p in r["peers"].items():
            assert math.isfinite(p["ms"]) and p["ms"] > 0 and math.isclose(p["ratio"], p["ms"] / t, rel_tol=1e-9)
            if name == "faiss":
                assert 0 <= p["top1_agrees"] <= 1
            else:
                assert p["ok"] == (p["rel_err"] <= bench.CHECK_TOL[case.dtype])
                # against float64: a check the float32 plain peer could fail (against its own float32
                # expression it had been exactly 0)
                assert p["rel_err"] > 0, (case.name, name)
        # 16-bit rows time the kernel's own float32 call in the same rounds, and the target uses it.
        if case.dtype != "float32":
            own = r["own_fp32_ms"]
            assert math.isfinite(own) and own > 0
            for target in r["targets"]:
                if target["peer"] == "own fp32":
                    assert math.isclose(target["ratio"], own / t, rel_tol=1e-9)
        else:
            assert "own_fp32_ms" not in r
        for target in r["targets"]:
            assert target["met"] in (True, False, None)
        oks = [x["met"] for x in r["targets"]]
        assert r["met"] is (False if False in oks else None if None in oks or not oks else True)
        assert 0 < r["fraction"]
        # The fused kernel and plain PyTorch compute the same update.
        assert r["check_ok"] and 0 <= r["rel_err"] < bench.KERNEL_TOL[case.dtype], (case.name, r["rel_err"])

    r_by_name = {r["name"]: r for r in rows}
    table = [line for line in md.split("\n\n## ")[0].splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(expected)  # header + one row per case
    for case, line in zip(expected, table[1:]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:6] == [case.regime, case.similarity, str(case.B), str(case.N), str(case.D), case.dtype]
        assert cells[-1] in ("yes", "NO")
        assert cells[7] == f"{100 * r_by_name[case.name]['fused_iqr']:.0f}%"
    assert m["fused_backend_label"] in md
    if m["fused_backend"] == "cpu":  # the side tables: steps, weights, the l2 rule
        assert len(report["steps"]) and len(report["weighted"]) and len(report["l2_rule"])
        assert "## Multi-step retrieval" in md and "## Weighted similarity" in md
        for r in report["weighted"]:  # a shared mask and weights of each query's own, each checked
            assert math.isclose(r["per_query_cost"], r["per_query_ms"] / r["unweighted_ms"], rel_tol=1e-9)
            assert r["check_ok"] and max(r["rel_err"], r["per_query_rel_err"]) <= bench.KERNEL_TOL[r["dtype"]]
            assert r["plain_ok"] and r["plain_rel_err"] > 0
    for r in report["l2_rule"]:  # the kernel with the rule, random and on-pattern queries, against float64
        assert r["check_ok"] and 0 < r["rel_err"] <= bench.KERNEL_TOL[r["dtype"]], (r["name"], r["rel_err"])
    for r in report["steps"]:  # each final state against five float64 reference updates
        assert r["check_ok"] and 0 < r["rel_err"] <= bench.KERNEL_TOL[r["dtype"]], (r["name"], r["rel_err"])
        assert {"plain", "sdpa", "sdpa_math"} <= set(r["peers"])
        for p in r["peers"].values():
            assert p["ok"] and p["rel_err"] > 0 and math.isclose(p["ratio"], p["ms"] / r["fused_ms"], rel_tol=1e-9)
    # Many banks (leading dims as SDPA's heads): every shape and dtype, the kernel and each peer
    # checked against the float64 reference before it is timed.
    many = report["many_banks"]
    assert [(r["B"], r["dtype"]) for r in many] == [(b, dt) for _, b, _, _ in bench.MANY_BANKS for dt in bench.DTYPES]
    for r in many:
        assert r["banks"] == 4 and r["N"] == bench.QUICK_N // 8
        assert r["check_ok"] and 0 < r["rel_err"] < bench.KERNEL_TOL[r["dtype"]], (r["name"], r["rel_err"])
        assert math.isclose(r["gbps"], 4 * r["N"] * r["D"] * (4 if r["dtype"] == "float32" else 2) / r["fused_ms"] / 1e6)
        assert set(r["peers"]) == set(bench.MANY_BANK_PEERS)
        for p in r["peers"].values():
            assert p["ok"] and math.isclose(p["ratio"], p["ms"] / r["fused_ms"], rel_tol=1e-9)
    assert "## Many banks" in md
    assert "fused" in proc.stdout
    # The picture of the table (matplotlib is a test dependency): written, a PNG, shown in the Markdown.
    assert report["plot"] == "cpu.png", report.get("plot_error")
    assert (out / "cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](cpu.png)" in md


def test_a_row_whose_own_answer_is_wrong_meets_no_target():
    """The kernel's failed check had been computed and dropped: a wrong answer, however fast, read "yes"."""
    from hen_kernels.bench import cpu

    def row(check_ok, peers):
        return dict(regime="layer", B=64, N=1000, D=64, similarity="dot", dtype="float32", fused_ms=1.0,
                    fused_gflops=1.0, fused_gbps=1.0, rel_err=1e-7 if check_ok else 0.9, check_ok=check_ok,
                    peers=peers)

    fast = {"plain": dict(ratio=9.0, ok=True), "sdpa": dict(ratio=9.0, ok=True)}
    rows = [row(True, fast), row(False, fast), row(True, {})]
    cpu.add_targets(rows, dict(read_gbps=10.0, matmul_gflops=100.0, matmul_bf16_gflops=200.0), {})
    assert [r["met"] for r in rows] == [True, False, None]  # (no peer ran: nothing was shown)
    cells = dict(cpu.COLUMNS)
    assert cells["rel err"](rows[1]) == "9.0e-01 (WRONG)" and cells["met"](rows[1]) == "NO"
    assert cells["rel err"](rows[0]) == "1.0e-07" and cells["met"](rows[0]) == "yes"


def test_a_side_table_row_whose_own_answer_is_wrong_is_marked_and_fails_the_run(monkeypatch):
    """The side tables had reported the kernel's error without judging it (many banks, weighted) or checked
    no output at all (multi-step): a wrong answer there read as a timing like any other."""
    from hen_kernels.bench import cpu_side

    require("cpu")
    case = bench.Case("layer", "dot", "float32", 8, 300, 64)
    right = cpu_side.run_steps(case, "cpu", 1, False, 0.0)
    assert right["check_ok"] and all(p["ok"] for p in right["peers"].values())

    class Off:  # hopfield_retrieve's state a little off: 1e-3 relative, past float32's 1e-4
        @staticmethod
        def hopfield_retrieve(*a, **k):
            return type("R", (), {"state": ops.hopfield_retrieve(*a, **k).state * 1.001})

    monkeypatch.setattr(cpu_side, "ops", Off)
    steps = cpu_side.run_steps(case, "cpu", 1, False, 0.0)
    assert not steps["check_ok"] and 9e-4 < steps["rel_err"] < 1.1e-3
    assert all(p["ok"] for p in steps["peers"].values())  # the peers, right, are not blamed
    monkeypatch.undo()
    monkeypatch.setattr(cpu_side, "fused_call", lambda *a, **k: (lambda: torch.zeros(4, 8, 64)))
    banks = cpu_side.run_many_banks(bench.Case("banks", "dot", "float32", 8, 300, 64, 4), "cpu", 1)
    assert not banks["check_ok"] and banks["rel_err"] == 1.0
    report = {"rows": [], "steps": [steps], "weighted": [], "many_banks": [banks]}
    assert bench.wrong_outputs(report) == [f"multi-step: {steps['name']}", f"many banks: {banks['name']}"]
    assert bench._own_err_cell(steps).endswith("(WRONG)")

    monkeypatch.setattr(bench, "run", lambda *a, **k: report)
    assert bench.main(["--quick"]) == 1  # `make bench` stops on it


def test_a_report_made_again_from_its_json_says_so(tmp_path):
    """--from-json writes today's method text over an old run's measurements: the header says which."""
    src = ROOT / "benchmarks" / "results" / "cpu_zen4.json"
    assert bench.main(["--from-json", str(src), "--out", str(tmp_path), "--name", "again"]) == 0
    md = (tmp_path / "again.md").read_text()
    assert "regenerated " in md and "from cpu_zen4.json (--from-json)" in md
    lines = md.splitlines()
    first_row = lines[next(i for i, line in enumerate(lines) if line.startswith("|---")) + 1]
    first = json.loads(src.read_text())["rows"][0]
    assert f"| {first['fused_ms']:.2f} |" in first_row  # the measurements are the JSON's
    assert "regenerated" not in (ROOT / "benchmarks" / "results" / "cpu_zen4.md").read_text()


def test_the_picture_marks_each_peer_with_its_target_and_verdict():
    """cpu_plot.row_points: a point per timed peer and for the own-float32 target, each with its target
    and verdict; a peer whose answer failed its check is marked so, not left out."""
    from hen_kernels.bench import cpu_plot

    row = {"peers": {"plain": {"ratio": 1.4, "ok": True}, "sdpa": {"ratio": 0.9, "ok": False},
                     "compile": {"ratio": 2.5, "ok": True}, "faiss": {"ratio": 3.0, "ok": True}},
           "targets": [{"peer": "SDPA", "ratio": 0.9, "target": 1.2, "met": None},
                       {"peer": "plain", "ratio": 1.4, "target": 2.0, "met": False},
                       {"peer": "own fp32", "ratio": 1.6, "target": 1.5, "met": True}]}
    got = {p[0]: p[1:] for p in cpu_plot.row_points(row)}
    assert got == {"sdpa": (0.9, 1.2, None, False), "plain": (1.4, 2.0, False, True),
                   "compile": (2.5, None, None, True), "own fp32": (1.6, 1.5, True, True)}


@pytest.mark.parametrize("emulate", [False, True], ids=["native", "avx2"])
def test_crossover_quick_times_every_kind_of_product(tmp_path, emulate):
    """`bench crossover --quick`: a cell per dtype, depth and query count, brgemm and every hand-written
    kind; with --emulate-avx2, in a child that runs the AVX2 kernel and says so."""
    require("cpu")
    info = cpu_info()
    if info.get("gemm") != "brgemm":
        pytest.skip("this build has no brgemm to compare against")
    if emulate and info.get("cpu_isa") not in ("avx2", "avx512"):
        pytest.skip("this CPU runs no AVX2")
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "hen_kernels.bench", "crossover", "--quick", "--repeats", "1",
                           "--out", str(out)] + (["--emulate-avx2"] if emulate else ["--name", "x"]),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    stem = "crossover_avx2" if emulate else "x"
    report = json.loads((out / f"{stem}.json").read_text())
    assert (report["machine"]["emulated"] is not None) == emulate
    kernel = dict(kv.split("=", 1) for kv in report["machine"]["cpu_info"].split() if "=" in kv)
    if emulate:
        assert kernel["isa"] == "avx2" and kernel["bf16_pairs"] == "0"
    else:
        assert kernel["isa"] == info["isa"]
    cells = report["cells"]
    assert len(cells) == 2 * len(crossover.DEPTHS) * len(crossover.QUERIES)
    for c in cells:
        dtype = getattr(torch, c["dtype"])
        assert set(c["ms"]) == {"brgemm", *crossover.kinds(dtype, kernel, c["D"])}
        assert all(math.isfinite(v) and v > 0 for v in c["ms"].values())
    md = (out / f"{stem}.md").read_text()
    assert "## float32, hand" in md and "## bfloat16, hand" in md and "## float32, lanes" in md
    assert ("## bfloat16, pairs" in md) == (kernel["bf16_pairs"] == "1")
    assert ("AVX2 EMULATED" in md) == emulate


def test_shapes_quick_times_every_case_against_sdpa(tmp_path):
    """`bench shapes --quick`: a row per case and dtype, the public call and SDPA (forward, and a
    training step's gradients) each checked against float32, their ratios as timed, and every row
    in the table whatever its ratio."""
    require("cpu")
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "hen_kernels.bench", "shapes", "--quick", "--repeats", "1",
                           "--out", str(out), "--name", "x"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "x.json").read_text())
    rows = report["rows"]
    assert [(r["group"], r["H"], r["B"], r["D"], r["dtype"]) for r in rows] == [
        (g, shapes.banks(h), b, d, dt) for g, h, b, _, d in shapes.CASES for dt in bench.DTYPES]
    for r, (_, _, _, n, _) in zip(rows, [c for c in shapes.CASES for _ in bench.DTYPES]):
        assert r["N"] == max(64, n // shapes.QUICK_DIVISOR)
        assert set(r["rel_err"]) == {"fused", "sdpa"}
        assert r["rel_err"]["fused"] < bench.KERNEL_TOL[r["dtype"]] and 0 <= r["rel_err"]["sdpa"] < bench.CHECK_TOL[r["dtype"]], r
        assert math.isclose(r["ratio"], r["sdpa_ms"] / r["fused_ms"], rel_tol=1e-9)
        assert all(c >= 1 for c in r["calls_per_sample"].values())
        assert set(r["grad_rel_err"]) == {"fused", "sdpa"}
        assert 0 <= r["grad_rel_err"]["fused"] < bench.KERNEL_GRAD_TOL[r["dtype"]] and r["grad_rel_err"]["sdpa"] >= 0, r
        assert math.isclose(r["train_ratio"], r["train_sdpa_ms"] / r["train_fused_ms"], rel_tol=1e-9)
        assert all(c >= 1 for c in r["train_calls_per_sample"].values())
    md = (out / "x.md").read_text()
    assert md.count("\n| ") == 1 + len(rows)  # the header and one line per row


def test_shapes_refuses_to_time_an_answer_or_gradient_off_float64():
    want = torch.linspace(1, 2, 64)
    assert shapes.checked({"ok": lambda: want + 1e-6}, want, "float32", "case")["ok"] < 1e-5
    with pytest.raises(SystemExit, match="fused on case .* off float64"):
        shapes.checked({"sdpa": lambda: want, "fused": lambda: want * 1.01}, want, "float32", "case")
    # a peer's gradients are reported, not judged, where it is not among the judged
    assert shapes.checked({"sdpa": lambda: want * 1.01}, want, "float32", "case", judged=("fused",))["sdpa"] > 1e-3


def test_short_calls_get_rounds_for_the_seconds_asked_not_for_a_first_call_estimate():
    """time_calls keeps taking rounds until min_s has passed (at least `repeats`, at most `max_repeats`)."""
    import time

    from hen_kernels.bench import common

    def nap():
        time.sleep(0.01)

    def calls(**kw):
        return common.time_calls({"nap": nap}, 2, warm_up=False, **kw)["nap"][0]

    assert len(calls()) == 2
    rounds = calls(min_s=0.1, max_repeats=50)  # ~10 of 10 ms; fewer where the machine is busy
    assert 2 < len(rounds) <= 11 and sum(rounds[:-1]) < 0.1
    assert len(calls(min_s=10.0, max_repeats=4)) == 4


def test_a_matmul_ceiling_too_slow_at_full_side_is_measured_at_the_small_side(monkeypatch):
    """bfloat16 without 16-bit matrix instructions (--emulate-avx2) multiplies at 0.2-0.4 GFLOP/s:
    its ceiling falls back to the quick side, and the header says at which side it was measured."""
    from hen_kernels.bench import cpu_peers as peers

    assert peers.matmul_side(torch.float32, quick=True) == peers.QUICK_MATMUL_N
    monkeypatch.setattr(peers, "LONGEST_MATMUL_S", 0.0)  # every call counts as too slow
    assert peers.matmul_side(torch.bfloat16, quick=False) == peers.QUICK_MATMUL_N
    monkeypatch.setattr(peers, "LONGEST_MATMUL_S", float("inf"))
    assert peers.matmul_side(torch.bfloat16, quick=False) == peers.MATMUL_N

    same = {"matmul_shape": [2048] * 3, "matmul_bf16_shape": [2048] * 3}
    assert bench.bf16_side(same) == "" and bench.bf16_side({"matmul_shape": [2048] * 3}) == ""
    assert bench.bf16_side(dict(same, matmul_bf16_shape=[512] * 3)).startswith("(512^3: at 2048^3")
