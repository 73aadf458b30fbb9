"""``cold_burst``: a burst of tasks after an idle period, against Little's bound, with and without the
window's memory (``AGENT_LLM__WINDOW_MEMORY_S``).

A 500 ms model that answers 429 above 200 concurrent calls (the fake model's ``max_concurrency``), so
Little's bound is 200 / 0.5 s = 400 tasks/s; the worker may have 400 tasks in flight, so the fleet's
window, not the worker's cap, is what finds the limit. Each pass, on topics, a group and a ledger
prefix of its own:

1. warm-up: ``agent-service run`` works through a backlog, long enough for the window to find the
   limit (and, with the memory on, to remember it), then stops;
2. idle: the window's keys are deleted, as their idle expiry does (``idle_s`` later); the memory,
   with its age, is kept;
3. the burst: a backlog of 2,000 tasks and a new ``agent-service run`` (a restart): throughput from
   the first record consumed to the last outcome, as a share of the bound, by the service's own clock
   (:mod:`benchmarks.child`), scraped twice a second meanwhile.

Both passes run in one invocation: memory off (the window starts at ``AGENT_LLM__WINDOW_INITIAL``,
as before the memory) and memory on. One burst varies by a point or two from run to run on a
shared machine: ``--rounds N`` runs both passes N times in turn and reports each way's median burst
(the ratio row divides those two medians, which may come from different rounds), and the lowest
and highest memory-on burst in a row of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from benchmarks.child import AFTER_FIRST_S, ChildService
from benchmarks.env import Env, FakeModel, Names, progress, task_records
from benchmarks.report import Figure, median_of
from dedup.keys import Keys
from service.core.settings import Settings
from service.devtools import local
from service.llm.tags import endpoint_tag

BENCH = "cold_burst"
LATENCY_S = 0.5
ALLOWED = 200  # the model's concurrent calls; one more is answered 429
IN_FLIGHT = 400
TARGET = 0.95


@dataclass
class Pass:
    memory_s: float
    n: int
    seconds: float
    remembered: int  # the memory when the burst started (0: none)
    refused: int  # 429s over the concurrency limit during the burst
    peak_open: int
    dead: int

    @property
    def rate(self) -> float:
        return self.n / self.seconds

    def detail(self, bound: float) -> str:
        memory = f"memory {self.memory_s:.0f}s, remembered window {self.remembered}" if self.memory_s else "memory off"
        return (f"{100 * self.rate / bound:.1f}% of Little's bound; {self.n:,} tasks in {self.seconds:.2f}s from the "
                f"first record (ideal {self.n / bound:.1f}s); {memory}; {self.refused} 429s, at most {self.peak_open} "
                f"model calls open at once; {self.dead} dead-lettered")


def run(env: Env, quick: bool) -> list[Figure]:
    warm, burst = (1_000, 600) if quick else (4_000, 2_000)
    bound = ALLOWED / LATENCY_S
    offs: list[Pass] = []
    ons: list[Pass] = []
    for _ in range(env.rounds):  # the two passes in turn, each round's after the last
        offs.append(_pass(env, 0.0, warm, burst))
        ons.append(_pass(env, 3600.0, warm, burst))
    off, on = median_of(offs, lambda p: p.rate), median_of(ons, lambda p: p.rate)
    label = f"{burst:,} tasks after idle, {LATENCY_S * 1000:.0f} ms model, {ALLOWED} calls allowed"
    return figures(bound, label, off, on) + ([rounds_figure(bound, offs, ons)] if env.rounds > 1 else [])


def rounds_figure(bound: float, offs: list[Pass], ons: list[Pass]) -> Figure:
    """The spread behind the medians (``--rounds``): the lowest memory-on share of the rounds, with
    the highest beside, and every round's share of the bound, each way."""
    shares = sorted(100 * p.rate / bound for p in ons)
    by_round = "; ".join(f"memory {way} " + " / ".join(f"{100 * p.rate / bound:.1f}%" for p in passes)
                         for way, passes in (("off", offs), ("on", ons)))
    return Figure(BENCH, f"share of Little's bound, memory on, lowest of {len(ons)} rounds", shares[0], "%",
                  baseline=f"highest {shares[-1]:.1f}%", detail=f"by round: {by_round}")


def figures(bound: float, label: str, off: Pass, on: Pass) -> list[Figure]:
    """The figures of a memory-off and a memory-on pass."""
    return [
        Figure(BENCH, f"share of Little's bound, memory off, {label}", 100 * off.rate / bound, "%",
               baseline=f"bound {bound:,.0f}/s", detail=off.detail(bound)),
        Figure(BENCH, f"share of Little's bound, memory on, {label}", 100 * on.rate / bound, "%",
               baseline=f"memory off {100 * off.rate / bound:.1f}%", target=(">=", 100 * TARGET), detail=on.detail(bound)),
        Figure(BENCH, "throughput, memory on / memory off", on.rate / off.rate, "x",
               baseline=f"{off.rate:,.0f}/s -> {on.rate:,.0f}/s"),
    ]


def _settings(env: Env, names: Names, fake: FakeModel, memory_s: float) -> Settings:
    return env.settings(names, fake.base_url, partitions=1, max_in_flight=IN_FLIGHT,
                        http={"enabled": True, "host": "127.0.0.1", "port": local.free_port()},
                        llm={"window_memory_s": memory_s, "max_attempts": 8})


def _pass(env: Env, memory_s: float, warm: int, burst: int) -> Pass:
    """One pass, with a fake model of its own (nothing of the other pass's left in it)."""
    fake = env.fake_model(LATENCY_S)
    try:
        fake.configure(max_concurrency=ALLOWED)
        return _measure(env, fake, memory_s, warm, burst)
    finally:
        env.release(fake)


def warm_up(env: Env, fake: FakeModel, memory_s: float, warm: int, label: str) -> tuple[Any, int]:
    """A warm-up of ``warm`` tasks, then the window dropped as after an idle period; returns the run's
    names and the window the fleet remembers (0: none)."""
    names = env.names(BENCH)
    settings = _settings(env, names, fake, memory_s)
    from service.runtime.wiring import ensure_topics

    ensure_topics(settings)
    env.wait_for_topics([names.input_topic])
    progress(f"{label}: memory {'off' if not memory_s else f'{memory_s:.0f}s'}: warm-up of {warm:,} tasks")
    env.produce(names.input_topic, task_records(f"{names.run}-warm", warm), what="tasks")
    with ChildService(settings, env.dir / f"{label}-{names.run}-warm.log") as svc:
        svc.wait(lambda c: c["succeeded"] + c["dead_lettered"] >= warm, total=warm, stall_s=60)
    redis = _redis(env)
    keys, tag = Keys(names.prefix), endpoint_tag(fake.base_url)
    try:
        redis.delete(keys.endpoint(tag, "window"), keys.endpoint(tag, "slots"))  # as after idle_s
        return names, int(float(redis.hget(keys.endpoint(tag, "memory"), "safe") or 0))
    finally:
        redis.close()


def _measure(env: Env, fake: FakeModel, memory_s: float, warm: int, burst: int) -> Pass:
    names, remembered = warm_up(env, fake, memory_s, warm, "cold_burst")
    fake.reset()
    env.produce(names.input_topic, task_records(f"{names.run}-burst", burst), what="tasks")
    again = _settings(env, names, fake, memory_s)  # a new process: its own metrics port
    with ChildService(again, env.dir / f"burst-{names.run}.log") as svc:
        watch = svc.wait(lambda c: c["succeeded"] + c["dead_lettered"] >= burst, total=burst, stall_s=60,
                         coarse_s=AFTER_FIRST_S)
    stats = fake.stats()
    result = Pass(memory_s, burst, watch.processing_s, remembered, int(stats["over_concurrency"]),
                  int(stats["peak_open"]), int(watch.counts["dead_lettered"]))
    progress(f"  {result.detail(ALLOWED / LATENCY_S)}")
    return result


def _redis(env: Env) -> Any:
    import redis

    return redis.Redis.from_url(env.redis_url)
