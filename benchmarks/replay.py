"""``replay``: read an already-processed topic again from offset 0 with a new consumer group.

The topic is processed once first (zero-latency fake model, not timed). Then the fake model's
statistics are reset and a service with a new group, the same ledger and the same output topics
reads the topic from the beginning: every task is a duplicate, so the model must not be called
once and no result event is emitted again. Throughput runs from the first record handed to the
pipeline to the last outcome. The baseline is the raw consume->produce pipe of the e2e benchmark
over the same topic, timed from its first record too. Both passes are ``agent-service run`` in a
child process.
"""

from __future__ import annotations

from benchmarks.child import AFTER_FIRST_S, BEFORE_FIRST_S, ChildService
from benchmarks.e2e import pipe
from benchmarks.env import Env, progress, task_records
from benchmarks.inproc import CpuMeter
from benchmarks.report import Figure
from service.devtools import local

BENCH = "replay"
PARTITIONS = 6


def run(env: Env, quick: bool) -> list[Figure]:
    n = 3_000 if quick else 20_000
    names = env.names(BENCH)
    fake = env.fake_model(0.0)
    try:
        settings = env.settings(names, fake.base_url, partitions=PARTITIONS,
                                http={"enabled": True, "host": "127.0.0.1", "port": local.free_port()})
        from service.runtime.wiring import ensure_topics

        ensure_topics(settings)
        pipe_out = f"{names.input_topic}.pipe"
        env.create_topics([pipe_out], PARTITIONS)
        env.wait_for_topics([names.input_topic])
        progress(f"replay: producing and processing {n:,} tasks first (not timed)")
        env.produce(names.input_topic, task_records(names.run, n), what="tasks")
        with ChildService(settings, env.dir / f"replay-first-{names.run}.log") as svc:
            prep = svc.wait(lambda c: c["succeeded"] + c["dead_lettered"] >= n, total=n, progress_key="succeeded")
        results_before = env.count(names.results_topic)
        calls_before = fake.stats()["requests"]
        fake.reset()

        progress("replay: raw consume->produce pipe over the same topic")
        pipe_s, pipe_join = pipe(env, names.input_topic, pipe_out, n, f"{names.group}-pipe")
        pipe_rate = n / (pipe_s - pipe_join)
        progress(f"  pipe: {n:,} in {pipe_s - pipe_join:.2f}s from the first record = {pipe_rate:,.0f}/s")

        progress(f"replay: {n:,} tasks from offset 0 with a new group (agent-service run)")
        replay_settings = settings.model_copy(update={
            "kafka": settings.kafka.model_copy(update={"group_id": f"{names.group}-replay"}),
            "http": settings.http.model_copy(update={"port": local.free_port()}),
        })
        with ChildService(replay_settings, env.dir / f"replay-{names.run}.log") as svc:
            meter = CpuMeter({"service": svc.pid, "redis": env.redis.proc.pid if env.redis else None})
            watch = svc.wait(lambda c: c["duplicate"] + c["succeeded"] + c["dead_lettered"] >= n, total=n,
                             progress_key="duplicate", interval_s=BEFORE_FIRST_S, coarse_s=AFTER_FIRST_S,
                             on_first=meter.start)
            meter.stop()
        rate = n / watch.processing_s
        stats = fake.stats()
        results_after = env.count(names.results_topic)
        progress(f"  {n:,} in {watch.processing_s:.2f}s = {rate:,.0f}/s, {stats['requests']} model calls")
        c = watch.counts
        join = (watch.first or watch.started) - watch.started
        detail = (f"{n:,} tasks in {watch.processing_s:.2f}s from the first record ({join:.2f}s start and group "
                  f"join before); {c['duplicate']:,.0f} duplicates, {c['succeeded']:,.0f} run again; "
                  f"result events {results_before:,} before, {results_after:,} after; first pass "
                  f"{prep.processing_s:.1f}s, {calls_before:,} model calls; {meter.per_item_ms(n)}; "
                  "`agent-service run` in a child process, timed by its own clock (first record fetched, last finish)")
        return [
            Figure(BENCH, "replay throughput", rate, "tasks/s", baseline=f"pipe {pipe_rate:,.0f}/s",
                   target=(">=", pipe_rate / 2), detail=detail),
            Figure(BENCH, "replay / pipe", 100 * rate / pipe_rate, "%", baseline=f"pipe {pipe_rate:,.0f}/s",
                   target=(">=", 50.0),
                   detail=f"the raw consume->produce pipe over the same {n:,} records, from its first record "
                          f"({pipe_join:.2f}s group join before)"),
            Figure(BENCH, "model calls during replay", float(stats["requests"]), "calls",
                   baseline=f"first pass {calls_before:,}", target=("<=", 0.0)),
        ]
    finally:
        env.release(fake)
