"""Log lines that name their task and join its trace, without every call site passing the fields.

The processor opens a context for each record it handles (:func:`enter_record`: ``topic``,
``partition``, ``offset``) and names the task in it once the record is decoded (:func:`bind_task`:
``task_id``, ``kind``). :class:`TaskFields`, a filter on the log handler, copies those fields onto
every log record made while the task is handled, in this asyncio task or any it starts, with the
current OpenTelemetry span's ``trace_id`` and ``span_id`` (hex, as trace backends show them), so a
log line finds its trace and the trace its log lines. A field a call site passes in ``extra`` wins.

The JSON formatter (:func:`json_formatter`, python-json-logger) writes every such field, and any
other ``extra``, as a field of its own.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Final

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

TASK_FIELDS: Final = ("task_id", "kind", "topic", "partition", "offset")
TRACE_FIELDS: Final = ("trace_id", "span_id")

Fields = dict[str, str | int]

# the record being handled: one mutable dict per record, shared by the asyncio tasks it starts
# (they copy the context, not the dict), so a field bound later reaches their log lines too
_fields: ContextVar[Fields | None] = ContextVar("log_fields", default=None)


def enter_record(topic: str, partition: int, offset: int) -> Token[Fields | None]:
    """Log lines name this record until :func:`leave_record` with the token returned."""
    return _fields.set({"topic": topic, "partition": partition, "offset": offset})


def leave_record(token: Token[Fields | None]) -> None:
    _fields.reset(token)


def bind_task(task_id: str, kind: str) -> None:
    """Name the record's task in its log lines (a no-op outside a record)."""
    fields = _fields.get()
    if fields is not None:
        fields["task_id"] = task_id
        if kind:
            fields["kind"] = kind


def current_fields() -> Fields:
    """The fields a log line made here would carry: the record's and the current span's."""
    fields = dict(_fields.get() or {})
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        fields["trace_id"] = format(ctx.trace_id, "032x")
        fields["span_id"] = format(ctx.span_id, "016x")
    return fields


class TaskFields(logging.Filter):
    """Adds :func:`current_fields` to each log record, keeping what the call site gave in ``extra``."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in current_fields().items():
            if name not in record.__dict__:
                setattr(record, name, value)
        return True


class _Json(JsonFormatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's name
        return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


def json_formatter() -> logging.Formatter:
    """One JSON object a line: ``ts``, ``level``, ``logger``, ``msg``, ``exc`` when there is one, and
    every other attribute of the record (the task's fields, the trace's, a call site's ``extra``)."""
    return _Json(
        "{asctime}{levelname}{name}{message}", style="{", json_ensure_ascii=False,
        rename_fields={"asctime": "ts", "levelname": "level", "name": "logger", "message": "msg",
                       "exc_info": "exc"},
    )
