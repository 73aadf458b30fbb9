"""Task events written through a Schema Registry: the input topic's value format and its reader
(the results topic's is in :mod:`service.core.result_events`).

A value in ``avro`` or ``jsonschema`` carries the registry's framing (a zero magic byte, the
writer's schema id, the body); :class:`ValueReader` reads it with ``confluent_kafka.schema_registry``'s
deserializers into the same object a JSON task event holds, and the decoder takes it from there.

Whose fault a failure is (blame by breadth):

- the record's: a wrong magic byte, a schema id the registry does not know (40403), a body that does
  not match its schema: :class:`PoisonError` ``decode``, with the registry's own words;
- the registry's (or its settings'): nothing answers, a time-out, 5xx, 429, refused credentials, any
  other error of the registry's: :class:`RegistryUnavailable`, an outage of every record alike,
  waited out like one of Redis or the broker and never a dead letter.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Self, TypeVar

# registry_http: the HTTP client the registry client uses (httpx, or httpx2 where installed)
from confluent_kafka.schema_registry import SchemaRegistryClient, SchemaRegistryError
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.schema_registry.common._httpx_compat import httpx as registry_http
from confluent_kafka.schema_registry.json_schema import JSONDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext, SerializationError
from pydantic import BaseModel, Field, SecretStr, model_validator

from service.core.errors import InfrastructureError, PoisonError

ValueFormat = Literal["json", "avro", "jsonschema"]
PROBE_TIMEOUT_S = 5.0
T = TypeVar("T")
SCHEMA_NOT_FOUND = 40403  # Confluent's error code for an unknown schema id
FRAME_BYTES = 5  # magic byte 0, then the schema id (big-endian)
TRANSPORT_ERRORS = (registry_http.TransportError, OSError)  # the registry not reached at all


@contextlib.contextmanager
def registry_faults(what: str) -> Iterator[None]:
    """Whose fault a registry call's failure is: the record's (``decode``: a schema id the registry
    never had, a body its schema cannot read) or every record's alike (:class:`RegistryUnavailable`:
    unreachable, refused credentials, a wrong URL, 429, 5xx)."""
    try:
        yield
    except SchemaRegistryError as exc:
        if exc.error_code == SCHEMA_NOT_FOUND:  # this record names a schema the registry never had
            raise PoisonError("decode", f"schema registry: {exc}") from exc
        raise RegistryUnavailable(f"schema registry: {exc}") from exc
    except TRANSPORT_ERRORS as exc:
        raise RegistryUnavailable(f"schema registry unreachable: {type(exc).__name__}: {exc}") from exc
    except SerializationError as exc:
        raise PoisonError("decode", f"{what}: {exc}") from exc


class SchemaRegistrySettings(BaseModel):
    """``AGENT_SCHEMA_REGISTRY__*``: where the registry is and how the input topic's values are written."""

    url: str | None = None  # a registry speaking Confluent's API (for Apicurio: .../apis/ccompat/v6)
    basic_auth: SecretStr | None = None  # "user:password"
    bearer_token: SecretStr | None = None
    timeout_s: float = Field(10.0, gt=0)
    input_format: ValueFormat = "json"  # the input topic's values: plain JSON, or through the registry
    results_format: ValueFormat = "json"  # the results topic's values (result and failed events)
    # the result event's schema registered under "<results topic>-value" on first use; off: a team
    # registers it (service/core/result_events.py) and the service only looks its id up
    auto_register: bool = True

    @model_validator(mode="after")
    def _url_when_used(self) -> Self:
        for name, fmt in (("input_format", self.input_format), ("results_format", self.results_format)):
            if fmt != "json" and not self.url:
                raise ValueError(f"schema_registry: {name} {fmt} needs a url")
        if self.basic_auth is not None and ":" not in self.basic_auth.get_secret_value():
            raise ValueError("schema_registry: basic_auth is 'user:password'")
        return self

    def client_conf(self) -> dict[str, Any]:
        conf: dict[str, Any] = {"url": self.url, "timeout": self.timeout_s}
        if self.basic_auth is not None:
            conf["basic.auth.user.info"] = self.basic_auth.get_secret_value()
        if self.bearer_token is not None:
            conf.update({"bearer.auth.credentials.source": "STATIC_TOKEN",
                         "bearer.auth.token": self.bearer_token.get_secret_value()})
        return conf

    def reader(self, topic: str) -> ValueReader | None:
        """The reader of ``topic``'s values in the input format, or None for plain JSON."""
        return None if self.input_format == "json" else ValueReader(self, topic)


class RegistryUnavailable(InfrastructureError):
    """The Schema Registry did not answer (or answered 5xx): every record waits, none is blamed."""


class RegistryUser:
    """A registry client with threads of its own to ask it in: a registry that hangs holds these,
    never the loop's default executor."""

    def __init__(self, settings: SchemaRegistrySettings, topic: str) -> None:
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="schema-registry")
        self.client = SchemaRegistryClient(settings.client_conf())
        self.context = SerializationContext(topic, MessageField.VALUE)

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the reader's threads (a call that may ask the registry)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args))

    async def answers(self) -> bool:
        """The registry answers (a probe: any failure means no)."""
        try:
            await asyncio.wait_for(self.off_loop(self.client.get_subjects), PROBE_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - any failure means "not answering"
            return False
        return True

    async def aclose(self) -> None:
        """Close the registry client's connections; a read still waiting on a hung registry is left to
        its time-out."""
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.client.close()


class ValueReader(RegistryUser):
    """Reads one topic's registry-framed values into plain objects (a dict for a task event).

    Blocking: the first value of each schema id asks the registry (the client caches the answer);
    callers run it off the event loop."""

    def __init__(self, settings: SchemaRegistrySettings, topic: str) -> None:
        super().__init__(settings, topic)
        self.format = settings.input_format
        self._deserialize: AvroDeserializer | JSONDeserializer
        if self.format == "avro":
            self._deserialize = AvroDeserializer(self.client)
        else:
            self._deserialize = JSONDeserializer(None, schema_registry_client=self.client)

    def __call__(self, value: bytes) -> Any:
        if len(value) < FRAME_BYTES or value[0] != 0:  # the record's fault whether or not the registry answers
            raise PoisonError("decode", f"{self.format} value: no Schema Registry framing (a zero magic byte and "
                              f"a 4-byte schema id), starts {value[:FRAME_BYTES]!r}")
        with registry_faults(f"{self.format} value"):
            return self._deserialize(value, self.context)

