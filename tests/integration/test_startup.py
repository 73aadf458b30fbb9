"""``agent-service run`` started while a dependency is missing waits for it, unready, instead of exiting.

Each test runs the service as a child process on the session's Apache Kafka and the fake model, with
a Redis port where nothing listens yet (or topics that do not exist yet): the process stays up,
``/healthz`` answers 200, ``/readyz`` 503 names what is missing, one line says so; once the
dependency is there the service starts and a task produced then gets its result.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient

from service.core.settings import Settings
from service.devtools import local
from service.devtools.fakellm import FakeLLM
from service.runtime.wiring import ensure_topics
from tests.support import classify, kill_worker, produce, read_topic, spawn_worker, succeeded

pytestmark = pytest.mark.integration


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")
    except (OSError, ValueError):
        return 0, None


def until(predicate: Any, timeout_s: float, what: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the service exited with {proc.returncode}\n{log.read_text()[-4000:]}"
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM (a drain), then SIGKILL if it is still running: waited for on every path."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            kill_worker(proc)
    return proc.returncode


def test_a_service_started_while_redis_is_down_waits_unready_and_starts_when_redis_comes(
    make_settings: Any, fake_llm: FakeLLM, kafka_bootstrap: str, tmp_path: Path,
) -> None:
    port = local.free_port()  # nothing listens here until the test starts a redis-server on it
    s: Settings = make_settings(redis={"url": f"redis://127.0.0.1:{port}/0"},
                                http={"enabled": True, "port": local.free_port()}, worker_id=None,
                                liveness={"retry_max_s": 1.0})
    base = f"http://127.0.0.1:{s.http.port}"
    log = tmp_path / "service.log"
    proc = spawn_worker(s, str(log))
    redis_server: local.Server | None = None
    try:
        until(lambda: get(base + "/readyz")[0] == 503, 60, "/readyz to answer 503", proc, log)
        status, body = get(base + "/readyz")
        assert status == 503 and body["ready"] is False
        assert body["checks"]["redis"] is False and body["checks"]["started"] is False
        assert get(base + "/healthz")[0] == 200
        # several asks later (the backoff is capped at 1 s here), still one line and still running
        until(lambda: get(base + "/readyz")[1]["checks"].get("kafka") is True, 60, "the broker check", proc, log)
        time.sleep(4)
        assert proc.poll() is None, log.read_text()[-4000:]
        assert log.read_text().count("waiting for redis") == 1, log.read_text()[-4000:]
        assert get(base + "/tasks/x")[0] == 503  # the rest of the API waits too

        redis_server = local.start_redis(tmp_path / "redis", port)
        until(lambda: get(base + "/readyz")[0] == 200, 90, "/readyz to answer 200", proc, log)
        text = log.read_text()
        assert text.count("redis reachable again after") == 1, text[-4000:]

        task_id = f"t-{uuid.uuid4().hex[:8]}"
        produce(kafka_bootstrap, s.kafka.input_topic, [(task_id.encode(), classify(task_id))])
        results = succeeded(read_topic(kafka_bootstrap, s.kafka.results_topic, expect=1, timeout_s=90))
        assert [m.key for m in results] == [task_id.encode()]
        assert fake_llm.calls_for(task_id) == 1
        assert stop(proc) == 0, log.read_text()[-4000:]
    finally:
        stop(proc)
        if redis_server is not None:
            redis_server.stop()


def test_create_topics_false_waits_for_the_topics_and_never_creates_them(
    make_settings: Any, fake_llm: FakeLLM, kafka_bootstrap: str, tmp_path: Path,
) -> None:
    s: Settings = make_settings(kafka={"create_topics": False}, http={"enabled": True, "port": local.free_port()},
                                worker_id=None, liveness={"retry_max_s": 1.0})
    base = f"http://127.0.0.1:{s.http.port}"
    log = tmp_path / "service.log"
    proc = spawn_worker(s, str(log))
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    wanted = {s.kafka.input_topic, s.kafka.results_topic, s.kafka.dlq_topic, s.kafka.audit_topic,
              s.kafka.approvals_topic}
    try:
        until(lambda: (get(base + "/readyz")[1] or {}).get("checks", {}).get("kafka") is True, 60,
              "the broker check", proc, log)
        status, body = get(base + "/readyz")
        assert status == 503 and body["checks"]["topics"] is False and body["checks"]["redis"] is True
        time.sleep(3)
        assert not wanted & set(admin.list_topics(timeout=10).topics), "a topic was created"
        assert log.read_text().count("waiting for topics") == 1, log.read_text()[-4000:]

        assert ensure_topics(s, create=True) == []  # an operator creates them: the service starts
        until(lambda: get(base + "/readyz")[0] == 200, 90, "/readyz to answer 200", proc, log)
        task_id = f"t-{uuid.uuid4().hex[:8]}"
        produce(kafka_bootstrap, s.kafka.input_topic, [(task_id.encode(), classify(task_id))])
        assert [m.key for m in succeeded(read_topic(kafka_bootstrap, s.kafka.results_topic, expect=1, timeout_s=90))] == [
            task_id.encode()]
        assert stop(proc) == 0, log.read_text()[-4000:]
    finally:
        stop(proc)


def test_ensure_topics_follows_create_topics(make_settings: Any) -> None:
    s: Settings = make_settings(kafka={"create_topics": False})
    admin = AdminClient({"bootstrap.servers": s.kafka.bootstrap_servers})
    missing = ensure_topics(s)
    assert set(missing) == {s.kafka.input_topic, s.kafka.results_topic, s.kafka.dlq_topic, s.kafka.audit_topic,
                            s.kafka.approvals_topic}
    assert not set(missing) & set(admin.list_topics(timeout=10).topics)
    assert ensure_topics(s, create=True) == []
    assert set(missing) <= set(admin.list_topics(timeout=10).topics)


@pytest.mark.kafka_only
def test_a_service_started_while_the_broker_is_down_waits_unready_and_starts_when_it_comes(
    make_settings: Any, fake_llm: FakeLLM, tmp_path: Path,
) -> None:
    from service.devtools import kraft

    node = kraft.start_kafka(tmp_path / "kafka")  # started once for its ports and data, then stopped
    proc: subprocess.Popen[bytes] | None = None
    try:
        node.kill()
        s: Settings = make_settings(kafka={"bootstrap_servers": node.address},
                                    http={"enabled": True, "port": local.free_port()}, worker_id=None,
                                    liveness={"retry_max_s": 1.0})
        base = f"http://127.0.0.1:{s.http.port}"
        log = tmp_path / "service.log"
        proc = spawn_worker(s, str(log))
        until(lambda: (get(base + "/readyz")[1] or {}).get("checks", {}).get("redis") is True, 60,
              "the Redis check", proc, log)
        status, body = get(base + "/readyz")
        assert status == 503 and body["checks"]["kafka"] is False and body["checks"]["redis"] is True
        assert get(base + "/healthz")[0] == 200
        time.sleep(4)
        assert proc.poll() is None, log.read_text()[-4000:]
        assert log.read_text().count("waiting for kafka") == 1, log.read_text()[-4000:]

        node.start(90)  # the same port
        until(lambda: get(base + "/readyz")[0] == 200, 120, "/readyz to answer 200", proc, log)
        assert log.read_text().count("kafka reachable again after") == 1
        task_id = f"t-{uuid.uuid4().hex[:8]}"
        produce(node.address, s.kafka.input_topic, [(task_id.encode(), classify(task_id))])
        assert [m.key for m in succeeded(read_topic(node.address, s.kafka.results_topic, expect=1, timeout_s=90))] == [
            task_id.encode()]
        assert stop(proc) == 0, log.read_text()[-4000:]
    finally:
        if proc is not None:
            stop(proc)
        node.stop()
