"""The input topic's value format through a Schema Registry: its settings, and whose fault each
failure of the reader is (the record's: ``decode``; the registry's: an outage, never a verdict)."""

from __future__ import annotations

import asyncio
import http.server
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import ValidationError

from service.agents.tasks import decode_task
from service.core.errors import InfrastructureError, PoisonError
from service.core.schema_registry import RegistryUnavailable, SchemaRegistrySettings, ValueReader
from service.core.settings import Settings


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unreachable(fmt: str = "avro") -> ValueReader:
    settings = SchemaRegistrySettings(url=f"http://127.0.0.1:{closed_port()}", input_format=fmt,  # type: ignore[arg-type]
                                      timeout_s=1)
    return ValueReader(settings, "t")


def test_a_registry_format_needs_a_url_and_json_needs_no_reader() -> None:
    with pytest.raises(ValidationError, match="input_format avro needs a url"):
        SchemaRegistrySettings(input_format="avro")
    with pytest.raises(ValidationError, match="user:password"):
        SchemaRegistrySettings(url="http://r", input_format="avro", basic_auth="nocolon")  # type: ignore[arg-type]
    assert SchemaRegistrySettings().reader("t") is None
    assert isinstance(SchemaRegistrySettings(url="http://r", input_format="jsonschema").reader("t"), ValueReader)


def test_settings_read_from_the_environment_with_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_SCHEMA_REGISTRY__URL", "http://registry:8081")
    monkeypatch.setenv("AGENT_SCHEMA_REGISTRY__INPUT_FORMAT", "avro")
    monkeypatch.setenv("AGENT_SCHEMA_REGISTRY__BASIC_AUTH", "svc:pw")
    s = Settings()
    assert s.schema_registry.input_format == "avro"
    conf = s.schema_registry.client_conf()
    assert conf["url"] == "http://registry:8081" and conf["basic.auth.user.info"] == "svc:pw"
    assert "pw" not in repr(s.schema_registry)  # a secret
    monkeypatch.setenv("AGENT_SCHEMA_REGISTRY_HOME", "/opt/registry")  # the dev tools' own, not a setting
    assert Settings().schema_registry.url == "http://registry:8081"


def test_the_registry_unreachable_is_an_outage_not_the_records_fault() -> None:
    value = b"\x00" + (1).to_bytes(4, "big") + b"\x02k"
    with pytest.raises(RegistryUnavailable, match="unreachable"):
        unreachable()(value)
    # through the decoder too: never turned into a dead letter's PoisonError
    with pytest.raises(InfrastructureError):
        decode_task(value, None, 1024, unreachable())


@pytest.mark.parametrize("fmt", ["avro", "jsonschema"])
@pytest.mark.parametrize(("value", "words"), [
    (b"\x07\x00\x00\x00\x01{}", "nor framed by a Schema Registry"),
    (b"{\"kind\": ", "nor framed by a Schema Registry"),
    (b"\x00\x00", "framing"),
    (b"\x07\xff\xfe", "not UTF-8, nor framed by a Schema Registry"),
])
def test_a_value_without_the_registrys_framing_is_a_decode_dead_letter(fmt: str, value: bytes, words: str) -> None:
    with pytest.raises(PoisonError, match=words) as caught:
        decode_task(value, None, 1024, unreachable(fmt))  # refused before the registry is asked
    assert caught.value.reason == "decode"


def test_what_the_reader_returns_is_decoded_as_a_task_event() -> None:
    def read(_value: bytes) -> Any:
        return {"task_id": "t-1", "kind": "classify", "input": {"text": "hi", "labels": ["a"]}, "deadline": None}

    task = decode_task(b"\x00\x00\x00\x00\x01", None, 1024, read)
    assert (task.key, task.kind) == ("t-1", "classify")
    with pytest.raises(PoisonError, match="must be an object") as caught:
        decode_task(b"\x00\x00\x00\x00\x01", None, 1024, lambda _v: ["not", "an", "object"])
    assert caught.value.reason == "schema"


def test_plain_json_beside_the_registrys_values_is_read_as_json() -> None:
    """The service's own producers (children, schedules, the API) write JSON to the input topic."""
    value = b'{"task_id": "t-2", "kind": "classify", "input": {"text": "hi", "labels": ["a"]}}'
    task = decode_task(value, None, 1024, unreachable())  # the registry is never asked
    assert (task.key, task.kind) == ("t-2", "classify")


def test_the_outage_probe_says_no_while_nothing_answers() -> None:
    reader = unreachable()
    try:
        assert asyncio.run(reader.answers()) is False
    finally:
        asyncio.run(reader.aclose())


class Answering(http.server.BaseHTTPRequestHandler):
    """A registry that refuses the credentials for schema id 8 and knows nothing else (no schema id 7,
    none of the topic associations the client asks for first)."""

    def do_GET(self) -> None:  # noqa: N802 - the handler's protocol
        status, body = ((401, {"error_code": 40101, "message": "Unauthorized"}) if "/ids/8" in self.path
                        else (404, {"error_code": 40403, "message": "Schema not found"}))
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def answering_registry() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answering)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()


def test_an_unknown_schema_id_is_the_records_fault_refused_credentials_are_not(answering_registry: str) -> None:
    reader = ValueReader(SchemaRegistrySettings(url=answering_registry, input_format="avro", timeout_s=2), "t")
    try:
        with pytest.raises(PoisonError, match="40403") as caught:
            reader(b"\x00" + (7).to_bytes(4, "big") + b"\x02k")
        assert caught.value.reason == "decode"
        with pytest.raises(RegistryUnavailable, match="40101"):  # every record would fail alike: an outage
            reader(b"\x00" + (8).to_bytes(4, "big") + b"\x02k")
    finally:
        asyncio.run(reader.aclose())
