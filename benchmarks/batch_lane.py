"""``batch_lane``: what a task costs online and through the batch lane, side by side.

The same tasks (``classify``, each event saying ``"priority": "batch"``, byte for byte the same in
both passes) go through the whole service twice, each pass on topics, a group and a ledger prefix of
its own: ``agent-service run`` in a child process, Apache Kafka (or the stand-in broker), redis-server
and the fake model, watched through its ``/metrics``:

1. online: ``AGENT_BATCH__ENABLED=false``, each call a chat completion;
2. batch lane: ``AGENT_BATCH__PRIORITY=true``, each call queued, sealed into a batch
   (``/v1/files``, ``/v1/batches``), the task parked until the batch answered, then resumed.

Tokens are the model's own usage as the service counted it (``agent_llm_tokens_total`` by direction,
``agent_llm_cached_prompt_tokens_total``), read from the child's ``/metrics`` once every task
succeeded. Cost applies :data:`PRICES` to them: prompt tokens not read from the cache at the input
price, cached ones at the cached-input price, completion tokens at the output price, and every token
of a batch at :data:`BATCH_SHARE` of its price. Wall time runs from the first record consumed to the
last task succeeded; the batch lane's is the lane's settings' doing (a group sealed after
``AGENT_BATCH__MAX_AGE_S``, the poller's turn every ``AGENT_TOOLS__SWEEP_INTERVAL_S``) plus the
provider's turnaround, which the fake model makes nothing (a real provider's is up to 24 h).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.child import ChildService
from benchmarks.env import Env, FakeModel, progress
from benchmarks.report import Figure
from service.core.settings import Settings
from service.devtools import local

BENCH = "batch_lane"
PARTITIONS = 4
# USD per million tokens: OpenAI's list prices for gpt-4o-mini (input, cached input, output), and
# its Batch API's discount (half of each). Constants of this benchmark: change them to price another model.
PRICES = {"input": 0.15, "cached_input": 0.075, "output": 0.60}
BATCH_SHARE = 0.5
PRICE_LABEL = "gpt-4o-mini list prices per 1M tokens: input $0.15, cached input $0.075, output $0.60; batch 50%"


@dataclass(frozen=True)
class Usage:
    """What the service counted over one pass."""

    prompt: float
    cached: float
    completion: float
    chat_calls: int  # chat completions the fake model answered
    batched: float  # calls answered by a batch (agent_batch_tasks_total{state="done"})
    online: float  # batch calls sent online after all (failed, expired or invalid)
    batches: float  # batches that completed

    def tokens_per_task(self, n: int) -> float:
        return (self.prompt + self.completion) / n

    def cost_per_task_usd(self, n: int, batch: bool) -> float:
        share = BATCH_SHARE if batch else 1.0
        usd = ((self.prompt - self.cached) * PRICES["input"] + self.cached * PRICES["cached_input"]
               + self.completion * PRICES["output"]) / 1e6
        return share * usd / n


def task_records(prefix: str, n: int) -> Iterator[tuple[bytes, bytes]]:
    """``classify`` tasks that may wait (``"priority": "batch"``): the lane takes them when it is on."""
    for i in range(n):
        task_id = f"{prefix}-{i}"
        body = {"task_id": task_id, "kind": "classify", "priority": "batch",
                "input": {"text": f"parcel {task_id} arrived broken", "labels": ["complaint", "praise"]}}
        yield task_id.encode(), json.dumps(body, separators=(",", ":")).encode()


def scrape(url: str) -> dict[str, float]:
    """The child's counters (:func:`counters`) from its ``/metrics``."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        return counters(resp.read().decode())


def counters(text: str) -> dict[str, float]:
    """Prometheus text's samples, summed over their labels but the one kept in the name
    (``agent_llm_tokens_total:input``, ``agent_batch_tasks_total:done``, ``agent_batches_total:completed``)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            label = sample.labels.get("direction") or sample.labels.get("state") or sample.labels.get("status")
            name = f"{sample.name}:{label}" if label else sample.name
            out[name] = out.get(name, 0.0) + sample.value
    return out


def usage_of(counted: dict[str, float], chat_calls: int) -> Usage:
    return Usage(prompt=counted.get("agent_llm_tokens_total:input", 0.0),
                 cached=counted.get("agent_llm_cached_prompt_tokens_total", 0.0),
                 completion=counted.get("agent_llm_tokens_total:output", 0.0), chat_calls=chat_calls,
                 batched=counted.get("agent_batch_tasks_total:done", 0.0),
                 online=counted.get("agent_batch_tasks_total:online", 0.0)
                 + counted.get("agent_batch_tasks_total:invalid", 0.0),
                 batches=counted.get("agent_batches_total:completed", 0.0))


def _pass(env: Env, fake: FakeModel, n: int, batch: bool) -> tuple[float, Usage, str]:
    """One pass over ``n`` tasks: (seconds from the first record to the last success, usage, detail)."""
    what = "batch lane" if batch else "online"
    names = env.names(f"{BENCH}{'b' if batch else 'o'}")
    lane = {"enabled": True, "priority": True} if batch else {"enabled": False}
    settings: Settings = env.settings(names, fake.base_url, partitions=PARTITIONS, batch=lane,
                                      http={"enabled": True, "host": "127.0.0.1", "port": local.free_port()})
    from service.runtime.wiring import ensure_topics

    ensure_topics(settings)
    env.wait_for_topics([names.input_topic, names.results_topic, names.dlq_topic])
    env.produce(names.input_topic, task_records(names.run, n), what="tasks")
    fake.reset()
    progress(f"batch_lane: {what} on {n:,} tasks (agent-service run)")
    with ChildService(settings, env.dir / f"batch-lane-{names.run}.log") as svc:
        watch = svc.wait(lambda c: c["succeeded"] + c["dead_lettered"] >= n, total=n, stall_s=180)
        counted = scrape(svc.url)
    usage = usage_of(counted, int(fake.stats()["requests"]))
    seconds = watch.processing_s
    progress(f"  {what}: {n:,} in {seconds:.2f}s; {usage}")
    detail = (f"{n:,} tasks in {seconds:.2f}s from the first record; {watch.counts['succeeded']:,.0f} succeeded, "
              f"{watch.counts['dead_lettered']:,.0f} dead letters; {usage.chat_calls:,} chat calls, "
              f"{usage.batched:,.0f} calls answered by {usage.batches:,.0f} batch(es), {usage.online:,.0f} sent "
              f"online after all; per task {usage.prompt / n:.1f} prompt tokens ({usage.cached / n:.1f} cached), "
              f"{usage.completion / n:.1f} completion")
    if batch:
        detail += (f"; lane settings: max_size {settings.batch.max_size}, max_age_s {settings.batch.max_age_s:g}, "
                   f"sweep every {settings.tools.sweep_interval_s:g}s")
    return seconds, usage, detail


def run(env: Env, quick: bool) -> list[Figure]:
    n = env.tasks or (100 if quick else 500)
    fake = env.fake_model(0.0)
    try:
        online_s, online, online_detail = _pass(env, fake, n, batch=False)
        batch_s, batched, batch_detail = _pass(env, fake, n, batch=True)
    finally:
        env.release(fake)
    online_cost, batch_cost = online.cost_per_task_usd(n, False), batched.cost_per_task_usd(n, True)
    online_tokens, batch_tokens = online.tokens_per_task(n), batched.tokens_per_task(n)
    base_cost = f"online {online_cost * 1e6:.2f} µ$"
    return [
        Figure(BENCH, "online: tokens per task", online_tokens, "tokens", detail=online_detail),
        Figure(BENCH, "batch lane: tokens per task", batch_tokens, "tokens", baseline=f"online {online_tokens:.1f}",
               detail=batch_detail),
        Figure(BENCH, "online: cost per task", online_cost * 1e6, "µ$", detail=PRICE_LABEL),
        Figure(BENCH, "batch lane: cost per task", batch_cost * 1e6, "µ$", baseline=base_cost,
               target=("<=", online_cost * 1e6 * BATCH_SHARE)),
        Figure(BENCH, "batched / online cost", batch_cost / online_cost, "x", baseline=base_cost,
               detail="cached prompt tokens are priced at the cached-input price in both passes (the fake "
                      "model's prompt cache answers a batch's lines as it answers chat calls)"),
        Figure(BENCH, "online: wall time to all results", online_s, "s"),
        Figure(BENCH, "batch lane: wall time to all results", batch_s, "s", baseline=f"online {online_s:.2f} s"),
        Figure(BENCH, "batched / online wall time", batch_s / online_s, "x", baseline=f"online {online_s:.2f} s"),
    ]
