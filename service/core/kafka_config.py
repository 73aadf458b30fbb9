"""Any librdkafka property for the service's Kafka clients, and the ones the service keeps for itself.

``AGENT_KAFKA__CONFIG`` is a JSON object of librdkafka properties applied to every client (the
consumer, the producers, the admin client); ``AGENT_KAFKA__CONSUMER_CONFIG``,
``AGENT_KAFKA__PRODUCER_CONFIG`` and ``AGENT_KAFKA__ADMIN_CONFIG`` apply to one kind of client and
override the common object. Values are JSON strings, numbers or booleans; each reaches librdkafka as
its string (``true``/``false`` for booleans).

A property the service owns is refused when the settings are read, naming it and why: the offset
commits, idempotence, isolation, the transactional id and the group are what the delivery guarantees
rest on (docs/ARCHITECTURE.md), and a property with a typed setting is set through that setting, so
one value never has two sources. Callbacks are code, not settings, and are refused too.

A property whose name says it holds a credential (a password, a secret, a key, a JAAS or OAUTHBEARER
config, a token) is kept as a :class:`~pydantic.SecretStr`: it renders as ``**********`` in logs, in
``repr`` and in every dump of the settings, and only :func:`client_properties` unwraps it.

This module builds the security properties too (:func:`security_properties`), and refuses OIDC
without its client and token endpoint (:func:`check_oidc`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Protocol, TypeVar

from pydantic import BeforeValidator, SecretStr
from pydantic_settings import NoDecode

Client = Literal["consumer", "producer", "admin"]
Property = str | SecretStr

WHY_OFFSETS = "offsets are committed only once every earlier record's outcome is durable"
WHY_IDEMPOTENCE = "results and dead letters are written by an idempotent producer, so a retry never writes twice"
WHY_ACKS = "an outcome counts as written only when every in-sync replica has it (acks=all)"
WHY_CALLBACK = "a callback is code, not a setting; the service installs its own"

# property (lowercase) -> why the service keeps it
OWNED: dict[str, str] = {
    "enable.auto.commit": WHY_OFFSETS,
    "auto.commit.enable": WHY_OFFSETS,
    "enable.auto.offset.store": WHY_OFFSETS,
    "enable.idempotence": WHY_IDEMPOTENCE,
    "retries": WHY_IDEMPOTENCE,
    "message.send.max.retries": WHY_IDEMPOTENCE,
    "acks": WHY_ACKS,
    "request.required.acks": WHY_ACKS,
    "isolation.level": "the service reads committed records only, never those of aborted transactions",
    "enable.partition.eof": "the consumer loop takes records only, not end-of-partition events",
    "batch.size": "a batch is sized to fit the output topics' max.message.bytes (read from the broker)",
    "on_commit": WHY_CALLBACK,
    "on_delivery": WHY_CALLBACK,
    "logger": WHY_CALLBACK,
    "default.topic.config": "topic properties go in the same object as the others",
}

# property (lowercase) -> the typed setting that sets it
TYPED: dict[str, str] = {
    "bootstrap.servers": "bootstrap_servers", "metadata.broker.list": "bootstrap_servers",
    "client.id": "client_id", "group.id": "group_id", "auto.offset.reset": "auto_offset_reset",
    "session.timeout.ms": "session_timeout_ms", "heartbeat.interval.ms": "heartbeat_interval_ms",
    "max.poll.interval.ms": "max_poll_interval_ms", "group.protocol": "group_protocol",
    "partition.assignment.strategy": "partition_assignment_strategy",
    "queued.max.messages.kbytes": "prefetch_kbytes", "queued.min.messages": "prefetch_messages",
    "fetch.max.bytes": "fetch_max_bytes", "transactional.id": "transactional_id",
    "transaction.timeout.ms": "transaction_timeout_ms", "security.protocol": "security_protocol",
    "sasl.mechanism": "sasl_mechanism", "sasl.mechanisms": "sasl_mechanism",
    "sasl.username": "sasl_username", "sasl.password": "sasl_password",
    "ssl.ca.location": "ssl_ca_location", "ssl.certificate.location": "ssl_certificate_location",
    "ssl.key.location": "ssl_key_location", "ssl.key.password": "ssl_key_password",
    **{f"sasl.oauthbearer.{name}": f"sasl_oauthbearer_{name.replace('.', '_')}"
       for name in ("method", "client.id", "client.secret", "token.endpoint.url", "scope", "extensions")},
}

SECRET = re.compile(r"password|secret|jaas|oauthbearer\.config|key\.pem|keystore|token|credential|private")


def refusal(name: str) -> str | None:
    """Why ``name`` cannot be set through a config object, or None when it can."""
    key = name.strip().lower()
    if key in TYPED:
        return f"{name} has a typed setting: use AGENT_KAFKA__{TYPED[key].upper()}"
    if key in OWNED:
        return f"{name} is owned by the service: {OWNED[key]}"
    if key.endswith("_cb"):
        return f"{name} is owned by the service: {WHY_CALLBACK}"
    return None


def _value(name: str, value: object) -> Property:
    if isinstance(value, SecretStr):
        return value
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int | float | str):
        text = str(value)
    else:
        raise ValueError(f"{name}: a librdkafka property is a string, a number or a boolean, not {type(value).__name__}")
    return SecretStr(text) if SECRET.search(name.lower()) else text


def parse_properties(raw: object) -> dict[str, Property]:
    """A config object as given (JSON text or a mapping), checked: every property may be set and
    has a scalar value; credentials wrapped as secrets."""
    if isinstance(raw, str | bytes):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise ValueError("a JSON object of librdkafka properties, e.g. {\"client.rack\": \"use1-az1\"}") from None
    if not isinstance(raw, Mapping):
        raise ValueError("a JSON object of librdkafka properties, e.g. {\"client.rack\": \"use1-az1\"}")
    properties: dict[str, Property] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{name!r} is not a librdkafka property name")
        why = refusal(name)
        if why:
            raise ValueError(why)
        properties[name.strip()] = _value(name, value)
    return properties


# a settings field holding a config object (its JSON is parsed here, so an error names the field)
ClientConfig = Annotated[dict[str, Property], NoDecode, BeforeValidator(parse_properties)]


def client_properties(*objects: Mapping[str, Property]) -> dict[str, Any]:
    """The objects merged in order (a later one wins), secrets unwrapped for librdkafka."""
    merged: dict[str, Any] = {}
    for properties in objects:
        for name, value in properties.items():
            merged[name] = value.get_secret_value() if isinstance(value, SecretStr) else value
    return merged


class SecurityFields(Protocol):
    """The security settings of :class:`service.core.settings.KafkaSettings`."""

    @property
    def security_protocol(self) -> str: ...
    @property
    def sasl_mechanism(self) -> str | None: ...
    @property
    def sasl_username(self) -> str | None: ...
    @property
    def sasl_password(self) -> SecretStr | None: ...
    @property
    def ssl_ca_location(self) -> str | None: ...
    @property
    def ssl_certificate_location(self) -> str | None: ...
    @property
    def ssl_key_location(self) -> str | None: ...
    @property
    def ssl_key_password(self) -> SecretStr | None: ...
    @property
    def sasl_oauthbearer_method(self) -> str: ...
    @property
    def sasl_oauthbearer_client_id(self) -> str | None: ...
    @property
    def sasl_oauthbearer_client_secret(self) -> SecretStr | None: ...
    @property
    def sasl_oauthbearer_token_endpoint_url(self) -> str | None: ...
    @property
    def sasl_oauthbearer_scope(self) -> str | None: ...
    @property
    def sasl_oauthbearer_extensions(self) -> str | None: ...


S = TypeVar("S", bound=SecurityFields)


def _reveal(secret: SecretStr | None) -> str | None:
    return secret.get_secret_value() if secret else None


def security_properties(k: SecurityFields) -> dict[str, Any]:
    """The security properties of every client: the protocol, SASL (OAUTHBEARER's OIDC method
    included) and TLS, each only when set."""
    optional: dict[str, str | None] = {
        "sasl.mechanism": k.sasl_mechanism,
        "sasl.username": k.sasl_username,
        "sasl.password": _reveal(k.sasl_password),
        "ssl.ca.location": k.ssl_ca_location,
        "ssl.certificate.location": k.ssl_certificate_location,
        "ssl.key.location": k.ssl_key_location,
        "ssl.key.password": _reveal(k.ssl_key_password),
    }
    if k.sasl_oauthbearer_method == "oidc":
        optional.update({
            "sasl.oauthbearer.method": "oidc",
            "sasl.oauthbearer.client.id": k.sasl_oauthbearer_client_id,
            "sasl.oauthbearer.client.secret": _reveal(k.sasl_oauthbearer_client_secret),
            "sasl.oauthbearer.token.endpoint.url": k.sasl_oauthbearer_token_endpoint_url,
            "sasl.oauthbearer.scope": k.sasl_oauthbearer_scope,
            "sasl.oauthbearer.extensions": k.sasl_oauthbearer_extensions,
        })
    return {"security.protocol": k.security_protocol, **{name: v for name, v in optional.items() if v is not None}}


def check_oidc(k: S) -> S:
    """``k``, once sure its OIDC (a method of the OAUTHBEARER mechanism) has a client and a token endpoint."""
    if k.sasl_oauthbearer_method != "oidc":
        return k
    if k.sasl_mechanism != "OAUTHBEARER":
        raise ValueError("kafka.sasl_oauthbearer_method=oidc needs kafka.sasl_mechanism=OAUTHBEARER "
                         f"(it is {k.sasl_mechanism})")
    missing = [name for name in ("sasl_oauthbearer_client_id", "sasl_oauthbearer_client_secret",
                                 "sasl_oauthbearer_token_endpoint_url") if not getattr(k, name)]
    if missing:
        raise ValueError(f"kafka: OAUTHBEARER with sasl_oauthbearer_method=oidc needs {', '.join(missing)} "
                         "(the client the identity provider issues tokens to, and its token endpoint)")
    return k
