"""`hen check` (hen_kernels/check/): it passes on this machine's backends and catches broken ones.

Each way a kernel can break the contract is planted in a fake backend built on
the reference, and the check must fail it: an error above tolerance, a NaN that
leaks into other queries, a chunk offset ignored by top_index, a wrong
gradient, an extension built against another torch.
"""
import importlib
import json
import subprocess
import sys

import pytest
import torch

from hen_kernels import backends, build_info, check, reference
from hen_kernels.check import catalog, runner as check_run

from .conftest import TOLERANCE


def test_tolerances_are_those_of_the_tests():
    assert check.TOLERANCE is TOLERANCE  # docs/design.md §5, one home: hen_kernels.constants


def test_quick_check_passes_on_the_kernels_here():
    names = [n for n in ("torch", "cpu") if backends.BACKENDS[n].available()]
    report = check.run(quick=True, only_backends=names, only_devices=["cpu"])
    assert report.ok, check_run.render(report)
    want = {(n, str(d).replace("torch.", "")) for n in names for d in TOLERANCE if d in backends.BACKENDS[n].dtypes}
    assert {(r.backend, r.dtype) for r in report.rows} == want
    for row in report.rows:
        cases_run = {r.case.split()[0] for r in row.results}
        assert {"partial", "leading", "update", "merge", "NaN", "hard", "empty"} <= cases_run
    text = check_run.render(report)
    assert "| backend | device | dtype |" in text and "all cases pass" in text


def test_the_check_with_no_device_filter_measures_only_devices_with_data():
    """`hen check` as a user runs it: every device the cpu backend serves, meta left out (the cpu backend
    gives meta tensors their shapes, tests/test_torch_conventions.py; there are no numbers to measure)."""
    if not backends.BACKENDS["cpu"].available():
        pytest.skip("the cpu backend is not built")
    report = check.run(quick=True, only_backends=["cpu"])
    assert report.ok, check_run.render(report)
    assert {r.device for r in report.rows} == {"cpu"}


def _fake(monkeypatch, forward):
    """Register backend "fake" on CPU tensors with the given forward (reference arguments)."""
    b = backends.Backend("fake", ("cpu",), forward=forward, backward=None)
    monkeypatch.setitem(backends.BACKENDS, "fake", b)


def _reference(q, x, v, beta, sim, offset, weights=None):
    kw = {} if weights is None else {"weights": weights}
    return reference.partial(q, x, beta, sim, v, offset, **kw)


def _failed_cases(report):
    return {r.case.split()[0] for row in report.rows for r in row.failures}


def test_the_interpreted_triton_target_says_whose_float32_products_it_checks():
    """Under the interpreter the check runs the GPU's tf32/tf32x3 products (a kernel at tf32 where tf32x3 is
    asked fails it, seen with that fault), and says so; a triton whose interpreter cannot be hooked says the
    opposite rather than pass in silence."""
    if not backends.BACKENDS["triton"].available() or "cpu" not in backends.BACKENDS["triton"].device_types:
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1")
    from hen_kernels.triton import interpreted_products

    notes = [n for n in check_run.targets(["triton"], ["cpu"])[1] if n.startswith("triton cpu")]
    assert interpreted_products.EMULATED and notes and "emulated" in notes[0], notes


def test_an_interpreted_triton_kernel_at_tf32_where_tf32x3_is_asked_fails(monkeypatch):
    """The fault the emulation exists for: float32 products at one tf32 product (1e-3) instead of three.
    Under the interpreter's own numpy products it had passed every case."""
    if not backends.BACKENDS["triton"].available() or "cpu" not in backends.BACKENDS["triton"].device_types:
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1")
    launch = importlib.import_module("hen_kernels.triton.launch")  # (the package's name `launch` is the function)
    monkeypatch.setattr(launch, "fp32_precision", lambda: "tf32")
    report = check.run(quick=True, only_backends=["triton"], only_devices=["cpu"], dtypes=[torch.float32],
                       only_cases=["partial"])
    assert not report.ok and "partial" in _failed_cases(report), check_run.render(report)


def test_reference_as_a_fake_backend_passes(monkeypatch):
    """The planted faults below are the only difference from a passing backend."""
    _fake(monkeypatch, _reference)
    report = check.run(quick=True, only_backends=["fake"], dtypes=[torch.float32])
    assert report.ok, check_run.render(report)


def test_an_error_above_tolerance_fails(monkeypatch):
    def off(*args, **kw):
        p = _reference(*args, **kw)
        return p._replace(out=p.out * (1 + 1e-4))

    _fake(monkeypatch, off)
    report = check.run(quick=True, only_backends=["fake"], dtypes=[torch.float32], only_cases=["partial", "chunked merge"])
    assert not report.ok
    assert {"partial", "merge"} <= _failed_cases(report)
    assert "FAIL fake cpu float32: partial" in check_run.render(report)


def test_a_nan_leaking_into_other_queries_fails(monkeypatch):
    def leaky(q, *args, **kw):
        p = _reference(q, *args, **kw)
        if bool(torch.isnan(q).any()):
            p = p._replace(out=p.out + q.sum())  # every query's answer turns NaN
        return p

    _fake(monkeypatch, leaky)
    report = check.run(quick=True, only_backends=["fake"], dtypes=[torch.float32],
                       only_cases=["NaN isolation", "chunked merge"])
    assert _failed_cases(report) == {"NaN"}


def test_a_chunk_offset_ignored_by_top_index_fails(monkeypatch):
    def no_offset(q, x, v, beta, sim, offset, weights=None):
        return _reference(q, x, v, beta, sim, 0, weights)

    _fake(monkeypatch, no_offset)
    report = check.run(quick=True, only_backends=["fake"], dtypes=[torch.float32],
                       only_cases=["leading dims", "chunked merge", "edges", "bank in chunks"])
    assert {"leading", "merge", "one-row", "bank"} <= _failed_cases(report)


def _only_failing(monkeypatch, forward, case, passing, mark=None, backward=None):
    """The fault fails ``case`` (results named with ``mark``, by default the case's name) and leaves the
    cases ``passing`` passing (it is that case's to find)."""
    b = backends.Backend("fake", ("cpu",), forward=forward, backward=backward)
    monkeypatch.setitem(backends.BACKENDS, "fake", b)
    report = check.run(quick=True, only_backends=["fake"], dtypes=[torch.float32], only_cases=[case] + passing)
    failed = {r.case for row in report.rows for r in row.failures}
    assert failed and all((mark or case) in c for c in failed), failed


def test_ties_to_a_later_row_fail(monkeypatch):
    """compare_partial lets top_index take a row tied within the tolerance; exact ties must go to the first."""
    def later(q, x, v, beta, sim, offset, weights=None):
        p = _reference(q, x, v, beta, sim, offset, weights)
        s = reference.scores(q, x, beta, sim)
        last = torch.where(s == s.amax(-1, keepdim=True), torch.arange(s.shape[-1]), -1).amax(-1)
        return p._replace(top_index=torch.where(p.top_index >= 0, last + offset, p.top_index))

    _only_failing(monkeypatch, later, "exact ties", ["partial", "chunked merge"])


def test_a_last_query_block_dropped_fails(monkeypatch):
    def short(q, *args, **kw):
        p = _reference(q, *args, **kw)
        out = p.out.clone()
        out[..., 64:, :] = 0
        return p._replace(out=out)

    _only_failing(monkeypatch, short, "partial", ["leading dims", "weights"], " B70 ")


def test_l2_distances_by_the_float32_expansion_fail_near_stored_rows(monkeypatch):
    """Without the direct recompute (docs/design.md §5.1) ‖s‖² + ‖x‖² - 2 s·x cancels next to a stored row."""
    def expanded(q, x, v, beta, sim, offset, weights=None):
        if sim == "dot" or q.dtype == torch.float64:
            return _reference(q, x, v, beta, sim, offset, weights)
        sq = ((q * q).sum(-1, keepdim=True) + (x * x).sum(-1).unsqueeze(-2) - 2 * q @ x.mT).clamp_min(0)
        t = beta.reshape(-1, 1, 1).squeeze(0) * (-sq.sqrt() if sim == "l2" else -0.5 * sq)
        lse = torch.logsumexp(t, -1)
        top_score, top_index = t.max(-1)
        return type(_reference(q, x, v, beta, sim, offset))(torch.softmax(t, -1) @ v, lse, top_score,
                                                             top_index + offset)

    _only_failing(monkeypatch, expanded, "near stored rows", [])


def test_weights_of_one_leading_index_for_all_fail(monkeypatch):
    def first(q, x, v, beta, sim, offset, weights=None):
        if weights is not None and weights.dim() > 2:
            weights = weights[:1].expand_as(weights)
        return _reference(q, x, v, beta, sim, offset, weights)

    _only_failing(monkeypatch, first, "weights", ["partial"])


def test_a_backward_that_drops_the_weights_fails(monkeypatch):
    def unweighted(*args, **kw):
        args = list(args)
        args[9] = None  # (dout, dlse, q, x, v, beta, out, lse, similarity, weights, ...)
        return backends._streaming_backward(*args, **kw)

    _only_failing(monkeypatch, _reference, "weighted gradients", ["gradients"], " weighted ", backward=unweighted)


@pytest.mark.parametrize("broken", ["query", "bank", "values", "beta"])
def test_a_wrong_gradient_fails(broken, monkeypatch):
    def backward(*args, **kw):
        grads = list(backends._streaming_backward(*args, **kw))
        i = ("query", "bank", "values", "beta").index(broken)
        grads[i] = grads[i] * 1.001  # above every dtype's GRAD_TOLERANCE but bfloat16's
        return tuple(grads)

    b = backends.Backend("fake", ("cpu",), forward=_reference, backward=backward)
    monkeypatch.setitem(backends.BACKENDS, "fake", b)
    report = check.run(quick=True, only_backends=["fake"], dtypes=[torch.float32], only_cases=["gradients"])
    failed = {r.case for row in report.rows for r in row.failures}
    assert failed and all(c.endswith(f": {broken}") for c in failed)
    if broken != "values":  # (keys = values: the bank's one gradient, no values' apart)
        assert any("keys = values" in c for c in failed)


def test_a_raising_backend_fails_without_stopping_the_check(monkeypatch):
    def broken(*args, **kw):
        raise RuntimeError("kernel launch failed")

    _fake(monkeypatch, broken)
    report = check.run(quick=True, only_backends=["fake"], dtypes=[torch.float16])
    row, = report.rows
    # multi-step and energy are float32-only; saturated gradients neither float16 nor for a backend without a
    # fused backward
    assert len(row.failures) == len(catalog.CASES) - 3
    assert all("kernel launch failed" in r.note for r in row.failures)


def test_a_time_limit_keeps_the_cases_already_checked(monkeypatch, capsys):
    """scripts/gpu_run.sh stops a check with SIGINT at its limit: the cases finished so far are reported (the
    H200's first run lost 115 s of them), the row says it was cut short, and the check fails."""
    calls = []

    def slow(*args, **kw):
        calls.append(1)
        if len(calls) > 12:
            raise KeyboardInterrupt
        return _reference(*args, **kw)

    _fake(monkeypatch, slow)
    report = check.run(quick=True, only_backends=["fake"], dtypes=[torch.float32, torch.float16])
    row, = report.rows
    assert row.interrupted and row.results and not row.failures and not report.ok
    assert any("after" in p and "not checked: fake cpu float16" in p for p in report.problems)
    assert "(interrupted)" in check_run.render(report)
    assert check_run.to_json(report)["rows"][0]["interrupted"] is True


def test_autotune_mode_is_set_for_the_run_and_checked(monkeypatch):
    from hen_kernels.constants import AUTOTUNE_ENV

    monkeypatch.setenv(AUTOTUNE_ENV, "all")  # (recorded, so that a value main() leaves behind is undone)
    monkeypatch.delenv(AUTOTUNE_ENV)
    seen = []
    _fake(monkeypatch, lambda *a, **k: seen.append(check_run.os.environ.get(AUTOTUNE_ENV)) or _reference(*a, **k))
    args = ["--quick", "--backend", "fake", "--dtype", "float32", "--case", "edges", "-q"]
    assert check.main(args) == 0 and set(seen) == {"first"}
    assert AUTOTUNE_ENV not in check_run.os.environ, "the check's setting outlived it"
    seen.clear()
    monkeypatch.setenv(AUTOTUNE_ENV, "all")
    assert check.main(args) == 0 and set(seen) == {"all"}
    seen.clear()
    assert check.main(args + ["--autotune", "first"]) == 0 and set(seen) == {"first"}
    assert check_run.os.environ[AUTOTUNE_ENV] == "all"
    pytest.importorskip("triton")
    from hen_kernels.triton import configs

    monkeypatch.setenv(AUTOTUNE_ENV, "fastest")
    with pytest.raises(ValueError, match="HEN_TRITON_AUTOTUNE: expected one of all, first"):
        configs.autotune_mode()
    rules = [None, None, "too big", None]
    monkeypatch.setenv(AUTOTUNE_ENV, "first")
    assert configs._keep(["a", "b", "c", "d"], rules) == ["a"]
    monkeypatch.setenv(AUTOTUNE_ENV, "all")
    assert configs._keep(["a", "b", "c", "d"], rules) == ["a", "b", "d"]


def test_main_exits_1_on_a_failure_and_writes_json(monkeypatch, tmp_path, capsys):
    _fake(monkeypatch, lambda *a, **k: _reference(*a, **k)._replace(lse=_reference(*a, **k).lse + 1))
    out = tmp_path / "check.json"
    assert check.main(["--quick", "--backend", "fake", "--dtype", "float32", "--case", "edges", "--case", "partial",
                       "--json", str(out), "-q"]) == 1
    assert "FAILED" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["ok"] is False and data["rows"][0]["backend"] == "fake"
    assert any(r["note"].startswith("lse off by") for r in data["rows"][0]["results"])


def _fake_extension(tmp_path, torch_version):
    path = tmp_path / "_C.so"
    path.write_bytes(b"\0ELF..." + build_info.MARKER + f"torch={torch_version} cuda=none cxx11_abi=1;".encode()
                     + b"\0rest")
    return str(path)


def test_build_info_is_read_from_the_library_file(tmp_path):
    path = _fake_extension(tmp_path, "2.13.0+cpu")
    assert build_info.read(path) == {"torch": "2.13.0+cpu", "cuda": "none", "cxx11_abi": "1"}
    assert build_info.torch_mismatch(path, running="2.13.0") is None  # the same release, another build
    msg = build_info.torch_mismatch(path, running="2.14.1")
    assert "torch 2.13.0+cpu" in msg and "torch 2.14.1" in msg and "--no-build-isolation" in msg
    plain = tmp_path / "old.so"
    plain.write_bytes(b"no marker here")
    assert build_info.read(str(plain)) is None and build_info.torch_mismatch(str(plain), running="9") is None


def test_the_built_extension_names_its_torch():
    path = backends._extension_path()
    if path is None or build_info.read(path) is None:
        pytest.skip("no extension built by cmake/torch.cmake here")
    assert build_info.read(path)["torch"] == torch.__version__


def test_an_extension_built_for_another_torch_fails_the_check(monkeypatch, tmp_path):
    monkeypatch.setattr(backends, "_extension_path", lambda: _fake_extension(tmp_path, "1.0.0"))
    report = check.run(quick=True, only_backends=["torch"], dtypes=[torch.float32], only_cases=["edges"])
    assert not report.ok and "built against torch 1.0.0" in report.problems[0]
    assert "FAIL hen_kernels/_C" in check_run.render(report)


def test_the_loader_refuses_an_extension_built_for_another_torch(monkeypatch, tmp_path):
    """Such a _C can load without an error (a 2.13 build into torch 2.14 does) and then misbehave."""
    monkeypatch.setattr(backends, "_extension_path", lambda: _fake_extension(tmp_path, "1.0.0"))
    monkeypatch.setattr(backends, "_EXTENSION_TRIED", False)
    monkeypatch.setattr(backends, "_EXTENSION_ERROR", None)
    with pytest.warns(RuntimeWarning, match="built against torch 1.0.0"):
        reason = backends.load_extension()
    assert f"this Python runs torch {torch.__version__}" in reason


def test_module_entry_point_runs_without_pytest_or_the_hen_packages():
    """python -m hen_kernels.check on a plain install: neither pytest nor the `hen` extra is imported."""
    from hen_kernels import cli

    blocked = ["pytest", *cli.HEN_EXTRA]
    code = (f"import runpy, sys\nfor m in {blocked!r}: sys.modules[m] = None\n"
            "sys.argv = ['hen_kernels.check', '--quick', '--backend', 'torch', '--dtype', 'bfloat16', '-q']\n"
            "runpy.run_module('hen_kernels.check', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| torch | cpu | bfloat16 |" in r.stdout and "all cases pass" in r.stdout


def test_an_unwritable_json_path_is_refused_before_the_run(monkeypatch, tmp_path, capsys):
    """The JSON is written after the run, which takes minutes: a bad path must not waste them (or end in a
    traceback after "all cases pass")."""
    def no_run(*a, **k):
        raise AssertionError("the check ran before its --json path was checked")

    monkeypatch.setattr(check_run, "run", no_run)
    for path in (tmp_path / "missing" / "x.json", tmp_path):
        with pytest.raises(SystemExit) as e:
            check.main(["--quick", "--json", str(path)])
        assert e.value.code == 2 and "--json" in capsys.readouterr().err
