"""The cost figure of ``python -m benchmarks --only batch_lane``: the tokens it reads are the ones
the service exposes on /metrics, and a batch's tokens are priced at the Batch API's share."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from benchmarks.batch_lane import BATCH_SHARE, PRICES, counters, usage_of
from service.core.metrics import Metrics


def test_the_usage_is_read_from_the_counters_the_service_exposes() -> None:
    m = Metrics()
    m.tokens_in.inc(1200)
    m.tokens_out.inc(300)
    prompt, cached = m.prompt_tokens("classify", "primary")
    prompt.inc(1200)
    cached.inc(400)
    m.batch_tasks.labels(state="queued").inc(10)
    m.batch_tasks.labels(state="done").inc(9)
    m.batch_tasks.labels(state="invalid").inc(1)
    m.batches.labels(status="submitted").inc(1)
    m.batches.labels(status="completed").inc(1)
    usage = usage_of(counters(generate_latest(m.registry).decode()), chat_calls=1)
    assert (usage.prompt, usage.cached, usage.completion) == (1200, 400, 300)
    assert (usage.batched, usage.online, usage.batches, usage.chat_calls) == (9, 1, 1, 1)
    assert usage.tokens_per_task(10) == 150


def test_a_batched_token_costs_the_batch_share_of_its_online_price() -> None:
    usage = usage_of({"agent_llm_tokens_total:input": 1e6, "agent_llm_cached_prompt_tokens_total": 4e5,
                      "agent_llm_tokens_total:output": 1e6}, chat_calls=0)
    online = 6e5 * PRICES["input"] / 1e6 + 4e5 * PRICES["cached_input"] / 1e6 + PRICES["output"]
    assert usage.cost_per_task_usd(1, batch=False) == pytest.approx(online)
    assert usage.cost_per_task_usd(1, batch=True) == pytest.approx(BATCH_SHARE * online)
    assert usage.cost_per_task_usd(4, batch=False) == pytest.approx(online / 4)
