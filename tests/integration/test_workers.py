"""``agent-service run --workers 2``: two supervised consumer processes in one group, one admin port."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import redis

from dedup.keys import Keys
from service.core.settings import Settings
from service.devtools import local
from service.devtools.fakellm import FakeLLM
from service.runtime.wiring import ensure_topics
from tests.support import classify, committed, kill_worker, produce, read_topic, spawn_worker, succeeded

pytestmark = pytest.mark.integration


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def sample(text: str, name: str) -> float:
    """The value of one sample line (``name`` with its labels, as written) of a Prometheus scrape."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the scrape")


def until(predicate: Any, timeout_s: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n{tail}")


class Fleet:
    """``agent-service run --workers 2`` in a child process, its workers found under it."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self.settings, self.log = settings, log
        self.base = f"http://127.0.0.1:{settings.http.port}"
        self.proc: subprocess.Popen[bytes] = spawn_worker(settings, str(log), "--workers", "2")
        self.seen: set[int] = set()

    def workers(self) -> list[int]:
        pids = children(self.proc.pid)
        self.seen.update(pids)
        return pids

    def ready(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()[-4000:]
        return get(self.base + "/readyz")[0] == 200

    def metrics(self) -> str:
        status, text = get(self.base + "/metrics")
        assert status == 200
        return text

    def kill(self) -> None:
        """SIGKILL the supervisor and every worker it ever had (they run in sessions of their own)."""
        pids = self.workers()
        kill_worker(self.proc)  # its process group, and reaped
        for pid in pids + sorted(self.seen):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def fleet_settings(make_settings: Any, **overrides: Any) -> Settings:
    s: Settings = make_settings(kafka={"topic_partitions": 4}, http={"enabled": True, "port": local.free_port()},
                                worker_id=None, **overrides)
    ensure_topics(s)
    return s


def owners(s: Settings, task_ids: list[str]) -> dict[str, str]:
    client = redis.Redis.from_url(s.redis.url.get_secret_value())
    keys = Keys(s.redis.key_prefix)
    try:
        return {t: (client.hget(keys.task(t), "owner") or b"").decode() for t in task_ids}
    finally:
        client.close()


def test_two_workers_run_every_task_once_and_one_scrape_adds_them_up_and_sigterm_drains(
    make_settings: Any, fake_llm: FakeLLM, tmp_path: Path,
) -> None:
    s = fleet_settings(make_settings)
    fake_llm.latency_s = 0.05
    n = 80
    ids = [f"fleet-{i}" for i in range(n)]
    log = tmp_path / "fleet.log"
    fleet = Fleet(s, log)
    try:
        until(fleet.ready, 90, "both workers ready", log)
        assert len(fleet.workers()) == 2
        produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(t.encode(), classify(t)) for t in ids])
        results = succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=n, timeout_s=90))
        by_key: dict[bytes | None, set[bytes | None]] = defaultdict(set)
        for m in results:
            by_key[m.key].add(m.value)
        assert {k.decode() for k in by_key if k is not None} == set(ids)
        assert all(len(v) == 1 for v in by_key.values())
        by_task = fake_llm.stats()["by_step"]
        assert all(by_task.get(f"{t}:classify") == 1 for t in ids), "a task ran the model twice"
        ran = owners(s, ids)
        assert len(set(ran.values())) == 2, "both workers ran tasks"
        # one scrape of the one port: every worker's counters, added up
        until(lambda: sample(fleet.metrics(), 'agent_tasks_total{outcome="succeeded"}') == n, 10, "the sum")
        text = fleet.metrics()
        assert sample(text, "agent_messages_consumed_total") == n
        assert sample(text, "agent_assigned_partitions") == 4  # live workers' gauges, summed
        assert sample(text, "agent_workers") == 2
        # SIGTERM to the supervisor drains both workers, commits, and ends it cleanly
        fake_llm.latency_s = 1.5
        more = [f"fleet-late-{i}" for i in range(20)]
        produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(t.encode(), classify(t)) for t in more])
        until(lambda: fake_llm.stats()["open"] >= 10, 30, "late tasks in flight", log)
        fleet.proc.send_signal(signal.SIGTERM)
        assert fleet.proc.wait(60) == 0, log.read_text()[-4000:]
        assert not [pid for pid in fleet.seen if os.path.exists(f"/proc/{pid}")], "a worker outlived the drain"
    finally:
        fleet.kill()
    done = succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=n + 20, timeout_s=30))
    finished_late = {m.key.decode() for m in done if m.key is not None} & set(more)
    offsets = committed(s.kafka.bootstrap_servers, s.kafka.group_id, s.kafka.input_topic, 4)
    # what was in flight at the signal finished and was committed; nothing committed past a record
    assert len(finished_late) >= 10
    assert sum(o for o in offsets.values() if o > 0) >= n + len(finished_late)


@pytest.mark.chaos
@pytest.mark.evicts_killed_members
def test_a_killed_worker_is_restarted_and_every_task_gets_exactly_one_result(
    make_settings: Any, fake_llm: FakeLLM, tmp_path: Path,
) -> None:
    s = fleet_settings(make_settings, ledger={"lease_ms": 2000})
    fake_llm.latency_s = 0.2
    n = 150
    ids = [f"kill-{i}" for i in range(n)]
    log = tmp_path / "fleet.log"
    fleet = Fleet(s, log)
    try:
        until(fleet.ready, 90, "both workers ready", log)
        first = fleet.workers()
        produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(t.encode(), classify(t)) for t in ids])
        until(lambda: fake_llm.stats()["requests"] >= 20, 30, "tasks under way", log)
        os.kill(first[0], signal.SIGKILL)
        until(lambda: len(fleet.workers()) == 2 and first[0] not in fleet.workers(), 30, "a restarted worker", log)
        results = succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=n, timeout_s=120))
        by_key: dict[bytes | None, set[bytes | None]] = defaultdict(set)
        for m in results:
            by_key[m.key].add(m.value)
        assert {k.decode() for k in by_key if k is not None} == set(ids), "a task has no result"
        assert all(len(v) == 1 for v in by_key.values()), "a task has two different results"
        until(lambda: sample(fleet.metrics(), "agent_worker_restarts_total") == 1, 10, "the restart counted")
        until(fleet.ready, 60, "the restarted worker ready", log)
        fleet.proc.send_signal(signal.SIGTERM)
        assert fleet.proc.wait(60) == 0, log.read_text()[-4000:]
        metrics_dir = next(line.rsplit("metrics=", 1)[1].strip() for line in log.read_text().splitlines()
                           if "serving with 2 workers" in line)
        assert not os.path.exists(metrics_dir), "the multiprocess directory outlived the run"
    finally:
        fleet.kill()


def test_a_configuration_the_ledger_refuses_stops_the_supervisor_before_any_worker(
    make_settings: Any, tmp_path: Path,
) -> None:
    """As one process does: a ledger retention shorter than the topic's refuses the start (exit 2),
    said once by the supervisor rather than by a crash loop of workers."""
    s = fleet_settings(make_settings, ledger={"result_ttl_s": 60})
    log = tmp_path / "fleet.log"
    fleet = Fleet(s, log)
    try:
        assert fleet.proc.wait(60) == 2, log.read_text()[-4000:]
        assert "refusing to start" in log.read_text() and "worker 0 started" not in log.read_text()
    finally:
        fleet.kill()

