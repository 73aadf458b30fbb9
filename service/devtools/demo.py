"""``agent-service demo``: the whole pipeline on embedded servers, in one command.

Starts a local broker, redis-server and the embedded model (or the fake one with ``--fake-llm``),
runs the service, produces sample tasks (every one of them twice, as a redelivery would, plus a
poison record and a conflicting one), waits (until ``--timeout``) for every task's outcome on the
results or dead-letter topic, and prints what happened: model calls, results, duplicates skipped
and dead letters, read back from the topics and the ledger.

Two of the tasks are of the kind ``support_ticket``, an agent that acts: it files tickets in a
ticketing API (``AGENT_TOOLS__TICKETS_URL``, else the fake one of :mod:`service.devtools.downstream`)
through a tool. A ticket with a refund above the threshold parks for approval; the demo approves
it, as an operator would, and lists the tickets the API recorded: every ticket filed once however
often its task was delivered. The embedded local model does not call tools, so with it these tasks
run afterwards on the fake model, scripted to call the tool, and the output says so.

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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import Producer
from pydantic import SecretStr

from service.core.metrics import Metrics
from service.core.settings import Settings
from service.devtools import local
from service.devtools.demo_topics import Outcomes, await_outcomes
from service.devtools.embedded import start_embedded, with_local_model
from service.devtools.fakellm.chat import MODEL_NAME
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

# what the fake model answers when a ticket task offers it the tool: one ticket without a refund,
# and one with a refund above the approval threshold, which parks until the demo approves it
TICKET_ARGUMENTS: list[dict[str, Any]] = [
    {"tool": "open_ticket", "match": "ticket-001",
     "arguments": {"title": "Order 2291 arrived with two broken cups", "priority": "normal", "refund": 0}},
    {"tool": "open_ticket", "match": "ticket-002",
     "arguments": {"title": "Refund the double charge on order 2307", "priority": "urgent", "refund": 450}},
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


def _sum(metrics: Metrics, name: str, label: str, values: tuple[str, ...]) -> int:
    return int(sum(metrics.registry.get_sample_value(name, {label: v}) or 0 for v in values))


async def _approve_parked(svc: Any, settings: Settings, deadline: float) -> int:
    """Approve every task parked for approval, as an operator would, and wait until each has its
    result (a task waiting for its children is left to them)."""
    from service.pipeline.base import utcnow
    from service.pipeline.parking import decide

    parked = []
    for task_key, _ in await svc.ledger.effects.parked():
        record = await svc.ledger.get(task_key)
        waiting = json.loads(record.fields.get("waiting", "{}")) if record is not None else {}
        if waiting.get("what") != "approval":
            continue
        parked.append(task_key)
        print(f"  {task_key} waits for approval: {waiting.get('reason')}; approving it", flush=True)
        await decide(svc.ledger, svc.publisher.send, svc.metrics, utcnow(), task_key, "approved", by="demo",
                     reason="approved by the demo", audit_topic=settings.kafka.audit_topic)

    async def done() -> bool:
        records = [await svc.ledger.get(t) for t in parked]
        return all(r is not None and r.state in ("succeeded", "dead") for r in records)

    while parked and not await done() and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return len(parked)


async def _show_trees(svc: Any, roots: list[str], deadline: float) -> None:
    """Wait for each delegating task to end, then print it with its children, in declared order."""
    from service.pipeline.tree import task_tree

    async def ended(task_key: str) -> bool:
        record = await svc.ledger.get(task_key)
        return record is not None and record.state in ("succeeded", "dead")

    for root in roots:
        while not await ended(root) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        record = await svc.ledger.get(root)
        if record is None:
            continue
        tree = await task_tree(svc.ledger, root, record.fields)
        print(f"  {root} ({record.fields.get('kind')}): {record.state}, delegated to:", flush=True)
        for child in tree["children"]:
            print(f"    {child['id']:<22} {child['kind']:<16} {child['state']}", flush=True)


@dataclass
class Phase:
    """One run of the service over some of the demo's tasks, on one model."""

    svc: Any
    serving: asyncio.Task[None]
    produced: int  # records
    parked: int  # tasks parked for approval (and approved)


async def _phase(settings: Settings, base_url: str, tasks: list[dict[str, Any]], metrics: Metrics,
                 deadline: float, extra: bool) -> Phase:
    """Serve, produce ``tasks`` (each twice, and with ``extra`` the poison and conflicting records),
    wait until the service is done with every record, approve what parks, print the trees."""
    svc = build(settings, llm_base_url=base_url, metrics=metrics)
    install_signal_handlers(svc)
    serving = asyncio.create_task(svc.run())
    while not svc.runner.assignment and not serving.done():
        await asyncio.sleep(0.1)
    before = _finished(metrics)
    produced = await _produce_samples(settings, tasks, extra)
    last = -1
    while _finished(metrics) - before < produced and time.monotonic() < deadline and not serving.done():
        if _finished(metrics) != last:
            last = _finished(metrics)
            print(f"  {last - before}/{produced} records finished", flush=True)
        await asyncio.sleep(0.5)
    parked = await _approve_parked(svc, settings, deadline)
    await _show_trees(svc, [t["task_id"] for t in tasks if t["kind"] == "review_panel"], deadline)
    return Phase(svc, serving, produced, parked)


async def _run(settings: Settings, models: Models, n: int, timeout_s: float, keep: bool = False,
               console: str = "", login: str = "") -> int:
    started = time.monotonic()
    deadline = started + timeout_s
    metrics = Metrics()
    apart = models.tickets_url != models.base_url
    tasks = _tasks(n) + ([] if apart else TICKETS) + TREE
    phase = await _phase(settings, models.base_url, tasks, metrics, deadline, extra=True)
    parked = phase.parked
    if apart:  # the agent that acts on a model that calls tools, after the rest is done
        phase.svc.runner.stop()
        await phase.serving
        print(f"\nthe agent that acts: {len(TICKETS)} support_ticket tasks on {models.tickets_label} ...", flush=True)
        phase = await _phase(settings, models.tickets_url, TICKETS, metrics, deadline, extra=False)
        parked += phase.parked
        tasks += TICKETS
    k = settings.kafka
    print("reading the results and dead letters back from their topics ...", flush=True)
    outcomes = await asyncio.to_thread(await_outcomes, k.bootstrap_servers, k.results_topic, k.dlq_topic,
                                       [t["task_id"] for t in tasks], EXTRA_RECORDS, deadline)
    tickets = await asyncio.to_thread(_tickets, settings.tools.tickets_url)
    _report(metrics, len(tasks), parked, time.monotonic() - started, outcomes, models, tickets)
    if keep and not phase.serving.done():
        print(f"\nthe service keeps running: look at it in the console, {console} ({login}); Ctrl-C stops it",
              flush=True)
    else:
        phase.svc.runner.stop()
    await phase.serving
    if not keep:
        print(f"\nconsole: {console} (served while the demo ran, {login}; run the demo at a terminal to keep "
              "it up afterwards, or `make run`)")
    if not outcomes.complete:
        print(f"\nthe deadline ({timeout_s:.0f}s, --timeout) passed before every task ended: no outcome yet for "
              f"{', '.join(outcomes.missing) or '-'}; dead letters missing: {outcomes.dead_missing}")
        return 1
    return 0


# a poison record (not JSON) and a task whose id is reused with another input
EXTRA_RECORDS = 2


async def _produce_samples(settings: Settings, tasks: list[dict[str, Any]], extra: bool) -> int:
    """Produce every task twice (a redelivery), and with ``extra`` a poison record and a conflicting
    task; returns how many records were produced."""
    records = [(t["task_id"].encode(), json.dumps(t).encode()) for t in tasks]
    records += records
    what = f"{len(tasks)} tasks, each twice (a redelivery)"
    if extra:
        conflicting = dict(tasks[0], input={**tasks[0]["input"], "text": "A different text under the same task id."})
        records += [(b"poison-1", b"{this is not json"), (conflicting["task_id"].encode(), json.dumps(conflicting).encode())]
        what += ", one poison record and one conflicting task"
    print(f"producing {what} ...", flush=True)
    k = settings.kafka
    await asyncio.to_thread(_produce, k.bootstrap_servers, k.input_topic, records)
    return len(records)


def _finished(metrics: Metrics) -> int:
    """The records the service is done with, whatever their outcome."""
    return _sum(metrics, "agent_tasks_total", "outcome",
                ("succeeded", "duplicate", "dead_lettered", "conflict", "parked"))


def _tickets(tickets_url: str | None) -> list[dict[str, Any]] | None:
    """The tickets the ticketing API holds (what the tool really did), None when it cannot tell."""
    if tickets_url is None:
        return None
    try:
        response = httpx.get(f"{tickets_url.rstrip('/')}/tickets", timeout=10.0)
        response.raise_for_status()
        return list(response.json()["tickets"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


def _report(metrics: Metrics, tasks: int, parked: int, elapsed: float, outcomes: Outcomes, models: Models,
            tickets: list[dict[str, Any]] | None) -> None:
    """What happened: the counts from the service's metrics, what the ticketing API recorded, then
    the results and dead letters read back from their topics."""
    from service.core.metrics import DLQ_REASONS, LLM_OUTCOMES

    def val(name: str, **labels: str) -> int:
        return int(metrics.registry.get_sample_value(name, labels) or 0)

    results, dead = outcomes.results, outcomes.dead
    print()
    print(f"{'records produced':<28}{2 * tasks + EXTRA_RECORDS}")
    print(f"{'distinct tasks':<28}{tasks + 1}  (+1 poison)")
    print(f"{'LLM calls':<28}{_sum(metrics, 'agent_llm_requests_total', 'outcome', LLM_OUTCOMES)}"
          f"  (retries {val('agent_retries_total')})")
    print(f"{'results published':<28}{len(results)}  "
          f"(failed {sum(json.loads(m.value() or b'{}').get('outcome') == 'failed' for m in results)})")
    print(f"{'duplicates skipped':<28}{val('agent_tasks_total', outcome='duplicate')}")
    print(f"{'dead letters':<28}{len(dead)}  " + ", ".join(
        f"{r}={val('agent_dead_letters_total', reason=r)}" for r in DLQ_REASONS
        if val("agent_dead_letters_total", reason=r)))
    print(f"{'stale fence writes':<28}{val('agent_stale_fence_writes_total')}")
    print(f"{'wall time':<28}{elapsed:.1f}s")
    _report_tickets(val("agent_tool_calls_total", tool="open_ticket", outcome="executed"), parked, models, tickets)
    _report_results(results)
    print("\ndead letters:")
    for m in dead:
        h = _headers(m)
        print(f"  {h.get('dlq.task_id') or '-':<10} {h['dlq.reason']:<15} "
              f"from {h['dlq.original.topic']}[{h['dlq.original.partition']}]@{h['dlq.original.offset']}: "
              f"{h['dlq.error'][:70]}")


def _headers(message: Any) -> dict[str, str]:
    return {key: value.decode("utf-8", "replace") for key, value in (message.headers() or [])}


def _report_tickets(executed: int, parked: int, models: Models, tickets: list[dict[str, Any]] | None) -> None:
    """The agent that acts: its tool calls as the service counted them and as the ticketing API saw them."""
    print(f"\nthe agent that acts (support_ticket, on {models.tickets_label}):")
    if models.tickets_note:
        print(f"  {models.tickets_note}")
    print(f"  {'tool calls run':<26}{executed}  (open_ticket" + (
        f"; {parked} parked for approval and approved by the demo)" if parked else ")"))
    if executed == 0:
        print("  no tool was called: the model answered without calling open_ticket, so nothing was filed")
    if tickets is None:
        print("  tickets filed: unknown (the ticketing API does not list its tickets)")
        return
    keys = Counter(str(t.get("key")) for t in tickets)
    print(f"  {'tickets filed':<26}{len(tickets)}  (as the ticketing API recorded them; "
          f"each key once: {all(count == 1 for count in keys.values())})")
    print("\ntickets:")
    for t in tickets:
        fields = t.get("fields") or {}
        print(f"  {t.get('id')}  {t.get('key')}  {fields.get('priority')}  refund {fields.get('refund')}  "
              f"{str(fields.get('title'))[:60]!r}  {t.get('status')}")


def _report_results(results: list[Any]) -> None:
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
        settings, models = _models(settings, emb, fake=bool(getattr(args, "fake_llm", False)))
        settings = _ticketing(settings, emb)
        ensure_topics(settings)
        if not _port_free(settings.http.host, settings.http.port):
            http = settings.http.model_copy(update={"port": local.free_port()})
            settings = settings.model_copy(update={"http": http})
        print(f"broker {settings.kafka.bootstrap_servers}, redis {emb.servers['redis'].address}, "
              f"model {models.base_url} ({models.label}), ticketing API {settings.tools.tickets_url}")
        if models.tickets_url != models.base_url:
            print(f"the ticket tasks' model: {models.tickets_url} ({models.tickets_label})")
        print(f"admin API and metrics on http://{settings.http.host}:{settings.http.port} while it runs")
        settings, login = _console_login(settings)
        print(f"console on {_console_url(settings)} while it runs ({login})", flush=True)
        timeout = float(getattr(args, "timeout", 0) or 600)
        try:
            # at a terminal the service keeps serving the console once the demo is done, until Ctrl-C
            keep = sys.stdin.isatty() and sys.stdout.isatty()
            return asyncio.run(_run(settings, models, int(args.tasks), timeout, keep, _console_url(settings), login))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130


@dataclass(frozen=True)
class Models:
    """The model the demo's tasks run on, and the one its ticket tasks (the agent that acts) run on."""

    base_url: str
    label: str
    tickets_url: str
    tickets_label: str
    tickets_note: str = ""  # why the ticket tasks run on another model


def _models(settings: Settings, emb: Any, *, fake: bool) -> tuple[Settings, Models]:
    """The demo's models: the fake one (``--fake-llm``), the configured endpoint, or the embedded
    local model, whose ticket tasks then run on the fake model, scripted to call the tool."""
    scripted = "the fake model, scripted to call open_ticket"
    if fake:
        url = _start_fake(emb)
        settings = settings.model_copy(update={"llm": settings.llm.model_copy(update={"model": MODEL_NAME})})
        return settings, Models(url, "the fake model", url, scripted)
    if settings.llm.base_url is not None:
        label = f"the configured model, {settings.llm.model}"
        return settings, Models(settings.llm.base_url, label, settings.llm.base_url, label)
    print("starting the embedded model (SmolLM2-135M on llama.cpp) ...", flush=True)
    server = emb.start("llm", local.start_local_model(emb.data_dir / "llm", gguf=settings.llm.local_gguf))
    note = ("SmolLM2-135M does not call tools reliably (it answers without calling open_ticket), so the "
            "agent that acts runs on the fake model here; its replies are filler words")
    return with_local_model(settings), Models(f"http://{server.address}/v1", "the local model, SmolLM2-135M",
                                              _start_fake(emb), scripted, note)


def _start_fake(emb: Any) -> str:
    from service.devtools.fakellm import FakeLLM

    fake = FakeLLM(latency_s=0.05, tool_arguments=TICKET_ARGUMENTS)
    emb.callback(fake.stop)
    return fake.start()


def _ticketing(settings: Settings, emb: Any) -> Settings:
    """The ticketing API the ticket tool calls: ``AGENT_TOOLS__TICKETS_URL`` when set, else a fake one
    (:mod:`service.devtools.downstream`) started for the demo."""
    if settings.tools.tickets_url is not None:
        return settings
    from service.devtools.downstream import FakeDownstream

    downstream = FakeDownstream()
    emb.callback(downstream.stop)
    downstream.start()
    return settings.model_copy(update={"tools": settings.tools.model_copy(update={
        "tickets_url": downstream.base_url})})


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
