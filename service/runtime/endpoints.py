"""The model endpoints beyond the primary (replicas and fallbacks), the fleet's windows of open calls, and the tenants'
policy: what the processor's model calls are built from, each from the settings."""

from __future__ import annotations

from typing import Any

from dedup.client import RedisClient
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
    llm = settings.llm
    endpoints: list[Endpoint] = []
    for fallback in llm.fallbacks:
        assert fallback.name is not None  # named by the settings
        own = llm.model_copy(update={"api_key": fallback.api_key, "model": fallback.model,
                                     "timeout_s": fallback.timeout_s or llm.timeout_s, "fallbacks": [], "replicas": [],
                                     "prompt_cache_key": fallback.prompt_cache_key})
        client = LLMClient(own, fallback.base_url, metrics, max_open=max_open, endpoint=fallback.name)
        closers.append(client.aclose)
        endpoints.append(Endpoint(
            fallback.name, public_url(fallback.base_url), client,
            EndpointGuard(fallback.base_url, metrics, guard_config, redis=redis, key_prefix=settings.redis.key_prefix,
                          probe=chat_probe(client, fallback.timeout_s or llm.timeout_s, fallback.model)),
            RateLimiter(redis, fallback.base_url, metrics, rpm=fallback.rpm, tpm=fallback.tpm,
                        interactive_reserve=llm.interactive_reserve, key_prefix=settings.redis.key_prefix,
                        half_life_s=settings.tenancy.fair_half_life_s),
            model=fallback.model, timeout_s=fallback.timeout_s or llm.timeout_s,
            window=adaptive_window(settings, redis, fallback.base_url, metrics, fallback.name,
                                   fallback.timeout_s or llm.timeout_s, closers),
        ))
        metrics.fallbacks.labels(endpoint=fallback.name)  # a series from the start, at 0
    return tuple(endpoints)


def replica_endpoints(settings: Settings, metrics: Metrics, redis: RedisClient, guard_config: GuardConfig,
                      max_open: int, closers: list[Any]) -> tuple[Endpoint, ...]:
    """``AGENT_LLM__REPLICAS``: the primary's model at other URLs, each with its own client (its key;
    the primary's other model settings), breaker, rate limits and window."""
    llm = settings.llm
    endpoints: list[Endpoint] = []
    for replica in llm.replicas:
        assert replica.name is not None  # named by the settings
        own = llm.model_copy(update={"api_key": replica.api_key, "fallbacks": [], "replicas": [],
                                     "prompt_cache_key": replica.prompt_cache_key})
        client = LLMClient(own, replica.base_url, metrics, max_open=max_open, endpoint=replica.name)
        closers.append(client.aclose)
        endpoints.append(Endpoint(
            replica.name, public_url(replica.base_url), client,
            EndpointGuard(replica.base_url, metrics, guard_config, redis=redis, key_prefix=settings.redis.key_prefix,
                          probe=chat_probe(client, llm.timeout_s)),
            RateLimiter(redis, replica.base_url, metrics, rpm=replica.rpm, tpm=replica.tpm,
                        interactive_reserve=llm.interactive_reserve, key_prefix=settings.redis.key_prefix,
                        half_life_s=settings.tenancy.fair_half_life_s),
            window=adaptive_window(settings, redis, replica.base_url, metrics, replica.name, llm.timeout_s, closers),
            replica=True,
        ))
    return tuple(endpoints)
