"""`python -m hen_kernels.bench cpu --quick` runs, and writes one sensible row per case."""
import json
import math
import subprocess
import sys
from pathlib import Path

from hen_kernels.bench import cpu as bench

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_writes_json_and_markdown(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "hen_kernels.bench", "cpu", "--quick", "--repeats", "2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "cpu.json").read_text())
    md = (out / "cpu.md").read_text()

    expected = bench.cases(bench.QUICK_N)
    rows = report["rows"]
    assert [r["name"] for r in rows] == [c.name for c in expected]
    assert {(r["regime"], r["similarity"]) for r in rows} == {
        (regime, s) for regime in ("recall", "layer", "bulk") for s in ("dot", "l2")
    }
    assert report["quick"] is True and report["repeats"] == 2
    m = report["machine"]
    assert m["fused_backend"] in ("cpu", "torch")
    assert m["fused_is_reference"] == (m["fused_backend"] == "torch")
    assert m["torch_threads"] >= 1 and m["cpu"]
    assert {"matmul_gflops", "matmul_gflops_after", "read_gbps"} <= set(report["ceilings"])
    for c in report["ceilings"].values():
        assert not isinstance(c, float) or (math.isfinite(c) and c > 0)

    for case, r in zip(expected, rows):
        for who in ("fused", "baseline"):
            t = r[f"{who}_ms"]
            assert math.isfinite(t) and t > 0, (case.name, who, t)
            assert math.isclose(r[f"{who}_gflops"], case.flops / (t * 1e-3) / 1e9, rel_tol=1e-9)
            assert math.isclose(r[f"{who}_gbps"], case.bytes / (t * 1e-3) / 1e9, rel_tol=1e-9)
            extra = r[f"{who}_extra_mib"]
            assert extra is None or (math.isfinite(extra) and extra >= 0)
        assert math.isclose(r["ratio"], r["baseline_ms"] / r["fused_ms"], rel_tol=1e-9)
        assert r["target"] == bench.TARGETS[case.regime]
        assert r["met"] == (r["ratio"] >= r["target"])
        assert r["fused_backend"] == m["fused_backend"]
        # The fused kernel and the baseline compute the same update.
        assert 0 <= r["rel_err"] < 1e-4, (case.name, r["rel_err"])

    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(expected)  # header + one row per case
    for case, line in zip(expected, table[1:]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:5] == [case.regime, case.similarity, str(case.B), str(case.N), str(case.D)]
        assert cells[-1] in ("yes", "NO")
    assert m["fused_backend_label"] in md
    assert "fused" in proc.stdout and "ratio" in proc.stdout
