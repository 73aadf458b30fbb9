"""Task events: decoded and validated at the edge, plain typed objects inside.

The task key is the producer's ``task_id`` or, when absent, a digest of ``(kind, canonical input)``;
either way it names the work, not the attempt. The fingerprint of ``(kind, input)`` is kept with
the ledger record so that the same ``task_id`` with another input is a conflict.

A task may name its **tenant**: the field ``tenant`` of the event, or else the record header
``tenant``. Either must be a short label (:data:`~dedup.keys.TENANT_PATTERN`: at most 64 of
``A-Za-z0-9._-``, starting with a letter or digit); anything else (too long, control characters, a
lone surrogate, bytes that are not UTF-8, a header that disagrees with the field) is the record's
fault: dead letter ``schema``. A task that names none belongs to the tenant ``default``. A named
tenant (other than ``default``) is part of the work: it enters the fingerprint, so two tenants'
identical inputs are two tasks, and one ``task_id`` sent under another tenant is a conflict.

A task may name its **session** (docs/SESSIONS.md): the field ``session`` of the event, or else
the record header ``agent.session``, either a task key (:data:`~dedup.keys.TASK_KEY_PATTERN`); both
present and different, two headers naming different sessions, or a header that is no task key, is
dead letter ``schema`` (the same session named twice is that session). A named session
enters the fingerprint (the same input in two sessions is two pieces of work).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from dedup.keys import TASK_KEY_PATTERN, TENANT_MAX_LEN, TENANT_PATTERN, is_valid_tenant
from service.core.errors import InfrastructureError, PoisonError

KIND_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
DEFAULT_TENANT = "default"  # the tenant of a task that names none
TENANT_HEADER = "tenant"
SESSION_HEADER = "agent.session"


class TaskEvent(BaseModel):
    """The value of a record on the input topic."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task_id: str | None = Field(None, pattern=TASK_KEY_PATTERN)
    kind: str = Field(pattern=KIND_PATTERN)
    input: dict[str, Any]
    deadline: AwareDatetime | None = None
    priority: Literal["interactive", "batch"] = "batch"
    tenant: str | None = Field(None, pattern=TENANT_PATTERN, max_length=TENANT_MAX_LEN)
    session: str | None = Field(None, pattern=TASK_KEY_PATTERN)


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, UTF-8 kept: the same data always gives the same text.

    The text is the standard library's (``json.dumps`` with sorted keys, compact separators,
    ``ensure_ascii=False``, ``allow_nan=False``): digests and fingerprints stored in the ledger
    depend on it byte for byte. orjson writes the same text several times faster except for a
    float in exponent form (``1e+16`` is ``1e16`` there, ``1e-05`` is ``0.00001``), a non-finite
    float (``null`` there, an error here), an integer beyond 64 bits or a key that is not a string
    (refused there): its text is kept only when none of those can be in it, otherwise the standard
    library writes it (tests/unit/test_tasks.py checks the two agree on arbitrary JSON data)."""
    fast = _orjson_canonical(value)
    return _canonical_stdlib(value) if fast is None else fast.decode()


def canonical_bytes(value: Any) -> bytes:
    """:func:`canonical_json`'s text in UTF-8, what digests hash: orjson's own bytes when they are
    that text (no decoding and encoding again)."""
    fast = _orjson_canonical(value)
    return _canonical_stdlib(value).encode() if fast is None else fast


def _orjson_canonical(value: Any) -> bytes | None:
    """orjson's text of ``value`` when it is the standard library's, else None."""
    try:
        fast = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # orjson.JSONEncodeError: big integers, non-string keys, surrogates, other types
        return None
    if fast[:1] not in b'{["' or _NOT_PLAIN.search(fast):
        return None
    return fast


# a value orjson may write otherwise than the standard library, where a value starts (after a colon,
# a comma or a bracket): a number with an exponent, a small float without one (1e-05 is 0.00001
# there), a NaN written as null. The same bytes inside a string only send that value the slower way.
_NOT_PLAIN = re.compile(rb"[:,\[](?:-?[0-9.]+e|-?0\.0000|null)")


def _canonical_stdlib(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def digest(text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    return "sha256:" + hashlib.sha256(data).hexdigest()


def fingerprint(kind: str, task_input: dict[str, Any], tenant: str | None = None, session: str | None = None) -> str:
    """The digest of the work: its kind, its input and, when it names one, its tenant (the tenant
    ``default`` is the same work as none, so tasks without a tenant keep their fingerprint) and its
    session."""
    work: dict[str, Any] = {"kind": kind, "input": task_input}
    if tenant is not None and tenant != DEFAULT_TENANT:
        work["tenant"] = tenant
    if session is not None:
        work["session"] = session
    return digest(canonical_bytes(work))


def task_key(event: TaskEvent) -> str:
    if event.task_id is not None:
        return event.task_id
    return "auto-" + fingerprint(event.kind, event.input, event.tenant, event.session).removeprefix("sha256:")[:40]


@dataclass(frozen=True, slots=True)
class Task:
    key: str
    fingerprint: str
    event: TaskEvent
    deadline: datetime | None
    traceparent: str | None
    tenant: str = DEFAULT_TENANT

    @property
    def session(self) -> str | None:
        """The session the task names (docs/SESSIONS.md), or None."""
        return self.event.session

    @property
    def kind(self) -> str:
        return self.event.kind

    def expired(self, now: datetime) -> bool:
        return self.deadline is not None and now >= self.deadline

    def remaining_s(self, now: datetime) -> float | None:
        return None if self.deadline is None else (self.deadline - now).total_seconds()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def header(headers: list[tuple[str, bytes]] | None, name: str) -> str | None:
    for key, value in headers or ():
        if key == name and value is not None:
            try:
                return value.decode("utf-8") if isinstance(value, bytes) else str(value)
            except UnicodeDecodeError:
                return None
    return None


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def loads(text: str | bytes) -> Any:
    """JSON as the contract reads it: no NaN or Infinity, no number that overflows to one."""
    if not isinstance(text, str) or text.startswith("\ufeff"):  # bytes, or a BOM: json.loads says what it is
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    return _DECODER.decode(text)


# one decoder: json.loads with hooks would build a new one, and its scanner, for every record
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def decode_task(value: bytes | None, headers: list[tuple[str, bytes]] | None, max_bytes: int,
                read: Callable[[bytes], Any] | None = None) -> Task:
    """Turn a record value into a :class:`Task`, or raise :class:`PoisonError` with its reason.

    ``read`` turns the bytes into the event's object when they are framed by a Schema Registry
    (:class:`~service.core.schema_registry.ValueReader`; a value not starting with its zero magic
    byte is read as JSON); its :class:`InfrastructureError` (the registry did not answer) is no
    fault of the record's.

    The size limit is checked before any parsing. Whatever a producer sends, this raises nothing
    but :class:`PoisonError`: invalid UTF-8 or Unicode (a lone surrogate escape such as
    ``"\\ud800"`` is valid JSON but not text), numbers out of range or non-finite (``1e400``),
    dates that overflow once normalised to UTC, nesting deeper than the parser allows, and any
    exception a validator raises are all the record's fault.
    """
    if value is None:
        raise PoisonError("decode", "record has no value")
    if len(value) > max_bytes:
        raise PoisonError("oversize", f"value is {len(value)} bytes, limit is {max_bytes}")
    try:
        return _decode(value, headers, read)
    except (PoisonError, InfrastructureError):
        raise
    except UnicodeDecodeError as exc:
        raise PoisonError("decode", f"value is not UTF-8{_unframed(read)}: {exc.reason} at byte {exc.start}") from exc
    except UnicodeError as exc:
        raise PoisonError("decode", f"value is not valid Unicode: {_reason(exc)}") from exc
    except (ValueError, RecursionError) as exc:
        raise PoisonError("decode", f"value is not JSON{_unframed(read)}: {_reason(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - anything raised by a record's bytes is the record's fault
        raise PoisonError("schema", f"task cannot be read: {_reason(exc)}") from exc


def _unframed(read: Callable[[bytes], Any] | None) -> str:
    return "" if read is None else ", nor framed by a Schema Registry (a zero magic byte)"


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def _parse(value: bytes) -> Any:
    """:func:`loads` of the record's bytes, through orjson when it reads them exactly as the standard
    library does: both refuse NaN, Infinity, a number that overflows to one, invalid UTF-8 and a
    lone surrogate escape, but orjson reads an integer beyond 64 bits as a float and nests deeper
    than the standard library. A value that may hold either (a run of 19 digits, many brackets),
    or that orjson refuses, is read by :func:`loads`, which also words what is wrong."""
    if value.count(b"{") + value.count(b"[") <= _FAST_BRACKETS and (
            len(value) - len(value.translate(None, _DIGITS)) < 19 or not _LONG_DIGITS.search(value)):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            pass
    return loads(value.decode("utf-8"))


_FAST_BRACKETS = 200
_LONG_DIGITS = re.compile(rb"[0-9]{19}")  # searched only when the value holds 19 digits at all
_DIGITS = b"0123456789"


def _decode(value: bytes, headers: list[tuple[str, bytes]] | None, read: Callable[[bytes], Any] | None) -> Task:
    # beside the registry's values, the service's own (children, schedules, the API's submissions) are JSON:
    # no JSON text starts with the registry's zero magic byte
    data = read(value) if read is not None and value.startswith(b"\x00") else _parse(value)
    if not isinstance(data, dict):
        raise PoisonError("schema", f"task must be an object, got {type(data).__name__}")
    if data.get("deadline") is None and (hdr := header(headers, "deadline")):
        data["deadline"] = hdr
    _tenant_from_header(data, headers)
    _session_from_header(data, headers)
    event = _plain_event(data)
    if event is None:  # anything but the plain case: pydantic validates it and says what is wrong
        try:
            event = TaskEvent.model_validate(data)
        except ValidationError as exc:
            raise PoisonError("schema", describe_validation(exc)) from exc
    try:
        deadline = event.deadline.astimezone(UTC) if event.deadline else None
    except (OverflowError, ValueError) as exc:
        raise PoisonError("schema", f"deadline: out of range once converted to UTC ({event.deadline})") from exc
    try:
        print_ = fingerprint(event.kind, event.input, event.tenant, event.session)
    except UnicodeEncodeError as exc:
        raise PoisonError("decode", "input holds a lone surrogate escape: not valid Unicode text") from exc
    except (ValueError, OverflowError) as exc:
        raise PoisonError("schema", f"input cannot be written as canonical JSON: {_reason(exc)}") from exc
    key = event.task_id if event.task_id is not None else "auto-" + print_.removeprefix("sha256:")[:40]
    return Task(key=key, fingerprint=print_, event=event, deadline=deadline,
                traceparent=header(headers, "traceparent"), tenant=event.tenant or DEFAULT_TENANT)


def _tenant_from_header(data: dict[str, Any], headers: list[tuple[str, bytes]] | None) -> None:
    """The ``tenant`` header, checked before anything reads it: its length first (a header may be
    megabytes), then UTF-8 and the label's pattern. A task whose field and header name two tenants
    is refused: which one pays must never be a guess."""
    raw: bytes | str | None = None
    for key, value in headers or ():
        if key == TENANT_HEADER and value is not None:
            if raw is not None:
                raise PoisonError("schema", "tenant: the header appears more than once")
            raw = value
    if raw is None:
        return
    if len(raw) > TENANT_MAX_LEN:
        raise PoisonError("schema", f"tenant: the header is {len(raw)} long, at most {TENANT_MAX_LEN}")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError as exc:
        raise PoisonError("schema", "tenant: the header is not UTF-8") from exc
    if not is_valid_tenant(text):
        raise PoisonError("schema", f"tenant: the header is not a tenant id ({TENANT_PATTERN})")
    body = data.get("tenant")
    if body is None:
        data["tenant"] = text
    elif body != text:
        raise PoisonError("schema", "tenant: the field and the header name different tenants")


def _session_from_header(data: dict[str, Any], headers: list[tuple[str, bytes]] | None) -> None:
    """The ``agent.session`` header when the event names no session; a header that is no task key,
    or headers (or a header and the field) that name different sessions, are refused: which session
    a task belongs to must never be a guess. The same session named twice is that session."""
    named = {_session_header_text(value) for key, value in headers or () if key == SESSION_HEADER and value is not None}
    if not named:
        return
    if len(named) > 1:
        raise PoisonError("schema", "session: the agent.session headers name different sessions")
    (text,) = named
    body = data.get("session")
    if body is None:
        data["session"] = text
    elif body != text:
        raise PoisonError("schema", "session: the field and the header name different sessions")


def _session_header_text(raw: bytes | str) -> str:
    """One ``agent.session`` header's session id: its length checked first (a header may be
    megabytes), then UTF-8 and the task key's pattern."""
    if len(raw) > 1024:
        raise PoisonError("schema", f"session: the header is {len(raw)} long")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError as exc:
        raise PoisonError("schema", "session: the header is not UTF-8") from exc
    if not _TASK_ID_RE.fullmatch(text):
        raise PoisonError("schema", f"session: the header is not a session id ({TASK_KEY_PATTERN})")
    return text


_EVENT_FIELDS = frozenset(TaskEvent.model_fields)
_KIND_RE = re.compile(KIND_PATTERN)
_TASK_ID_RE = re.compile(TASK_KEY_PATTERN)


def _plain_event(data: dict[str, Any]) -> TaskEvent | None:
    """The event of the common, valid case checked with plain tests (a third of the cost of
    :meth:`TaskEvent.model_validate`): known fields only, a well-formed ``kind`` and ``task_id``, an
    object ``input``, no ``deadline``, a known ``priority``, no ``tenant``. None for anything else,
    which the model then validates (and explains when it is invalid): both accept and build exactly
    the same events."""
    fields = _plain_fields(data)
    if fields is None:
        return None
    kind, task_id, task_input, priority = fields
    # what model_construct does for this model, without its generic field loop (half the decode)
    event = _new_event(TaskEvent)
    _set(event, "__dict__", {"task_id": task_id, "kind": kind, "input": task_input, "deadline": None,
                             "priority": "interactive" if priority == "interactive" else "batch", "tenant": None,
                             "session": None})
    _set(event, "__pydantic_fields_set__", set(data))
    _set(event, "__pydantic_extra__", None)
    _set(event, "__pydantic_private__", None)
    return event


def _plain_fields(data: dict[str, Any]) -> tuple[str, str | None, dict[str, Any], str] | None:
    """``(kind, task_id, input, priority)`` of an event of the plain case (see :func:`_plain_event`)."""
    if (not _EVENT_FIELDS.issuperset(data) or data.get("deadline") is not None or data.get("tenant") is not None
            or data.get("session") is not None):
        return None
    kind, task_id, task_input = data.get("kind"), data.get("task_id"), data.get("input")
    priority = data.get("priority", "batch")
    if (
        type(kind) is not str or not _KIND_RE.fullmatch(kind)
        or not (task_id is None or (type(task_id) is str and _TASK_ID_RE.fullmatch(task_id)))
        or type(task_input) is not dict
        or type(priority) is not str or priority not in ("interactive", "batch")
    ):
        return None
    return kind, task_id, task_input, priority


# the headers decode_task reads into the event: a record with any of them takes the full decode
_EVENT_HEADERS = frozenset({"deadline", TENANT_HEADER, SESSION_HEADER})


def screen_key(value: bytes | None, headers: list[tuple[str, bytes]] | None, max_bytes: int) -> tuple[str, str] | None:
    """``(task key, fingerprint)`` of a record of the plain case (see :func:`_plain_event`; no
    header the event reads), exactly as :func:`decode_task` finds them, without building its task:
    what the replay screen asks the ledger about. None for anything else, a record that does not
    decode too: :func:`decode_task` then decides, and words what is wrong."""
    if value is None or len(value) > max_bytes or (headers and any(k in _EVENT_HEADERS for k, _v in headers)):
        return None
    try:
        data = _parse(value)
        fields = _plain_fields(data) if type(data) is dict else None
        if fields is None:
            return None
        kind, task_id, task_input, _priority = fields
        print_ = fingerprint(kind, task_input)
    except Exception:  # noqa: BLE001 - whatever it is, decode_task says it
        return None
    return (task_id if task_id is not None else "auto-" + print_.removeprefix("sha256:")[:40]), print_


_new_event = TaskEvent.__new__
_set = object.__setattr__


def describe_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False)[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "task"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)[:500]
