"""The supervisor of `run --workers N` reads each worker's stall from its gauges: unready past
``AGENT_LIVENESS__STALL_S``, and the worker stopped (then restarted) past ``AGENT_LIVENESS__RESTART_S``."""

from __future__ import annotations

import sys
import time

from service.core.settings import Settings
from service.runtime.fleet import Supervisor, worker_partitions, worker_stalled_s

# a worker that writes its gauges as a stalled one does, then waits to be stopped
STALLED_WORKER = """
import signal, sys, time
from service.core.metrics import Metrics
m = Metrics()
m.assigned_partitions.set(2)
m.stalled_seconds.set(float(sys.argv[1]))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
time.sleep(60)
"""


def run_supervisor(stalled_s: float, settings: Settings, seconds: float) -> Supervisor:
    supervisor = Supervisor(settings, 1, argv=[sys.executable, "-c", STALLED_WORKER, str(stalled_s)])
    supervisor.start()
    deadline = time.monotonic() + 30
    pid = supervisor.pids[0]
    while worker_partitions(supervisor.directory, pid) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker_partitions(supervisor.directory, pid) == 2
    assert worker_stalled_s(supervisor.directory, pid) == stalled_s
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        supervisor.check()
        time.sleep(0.05)
    return supervisor


def test_a_stalled_worker_makes_the_fleet_unready_and_is_restarted_past_restart_s() -> None:
    settings = Settings(liveness={"stall_s": 100, "restart_s": 300})
    supervisor = run_supervisor(150, settings, 1.0)
    try:
        assert supervisor.ready() and not supervisor.progressing()
        assert supervisor.workers[0].restarts == 0  # stalled, not yet for restart_s
    finally:
        supervisor.kill()
        supervisor.close()

    supervisor = run_supervisor(400, settings, 0.5)
    try:
        first = supervisor.workers[0]
        deadline = time.monotonic() + 30
        while first.restarts == 0 and time.monotonic() < deadline:
            supervisor.check()
            time.sleep(0.05)
        assert first.restarts >= 1, "a worker stalled past restart_s was not restarted"
    finally:
        supervisor.kill()
        supervisor.close()


def test_restart_s_zero_leaves_a_stalled_worker_running() -> None:
    supervisor = run_supervisor(10_000, Settings(liveness={"stall_s": 100, "restart_s": 0}), 1.0)
    try:
        assert not supervisor.progressing()
        assert supervisor.workers[0].restarts == 0 and supervisor.workers[0].alive
    finally:
        supervisor.kill()
        supervisor.close()
