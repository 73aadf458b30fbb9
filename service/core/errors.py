"""The service's exceptions.

    AgentError
    ├── PoisonError(reason)            the record can never succeed: dead-letter it now
    │                                  (decode, schema, oversize, expired)
    ├── PermanentError                 the endpoint refused the request for good: dead-letter
    │                                  as ``permanent`` (HTTP 4xx other than 401/403/404/408/409/429)
    ├── InvalidOutput(kind)            the model answered, but the answer is not a result:
    │                                  truncated, refused, empty, not JSON, fails its schema;
    │                                  retried within the attempt budget, then ``invalid_output``
    ├── EndpointFault(reason)          the endpoint cannot serve anyone (401, 403, 404, connection
    │                                  refused, DNS): open its breaker and wait; never a dead
    │                                  letter, never an attempt of the task
    ├── RetryableError(delay)          try again after ``delay`` (None: the policy's backoff)
    │   ├── LLMTimeout                 the outcome is unknown: the call may have finished
    │   ├── LLMRateLimited             429, with the endpoint's Retry-After
    │   └── LLMUnavailable             5xx, a connection reset or dropped mid-exchange
    └── InfrastructureError            Redis or Kafka did not answer: never dead-letter, retry
                                       the record until they are back

    EmbeddedError(RuntimeError)        an embedded server (broker, redis-server, model) could
                                       not be started: outside the tree, it never meets a record

Library exceptions (aiohttp, redis, confluent-kafka) are translated where they enter.
"""

from __future__ import annotations


class AgentError(Exception):
    """Root of every exception the service raises on purpose."""


class PoisonError(AgentError):
    def __init__(self, reason: str, message: str, task_key: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.task_key = task_key  # known when the envelope decoded and only the input was refused


class PermanentError(AgentError):
    pass


class InvalidOutput(AgentError):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # truncated | refused | empty | not_json | schema


class EndpointFault(AgentError):
    """The endpoint is unusable for every task (revoked key, unknown model, nothing listening).

    ``reason`` is one of ``auth``, ``not_found``, ``unreachable``: a bounded label.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class RetryableError(AgentError):
    def __init__(self, message: str, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class LLMTimeout(RetryableError):
    pass


class LLMRateLimited(RetryableError):
    pass


class LLMUnavailable(RetryableError):
    pass


class InfrastructureError(AgentError):
    pass


class EmbeddedError(RuntimeError):
    """An embedded server could not be started."""
