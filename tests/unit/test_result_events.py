"""Result events through a Schema Registry: the results topic's format setting, the result event's
Avro and JSON Schema shapes (every event the service writes fits them, and reads back as it was
written), the outputs encoding every results-topic record, and the registry down an outage."""

from __future__ import annotations

import asyncio
import io
import json
import socket
from typing import Any, cast

import fastavro
import jsonschema
import pytest
from pydantic import ValidationError

from consumers.producers import Outputs, RecordRejected
from consumers.records import Record
from consumers.transactions import Staged, TransactionalOutputs, staging
from service.agents.tasks import canonical_json
from service.core.result_events import (
    RESULT_AVRO_SCHEMA,
    RESULT_JSON_SCHEMA,
    ResultReader,
    ResultWriter,
    from_avro,
    result_writer,
    to_avro,
)
from service.core.schema_registry import RegistryUnavailable, SchemaRegistrySettings
from service.core.settings import Settings
from tests.unit.test_dlq_headers import FakePublisher

SUCCEEDED = {
    "task_id": "t-1", "kind": "classify", "outcome": "succeeded", "status": "succeeded",
    "result": {"label": "question", "scores": [0.5, 1], "nested": {"x": None}}, "result_digest": "ab" * 32,
    "fence": 3, "attempts": 2, "model": "fallback-model", "prompt_version": "v1",
    "completed_at": "2026-12-06T17:50:00.000Z", "degraded": True, "endpoint": "backup",
    "endpoint_url": "http://backup:8000/v1", "answered_by": {"classify": {"endpoint": "backup", "model": "m"}},
    "session": {"id": "s-1", "turn": 4},
}
FAILED = {
    "task_id": "t-2", "kind": "classify", "outcome": "failed", "status": "failed", "reason": "permanent",
    "error": "the model refused", "attempts": 5, "failed_at": "2026-12-06T17:50:00.000Z",
    "dead_letter": {"topic": "agent.dlq", "partition": 2, "offset": 41, "id": "d" * 16},
}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unreachable_settings(fmt: str = "avro") -> SchemaRegistrySettings:
    return SchemaRegistrySettings.model_validate(
        {"url": f"http://127.0.0.1:{closed_port()}", "results_format": fmt, "timeout_s": 1})


def test_the_results_format_is_its_own_setting_and_needs_a_url(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="results_format avro needs a url"):
        SchemaRegistrySettings(results_format="avro")
    assert result_writer(SchemaRegistrySettings(), "agent.results") is None  # plain JSON by default
    monkeypatch.setenv("AGENT_SCHEMA_REGISTRY__URL", "http://registry:8081")
    monkeypatch.setenv("AGENT_SCHEMA_REGISTRY__RESULTS_FORMAT", "jsonschema")
    monkeypatch.setenv("AGENT_SCHEMA_REGISTRY__AUTO_REGISTER", "false")
    s = Settings().schema_registry
    assert (s.input_format, s.results_format, s.auto_register) == ("json", "jsonschema", False)
    writer = result_writer(s, "agent.results")
    assert isinstance(writer, ResultWriter) and writer.subject == "agent.results-value"  # TopicNameStrategy


@pytest.mark.parametrize("event", [SUCCEEDED, FAILED, {"task_id": "t-3", "kind": None, "outcome": "failed",
                                                       "status": "failed", "reason": "decode", "error": "e",
                                                       "attempts": 0, "failed_at": "x",
                                                       "dead_letter": {"topic": "d", "partition": None,
                                                                       "offset": None, "id": "i"}}])
def test_every_event_fits_the_avro_schema_and_reads_back_as_written(event: dict[str, Any]) -> None:
    schema = fastavro.parse_schema(json.loads(RESULT_AVRO_SCHEMA))
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, schema, to_avro(event))
    buffer.seek(0)
    read = cast(dict[str, Any], fastavro.schemaless_reader(buffer, schema, schema))
    if "result" in event:
        assert isinstance(read["result"], str)  # free-form JSON travels as JSON text
    expected = {k: v for k, v in event.items() if v is not None}  # a null field is an absent one
    assert from_avro(read) == expected


def test_every_event_fits_the_json_schema_and_a_wrong_one_does_not() -> None:
    validator = jsonschema.Draft7Validator(json.loads(RESULT_JSON_SCHEMA))
    for event in (SUCCEEDED, FAILED):
        validator.validate(event)
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({**FAILED, "attempts": "five"})


def test_a_field_the_schema_does_not_know_is_refused_not_dropped() -> None:
    with pytest.raises(ValueError, match="surprise"):
        to_avro({**SUCCEEDED, "surprise": 1})


@pytest.mark.parametrize("fmt", ["avro", "jsonschema"])
def test_the_registry_unreachable_while_writing_is_an_outage(fmt: str) -> None:
    writer = result_writer(unreachable_settings(fmt), "agent.results")
    assert writer is not None

    async def main() -> None:
        try:
            with pytest.raises(RegistryUnavailable, match="schema registry"):
                await writer.ready()
            assert not await writer.answers()
        finally:
            await writer.aclose()

    asyncio.run(main())


def test_a_plain_json_result_is_read_without_the_registry() -> None:
    reader = ResultReader({"url": f"http://127.0.0.1:{closed_port()}", "timeout": 1}, "agent.results")
    try:
        assert reader(canonical_json(FAILED).encode()) == FAILED
        with pytest.raises(RegistryUnavailable):
            reader(b"\x00\x00\x00\x00\x07\x02")  # framed: the registry must be asked, and is not there
    finally:
        reader.close()


class Encoder:
    """Marks what it encoded; ``down`` says the registry does not answer."""

    def __init__(self, down: bool = False) -> None:
        self.down = down

    async def ready(self) -> None:
        if self.down:
            raise RegistryUnavailable("schema registry unreachable")

    def __call__(self, event: bytes) -> bytes:
        return b"\x00enc:" + event


def rec() -> Record:
    return Record(topic="in", partition=0, offset=7, key=b"k", value=b"v", headers=[])


def test_outputs_encode_results_and_failed_events_and_send_nothing_while_the_registry_is_down() -> None:
    fake = FakePublisher()
    outputs = Outputs(fake, "results", "dlq")  # type: ignore[arg-type]
    outputs.encoder = Encoder()
    asyncio.run(outputs.result(rec(), "t-1", b'{"a":1}', None))
    asyncio.run(outputs.dead_letter(rec(), reason="permanent", error="e", attempts=1, task_id="t-2",
                                    announce=lambda _t, _p: b'{"outcome":"failed"}'))
    assert [(topic, value) for topic, _k, value, _h in fake.sent] == [
        ("results", b'\x00enc:{"a":1}'), ("dlq", b"v"), ("results", b'\x00enc:{"outcome":"failed"}')]
    fake.sent.clear()
    outputs.encoder = Encoder(down=True)
    with pytest.raises(RegistryUnavailable):
        asyncio.run(outputs.result(rec(), "t-1", b'{"a":1}', None))
    with pytest.raises(RegistryUnavailable):  # before the dead letter: no letter without its event
        asyncio.run(outputs.dead_letter(rec(), reason="permanent", error="e", attempts=1, task_id="t-2",
                                        announce=lambda _t, _p: b"{}"))
    assert fake.sent == []


def test_transactional_outputs_stage_encoded_results_and_failed_events() -> None:
    outputs = TransactionalOutputs(FakePublisher(), "results", "dlq")  # type: ignore[arg-type]
    outputs.encoder = Encoder()
    outputs.announce_refused = lambda _r, _k, _e: (lambda _t, _p: b'{"outcome":"failed"}')
    staged: list[Staged] = []

    async def main() -> None:
        with staging(staged):
            await outputs.result(rec(), "t-1", b'{"a":1}', None)
            await outputs.dead_letter(rec(), reason="permanent", error="e", attempts=1, task_id="t-2",
                                      announce=lambda _t, _p: b'{"outcome":"failed"}')

    asyncio.run(main())
    assert staged[0].value == b'\x00enc:{"a":1}'
    follow = staged[1].then
    assert follow is not None and follow((1, 2)).value == b'\x00enc:{"outcome":"failed"}'
    instead = staged[0].fallback  # a result refused for good: its failed event is encoded too
    assert instead is not None
    replacement = instead("too large")
    assert replacement is not None and replacement.then is not None
    assert (replacement.then((1, 3)).value or b"").startswith(b"\x00enc:")
    outputs.encoder = Encoder(down=True)
    staged.clear()
    with pytest.raises(RegistryUnavailable):
        asyncio.run(main())
    assert staged == []
    with pytest.raises(RecordRejected):  # the encoded size is the one checked
        outputs.encoder = Encoder()
        outputs.publisher.max_message_bytes = 10
        asyncio.run(main())
