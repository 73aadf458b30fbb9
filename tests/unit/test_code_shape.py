"""The service's code keeps a shape a reader can hold: small modules, short functions.

Over ``service``, ``consumers`` and ``dedup``: no module longer than :data:`MAX_MODULE_LINES`
lines, no function (a method, a nested or an ``async`` one too) longer than
:data:`MAX_FUNCTION_LINES`, counted from its ``def`` line to its last line (decorators excluded).
The third limit, McCabe complexity at most :data:`MAX_COMPLEXITY`, is ruff's ``C901``
(``[tool.ruff.lint.mccabe]`` in ``pyproject.toml``); the last test keeps that setting from
loosening. The source is read with :mod:`ast`, so the check needs no import to run.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOTS = ("service", "consumers", "dedup")
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
MAX_COMPLEXITY = 12


@dataclass(frozen=True)
class Function:
    module: str  # the path below the repository
    name: str  # dotted below the module: Class.method, outer.inner
    line: int  # the def line
    lines: int  # def line to last line


def sources(repo: Path, roots: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    """Every module below the roots: its path below ``repo`` and its text."""
    for root in roots:
        for path in sorted((repo / root).rglob("*.py")):
            yield path.relative_to(repo).as_posix(), path.read_text()


def module_lines(text: str) -> int:
    return len(text.splitlines())


def functions(module: str, text: str) -> Iterator[Function]:
    """Every function of a module, with its length from the ``def`` line (not its decorators)."""

    def walk(node: ast.AST, prefix: str) -> Iterator[Function]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = prefix + child.name
                assert child.end_lineno is not None
                yield Function(module, name, child.lineno, child.end_lineno - child.lineno + 1)
                yield from walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, prefix + child.name + ".")
            else:
                yield from walk(child, prefix)

    yield from walk(ast.parse(text, module), "")


def test_no_module_is_over_the_limit() -> None:
    over = [f"{module}: {n} lines" for module, text in sources(REPO, ROOTS)
            if (n := module_lines(text)) > MAX_MODULE_LINES]
    assert not over, f"modules over {MAX_MODULE_LINES} lines (split them):\n" + "\n".join(over)


def test_no_function_is_over_the_limit() -> None:
    over = [f"{f.module}:{f.line} {f.name}: {f.lines} lines"
            for module, text in sources(REPO, ROOTS) for f in functions(module, text)
            if f.lines > MAX_FUNCTION_LINES]
    assert not over, f"functions over {MAX_FUNCTION_LINES} lines (split them):\n" + "\n".join(over)


def test_a_function_is_measured_from_its_def_line_whatever_it_holds() -> None:
    text = '''
import functools


@functools.cache
@functools.wraps(print)
def decorated():
    return 1


class Outer:
    async def method(self):
        def inner():
            pass

        return inner
'''
    found = {f.name: (f.line, f.lines) for f in functions("example.py", text)}
    assert found == {"decorated": (7, 2), "Outer.method": (12, 5), "Outer.method.inner": (13, 2)}
    assert module_lines(text) == 16


def test_the_lint_keeps_complexity_at_the_limit() -> None:
    settings = tomllib.loads((REPO / "pyproject.toml").read_text())
    lint = settings["tool"]["ruff"]["lint"]
    assert "C90" in lint["select"] or "C901" in lint["select"]
    assert "C901" not in lint.get("ignore", [])
    assert lint["mccabe"]["max-complexity"] <= MAX_COMPLEXITY
