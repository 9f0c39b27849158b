"""`python -m hen_kernels.bench bank --quick` runs and writes sensible bank.{json,md}."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hen_kernels.bench import bank as bench_bank

ROOT = Path(__file__).resolve().parents[1]


def test_bench_bank_quick_writes_json_and_markdown(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "hen_kernels.bench", "bank", "--quick", "--repeats", "1", "--limit-mib", "32",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "bank.json").read_text())
    md = (out / "bank.md").read_text()
    assert report["quick"] is True

    gpu = report["host_bank_gpu"]
    if torch.cuda.is_available():
        assert gpu["rows"] and all(r["ceiling_gbps"] > 0 for r in gpu["rows"])
    else:  # skipped, with the reason printed and recorded
        assert "no CUDA device" in gpu["skipped"] and gpu["rows"] == []
        assert "host bank (GPU): skipped: " in proc.stdout and "SKIPPED: " in md

    disk = report["disk_bank_cpu"]["rows"]
    assert {(r["cache"], r["B"]) for r in disk} == {(c, b) for c in ("cold", "warm") for b in (1, 8)}
    for r in disk:
        assert r["bank_mib"] == 4 * r["limit_mib"] == 128
        assert r["whole_bank_alloc_refused"], "the limit must keep the whole bank out of memory"
        assert r["met"] and r["extra_peak_rss_mib"] < r["limit_mib"]
        assert math.isfinite(r["rows_per_s"]) and r["rows_per_s"] > 0

    host = report["host_bank_cpu"]["rows"]
    assert [r["B"] for r in host] == [1, 8]
    for r in host:
        assert r["rel_err"] <= 1e-5 and r["ms"] > 0 and r["one_call_ms"] > 0
    assert "## disk bank (CPU)" in md and "## host bank (CPU)" in md


def test_host_bank_regime_fails_clearly_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        bench_bank.host_bank_gpu(quick=True, repeats=1)
