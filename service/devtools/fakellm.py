"""A fault-injecting, OpenAI-compatible chat-completions server for tests, benchmarks and demos.

:class:`FakeLLM` is a plain ASGI application served by uvicorn in a background thread::

    with FakeLLM() as fake:                      # a free loopback port
        fake.add_fault(FaultRule("rate_limit", match="order-7", times=1))
        ...                                      # point a client at fake.base_url
        assert fake.calls_for("order-7") == 2

``python -m service.devtools.fakellm --host H --port P`` runs the same server in the foreground for tests
that need it in another process; they steer it through the control endpoints.

Answers
    ``POST /v1/chat/completions`` answers with a random instance of the JSON schema sent as
    ``response_format`` (``json_schema`` as OpenAI sends it, or llama.cpp's ``json_object`` with
    a ``schema``), different on every call unless a ``seed`` is given. Without a schema the answer
    is ``{"text": "<a few words>"}``. :func:`random_instance` lists the supported schema subset.

Faults
    An ordered list of :class:`FaultRule`; the first rule that matches a request is applied.
    ``match`` is a substring of the request's ``Idempotency-Key`` header (of the raw request body
    when the header is absent); ``times`` counts down the requests a rule still applies to.

    - ``latency``: wait ``delay_s``, then answer normally.
    - ``error``: HTTP ``status`` with an OpenAI error body.
    - ``rate_limit``: HTTP 429 with ``Retry-After`` (whole seconds) and ``retry-after-ms``.
    - ``truncate``: ``finish_reason: length``, the content cut in half (not valid JSON).
    - ``refuse``: ``finish_reason: content_filter`` and a refusal instead of the answer.
    - ``slow_success``: generate (and count) a valid answer, then wait ``delay_s`` before sending
      it; the client has usually given up by then, but the work was done.
    - ``invalid_json``: ``finish_reason: stop``, content that is not JSON.
    - ``schema_violation``: valid JSON that does not match the schema.
    - ``empty``: ``finish_reason: stop``, empty content.
    - ``disconnect``: close the connection without any response.

    Every fault but ``slow_success`` waits its ``delay_s`` before it acts.

Idempotent mode
    With ``idempotent=True`` a request whose ``Idempotency-Key`` was already answered with a valid
    completion gets the stored response body again, as providers that honour the header do.

Control endpoints (JSON; also served below ``/v1``)
    ``GET /_stats``, ``GET|POST|DELETE /_faults`` (POST replaces the rules), ``POST /_reset``,
    ``POST /_latency`` (``{"latency_s": x}``), ``GET|POST /_config`` (``{"idempotent": bool,
    "latency_s": x}``), ``GET /health``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import logging
import math
import random
import signal
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from types import FrameType, TracebackType
from typing import Any, Final, Self
from urllib.parse import unquote

import uvicorn

logger = logging.getLogger(__name__)

__all__ = [
    "FAULTS",
    "MODEL_NAME",
    "REFUSAL",
    "FakeLLM",
    "FaultRule",
    "SchemaError",
    "main",
    "random_instance",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MODEL_NAME: Final = "fake"
FAULTS: Final = (
    "latency",
    "error",
    "rate_limit",
    "truncate",
    "refuse",
    "slow_success",
    "invalid_json",
    "schema_violation",
    "empty",
    "disconnect",
)
REFUSAL: Final = "I can't help with that."

_VOCABULARY: Final = (
    "amber", "anchor", "apple", "arrow", "autumn", "basket", "beacon", "birch", "bridge", "candle",
    "canyon", "cedar", "cloud", "copper", "coral", "delta", "desert", "ember", "falcon", "fern",
    "forest", "garden", "glacier", "harbor", "hollow", "island", "ivory", "jasper", "lantern",
    "maple", "meadow", "meteor", "mirror", "nectar", "orbit", "pebble", "pepper", "prairie",
    "quartz", "raven", "river", "saddle", "shadow", "signal", "silver", "spruce", "summit",
    "thistle", "timber", "valley", "velvet", "willow", "winter", "zephyr",
)
_SIMPLE_TYPES: Final = frozenset({"string", "number", "integer", "boolean", "null", "object", "array"})
_LEAF_TYPES: Final = frozenset({"string", "number", "integer", "boolean", "null"})
_ANNOTATIONS: Final = frozenset({"title", "description", "default", "examples", "$comment"})
_SOFT_DEPTH: Final = 10  # deeper than this: only required members, fewest items, simplest branch
_HARD_DEPTH: Final = 64  # deeper than this the schema has no way out of its recursion
_DEFAULT_SPAN: Final = 100
_MAX_DEFAULT_ITEMS: Final = 3
_MAX_BODY_BYTES: Final = 16 * 1024 * 1024
_START_TIMEOUT_S: Final = 10.0
_STOP_TIMEOUT_S: Final = 10.0
_DROP_WAIT_S: Final = 5.0

_JSON: Final = (b"content-type", b"application/json")
_CHAT_PATHS: Final = frozenset({"/v1/chat/completions", "/chat/completions"})
_MODELS_PATHS: Final = frozenset({"/v1/models", "/models"})


# ============================================================================ schema instances


class SchemaError(ValueError):
    """The schema is malformed, unsupported or has no instance."""


def random_instance(schema: Mapping[str, Any] | bool, rng: random.Random | None = None) -> Any:
    """A random JSON value that satisfies ``schema``.

    Supported: ``type`` (one or a list), ``enum``, ``const``, objects (``properties``,
    ``required``, ``additionalProperties``, ``min/maxProperties``), strings (``min/maxLength``,
    common ``format`` values; 1-6 words otherwise), numbers and integers (``minimum``,
    ``maximum``, both ``exclusive*`` forms, ``multipleOf``), booleans, null, arrays (``items``,
    ``prefixItems``, ``min/maxItems``, ``uniqueItems``), ``anyOf``/``oneOf``/``allOf``, OpenAPI's
    ``nullable`` and local ``$ref`` (``#/$defs/...``, ``#/definitions/...``). ``pattern``, ``not``
    and conditionals are not honoured.

    Raises:
        SchemaError: the schema is malformed or cannot be satisfied.
    """
    return _InstanceGenerator(schema, rng if rng is not None else random.Random()).generate(schema, 0)


def _words(rng: random.Random, low: int = 1, high: int = 6) -> str:
    return " ".join(rng.choice(_VOCABULARY) for _ in range(rng.randint(low, high)))


def _number(schema: Mapping[str, Any], key: str) -> float | None:
    value = schema.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SchemaError(f"{key} must be a finite number, not {value!r}")
    return value


def _count(schema: Mapping[str, Any], key: str) -> int | None:
    value = schema.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SchemaError(f"{key} must be a non-negative integer, not {value!r}")
    return value


def _merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` and ``extra`` as one schema: properties merged, required united, rest overridden."""
    merged = dict(base)
    for key, value in extra.items():
        if key == "properties" and isinstance(merged.get(key), Mapping) and isinstance(value, Mapping):
            merged[key] = {**merged[key], **value}
        elif key == "required" and isinstance(merged.get(key), list) and isinstance(value, list):
            merged[key] = list(dict.fromkeys([*merged[key], *value]))
        else:
            merged[key] = value
    return merged


def _is_leaf(schema: Any) -> bool:
    """Whether generating ``schema`` cannot recurse (used to bottom out recursive schemas)."""
    if not isinstance(schema, Mapping):
        return True
    if "$ref" in schema or "properties" in schema or "items" in schema:
        return False
    kind = schema.get("type")
    if isinstance(kind, list):
        return any(k in _LEAF_TYPES for k in kind)
    return kind is None or kind in _LEAF_TYPES


def _fresh_key(rng: random.Random, taken: Iterable[str]) -> str:
    used = set(taken)
    key = rng.choice(_VOCABULARY)
    suffix = 2
    while key in used:
        key = f"{rng.choice(_VOCABULARY)}_{suffix}"
        suffix += 1
    return key


class _InstanceGenerator:
    __slots__ = ("_rng", "_root")

    def __init__(self, root: Mapping[str, Any] | bool, rng: random.Random) -> None:
        self._root = root
        self._rng = rng

    def generate(self, schema: Any, depth: int) -> Any:
        if depth > _HARD_DEPTH:
            raise SchemaError("schema nests too deeply (a recursive $ref without a way out?)")
        if schema is True:
            return self._any()
        if schema is False:
            raise SchemaError("the schema `false` has no instance")
        if not isinstance(schema, Mapping):
            raise SchemaError(f"a schema must be an object or a boolean, not {type(schema).__name__}")
        deep = depth >= _SOFT_DEPTH
        simpler = self._simplify(schema, deep)
        if simpler is not None:
            return self.generate(simpler, depth + 1)
        if "const" in schema:
            return copy.deepcopy(schema["const"])
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise SchemaError("enum must be a non-empty list")
            return copy.deepcopy(self._rng.choice(values))
        if schema.get("nullable") is True and (deep or self._rng.random() < 0.25):
            return None
        return self._typed(self._type(schema, deep), schema, depth, deep)

    def _typed(self, kind: str | None, schema: Mapping[str, Any], depth: int, deep: bool) -> Any:
        if kind == "object":
            return self._object(schema, depth, deep)
        if kind == "array":
            return self._array(schema, depth, deep)
        if kind == "string":
            return self._string(schema)
        if kind == "integer":
            return self._integer(schema)
        if kind == "number":
            return self._float(schema)
        if kind == "boolean":
            return self._rng.random() < 0.5
        if kind == "null":
            return None
        return self._any()

    def _simplify(self, schema: Mapping[str, Any], deep: bool) -> Any:
        """The schema with one ``$ref``, ``allOf`` or ``anyOf``/``oneOf`` taken out; None if none."""
        if "$ref" in schema:
            siblings = {k: v for k, v in schema.items() if k != "$ref" and k not in _ANNOTATIONS}
            target = self._resolve(schema["$ref"])
            return _merge(target, siblings) if siblings else target
        if "allOf" in schema:
            parts = schema["allOf"]
            if not isinstance(parts, list):
                raise SchemaError("allOf must be a list")
            merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
            for part in parts:
                if part is False:
                    raise SchemaError("allOf contains `false`")
                if isinstance(part, Mapping):
                    merged = _merge(merged, self._resolve(part["$ref"]) if "$ref" in part else part)
            return merged
        for keyword in ("anyOf", "oneOf"):
            if keyword in schema:
                return self._branch(schema, keyword, deep)
        return None

    # -- structure ------------------------------------------------------------------------------

    def _resolve(self, ref: Any) -> Mapping[str, Any]:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise SchemaError(f"only local JSON-pointer $ref values are supported, not {ref!r}")
        node: Any = self._root
        for raw in ref[2:].split("/") if ref != "#" else []:
            token = unquote(raw).replace("~1", "/").replace("~0", "~")
            if isinstance(node, Mapping) and token in node:
                node = node[token]
            elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                node = node[int(token)]
            else:
                raise SchemaError(f"$ref {ref!r} points nowhere")
        if node is True:
            return {}
        if not isinstance(node, Mapping):
            raise SchemaError(f"$ref {ref!r} does not point at a schema")
        return node

    def _branch(self, schema: Mapping[str, Any], keyword: str, deep: bool) -> Any:
        """One of the ``anyOf``/``oneOf`` options, with the keywords beside it merged in."""
        options = schema[keyword]
        if not isinstance(options, list) or not options:
            raise SchemaError(f"{keyword} must be a non-empty list")
        options = [o for o in options if o is not False] or options
        if deep:
            options = [o for o in options if _is_leaf(o)] or options
        chosen = self._rng.choice(options)
        rest = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf") and k not in _ANNOTATIONS}
        if chosen is True:
            return rest
        if not rest or not isinstance(chosen, Mapping):
            return chosen
        return _merge(rest, chosen)

    def _type(self, schema: Mapping[str, Any], deep: bool) -> str | None:
        kind = schema.get("type")
        if kind is None:
            if any(k in schema for k in ("properties", "required", "additionalProperties")):
                return "object"
            if any(k in schema for k in ("items", "prefixItems", "minItems", "maxItems")):
                return "array"
            if any(k in schema for k in ("minLength", "maxLength", "format", "pattern")):
                return "string"
            if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
                return "number"
            return None
        if isinstance(kind, list):
            if not kind or not all(isinstance(k, str) and k in _SIMPLE_TYPES for k in kind):
                raise SchemaError(f"unsupported type list {kind!r}")
            if deep:
                kind = [k for k in kind if k in _LEAF_TYPES] or kind
            return str(self._rng.choice(kind))
        if not isinstance(kind, str) or kind not in _SIMPLE_TYPES:
            raise SchemaError(f"unsupported type {kind!r}")
        return kind

    def _object(self, schema: Mapping[str, Any], depth: int, deep: bool) -> dict[str, Any]:
        properties = schema.get("properties") or {}
        required = schema.get("required") or []
        if not isinstance(properties, Mapping) or not isinstance(required, list):
            raise SchemaError("properties must be an object and required a list")
        additional = schema.get("additionalProperties", True)
        low = _count(schema, "minProperties") or 0
        high = _count(schema, "maxProperties")
        required_names = list(dict.fromkeys(str(name) for name in required))
        if high is not None and (len(required_names) > high or low > high):
            raise SchemaError("maxProperties is smaller than minProperties or the required members")

        names = self._members(properties, required_names, low, high, deep)
        extras = 0
        if additional is not False and not properties and not deep:
            extras = self._rng.randint(1, 3) if isinstance(additional, Mapping) else self._rng.randint(0, 2)
        extras = max(extras, low - len(names))
        if high is not None:
            extras = min(extras, high - len(names))
        if extras > 0 and additional is False:
            raise SchemaError("minProperties needs more members than the schema allows")

        result: dict[str, Any] = {}
        for name in names:
            if name in properties:
                result[name] = self.generate(properties[name], depth + 1)
            else:
                result[name] = self._extra(additional, depth)
        for _ in range(extras):
            result[_fresh_key(self._rng, [*properties, *result])] = self._extra(additional, depth)
        return result

    def _members(self, properties: Mapping[str, Any], required: list[str], low: int, high: int | None,
                 deep: bool) -> list[str]:
        """The declared members to fill: every required one, some optional ones, within the bounds."""
        names = list(required)
        optional = [name for name in properties if name not in required]
        if not deep:
            names += [name for name in optional if self._rng.random() < 0.5]
        for name in optional:
            if len(names) >= low:
                break
            if name not in names:
                names.append(name)
        if high is not None:
            dropped = [name for name in names if name not in required][: max(0, len(names) - high)]
            names = [name for name in names if name not in dropped]
        return names

    def _extra(self, additional: Any, depth: int) -> Any:
        if isinstance(additional, Mapping):
            return self.generate(additional, depth + 1)
        return _words(self._rng)

    def _array(self, schema: Mapping[str, Any], depth: int, deep: bool) -> list[Any]:
        rng = self._rng
        items: Any = schema.get("items", True)
        prefix: Any = schema.get("prefixItems", [])
        if isinstance(items, list):  # draft 4 tuple form
            prefix, items = items, schema.get("additionalItems", True)
        if not isinstance(prefix, list):
            raise SchemaError("prefixItems must be a list")
        low = _count(schema, "minItems") or 0
        high = _count(schema, "maxItems")
        if items is False:
            high = len(prefix) if high is None else min(high, len(prefix))
        if high is not None and low > high:
            raise SchemaError("minItems is larger than maxItems")
        if deep:
            size = low
        else:
            upper = max(low, _MAX_DEFAULT_ITEMS)
            size = rng.randint(low, upper if high is None else min(upper, high))
        unique = schema.get("uniqueItems") is True
        result: list[Any] = []
        seen: set[str] = set()
        for index in range(size):
            item_schema = prefix[index] if index < len(prefix) else items
            value = self.generate(item_schema, depth + 1)
            if unique:
                fingerprint = json.dumps(value, sort_keys=True)
                for _ in range(32):
                    if fingerprint not in seen:
                        break
                    value = self.generate(item_schema, depth + 1)
                    fingerprint = json.dumps(value, sort_keys=True)
                else:
                    if len(result) >= low:
                        break
                    raise SchemaError("cannot find enough distinct items for uniqueItems")
                seen.add(fingerprint)
            result.append(value)
        return result

    # -- scalars --------------------------------------------------------------------------------

    def _string(self, schema: Mapping[str, Any]) -> str:
        rng = self._rng
        low = _count(schema, "minLength") or 0
        high = _count(schema, "maxLength")
        if high is not None and low > high:
            raise SchemaError("minLength is larger than maxLength")
        formatted = self._formatted(schema.get("format"))
        if formatted is not None and low <= len(formatted) <= (high if high is not None else len(formatted)):
            return formatted
        text = _words(rng)
        while len(text) < low:
            text = f"{text} {rng.choice(_VOCABULARY)}"
        if high is not None and len(text) > high:
            cut = text[:high]
            text = cut.rstrip() if len(cut.rstrip()) >= low else cut
        return text

    def _formatted(self, fmt: Any) -> str | None:
        rng = self._rng
        word = rng.choice(_VOCABULARY)
        if fmt == "date-time":
            return (f"20{rng.randint(20, 29)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
                    f"T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z")
        if fmt == "date":
            return f"20{rng.randint(20, 29)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        if fmt == "time":
            return f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z"
        if fmt == "email":
            return f"{word}@example.com"
        if fmt in ("uri", "url", "iri"):
            return f"https://example.com/{word}"
        if fmt == "hostname":
            return f"{word}.example.com"
        if fmt == "ipv4":
            return ".".join(str(rng.randint(1, 254)) for _ in range(4))
        if fmt == "uuid":
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))
        return None

    def _bounds(self, schema: Mapping[str, Any]) -> tuple[float | None, bool, float | None, bool]:
        """(low, low is exclusive, high, high is exclusive), from both exclusive* dialects."""
        low, high = _number(schema, "minimum"), _number(schema, "maximum")
        low_x = high_x = False
        ex_low, ex_high = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        if isinstance(ex_low, bool):  # draft 4
            low_x = ex_low and low is not None
        elif (value := _number(schema, "exclusiveMinimum")) is not None and (low is None or value >= low):
            low, low_x = value, True
        if isinstance(ex_high, bool):
            high_x = ex_high and high is not None
        elif (value := _number(schema, "exclusiveMaximum")) is not None and (high is None or value <= high):
            high, high_x = value, True
        return low, low_x, high, high_x

    def _integer(self, schema: Mapping[str, Any]) -> int:
        low, low_x, high, high_x = self._bounds(schema)
        lo = None if low is None else (math.floor(low) + 1 if low_x else math.ceil(low))
        hi = None if high is None else (math.ceil(high) - 1 if high_x else math.floor(high))
        if lo is None:
            lo = 0 if hi is None or hi >= 0 else hi - _DEFAULT_SPAN
        if hi is None:
            hi = lo + _DEFAULT_SPAN
        step = _number(schema, "multipleOf")
        if step is not None:
            if step <= 0 or step != int(step):
                raise SchemaError("multipleOf of an integer must be a positive integer")
            k_lo, k_hi = -(-lo // int(step)), hi // int(step)
            if k_lo > k_hi:
                raise SchemaError("no multiple of multipleOf lies within the bounds")
            return self._rng.randint(k_lo, min(k_hi, k_lo + _DEFAULT_SPAN)) * int(step)
        if lo > hi:
            raise SchemaError("the integer bounds are empty")
        return self._rng.randint(lo, hi)

    def _float(self, schema: Mapping[str, Any]) -> float:
        rng = self._rng
        low, low_x, high, high_x = self._bounds(schema)
        lo = low if low is not None else (0.0 if high is None or high > 0 else high - _DEFAULT_SPAN)
        hi = high if high is not None else lo + _DEFAULT_SPAN

        def fits(value: float) -> bool:
            return (lo < value if low_x else lo <= value) and (value < hi if high_x else value <= hi)

        step = _number(schema, "multipleOf")
        if step is not None:
            if step <= 0:
                raise SchemaError("multipleOf must be positive")
            k_lo, k_hi = math.ceil(lo / step), math.floor(hi / step)
            if not fits(k_lo * step):
                k_lo += 1
            if not fits(k_hi * step):
                k_hi -= 1
            if k_lo > k_hi:
                raise SchemaError("no multiple of multipleOf lies within the bounds")
            return float(rng.randint(k_lo, min(k_hi, k_lo + _DEFAULT_SPAN)) * step)
        if lo > hi or (lo == hi and (low_x or high_x)):
            raise SchemaError("the number bounds are empty")
        for _ in range(8):
            value = rng.uniform(lo, hi)
            for candidate in (round(value, 3), value):
                if fits(candidate):
                    return float(candidate)
        return float((lo + hi) / 2)

    def _any(self) -> Any:
        rng = self._rng
        pick = rng.randrange(3)
        if pick == 0:
            return _words(rng)
        if pick == 1:
            return rng.randint(0, _DEFAULT_SPAN)
        return rng.random() < 0.5


def _violation(schema: Mapping[str, Any] | None) -> str:
    """Valid JSON that does not satisfy ``schema``."""
    root: Any = schema
    if isinstance(root, Mapping) and isinstance(root.get("$ref"), str):
        with contextlib.suppress(SchemaError):
            root = _InstanceGenerator(schema or {}, random.Random(0))._resolve(root["$ref"])
    if isinstance(root, Mapping):
        is_object = root.get("type") == "object" or "properties" in root
        permissive = not root.get("required") and root.get("additionalProperties", True) is not False
        if is_object and permissive:
            return '[{"unexpected":true}]'
    return '{"unexpected":true}'


# ============================================================================ fault rules


@dataclass(frozen=True, slots=True)
class FaultRule:
    """One fault to inject; see the module docstring for what each ``fault`` does."""

    fault: str
    match: str | None = None  # substring of the Idempotency-Key (or of the raw body)
    times: int | None = None  # requests this rule still applies to; None: forever
    probability: float = 1.0  # chance that a matching request is hit
    delay_s: float = 0.0
    status: int = 500  # for "error"
    retry_after_s: float = 1.0  # for "rate_limit"

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; known: {', '.join(FAULTS)}")
        if self.match is not None and not isinstance(self.match, str):
            raise ValueError(f"match must be a string or None: {self.match!r}")
        if self.times is not None and (isinstance(self.times, bool) or not isinstance(self.times, int)
                                       or self.times < 1):
            raise ValueError(f"times must be a positive integer or None: {self.times!r}")
        for name in ("probability", "delay_s", "retry_after_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0: {value!r}")
        if self.probability > 1:
            raise ValueError(f"probability must be within [0, 1]: {self.probability!r}")
        if isinstance(self.status, bool) or not isinstance(self.status, int) or not 400 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP error status (400-599): {self.status!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FaultRule:
        """A rule from its JSON form; unknown keys are an error."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a fault rule must be an object, not {type(data).__name__}")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown fault rule fields: {', '.join(sorted(unknown))}")
        if "fault" not in data:
            raise ValueError("a fault rule needs a 'fault'")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rule(rule: FaultRule | Mapping[str, Any]) -> FaultRule:
    return rule if isinstance(rule, FaultRule) else FaultRule.from_dict(rule)


class _Armed:
    """A rule in the active list with the applications it has left."""

    __slots__ = ("remaining", "rule")

    def __init__(self, rule: FaultRule) -> None:
        self.rule = rule
        self.remaining = rule.times


# ============================================================================ HTTP helpers


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class _ChatRequest:
    model: str
    schema: Mapping[str, Any] | None
    prompt_chars: int


def _parse_chat(body: bytes) -> _ChatRequest:
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise _BadRequest(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise _BadRequest("the request body must be a JSON object")
    model = data.get("model", MODEL_NAME)
    if not isinstance(model, str) or not model:
        raise _BadRequest("'model' must be a non-empty string", "model")
    if data.get("stream"):
        raise _BadRequest("streaming is not supported by this server", "stream")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("'messages' must be a non-empty array", "messages")
    chars = 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _BadRequest(f"messages[{index}] must be an object with a 'role'", f"messages[{index}]")
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(part["text"]) for part in content
                         if isinstance(part, dict) and isinstance(part.get("text"), str))
        elif content is not None:
            raise _BadRequest(f"messages[{index}].content must be a string or an array",
                              f"messages[{index}].content")
    return _ChatRequest(model, _schema_of(data.get("response_format")), chars)


def _schema_of(response_format: Any) -> Mapping[str, Any] | None:
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise _BadRequest("'response_format' must be an object", "response_format")
    kind = response_format.get("type")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise _BadRequest("'response_format.json_schema.schema' must be an object",
                              "response_format.json_schema")
        schema = spec.get("schema")
    elif kind == "json_object":
        schema = response_format.get("schema")
        if schema is not None and not isinstance(schema, dict):
            raise _BadRequest("'response_format.schema' must be an object", "response_format.schema")
    elif kind == "text":
        schema = None
    else:
        raise _BadRequest(f"unsupported response_format type {kind!r}", "response_format.type")
    return schema


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def _read_body(receive: Receive, send: Send) -> bytes | None:
    """The whole request body; None when the client left or the body was refused as too large."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > _MAX_BODY_BYTES:
            await _respond(send, 413, _error_body(413, f"the request body exceeds {_MAX_BODY_BYTES} bytes"))
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _dumps(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def _error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> bytes:
    if status == 429:
        kind = "requests"
    elif status >= 500:
        kind = "server_error"
    else:
        kind = "invalid_request_error"
    return _dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


async def _respond(send: Send, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [_JSON, (b"content-length", str(len(body)).encode()), *headers],
    })
    await send({"type": "http.response.body", "body": body})


async def _drop_connection(receive: Receive, send: Send) -> None:
    """Close the client's connection without a response.

    ASGI cannot express this, so the transport comes from the server's ``send`` (uvicorn's
    request cycle); once it is closed, wait for the disconnect so the server sends nothing.
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None or not callable(getattr(transport, "close", None)):
        raise ConnectionAbortedError("disconnect fault: the server exposes no transport to close")
    transport.close()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_DROP_WAIT_S):
            while (await receive())["type"] != "http.disconnect":
                pass


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


# ============================================================================ the server


Handler = Callable[[bytes], Awaitable[tuple[int, Any]]]


class FakeLLM:
    """A fault-injecting OpenAI-compatible chat-completions server (and ASGI app).

    All public methods are thread-safe: the server runs on its own thread and event loop.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_s: float = 0.0,
        seed: int | None = None,
        idempotent: bool = False,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be within 0-65535: {port!r}")
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._latency_s = 0.0
        self.latency_s = latency_s
        self._idempotent = idempotent
        self._rules: list[_Armed] = []
        self._stored: dict[str, bytes] = {}
        self._reset_stats()
        self._routes: dict[str, dict[str, Handler]] = {
            "/_stats": {"GET": self._get_stats},
            "/_faults": {"GET": self._get_faults, "POST": self._post_faults, "DELETE": self._delete_faults},
            "/_reset": {"POST": self._post_reset},
            "/_latency": {"POST": self._post_latency},
            "/_config": {"GET": self._get_config, "POST": self._post_config},
            "/health": {"GET": self._get_health},
        }
        for path in _MODELS_PATHS:
            self._routes[path] = {"GET": self._get_models}
        # the running server (start/stop)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None  # set on stop: cuts every injected wait short
        self._failure: BaseException | None = None
        self._base_url: str | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http://host:port/v1``; kept after :meth:`stop` so clients can aim at a dead server."""
        if self._base_url is None:
            raise RuntimeError("FakeLLM has not been started")
        return self._base_url

    @property
    def port(self) -> int:
        if self._socket is None:
            raise RuntimeError("FakeLLM is not running")
        return int(self._socket.getsockname()[1])

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> str:
        """Serve in a background thread; returns the base URL once the server accepts requests."""
        if self._thread is not None:
            return self.base_url
        sock = _bind(self._host, self._port)
        port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self,
            host=self._host,
            port=port,
            http="auto",
            loop="asyncio",
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            server_header=False,
            timeout_keep_alive=30,
            timeout_graceful_shutdown=5,
        )
        server = uvicorn.Server(config)
        self._failure = None
        thread = threading.Thread(target=self._run, args=(server, sock), name=f"fakellm-{port}", daemon=True)
        self._server, self._thread, self._socket = server, thread, sock
        thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"FakeLLM did not start on {self._host}:{port}") from self._failure
            time.sleep(0.002)
        self._base_url = f"http://{_url_host(self._host)}:{port}/v1"
        logger.info("fakellm listening on %s", self._base_url)
        return self._base_url

    def stop(self) -> None:
        """Stop serving and wait for the server thread; waiting faults are cut short."""
        server, thread, sock = self._server, self._thread, self._socket
        if server is None or thread is None:
            return
        server.should_exit = True
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(wake.set)
        thread.join(_STOP_TIMEOUT_S)
        if thread.is_alive():
            logger.warning("fakellm did not stop within %.0f s; forcing it", _STOP_TIMEOUT_S)
            server.force_exit = True
            thread.join(_STOP_TIMEOUT_S)
        if sock is not None:
            sock.close()
        self._server = self._thread = self._socket = None
        self._loop = self._wake = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _run(self, server: uvicorn.Server, sock: socket.socket) -> None:
        try:
            asyncio.run(self._serve(server, sock))
        except BaseException as exc:  # noqa: BLE001 - reported by start(); a thread has no caller
            self._failure = exc
            if not isinstance(exc, SystemExit):
                logger.exception("fakellm server thread failed")

    async def _serve(self, server: uvicorn.Server, sock: socket.socket) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        await server.serve(sockets=[sock])

    async def _sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        wake = self._wake
        if wake is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await wake.wait()

    # -- configuration --------------------------------------------------------------------------

    @property
    def latency_s(self) -> float:
        """Seconds every chat completion waits before it is answered."""
        return self._latency_s

    @latency_s.setter
    def latency_s(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"latency_s must be a finite number >= 0: {value!r}")
        self._latency_s = float(value)

    @property
    def idempotent(self) -> bool:
        """Whether a repeated Idempotency-Key gets its first valid response again."""
        return self._idempotent

    @idempotent.setter
    def idempotent(self, value: bool) -> None:
        self._idempotent = bool(value)

    def add_fault(self, rule: FaultRule | Mapping[str, Any]) -> None:
        """Append a rule; it applies only when no earlier rule matches."""
        armed = _Armed(_rule(rule))
        with self._lock:
            self._rules.append(armed)

    def set_faults(self, rules: Iterable[FaultRule | Mapping[str, Any]]) -> None:
        """Replace all rules (validated first: a bad rule changes nothing)."""
        armed = [_Armed(_rule(rule)) for rule in rules]
        with self._lock:
            self._rules = armed

    def clear_faults(self) -> None:
        with self._lock:
            self._rules = []

    def faults(self) -> list[FaultRule]:
        """The active rules, ``times`` showing what each has left."""
        with self._lock:
            return [_replace_times(a.rule, a.remaining) for a in self._rules]

    def reset(self) -> None:
        """Drop every rule, the statistics and the stored idempotent responses."""
        with self._lock:
            self._rules = []
            self._stored = {}
            self._reset_stats()

    # -- statistics -----------------------------------------------------------------------------

    def _reset_stats(self) -> None:
        self._requests = 0
        self._completions = 0
        self._valid_completions = 0
        self._replayed = 0
        self._bad_requests = 0
        self._fault_counts: Counter[str] = Counter()
        self._by_key: Counter[str] = Counter()
        self._completions_by_key: Counter[str] = Counter()

    def stats(self) -> dict[str, Any]:
        """A snapshot of what the server saw and did.

        ``requests``: chat-completion requests; ``completions``: answers generated, the faulty
        ones included; ``valid_completions``: schema-valid answers generated (normal, latency,
        slow_success); ``replayed``: idempotent replays; ``bad_requests``: 400s for malformed
        requests; ``faults``: applications per fault; ``by_key``: requests per Idempotency-Key;
        ``completions_by_key``: valid completions per Idempotency-Key.
        """
        with self._lock:
            return {
                "requests": self._requests,
                "completions": self._completions,
                "valid_completions": self._valid_completions,
                "replayed": self._replayed,
                "bad_requests": self._bad_requests,
                "faults": dict(self._fault_counts),
                "by_key": dict(self._by_key),
                "completions_by_key": dict(self._completions_by_key),
            }

    def calls_for(self, key_substring: str) -> int:
        """Requests whose Idempotency-Key contains ``key_substring``."""
        with self._lock:
            return sum(n for key, n in self._by_key.items() if key_substring in key)

    # -- ASGI -----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if path in _CHAT_PATHS:
            if method == "POST":
                await self._chat(scope, receive, send)
            else:
                await _respond(send, 405, _error_body(405, f"{method} is not allowed on {path}"))
            return
        route = self._routes.get(path.rstrip("/") or "/")
        if route is None and path.startswith("/v1/"):  # control endpoints also answer below the base URL
            route = self._routes.get(path[3:].rstrip("/"))
        if route is None:
            await _respond(send, 404, _error_body(404, f"no route for {path}"))
            return
        handler = route.get(method)
        if handler is None:
            await _respond(send, 405, _error_body(405, f"{method} is not allowed on {path}"))
            return
        body = await _read_body(receive, send)
        if body is None:
            return
        try:
            status, payload = await handler(body)
        except (ValueError, TypeError) as exc:
            await _respond(send, 400, _error_body(400, str(exc)))
            return
        await _respond(send, status, _dumps(payload))

    @staticmethod
    async def _lifespan(receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = _header(scope, b"idempotency-key")
        with self._lock:
            self._requests += 1
            if key is not None:
                self._by_key[key] += 1
        body = await _read_body(receive, send)
        if body is None:
            return
        try:
            request = _parse_chat(body)
        except _BadRequest as exc:
            await self._bad_request(send, str(exc), exc.param)
            return
        rule = self._pick_rule(key, body)
        await self._sleep(self._latency_s)
        fault = rule.fault if rule is not None else None
        if rule is not None and fault != "slow_success":
            await self._sleep(rule.delay_s)

        if fault == "disconnect":
            await _drop_connection(receive, send)
            return
        if rule is not None and fault == "error":
            message = f"the model server failed (HTTP {rule.status})"
            await _respond(send, rule.status, _error_body(rule.status, message))
            return
        if rule is not None and fault == "rate_limit":
            headers = [
                (b"retry-after", str(math.ceil(rule.retry_after_s)).encode()),
                (b"retry-after-ms", str(round(rule.retry_after_s * 1000)).encode()),
            ]
            body_429 = _error_body(429, "Rate limit reached; retry later.", code="rate_limit_exceeded")
            await _respond(send, 429, body_429, headers)
            return

        try:
            if fault is None or fault in ("latency", "slow_success"):
                response, replayed = self._answer(request, key)
            else:
                response, replayed = self._faulty_answer(fault, request), False
        except SchemaError as exc:
            await self._bad_request(send, f"invalid response_format schema: {exc}", "response_format")
            return
        if rule is not None and fault == "slow_success":
            await self._sleep(rule.delay_s)
        await _respond(send, 200, response, [(b"idempotent-replayed", b"true")] if replayed else ())

    async def _bad_request(self, send: Send, message: str, param: str | None) -> None:
        with self._lock:
            self._bad_requests += 1
        await _respond(send, 400, _error_body(400, message, param=param))

    def _pick_rule(self, key: str | None, body: bytes) -> FaultRule | None:
        """The first rule that applies to this request, counted and used up."""
        with self._lock:
            if not self._rules:
                return None
            text = key if key is not None else body.decode("utf-8", "replace")
            for armed in self._rules:
                rule = armed.rule
                if rule.match is not None and rule.match not in text:
                    continue
                if rule.probability < 1.0 and self._rng.random() >= rule.probability:
                    continue
                if armed.remaining is not None:
                    armed.remaining -= 1
                    if armed.remaining <= 0:
                        self._rules.remove(armed)
                self._fault_counts[rule.fault] += 1
                return rule
        return None

    def _answer(self, request: _ChatRequest, key: str | None) -> tuple[bytes, bool]:
        """A valid answer: the stored one for a repeated key in idempotent mode, else a new one."""
        if key is not None and self._idempotent:
            with self._lock:
                stored = self._stored.get(key)
                if stored is not None:
                    self._replayed += 1
                    return stored, True
        content = self._content(request.schema)
        response = self._completion(request, content, "stop")
        with self._lock:
            self._completions += 1
            self._valid_completions += 1
            if key is not None:
                self._completions_by_key[key] += 1
                if self._idempotent:
                    response = self._stored.setdefault(key, response)
        return response, False

    def _faulty_answer(self, fault: str, request: _ChatRequest) -> bytes:
        refusal: str | None = None
        if fault == "truncate":
            full = self._content(request.schema)
            content = full[: len(full) // 2]
            if _parses(content):  # a prefix of a bare number can still be JSON
                content += ","
            reason = "length"
        elif fault == "refuse":
            content = refusal = REFUSAL
            reason = "content_filter"
        elif fault == "invalid_json":
            content = f"Sure! Here is the answer: {_words(self._rng)}."
            reason = "stop"
        elif fault == "schema_violation":
            content = _violation(request.schema)
            reason = "stop"
        elif fault == "empty":
            content = ""
            reason = "stop"
        else:  # pragma: no cover - FaultRule validates the names
            raise AssertionError(f"no answer for fault {fault!r}")
        response = self._completion(request, content, reason, refusal)
        with self._lock:
            self._completions += 1
        return response

    def _content(self, schema: Mapping[str, Any] | None) -> str:
        value = {"text": _words(self._rng)} if schema is None else random_instance(schema, self._rng)
        return json.dumps(value, separators=(",", ":"))

    def _completion(self, request: _ChatRequest, content: str, finish_reason: str,
                    refusal: str | None = None) -> bytes:
        prompt_tokens = request.prompt_chars // 4 + 1
        completion_tokens = len(content) // 4 + 1
        return _dumps({
            "id": f"chatcmpl-{self._rng.getrandbits(96):024x}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": refusal},
                "logprobs": None,
                "finish_reason": finish_reason,
            }],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        })

    # -- control endpoints ----------------------------------------------------------------------

    async def _get_stats(self, body: bytes) -> tuple[int, Any]:
        return 200, self.stats()

    async def _get_faults(self, body: bytes) -> tuple[int, Any]:
        return 200, {"faults": [rule.to_dict() for rule in self.faults()]}

    async def _post_faults(self, body: bytes) -> tuple[int, Any]:
        data = _json_body(body)
        if isinstance(data, dict) and "faults" in data:
            data = data["faults"]
        if not isinstance(data, list):
            raise ValueError("expected a JSON array of fault rules")
        self.set_faults(data)
        return await self._get_faults(body)

    async def _delete_faults(self, body: bytes) -> tuple[int, Any]:
        self.clear_faults()
        return 200, {"faults": []}

    async def _post_reset(self, body: bytes) -> tuple[int, Any]:
        self.reset()
        return 200, {"ok": True}

    async def _post_latency(self, body: bytes) -> tuple[int, Any]:
        data = _json_body(body)
        if not isinstance(data, dict) or "latency_s" not in data:
            raise ValueError('expected {"latency_s": <seconds>}')
        self.latency_s = data["latency_s"]
        return 200, {"latency_s": self.latency_s}

    async def _get_config(self, body: bytes) -> tuple[int, Any]:
        return 200, {"idempotent": self.idempotent, "latency_s": self.latency_s}

    async def _post_config(self, body: bytes) -> tuple[int, Any]:
        data = _json_body(body)
        if not isinstance(data, dict) or set(data) - {"idempotent", "latency_s"}:
            raise ValueError('expected {"idempotent": <bool>, "latency_s": <seconds>} (both optional)')
        if "idempotent" in data:
            if not isinstance(data["idempotent"], bool):
                raise ValueError("idempotent must be true or false")
            self.idempotent = data["idempotent"]
        if "latency_s" in data:
            self.latency_s = data["latency_s"]
        return await self._get_config(body)

    async def _get_models(self, body: bytes) -> tuple[int, Any]:
        model = {"id": MODEL_NAME, "object": "model", "created": 0, "owned_by": "fakellm"}
        return 200, {"object": "list", "data": [model]}

    async def _get_health(self, body: bytes) -> tuple[int, Any]:
        return 200, {"status": "ok"}


def _replace_times(rule: FaultRule, remaining: int | None) -> FaultRule:
    return rule if rule.times == remaining else replace(rule, times=remaining)


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _json_body(body: bytes) -> Any:
    try:
        return json.loads(body or b"null")
    except ValueError as exc:
        raise ValueError(f"the request body is not valid JSON: {exc}") from exc


# ============================================================================ command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.devtools.fakellm",
        description="Serve a fault-injecting OpenAI-compatible chat-completions API until stopped.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--latency-s", type=float, default=0.0, help="wait before every answer")
    parser.add_argument("--seed", type=int, default=None, help="make the answers reproducible")
    parser.add_argument("--idempotent", action="store_true", help="replay answers for repeated Idempotency-Keys")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")

    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        fake = FakeLLM(args.host, args.port, latency_s=args.latency_s, seed=args.seed, idempotent=args.idempotent)
        with fake:
            print(f"fakellm listening on {fake.base_url}", flush=True)
            while not stopping.wait(0.5):
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
