"""The wheel ships every package of the tree, and the console script names a function that exists."""

from __future__ import annotations

import fnmatch
import importlib
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _packages() -> list[str]:
    found = []
    for root in ("service", "consumers", "dedup"):
        for init in sorted((REPO / root).rglob("__init__.py")):
            found.append(".".join(init.parent.relative_to(REPO).parts))
    return found


def test_package_discovery_includes_every_package() -> None:
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    missing = [p for p in _packages() if not any(fnmatch.fnmatchcase(p, pattern) for pattern in include)]
    assert missing == []


def test_the_console_script_resolves() -> None:
    module, _, function = PYPROJECT["project"]["scripts"]["agent-service"].partition(":")
    assert callable(getattr(importlib.import_module(module), function))
