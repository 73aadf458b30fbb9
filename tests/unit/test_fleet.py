"""The supervisor of `run --workers N`: a worker that keeps dying is restarted with a growing backoff."""

from __future__ import annotations

import os
import sys
import time

import pytest

from service.core.settings import Settings
from service.runtime import fleet
from service.runtime.fleet import Supervisor


def test_a_crash_loop_backs_off_instead_of_spinning() -> None:
    supervisor = Supervisor(Settings(), 1, argv=[sys.executable, "-c", "raise SystemExit(3)"])
    try:
        supervisor.start()
        started = time.monotonic()
        while time.monotonic() - started < 3.2:
            supervisor.check()
            time.sleep(0.05)
        worker = supervisor.workers[0]
        # 0.5 s, 1 s, 2 s between the deaths: three restarts in 3.2 s at most, not one per check
        assert 1 <= worker.restarts <= 3
        assert worker.backoff_s >= 2.0
        assert os.path.isdir(supervisor.directory)
    finally:
        supervisor.kill()
        supervisor.close()
    assert not os.path.exists(supervisor.directory)


def test_workers_get_their_own_slot_in_the_environment() -> None:
    supervisor = Supervisor(Settings(worker_id="box", kafka={"transactional_id": "tx"}), 2)
    try:
        env = supervisor._env(supervisor.workers[1])
        assert env["PROMETHEUS_MULTIPROC_DIR"] == supervisor.directory
        assert env["AGENT_HTTP__ENABLED"] == "false"
        assert env["AGENT_WORKER_ID"] == "box-w1" and env["AGENT_KAFKA__TRANSACTIONAL_ID"] == "tx-w1"
        assert env[fleet.SUPERVISOR_ENV] == str(os.getpid())
    finally:
        supervisor.close()


def test_outside_a_fleet_a_process_is_bound_to_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fleet.SUPERVISOR_ENV, raising=False)
    fleet.bind_to_supervisor()  # no-op, no exit


def test_a_worker_whose_supervisor_is_gone_does_not_start(monkeypatch: pytest.MonkeyPatch) -> None:
    # this process's own id is never its parent's (1 would be, for a run whose parent has exited)
    monkeypatch.setenv(fleet.SUPERVISOR_ENV, str(os.getpid()))
    with pytest.raises(SystemExit):
        fleet.bind_to_supervisor()
