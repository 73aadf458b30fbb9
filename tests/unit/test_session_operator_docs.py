"""docs/AGENTS.md's "Seeing and correcting a session" and the README say what the code serves: every
``/sessions`` route of the app is in the README's API table, the JSON shown has every field of
:class:`service.api.sessions.SessionView`, and the commands shown are the command line's."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from fastapi.routing import APIRoute

from service.api.sessions import SessionView, router
from service.cli.parser import build_parser

REPO = Path(__file__).resolve().parents[2]


def subsection() -> str:
    text = (REPO / "docs" / "AGENTS.md").read_text()
    start = text.index("\n### Seeing and correcting a session\n")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def test_the_readme_names_every_sessions_route() -> None:
    readme = (REPO / "README.md").read_text()
    table = [line for line in readme.splitlines() if line.startswith("| `") and "/sessions" in line]
    for route in router.routes:
        assert isinstance(route, APIRoute)
        path = route.path.replace("{session_id:path}", "{id}")
        for method in route.methods or ():
            assert any(re.search(rf"`{method} {re.escape(path)}[`?]", line) for line in table), (method, path)
    assert any("`/ui/sessions`" in line for line in readme.splitlines())


def test_the_example_answer_has_every_field() -> None:
    (answer,) = re.findall(r"```json\n(.*?)```", subsection(), re.S)
    shown = re.findall(r'"(\w+)":', answer)
    fields = list(SessionView.model_fields)
    assert [f for f in shown if f in fields] == fields  # each field once, in the model's order


def test_the_commands_shown_parse() -> None:
    parser = build_parser()
    commands = re.findall(r"^(agent-service session .*?)(?:\s+#.*)?$", subsection(), re.M)
    assert len(commands) == 3
    for command in commands:
        args = parser.parse_args(shlex.split(command)[1:])
        assert args.handler.__name__ == "session_" + args.session_command
