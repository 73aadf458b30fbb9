"""The model endpoints a worker may call: the primary (``AGENT_LLM__*``) and the fallbacks
(``AGENT_LLM__FALLBACKS``), each with its own client, breaker, Retry-After, rate limits and adaptive
window of open calls (:mod:`service.llm.window`).

Which one a step calls is the pipeline's choice (:meth:`service.pipeline.capacity.Capacity.endpoint`):
the primary unless it is unavailable and the kind's policy says ``fallback``. An answer from a
fallback is a degraded answer, and says so wherever it goes. Replicas (``AGENT_LLM__REPLICAS``) serve
the primary's model: which of them a step calls is its prompt cache key's (:mod:`service.llm.affinity`),
and their answers are the primary's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

from service.llm.client import ChatRequest, ChatResult
from service.llm.guard import EndpointGuard, RateLimiter
from service.llm.window import AdaptiveWindow

PRIMARY = "primary"


class Chat(Protocol):
    async def chat(self, request: ChatRequest) -> ChatResult: ...


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str  # "primary", or the fallback's name ("fallback-1"): a bounded metric label
    url: str  # the base URL without credentials, query or fragment: safe in results and logs
    client: Chat
    guard: EndpointGuard | None = None
    limiter: RateLimiter | None = None
    model: str | None = None  # a fallback's model (None: the request's, or the client's default)
    timeout_s: float | None = None  # a fallback's own call timeout (None: AGENT_LLM__TIMEOUT_S)
    window: AdaptiveWindow | None = None  # the fleet's calls open on it (None: only the worker's own cap)
    replica: bool = False  # serves the primary's model (AGENT_LLM__REPLICAS): its answers are the primary's

    @property
    def fallback(self) -> bool:
        return self.name != PRIMARY and not self.replica

    @property
    def answers_as(self) -> str:
        """The endpoint an answer from it is recorded as: a replica's as the primary's (not degraded)."""
        return PRIMARY if self.replica else self.name

    @property
    def available(self) -> bool:
        """A call now would not wait for the breaker (see :attr:`EndpointGuard.available`)."""
        return self.guard is None or self.guard.available

    @property
    def accepting(self) -> bool:
        """Not degraded (a revoked key, an unknown model, nothing listening)."""
        return self.guard is None or self.guard.accepting

    def why_unavailable(self) -> str:
        if self.guard is None:
            return "available"
        if self.guard.degraded:
            return f"degraded: {self.guard.degraded}"
        return "breaker open"


def public_url(base_url: str) -> str:
    """``base_url`` without user, password, query or fragment."""
    parts = urlsplit(base_url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))
