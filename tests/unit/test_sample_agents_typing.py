"""The sample user package (``tests/agents_pkg``) is written in the typed form: ``mypy --strict`` passes on
it with no cast, assert or ``type: ignore``, catches a mistake in a step's reading of another step's
output, and the service ships ``py.typed`` so a user's mypy reads its annotations."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "tests" / "agents_pkg" / "sample_agents"


def strict_mypy(target: Path, cache: Path, path: Path | None = None) -> subprocess.CompletedProcess[str]:
    # from the repository's root: its pyproject's mypy settings (the pydantic plugin) and this service;
    # ``path`` is where mypy looks for the modules ``target`` imports (MYPYPATH)
    env = {**os.environ, "MYPYPATH": str(path)} if path is not None else None
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(cache), str(target)],
                          cwd=REPO, capture_output=True, text=True, timeout=600, check=False, env=env)


def test_the_sample_package_passes_strict_mypy_and_a_typing_mistake_fails_it(tmp_path: Path) -> None:
    done = strict_mypy(PACKAGE, tmp_path / "cache")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success: no issues found in 2 source files" in done.stdout

    wrong = tmp_path / "wrong" / "sample_agents"
    shutil.copytree(PACKAGE, wrong)
    module = wrong / "__init__.py"
    text = module.read_text()
    assert "user_message(summary.summary)" in text
    module.write_text(text.replace("user_message(summary.summary)", "user_message(summary.queue)"))
    done = strict_mypy(wrong, tmp_path / "cache")
    assert done.returncode == 1, done.stdout
    assert '"Summary" has no attribute "queue"' in done.stdout


MISMATCH = """
from sample_agents import Route, Summarize, Ticket
from sample_agents.filing import Complaint, Understand
from service.sdk import Agent

right = Agent("ticket_triage", Ticket, (Summarize(), Route()))
also_right: Agent[Complaint] = Agent("ticket_filing", Complaint, (Understand(),))
wrong = Agent("mixed", Complaint, (Understand(), Summarize()))  # Summarize reads a Ticket
"""


def test_an_agent_whose_steps_take_another_input_fails_strict_mypy(tmp_path: Path) -> None:
    shutil.copytree(PACKAGE, tmp_path / "pkg" / "sample_agents")
    probe = tmp_path / "pkg" / "probe.py"
    probe.write_text(MISMATCH)

    done = strict_mypy(probe, tmp_path / "cache", path=tmp_path / "pkg")

    assert done.returncode == 1, done.stdout
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"{probe}:8: error:"), done.stdout


def test_the_sample_package_needs_no_cast_assert_or_ignore() -> None:
    for path in sorted(PACKAGE.glob("*.py")):
        source = path.read_text()
        tree = ast.parse(source)
        asserts = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Assert)]
        casts = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call)
                 and getattr(n.func, "id", getattr(n.func, "attr", None)) == "cast"]
        assert (asserts, casts) == ([], []), path.name
        assert "type: ignore" not in source, path.name


def test_the_service_ships_py_typed() -> None:
    assert (REPO / "service" / "py.typed").is_file()
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "py.typed" in setuptools["package-data"]["service"]
    assert "service" in setuptools["packages"]["find"]["include"]
