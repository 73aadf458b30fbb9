"""``agent-service demo``: the whole pipeline on embedded servers, in one command.

Starts a local broker, redis-server and the embedded model (or the fake one with ``--fake-llm``),
runs the service, produces sample tasks (every one of them twice, as a redelivery would, plus a
poison record and a conflicting one) and prints what happened: model calls, results, duplicates
skipped and dead letters, read back from the topics and the ledger.

Two of the tasks are of the kind ``support_ticket``, an agent that acts: it files tickets in a fake
ticketing API (:mod:`service.devtools.downstream`) through a tool. A ticket with a refund above
the threshold parks for approval; the demo approves it, as an operator would, and shows that every
ticket was filed once however often its task was delivered.

One task is of the kind ``review_panel``, which delegates: it hands a document to three kinds of
their own (research, summary, critique), each a child task with its own id, waits for them parked,
and writes the review from their outputs in declared order; the demo prints the tree.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer
from pydantic import SecretStr

from service.core.settings import Settings
from service.devtools import local
from service.devtools.embedded import start_embedded, with_local_model
from service.runtime.wiring import build, ensure_topics, install_signal_handlers

SAMPLES: list[dict[str, Any]] = [
    {"kind": "classify", "input": {"text": "The parcel arrived crushed and two cups were broken.",
                                   "labels": ["complaint", "praise", "question"]}},
    {"kind": "classify", "input": {"text": "Thank you, the support team solved it in minutes!",
                                   "labels": ["complaint", "praise", "question"]}},
    {"kind": "classify", "input": {"text": "Do you ship to Norway?", "labels": ["complaint", "praise", "question"]}},
    {"kind": "extract", "input": {"document": "Invoice 2291 from Acme Ltd, due 2026-12-01, total 1,250.00 EUR.",
                                  "fields": ["invoice_number", "vendor", "due_date"]}},
    {"kind": "extract", "input": {"document": "Patient: Jane Roe, born 1980-04-02, seen by Dr. Liu.",
                                  "fields": ["patient_name", "doctor"]}},
    {"kind": "summarize", "input": {"text": "Kafka delivers each record at least once. A model answers "
                                            "differently each time. The service keys every task to its work, "
                                            "so a redelivery finds the stored result instead of a new answer.",
                                    "max_words": 25}},
    {"kind": "summarize", "input": {"text": "The meeting moved to Thursday at ten because the room was booked; "
                                            "bring the quarterly figures.", "max_words": 15}},
    {"kind": "classify", "input": {"text": "Where is my refund? It has been three weeks.",
                                   "labels": ["complaint", "praise", "question"]}},
]
TICKETS: list[dict[str, Any]] = [
    {"kind": "support_ticket", "task_id": "ticket-001",
     "input": {"customer": "Ada", "message": "My order 2291 arrived with two broken cups."}},
    {"kind": "support_ticket", "task_id": "ticket-002",
     "input": {"customer": "Grace", "message": "I was charged twice for order 2307; please refund 450 EUR."}},
]

TREE: list[dict[str, Any]] = [
    {"kind": "review_panel", "task_id": "panel-001",
     "input": {"document": "Our service reads tasks from Kafka and keys every task to its work in Redis, so a "
                           "task delivered twice is answered once. Agents may now hand parts of a task to other "
                           "agents and wait for them without holding a partition.",
               "audience": "an engineer new to the team"}},
]


def _tasks(n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        body = dict(SAMPLES[i % len(SAMPLES)])
        body["task_id"] = f"demo-{i + 1:03d}"
        out.append(body)
    return out


def _produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
    for key, value in records:
        producer.produce(topic, key=key, value=value)
    producer.flush(30)


def _read(bootstrap: str, topic: str, timeout_s: float = 5.0) -> list[Any]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"demo-reader-{time.time_ns()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    out: list[Any] = []
    idle_since = time.monotonic()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msg = consumer.poll(0.2)
        if msg is None:
            if out and time.monotonic() - idle_since > 1.0:
                break
            continue
        if not msg.error():
            out.append(msg)
            idle_since = time.monotonic()
    consumer.close()
    return out


def _sum(svc: Any, name: str, label: str, values: tuple[str, ...]) -> int:
    reg = svc.metrics.registry
    return int(sum(reg.get_sample_value(name, {label: v}) or 0 for v in values))


async def _approve_parked(svc: Any, settings: Settings, started: float, timeout_s: float) -> int:
    """Approve every parked task, as an operator would, and wait until each has its result."""
    from service.pipeline.base import utcnow
    from service.pipeline.parking import decide

    parked = [task_key for task_key, _ in await svc.ledger.effects.parked()]
    for task_key in parked:
        record = await svc.ledger.get(task_key)
        waiting = json.loads(record.fields.get("waiting", "{}")) if record is not None else {}
        print(f"  {task_key} waits for approval: {waiting.get('reason')}; approving it", flush=True)
        await decide(svc.ledger, svc.publisher.send, svc.metrics, utcnow(), task_key, "approved", by="demo",
                     reason="approved by the demo", audit_topic=settings.kafka.audit_topic)

    async def done() -> bool:
        records = [await svc.ledger.get(t) for t in parked]
        return all(r is not None and r.state in ("succeeded", "dead") for r in records)

    while parked and not await done() and time.monotonic() - started < timeout_s:
        await asyncio.sleep(0.2)
    return len(parked)


async def _show_trees(svc: Any, roots: list[str], started: float, timeout_s: float) -> None:
    """Wait for each delegating task to end, then print it with its children, in declared order."""
    from service.pipeline.tree import task_tree

    async def ended(task_key: str) -> bool:
        record = await svc.ledger.get(task_key)
        return record is not None and record.state in ("succeeded", "dead")

    for root in roots:
        while not await ended(root) and time.monotonic() - started < timeout_s:
            await asyncio.sleep(0.2)
        record = await svc.ledger.get(root)
        if record is None:
            continue
        tree = await task_tree(svc.ledger, root, record.fields)
        print(f"  {root} ({record.fields.get('kind')}): {record.state}, delegated to:", flush=True)
        for child in tree["children"]:
            print(f"    {child['id']:<22} {child['kind']:<16} {child['state']}", flush=True)


async def _run(settings: Settings, base_url: str, n: int, timeout_s: float,
               downstream: Any = None, keep: bool = False, console: str = "", login: str = "") -> int:
    svc = build(settings, llm_base_url=base_url)
    install_signal_handlers(svc)
    serving = asyncio.create_task(svc.run())
    k = settings.kafka
    while not svc.runner.assignment and not serving.done():
        await asyncio.sleep(0.1)
    tasks = _tasks(n) + TICKETS + TREE
    started, expected = await _produce_samples(settings, tasks)
    last = -1
    while _finished(svc) < expected and time.monotonic() - started < timeout_s and not serving.done():
        if _finished(svc) != last:
            last = _finished(svc)
            print(f"  {last}/{expected} records finished", flush=True)
        await asyncio.sleep(0.5)
    parked = await _approve_parked(svc, settings, started, timeout_s)
    await _show_trees(svc, [t["task_id"] for t in TREE], started, timeout_s)
    elapsed = time.monotonic() - started
    results = await asyncio.to_thread(_read, k.bootstrap_servers, k.results_topic)
    dead = await asyncio.to_thread(_read, k.bootstrap_servers, k.dlq_topic)
    _report(svc, len(tasks), expected, parked, elapsed, results, dead, downstream)
    unaccounted = expected + parked - _finished(svc)  # a parked task finishes twice: parked, then resumed
    if keep and not serving.done():
        print(f"\nthe service keeps running: look at it in the console, {console} ({login}); Ctrl-C stops it",
              flush=True)
    else:
        svc.runner.stop()
    await serving
    if not keep:
        print(f"\nconsole: {console} (served while the demo ran, {login}; run the demo at a terminal to keep "
              "it up afterwards, or `make run`)")
    if unaccounted > 0:
        print(f"\n{unaccounted} records were still in flight when the demo stopped (timeout {timeout_s:.0f}s)")
        return 1
    return 0


async def _produce_samples(settings: Settings, tasks: list[dict[str, Any]]) -> tuple[float, int]:
    """Produce every task twice (a redelivery), a poison record and a conflicting task; returns when
    the producing started and how many records were produced."""
    records = [(t["task_id"].encode(), json.dumps(t).encode()) for t in tasks]
    conflicting = dict(tasks[0], input={**tasks[0]["input"], "text": "A different text under the same task id."})
    extra = [(b"poison-1", b"{this is not json"), (conflicting["task_id"].encode(), json.dumps(conflicting).encode())]
    print(f"producing {len(tasks)} tasks ({len(TICKETS)} that file tickets, {len(TREE)} that delegates), each twice "
          "(a redelivery), one poison record and one conflicting task ...")
    started = time.monotonic()
    k = settings.kafka
    await asyncio.to_thread(_produce, k.bootstrap_servers, k.input_topic, records + records + extra)
    return started, 2 * len(tasks) + len(extra)


def _finished(svc: Any) -> int:
    """The records the service is done with, whatever their outcome."""
    return _sum(svc, "agent_tasks_total", "outcome", ("succeeded", "duplicate", "dead_lettered", "conflict", "parked"))


def _report(svc: Any, tasks: int, expected: int, parked: int, elapsed: float,
            results: list[Any], dead: list[Any], downstream: Any) -> None:
    """What happened: the counts from the service's metrics (and the fake ticketing API), then the
    results and dead letters read back from their topics."""
    from service.core.metrics import DLQ_REASONS, LLM_OUTCOMES

    reg = svc.metrics.registry

    def val(name: str, **labels: str) -> int:
        return int(reg.get_sample_value(name, labels) or 0)

    print()
    print(f"{'records produced':<28}{expected}")
    print(f"{'distinct tasks':<28}{tasks + 1}  (+1 poison)")
    print(f"{'LLM calls':<28}{_sum(svc, 'agent_llm_requests_total', 'outcome', LLM_OUTCOMES)}"
          f"  (retries {val('agent_retries_total')})")
    print(f"{'results published':<28}{len(results)}  "
          f"(failed {sum(json.loads(m.value()).get('outcome') == 'failed' for m in results)})")
    print(f"{'duplicates skipped':<28}{val('agent_tasks_total', outcome='duplicate')}")
    print(f"{'dead letters':<28}{len(dead)}  " + ", ".join(
        f"{r}={val('agent_dead_letters_total', reason=r)}" for r in DLQ_REASONS
        if val("agent_dead_letters_total", reason=r)))
    print(f"{'stale fence writes':<28}{val('agent_stale_fence_writes_total')}")
    if downstream is not None:
        effects = downstream.stats()["effects_by_key"]
        print(f"{'tool calls run':<28}{val('agent_tool_calls_total', tool='open_ticket', outcome='executed')}"
              f"  (parked for approval {parked}, approved by the demo)")
        print(f"{'tickets filed':<28}{len(effects)}  (each key once: {sorted(set(effects.values())) in ([1], [])})")
    print(f"{'wall time':<28}{elapsed:.1f}s")
    print("\nresults:")
    for m in results:
        body = json.loads(m.value())
        if body.get("outcome", "succeeded") == "failed":  # its dead letter is listed below
            letter = body.get("dead_letter") or {}
            print(f"  {body['task_id']:<18} {body.get('kind') or '-':<15} failed ({body['reason']}) "
                  f"attempts={body['attempts']} dead letter {letter.get('topic')}[{letter.get('partition')}]"
                  f"@{letter.get('offset')}")
            continue
        print(f"  {body['task_id']:<18} {body['kind']:<15} fence={body['fence']} attempts={body['attempts']} "
              f"{json.dumps(body['result'])[:90]}")
    print("\ndead letters:")
    for m in dead:
        h = {key: v.decode("utf-8", "replace") for key, v in (m.headers() or [])}
        print(f"  {h.get('dlq.task_id') or '-':<10} {h['dlq.reason']:<15} "
              f"from {h['dlq.original.topic']}[{h['dlq.original.partition']}]@{h['dlq.original.offset']}: "
              f"{h['dlq.error'][:70]}")


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def main(settings: Settings, args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir) if getattr(args, "data_dir", None) else local.default_data_dir() / "demo"
    with local.Embedded(data_dir / str(time.time_ns())) as emb:
        settings = start_embedded(settings, emb, broker=getattr(args, "broker", "noida"))
        base_url = settings.llm.base_url
        if getattr(args, "fake_llm", False):
            from service.devtools.fakellm import FakeLLM

            fake = FakeLLM(latency_s=0.05)
            emb.callback(fake.stop)
            base_url = fake.start()
            settings = settings.model_copy(update={"llm": settings.llm.model_copy(update={"model": "fake"})})
        elif base_url is None:
            print("starting the embedded model (SmolLM2-135M on llama.cpp) ...", flush=True)
            server = emb.start("llm", local.start_local_model(emb.data_dir / "llm", gguf=settings.llm.local_gguf))
            base_url = f"http://{server.address}/v1"
            settings = with_local_model(settings)
        from service.devtools.downstream import FakeDownstream

        downstream = FakeDownstream()
        emb.callback(downstream.stop)
        downstream.start()
        settings = settings.model_copy(update={"tools": settings.tools.model_copy(update={
            "tickets_url": downstream.base_url})})
        ensure_topics(settings)
        if not _port_free(settings.http.host, settings.http.port):
            http = settings.http.model_copy(update={"port": local.free_port()})
            settings = settings.model_copy(update={"http": http})
        print(f"broker {settings.kafka.bootstrap_servers}, redis {emb.servers['redis'].address}, model {base_url}, "
              f"ticketing API {downstream.base_url}")
        print(f"admin API and metrics on http://{settings.http.host}:{settings.http.port} while it runs")
        settings, login = _console_login(settings)
        print(f"console on {_console_url(settings)} while it runs ({login})")
        timeout = float(getattr(args, "timeout", 0) or 600)
        try:
            # at a terminal the service keeps serving the console once the demo is done, until Ctrl-C
            keep = sys.stdin.isatty() and sys.stdout.isatty()
            return asyncio.run(_run(settings, base_url, int(args.tasks), timeout, downstream, keep,
                                    _console_url(settings), login))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130


def _console_url(settings: Settings) -> str:
    return f"http://{settings.http.host}:{settings.http.port}/ui"


def _console_login(settings: Settings) -> tuple[Settings, str]:
    """The demo's settings with a token to log in to the console with, and how to log in. Without
    any token the console (like the API's reads) is closed: the demo makes a one-off admin token."""
    if settings.admin_token is not None or settings.read_token is not None:
        return settings, "log in with AGENT_ADMIN_TOKEN or AGENT_READ_TOKEN"
    token = secrets.token_urlsafe(12)
    return (settings.model_copy(update={"admin_token": SecretStr(token)}),
            f"log in with the admin token {token}, made for this demo")
