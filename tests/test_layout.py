"""The package's layout keeps its promises (docs/design.md §3): small modules, no import cycle, the contract in-repo.

The import graph is read from the source, not from a running interpreter, so an
import placed inside a function (a "lazy" import) counts as an edge too: a
cycle hidden that way is still a cycle a reader has to untangle.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hen_kernels"
MAX_LINES = 600


def _modules(package: Path) -> Dict[str, Path]:
    """Dotted module name -> file, for every Python file of the package."""
    mods = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve(module: str, path: Path, level: int, target: str | None) -> str:
    """The absolute name a relative import ``from <level dots><target> import ...`` refers to."""
    base = module.split(".") if _is_package(path) else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph(package: Path = PACKAGE) -> Dict[str, Set[str]]:
    mods = _modules(package)
    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: List[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, path, node.level, node.module) if node.level else (node.module or "")
                # `from pkg import name` imports pkg.name when that is a module, else pkg itself.
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                names = subs if subs and len(subs) == len(node.names) else [target, *subs]
            for name in names:
                # `import a.b.c` names the deepest module of the package that exists.
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    graph[module].add(name)
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle as a list of modules (first == last), or [] when the graph is acyclic."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    stack: List[str] = []

    def visit(m: str) -> List[str]:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return []


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_graph_sees_lazy_relative_and_absolute_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n    return b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from .. import a\nimport pkg.sub.c\n")
    (pkg / "sub" / "c.py").write_text("from ..a import f\n")
    graph = import_graph(pkg)
    assert graph["pkg"] == {"pkg.a"}
    assert graph["pkg.a"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.a", "pkg.sub.c"}
    assert graph["pkg.sub.c"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]


def test_no_import_cycle_inside_the_package():
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_is_small(path: Path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (limit {MAX_LINES}): split it by role"


def _package_text_files():
    for path in sorted(PACKAGE.rglob("*")):
        if path.is_file() and path.suffix in {".py", ".md", ".txt", ".toml", ".json"}:
            yield path


def test_package_never_points_outside_the_repository():
    offenders = [str(p.relative_to(ROOT)) for p in _package_text_files() if "../shared" in p.read_text()]
    assert not offenders, f"these refer to ../shared, which a user does not have: {offenders}"


def test_design_references_point_at_the_copy_in_the_repository():
    assert (ROOT / "docs" / "design.md").is_file()
    offenders = []
    for path in [*_package_text_files(), *sorted((ROOT / "csrc").rglob("*.*"))]:
        text = path.read_text(errors="replace")
        if "DESIGN.md" in text.replace("docs/design.md", ""):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"these name DESIGN.md instead of docs/design.md: {offenders}"


def test_l2_direct_threshold_is_one_number_in_both_languages():
    import re

    from hen_kernels.constants import L2_DIRECT_BELOW

    header = (ROOT / "csrc" / "hopfield_params.h").read_text()
    m = re.search(r"kL2DirectBelow\s*=\s*([0-9.]+)f\s*/\s*([0-9.]+)f", header)
    assert m, "csrc/hopfield_params.h must define kL2DirectBelow as a/b"
    assert float(m.group(1)) / float(m.group(2)) == L2_DIRECT_BELOW


def test_smallest_float32_beta_is_one_number_in_both_languages():
    import re

    from hen_kernels.constants import FLOAT32_MIN_BETA

    header = (ROOT / "csrc" / "hopfield_params.h").read_text()
    m = re.search(r"kFloat32MinBeta\s*=\s*([0-9.e+-]+);", header)
    assert m, "csrc/hopfield_params.h must define kFloat32MinBeta"
    assert float(m.group(1)) == FLOAT32_MIN_BETA
