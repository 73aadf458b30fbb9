"""``workers``: ``agent-service run --workers N`` end to end, sharing CPUs and pinned apart, and what a task costs.

The e2e workload (zero-latency fake model, small ``classify`` tasks produced first, 6 partitions),
run by the service as a user runs it: ``agent-service run --workers N`` in a child process, watched
through the supervisor's one ``/metrics`` (one scrape adds up every worker). Each pass has topics,
a group and a ledger prefix of its own. Besides the rate, each pass measures the per-task costs a
fleet is sized from (docs/SCALING.md): CPU of the service processes (every worker and the
supervisor), of the fake model, the broker and redis-server, and Redis commands per task (from
``INFO commandstats``: every ``EVALSHA`` of a pipeline counts as one).

A pinned series runs the same passes with the service kept off the CPUs of what it talks to
(:mod:`benchmarks.pinning`): ``--workers N`` started under ``taskset -c`` on N CPUs of this process's
affinity set, and the fake model, the broker, redis-server and this benchmark moved with
``taskset -a -p`` to the other CPUs for the pass (a third of the set, the same ones in every pass,
given back afterwards), for N = 1, 2 and as many as the set can hold, each reported as a ratio to
the pinned single worker. That is fair in the one way that matters for the ratio: in every pass the
service has exactly its N CPUs and nothing it waits on competes for them, and whatever it waits on
has the same CPUs each time. It does not keep other programs on the machine off those CPUs (the
table's load average says how busy the machine was). A count the set cannot hold apart (two CPUs
leave one worker, one CPU none) is reported unavailable with the reason, never measured on shared
CPUs under the pinned name; the unpinned rows above it are the shared-CPU figures. ``taskset``
(util-linux) must be on PATH: without it the benchmark fails at once, saying so.

A third series scales the partition count under two workers with a 1 s model and 100 tasks in
flight each (1, 2, 4 partitions), where CPU is not the limit: each worker then makes at most
100 tasks/s, a worker without a partition does nothing, and the rate follows
min(workers, partitions) x in_flight / latency.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from benchmarks.child import ChildService, cpu_seconds
from benchmarks.env import Env, FakeModel, progress, task_records
from benchmarks.pinning import (
    Split,
    cpu_list,
    describe,
    launcher,
    pinned,
    require_taskset,
    reserved,
    split_cpus,
    worker_counts,
)
from benchmarks.report import Figure
from service.devtools import local

BENCH = "workers"
PARTITIONS = 6


@dataclass
class Pass:
    workers: int
    partitions: int
    n: int
    rate: float
    seconds: float
    cpu_ms: dict[str, float]  # per task, by process group
    redis_scripts: float  # ledger scripts per task (EVALSHA, pipelined or not)
    redis_commands: float  # every command Redis ran per task, those inside the scripts included
    peak_rss_mb: float
    ledger_bytes: float  # Redis memory per task left behind (kept for the ledger's retention)

    def detail(self) -> str:
        cpu = ", ".join(f"{name} {ms:.2f}" for name, ms in self.cpu_ms.items())
        return (f"{self.n:,} tasks in {self.seconds:.2f}s from the first record, {self.partitions} partitions; "
                f"CPU ms per task: {cpu}; Redis per task: {self.redis_scripts:.1f} scripts, "
                f"{self.redis_commands:.1f} commands in all, {self.ledger_bytes:,.0f} bytes of memory kept; "
                f"largest process RSS {self.peak_rss_mb:.0f} MB")


def _redis_commands(client: Any) -> tuple[float, float]:
    """(EVALSHA calls, every command) Redis has run so far."""
    stats = client.info("commandstats")
    total = float(sum(v.get("calls", 0) for k, v in stats.items() if k.startswith("cmdstat_")))
    return float(stats.get("cmdstat_evalsha", {}).get("calls", 0)), total


def one_pass(env: Env, fake: FakeModel, workers: int, partitions: int, n: int, cpus: Split | None = None,
             **overrides: Any) -> Pass:
    import redis

    from service.runtime.wiring import ensure_topics

    names = env.names(f"{BENCH}{workers}x{partitions}")
    settings = env.settings(names, fake.base_url, partitions=partitions,
                            http={"enabled": True, "host": "127.0.0.1", "port": local.free_port()}, **overrides)
    ensure_topics(settings)
    env.wait_for_topics([names.input_topic])
    env.produce(names.input_topic, task_records(names.run, n), what="tasks")
    where = "" if cpus is None else f", service on {describe(cpus.service)}, the others on {describe(cpus.others)}"
    progress(f"workers: --workers {workers}, {partitions} partitions, {n:,} tasks{where}")
    client = redis.Redis.from_url(env.redis_url)
    others = {"fake model": fake.proc.pid}
    others.update({"broker": env.broker.proc.pid} if env.broker else {})
    others.update({"redis": env.redis.proc.pid} if env.redis else {})
    start: dict[str, float] = {}
    redis_at_first: list[tuple[float, float]] = []
    memory_before = float(client.info("memory")["used_memory"])
    placed = contextlib.nullcontext() if cpus is None else pinned([os.getpid(), *others.values()], cpus.others)
    try:
        with placed, ChildService(settings, env.dir / f"workers-{names.run}.log", "--workers", str(workers),
                                  launcher=() if cpus is None else launcher(cpus.service)) as svc:
            def first() -> None:
                start["service"] = cpu_seconds(svc.pid)
                redis_at_first.append(_redis_commands(client))
                start.update({name: cpu_seconds(pid) for name, pid in others.items()})

            watch = svc.wait(lambda c: c["succeeded"] + c["dead_lettered"] >= n, total=n, on_first=first,
                             interval_s=0.02)
            used = {"service": cpu_seconds(svc.pid) - start["service"]}
            used.update({name: cpu_seconds(pid) - start[name] for name, pid in others.items()})
            scripts, commands = (b - a for a, b in zip(redis_at_first[0], _redis_commands(client), strict=True))
        memory = float(client.info("memory")["used_memory"]) - memory_before
    finally:
        with contextlib.suppress(Exception):
            client.close()
    rate = n / watch.processing_s
    fake.reset()
    progress(f"  {n:,} in {watch.processing_s:.2f}s = {rate:,.0f}/s")
    return Pass(workers, partitions, n, rate, watch.processing_s,
                {name: 1000 * secs / n for name, secs in used.items()}, scripts / n, commands / n, watch.peak_rss_mb,
                memory / n)


def _too_few(available: set[int], workers: int) -> str:
    return (f"{len(available)} CPU{'s' if len(available) > 1 else ''} in this process's affinity set "
            f"({cpu_list(available)}): --workers {workers} needs {workers} CPU{'s' if workers > 1 else ''} of its "
            f"own and the fake model, broker and redis-server {reserved(available)} more; not measured")


def pinned_figures(available: Iterable[int], measured: dict[int, Pass]) -> list[Figure]:
    """A rate per worker count of :func:`worker_counts` and its ratio to one worker, all pinned.

    ``measured`` holds the passes that ran; a count the affinity set cannot hold apart from the
    others gets an unavailable figure that says why."""
    cpus = set(available)
    one = measured.get(1)
    figures: list[Figure] = []
    for workers in worker_counts(cpus):
        split, got = split_cpus(cpus, workers), measured.get(workers)
        if split is None or got is None:
            why = _too_few(cpus, workers) if split is None else "the pass did not run"
            figures.append(Figure(BENCH, f"--workers {workers}, pinned", None, "tasks/s", error="too few CPUs",
                                  unavailable=True, detail=why))
            if workers > 1:
                figures.append(Figure(BENCH, f"--workers {workers} / 1 worker, pinned", None, "x",
                                      error="too few CPUs", unavailable=True, detail=why))
            continue
        place = (f"service on {describe(split.service)}; the fake model, broker, redis-server and the benchmark on "
                 f"{describe(split.others)}")
        figures.append(Figure(BENCH, f"--workers {workers}, pinned", got.rate, "tasks/s",
                              baseline="-" if one is None or workers == 1 else f"1 worker {one.rate:,.0f}/s",
                              detail=f"{place}; {got.detail()}"))
        if workers > 1:
            ratio = None if one is None else got.rate / one.rate
            figures.append(Figure(BENCH, f"--workers {workers} / 1 worker, pinned", ratio, "x",
                                  baseline="1 worker, pinned", error=None if one else "no 1-worker pass",
                                  detail=place))
    return figures


def run(env: Env, quick: bool) -> list[Figure]:
    require_taskset()  # the pinned series needs it: fail before anything is measured
    n = 10_000 if quick else 40_000
    fake = env.fake_model(0.0)
    figures: list[Figure] = []
    try:
        one = one_pass(env, fake, 1, PARTITIONS, n)
        two = one_pass(env, fake, 2, PARTITIONS, n)
        figures += [
            Figure(BENCH, "--workers 1, end to end", one.rate, "tasks/s", detail=one.detail()),
            Figure(BENCH, "--workers 2, end to end", two.rate, "tasks/s", baseline=f"1 worker {one.rate:,.0f}/s",
                   detail=two.detail()),
            Figure(BENCH, "2 workers / 1 worker", two.rate / one.rate, "x", baseline="1 worker",
                   detail="both on this machine's cores, shared with the fake model, the broker and redis-server"),
        ]
        available = os.sched_getaffinity(0)
        splits = {w: split_cpus(available, w) for w in worker_counts(available)}
        measured = {w: one_pass(env, fake, w, PARTITIONS, n, cpus=split)
                    for w, split in splits.items() if split is not None}
        figures += pinned_figures(available, measured)
        figures += _partition_series(env, fake, quick)
    finally:
        env.release(fake)
    return figures


def _partition_series(env: Env, fake: FakeModel, quick: bool) -> list[Figure]:
    latency_s, in_flight = 1.0, 100
    fake.set_latency(latency_s)
    m = 600 if quick else 1_500
    figures: list[Figure] = []
    for partitions in (1, 2, 4):
        p = one_pass(env, fake, 2, partitions, m, max_in_flight=in_flight)
        bound = min(2, partitions) * in_flight / latency_s
        figures.append(Figure(
            BENCH, f"--workers 2, {partitions} partition(s), 1 s model, 100 in flight each", p.rate, "tasks/s",
            baseline=f"bound {bound:,.0f}/s", detail=f"{100 * p.rate / bound:.0f}% of the bound; {p.detail()}"))
    return figures
