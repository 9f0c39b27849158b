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
