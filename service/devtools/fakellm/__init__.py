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


from service.devtools.fakellm.command import main
from service.devtools.fakellm.faults import FAULTS, REFUSAL, FaultRule
from service.devtools.fakellm.http import MODEL_NAME
from service.devtools.fakellm.instances import random_instance
from service.devtools.fakellm.scalars import SchemaError
from service.devtools.fakellm.server import FakeLLM

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
