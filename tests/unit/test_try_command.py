"""``agent-service try KIND --input JSON --model URL`` in a subprocess against the fake model server on
a free port: each step printed, exit 0 with the result, exit 1 with the dead letter's reason; and
the rendering of a run's tool calls."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.agents.support import support_agent
from service.cli.trying import render
from service.devtools import processes
from service.sdk.testing import ScriptedModel, run, tool_call

TICKET = '{"subject": "Refund", "body": "I was charged twice this month."}'


@pytest.fixture
def fake_model() -> Iterator[str]:
    command = [sys.executable, "-m", "service.devtools.fakellm", "--host", "127.0.0.1", "--port", "0", "--seed", "7"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline().strip()  # printed once it listens
            assert line.startswith("fakellm listening on http://127.0.0.1:"), line
            yield line.removeprefix("fakellm listening on ")
        finally:
            processes.stop(process, grace_s=10)


def agent_service(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_")}
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True,
                          env={**clean, **env}, timeout=120, check=False)


def test_try_prints_each_step_and_the_result(fake_model: str) -> None:
    done = agent_service("try", "ticket_triage", "--input", TICKET, "--model", fake_model)

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "step summarize  attempts 1"
    assert lines[1].startswith('  output {"summary": ')
    assert lines[2] == "step route  attempts 1"
    assert lines[-1].startswith('succeeded: {"queue": ')


def test_try_exits_1_with_the_dead_letter_reason(fake_model: str) -> None:
    httpx.post(f"{fake_model}/_faults", json=[{"fault": "schema_violation"}], timeout=10).raise_for_status()

    done = agent_service("try", "classify", "--input", '{"text": "It crashes", "labels": ["bug", "question"]}',
                         "--model", fake_model, AGENT_LLM__MAX_ATTEMPTS="2", AGENT_LLM__BACKOFF_BASE_S="0")

    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["step classify  attempts 2", "  output (none)"]
    assert len(lines) == 3 and lines[2].startswith("dead letter: invalid_output: step classify, 2 attempts: ")


def test_try_refuses_input_that_is_not_json_and_an_unknown_kind() -> None:
    bad = agent_service("try", "classify", "--input", "{nope")
    assert (bad.returncode, bad.stdout) == (2, "")
    assert "--input is not JSON" in bad.stderr
    unknown = agent_service("try", "no_such_kind", "--input", "{}")
    assert unknown.returncode == 2 and "unknown kind 'no_such_kind'" in unknown.stderr


def test_render_shows_each_tool_call_under_its_step() -> None:
    def open_ticket(call: Any) -> dict[str, str]:
        return {"id": "T-1"}

    model = ScriptedModel([tool_call("open_ticket", {"title": "Charged twice", "priority": "low", "refund": 0}),
                           {"reply": "Filed as T-1.", "status": "filed"}])
    outcome = run(support_agent("http://tickets.invalid"), {"customer": "Ann", "message": "Charged twice."},
                  model=model, tools={"open_ticket": open_ticket})

    assert render(outcome).splitlines() == [
        "step file  attempts 2",
        '  tool open_ticket {"priority": "low", "refund": 0, "title": "Charged twice"} -> executed {"id": "T-1"}',
        '  output {"reply": "Filed as T-1.", "status": "filed"}',
        'succeeded: {"reply": "Filed as T-1.", "status": "filed"}',
    ]


def test_try_loads_a_kinds_file(fake_model: str) -> None:
    kinds = str(Path(__file__).resolve().parents[2] / "docs" / "examples" / "kinds.toml")

    done = agent_service("try", "support_reply", "--kinds", kinds, "--model", fake_model, "--input",
                         '{"customer": "Ana", "product": "kettle", "message": "The lid is cracked."}')

    assert done.returncode == 0, done.stdout + done.stderr
    steps = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["facts", "reply"]


def test_try_starts_the_fake_model_by_default() -> None:
    done = agent_service("try", "classify", "--input", '{"text": "It crashes", "labels": ["bug", "question"]}')

    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0] == "step classify  attempts 1"
    assert re.fullmatch(r'succeeded: \{"confidence": [0-9.e-]+, "label": "(bug|question)"\}',
                        done.stdout.splitlines()[-1]), done.stdout
