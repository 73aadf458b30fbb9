"""Every child process a test starts is waited for, on every path: a worker that does not stop on
SIGTERM within its grace is SIGKILLed and reaped, so no ``Popen`` is left to warn ``subprocess ...
is still running`` (an error under ``filterwarnings = error``) in whichever test runs next."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from service.devtools import processes

# A worker slow to stop: it ignores SIGTERM (as a service draining past its grace would), says it is
# ready, then sleeps.
STUBBORN = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(600)")


def stubborn(log: Path, popen: Callable[..., subprocess.Popen[bytes]] = subprocess.Popen) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        proc = popen([sys.executable, "-c", STUBBORN], stdout=out, stderr=subprocess.STDOUT,
                     stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while b"ready" not in log.read_bytes():
        assert time.monotonic() < deadline and proc.poll() is None, "the child never started"
        time.sleep(0.05)
    return proc


def test_workers_slow_to_stop_are_killed_and_waited_for(tmp_path: Path) -> None:
    from tests.support import stop_workers

    workers = [stubborn(tmp_path / f"w{i}.log") for i in range(2)]
    try:
        stop_workers(workers, grace_s=0.5)
        assert [w.returncode for w in workers] == [-9, -9], "a worker was left running or never waited for"
    finally:
        for w in workers:  # the test's own safety net, so a failure here leaves nothing behind either
            if w.returncode is None:
                w.kill()
                w.wait()


def test_children_are_stopped_and_reaped_when_their_owner_fails(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), processes.Children(grace_s=0.5) as kids:
        slow = stubborn(tmp_path / "slow.log", kids.popen)
        done = kids.popen([sys.executable, "-c", "pass"])  # exits on its own; nobody waits for it
        raise RuntimeError("the test failed half way")
    assert slow.returncode == -9 and done.returncode is not None  # both reaped
    assert list(kids) == []


def test_a_sigkilled_child_is_reaped_and_forgotten(tmp_path: Path) -> None:
    kids = processes.Children()
    proc = stubborn(tmp_path / "w.log", kids.popen)
    assert kids.kill(proc) == -9 and proc.returncode == -9
    assert kids.running == [] and list(kids) == []
    assert kids.kill(proc) == -9  # again: nothing to signal, nothing left to wait for
    kids.close()


def test_a_worker_the_test_left_running_is_reaped_by_the_shared_registry(tmp_path: Path) -> None:
    from tests import support

    left = stubborn(tmp_path / "left.log", support.children.popen)
    assert left in support.children.running
    support.children.close(grace_s=0.2)  # what the autouse fixture of tests/conftest.py does after each test
    assert left.returncode == -9 and left not in list(support.children)
