"""``naive``: CPU per task and tasks/s of the service beside the plain asyncio consumer a team would write.

One workload (``classify`` tasks produced first to 4 partitions; 20,000, 2,000 with ``--quick``,
``--tasks N`` to choose) on the same broker, redis-server and zero-latency fake model, each consumer
on topics, group and Redis keys of its own: first :mod:`benchmarks.naive_consumer` (one ``SET NX``
and one aiohttp call per task, 256 at once, produce, flush, commit), then the service as a user runs
it (``agent-service run``) on asyncio's event loop (``AGENT_EVENT_LOOP=asyncio``, the fallback where uvloop
cannot be imported), then on uvloop's (``AGENT_EVENT_LOOP=uvloop``, which the default ``auto`` picks).
Each runs in a child process, measured from outside the same way: CPU is the process's user +
system time from ``/proc/PID/stat`` between its first record and its last outcome (never wall
time), tasks/s over that same span. The service's ``/metrics`` is read every 20 ms until its first
record and every 0.5 s after (:data:`benchmarks.child.AFTER_FIRST_S`): read every 100 ms, as before,
the expositions cost it about 2.5 % of its CPU, a cost no Prometheus scraping every 15 s imposes and
the naive consumer, without metrics, never paid. Redis commands per task are the redis-server's own counts
(``INFO commandstats``, reset before each pass) over the whole pass, by command.

On a shared machine one pass of each varies by 10 % and more from run to run. ``--rounds N`` runs
the three passes N times in turn and reports, for each consumer, its pass of median CPU per task
(its throughput is that pass's); the ratio rows divide those medians, which may come from different
rounds, and one more row gives the median of the per-round ratios (each round's service on uvloop
over the same round's naive consumer) with their range. The service's CPU meter stops at the read
that sees its end, up to 0.5 s after it: its idle CPU there (about 15 ms/s) adds at most 0.4 µs a
task to 20,000 tasks, 4 µs to the 2,000 of ``--quick``.
"""

from __future__ import annotations

import json
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from benchmarks.child import AFTER_FIRST_S, BEFORE_FIRST_S, ChildService
from benchmarks.env import REPO, Env, FakeModel, progress, task_records
from benchmarks.inproc import CpuMeter
from benchmarks.report import Figure, median_of
from service.devtools import local, processes

BENCH = "naive"
PARTITIONS = 4
BATCH = 256


@dataclass
class Pass:
    """One consumer's run over the workload."""

    seconds: float  # from its first record to its last outcome
    cpu: dict[str, float]  # CPU seconds over that span: "consumer", then the servers it used
    results: int  # result events on its results topic
    note: str = ""
    redis_calls: dict[str, int] = field(default_factory=dict)  # command -> calls over the pass

    def redis_per_task(self, n: int) -> float:
        return sum(self.redis_calls.values()) / n

    def redis_detail(self, n: int) -> str:
        top = sorted(self.redis_calls.items(), key=lambda kv: -kv[1])[:6]
        if "evalsha" in self.redis_calls and "evalsha" not in dict(top):  # the scripts sent, always said
            top.append(("evalsha", self.redis_calls["evalsha"]))
        return ", ".join(f"{cmd} {calls / n:.2f}" for cmd, calls in top)

    def rate(self, n: int) -> float:
        return n / self.seconds

    def cpu_ms(self, n: int) -> float:
        return 1000 * self.cpu["consumer"] / n

    def others(self, n: int) -> str:
        return ", ".join(f"{k} {1000 * v / n:.3f}" for k, v in self.cpu.items() if k != "consumer")


def _servers(env: Env, fake: FakeModel) -> dict[str, int | list[int] | None]:
    return {"fake model": fake.proc.pid, "broker": env.broker.proc.pid if env.broker else None,
            "redis": env.redis.proc.pid if env.redis else None}


def reset_redis_stats(url: str) -> None:
    """Zero the redis-server's command counts (``CONFIG RESETSTAT``)."""
    with redis.Redis.from_url(url) as client:
        client.config_resetstat()


def redis_calls(url: str) -> dict[str, int]:
    """The redis-server's command counts since they were last reset, by command (lower case), without
    the commands that read and reset them."""
    with redis.Redis.from_url(url) as client:
        stats: dict[str, Any] = client.info("commandstats")
    calls = {name.removeprefix("cmdstat_").lower(): int(v["calls"]) for name, v in stats.items()}
    return {cmd: n for cmd, n in calls.items() if cmd not in ("info", "config", "config|resetstat", "info|commandstats")}


def _read_lines(proc: subprocess.Popen[bytes], out: queue.Queue[dict[str, Any] | None]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(b"{"):
            out.put(json.loads(line))
    out.put(None)  # end of output: the child exited


def naive_pass(env: Env, fake: FakeModel, n: int, timeout_s: float = 1800, python_args: Sequence[str] = ()) -> Pass:
    """:mod:`benchmarks.naive_consumer` in a child process over ``n`` tasks produced before it starts;
    ``python_args`` go between the interpreter and ``-m`` (``-m cProfile -o FILE``)."""
    names = env.names(f"{BENCH}c")
    env.create_topics([names.input_topic, names.results_topic], PARTITIONS)
    env.produce(names.input_topic, task_records(names.run, n), what="tasks")
    progress(f"naive: the naive consumer on {n:,} tasks")
    reset_redis_stats(env.redis_url)
    args = ["--bootstrap", env.bootstrap, "--topic", names.input_topic, "--results", names.results_topic,
            "--group", names.group, "--redis", env.redis_url, "--prefix", names.prefix,
            "--model-url", fake.base_url, "--tasks", str(n), "--batch", str(BATCH)]
    with open(env.dir / f"naive-{names.run}.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, *python_args, "-m", "benchmarks.naive_consumer", *args], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(proc, lines), name="naive-stdout", daemon=True)
    reader.start()
    meter = CpuMeter({"consumer": proc.pid, **_servers(env, fake)})
    first: float | None = None
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            event = lines.get(timeout=max(deadline - time.monotonic(), 0.001))
            if event is None:
                raise RuntimeError(f"the naive consumer exited with {proc.wait(30)} before its last task")
            if event["event"] == "first":
                meter.start()
                first = time.monotonic()
            elif event["event"] == "done":
                meter.stop()
                seconds = time.monotonic() - (first or 0.0)
                break
        proc.wait(60)
    except queue.Empty:
        raise RuntimeError(f"the naive consumer did not finish {n:,} tasks in {timeout_s:.0f}s") from None
    finally:
        processes.kill(proc)
        reader.join(60)
    results = env.count(names.results_topic)
    fake.reset()
    return Pass(seconds, meter.used, results, note=f"{event['claimed']:,} claimed", redis_calls=redis_calls(env.redis_url))


def service_pass(env: Env, fake: FakeModel, n: int, event_loop: str = "asyncio", python_args: Sequence[str] = ()) -> Pass:
    """``agent-service run`` (default settings but ``AGENT_EVENT_LOOP``) in a child process over ``n`` tasks
    produced before it starts; ``python_args`` as for :func:`naive_pass`."""
    from service.runtime.wiring import ensure_topics

    names = env.names(f"{BENCH}s")
    settings = env.settings(names, fake.base_url, partitions=PARTITIONS,
                            http={"enabled": True, "host": "127.0.0.1", "port": local.free_port()},
                            event_loop=event_loop)
    ensure_topics(settings)
    env.wait_for_topics([names.input_topic, names.results_topic, names.dlq_topic])
    env.produce(names.input_topic, task_records(names.run, n), what="tasks")
    progress(f"naive: the service on {n:,} tasks (agent-service run, {event_loop} event loop)")
    reset_redis_stats(env.redis_url)
    with ChildService(settings, env.dir / f"naive-{names.run}.log", python_args=python_args) as svc:
        meter = CpuMeter({"consumer": svc.pid, **_servers(env, fake)})
        watch = svc.wait(lambda c: c["succeeded"] + c["dead_lettered"] >= n, total=n, on_first=meter.start,
                         interval_s=BEFORE_FIRST_S, coarse_s=AFTER_FIRST_S)
        meter.stop()
    calls = redis_calls(env.redis_url)  # the service stopped: its pass's commands, its start's too
    results = env.count(names.results_topic)
    fake.reset()
    return Pass(watch.processing_s, meter.used, results, redis_calls=calls,
                note=f"{watch.counts['succeeded']:,.0f} succeeded, {watch.counts['dead_lettered']:,.0f} dead letters")


def task_count(env: Env, quick: bool) -> int:
    return env.tasks or (2_000 if quick else 20_000)


def run(env: Env, quick: bool) -> list[Figure]:
    n = task_count(env, quick)
    rounds: dict[str, list[Pass]] = {"naive": [], "service": [], "service on uvloop": []}
    fake = env.fake_model(0.0)
    passes_of: dict[str, Callable[[], Pass]] = {
        "naive": lambda: naive_pass(env, fake, n),
        "service": lambda: service_pass(env, fake, n, "asyncio"),
        "service on uvloop": lambda: service_pass(env, fake, n, "uvloop"),
    }
    try:
        for i in range(env.rounds):  # the consumers in turn, so that a slow spell of the machine hits all
            for what, passes in rounds.items():
                one = passes_of[what]()
                progress(f"  {what}, round {i + 1}/{env.rounds}: {one.rate(n):,.0f} tasks/s, "
                         f"{one.cpu_ms(n):.3f} ms CPU per task")
                passes.append(one)
    finally:
        env.release(fake)
    naive, service, on_uvloop = (median_pass(passes, n) for passes in rounds.values())
    return (figures(n, naive, service) + figures(n, naive, on_uvloop, "service on uvloop", naive_rows=False)
            + ([rounds_figure(n, rounds)] if env.rounds > 1 else []))


def median_pass(passes: list[Pass], n: int) -> Pass:
    """The pass of median CPU per task."""
    return median_of(passes, lambda p: p.cpu_ms(n))


def rounds_figure(n: int, rounds: dict[str, list[Pass]]) -> Figure:
    """The rounds behind the medians: the median of the per-round ratios of the service on uvloop to
    the naive consumer of the same round (the ratio rows divide the two medians, which may come
    from different rounds), with their range and every round's CPU per task."""
    naive, on_uvloop = rounds["naive"], rounds["service on uvloop"]
    ratios = sorted(s.cpu_ms(n) / b.cpu_ms(n) for b, s in zip(naive, on_uvloop, strict=True))
    detail = "; ".join(f"{what} " + " / ".join(f"{p.cpu_ms(n):.3f}" for p in passes) + " ms"
                       for what, passes in rounds.items())
    return Figure(BENCH, f"CPU per task, service on uvloop / naive, median of {len(ratios)} rounds' ratios",
                  statistics.median(ratios), "x", baseline=f"range {ratios[0]:.2f}-{ratios[-1]:.2f}x",
                  detail=f"CPU per task by round: {detail}")


def figures(n: int, naive: Pass, service: Pass, what: str = "service", naive_rows: bool = True) -> list[Figure]:
    """The service's figures of one pass (``what``), each beside the naive consumer's from the same run,
    after the naive consumer's own (``naive_rows``)."""
    workload = f"{n:,} classify tasks on {PARTITIONS} partitions, zero-latency fake model"
    cpu_base = f"naive {naive.cpu_ms(n):.3f} ms"
    rate_base = f"naive {naive.rate(n):,.0f}/s"
    own = [
        Figure(BENCH, "naive consumer, CPU per task", naive.cpu_ms(n), "ms",
               detail=f"{workload}; {n:,} in {naive.seconds:.2f}s from the first record; {naive.note}, "
                      f"{naive.results:,} result events; other processes' CPU ms per task: {naive.others(n)}"),
        Figure(BENCH, "naive consumer, throughput", naive.rate(n), "tasks/s"),
    ]
    redis_rows = [
        *([Figure(BENCH, "naive consumer, Redis commands per task", naive.redis_per_task(n), "",
                  detail=naive.redis_detail(n))] if naive_rows else []),
        Figure(BENCH, f"{what}, Redis commands per task", service.redis_per_task(n), "",
               baseline=f"naive {naive.redis_per_task(n):.2f}", detail=service.redis_detail(n)),
    ] if naive.redis_calls and service.redis_calls else []
    return (own if naive_rows else []) + redis_rows + [
        Figure(BENCH, f"{what}, CPU per task", service.cpu_ms(n), "ms", baseline=cpu_base,
               target=("<=", naive.cpu_ms(n)),
               detail=f"{workload}; {n:,} in {service.seconds:.2f}s from the first record; {service.note}, "
                      f"{service.results:,} result events; other processes' CPU ms per task: {service.others(n)}"),
        Figure(BENCH, f"{what}, throughput", service.rate(n), "tasks/s", baseline=rate_base,
               target=(">=", naive.rate(n))),
        Figure(BENCH, f"CPU per task, {what} / naive", service.cpu_ms(n) / naive.cpu_ms(n), "x",
               baseline=cpu_base, target=("<=", 1.0)),
        Figure(BENCH, f"throughput, {what} / naive", service.rate(n) / naive.rate(n), "x",
               baseline=rate_base, target=(">=", 1.0)),
    ]
