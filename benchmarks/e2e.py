"""``e2e``: tasks/s through the whole service with a zero-latency fake model, next to a raw pipe.

All tasks are produced first. The service is then started as a user runs it (``agent-service run``
in a child process, watched through its ``/metrics``) and timed from the first record it consumed
until every task succeeded (result in the ledger, result event acknowledged, marked published).
Two baselines from the same run: the fake model's own ceiling on this machine (the same requests
sent over raw keep-alive HTTP with no service in the way; target: the service at half of it), and
a raw confluent-kafka pipe over the same records on the same broker (one consumer and one
idempotent producer, no Redis and no model), timed from its first record too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer

from benchmarks.child import ChildService
from benchmarks.env import Env, FakeModel, assignment_strategy, progress, task_records
from benchmarks.inproc import CpuMeter
from benchmarks.report import Figure
from service.devtools import local

BENCH = "e2e"
PARTITIONS = 6


def pipe(env: Env, topic: str, out_topic: str, n: int, group: str) -> tuple[float, float]:
    """Consume ``n`` records and produce each to ``out_topic``; (seconds to the last delivery
    report, seconds to the first record)."""
    started = time.monotonic()
    consumer = Consumer({
        "bootstrap.servers": env.bootstrap, "group.id": group, "auto.offset.reset": "earliest",
        "enable.auto.commit": False, "session.timeout.ms": 6000, "heartbeat.interval.ms": 500,
        "partition.assignment.strategy": assignment_strategy(env.broker_kind),
    })
    producer = Producer({"bootstrap.servers": env.bootstrap, "enable.idempotence": True, "acks": "all",
                         "linger.ms": 5, "compression.type": "lz4"})
    acked = [0]
    failed = [0]
    last_ack = [0.0]  # when the latest delivery report was served: the end, as exact as the service's

    def delivered(err: Any, _msg: Any) -> None:
        if err is None:
            acked[0] += 1
            last_ack[0] = time.monotonic()
        else:
            failed[0] += 1

    consumer.subscribe([topic])
    first: float | None = None
    next_commit = time.monotonic() + 1.0
    deadline = time.monotonic() + 600
    try:
        while acked[0] < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"pipe stalled at {acked[0]}/{n}")
            for msg in consumer.consume(500, 0.05):
                if msg.error():
                    continue
                if first is None:
                    first = time.monotonic()
                while True:
                    try:
                        producer.produce(out_topic, msg.value(), msg.key(), on_delivery=delivered)
                        break
                    except BufferError:
                        producer.poll(0.01)
            producer.poll(0)
            if time.monotonic() >= next_commit:
                consumer.commit(asynchronous=True)
                next_commit = time.monotonic() + 1.0
            if failed[0]:
                raise RuntimeError(f"pipe: {failed[0]} records not delivered")
        elapsed = last_ack[0] - started
        with contextlib.suppress(KafkaException):  # nothing new since the last commit
            consumer.commit(asynchronous=False)
    finally:
        consumer.close()
        producer.flush(30)
    return elapsed, (first or started) - started


async def _fake_ceiling(fake: FakeModel, total: int, connections: int) -> float:
    """Requests/s the fake model answers over raw keep-alive HTTP/1.1 (no client library)."""
    from service.agents.base import Previous
    from service.agents.registry import default_agents

    agent = default_agents().get("classify")
    step = agent.steps[0]
    task_input = agent.parse_input({"text": "parcel arrived broken", "labels": ["complaint", "praise"]})
    body = json.dumps({
        "model": "fake", "messages": step.messages(task_input, Previous()), "temperature": 0.7, "max_tokens": 512,
        "response_format": {"type": "json_object", "schema": step.schema(task_input, Previous())},
    }).encode()
    host, port = fake.base_url.split("//")[1].split("/")[0].split(":")
    per_conn = max(1, total // connections)

    async def client(c: int) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for i in range(per_conn):
                head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                        f"Idempotency-Key: ceiling-{c}-{i}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
                writer.write(head + body)
                await writer.drain()
                headers = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in headers.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))
                await reader.readexactly(length)
        finally:
            writer.close()

    started = time.monotonic()
    await asyncio.gather(*(client(c) for c in range(connections)))
    return per_conn * connections / (time.monotonic() - started)


def run(env: Env, quick: bool) -> list[Figure]:
    n = 10_000 if quick else 100_000
    names = env.names(BENCH)
    fake = env.fake_model(0.0)
    settings = env.settings(names, fake.base_url, partitions=PARTITIONS)
    figures: list[Figure] = []
    try:
        from service.runtime.wiring import ensure_topics

        ensure_topics(settings)
        pipe_out = f"{names.input_topic}.pipe"
        env.create_topics([pipe_out], PARTITIONS)
        env.wait_for_topics([names.input_topic, names.results_topic, names.dlq_topic])
        progress(f"e2e: producing {n:,} tasks to {PARTITIONS} partitions")
        env.produce(names.input_topic, task_records(names.run, n), what="tasks")

        progress("e2e: raw consume->produce pipe")
        pipe_s, pipe_join = pipe(env, names.input_topic, pipe_out, n, f"{names.group}-pipe")
        pipe_rate = n / (pipe_s - pipe_join)
        progress(f"  pipe: {n:,} in {pipe_s - pipe_join:.2f}s from the first record = {pipe_rate:,.0f}/s")
        figures.append(Figure(BENCH, "raw pipe (consume->produce)", pipe_rate, "rec/s",
                              detail=f"{n:,} records in {pipe_s - pipe_join:.2f}s from the first record "
                                     f"({pipe_join:.2f}s group join before); one consumer, one idempotent "
                                     "producer, no Redis, no model"))

        progress("e2e: fake model ceiling over raw HTTP")
        ceiling = asyncio.run(_fake_ceiling(fake, 4_000 if quick else 10_000, 32))
        fake.reset()
        figures.append(Figure(BENCH, "fake model alone (raw HTTP)", ceiling, "req/s",
                              detail="32 keep-alive connections, no service: an upper bound for any "
                                     "figure that calls the fake model on this machine"))

        rate, detail = _service_pass(env, settings, fake, n, "the service")
        figures.append(Figure(BENCH, "service end to end", rate, "tasks/s", baseline=f"fake model {ceiling:,.0f}/s",
                              target=(">=", ceiling / 2), detail=detail))
        figures.append(Figure(BENCH, "service / fake model alone", 100 * rate / ceiling, "%",
                              baseline=f"fake model {ceiling:,.0f}/s", target=(">=", 50.0),
                              detail="the ceiling when the service, the model, the broker and Redis share two cores"))
        figures.append(Figure(BENCH, "service / pipe", 100 * rate / pipe_rate, "%",
                              baseline=f"pipe {pipe_rate:,.0f}/s", target=(">=", 50.0)))
        figures.append(_transactional_pass(env, fake, n, rate))
        figures.append(_cluster_pass(env, fake, n, rate))
    finally:
        env.release(fake)
    return figures


def _service_pass(env: Env, settings: Any, fake: FakeModel, n: int, what: str,
                  redis_pids: dict[str, int | list[int] | None] | None = None) -> tuple[float, str]:
    """``agent-service run`` in a child process over the ``n`` tasks waiting in its input topic: its
    rate from the first record consumed to the last outcome (as the pipe's), and a detail line."""
    progress(f"e2e: {what} on {n:,} tasks (agent-service run)")
    settings = settings.model_copy(update={
        "http": settings.http.model_copy(update={"enabled": True, "host": "127.0.0.1", "port": local.free_port()}),
    })
    others = {"fake model": fake.proc.pid, "broker": env.broker.proc.pid if env.broker else None,
              **(redis_pids or {"redis": env.redis.proc.pid if env.redis else None})}
    log = env.dir / f"e2e-{settings.kafka.group_id}.log"
    with ChildService(settings, log) as svc:
        meter = CpuMeter({"service": svc.pid, **others})
        watch = svc.wait(lambda c: c["succeeded"] + c["dead_lettered"] >= n, total=n, on_first=meter.start)
        meter.stop()
    rate = n / watch.processing_s
    results = env.count(settings.kafka.results_topic)
    dlq = env.count(settings.kafka.dlq_topic)
    stats = fake.stats()
    fake.reset()
    progress(f"  {what}: {n:,} in {watch.processing_s:.2f}s = {rate:,.0f}/s")
    join = watch.first - watch.started if watch.first is not None else float("nan")
    return rate, (f"{n:,} tasks in {watch.processing_s:.2f}s from the first record ({join:.2f}s start and group "
                  f"join before); {watch.counts['succeeded']:,.0f} succeeded, {results:,} result events, {dlq} dead "
                  f"letters, {stats['requests']:,} model calls; {meter.per_item_ms(n)}")


def _transactional_pass(env: Env, fake: FakeModel, n: int, default_rate: float) -> Figure:
    """The same workload with ``AGENT_KAFKA__TRANSACTIONAL=true`` (its own topics, group and ledger),
    beside the default's rate from this run. Apache Kafka only: the stand-ins' transactions are partial."""
    name = "service end to end, transactions on"
    baseline = f"default {default_rate:,.0f}/s"
    if env.broker_kind != "kafka":
        return Figure(BENCH, name, None, "tasks/s", baseline=baseline, unavailable=True,
                      error="needs --broker kafka")
    names = env.names(f"{BENCH}tx")
    settings = env.settings(names, fake.base_url, partitions=PARTITIONS,
                            kafka={"transactional": True, "transactional_id": f"bench-{names.run}"})
    from service.runtime.wiring import ensure_topics

    ensure_topics(settings)
    env.wait_for_topics([names.input_topic, names.results_topic, names.dlq_topic])
    env.produce(names.input_topic, task_records(names.run, n), what="tasks")
    rate, detail = _service_pass(env, settings, fake, n, "the service, transactions on")
    return Figure(BENCH, name, rate, "tasks/s", baseline=baseline,
                  detail=f"{100 * rate / default_rate:.0f}% of the default; {detail}")


def _cluster_pass(env: Env, fake: FakeModel, n: int, default_rate: float) -> Figure:
    """The same workload with the ledger on a Redis Cluster (three primaries, a replica each, on this
    machine) through redis-py's cluster client, beside the default's one redis-server from this run."""
    from service.devtools import local
    from service.runtime.wiring import ensure_topics

    names = env.names(f"{BENCH}rc")
    progress("e2e: starting a Redis Cluster (3 primaries, 3 replicas)")
    cluster = local.start_redis_cluster(env.dir / f"redis-cluster-{names.run}")
    try:
        settings = env.settings(names, fake.base_url, partitions=PARTITIONS, redis={"url": cluster.url})
        ensure_topics(settings)
        env.wait_for_topics([names.input_topic, names.results_topic, names.dlq_topic])
        env.produce(names.input_topic, task_records(names.run, n), what="tasks")
        rate, detail = _service_pass(env, settings, fake, n, "the service, ledger on a Redis Cluster",
                                     {"redis cluster (6 nodes)": [node.proc.pid for node in cluster.nodes]})
    finally:
        cluster.stop()
    return Figure(BENCH, "service end to end, Redis Cluster", rate, "tasks/s",
                  baseline=f"one redis-server {default_rate:,.0f}/s",
                  detail=f"{100 * rate / default_rate:.0f}% of one server; {detail}")
