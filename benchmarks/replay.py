"""``replay``: read an already-processed topic again from offset 0 with a new consumer group.

The topic is processed once first (zero-latency fake model, not timed). Then the fake model's
statistics are reset and a service with a new group, the same ledger and the same output topics
reads the topic from the beginning: every task is a duplicate, so the model must not be called
once and no result event is emitted again. Throughput runs from the first record handed to the
pipeline to the last outcome.
"""

from __future__ import annotations

import asyncio
from typing import Any

from benchmarks.env import Env, progress, task_records
from benchmarks.inproc import CpuMeter, ServiceRun
from benchmarks.report import Figure

BENCH = "replay"
PARTITIONS = 6


def run(env: Env, quick: bool) -> list[Figure]:
    n = 3_000 if quick else 20_000
    names = env.names(BENCH)
    fake = env.fake_model(0.0)
    try:
        settings = env.settings(names, fake.base_url, partitions=PARTITIONS)
        from service.runtime.wiring import ensure_topics

        ensure_topics(settings)
        env.wait_for_topics([names.input_topic])
        progress(f"replay: producing and processing {n:,} tasks first (not timed)")
        env.produce(names.input_topic, task_records(names.run, n), what="tasks")

        async def first_pass() -> Any:
            async with ServiceRun(settings, fake.base_url, "replay (first pass)") as svc:
                return await svc.wait(lambda c: c["succeeded"] + c["dead_lettered"] >= n, total=n,
                                      progress_key="succeeded", interval_s=0.02)

        prep = asyncio.run(first_pass())
        results_before = env.count(names.results_topic)
        calls_before = fake.stats()["requests"]
        fake.reset()

        progress(f"replay: {n:,} tasks from offset 0 with a new group")
        group = f"{names.group}-replay"
        replay_settings = settings.model_copy(update={
            "kafka": settings.kafka.model_copy(update={"group_id": group}),
            "worker_id": f"{settings.worker_id}-replay",
        })
        meter = CpuMeter({"service": None, "redis": env.redis.proc.pid if env.redis else None})

        async def second_pass() -> Any:
            meter.start()
            async with ServiceRun(replay_settings, fake.base_url, BENCH) as svc:
                timing = await svc.wait(lambda c: c["duplicate"] + c["succeeded"] + c["dead_lettered"] >= n,
                                        total=n, progress_key="duplicate", interval_s=0.005)
            meter.stop()
            return timing

        timing = asyncio.run(second_pass())
        rate = n / timing.processing_s
        stats = fake.stats()
        results_after = env.count(names.results_topic)
        progress(f"  {n:,} in {timing.processing_s:.2f}s = {rate:,.0f}/s, {stats['requests']} model calls")
        c = timing.counts
        detail = (f"{n:,} tasks in {timing.processing_s:.2f}s from the first record ({timing.join_s:.2f}s "
                  f"group join before); {c['duplicate']:,.0f} duplicates, {c['succeeded']:,.0f} run again; "
                  f"result events {results_before:,} before, {results_after:,} after; "
                  f"first pass {prep.total_s:.1f}s, {calls_before:,} model calls; {meter.per_item_ms(n)}")
        return [
            Figure(BENCH, "replay throughput", rate, "tasks/s", baseline=f"first pass {n / prep.total_s:,.0f}/s",
                   target=(">=", 10_000.0), detail=detail),
            Figure(BENCH, "model calls during replay", float(stats["requests"]), "calls",
                   baseline=f"first pass {calls_before:,}", target=("<=", 0.0)),
        ]
    finally:
        env.release(fake)

