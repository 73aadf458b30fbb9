"""Tools a step may offer the model: what a tool is, how it runs, how it is reconciled and undone.

A tool is a side effect. The service, not the tool, makes it happen once: every call gets an
idempotency key derived from the work (task, step, call ordinal), its intent is journaled before
it runs and its result after, a redelivered task replays recorded results instead of calling
again, and a call whose result was never journaled is *reconciled* before anything else happens:
the tool's :meth:`Tool.reconcile` asks the downstream whether that key landed. Only a definite
"no" lets the call run again; "cannot tell" parks the task for an operator.

A tool's part of the bargain:

- :meth:`Tool.run` passes :attr:`ToolCall.key` on to the downstream (the HTTP tool sends it as
  ``Idempotency-Key``), so that a stale worker that still gets a call out is deduplicated there;
- it raises :class:`ToolError` when the downstream refused the call for good (nothing happened; the
  model sees the error) and :class:`ToolUnknown` when it cannot tell whether the call took effect
  (a timeout, a dropped connection, a 5xx);
- :meth:`Tool.reconcile` answers :meth:`Reconciled.landed`, :meth:`Reconciled.absent` or
  :meth:`Reconciled.unknown`; the default cannot tell;
- :meth:`Tool.undo`, when the effect can be undone, is what ``agent-service task compensate`` runs.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
from jsonschema.validators import validator_for
from pydantic import BaseModel

TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# a URL, without the punctuation that may follow it in a sentence
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]{0,15}://[^\s'\"<>]*[^\s'\"<>:.,;)\]]")
# what a status answer may say of a call the downstream has not finished
PENDING_WORDS = frozenset({"pending", "running", "in_progress", "in-progress", "processing", "queued", "accepted"})
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
# a tool's parameters: a JSON Schema, or a pydantic model whose schema it is
Parameters = Mapping[str, Any] | type[BaseModel]


def parameters_schema(parameters: Parameters | None) -> dict[str, Any]:
    """The JSON Schema of a tool's arguments: as given, made from a pydantic model, or none at all."""
    if parameters is None:
        return dict(_NO_PARAMETERS)
    if isinstance(parameters, type) and issubclass(parameters, BaseModel):
        schema = parameters.model_json_schema()
        schema.pop("title", None)
        return schema
    return dict(parameters)


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call of a tool, as the tool sees it."""

    key: str  # the idempotency key: the same for every attempt, replica and redelivery of this call
    task_id: str
    step: str
    ordinal: int  # 1, 2, ... within the step, in the order the model asked for them
    tool: str
    arguments: dict[str, Any]
    fence: int  # the claim that runs it; a downstream that knows fences may refuse an older one
    traceparent: str | None = None  # the task's W3C trace context, sent on (HttpTool: the header)


@dataclass(frozen=True, slots=True)
class Reconciled:
    """What the downstream says about a call whose result was not journaled."""

    state: str  # "landed" | "absent" | "pending" | "unknown"
    result: Any = None
    detail: str = ""

    @classmethod
    def landed(cls, result: Any) -> Reconciled:
        """The call took effect; ``result`` is what it returned (it goes to the model)."""
        return cls("landed", result)

    @classmethod
    def absent(cls) -> Reconciled:
        """The call certainly did not take effect: it may run again."""
        return cls("absent")

    @classmethod
    def pending(cls, detail: str = "") -> Reconciled:
        """The downstream still works on the call: ask again later, never run it again meanwhile."""
        return cls("pending", detail=detail)

    @classmethod
    def unknown(cls, detail: str) -> Reconciled:
        """Cannot tell: the task parks until an operator decides."""
        return cls("unknown", detail=detail)


def safe_url(url: str) -> str:
    """``url`` as ``scheme://host[:port]/path``: no userinfo, query or fragment (where webhooks keep
    their secrets), and no path segment that looks like a token (Slack's and Discord's webhooks keep
    theirs in the path), so it may be logged, stored in a reason or shown on a read-only page."""
    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
    except ValueError:
        return "[url]"
    if not parts.scheme or not host:
        return "[url]"
    path = "/".join("…" if _secret_like(segment) else segment for segment in parts.path.split("/"))
    return f"{parts.scheme}://{host}{path}"


def _secret_like(segment: str) -> bool:
    """A path segment that may be a credential: long and mixing letters with digits (a token, a
    UUID), or very long whatever it holds. Short ids and words stay readable."""
    if len(segment) >= 32:
        return True
    return len(segment) >= 16 and any(c.isdigit() for c in segment) and any(c.isalpha() for c in segment)


def scrub_urls(text: str) -> str:
    """``text`` with every URL in it cut down by :func:`safe_url`."""
    return _URL.sub(lambda m: safe_url(m.group(0)), text)


class ToolError(Exception):
    """The downstream refused the call; nothing happened. The model sees ``str(error)``."""


class ToolUnknown(Exception):
    """Whether the call took effect is unknown (a timeout, a dropped connection, a 5xx)."""


class Tool:
    """A tool a step offers. Subclasses set ``name``, ``description``, ``parameters`` and :meth:`run`."""

    name: str = "tool"
    description: str = ""
    parameters: Mapping[str, Any] = _NO_PARAMETERS  # the JSON Schema of the arguments
    timeout_s: float = 10.0
    # how long after its caller gave up a call may still take effect downstream (None: timeout_s);
    # a "did not land" heard before that is not believed: the call may still be in flight
    settle_s: float | None = None

    @property
    def settle_after_s(self) -> float:
        return self.timeout_s if self.settle_s is None else self.settle_s

    def spec(self) -> dict[str, Any]:
        """The entry of the request's ``tools`` list (OpenAI function calling)."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description, "parameters": dict(self.parameters)}}

    def invalid(self, arguments: Any) -> str | None:
        """Why ``arguments`` do not fit :attr:`parameters` (None when they do)."""
        if not isinstance(arguments, dict):
            return "the arguments must be a JSON object"
        errors = sorted(_validator(self).iter_errors(arguments), key=lambda e: list(e.absolute_path))
        if not errors:
            return None
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(root)"
        return f"{where}: {first.message[:200]}"

    async def run(self, call: ToolCall) -> Any:
        """Make the effect; return what the model should see (JSON data). Pass ``call.key`` on."""
        raise NotImplementedError

    async def reconcile(self, call: ToolCall) -> Reconciled:
        """Did the call with ``call.key`` take effect? The default cannot tell."""
        return Reconciled.unknown(f"tool {self.name} cannot tell whether a call landed")

    async def undo(self, call: ToolCall, result: Any) -> Any:
        """Undo the effect of ``call`` (which returned ``result``); idempotent on ``call.key``."""
        raise NotImplementedError

    @property
    def can_undo(self) -> bool:
        return type(self).undo is not Tool.undo

    async def aclose(self) -> None:
        """Release what the tool holds (connections); called when the service stops."""


@functools.lru_cache(maxsize=256)
def _cached_validator(tool: Tool) -> Any:
    schema = dict(tool.parameters)
    cls = validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _validator(tool: Tool) -> Any:
    return _cached_validator(tool)


def check_tool(tool: Tool) -> None:
    """Refuse a tool whose name or schema the model could not be given (``ValueError``)."""
    if not TOOL_NAME.fullmatch(tool.name):
        raise ValueError(f"tool name {tool.name!r} must match [A-Za-z0-9_-]{{1,64}}")
    try:
        _validator(tool)
    except Exception as exc:  # noqa: BLE001 - any schema error refuses the tool
        raise ValueError(f"tool {tool.name}: its parameters are not a JSON Schema: {exc}") from None


Handler = Callable[[ToolCall], Any | Awaitable[Any]]


class FunctionTool(Tool):
    """A Python callable as a tool: ``run(call)``, and optionally ``reconcile(call)`` and ``undo(call, result)``.
    ``parameters``: a JSON Schema or a pydantic model (its schema); ``@function_tool`` makes one from a
    typed function's signature (function_tools.py).

    Each may be a plain function or a coroutine function. Without ``reconcile``, a call that died
    between its intent and its result parks the task: only the function's owner knows whether it ran.
    """

    def __init__(self, name: str, run: Handler, *, parameters: Parameters | None = None,
                 description: str = "", reconcile: Callable[[ToolCall], Any] | None = None,
                 undo: Callable[[ToolCall, Any], Any] | None = None, timeout_s: float = 10.0,
                 settle_s: float | None = None) -> None:
        self.name, self.description, self.timeout_s, self.settle_s = name, description, timeout_s, settle_s
        self.parameters = parameters_schema(parameters)
        self._run, self._reconcile, self._undo = run, reconcile, undo
        check_tool(self)

    async def run(self, call: ToolCall) -> Any:
        return await maybe_await(self._run(call))

    async def reconcile(self, call: ToolCall) -> Reconciled:
        if self._reconcile is None:
            return await super().reconcile(call)
        answer = await maybe_await(self._reconcile(call))
        if not isinstance(answer, Reconciled):
            raise TypeError(f"tool {self.name}: reconcile must return a Reconciled, not {type(answer).__name__}")
        return answer

    async def undo(self, call: ToolCall, result: Any) -> Any:
        if self._undo is None:
            raise NotImplementedError
        return await maybe_await(self._undo(call, result))

    @property
    def can_undo(self) -> bool:
        return self._undo is not None


async def maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class HttpTool(Tool):
    """A webhook or REST call as a tool.

    ``url`` receives the arguments as a JSON body (``method`` POST by default) with the headers
    ``Idempotency-Key`` (the call's key), ``X-Task-Id``, ``X-Fence`` and the task's ``traceparent``. A 2xx answer is the result
    (its JSON, or ``{"status": n}`` without a body); 408, 409, 425, 429 and 5xx, a timeout or a
    dropped connection leave the outcome unknown; another status is a refusal the model is told of.

    ``status_url`` (``{key}`` is replaced by the URL-quoted key) is asked when a call must be
    reconciled: 200 means it landed (the body is its result), 404 that it did not (believed only
    once the call cannot be in flight any more, :attr:`Tool.settle_s`), 202, 409, 425 or a 200 whose
    body's ``status`` says pending or running that it is in progress (asked again later), anything
    else cannot tell. Errors carry the URLs without userinfo, query or fragment. ``undo_url`` (``{key}`` and ``{result[...]}`` fields of the call's result) is
    called with ``undo_method`` and the key ``<key>/undo`` to compensate the call.
    """

    def __init__(self, name: str, url: str, *, parameters: Parameters | None = None,
                 description: str = "", method: str = "POST", status_url: str | None = None,
                 undo_url: str | None = None, undo_method: str = "POST",
                 headers: Mapping[str, str] | None = None, timeout_s: float = 10.0,
                 settle_s: float | None = None) -> None:
        self.name, self.description, self.timeout_s, self.settle_s = name, description, timeout_s, settle_s
        self.parameters = parameters_schema(parameters)
        self.url, self.method, self.status_url = url, method.upper(), status_url
        self.undo_url, self.undo_method = undo_url, undo_method.upper()
        self.headers = dict(headers or {})
        self._session: aiohttp.ClientSession | None = None
        check_tool(self)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers={"Accept": "application/json", **self.headers})
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def _send(self, method: str, url: str, key: str, call: ToolCall, body: Any) -> tuple[int, Any]:
        headers = {"Idempotency-Key": key, "X-Task-Id": call.task_id, "X-Fence": str(call.fence)}
        if call.traceparent:
            headers["traceparent"] = call.traceparent
        timeout = aiohttp.ClientTimeout(total=self.timeout_s, connect=min(5.0, self.timeout_s))
        try:
            async with self._client().request(method, url, json=body, headers=headers, timeout=timeout,
                                              allow_redirects=False) as response:
                text = await response.text()
                return response.status, _json_or_text(text)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            # URLs are cut down: a webhook's secret (userinfo, query) never reaches a reason or a log
            raise ToolUnknown(f"{method} {safe_url(url)}: {type(exc).__name__}: "
                              f"{scrub_urls(str(exc))[:200]}") from None

    def _answer(self, what: str, status: int, body: Any) -> Any:
        if 200 <= status < 300:
            return body if body not in (None, "") else {"status": status}
        if status in (408, 409, 425, 429) or status >= 500:
            raise ToolUnknown(f"{what}: HTTP {status}")
        raise ToolError(f"{what}: HTTP {status}: {str(body)[:300]}")

    async def run(self, call: ToolCall) -> Any:
        status, body = await self._send(self.method, self.url, call.key, call, call.arguments)
        return self._answer(f"{self.name}", status, body)

    async def reconcile(self, call: ToolCall) -> Reconciled:
        if self.status_url is None:
            return await super().reconcile(call)
        url = self.status_url.format(key=quote(call.key, safe=""))
        try:
            status, body = await self._send("GET", url, call.key, call, None)
        except ToolUnknown as exc:
            return Reconciled.unknown(str(exc))
        if status == 200 and not _says_pending(body):
            return Reconciled.landed(body)
        if status in (200, 202, 409, 425):  # known and not finished: ask again later
            return Reconciled.pending(f"status endpoint answered HTTP {status}: the call is in progress")
        if status == 404:  # believed only once the call cannot be in flight any more (the caller decides)
            return Reconciled.absent()
        return Reconciled.unknown(f"status endpoint answered HTTP {status}")

    async def undo(self, call: ToolCall, result: Any) -> Any:
        if self.undo_url is None:
            raise NotImplementedError
        url = self.undo_url.format(key=quote(call.key, safe=""), result=result if isinstance(result, dict) else {})
        status, body = await self._send(self.undo_method, url, f"{call.key}/undo", call, call.arguments)
        return self._answer(f"undo of {self.name}", status, body)

    @property
    def can_undo(self) -> bool:
        return self.undo_url is not None


def _says_pending(body: Any) -> bool:
    """A status body such as ``{"status": "pending"}``: the downstream has the call, not its result."""
    if not isinstance(body, dict):
        return False
    said = body.get("status", body.get("state"))
    return isinstance(said, str) and said.strip().lower() in PENDING_WORDS


def _json_or_text(text: str) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text[:2000]


async def run_bounded(coro: Awaitable[Any], timeout_s: float, what: str) -> Any:
    """``coro`` within ``timeout_s``; past it the outcome is unknown (:class:`ToolUnknown`)."""
    try:
        return await asyncio.wait_for(coro, timeout_s)
    except TimeoutError as exc:
        raise ToolUnknown(f"{what}: no answer within {timeout_s:g}s") from exc
