"""What the stages of the per-record pipeline share: the processor's settings, the model client it
calls, the two ways a stage ends a task early, and the trace span of the record in flight."""

from __future__ import annotations

from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from service.agents.tasks import Task, canonical_json
from service.core.batch_settings import BatchSettings
from service.core.schema_registry import ValueReader
from service.core.spans import TaskSpan
from service.llm.client import ChatRequest, ChatResult
from service.llm.tokens import TokenCounter, utf8_bytes

_NO_SPAN = TaskSpan()
_record_span: ContextVar[TaskSpan | None] = ContextVar("task_span", default=None)


def current_span() -> TaskSpan:
    """The span of the record this task is processing (a no-op span outside one)."""
    return _record_span.get() or _NO_SPAN


def set_record_span(span: TaskSpan) -> Token[TaskSpan | None]:
    """Make ``span`` the one :func:`current_span` answers until :func:`reset_record_span`."""
    return _record_span.set(span)


def reset_record_span(token: Token[TaskSpan | None]) -> None:
    _record_span.reset(token)


class ChatClient(Protocol):
    async def chat(self, request: ChatRequest) -> ChatResult: ...


@dataclass(frozen=True, slots=True)
class ProcessorConfig:
    max_task_bytes: int = 262_144
    max_attempts: int = 4
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    llm_timeout_s: float = 30.0
    busy_poll_s: float = 0.5
    lease_ms: int = 30_000
    context_tokens: int = 8192
    max_output_tokens: int = 512
    shadow_sample_rate: float = 0.0
    # a failure of the service's own code on one record: retried this many times, then `internal`
    internal_retries: int = 3
    internal_backoff_s: float = 0.5
    audit_topic: str = "agent.audit"  # where the audit entries of tool calls go
    # the longest one call waits for the endpoint (breaker, Retry-After, rate limits, window): then
    # the task is dead-lettered `unavailable`
    max_wait_s: float = 300.0
    # delegation (docs/DELEGATION.md): children per delegating step, depth of the tree, the longest
    # a parent without a deadline waits for its children; where children reply, and this
    # deployment's input topic (children of this deployment's kinds go there)
    max_children: int = 32
    max_depth: int = 5
    delegation_max_wait_s: float = 86_400.0
    replies_topic: str = "agent.replies"
    reply_topics: tuple[str, ...] = ()  # other deployments' replies topics a child may reply to
    input_topic: str = "agent.tasks"
    # sessions (docs/SESSIONS.md): a task's poll for its turn, its longest wait (then `session_busy`),
    # and how long a free session's head may not come before it is passed over
    session_poll_s: float = 0.5
    session_max_wait_s: float = 300.0
    session_stall_s: float = 120.0
    # how a prompt's tokens are counted (service.llm.tokens): the model's tokenizer, else UTF-8 bytes
    count_tokens: TokenCounter = utf8_bytes
    batch: BatchSettings = field(default_factory=BatchSettings)  # the batch lane (service.pipeline.batch_lane)
    # the input topic's values when written through a Schema Registry (None: plain JSON)
    read_value: ValueReader | None = None


class ToDeadLetter(Exception):
    """The task ends as a dead letter with this reason: raised by a stage, handled by the processor."""

    def __init__(self, reason: str, error: str, attempts: int) -> None:
        super().__init__(error)
        self.reason = reason
        self.error = error
        self.attempts = attempts


class Parked(Exception):
    """The task waits for a person (``waiting`` says for what): the processor parks it in the ledger."""

    def __init__(self, waiting: dict[str, Any]) -> None:
        super().__init__(f"waits for {waiting.get('what')}: {waiting.get('reason', '')}")
        self.waiting = waiting


class LostFence(Exception):
    """A newer fence holds the task: this worker stops writing, the new holder finishes it."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(ts: datetime) -> str:
    return ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def deadline_of(task: Task) -> str | None:
    return iso(task.deadline) if task.deadline is not None else None


# the tokens a chat template adds around one message (its role and separators): 3 to 5 in the
# OpenAI, ChatML and Llama 3 templates
MESSAGE_OVERHEAD_TOKENS = 8


def estimate_tokens(messages: list[dict[str, Any]], schema: dict[str, Any] | None,
                    tools: list[dict[str, Any]] | None = None, count: TokenCounter = utf8_bytes) -> int:
    """A request's prompt tokens, never undercounted: each text as ``count`` counts it (the model's
    tokenizer where it is known, else its UTF-8 bytes: :mod:`service.llm.tokens`), plus
    :data:`MESSAGE_OVERHEAD_TOKENS` a message. Used for the oversize check, the tenants' budgets and
    a session's history budget. In bytes, Chinese and Japanese text is about 3x over its tokens and
    English prose about 4x (``python -m benchmarks.token_estimates``); characters / 3, the estimate
    before, undercounted CJK threefold.
    """
    size = 0
    for m in messages:
        size += count(m.get("content") or "") + MESSAGE_OVERHEAD_TOKENS
        if "tool_calls" in m:
            size += _json_size(m["tool_calls"], count)
    if schema is not None:
        size += _json_size(schema, count)
    if tools:
        size += _json_size(tools, count)
    return size


def _json_size(value: Any, count: TokenCounter) -> int:
    """The tokens of ``value`` as compact JSON; in bytes, orjson's (the standard library's for what
    orjson cannot write)."""
    if count is utf8_bytes:
        try:
            return len(orjson.dumps(value))
        except TypeError:  # orjson.JSONEncodeError
            return utf8_bytes(canonical_json(value))
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = canonical_json(value)
    return count(text)


# a child task's place in its tree (service.pipeline.delegation): kept on every record that resumes
# the task, so a child that parks (for an approval, a reconcile answer or its own children) still
# replies to its parent, at its depth, once it resumes
PARENT, PARENT_STEP, CHILD = "agent.parent", "agent.parent_step", "agent.child"
REPLY_TO, DEPTH, PATH = "agent.reply_to", "agent.depth", "agent.path"
LINEAGE_HEADERS = (PARENT, PARENT_STEP, CHILD, REPLY_TO, DEPTH, PATH)
