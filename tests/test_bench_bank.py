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
        assert gpu["rows"] and all(r["ceiling_gbps"] > 0 and r["check_ok"] for r in gpu["rows"])
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
        # the streamed output against float64 over the same rows (it had been checked for finiteness only)
        assert r["check_ok"] and 0 < r["rel_err"] <= 1e-5, r

    host = report["host_bank_cpu"]["rows"]
    assert [r["B"] for r in host] == [1, 8]
    for r in host:
        # against float64 (it had been the same kernel's one call: a chunking bug both share could not show)
        assert r["check_ok"] and 0 < r["rel_err"] <= 1e-5 and r["ms"] > 0 and r["one_call_ms"] > 0
    assert "## disk bank (CPU)" in md and "## host bank (CPU)" in md


def test_host_bank_regime_fails_clearly_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        bench_bank.host_bank_gpu(quick=True, repeats=1)


def test_bench_bank_marks_a_wrong_streamed_row_and_exits_1(tmp_path, monkeypatch):
    """A streamed bank whose answer is off is named under its table, and the command exits 1."""
    monkeypatch.setattr(bench_bank, "host_bank_gpu", lambda *a: [])
    monkeypatch.setattr(bench_bank, "disk_bank_cpu", lambda *a: [])
    monkeypatch.setattr(bench_bank.MemoryBank, "update", lambda self, q, beta: torch.zeros(q.shape[0], self.dim))
    report = bench_bank.run(str(tmp_path), quick=True, repeats=1)
    assert [r["check_ok"] for r in report["host_bank_cpu"]["rows"]] == [False, False]
    assert bench_bank.wrong_rows(report) == ["host_bank_cpu: B=1", "host_bank_cpu: B=8"]
    assert "**WRONG OUTPUT** in 2 row(s)" in (tmp_path / "bank.md").read_text()
    monkeypatch.setattr(bench_bank, "run", lambda *a: report)
    assert bench_bank.main(["--quick"]) == 1


def _gpu_row(b, **check):
    return dict(regime="host bank (GPU)", storage="host", dtype="bfloat16", B=b, N=524288, D=1024, bank_gib=1.0,
                gpu_allowed_gib=0.25, chunk_rows=32768, ms=40.0, gbps=25.0, rows_per_s=1e7, ceiling_gbps=50.0,
                ceiling="pinned H2D copy", ratio=0.5, target=0.8, met=False, **check)


def test_a_wrong_gpu_host_bank_row_is_named_and_an_older_unchecked_one_says_so():
    """The GPU host-bank rows carry the check of their output against float64 (it had been timed only): a wrong
    one is named like the CPU rows; a row of a report from before the check reads "not checked", not a pass."""
    report = dict(machine=dict(bench_bank.machine(), gpu="H200"), quick=True, repeats=1,
                  host_bank_gpu={"rows": [_gpu_row(1, rel_err=0.3, check_ok=False), _gpu_row(16)]},
                  disk_bank_cpu={"rows": []}, host_bank_cpu={"rows": []})
    assert bench_bank.wrong_rows(report) == ["host_bank_gpu: B=1 D=1024"]
    md = bench_bank.markdown(report)
    assert "3.0e-01 (WRONG)" in md and "not checked" in md and "**WRONG OUTPUT** in 1 row(s)" in md


def test_the_gpu_host_banks_rows_are_made_again_the_same_to_check():
    """The check of the GPU rows makes the bank's rows again from their seed: the same blocks, every row once."""
    first, again = list(bench_bank._gpu_rows(torch.device("cpu"), 300_000, 1024)), \
        list(bench_bank._gpu_rows(torch.device("cpu"), 300_000, 1024))
    assert sum(len(b) for b in first) == 300_000 and len(first) == 3
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("fault", [False, True], ids=["right", "wrong"])
def test_the_gpu_host_bank_rows_code_checks_their_answers(monkeypatch, fault):
    """The GPU rows' own code (bank built, timed, its answers kept, then checked against float64), run on CPU
    tensors at a small size, since no GPU is here: right answers pass, a zero answer is WRONG."""
    if fault:
        monkeypatch.setattr(bench_bank.MemoryBank, "update", lambda self, q, beta: torch.zeros(q.shape[0], self.dim))
    cpu = torch.device("cpu")
    rows, answers = bench_bank._host_bank_rows(cpu, 2 * 2**20, 2**20, (64,), 1, 1.0, lambda: None)
    assert [(r["B"], r["N"], r["D"]) for r in rows] == [(1, 16384, 64), (16, 16384, 64), (64, 16384, 64)]
    bench_bank._check_host_bank_rows(cpu, rows, answers)
    assert [r["check_ok"] for r in rows] == [not fault] * 3, [r["rel_err"] for r in rows]
