"""The tenant token counters a call adds to are looked up once per tenant and kind, and count apart."""

from __future__ import annotations

from service.core.metrics import Metrics


def test_each_tenant_and_kind_counts_its_own_tokens_through_children_looked_up_once() -> None:
    metrics = Metrics()
    tokens_in, tokens_out = metrics.tenant_tokens_of("acme", "classify")
    tokens_in.inc(120)
    tokens_out.inc(7)
    assert metrics.tenant_tokens_of("acme", "classify") == (tokens_in, tokens_out)
    other_in, _ = metrics.tenant_tokens_of("default", "classify")
    other_in.inc(5)

    def sample(tenant: str, direction: str) -> float | None:
        return metrics.registry.get_sample_value(
            "agent_tenant_tokens_total", {"tenant": tenant, "kind": "classify", "direction": direction})

    assert (sample("acme", "input"), sample("acme", "output"), sample("default", "input")) == (120, 7, 5)
