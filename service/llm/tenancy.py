"""Tenants: their shares of a contended quota, their hard token budgets and what their calls cost.

- **Who**: a task names its tenant (:mod:`service.agents.tasks`; none is ``default``). A tenant
  named in ``AGENT_TENANCY__TENANTS`` has its weight, its budget and a metric label of its own;
  every other tenant has the defaults and the label ``other``, so labels stay bounded whatever
  tenant ids producers send.
- **Shares** are the rate limiter's (:class:`~service.llm.guard.RateLimiter`): weighted fairness
  through Redis, only when the quota is contended.
- **Whose budget** (:meth:`Tenancy.account`): a named tenant's own; else, with
  ``default_budget_tokens``, one of that size for each tenant; else the ``default`` tenant's, shared
  by every tenant without one of its own and by tasks naming none. So when budgets are configured
  no task escapes them: settings with budgets for some named tenants and none for the others are
  refused at start (``'default'`` with ``budget_tokens`` 0 says so explicitly).
- **Budgets** (:class:`TenantBudgets`): a call reserves its estimated tokens in Redis before it is
  made, atomically, and the reservation is corrected with the usage the endpoint reports. Concurrent
  calls of any number of replicas never reserve more than the budget, so a tenant overshoots only by
  what its calls in flight used beyond their estimates (the estimate counts the whole answer the
  request allows, so only a prompt tokenized at under three characters a token can).
- **Cost**: tokens, and money by the price table, per tenant and kind.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from redis.exceptions import RedisError

from dedup import scripts
from dedup.client import RedisClient
from dedup.keys import Keys
from dedup.ledger import LedgerUnavailable
from service.core.settings import TenancySettings

log = logging.getLogger(__name__)

DEFAULT = "default"
OTHER = "other"


class Tenancy:
    """The tenants' policy, as the settings give it."""

    def __init__(self, settings: TenancySettings | None = None) -> None:
        self.settings = settings or TenancySettings()

    def weight(self, tenant: str) -> float:
        named = self.settings.tenants.get(tenant)
        return named.weight if named is not None else self.settings.default_weight

    def account(self, tenant: str | None) -> tuple[str, int]:
        """Whose budget the tenant's calls spend, and its tokens per period (0: no budget).

        A named tenant's own budget; else ``default_budget_tokens``, each tenant its own; else the
        ``default`` tenant's, shared (a task naming no tenant is the ``default`` tenant's)."""
        tenant = tenant or DEFAULT
        named = self.settings.tenants.get(tenant)
        if named is not None and named.budget_tokens is not None:
            return tenant, named.budget_tokens
        if self.settings.default_budget_tokens > 0:
            return tenant, self.settings.default_budget_tokens
        default = self.settings.tenants.get(DEFAULT)
        if default is not None and default.budget_tokens:
            return DEFAULT, default.budget_tokens
        return tenant, 0

    def budget(self, tenant: str | None) -> int:
        """Tokens per period the tenant's calls may spend (0: no budget); see :meth:`account`."""
        return self.account(tenant)[1]

    def label(self, tenant: str) -> str:
        """A bounded metric label: a named tenant, ``default``, or ``other``."""
        if tenant in self.settings.tenants or tenant == DEFAULT:
            return tenant
        return OTHER

    def labels(self) -> list[str]:
        return [DEFAULT, OTHER, *(t for t in self.settings.tenants if t != DEFAULT)]

    def cost(self, model: str | None, prompt_tokens: int, completion_tokens: int) -> float | None:
        """What the call cost by the price table; None for a model the table does not price."""
        price = self.settings.prices.get(model or "")
        if price is None:
            return None
        return (prompt_tokens * price.prompt + completion_tokens * price.completion) / 1000

    @property
    def over_budget(self) -> str:
        return self.settings.over_budget


@dataclass(frozen=True, slots=True)
class Reservation:
    """Tokens a call reserved of its tenant's budget, in one period."""

    tenant: str
    period: int
    tokens: int


class OverBudget(Exception):
    """The tenant's budget for the period has no room for the call."""

    def __init__(self, tenant: str, budget: int, used: int, tokens: int, wait_s: float, never: bool) -> None:
        self.tenant, self.budget, self.used, self.tokens = tenant, budget, used, tokens
        self.wait_s = wait_s
        self.never = never  # the call alone is more than the whole budget
        what = "more than the whole budget" if never else f"{used} of {budget} used in this period"
        super().__init__(f"tenant {tenant}: a call of about {tokens} tokens is over its budget ({what})")


class TenantBudgets:
    """Hard token budgets per tenant and period, shared by every replica through Redis."""

    def __init__(self, redis: RedisClient, tenancy: Tenancy, key_prefix: str = "agent") -> None:
        self.tenancy = tenancy
        self.keys = Keys(key_prefix)
        self.period_ms = tenancy.settings.budget_period_s * 1000
        self._reserve = redis.register_script(scripts.BUDGET_RESERVE)
        self._settle = redis.register_script(scripts.BUDGET_SETTLE)

    def applies(self, tenant: str | None) -> bool:
        """Whether the tenant's calls reserve budget: its own, or the default tenant's (:meth:`Tenancy.account`)."""
        return self.tenancy.budget(tenant) > 0

    async def reserve(self, tenant: str | None, tokens: int) -> Reservation | None:
        """Reserve ``tokens`` of the budget the tenant spends (None: it has none); raises
        :class:`OverBudget`. The reservation names whose budget it took (``default`` for a tenant
        spending the default tenant's)."""
        holder, budget = self.tenancy.account(tenant)
        if budget <= 0:
            return None
        try:
            granted, period, used, wait_ms = await self._reserve(
                keys=[self.keys.tenant_budget(holder)], args=[budget, self.period_ms, tokens])
        except RedisError as exc:
            raise LedgerUnavailable(f"tenant budget: {exc}") from exc
        if int(granted) == 1:
            return Reservation(holder, int(period), tokens)
        raise OverBudget(holder, budget, int(used), tokens, int(wait_ms) / 1000, never=int(granted) < 0)

    async def settle(self, reservation: Reservation | None, actual: int) -> None:
        """Correct the reservation with the tokens the call used (0: it was never served)."""
        if reservation is None or actual == reservation.tokens:
            return
        try:
            await self._settle(keys=[self.keys.tenant_budget(reservation.tenant)],
                               args=[reservation.period, actual - reservation.tokens])
        except RedisError as exc:  # the call was made: never retry it for this; the estimate stands
            log.warning("tenant %s: budget not corrected by %d tokens: %s", reservation.tenant,
                        actual - reservation.tokens, exc)

    async def used(self, tenant: str | None) -> int:
        """Tokens reserved or spent in the current period of the budget the tenant spends (for tests
        and operators)."""
        holder, budget = self.tenancy.account(tenant)
        if budget <= 0:
            return 0
        _, _, used, _ = await self._reserve(keys=[self.keys.tenant_budget(holder)], args=[budget, self.period_ms, 0])
        return int(used)
