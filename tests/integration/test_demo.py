"""``agent-service demo`` as a user runs it: a subprocess on its own embedded broker and
redis-server, its ticket tool pointed at a ticketing API the test holds. Every section it prints
has lines under it on the first run, and the ticket tool really ran: the API recorded the calls."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from service.devtools import local
from service.devtools.downstream import DownstreamFault, FakeDownstream

pytestmark = [pytest.mark.integration]

TASK_IDS = [f"demo-{i:03d}" for i in range(1, 9)] + ["ticket-001", "ticket-002", "panel-001"]
# what the fake model is scripted to file for each ticket task (service.devtools.demo.TICKET_ARGUMENTS)
FILED = {"ticket-001": {"title": "Order 2291 arrived with two broken cups", "priority": "normal", "refund": 0},
         "ticket-002": {"title": "Refund the double charge on order 2307", "priority": "urgent", "refund": 450}}


def sections(output: str) -> dict[str, list[str]]:
    """The output's sections: a line at the margin that ends with a colon, and the indented lines
    under it."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in output.splitlines():
        if re.fullmatch(r"\S.*:", line):
            current = found.setdefault(line, [])
        elif line.startswith("  ") and current is not None:
            current.append(line.strip())
        else:
            current = None
    return found


def run_demo(tmp_path: Path, api: FakeDownstream, *options: str, timeout_s: float = 400) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AGENT_TOOLS__TICKETS_URL": api.base_url, "AGENT_HTTP__PORT": str(local.free_port())}
    env.pop("AGENT_LLM__BASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "service.cli.main", "demo", "--data-dir", str(tmp_path / "demo"),
         "--timeout", str(timeout_s), *options],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=900, check=False)


def check_output(proc: subprocess.CompletedProcess[str], api: FakeDownstream) -> dict[str, list[str]]:
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}"
    found = sections(proc.stdout)
    acting = [name for name in found if name.startswith("the agent that acts")]
    assert {"results:", "dead letters:", "tickets:"} <= set(found) and len(acting) == 1, proc.stdout
    empty = [name for name, lines in found.items() if not lines]
    assert not empty, f"sections with nothing under them: {empty}\n{proc.stdout}"
    # every task the demo produced has its outcome listed, and both dead letters are there
    listed = {line.split()[0] for line in found["results:"]}
    assert set(TASK_IDS) <= listed, proc.stdout
    reasons = [line.split()[1] for line in found["dead letters:"]]
    assert {"conflict", "decode"} <= set(reasons), proc.stdout  # the local model may add invalid_output ones
    # the ticket tool ran: the API the test holds recorded one ticket per ticket task, as scripted
    effects = api.stats()["effects_by_key"]
    assert sorted(key.split("/")[0] for key in effects) == ["ticket-001", "ticket-002"], effects
    assert set(effects.values()) == {1}
    filed = {str(t["key"]).split("/")[0]: t["fields"] for t in api.tickets()}
    assert filed == FILED
    assert any(line.startswith("tool calls run") and line.split()[3] == "2" for line in found[acting[0]]), proc.stdout
    assert all(ticket["id"] in proc.stdout for ticket in api.tickets())
    return found


def test_the_demo_on_the_fake_model_prints_every_section_and_files_tickets(tmp_path: Path) -> None:
    with FakeDownstream() as api:
        proc = run_demo(tmp_path, api, "--fake-llm")
        found = check_output(proc, api)
    assert "the agent that acts (support_ticket, on the fake model, scripted to call open_ticket):" in found


@pytest.mark.embedded_llm
def test_the_demo_on_the_local_model_runs_the_acting_agent_on_the_fake_one_and_says_so(tmp_path: Path) -> None:
    with FakeDownstream() as api:
        proc = run_demo(tmp_path, api)
        found = check_output(proc, api)
    assert "(the local model, SmolLM2-135M)" in proc.stdout
    lines = found["the agent that acts (support_ticket, on the fake model, scripted to call open_ticket):"]
    assert any("does not call tools reliably" in line for line in lines)


def test_a_task_still_running_at_the_deadline_is_named_and_the_demo_fails(tmp_path: Path) -> None:
    with FakeDownstream() as api:
        api.add_fault(DownstreamFault("delay", match="ticket-001", delay_s=30.0))  # beyond the tool's timeout
        proc = run_demo(tmp_path, api, "--fake-llm", timeout_s=8)
    assert proc.returncode == 1, proc.stdout
    deadline = [line for line in proc.stdout.splitlines() if line.startswith("the deadline (8s, --timeout) passed")]
    assert len(deadline) == 1 and "ticket-001" in deadline[0], proc.stdout
    assert "results:" in sections(proc.stdout)  # what did end is still printed
