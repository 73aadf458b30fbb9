"""Result events through a Schema Registry: the results topic's value format, the result event's
schemas, the writer every results-topic record is encoded with, and a reader of them.

The results topic carries one schema for both its events: a task's ``succeeded`` event (its
``result``) and its ``failed`` event (``reason``, ``error`` and where its ``dead_letter`` is). In
Avro the free-form parts (``result``, ``answered_by``, ``session``) travel as JSON text and a field
an event does not have is null; :func:`from_avro` turns a record back into the event as JSON
carries it. In JSON Schema the value is the JSON event itself, validated against the schema.

The writer registers its schema (with ``auto_register`` off, only looks its id up) under the
TopicNameStrategy subject ``<results topic>-value`` on first use and keeps the id: later results
ask the registry nothing. A registry that does not answer or refuses (an incompatible schema, a
subject a team has not registered, credentials) fails every result alike:
:class:`~service.core.schema_registry.RegistryUnavailable`, an outage. The record is retried and its
result, stored in the ledger as JSON, published once the registry answers: nothing lost, none twice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from confluent_kafka.schema_registry import SchemaRegistryClient, SchemaRegistryError
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.json_schema import JSONDeserializer, JSONSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from service.core.errors import PoisonError
from service.core.schema_registry import (
    TRANSPORT_ERRORS,
    RegistryUnavailable,
    RegistryUser,
    SchemaRegistrySettings,
    registry_faults,
)

JSON_TEXT_FIELDS = frozenset({"result", "answered_by", "session"})  # free-form: JSON text in Avro


def _optional(name: str, avro_type: Any, doc: str | None = None) -> dict[str, Any]:
    field: dict[str, Any] = {"name": name, "type": ["null", avro_type], "default": None}
    return field | ({"doc": doc} if doc else {})


RESULT_AVRO_SCHEMA = json.dumps({
    "type": "record", "name": "ResultEvent", "namespace": "agent.results",
    "doc": "A task's outcome: succeeded (its result) or failed (where its dead letter is).",
    "fields": [
        {"name": "task_id", "type": "string"},
        {"name": "outcome", "type": "string", "doc": "succeeded | failed"},
        {"name": "status", "type": "string"},
        _optional("kind", "string"),
        _optional("result", "string", "the agent's result as JSON text"),
        _optional("result_digest", "string"),
        _optional("fence", "long"),
        _optional("attempts", "long"),
        _optional("model", "string"),
        _optional("prompt_version", "string"),
        _optional("completed_at", "string"),
        _optional("degraded", "boolean"),
        _optional("endpoint", "string"),
        _optional("endpoint_url", "string"),
        _optional("answered_by", "string", "step -> {endpoint, model} as JSON text"),
        _optional("session", "string", "the task's session as JSON text"),
        _optional("reason", "string"),
        _optional("error", "string"),
        _optional("failed_at", "string"),
        _optional("dead_letter", {"type": "record", "name": "DeadLetter", "fields": [
            {"name": "topic", "type": "string"},
            _optional("partition", "long"),
            _optional("offset", "long"),
            {"name": "id", "type": "string"},
        ]}),
    ],
})
AVRO_FIELDS = frozenset(f["name"] for f in json.loads(RESULT_AVRO_SCHEMA)["fields"])

_TEXT = {"type": "string"}
RESULT_JSON_SCHEMA = json.dumps({
    "$schema": "http://json-schema.org/draft-07/schema#", "title": "ResultEvent", "type": "object",
    "properties": {
        "task_id": _TEXT, "kind": {"type": ["string", "null"]}, "outcome": {"enum": ["succeeded", "failed"]},
        "status": _TEXT, "result": {}, "result_digest": _TEXT, "fence": {"type": "integer"},
        "attempts": {"type": "integer"}, "model": _TEXT, "prompt_version": _TEXT, "completed_at": _TEXT,
        "degraded": {"type": "boolean"}, "endpoint": _TEXT, "endpoint_url": _TEXT,
        "answered_by": {"type": "object"}, "session": {"type": "object"},
        "reason": _TEXT, "error": _TEXT, "failed_at": _TEXT,
        "dead_letter": {"type": "object", "required": ["topic", "id"], "properties": {
            "topic": _TEXT, "partition": {"type": ["integer", "null"]}, "offset": {"type": ["integer", "null"]},
            "id": _TEXT}},
    },
    "required": ["task_id", "outcome", "status"],
})
# written once through the serializer to register (or look up) the schema before any result needs it
PROBE_EVENT: dict[str, Any] = {"task_id": "-", "outcome": "succeeded", "status": "succeeded"}


def to_avro(event: Mapping[str, Any]) -> dict[str, Any]:
    """The Avro record of a result event. A field the schema does not have is refused (ValueError),
    never silently dropped."""
    unknown = set(event) - AVRO_FIELDS
    if unknown:
        raise ValueError(f"result event fields not in the Avro schema: {sorted(unknown)}")
    record: dict[str, Any] = dict.fromkeys(AVRO_FIELDS)
    record.update(event)
    for name in JSON_TEXT_FIELDS & set(event):
        record[name] = json.dumps(event[name], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return record


def from_avro(record: Mapping[str, Any]) -> dict[str, Any]:
    """The result event an Avro record holds, as its JSON carries it (null fields left out)."""
    return {name: json.loads(value) if name in JSON_TEXT_FIELDS else value
            for name, value in record.items() if value is not None}


class ResultWriter(RegistryUser):
    """Encodes the results topic's events (canonical JSON bytes, as the ledger stores them) with the
    registry's serializer. :meth:`ready` before the first encoding (it may ask the registry);
    after it, encoding asks nothing and may run anywhere (a transaction's producer thread)."""

    def __init__(self, settings: SchemaRegistrySettings, topic: str) -> None:
        super().__init__(settings, topic)
        self.format = settings.results_format
        self.subject = f"{topic}-value"  # TopicNameStrategy, the serializers' default
        conf = {"auto.register.schemas": settings.auto_register}
        self._serialize: AvroSerializer | JSONSerializer
        if self.format == "avro":
            self._serialize = AvroSerializer(self.client, RESULT_AVRO_SCHEMA, conf=conf)
        else:
            self._serialize = JSONSerializer(RESULT_JSON_SCHEMA, self.client, conf=conf)
        self._ready = False

    async def ready(self) -> None:
        """The schema's id known (registered or looked up once). Raises
        :class:`RegistryUnavailable` when the registry does not answer or refuses."""
        if self._ready:
            return
        try:
            await self.off_loop(self.framed, PROBE_EVENT)
        except SchemaRegistryError as exc:
            raise RegistryUnavailable(f"schema registry: subject {self.subject}: {exc}") from exc
        except TRANSPORT_ERRORS as exc:
            raise RegistryUnavailable(f"schema registry unreachable: {type(exc).__name__}: {exc}") from exc
        self._ready = True

    def __call__(self, event: bytes) -> bytes:
        return self.framed(json.loads(event))

    def framed(self, event: Mapping[str, Any]) -> bytes:
        value = to_avro(event) if self.format == "avro" else dict(event)
        framed = self._serialize(value, self.context)
        if framed is None:  # only for a None value, which an event never is
            raise ValueError("result event serialized to nothing")
        return framed


def result_writer(settings: SchemaRegistrySettings, topic: str) -> ResultWriter | None:
    """The writer of ``topic``'s result events, or None for plain JSON."""
    return None if settings.results_format == "json" else ResultWriter(settings, topic)


class ResultReader:
    """Reads a results-topic value into its event: framed by a registry (Avro or JSON Schema, told
    by the writer's schema) or plain JSON. Blocking: the first value of a schema id asks the registry.

    Raises :class:`PoisonError` for a value that is no event and :class:`RegistryUnavailable` when
    the registry does not answer."""

    def __init__(self, conf: Mapping[str, Any] | None, topic: str) -> None:
        self.client = SchemaRegistryClient(dict(conf)) if conf else None
        self.context = SerializationContext(topic, MessageField.VALUE)
        self._avro = AvroDeserializer(self.client) if self.client else None
        self._json = JSONDeserializer(None, schema_registry_client=self.client) if self.client else None

    def __call__(self, value: bytes) -> dict[str, Any]:
        if value[:1] != b"\x00" or self.client is None:
            try:
                event = json.loads(value)
            except ValueError as exc:
                raise PoisonError("decode", f"results value: neither JSON nor framed: {exc}") from exc
            if not isinstance(event, dict):
                raise PoisonError("decode", "results value: not an object")
            return event
        with registry_faults("results value"):
            schema = self.client.get_schema(int.from_bytes(value[1:5], "big"))
            if schema.schema_type == "AVRO" and self._avro is not None:
                return from_avro(self._avro(value, self.context))
            if self._json is not None:
                return dict(self._json(value, self.context))
        raise PoisonError("decode", f"results value: schema type {schema.schema_type} not read")

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
