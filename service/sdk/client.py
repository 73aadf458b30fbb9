"""Submit a task and await its outcome, from Python.

Two clients with the same calls, :class:`TopicClient` (Kafka: tasks to the input topic, outcomes
read from the results topic) and :class:`HttpClient` (the service's HTTP API: ``POST /tasks`` and
``GET /tasks/{id}?wait=``)::

    from service.sdk.client import TopicClient

    with TopicClient("localhost:9092") as client:
        task_id = client.submit("classify", {"text": "Where is my order?", "labels": ["question", "complaint"]})
        outcome = client.result(task_id, timeout=60)   # Outcome; raises ResultTimeout
        if outcome.succeeded:
            print(outcome.result)
        else:
            print(outcome.reason, outcome.dead_letter)    # where its dead letter is, for a replay

    async with TopicClient("localhost:9092") as client:  # the same, awaited
        outcome = await client.aresult(await client.asubmit("classify", {...}), timeout=60)

With ``schema_registry`` (a ``SchemaRegistryClient`` configuration, ``{"url": ...}``) the topic
client reads results written through a Schema Registry too (``AGENT_SCHEMA_REGISTRY__RESULTS_FORMAT``
``avro`` or ``jsonschema``), into the same events; while the registry does not answer, the outcomes
wait for it. The topic client reads the results topic from the moment it was made (``since_ms`` to start
earlier) and keeps the latest event of each task id: that is the task's outcome (a dead letter
replayed that then succeeds has a second event, ``succeeded``). The HTTP client needs the submit
token to submit and the read token to await (``AGENT_SUBMIT_TOKEN``, ``AGENT_READ_TOKEN``; the
admin token does both); its outcomes come from the ledger and name no dead letter's place.
Either raises :class:`ClientError` (a task not accepted, an answer not readable) or its subclass
:class:`ResultTimeout`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Literal, Self

import httpx
from confluent_kafka import Consumer, Producer, TopicPartition
from pydantic import BaseModel

from consumers.watermarks import watermarks
from service.core.errors import PoisonError
from service.core.result_events import ResultReader
from service.core.schema_registry import RegistryUnavailable

__all__ = ["ClientError", "HttpClient", "Outcome", "ResultTimeout", "TopicClient", "task_event"]

Headers = Mapping[str, str]
REGISTRY_RETRY_S = 1.0


class Outcome(BaseModel):
    """How a task ended: ``succeeded`` with its ``result``, or ``failed`` with the ``reason``,
    ``error`` and (from the results topic) where its ``dead_letter`` is (topic, partition, offset, id)."""

    task_id: str
    outcome: Literal["succeeded", "failed"]
    kind: str | None = None
    result: Any = None
    reason: str | None = None
    error: str | None = None
    attempts: int | None = None
    dead_letter: dict[str, Any] | None = None
    event: dict[str, Any] = {}  # the whole results event (or ledger record) it was read from

    @property
    def succeeded(self) -> bool:
        return self.outcome == "succeeded"

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> Outcome:
        """From a results-topic event (one without ``outcome`` is a ``succeeded`` one)."""
        return cls(task_id=str(event["task_id"]), outcome=event.get("outcome", "succeeded"), kind=event.get("kind"),
                   result=event.get("result"), reason=event.get("reason"), error=event.get("error"),
                   attempts=event.get("attempts"), dead_letter=event.get("dead_letter"), event=dict(event))

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Outcome:
        """From the API's task record of an ended task."""
        return cls(task_id=str(record["task_id"]), outcome=record["outcome"], kind=record.get("kind"),
                   result=record.get("result"), reason=record.get("dead_reason"), error=record.get("error"),
                   attempts=record.get("attempts"), event=dict(record))


class ClientError(Exception):
    """The root of the client's errors: a task not accepted, an outcome not readable."""


class ResultTimeout(ClientError, TimeoutError):
    """The task had not ended when the wait ran out (it may still end: ask again)."""


def _checked(answer: httpx.Response) -> httpx.Response:
    """The answer, or :class:`ClientError` saying its status and body."""
    if answer.is_error:
        raise ClientError(f"{answer.request.method} {answer.request.url.path}: {answer.status_code} {answer.text[:300]}")
    return answer


def task_event(kind: str, task_input: Any, task_id: str, *, deadline: str | None, priority: int | None,
               tenant: str | None) -> dict[str, Any]:
    event: dict[str, Any] = {"task_id": task_id, "kind": kind, "input": task_input}
    for name, value in (("deadline", deadline), ("priority", priority), ("tenant", tenant)):
        if value is not None:
            event[name] = value
    return event


class TopicClient:
    """Tasks to the input topic, outcomes from the results topic (read by one background thread).

    ``config`` is added to the librdkafka settings of both (security settings, for instance);
    ``schema_registry`` configures the registry client that reads results written through one."""

    def __init__(self, bootstrap_servers: str, *, input_topic: str = "agent.tasks",
                 results_topic: str = "agent.results", config: Mapping[str, Any] | None = None,
                 since_ms: int | None = None, schema_registry: Mapping[str, Any] | None = None) -> None:
        common = {"bootstrap.servers": bootstrap_servers, **(config or {})}
        self.input_topic, self.results_topic = input_topic, results_topic
        self._read_value = ResultReader(schema_registry, results_topic)
        self._producer = Producer({**common, "enable.idempotence": True, "acks": "all", "linger.ms": 5})
        self._consumer = Consumer({**common, "group.id": f"agent-client-{uuid.uuid4().hex}",
                                   "enable.auto.commit": False, "isolation.level": "read_committed",
                                   "auto.offset.reset": "earliest"})
        self._since_ms = int(time.time() * 1000) - 1000 if since_ms is None else since_ms
        self._latest: dict[str, dict[str, Any]] = {}
        self._changed = threading.Condition()
        self._waiters: dict[str, list[asyncio.Future[Outcome]]] = {}
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._assign()
        self._thread = threading.Thread(target=self._read, name="agent-client-results", daemon=True)
        self._thread.start()

    def _assign(self) -> None:
        topic = self._consumer.list_topics(self.results_topic, timeout=30).topics.get(self.results_topic)
        if topic is None or topic.error is not None:
            raise ClientError(f"results topic {self.results_topic} not readable: {topic.error if topic else 'absent'}")
        wanted = [TopicPartition(self.results_topic, p, self._since_ms) for p in sorted(topic.partitions)]
        starts = self._consumer.offsets_for_times(wanted, timeout=30)
        # no record at or after the time: the partition's end now (not "the end" when the fetch
        # starts, which could pass over an outcome written meanwhile)
        self._consumer.assign([TopicPartition(self.results_topic, tp.partition, tp.offset if tp.offset >= 0 else
                                              watermarks(self._consumer, tp, 30)[1])
                               for tp in starts])

    def _read(self) -> None:
        try:
            while not self._stop.is_set():
                for msg in self._consumer.consume(500, 0.1):
                    if msg.error() is None:
                        self._note(msg.value())
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter instead of lost
            self._error = exc
            with self._changed:
                self._changed.notify_all()

    def _event_of(self, value: bytes | None) -> dict[str, Any] | None:
        """The outcome event ``value`` holds, or None (not one); waits while the registry is down."""
        while not self._stop.is_set():
            try:
                event = self._read_value(value or b"")
                str(event["task_id"])
                return event
            except RegistryUnavailable:
                self._stop.wait(REGISTRY_RETRY_S)  # this outcome, and those after it, wait for the registry
            except (PoisonError, KeyError, TypeError):
                return None
        return None

    def _note(self, value: bytes | None) -> None:
        event = self._event_of(value)
        if event is None:
            return  # not an outcome event
        task_id = str(event["task_id"])
        with self._changed:
            self._latest[task_id] = event
            futures = self._waiters.pop(task_id, [])
            self._changed.notify_all()
        outcome = Outcome.from_event(event)
        for future in futures:
            future.get_loop().call_soon_threadsafe(_settle, future, outcome)

    def submit(self, kind: str, task_input: Any, task_id: str | None = None, *, deadline: str | None = None,
               priority: int | None = None, tenant: str | None = None, headers: Headers | None = None) -> str:
        """Produce a task (acknowledged by the broker); its task id (a new one when not given)."""
        task_id = task_id or uuid.uuid4().hex
        value = json.dumps(task_event(kind, task_input, task_id, deadline=deadline, priority=priority, tenant=tenant))
        failures: list[str] = []
        self._producer.produce(self.input_topic, key=task_id.encode(), value=value.encode(),
                               headers=[(k, v.encode()) for k, v in (headers or {}).items()],
                               on_delivery=lambda err, _msg: failures.append(err.str()) if err else None)
        if self._producer.flush(30) or failures:
            raise ClientError(f"task {task_id} not acknowledged: {failures or 'timed out'}")
        return task_id

    def result(self, task_id: str, timeout: float = 60.0) -> Outcome:
        """The task's outcome, waiting up to ``timeout`` seconds for it (:class:`ResultTimeout`)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while (event := self._latest.get(task_id)) is None:
                if self._error is not None:
                    raise ClientError(f"reading {self.results_topic} failed") from self._error
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ResultTimeout(f"task {task_id}: no outcome in {timeout:.0f}s")
                self._changed.wait(left)
        return Outcome.from_event(event)

    async def asubmit(self, kind: str, task_input: Any, task_id: str | None = None, **options: Any) -> str:
        return await asyncio.to_thread(self.submit, kind, task_input, task_id, **options)

    async def aresult(self, task_id: str, timeout: float = 60.0) -> Outcome:
        """:meth:`result`, awaited (no thread held while waiting)."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        with self._changed:
            event = self._latest.get(task_id)
            if event is None:
                self._waiters.setdefault(task_id, []).append(future)
        if event is not None:
            return Outcome.from_event(event)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise ResultTimeout(f"task {task_id}: no outcome in {timeout:.0f}s") from None
        finally:
            with self._changed:
                pending = self._waiters.get(task_id, [])
                if future in pending:
                    pending.remove(future)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._consumer.close()
        self._producer.flush(10)
        self._read_value.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await asyncio.to_thread(self.close)


def _settle(future: asyncio.Future[Outcome], outcome: Outcome) -> None:
    if not future.done():
        future.set_result(outcome)


class HttpClient:
    """Tasks through ``POST /tasks``, outcomes through ``GET /tasks/{id}?wait=`` (long polls of at
    most ``poll_s`` seconds each, until ``timeout``)."""

    def __init__(self, base_url: str, *, submit_token: str | None = None, read_token: str | None = None,
                 poll_s: float = 30.0, http_timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._submit = {"Authorization": f"Bearer {submit_token}"} if submit_token else {}
        self._read = {"Authorization": f"Bearer {read_token}"} if read_token else {}
        self.poll_s = poll_s
        self._timeout = http_timeout_s

    def _event(self, kind: str, task_input: Any, task_id: str | None, options: Mapping[str, Any]) -> dict[str, Any]:
        return task_event(kind, task_input, task_id or uuid.uuid4().hex, deadline=options.get("deadline"),
                          priority=options.get("priority"), tenant=options.get("tenant"))

    def submit(self, kind: str, task_input: Any, task_id: str | None = None, **options: Any) -> str:
        with httpx.Client(timeout=self._timeout) as http:
            answer = http.post(f"{self.base_url}/tasks", json=self._event(kind, task_input, task_id, options),
                               headers={**self._submit, **options.get("headers", {})})
        return str(_checked(answer).json()["task_id"])

    def result(self, task_id: str, timeout: float = 60.0) -> Outcome:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=self.poll_s + self._timeout) as http:
            while (left := deadline - time.monotonic()) > 0:
                answer = http.get(f"{self.base_url}/tasks/{task_id}", params={"wait": min(left, self.poll_s)},
                                  headers=self._read)
                if answer.status_code == 200 and answer.json().get("outcome"):
                    return Outcome.from_record(answer.json())
                if answer.status_code not in (202, 404):  # 404: not claimed yet
                    _checked(answer)
                if answer.status_code == 404:
                    time.sleep(min(0.2, max(left, 0)))
        raise ResultTimeout(f"task {task_id}: no outcome in {timeout:.0f}s")

    async def asubmit(self, kind: str, task_input: Any, task_id: str | None = None, **options: Any) -> str:
        async with httpx.AsyncClient(timeout=self._timeout) as http:
            answer = await http.post(f"{self.base_url}/tasks", json=self._event(kind, task_input, task_id, options),
                                     headers={**self._submit, **options.get("headers", {})})
        return str(_checked(answer).json()["task_id"])

    async def aresult(self, task_id: str, timeout: float = 60.0) -> Outcome:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=self.poll_s + self._timeout) as http:
            while (left := deadline - time.monotonic()) > 0:
                answer = await http.get(f"{self.base_url}/tasks/{task_id}", params={"wait": min(left, self.poll_s)},
                                        headers=self._read)
                if answer.status_code == 200 and answer.json().get("outcome"):
                    return Outcome.from_record(answer.json())
                if answer.status_code not in (202, 404):
                    _checked(answer)
                if answer.status_code == 404:
                    await asyncio.sleep(min(0.2, max(left, 0)))
        raise ResultTimeout(f"task {task_id}: no outcome in {timeout:.0f}s")
