"""The `hen` command: parser, info, experiment entry point, console script."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("skimage")

from hen_kernels import cli  # noqa: E402
from hen_kernels.hen.data import fashion_mnist_available  # noqa: E402


def test_parser():
    p = cli.build_parser()
    a = p.parse_args(["experiment", "table1", "--sizes", "6000,10000", "--quick"])
    assert a.name == "table1" and a.sizes == [6000, 10000] and a.quick and a.out == "results/hen"
    with pytest.raises(SystemExit):
        p.parse_args(["experiment", "table9"])
    a = p.parse_args(["demo", "--quick", "--codecs", "image"])
    assert a.quick and a.codecs == "image"


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends:" in out and "TAEF2 weights" in out and "Fashion-MNIST" in out


def test_info_reports_weights_that_do_not_read_as_unusable(tmp_path, monkeypatch, capsys):
    """A weights file cut short had been reported as the TAEF2 weights (found is not readable)."""
    from hen_kernels.hen import taef2

    (tmp_path / taef2.HUB_FILE).write_bytes(b"not a safetensors file")
    monkeypatch.setenv("HEN_TAEF2_DIR", str(tmp_path))
    assert cli.main(["info"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("TAEF2 weights"))
    assert line.startswith("TAEF2 weights: found but unusable: ") and taef2.HUB_FILE in line, line


@pytest.mark.skipif(not fashion_mnist_available(), reason="Fashion-MNIST absent")
def test_experiment_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HEN_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "res"
    assert cli.main(["experiment", "fig3", "--quick", "--codecs", "image", "--n-bank", "60", "--out", str(out)]) == 0
    md = (out / "fig3.md").read_text()
    assert "`hen experiment fig3 --quick --codecs image --n-bank 60" in md
    assert "wrote" in capsys.readouterr().out


def test_console_script():
    exe = Path(sys.executable).parent / "hen"
    exe = str(exe) if exe.exists() else shutil.which("hen")
    if exe is None:
        pytest.skip("the hen console script is not installed (pip install -e . installs it)")
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")})
    assert r.returncode == 0 and "experiment" in r.stdout


def test_check_subcommand_runs_the_contract_check(capsys):
    assert cli.main(["check", "--quick", "--backend", "torch", "--dtype", "float32", "--case", "partial", "-q"]) == 0
    out = capsys.readouterr().out
    assert "| torch | cpu | float32 |" in out and "all cases pass" in out


def test_a_missing_hen_package_names_the_extra(monkeypatch, capsys):
    def needs_skimage(args, argv):
        raise ModuleNotFoundError("No module named 'skimage'", name="skimage")

    monkeypatch.setattr(cli, "_run", needs_skimage)
    assert cli.main(["info"]) == 1
    assert "pip install 'hen_kernels[hen]'" in capsys.readouterr().err


def _exit_code(argv):
    """What `hen ARGV` exits with: argparse's errors raise SystemExit(2), main's own return 2."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("argv", [
    ["table1", "--n-queries", "-5"], ["table1", "--sizes", "0"], ["table1", "--sizes", ","],
    ["table1", "--codecs", "tae"], ["table1", "--beta", "-1"], ["fig2", "--betas", "1,nan"],
    ["fig2", "--n-bank", "2"], ["fig2", "--beta", "5"], ["fig3", "--sizes", "150"], ["masking", "--codecs", "taef2"],
    ["all", "--n-queries", "0"], ["table1", "--sizes", "150,abc"], ["fig2", "--betas", "1,,2"]])
def test_experiment_options_are_refused_before_running(argv, monkeypatch, tmp_path, capsys):
    from hen_kernels.hen import experiments

    def no_run(name):
        raise AssertionError(f"experiment {name} ran with a bad option")

    monkeypatch.setattr(experiments, "get", no_run)
    assert _exit_code(["experiment", *argv, "--quick", "--out", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["experiment", "fig3"], ["demo"]])
def test_an_out_folder_that_cannot_be_made_is_a_usage_error(command, tmp_path, capsys):
    """A file at --out, or a folder that cannot be made there, had ended the run in a traceback (after its work)."""
    (tmp_path / "file").write_text("x")
    for out, why in ((tmp_path / "file", "is a file, not a folder"), (tmp_path / "file" / "sub", "cannot make")):
        assert _exit_code([*command, "--quick", "--out", str(out)]) == 2
        assert why in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing made, nothing left


def test_each_experiment_gets_the_options_it_takes(monkeypatch, tmp_path):
    from hen_kernels.hen import experiments

    got = {}
    monkeypatch.setattr(experiments, "get", lambda name: lambda out, **kw: got.setdefault(name, kw))
    for argv in (["masking", "--n-bank", "50", "--n-queries", "5", "--betas", "200"],
                 ["fig3", "--n-bank", "60"], ["uniqueness", "--distractors", "7,9", "--beta", "30"]):
        assert cli.main(["experiment", *argv, "--out", str(tmp_path)]) == 0
    assert got["masking"]["n_bank"] == 50 and got["masking"]["n_queries"] == 5 and got["masking"]["betas"] == [200.0]
    assert got["fig3"]["n"] == 60 and (got["uniqueness"]["distractors"], got["uniqueness"]["beta"]) == (7, 30.0)
    assert "codecs" not in got["masking"]  # by default every experiment picks its own codecs


def test_a_codec_asked_for_that_cannot_load_is_an_error(tmp_path, capsys):
    out = tmp_path / "res"
    argv = ["experiment", "table1", "--quick", "--codecs", "taef2", "--taef2", str(tmp_path / "none"), "--sizes", "150",
            "--out", str(out)]
    assert _exit_code(argv) == 2
    assert "codec taef2 cannot load" in capsys.readouterr().err and not out.exists()  # no table without it
