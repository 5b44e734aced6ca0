"""The package's module layout: no import cycle, no arrow up from the maths floor, moved modules still importable.

The import graph is read from the source with ``ast``, nothing is imported: an arrow ``a -> b`` for every ``import``
or ``from ... import`` in ``a``, relative or absolute, at module level or inside a function, that names a module
``b`` of the package (``from pkg import name`` points at ``pkg.name`` when that is a module). A package's
``__init__.py`` is the package itself. Importing ``p.q.r`` also runs ``p`` and ``p.q``, so those arrows count too,
except to the importer's own enclosing packages, which Python always initialises before the importer. Imports under
``if TYPE_CHECKING:`` are left out: they never run; so are ``importlib`` calls (the deprecated module paths use them
to load their new module on first use).
"""

from __future__ import annotations

import ast
import importlib
import warnings
from collections import deque
from pathlib import Path

import pytest

import diffusers_ztsnr

PACKAGE = "diffusers_ztsnr"
PACKAGE_DIR = Path(diffusers_ztsnr.__file__).resolve().parent

#: the maths every other layer builds on: noise schedules, timestep grids, conversions, update rules, the oracle
MATHS_FLOOR = ("schedule", "spacing", "parameterization", "solvers", "analytic")
#: what sits above the floor: diffusers adapters, training, the command line, the demo and the test fixtures
ABOVE_THE_FLOOR = ("schedulers", "training", "cli", "demo", "testing")

#: old module path -> the modules its names live in now
DEPRECATED_MODULES = {
    "diffusers_ztsnr.tiny": ("diffusers_ztsnr.testing.tiny", "diffusers_ztsnr.testing.tokenizers"),
    "diffusers_ztsnr.demo_data": ("diffusers_ztsnr.testing.demo_data",),
    "diffusers_ztsnr.checkpoints": ("diffusers_ztsnr.markers",),
}


def package_modules(package_dir: Path, package: str) -> dict[str, list[Path]]:
    """Dotted module name -> its source files (a module and a package folder of the same name both count)."""
    modules: dict[str, list[Path]] = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules.setdefault(".".join((package, *parts)), []).append(path)
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _ImportCollector(ast.NodeVisitor):
    """The dotted names one module imports (and, for ``from x import y``, ``x.y`` as well), wherever they stand."""

    def __init__(self, module: str, is_package: bool):
        self.package = module if is_package else module.rpartition(".")[0]
        self.names: set[str] = set()

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.names.update(alias.name for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        self.names.add(source)
        self.names.update(f"{source}.{alias.name}" for alias in node.names)


def import_graph(package_dir: Path = PACKAGE_DIR, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports (see the module docstring for what counts)."""
    modules = package_modules(package_dir, package)
    graph: dict[str, set[str]] = {}
    for module, paths in modules.items():
        collector = _ImportCollector(module, is_package=any(p.name == "__init__.py" for p in paths))
        for path in paths:
            collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        enclosing = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
        targets = set()
        for name in collector.names:
            parts = name.split(".")
            targets.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        graph[module] = {target for target in targets if target in modules} - enclosing
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or ``None`` when the graph has none."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if target in path:
                return path[path.index(target):] + [target]
            if target not in done:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def import_chain(graph: dict[str, set[str]], start: str, reached) -> list[str] | None:
    """The shortest import chain from ``start`` to a module for which ``reached(module)`` holds, or ``None``."""
    parent: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node != start and reached(node):
            chain = [node]
            while parent[chain[-1]] is not None:
                chain.append(parent[chain[-1]])
            return chain[::-1]
        for target in sorted(graph.get(node, ())):
            if target not in parent:
                parent[target] = node
                queue.append(target)
    return None


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def test_the_graph_sees_relative_absolute_lazy_and_package_imports(tmp_path):
    package = _write(tmp_path / "pkg", {
        "__init__.py": "from .a import f\n",
        "a.py": "from . import b\n\ndef f():\n    from .sub.c import g\n    return g\n",
        "b.py": "import pkg.sub\n",
        "sub/__init__.py": "",
        "sub/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import f\n"
                    "from ...outside import x\n",
    })
    graph = import_graph(package, "pkg")
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b", "pkg.sub", "pkg.sub.c"}, "pkg.b": {"pkg.sub"},
                     "pkg.sub": set(), "pkg.sub.c": set()}
    assert find_cycle(graph) is None
    assert find_cycle({**graph, "pkg.sub.c": {"pkg.a"}}) == ["pkg.a", "pkg.sub.c", "pkg.a"]
    assert import_chain(graph, "pkg", lambda m: m.startswith("pkg.sub")) == ["pkg", "pkg.a", "pkg.sub"]


def test_the_graph_holds_the_package_imports():
    graph = import_graph()
    assert f"{PACKAGE}.training.output" in graph  # modules in subpackages are found
    assert f"{PACKAGE}.imaging" in graph[f"{PACKAGE}.training.output"]  # a relative import
    assert f"{PACKAGE}.testing.tiny" in graph[f"{PACKAGE}.cli"]  # an import inside a function
    assert f"{PACKAGE}.schedulers" in graph[PACKAGE]  # a package's __init__


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", MATHS_FLOOR)
def test_the_maths_floor_imports_nothing_above_it(module):
    above = tuple(f"{PACKAGE}.{name}" for name in ABOVE_THE_FLOOR)
    chain = import_chain(import_graph(), f"{PACKAGE}.{module}",
                         lambda m: m in above or m.startswith(tuple(f"{a}." for a in above)))
    assert chain is None, "the maths floor imports upwards: " + " -> ".join(chain)


def test_the_package_imports_no_deprecated_module_path():
    graph = import_graph()
    users = {module: sorted(graph[module] & set(DEPRECATED_MODULES)) for module in graph}
    assert {module: used for module, used in users.items() if used} == {}


@pytest.mark.parametrize("old", sorted(DEPRECATED_MODULES))
def test_deprecated_module_paths_keep_every_public_name(old):
    module = importlib.import_module(old)
    for new_name in DEPRECATED_MODULES[old]:
        new = importlib.import_module(new_name)
        for name in new.__all__:
            with pytest.warns(FutureWarning, match=f"{old} is deprecated; import {name} from {new_name}"):
                assert getattr(module, name) is getattr(new, name)
    for name in module.__all__:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            assert hasattr(module, name)
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018


# --- size limits: a function reads on one screen, a module holds one concern ---------------------------------

MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 400
MAX_DATA_FILE_LINES = 300  # training/data/: one step of the data pipeline a file


def oversized(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """Every function longer than MAX_FUNCTION_LINES and every module longer than its limit, as readable lines."""
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(package_dir).as_posix()
        limit = MAX_DATA_FILE_LINES if name.startswith("training/data/") else MAX_FILE_LINES
        if text.count("\n") > limit:
            found.append(f"{name}: {text.count(chr(10))} lines (limit {limit})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    return found


def test_the_size_check_sees_long_functions_and_files(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    package = _write(tmp_path, {"pkg/__init__.py": "", "pkg/long.py": f"def long():\n{body}\n",
                                "pkg/training/data/big.py": "x = 1\n" * (MAX_DATA_FILE_LINES + 1)})
    assert oversized(package / "pkg") == [f"long.py:1 long: {MAX_FUNCTION_LINES + 1} lines",
                                  f"training/data/big.py: {MAX_DATA_FILE_LINES + 1} lines (limit 300)"]


def test_no_function_or_module_is_over_its_size_limit():
    assert oversized() == []
