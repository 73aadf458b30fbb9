"""Imports run one way, and no module imports itself back.

Each package of the service has a rank; a module may import a module of its own package or of a
package of lower rank, never one of the same or a higher rank:

    service.cli, service.sdk        the surfaces a person or a user's code calls
    service.runtime                 the composition root: builds and runs everything below
    service.api                     the HTTP app, on a protocol of what it serves
    service.pipeline                the per-record processor and the dead-letter topic
    service.agents, service.llm     the agent model and kinds; the model client and its guard
    service.core                    errors, settings, metrics, tracing: what every layer may use
    consumers, dedup                the Kafka and Redis primitives

``service.devtools`` (the fake model, embedded servers, the demo) may import anything; nothing
imports it, except the CLI inside a function (``demo``, ``run --embedded``). No module imports
another's private (``_name``) names either. The imports are read from the source with :mod:`ast`,
so the check needs no import to run.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOTS = ("service", "consumers", "dedup")

RANKS: dict[str, int] = {
    "service.devtools": 7,
    "service.cli": 6,
    "service.sdk": 6,
    "service": 6,  # the package's own __init__
    "service.runtime": 5,
    "service.api": 4,
    "service.pipeline": 3,
    "service.agents": 2,
    "service.llm": 2,
    "service.core": 1,
    "consumers": 0,
    "dedup": 0,
}
TOOLING = "service.devtools"
MAY_IMPORT_TOOLING_LAZILY = ("service.cli",)


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (a package's __init__ when no submodule matches)
    line: int
    lazy: bool  # inside a function: runs only when it is called


def modules(repo: Path, roots: tuple[str, ...]) -> dict[str, Path]:
    """Every module below the roots, by dotted name (a package by its own name)."""
    found: dict[str, Path] = {}
    for root in roots:
        for path in sorted((repo / root).rglob("*.py")):
            parts = list(path.relative_to(repo).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _resolve(name: str, known: Mapping[str, Path]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str, path: Path, known: Mapping[str, Path]) -> Iterator[Import]:
    """The imports of one module that land in ``known``, with whether each is lazy."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST, lazy: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    target = _resolve(alias.name, known)
                    if target:
                        yield Import(module, target, child.lineno, lazy)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in child.names:
                    target = _resolve(f"{base}.{alias.name}", known)
                    if target:
                        yield Import(module, target, child.lineno, lazy)
            yield from visit(child, inner)

    yield from visit(tree, False)


def unit(module: str, ranks: Mapping[str, int]) -> str | None:
    """The ranked package a module belongs to: the longest prefix of its name in ``ranks``."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in ranks:
            return name
    return None


def violations(edges: list[Import], ranks: Mapping[str, int], tooling: str,
               lazy_tooling: tuple[str, ...]) -> list[str]:
    """Every import that runs against the rule, as ``source:line -> target (why)``."""
    found = []
    for edge in edges:
        src, dst = unit(edge.source, ranks), unit(edge.target, ranks)
        where = f"{edge.source}:{edge.line} -> {edge.target}"
        if src is None or dst is None:
            found.append(f"{where} (a module outside every ranked package: give it a place)")
        elif src == dst:
            continue
        elif dst == tooling:
            if not (edge.lazy and src in lazy_tooling):
                found.append(f"{where} (nothing imports {tooling}, but for a lazy import in {lazy_tooling})")
        elif ranks[dst] >= ranks[src]:
            found.append(f"{where} ({src} ranks {ranks[src]}, {dst} ranks {ranks[dst]})")
    return found


def cycles(edges: list[Import]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        if edge.source != edge.target:
            graph.setdefault(edge.source, set()).add(edge.target)
            graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return groups


def private_imports(repo: Path, roots: tuple[str, ...]) -> list[str]:
    """``from other_module import _name``: a module reaching into another's private names."""
    known = modules(repo, roots)
    found = []
    for module, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level and node.module != module:
                found += [f"{module}:{node.lineno} imports {node.module}.{alias.name}" for alias in node.names
                          if alias.name.startswith("_") and not alias.name.startswith("__")]
    return found


def all_imports(repo: Path, roots: tuple[str, ...]) -> list[Import]:
    known = modules(repo, roots)
    return [edge for module, path in known.items() for edge in imports(module, path, known)]


# ---------------------------------------------------------------------------- the project


def test_every_module_has_a_place() -> None:
    unplaced = [m for m in modules(REPO, ROOTS) if unit(m, RANKS) is None]
    assert not unplaced


def test_imports_run_one_way() -> None:
    assert violations(all_imports(REPO, ROOTS), RANKS, TOOLING, MAY_IMPORT_TOOLING_LAZILY) == []


def test_no_import_cycles() -> None:
    assert cycles(all_imports(REPO, ROOTS)) == []


def test_no_module_imports_another_modules_private_names() -> None:
    assert private_imports(REPO, ROOTS) == []


# ---------------------------------------------------------------------------- the checker


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


PLANTED = {"low": 0, "high": 1, "tools": 2}


def _check(tmp_path: Path, files: dict[str, str]) -> tuple[list[str], list[list[str]]]:
    repo = _tree(tmp_path, {"low/__init__.py": "", "high/__init__.py": "", "tools/__init__.py": "", **files})
    edges = all_imports(repo, ("low", "high", "tools"))
    return violations(edges, PLANTED, "tools", ("high",)), cycles(edges)


def test_checker_accepts_a_downward_import(tmp_path: Path) -> None:
    assert _check(tmp_path, {"low/a.py": "X = 1\n", "high/b.py": "from low.a import X\n"}) == ([], [])


def test_checker_finds_an_upward_import(tmp_path: Path) -> None:
    found, _ = _check(tmp_path, {"low/a.py": "from high import b\n", "high/b.py": ""})
    assert found == ["low.a:1 -> high.b (low ranks 0, high ranks 1)"]


def test_checker_finds_a_relative_upward_import(tmp_path: Path) -> None:
    found, _ = _check(tmp_path, {"low/a.py": "from ..high.b import Y\n", "high/b.py": "Y = 1\n"})
    assert found == ["low.a:1 -> high.b (low ranks 0, high ranks 1)"]


def test_checker_finds_a_cycle_within_one_package(tmp_path: Path) -> None:
    found, groups = _check(tmp_path, {"low/a.py": "import low.b\n", "low/b.py": "def f():\n    from low import a\n"})
    assert found == [] and groups == [["low.a", "low.b"]]


def test_checker_allows_tooling_only_lazily_and_only_where_named(tmp_path: Path) -> None:
    found, _ = _check(tmp_path, {
        "tools/t.py": "import high\n",
        "high/lazy.py": "def run():\n    from tools import t\n",
        "high/eager.py": "from tools import t\n",
        "low/lazy.py": "def run():\n    import tools.t\n",
    })
    assert sorted(found) == [
        "high.eager:1 -> tools.t (nothing imports tools, but for a lazy import in ('high',))",
        "low.lazy:2 -> tools.t (nothing imports tools, but for a lazy import in ('high',))",
    ]


def test_checker_finds_a_private_name_imported_from_another_module(tmp_path: Path) -> None:
    repo = _tree(tmp_path, {"low/__init__.py": "", "low/a.py": "_x = 1\n", "low/b.py": "from low.a import _x, __doc__\n"})
    assert private_imports(repo, ("low",)) == ["low.b:1 imports low.a._x"]


def test_checker_refuses_a_module_without_a_place(tmp_path: Path) -> None:
    repo = _tree(tmp_path, {"low/__init__.py": "", "other/__init__.py": "", "low/a.py": "import other\n"})
    edges = all_imports(repo, ("low", "other"))
    assert violations(edges, {"low": 0}, "tools", ()) == [
        "low.a:1 -> other (a module outside every ranked package: give it a place)"
    ]


@pytest.mark.parametrize("package", ["service.api", "service.pipeline", "service.core"])
def test_the_ranks_cover_the_packages_named_in_the_docstring(package: str) -> None:
    assert package in RANKS and __doc__ is not None and package in __doc__
