"""How much a worker does at once, all of it following from ``AGENT_MAX_IN_FLIGHT``.

``max_in_flight`` tasks in flight, and no other default that binds below it:

- records per partition: ``max_in_flight`` (one partition can fill the window);
- model calls open: ``max_in_flight`` times the most calls one task can have open at once, which is
  the width of the widest step graph among the loaded kinds (1 for a chain; 3 for ``review``, whose
  research, summary and critique run together). A shadow run or a ``map_reduce`` step calls the
  model one piece at a time, inside its task's share;
- Redis connections: one per model call open (a task's step waits on at most one ledger or rate
  limit call at a time) plus :data:`REDIS_SPARE` for what is not a task's: the lease renewals, the
  endpoint guard's shared Retry-After and the admin API.

A value set for ``AGENT_MAX_IN_FLIGHT_PER_PARTITION``, ``AGENT_LLM__MAX_CONCURRENCY`` or
``AGENT_REDIS__MAX_CONNECTIONS`` is a cap on purpose; one below what the window needs is logged at
start, so a lower rate never has a hidden cause.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from service.agents.registry import AgentRegistry
from service.core.settings import Settings

log = logging.getLogger(__name__)

REDIS_SPARE = 16


@dataclass(frozen=True, slots=True)
class Limits:
    in_flight: int
    per_partition: int
    calls_per_task: int  # the widest step graph: calls one task can have open at once
    model_calls: int  # what a worker may have open (the cap when one is set below the window's need)
    redis_connections: int
    caps: tuple[str, ...] = ()  # a line for each setting that binds below the window

    def describe(self) -> str:
        return (f"{self.in_flight} tasks in flight ({self.per_partition} per partition), up to "
                f"{self.model_calls} model calls open ({self.calls_per_task} per task at most), "
                f"{self.redis_connections} Redis connections")


def limits(settings: Settings, agents: AgentRegistry) -> Limits:
    """The limits of one worker with ``agents`` loaded; see the module docstring."""
    in_flight = settings.max_in_flight
    width = agents.widest()
    calls_needed = in_flight * width
    redis_needed = calls_needed + REDIS_SPARE
    caps: list[str] = []
    per_partition = settings.max_in_flight_per_partition or in_flight
    if per_partition < in_flight:
        caps.append(f"AGENT_MAX_IN_FLIGHT_PER_PARTITION={per_partition} holds a partition below "
                    f"AGENT_MAX_IN_FLIGHT={in_flight}: a worker with fewer partitions keeps fewer tasks in flight")
    calls = settings.llm.max_concurrency or calls_needed
    if calls < calls_needed:
        caps.append(f"AGENT_LLM__MAX_CONCURRENCY={calls} caps the model calls a worker has open below the "
                    f"{calls_needed} that AGENT_MAX_IN_FLIGHT={in_flight} can open ({width} per task at most): "
                    "tasks over it wait in flight for a free call")
    redis = settings.redis.max_connections or redis_needed
    if redis < redis_needed:
        caps.append(f"AGENT_REDIS__MAX_CONNECTIONS={redis} is below the {redis_needed} connections "
                    f"AGENT_MAX_IN_FLIGHT={in_flight} can use: ledger calls over it wait for a connection")
    return Limits(in_flight, per_partition, width, min(calls, calls_needed), redis, tuple(caps))


def log_limits(found: Limits) -> None:
    log.info("concurrency: %s", found.describe())
    for line in found.caps:
        log.warning("concurrency capped: %s", line)


@dataclass(frozen=True, slots=True)
class Bound:
    """The longest a record can wait before its outcome, from the settings (docs/RELIABILITY.md,
    "Liveness"): what one attempt can take, what the attempts of one model call can take, and the
    record's whole bound for a kind that makes ``calls`` model calls in a row (its steps and tool
    rounds), with the worker deaths a task may survive. A task's own deadline cuts it shorter."""

    attempt_s: float  # the waits before it (endpoint, window, budget, calls given back) + the call + back-off
    call_s: float  # max_attempts attempts
    deaths_s: float  # each death: the lease running out, then an attempt cut short
    record_s: float


def record_bound(settings: Settings, calls: int = 1) -> Bound:
    llm = settings.llm
    attempt = llm.max_wait_s + 2 * llm.timeout_s + llm.backoff_max_s  # a refund may start just before the wait ends
    call = llm.max_attempts * attempt
    deaths = settings.ledger.max_deaths * (settings.ledger.lease_ms / 1000 + attempt)
    return Bound(attempt, call, deaths, calls * call + deaths)
