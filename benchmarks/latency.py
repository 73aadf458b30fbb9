"""``latency_bound``: throughput when every model call is slow, against the bound in_flight / latency.

The service runs as a user runs it (``agent-service run`` in a child process, watched through its
``/metrics``) with nothing set but ``AGENT_MAX_IN_FLIGHT``: the model calls it may have open, its HTTP
pool and its Redis pool follow from that one knob. One partition, every task with a key of its own,
so the most a worker can do is in_flight / latency. Two points:

- 500 ms model, 200 in flight: bound 400 tasks/s, target >= 95 %;
- 2 s model, 2,000 in flight: bound 1,000 tasks/s, target >= 90 %, with the service's peak RSS.

Throughput runs from the first record consumed to the last outcome. The fake model's own count of
the requests it had open at once (``peak_open``) says whether the window, not a pool, was the limit.
"""

from __future__ import annotations

import contextlib
from typing import Any

from benchmarks.child import ChildService, cpu_seconds
from benchmarks.env import Env, progress, task_records
from benchmarks.report import Figure
from service.devtools import local

BENCH = "latency_bound"
POINTS = (  # (model latency s, in flight, share of the bound to reach, rounds in a full run)
    (0.5, 200, 0.95, 30),
    (2.0, 2_000, 0.90, 10),
)


def run(env: Env, quick: bool) -> list[Figure]:
    figures: list[Figure] = []
    for latency_s, in_flight, share, rounds in POINTS:
        figures.extend(_point(env, 3 if quick else rounds, latency_s, in_flight, share))
    return figures


def _point(env: Env, rounds: int, latency_s: float, in_flight: int, share: float) -> list[Figure]:
    n = rounds * in_flight  # the window turns over this many times
    bound = in_flight / latency_s
    names = env.names(BENCH)
    fake = env.fake_model(latency_s)
    redis_peak = [0]
    try:
        port = local.free_port()
        settings = env.settings(names, fake.base_url, partitions=1, max_in_flight=in_flight,
                                http={"enabled": True, "host": "127.0.0.1", "port": port})
        from service.runtime.wiring import ensure_topics

        ensure_topics(settings)
        env.wait_for_topics([names.input_topic])
        label = f"{latency_s * 1000:.0f} ms model, {in_flight:,} in flight"
        progress(f"latency_bound: {n:,} tasks, 1 partition, {label} (AGENT_MAX_IN_FLIGHT only)")
        env.produce(names.input_topic, task_records(names.run, n), what="tasks")
        redis = _redis(env)

        def sample() -> None:
            if redis is not None:
                with contextlib.suppress(Exception):
                    redis_peak[0] = max(redis_peak[0], int(redis.info("clients")["connected_clients"]))

        log = env.dir / f"latency-{names.run}.log"
        with ChildService(settings, log) as svc:
            cpu0 = [0.0, 0.0]

            def first() -> None:  # CPU from the first record on: the start (imports, joining) is not a task's
                cpu0[:] = [cpu_seconds(svc.pid), cpu_seconds(fake.proc.pid)]

            watch = svc.wait(lambda c: c["succeeded"] + c["dead_lettered"] >= n, total=n, stall_s=60,
                             sample=sample, on_first=first)
            cpu = (cpu_seconds(svc.pid) - cpu0[0], cpu_seconds(fake.proc.pid) - cpu0[1])
        stats = fake.stats()
        rate = n / watch.processing_s
        progress(f"  {n:,} in {watch.processing_s:.2f}s = {rate:,.0f}/s (bound {bound:,.0f}/s), "
                 f"peak open model calls {stats['peak_open']}, peak RSS {watch.peak_rss_mb:.0f} MB")
        ideal = n / bound
        figures = [Figure(
            BENCH, f"throughput, {label}", rate, "tasks/s", baseline=f"bound {bound:,.0f}/s",
            target=(">=", share * bound),
            detail=(f"{100 * rate / bound:.0f}% of in_flight/latency; {n:,} tasks in {watch.processing_s:.2f}s "
                    f"from the first record (ideal {ideal:.1f}s); {watch.counts['succeeded']:,.0f} succeeded, "
                    f"{stats['requests']:,} model calls, at most {stats['peak_open']:,} open at once "
                    f"(max_in_flight {in_flight:,}); Redis clients at most {redis_peak[0]}; "
                    f"CPU ms per task: service {1000 * cpu[0] / n:.2f}, fake model {1000 * cpu[1] / n:.2f}; "
                    f"`agent-service run` in a child process, AGENT_MAX_IN_FLIGHT={in_flight} and no other limit set"),
        )]
        if in_flight >= 1000:
            figures.append(Figure(
                BENCH, f"peak RSS, {label}", watch.peak_rss_mb, "MB", baseline="-",
                detail=f"VmHWM of the service process over the run above ({n:,} tasks)"))
        return figures
    finally:
        env.release(fake)


def _redis(env: Env) -> Any:
    try:
        import redis

        return redis.Redis.from_url(env.redis_url)
    except Exception:  # noqa: BLE001 - the figure goes without the Redis client count
        return None
