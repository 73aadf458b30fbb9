"""Helpers shared by the integration and chaos tests: produce, read topics back, run a service."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from service.core.settings import Settings, to_env
from service.devtools import local, processes
from service.runtime.wiring import Service, build, ensure_topics


@dataclass
class Broker:
    name: str
    bootstrap: str
    server: local.Server | None

    @property
    def assignment_strategy(self) -> str:
        # noida-db never hands cooperatively revoked partitions over (see BROKERS.md)
        return "roundrobin" if self.name == "noida" else "cooperative-sticky"


@dataclass
class Msg:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    timestamp_ms: int | None = None  # the record's timestamp (the producer's create time), when it has one

    def json(self) -> Any:
        assert self.value is not None
        return json.loads(self.value)


def task_value(kind: str, task_input: dict[str, Any], task_id: str | None = None, **extra: Any) -> bytes:
    body: dict[str, Any] = {"kind": kind, "input": task_input, **extra}
    if task_id is not None:
        body["task_id"] = task_id
    return json.dumps(body).encode()


def classify(task_id: str | None, text: str = "the parcel arrived broken", **extra: Any) -> bytes:
    return task_value("classify", {"text": text, "labels": ["complaint", "praise", "question"]}, task_id, **extra)


def produce(bootstrap: str, topic: str, records: Iterable[tuple[bytes | None, bytes | None] | tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]], partition: int | None = None) -> int:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 5})
    n = 0
    for rec in records:
        key, value = rec[0], rec[1]
        headers = rec[2] if len(rec) > 2 else None  # type: ignore[misc]
        kwargs: dict[str, Any] = {"key": key, "value": value, "headers": headers}
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                producer.produce(topic, **kwargs)
                break
            except BufferError:
                producer.poll(0.1)
        n += 1
    remaining = producer.flush(30)
    assert remaining == 0, f"{remaining} records not delivered"
    return n


def read_topic(bootstrap: str, topic: str, *, expect: int | None = None, timeout_s: float = 30.0,
               idle_s: float = 1.5, isolation: str = "read_committed") -> list[Msg]:
    """Read a topic from the beginning with a throwaway group.

    Returns once ``expect`` records arrived and then nothing more for ``idle_s`` (so extras are
    seen too), or when ``timeout_s`` passes. ``isolation="read_uncommitted"`` sees the records of
    aborted transactions too (librdkafka's default, used otherwise, does not).
    """
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
        "auto.offset.reset": "earliest", "enable.auto.commit": False,
        "session.timeout.ms": 6000, "heartbeat.interval.ms": 500, "isolation.level": isolation,
    })
    consumer.subscribe([topic])
    out: list[Msg] = []
    deadline = time.monotonic() + timeout_s
    last = time.monotonic()
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            now = time.monotonic()
            if msg is None:
                if expect is not None and len(out) >= expect and now - last >= idle_s:
                    break
                if expect is None and out and now - last >= idle_s:
                    break
                continue
            if msg.error():
                continue
            last = now
            kind, stamp = msg.timestamp()
            out.append(Msg(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(),
                           dict(msg.headers() or []), stamp if kind != TIMESTAMP_NOT_AVAILABLE else None))
    finally:
        consumer.close()
    return out


def outcome_of(m: Msg) -> str:
    """A results event's outcome (``succeeded`` or ``failed``)."""
    body = json.loads(m.value or b"{}")
    return str(body.get("outcome", "succeeded"))


def succeeded(messages: list[Msg]) -> list[Msg]:
    """The ``succeeded`` events of the results topic (a task that failed has a ``failed`` one)."""
    return [m for m in messages if outcome_of(m) == "succeeded"]


def failed(messages: list[Msg]) -> list[Msg]:
    """The ``failed`` events of the results topic, each naming its task's dead letter."""
    return [m for m in messages if outcome_of(m) == "failed"]


def assert_one_result_each(bootstrap: str, topic: str, task_ids: list[str], model_calls: dict[str, int],
                           kind: str = "classify") -> list[Msg]:
    """Every task has a result on ``topic``, none has two different ones, and none ran the model twice.

    A re-emission of the same bytes (after a crash, before the offset was committed) is allowed.
    """
    results = succeeded(read_topic(bootstrap, topic, expect=len(task_ids), timeout_s=90))
    by_key: dict[bytes | None, set[bytes | None]] = defaultdict(set)
    for m in results:
        by_key[m.key].add(m.value)
    assert {k.decode() for k in by_key if k is not None} == set(task_ids), "a task has no result"
    assert all(len(v) == 1 for v in by_key.values()), "a task has two different results"
    assert all(model_calls.get(f"{t}:{kind}") == 1 for t in task_ids), "a task ran the model twice"
    return results


# what a broker answers while the group's coordinator loads or moves (a new group on a cluster, a
# broker restarted or killed): asked again, it answers
COORDINATOR_MOVING = frozenset({KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                                KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError.REQUEST_TIMED_OUT,
                                KafkaError._TIMED_OUT, KafkaError._TRANSPORT, KafkaError._WAIT_COORD})


def committed(bootstrap: str, group: str, topic: str, partitions: int, timeout_s: float = 60.0) -> dict[int, int]:
    """The group's committed offsets. Read uncommitted: a read_committed fetch asks for stable
    offsets and waits out a transaction in flight, which a poll of a transactional group hits.
    Asked again while the coordinator loads or moves, for up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                             "isolation.level": "read_uncommitted"})
        try:
            tps = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
            return {tp.partition: tp.offset for tp in tps}
        except KafkaException as exc:
            error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            if error is None or error.code() not in COORDINATOR_MOVING or time.monotonic() > deadline:
                raise
        finally:
            consumer.close()
        time.sleep(0.5)


async def wait_for(predicate: Any, timeout_s: float = 30.0, interval_s: float = 0.05, what: str = "condition",
                   service: Service | None = None) -> None:
    """Poll ``predicate`` until true; on a timeout the error says where ``service`` (if given) stands."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        await asyncio.sleep(interval_s)
    state = f"; {describe(service)}" if service is not None else ""
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}{state}")


def describe(service: Service) -> str:
    """Where a running service stands: what a stalled test needs to say which part stopped."""
    runner = service.runner
    samples = {s.name + (str(sorted(s.labels.items())) if s.labels else ""): s.value
               for family in service.metrics.registry.collect() for s in family.samples
               if s.name.startswith(("agent_tasks_total", "agent_inflight", "agent_paused", "agent_assigned",
                                     "agent_consumer_lag", "agent_llm_requests_total", "agent_results_published"))
               and s.value}
    return (f"assignment {sorted(runner.assignment)}, stopping {runner.stopping}, retrying {runner.retrying}, "
            f"gated {runner.gated}, last error {runner.last_error!r}, metrics {samples}")


@contextlib.asynccontextmanager
async def running(settings: Settings, llm_base_url: str, **kwargs: Any) -> AsyncIterator[Service]:
    """Build a service, start its consumer, wait for an assignment; drain and close on exit."""
    await asyncio.to_thread(ensure_topics, settings)
    service = build(settings, llm_base_url=llm_base_url, **kwargs)
    try:
        await service.preflight()
    except BaseException:
        await service.aclose()
        raise
    task = asyncio.create_task(service.runner.run())
    try:
        await wait_for(lambda: service.runner.assignment or task.done(), 60, what="partition assignment")
        if task.done():
            task.result()
        yield service
    finally:
        service.runner.stop()
        await asyncio.wait_for(task, 60)
        await service.aclose()


def metric(service: Service, name: str, labels: dict[str, str] | None = None) -> float:
    value = service.metrics.registry.get_sample_value(name, labels or {})
    return float(value or 0.0)


def settings_env(settings: Settings) -> dict[str, str]:
    """The ``AGENT_*`` environment that rebuilds ``settings`` in another process."""
    return to_env(settings)


# Every worker a test spawns, so that each is waited for whatever path the test took: the fixture
# ``_reap_children_after_each_test`` (tests/conftest.py) ends those a test left running.
children = processes.Children(grace_s=30.0, group=True)


def kill_worker(worker: Any) -> None:
    """SIGKILL a worker from :func:`spawn_worker` (its whole process group) and reap it."""
    children.kill(worker)


def stop_workers(workers: list[Any], grace_s: float = 30.0) -> None:
    """SIGTERM every worker from :func:`spawn_worker` at once, give them ``grace_s`` to drain, SIGKILL
    the rest; every one is reaped, even when one of them could not be."""
    children.stop_all(workers, grace_s)


def spawn_worker(settings: Settings, log_path: str, *extra: str) -> Any:
    """``agent-service run`` in a child process of its own (its own process group), tracked in
    :data:`children` until :func:`kill_worker` or :func:`stop_workers` reaps it."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_")}
    env.update(settings_env(settings))
    with open(log_path, "ab") as out:
        return children.popen([sys.executable, "-m", "service.cli", "run", *extra], env=env, stdout=out,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
