"""``latency_bound``: throughput when every model call takes 500 ms.

One partition, ``max_in_flight`` 200, every task with a key of its own: the most a worker can do
is in_flight / latency = 400 tasks/s. The LLM client's concurrency is raised to the same 200 so
that the window under test, not the HTTP pool, is the limit. Throughput runs from the first record
handed to the pipeline to the last outcome.
"""

from __future__ import annotations

import asyncio
from typing import Any

from benchmarks.env import Env, progress, task_records
from benchmarks.inproc import CpuMeter, ServiceRun
from benchmarks.report import Figure

BENCH = "latency_bound"
LATENCY_S = 0.5
IN_FLIGHT = 200


def run(env: Env, quick: bool) -> list[Figure]:
    n = 600 if quick else 2_000
    bound = IN_FLIGHT / LATENCY_S
    names = env.names(BENCH)
    fake = env.fake_model(LATENCY_S)
    try:
        settings = env.settings(
            names, fake.base_url, partitions=1, max_in_flight=IN_FLIGHT, max_in_flight_per_partition=IN_FLIGHT,
            llm={"max_concurrency": IN_FLIGHT},
        )
        from service.runtime.wiring import ensure_topics

        ensure_topics(settings)
        env.wait_for_topics([names.input_topic])
        progress(f"latency_bound: {n:,} tasks, 1 partition, model latency {LATENCY_S * 1000:.0f} ms, "
                 f"max_in_flight {IN_FLIGHT}")
        env.produce(names.input_topic, task_records(names.run, n), what="tasks")
        meter = CpuMeter({"service": None, "fake model": fake.proc.pid})

        async def go() -> Any:
            meter.start()
            async with ServiceRun(settings, fake.base_url, BENCH) as svc:
                timing = await svc.wait(lambda c: c["succeeded"] + c["dead_lettered"] >= n, total=n,
                                        progress_key="succeeded", interval_s=0.02, stall_s=60)
            meter.stop()
            return timing

        timing = asyncio.run(go())
        rate = n / timing.processing_s
        stats = fake.stats()
        progress(f"  {n:,} in {timing.processing_s:.2f}s = {rate:,.0f}/s (bound {bound:,.0f}/s)")
        ideal = -(-n // IN_FLIGHT) * LATENCY_S
        return [Figure(
            BENCH, "throughput at 500 ms/call", rate, "tasks/s", baseline=f"bound {bound:,.0f}/s",
            target=(">=", 0.9 * bound),
            detail=(f"{100 * rate / bound:.0f}% of in_flight/latency; {n:,} tasks in {timing.processing_s:.2f}s "
                    f"from the first record (ideal {ideal:.1f}s), {timing.join_s:.2f}s group join before; "
                    f"{timing.counts['succeeded']:,.0f} succeeded, {stats['requests']:,} model calls; "
                    f"{meter.per_item_ms(n)}"),
        )]
    finally:
        env.release(fake)
