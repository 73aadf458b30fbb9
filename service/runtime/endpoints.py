"""The model endpoints beyond the primary (replicas and fallbacks), the fleet's windows of open calls, and the tenants'
policy: what the processor's model calls are built from, each from the settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dedup.client import RedisClient
from service.core.endpoint_settings import OtherEndpoint
from service.core.metrics import Metrics
from service.core.settings import Settings
from service.llm.client import LLMClient
from service.llm.endpoints import Endpoint, public_url
from service.llm.guard import EndpointGuard, GuardConfig, RateLimiter, chat_probe
from service.llm.tenancy import Tenancy
from service.llm.window import AdaptiveWindow


def adaptive_window(settings: Settings, redis: RedisClient, base_url: str, metrics: Metrics, name: str,
                    timeout_s: float, closers: list[Any]) -> AdaptiveWindow | None:
    """The fleet's window of calls open on the endpoint at ``base_url`` (None with
    ``AGENT_LLM__WINDOW=false``). A slot's lease is twice what the call's timeout needs: a kept slot
    is lent to another call only in the first half of its lease, so only a dead replica's slots run
    out; a replica that stops hands back the slots it kept."""
    llm = settings.llm
    if not llm.window:
        return None
    window = AdaptiveWindow(redis, base_url, metrics, label=name, initial=llm.window_initial,
                            maximum=llm.window_max, backoff=llm.window_backoff, ramp_s=llm.window_ramp_s,
                            memory_s=llm.window_memory_s,
                            lease_s=2 * (timeout_s + 10),
                            key_prefix=settings.redis.key_prefix)
    closers.append(window.aclose)
    return window


def tenants(settings: Settings, metrics: Metrics) -> Tenancy:
    """The tenants' policy (``AGENT_TENANCY__*``); the series of each bounded label exist from the start."""
    tenancy = Tenancy(settings.tenancy)
    for label in tenancy.labels():
        for policy in ("wait", "dead_letter"):
            metrics.budget_refusals.labels(tenant=label, policy=policy)
        metrics.fair_yields.labels(tenant=label)
    return tenancy


def fallback_endpoints(settings: Settings, metrics: Metrics, redis: RedisClient, guard_config: GuardConfig,
                       max_open: int, closers: list[Any]) -> tuple[Endpoint, ...]:
    """``AGENT_LLM__FALLBACKS``, each with its own client (its key, model and timeout; the primary's
    other model settings), breaker and shared Retry-After (keyed by its URL) and rate limits."""
    parts = _Parts(settings, metrics, redis, guard_config, max_open, closers)
    endpoints = tuple(parts.endpoint(f, model=f.model, timeout_s=f.timeout_s) for f in settings.llm.fallbacks)
    for endpoint in endpoints:
        metrics.fallbacks.labels(endpoint=endpoint.name)  # a series from the start, at 0
    return endpoints


def replica_endpoints(settings: Settings, metrics: Metrics, redis: RedisClient, guard_config: GuardConfig,
                      max_open: int, closers: list[Any]) -> tuple[Endpoint, ...]:
    """``AGENT_LLM__REPLICAS``: the primary's model at other URLs, each with its own client (its key;
    the primary's other model settings), breaker, rate limits and window."""
    parts = _Parts(settings, metrics, redis, guard_config, max_open, closers)
    return tuple(parts.endpoint(r, replica=True) for r in settings.llm.replicas)


@dataclass(frozen=True)
class _Parts:
    """What an endpoint beside the primary is built from: the settings, and where its client's and
    window's closers go."""

    settings: Settings
    metrics: Metrics
    redis: RedisClient
    guard_config: GuardConfig
    max_open: int
    closers: list[Any]

    def endpoint(self, other: OtherEndpoint, *, model: str | None = None, timeout_s: float | None = None,
                 replica: bool = False) -> Endpoint:
        """``other`` with its own client (its key, and ``model``/``timeout_s`` when set; the primary's
        other model settings), breaker, shared Retry-After (keyed by its URL), rate limits and window."""
        s, llm = self.settings, self.settings.llm
        assert other.name is not None  # named by the settings
        timeout = timeout_s or llm.timeout_s
        own = llm.model_copy(update={"api_key": other.api_key, "timeout_s": timeout, "fallbacks": [], "replicas": [],
                                     "prompt_cache_key": other.prompt_cache_key, **({"model": model} if model else {})})
        client = LLMClient(own, other.base_url, self.metrics, max_open=self.max_open, endpoint=other.name)
        self.closers.append(client.aclose)
        return Endpoint(
            other.name, public_url(other.base_url), client,
            EndpointGuard(other.base_url, self.metrics, self.guard_config, redis=self.redis,
                          key_prefix=s.redis.key_prefix, probe=chat_probe(client, timeout, model)),
            RateLimiter(self.redis, other.base_url, self.metrics, rpm=other.rpm, tpm=other.tpm,
                        interactive_reserve=llm.interactive_reserve, key_prefix=s.redis.key_prefix,
                        half_life_s=s.tenancy.fair_half_life_s),
            model=model, timeout_s=None if replica else timeout,  # a replica: the primary's, as the request has it
            window=adaptive_window(s, self.redis, other.base_url, self.metrics, other.name, timeout, self.closers),
            replica=replica,
        )
