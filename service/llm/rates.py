"""Requests and tokens per minute for an endpoint, shared by every replica through Redis, with a
share reserved for interactive work and the quota shared between tenants by weight when contended.

:mod:`service.llm.guard` re-exports :class:`RateLimiter` beside the guard it works with.
"""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError

from dedup import scripts
from dedup.client import RedisClient
from dedup.keys import Keys
from dedup.ledger import LedgerUnavailable
from service.core.metrics import Metrics
from service.llm.tags import endpoint_tag

log = logging.getLogger(__name__)


class RateLimiter:
    """Requests and tokens per minute for one endpoint, shared by every replica through Redis.

    Each call is counted before it is made with an estimate of its tokens, and the count is
    corrected with the usage the endpoint reports. ``batch`` work may use only the share not
    reserved for ``interactive`` work. The budgets are token buckets that refill continuously
    (:data:`dedup.scripts.RATE`): a caller over the limit waits until its share has refilled, so
    tasks stay in flight, the in-flight window fills and the consumer pauses its partitions.

    When the quota is contended, tenants share it by weight (:data:`dedup.scripts.FAIR`): a caller
    whose tenant has used more of it, for its weight, than a tenant that waits, yields to that
    tenant. A lone tenant may use the whole quota.
    """

    def __init__(
        self,
        redis: RedisClient,
        endpoint: str,
        metrics: Metrics,
        *,
        rpm: int = 0,
        tpm: int = 0,
        interactive_reserve: float = 0.2,
        key_prefix: str = "agent",
        half_life_s: float = 30.0,
    ) -> None:
        self.redis = redis
        self.metrics = metrics
        self.rpm = rpm
        self.tpm = tpm
        self.reserve = interactive_reserve
        self.half_life_ms = max(1, int(half_life_s * 1000))
        keys, tag = Keys(key_prefix), endpoint_tag(endpoint)
        self.key = keys.endpoint(tag, "rate")
        # the fairness state, beside the buckets (one hash tag: one slot on a cluster)
        self.keys = [self.key, *(keys.endpoint(tag, s) for s in ("fair", "wait:i", "wait:b", "wait:exp", "seen"))]
        self._acquire = redis.register_script(scripts.RATE)
        self._reconcile = redis.register_script(scripts.RATE_RECONCILE)

    @property
    def enabled(self) -> bool:
        return self.rpm > 0 or self.tpm > 0

    async def try_acquire(self, priority: str, tokens: int, tenant: str = "default", weight: float = 1.0) -> float:
        """0 when the call may go now (it is counted), else seconds until it may be tried again."""
        wait_s, _ = await self._try(priority, tokens, tenant, weight)
        return wait_s

    async def _try(self, priority: str, tokens: int, tenant: str, weight: float) -> tuple[float, bool]:
        """Seconds to wait (0: counted, go), and whether the caller yielded to a tenant further behind."""
        wait_ms, yielded = await self._acquire(
            keys=self.keys,
            args=[self.rpm, self.tpm, tokens, self.reserve, priority, tenant, repr(float(weight)), self.half_life_ms],
        )
        return int(wait_ms) / 1000, bool(int(yielded))

    async def acquire(self, priority: str, tokens: int, tenant: str = "default", weight: float = 1.0,
                      label: str = "default") -> None:
        """Wait until the call may go. ``tenant`` shares the quota at ``weight``; ``label`` is its
        bounded metric label."""
        if not self.enabled:
            return
        while True:
            try:
                wait_s, yielded = await self._try(priority, tokens, tenant, weight)
            except RedisError as exc:
                raise LedgerUnavailable(f"rate limiter: {exc}") from exc
            if wait_s <= 0:
                return
            self.metrics.rate_limited.labels(priority=priority).inc()
            if yielded:
                self.metrics.fair_yields.labels(tenant=label).inc()
            await asyncio.sleep(min(wait_s, 1.0))

    async def reconcile(self, estimated: int, actual: int, tenant: str = "default", weight: float = 1.0) -> None:
        if not self.enabled or actual == estimated:
            return
        try:
            await self._reconcile(keys=self.keys, args=[self.rpm, self.tpm, actual - estimated, 0, "",
                                                        tenant, repr(float(weight)), self.half_life_ms])
        except RedisError as exc:
            log.debug("token count not corrected: %s", exc)
