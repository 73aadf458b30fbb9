"""The servers and helpers every benchmark shares.

One local broker and one redis-server for the whole run, started with :mod:`service.devtools.local`; the
fake model runs in a child process of its own (``python -m service.devtools.fakellm``) so that answering
requests does not compete with the service under test for the interpreter lock. Every benchmark
asks for its own topics, group and ledger prefix with :meth:`Env.names`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from service.core.settings import Settings, to_env
from service.devtools import kraft, local, processes

REPO = Path(__file__).resolve().parent.parent


def progress(message: str) -> None:
    """One line of progress on stderr (the table goes to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def assignment_strategy(broker: str) -> str:
    # noida-db never hands cooperatively revoked partitions over: use an eager protocol there
    return "roundrobin" if broker == "noida" else "cooperative-sticky"


@dataclass(frozen=True)
class Names:
    run: str
    input_topic: str
    results_topic: str
    dlq_topic: str
    group: str
    prefix: str


class FakeModel:
    """``python -m service.devtools.fakellm`` in a child process, steered over its control endpoints."""

    def __init__(self, log_dir: Path, latency_s: float = 0.0) -> None:
        port = local.free_port()
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self._root = f"http://127.0.0.1:{port}"
        self._log = open(log_dir / f"fakellm-{port}.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.devtools.fakellm", "--host", "127.0.0.1", "--port", str(port),
             "--latency-s", str(latency_s)],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            local.wait_for_port(port, 30, self.proc)
        except BaseException:
            processes.kill(self.proc)
            self._log.close()
            raise

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self._root + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict[str, Any]:
        """Requests and completions so far (``by_key`` maps are left out: they can be large)."""
        data = self._request("GET", "/_stats")
        return {k: v for k, v in data.items() if k not in ("by_key", "completions_by_key")}

    def reset(self) -> None:
        self._request("POST", "/_reset", {})

    def set_latency(self, latency_s: float) -> None:
        self._request("POST", "/_latency", {"latency_s": latency_s})

    def configure(self, **values: Any) -> None:
        """Change the server's configuration (``/_config``), e.g. ``max_concurrency=200``."""
        self._request("POST", "/_config", values)

    def stop(self) -> None:
        try:
            processes.stop(self.proc, grace_s=10)
        finally:
            self._log.close()


class Env:
    """The broker, redis-server and scratch directory of one benchmark run."""

    def __init__(self, broker: str, work_dir: Path | None = None) -> None:
        self.broker_kind = broker
        self._stack = contextlib.ExitStack()
        if work_dir is None:
            work_dir = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="agent-bench-")))
        self.dir = work_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.broker: local.Server | None = None
        self.redis: local.Server | None = None
        self._fakes: list[FakeModel] = []
        self.tasks: int | None = None  # --tasks: the count of the benchmarks that take one
        self.rounds = 1  # --rounds: how many times the naive and cold_burst benchmarks run their passes

    def __enter__(self) -> Env:
        try:
            progress(f"starting {self.broker_kind} broker and redis-server in {self.dir}")
            self.broker = (kraft.start_kafka(self.dir / "kafka") if self.broker_kind == "kafka"
                           else local.start_broker(self.broker_kind, self.dir / self.broker_kind))
            self._stack.callback(self.broker.stop)
            self.redis = local.start_redis(self.dir / "redis")
            self._stack.callback(self.redis.stop)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for fake in self._fakes:
            fake.stop()
        self._stack.close()

    # ------------------------------------------------------------------ addresses and names

    @property
    def bootstrap(self) -> str:
        assert self.broker is not None
        return self.broker.address

    @property
    def redis_url(self) -> str:
        assert self.redis is not None
        return f"redis://{self.redis.address}/0"

    def names(self, bench: str) -> Names:
        run = f"{bench.replace('_', '')[:10]}-{uuid.uuid4().hex[:8]}"
        return Names(run, f"b-{run}.tasks", f"b-{run}.results", f"b-{run}.dlq", f"g-{run}",
                     f"b{run.replace('-', '')}"[:32])

    def settings(self, names: Names, llm_base_url: str, *, partitions: int = 6,
                 **overrides: Any) -> Settings:
        """Settings as the integration tests make them, with the HTTP server off."""
        kafka: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "group_id": names.group,
            "input_topic": names.input_topic,
            "results_topic": names.results_topic,
            "dlq_topic": names.dlq_topic,
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 500,
            "topic_partitions": partitions,
            "partition_assignment_strategy": assignment_strategy(self.broker_kind),
            **overrides.pop("kafka", {}),
        }
        values: dict[str, Any] = {
            "kafka": kafka,
            "redis": {"url": self.redis_url, "key_prefix": names.prefix, **overrides.pop("redis", {})},
            "llm": {"base_url": llm_base_url, "model": "fake", "timeout_s": 30, "max_attempts": 4,
                    "backoff_base_s": 0.05, "backoff_max_s": 0.5, **overrides.pop("llm", {})},
            "ledger": {"lease_ms": 30_000, **overrides.pop("ledger", {})},
            "http": {"enabled": False},
            "log_level": "WARNING",
            "worker_id": f"bench-{names.run}",
            **overrides,
        }
        return Settings(**values)

    def fake_model(self, latency_s: float = 0.0) -> FakeModel:
        fake = FakeModel(self.dir, latency_s)
        self._fakes.append(fake)
        return fake

    def release(self, fake: FakeModel) -> None:
        fake.stop()
        with contextlib.suppress(ValueError):
            self._fakes.remove(fake)

    # ------------------------------------------------------------------ topics and records

    def create_topics(self, topics: Iterable[str], partitions: int) -> None:
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        futures = admin.create_topics([NewTopic(t, num_partitions=partitions, replication_factor=1)
                                       for t in topics], operation_timeout=30)
        for future in futures.values():
            try:
                future.result(30)
            except KafkaException as exc:
                if "exist" not in str(exc).lower():
                    raise
        self.wait_for_topics(list(topics))

    def wait_for_topics(self, topics: list[str], timeout_s: float = 30.0) -> None:
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        deadline = time.monotonic() + timeout_s
        while True:
            meta = admin.list_topics(timeout=10)
            if all(t in meta.topics and not meta.topics[t].error and meta.topics[t].partitions
                   for t in topics):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"topics {topics} not ready after {timeout_s}s")
            time.sleep(0.1)

    def produce(self, topic: str, records: Iterable[tuple[bytes | None, bytes]],
                partition: int | None = None, what: str = "records") -> int:
        """A fast idempotent producer (acks=all, 20 ms linger, large batches, lz4)."""
        producer = Producer({
            "bootstrap.servers": self.bootstrap, "enable.idempotence": True, "acks": "all",
            "linger.ms": 20, "batch.size": 1_000_000, "batch.num.messages": 10_000,
            "compression.type": "lz4", "queue.buffering.max.messages": 1_000_000,
            "queue.buffering.max.kbytes": 1_048_576, "message.timeout.ms": 300_000,
        })
        failed = [0]

        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                failed[0] += 1

        n = 0
        started = last = time.monotonic()
        extra: dict[str, Any] = {} if partition is None else {"partition": partition}
        for key, value in records:
            while True:
                try:
                    producer.produce(topic, value, key, on_delivery=delivered, **extra)
                    break
                except BufferError:
                    producer.poll(0.05)
            n += 1
            if n % 10_000 == 0:
                producer.poll(0)
                now = time.monotonic()
                if now - last > 10:
                    progress(f"  produced {n:,} {what}")
                    last = now
        remaining = producer.flush(300)
        if remaining or failed[0]:
            raise RuntimeError(f"{remaining + failed[0]} of {n} {what} not delivered to {topic}")
        elapsed = time.monotonic() - started
        progress(f"  produced {n:,} {what} to {topic} in {elapsed:.1f}s ({n / max(elapsed, 1e-9):,.0f}/s)")
        return n

    def partitions(self, topic: str) -> list[int]:
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        return sorted(admin.list_topics(topic, timeout=10).topics[topic].partitions)

    def reader(self, topic: str) -> Consumer:
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"count-{uuid.uuid4().hex}",
                             "enable.auto.commit": False, "enable.partition.eof": True})
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in self.partitions(topic)])
        return consumer

    def count(self, topic: str, timeout_s: float = 300.0) -> int:
        """Records in a topic, read from the beginning to the end of every partition.

        Read rather than taken from the high watermarks: not every local broker numbers
        records one by one in its offset answers.
        """
        consumer = self.reader(topic)
        n, at_end = 0, set[int]()
        want = len(consumer.assignment())
        deadline = time.monotonic() + timeout_s
        try:
            while len(at_end) < want:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"could not read {topic} to its end in {timeout_s}s")
                for msg in consumer.consume(10_000, 0.5):
                    err = msg.error()
                    if err is None:
                        n += 1
                    elif err.code() == KafkaError._PARTITION_EOF:
                        at_end.add(msg.partition() or 0)
        finally:
            consumer.close()
        return n


class LiveCount:
    """Counts the records arriving on a topic, in a thread, from its beginning."""

    def __init__(self, env: Env, topic: str) -> None:
        self._consumer = env.reader(topic)
        self.n = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"count-{topic}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for msg in self._consumer.consume(10_000, 0.2):
                if msg.error() is None:
                    self.n += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(60)  # one consume() of at most 0.2 s after the flag
        if self._thread.is_alive():
            raise RuntimeError(f"{self._thread.name} did not stop; its consumer is left open")
        self._consumer.close()


def task_record(task_id: str, text: str | None = None) -> tuple[bytes, bytes]:
    """A small ``classify`` task keyed by its id, as producers send them."""
    body = {
        "task_id": task_id,
        "kind": "classify",
        "input": {"text": text or f"parcel {task_id} arrived broken", "labels": ["complaint", "praise"]},
    }
    return task_id.encode(), json.dumps(body, separators=(",", ":")).encode()


def task_records(prefix: str, n: int) -> Iterator[tuple[bytes, bytes]]:
    for i in range(n):
        yield task_record(f"{prefix}-{i}")


def child_env(settings: Settings) -> dict[str, str]:
    """The environment of a ``python -m service.cli run`` child that rebuilds ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_")}
    env.update(to_env(settings))
    return env
