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

Tool calls
    A request that offers ``tools`` (``tool_choice`` not ``"none"``) whose conversation holds fewer
    assistant tool-call rounds than ``tool_rounds`` (1 by default) is answered with
    ``finish_reason: tool_calls`` and ``tool_calls_per_round`` calls (1 by default) of the forced
    tool or of tools drawn from those offered, each with a random instance of the tool's
    ``parameters`` as its arguments; later requests get the final answer as above, whatever the
    ``tool_choice``. A :class:`ToolArguments` rule gives the arguments instead: the first whose
    ``tool`` is called and whose ``match`` (if any) is a substring of the Idempotency-Key. The rules
    and the two counts are configuration (``FakeLLM`` arguments and properties, ``/_config``), kept
    by a reset. As OpenAI does, the server refuses (400)
    malformed tools, a ``tool_choice`` naming no offered tool, and tool calls and ``tool`` messages
    that do not answer each other.

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
    - ``invalid_tool_args``: tool calls whose arguments break the tool's ``parameters`` schema.
    - ``unknown_tool``: a tool call naming a tool that was not offered.

    The two tool faults hit a request that offers tools whatever its rounds; on one that does not
    they answer like ``schema_violation``.

    Every fault but ``slow_success`` waits its ``delay_s`` before it acts.

Concurrency limit
    With ``max_concurrency=N`` (argument, property, ``/_config``; 0 by default: no limit) a chat
    request that arrives while N are being answered gets a 429 at once, without Retry-After, as a
    provider's concurrent-request limit answers; ``over_concurrency`` in the statistics counts them.

Idempotent mode
    With ``idempotent=True`` a request whose ``Idempotency-Key`` was already answered with a valid
    completion gets the stored response body again, as providers that honour the header do.

Control endpoints (JSON; also served below ``/v1``)
    ``GET /_stats``, ``GET|POST|DELETE /_faults`` (POST replaces the rules), ``POST /_reset``,
    ``POST /_latency`` (``{"latency_s": x}``), ``GET|POST /_config`` (``{"idempotent": bool,
    "latency_s": x, "tool_rounds": n, "tool_calls_per_round": n, "tool_arguments": [rule...], "max_concurrency": n}``,
    each key optional; a bad value changes nothing), ``GET /health``. ``POST /_reset`` drops the
    fault rules, the statistics and the stored responses, not the configuration.
"""


from service.devtools.fakellm.chat import MODEL_NAME
from service.devtools.fakellm.command import main
from service.devtools.fakellm.faults import FAULTS, REFUSAL, FaultRule
from service.devtools.fakellm.instances import random_instance
from service.devtools.fakellm.scalars import SchemaError
from service.devtools.fakellm.server import FakeLLM
from service.devtools.fakellm.tools import ToolArguments

__all__ = [
    "FAULTS",
    "MODEL_NAME",
    "REFUSAL",
    "FakeLLM",
    "FaultRule",
    "SchemaError",
    "ToolArguments",
    "main",
    "random_instance",
]
