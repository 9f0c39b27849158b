"""Issue 16.5: the GPU table puts each timed Triton kernel beside its machine-code row (the autotuned config
compiled for the GPU's architecture) and its roofline floor.  No GPU here: a synthetic report stands in
for the measured one and synthetic static rows for the compile."""
import copy

import pytest

from hen_kernels.bench import gpu_report, gpu_static

from .test_bench_gpu import _report


def _timed(report):
    report = copy.deepcopy(report)
    for case in report["cases"]:
        if case["regime"] == "layer" and case["similarity"] == "dot":
            case["triton_plan"] = dict(kernel="small_d", BM=64, splits=1, rows_per_split=case["N"], precision="tf32x3")
            case["measurements"]["triton"]["autotuned"] = dict(kwargs={"BN": 64}, num_warps=4, num_stages=3)
    return report


def _static_row(**kw):
    row = dict(kernel="small_d", arch=90, BM=64, SPLITS=1, sim="dot", D=64, BN=64, num_warps=4, num_stages=3,
               regs=168, spill_stores=0, smem=50432, blocks_per_sm=2, limiter="registers",
               hot_loop={"HGMMA": 12, "MUFU.EX2": 34}, hot_loop_load_bytes=8192)
    row.update(kw)
    return row


def test_timed_kernels_join_their_static_rows(tmp_path):
    report = _timed(_report())
    report["static_arch"] = 90
    report["static_rows"] = [_static_row(), _static_row(BN=32, regs=99)]  # the second matches no timed call
    joined = gpu_static.join(report, report["static_rows"])
    assert len(joined) == 1
    (e,) = joined
    assert e["static"]["regs"] == 168 and e["ms"] == pytest.approx(1.0)
    # floor: 4·B·N·D flops at 700 TFLOP/s against 2·N·D bytes at 3200 GB/s: tensor cores bound here
    assert e["bound"] == "tensor cores" and e["floor_ms"] == pytest.approx(e["flops"] / 700e12 * 1e3)
    gpu_report.write(report, str(tmp_path), plot=False)
    md = (tmp_path / "gpu.md").read_text()
    assert "Timed Triton kernels beside their machine code (sm_90" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| layer-dot-B2048-N2048-D64 | small_d BM64 S1"))
    for cell in ("BN64 w4 s3", "| 168 |", "| 0 |", "2 (regi)", "HGMMA 12", "| 1.000 |"):
        assert cell in line, line


def test_a_timed_kernel_without_its_row_says_so(tmp_path):
    report = _timed(_report())
    report["static_arch"] = 90
    report["static_rows"] = []
    (e,) = gpu_static.join(report, [])
    assert e["static"] is None
    gpu_report.write(report, str(tmp_path), plot=False)
    line = next(ln for ln in (tmp_path / "gpu.md").read_text().splitlines()
                if ln.startswith("| layer-dot-B2048-N2048-D64 | small_d"))
    assert "| n/a |" in line and "| 1.000 |" in line


def test_compile_failures_are_reported_not_raised(tmp_path):
    report = _timed(_report())
    report["static_error"] = "RuntimeError: no ptxas"
    gpu_report.write(report, str(tmp_path), plot=False)
    assert "Machine code not read: RuntimeError: no ptxas" in (tmp_path / "gpu.md").read_text()
