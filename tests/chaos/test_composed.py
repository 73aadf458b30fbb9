"""Faults together, on Apache Kafka: tasks whose every call gets a 5xx beside healthy ones, random
5xx, a 429 storm, a Redis outage with a rebalance during it (a worker SIGKILLed and a replica
started while Redis is down), and more SIGKILLs after it.

Once the faults stop, every partition reaches its end within the liveness bound computed from the
settings (``service.runtime.limits.record_bound``); every record ends as a result or a dead letter
with its reason; no task calls the model more than ``max_attempts`` times plus the attempts its
workers' deaths gave back (a 429 is refused before any model work and is not counted); every
worker answers ``/readyz`` 503 while Redis is down and 200 once the work is done. The figures of
the run are printed: records, results, dead letters by reason, the longest unready stretch.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from service.core.settings import Settings
from service.devtools import local
from service.devtools.fakellm import FakeLLM, FaultRule
from service.runtime.limits import record_bound
from service.runtime.wiring import ensure_topics
from tests.support import classify, committed, kill_worker, produce, read_topic, spawn_worker, stop_workers, succeeded

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

WORKERS = 3
PARTITIONS = 4
MAX_ATTEMPTS = 4
MAX_DEATHS = 3


@dataclass
class Readiness:
    """Polls each worker's /readyz in a thread of its own: the statuses seen, by time."""

    ports: list[int]
    seen: list[tuple[float, int, int]] = field(default_factory=list)  # (time, worker, status)
    longest_stall_s: float = 0.0  # the most /readyz said a worker had gone with work and nothing finished
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Readiness:
        self._thread = threading.Thread(target=self._run, name="readiness", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for i, port in enumerate(self.ports):
                code, stalled_s = status(port)
                self.seen.append((time.monotonic(), i, code))
                self.longest_stall_s = max(self.longest_stall_s, stalled_s)

    def statuses(self, worker: int, start: float, end: float) -> list[int]:
        return [code for t, w, code in list(self.seen) if w == worker and start <= t <= end and code]

    def longest_unready(self) -> float:
        """The longest stretch in which some worker answered, and only with 503."""
        longest = 0.0
        for worker in range(len(self.ports)):
            since = None
            for t, w, code in list(self.seen):
                if w != worker or code == 0:
                    continue
                if code == 503:
                    since = t if since is None else since
                    longest = max(longest, t - since)
                else:
                    since = None
        return longest


def status(port: int) -> tuple[int, float]:
    """/readyz's status (0 when nothing answers: a worker killed, or not yet listening) and the
    seconds it says the worker has had work pending and finished nothing."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            code, body = int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        code, body = int(exc.code), exc.read()
    except OSError:
        return 0, 0.0
    try:
        return code, float(json.loads(body).get("stalled_s") or 0.0)
    except (ValueError, AttributeError):
        return code, 0.0


def log_tails(logs: Path, lines: int = 15) -> str:
    """The last lines of each worker's log, for a failure's message (the logs go with the tmp dir)."""
    return "\n".join(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
                     for log in sorted(logs.glob("*.log")))


# the test's own deadlines (the faults ~35 s, the record bound, the session timeout, readiness 90 s)
# fire before pytest's, so a failure names the partitions that stopped and what the workers said
@pytest.mark.timeout(900)
@pytest.mark.evicts_killed_members
def test_every_record_ends_within_its_bound_whatever_fails_at_once(
    make_settings: Any, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    redis = local.start_redis(tmp_path / "redis")  # a server of its own: this test stops it
    ports = [local.free_port() for _ in range(WORKERS)]
    base: Settings = make_settings(
        kafka={"topic_partitions": PARTITIONS},
        redis={"url": f"redis://{redis.address}/0", "socket_timeout_s": 1.0},
        ledger={"lease_ms": 3000, "max_deaths": MAX_DEATHS},
        llm={"max_attempts": MAX_ATTEMPTS, "timeout_s": 2.0, "breaker_failures": 5, "breaker_open_s": 2.0,
             "backoff_max_s": 0.5, "max_wait_s": 30.0},
        worker_id=None, max_in_flight=32,
    )
    settings = [base.model_copy(update={"http": base.http.model_copy(update={"enabled": True, "port": p})})
                for p in ports]
    bound = record_bound(base)
    poison = [f"poison-{i}" for i in range(10)]
    healthy = [f"ok-{i}" for i in range(300)]
    fake_llm.latency_s = 0.02
    fake_llm.set_faults([
        *(FaultRule("error", match=f"{t}:", status=500) for t in poison),  # these inputs fail every time
        FaultRule("error", probability=0.1, status=503),
    ])
    ensure_topics(base)
    logs = tmp_path / "logs"
    logs.mkdir()
    workers = [spawn_worker(settings[i], str(logs / f"w{i}.log")) for i in range(WORKERS)]
    kills = 0
    try:
        with Readiness(ports) as readiness:
            records = [(t.encode(), classify(t, f"text of {t}")) for t in poison + healthy]
            produce(base.kafka.bootstrap_servers, base.kafka.input_topic, records[: len(records) // 2])
            time.sleep(3)
            # a 429 storm on top of the failing tasks: every call refused for a few seconds
            fake_llm.add_fault(FaultRule("rate_limit", retry_after_s=1, times=200))
            time.sleep(4)
            # Redis goes away; a worker is SIGKILLed and its replacement starts while Redis is down,
            # so the group rebalances during the outage
            redis.stop()
            outage_from = time.monotonic()
            produce(base.kafka.bootstrap_servers, base.kafka.input_topic, records[len(records) // 2:])
            time.sleep(5)
            kill_worker(workers[0])
            kills += 1
            workers[0] = spawn_worker(settings[0], str(logs / "w0.log"))
            time.sleep(15)
            outage_to = time.monotonic()
            redis.restart()
            time.sleep(5)
            kill_worker(workers[1])  # and a kill after it
            kills += 1
            workers[1] = spawn_worker(settings[1], str(logs / "w1.log"))
            fake_llm.set_faults([FaultRule("error", match=f"{t}:", status=500) for t in poison])
            faults_stopped = time.monotonic()
            # every partition reaches its end within the bound (and the group's session timeout)
            limit = bound.record_s + base.kafka.session_timeout_ms / 1000 + 30
            ends: dict[int, int] = {}
            while time.monotonic() - faults_stopped < limit:
                ends = committed(base.kafka.bootstrap_servers, base.kafka.group_id, base.kafka.input_topic,
                                 PARTITIONS)
                if sum(max(v, 0) for v in ends.values()) == len(records):
                    break
                time.sleep(1)
            settled_after = time.monotonic() - faults_stopped
            assert sum(max(v, 0) for v in ends.values()) == len(records), (
                f"not every partition reached its end {limit:.0f} s after the faults stopped: {ends}\n"
                f"{log_tails(logs)}")
            # every worker turns ready once the work is done (a restarted one after it joined the group)
            ready_by = time.monotonic() + 90
            while time.monotonic() < ready_by and any(
                    readiness.statuses(w, time.monotonic() - 1.5, time.monotonic())[-1:] != [200]
                    for w in range(WORKERS)):
                time.sleep(0.5)
            done = time.monotonic()
        # readiness: 503 from every worker that answered while Redis was down (after the time the
        # checks take to notice), and 200 from every worker once the work was done
        for worker in (1, 2):
            during = readiness.statuses(worker, outage_from + 5, outage_to)
            assert during and set(during) == {503}, (worker, Counter(during))
        for worker in range(WORKERS):
            assert readiness.statuses(worker, done - 1.5, done)[-1:] == [200], (worker, readiness.seen[-12:])
        longest_unready, longest_stall = readiness.longest_unready(), readiness.longest_stall_s
    finally:
        stop_workers(workers, grace_s=30)
        redis.stop()

    results = succeeded(read_topic(base.kafka.bootstrap_servers, base.kafka.results_topic, expect=len(healthy), idle_s=3))
    letters = read_topic(base.kafka.bootstrap_servers, base.kafka.dlq_topic, expect=len(poison), idle_s=3)
    result_keys = {(m.key or b"").decode() for m in results}
    letter_reasons = {(m.key or b"").decode(): m.headers["dlq.reason"].decode() for m in letters}
    for t in healthy + poison:
        assert t in result_keys or t in letter_reasons, f"{t} has neither a result nor a dead letter"
    letter_errors = {(m.key or b"").decode(): m.headers.get("dlq.error", b"").decode() for m in letters}
    for t in poison:
        # A task that fails every time ends exhausted (its attempts spent), crashed (its workers'
        # deaths spent), or unavailable: its next retry waited the longest wait allowed, because the
        # retry budget (retries at most a share of first calls) had nothing to grow on while Redis
        # was down and no first call was made. Each is a bounded end whose error says why.
        assert letter_reasons.get(t) in ("exhausted", "crashed", "unavailable"), (t, letter_reasons.get(t))
        if letter_reasons[t] == "unavailable":
            assert "waited" in (letter_errors.get(t) or ""), (t, letter_errors.get(t))
    stats = fake_llm.stats()
    calls: Counter[str] = Counter()
    for key, n in stats["by_key"].items():  # model calls per task, 429s (refused before any work) apart
        calls[key.split(":", 1)[0]] += n - stats["refused_by_key"].get(key, 0)
    over = {t: n for t, n in calls.items() if t in set(healthy + poison) and n > MAX_ATTEMPTS + MAX_DEATHS}
    assert not over, f"tasks over their bound of model calls: {over}"
    figures = {
        "records": len(records), "results": len(result_keys), "dead_letters": dict(Counter(letter_reasons.values())),
        "dead_letter_records": len(letters), "kills": kills, "settled_after_faults_s": round(settled_after, 1),
        "bound_s": bound.record_s, "longest_unready_s": round(longest_unready, 1),
        "longest_stall_s": round(longest_stall, 1),
        "most_calls_of_a_task": max(calls[t] for t in healthy + poison),
        "poison_calls": {t: calls[t] for t in poison},
        "unavailable_errors": {t: letter_errors[t] for t in poison if letter_reasons[t] == "unavailable"},
    }
    print("\ncomposed faults:", json.dumps(figures, sort_keys=True))
