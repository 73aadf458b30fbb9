"""``parallel_consumer``: the workload of Confluent Parallel Consumer's README.

10,000 records on one partition with 1,000 keys; the work of a record is a wait drawn uniformly
from 0-5 ms (the same delay for the same offset in every consumer, from one seeded generator).
Four consumers read the same topic, each with its own group:

- the service's :class:`consumers.runner.Runner` with the handler doing the wait, no ledger;
- pyrallel-consumer (PyPI), key-ordered with its asyncio engine, in a Python >= 3.12 virtual
  environment of its own (``.agent-local/bench/pyrallel-venv``, made on first use);
- Confluent's Parallel Consumer itself (Java, ``KEY`` ordering, ``maxConcurrency`` the Runner's
  window), from the jars of ``make pc-jars``, run by ``parallel_consumer/PcBench.java``;
- a sequential consumer: one record at a time, a synchronous commit after each.

The same workload then runs through the whole service (``agent-service run`` in a child process,
ledger and all): 10,000 ``classify`` tasks with the same 1,000 keys on one partition, each answered
by the fake model after a wait drawn from 0-5 ms. That figure is the service's; the four above
are consumers with a handler that only waits.

The wall time runs from the first record handed to the work to the last one finished; the time
to join the group is reported next to it. A full run measures the Runner and pyrallel-consumer
three times each and reports the medians; a fourth Runner run with a window as large as the topic
(it never pauses) shows what the window's pause/resume cycles cost.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import random
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from confluent_kafka import Consumer

from benchmarks.env import REPO, Env, assignment_strategy, progress
from benchmarks.report import Figure
from consumers.partitions import RunnerConfig
from consumers.records import Record
from consumers.runner import Runner

BENCH = "parallel_consumer"
RECORDS = 10_000
KEYS = 1_000
MAX_WORK_S = 0.005
SEED = 20_240_601
VENV = REPO / ".agent-local" / "bench" / "pyrallel-venv"
TARGET_VS_PYRALLEL = 1.5  # the whole service's speed-up over pyrallel-consumer's wall time (issue 31, goal 6)


def delays(seed: int, n: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(0, MAX_WORK_S) for _ in range(n)]


class Tally:
    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None
        self.violations = 0
        self._last_offset: dict[bytes | None, int] = {}
        self.done = asyncio.Event()

    def begin(self, key: bytes | None, offset: int) -> None:
        if self.first is None:
            self.first = time.monotonic()
        previous = self._last_offset.get(key)
        if previous is not None and offset < previous:
            self.violations += 1
        self._last_offset[key] = offset

    def end(self) -> None:
        self.count += 1
        self.last = time.monotonic()
        if self.count >= self.n:
            self.done.set()

    @property
    def wall_s(self) -> float:
        assert self.first is not None and self.last is not None
        return self.last - self.first


def consumer_config(env: Env, group: str) -> dict[str, object]:
    return {
        "bootstrap.servers": env.bootstrap, "group.id": group, "auto.offset.reset": "earliest",
        "enable.auto.commit": False, "enable.auto.offset.store": False,
        "session.timeout.ms": 6000, "heartbeat.interval.ms": 500,
        "partition.assignment.strategy": assignment_strategy(env.broker_kind),
    }


async def run_runner(env: Env, topic: str, group: str, work: list[float],
                     window: int | None = None) -> tuple[Tally, float, RunnerConfig]:
    tally = Tally(len(work))

    async def handler(record: Record) -> None:
        tally.begin(record.key, record.offset)
        await asyncio.sleep(work[record.offset])
        tally.end()

    config = RunnerConfig(topic=topic)  # the service's defaults
    if window is not None:
        config.max_in_flight = config.max_in_flight_per_partition = window
    runner = Runner(consumer_config(env, group), handler, config)
    started = time.monotonic()
    task = asyncio.create_task(runner.run())
    try:
        await asyncio.wait_for(tally.done.wait(), timeout=300)
    finally:
        runner.stop()
        await asyncio.wait_for(task, 60)
    return tally, (tally.first or started) - started, config


def run_sequential(env: Env, topic: str, group: str, work: list[float], limit: int) -> tuple[int, float, float]:
    """(records, wall seconds, join seconds) of a poll-one, work, commit-one consumer."""
    consumer = Consumer(consumer_config(env, group))
    consumer.subscribe([topic])
    started = time.monotonic()
    first: float | None = None
    n = 0
    deadline = started + 600
    try:
        while n < limit and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            if first is None:
                first = time.monotonic()
            time.sleep(work[msg.offset() or 0])
            consumer.commit(message=msg, asynchronous=False)
            n += 1
        last = time.monotonic()
    finally:
        consumer.close()
    return n, last - (first or started), (first or started) - started


# ---------------------------------------------------------------------------- pyrallel-consumer


def _version(python: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([python, "-c", "import sys; print(sys.version_info[0], sys.version_info[1])"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    major, minor = out.stdout.split()
    return int(major), int(minor)


def _find_python312() -> str | None:
    candidates = [os.environ.get("BENCH_PYTHON312", "")]
    candidates += [f"python3.{minor}" for minor in (14, 13, 12)]
    pyenv_root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates += sorted(glob.glob(f"{pyenv_root}/versions/3.1[2-9]*/bin/python3"), reverse=True)
    for candidate in filter(None, candidates):
        version = _version(candidate)
        if version is not None and version >= (3, 12):
            return candidate
    return None


def _has_pyrallel(python: Path) -> bool:
    if not python.exists():
        return False
    check = subprocess.run([str(python), "-c", "import pyrallel_consumer"], capture_output=True, timeout=60)
    return check.returncode == 0


def pyrallel_python() -> tuple[str | None, str]:
    """An interpreter with pyrallel-consumer installed, or None and why not."""
    python = VENV / "bin" / "python"
    if _has_pyrallel(python):
        return str(python), "cached virtual environment"
    base = _find_python312()
    if base is None:
        return None, ("pyrallel-consumer needs Python >= 3.12 and none was found "
                      "(set BENCH_PYTHON312 to one)")
    progress(f"parallel_consumer: installing pyrallel-consumer into {VENV} (Python from {base})")
    try:
        subprocess.run([base, "-m", "venv", str(VENV)], check=True, capture_output=True, timeout=300)
        install = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "pyrallel-consumer"],
            capture_output=True, text=True, timeout=600,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"could not make a virtual environment: {exc}"
    if install.returncode != 0:
        lines = [line for line in install.stderr.splitlines() if line.startswith("ERROR")]
        return None, "pip install pyrallel-consumer failed: " + (lines[-1] if lines else install.stderr[-300:])
    if not _has_pyrallel(python):
        return None, "pyrallel-consumer installed but does not import"
    return str(python), "installed now"


def run_pyrallel(env: Env, topic: str, group: str, n: int) -> tuple[dict[str, object] | None, str]:
    python, why = pyrallel_python()
    if python is None:
        return None, why
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("KAFKA_", "EXECUTION_", "PARALLEL_CONSUMER_", "PROCESS_", "METRICS_"))}
    scratch = env.dir / "pyrallel"
    scratch.mkdir(exist_ok=True)  # its settings read a .env file from the working directory
    proc = subprocess.run(
        [python, str(Path(__file__).with_name("pyrallel_probe.py")), "--bootstrap", env.bootstrap,
         "--topic", topic, "--group", group, "--records", str(n), "--seed", str(SEED),
         "--max-work-s", str(MAX_WORK_S)],
        capture_output=True, text=True, timeout=400, env=clean, cwd=scratch,
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        return None, f"pyrallel-consumer run failed (exit {proc.returncode}): {tail[0][:200]}"
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1]), why
    except (ValueError, IndexError):
        return None, f"pyrallel-consumer printed no result: {proc.stdout[-200:]!r}"


# ---------------------------------------------------------------------------- Confluent Parallel Consumer

PC_LIBS = REPO / ".kafka" / "pc-libs"
PC_SOURCE = Path(__file__).with_name("parallel_consumer") / "PcBench.java"


def run_parallel_consumer(env: Env, topic: str, group: str, work: list[float],
                          concurrency: int) -> tuple[dict[str, object] | None, str]:
    """Confluent's Parallel Consumer (Java, KEY ordering) on the same topic and the same waits."""
    if not any(PC_LIBS.glob("parallel-consumer-core-*.jar")):
        return None, f"no Parallel Consumer jars in {PC_LIBS}: run `make pc-jars`"
    java = shutil.which("java")
    if java is None:
        return None, "no java on the PATH"
    delays_file = env.dir / "pc-delays.txt"
    delays_file.write_text("".join(f"{w!r}\n" for w in work))
    try:
        proc = subprocess.run([java, "-Xmx512m", "-cp", f"{PC_LIBS}/*", str(PC_SOURCE), env.bootstrap, topic, group,
                               str(delays_file), str(concurrency)], capture_output=True, text=True, timeout=400)
    except subprocess.TimeoutExpired:
        return None, "Parallel Consumer did not finish in 400 s"
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        return None, f"Parallel Consumer run failed (exit {proc.returncode}): {tail[0][:200]}"
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1]), "Java 17, kafka-clients of its own"
    except (ValueError, IndexError):
        return None, f"Parallel Consumer printed no result: {proc.stdout[-200:]!r}"


# ---------------------------------------------------------------------------- the whole service


def run_service(env: Env, names_run: str, quick: bool) -> tuple[float, str]:
    """The same workload through ``agent-service run``: 10,000 ``classify`` tasks on one partition
    with 1,000 Kafka keys, each answered by the fake model after a wait drawn uniformly from 0-5 ms.
    Returns the wall time from the first record consumed to the last outcome, and a detail line."""
    from benchmarks.child import ChildService, cpu_seconds
    from benchmarks.env import task_record
    from service.devtools import local
    from service.runtime.wiring import ensure_topics

    fake = env.fake_model(0.0)
    try:
        fake._request("POST", "/_config", {"latency_s": 0.0, "latency_max_s": MAX_WORK_S})
        names = env.names(f"{BENCH}svc")
        settings = env.settings(names, fake.base_url, partitions=1,
                                http={"enabled": True, "host": "127.0.0.1", "port": local.free_port()})
        ensure_topics(settings)
        env.wait_for_topics([names.input_topic])
        records = ((f"key-{i % KEYS}".encode(), task_record(f"{names.run}-{i}")[1]) for i in range(RECORDS))
        env.produce(names.input_topic, records, partition=0, what="tasks")
        with ChildService(settings, env.dir / f"pc-service-{names.run}.log") as svc:
            cpu0 = [0.0, 0.0]

            def first() -> None:
                cpu0[:] = [cpu_seconds(svc.pid), cpu_seconds(fake.proc.pid)]

            # every 50 ms at the first record and near the end, 250 ms between: 20 /metrics answers a
            # second cost the service a few per cent of its CPU, a cost the other consumers do not pay
            watch = svc.wait(lambda c: c["succeeded"] + c["dead_lettered"] >= RECORDS, total=RECORDS,
                             on_first=first, interval_s=0.05, coarse_s=0.25)
            cpu = (cpu_seconds(svc.pid) - cpu0[0], cpu_seconds(fake.proc.pid) - cpu0[1])
        stats = fake.stats()
    finally:
        env.release(fake)
    wall = watch.processing_s
    return wall, (f"{RECORDS:,} classify tasks, 1 partition, {KEYS:,} keys, fake model waiting 0-5 ms; "
                  f"{RECORDS / wall:,.0f}/s from the first record ({(watch.first or watch.started) - watch.started:.2f}s start and "
                  f"group join before); {watch.counts['succeeded']:,.0f} succeeded, {stats['requests']:,} model "
                  f"calls; CPU ms per task: service {1000 * cpu[0] / RECORDS:.2f}, fake model "
                  f"{1000 * cpu[1] / RECORDS:.2f}; `agent-service run` in a child process, default settings")


# ---------------------------------------------------------------------------- the benchmark


def _repeat(name: str, reps: int, run_once: Callable[[int], tuple[dict[str, object] | None, str]]
            ) -> tuple[list[float], dict[str, object] | None, str]:
    """Run another consumer ``reps`` times: its wall times, its last result and why it is (un)available."""
    walls: list[float] = []
    last: dict[str, object] | None = None
    why = ""
    for rep in range(reps):
        progress(f"parallel_consumer: {name}, run {rep + 1}/{reps}")
        result, why = run_once(rep)
        if result is None:
            progress(f"  {name} unavailable: {why}")
            break
        last = result
        walls.append(float(result["wall_s"]))  # type: ignore[arg-type]
        progress(f"  {name}: {walls[-1]:.2f}s ({RECORDS / walls[-1]:,.0f}/s)")
    return walls, last, why


def _runs(walls: list[float]) -> str:
    return ", ".join(f"{w:.2f}" for w in walls) + " s"


def service_figures(svc_wall: float, detail: str, pyrallel_wall: float | None, pc_wall: float | None,
                    pyrallel_why: str = "", pc_why: str = "") -> list[Figure]:
    """The whole service's wall time beside pyrallel-consumer's and the Parallel Consumer's (same run), and
    its speed-ups over them (their wall time over the service's); the one over pyrallel has the target."""
    pyr = f"pyrallel {pyrallel_wall:.2f}s" if pyrallel_wall else "pyrallel n/a"
    pc = f"Parallel Consumer {pc_wall:.2f}s" if pc_wall else "Parallel Consumer n/a"
    figures = [Figure(BENCH, "whole service wall time", svc_wall, "s", baseline=f"{pyr}, {pc}", detail=detail)]
    target = (">=", TARGET_VS_PYRALLEL)
    name = "whole service / pyrallel-consumer"
    if pyrallel_wall:
        figures.append(Figure(BENCH, name, pyrallel_wall / svc_wall, "x", baseline=pyr, target=target,
                              detail=f"pyrallel-consumer's wall time over the service's: {pyrallel_wall:.2f}s / "
                                     f"{svc_wall:.2f}s (a handler that only waits against the whole service)"))
    else:
        figures.append(Figure(BENCH, name, None, "x", target=target, error="unavailable", unavailable=True,
                              detail=pyrallel_why))
    name = "whole service / Parallel Consumer"
    if pc_wall:
        figures.append(Figure(BENCH, name, pc_wall / svc_wall, "x", baseline=pc))
    else:
        figures.append(Figure(BENCH, name, None, "x", error="unavailable", unavailable=True, detail=pc_why))
    return figures


def run(env: Env, quick: bool) -> list[Figure]:
    reps = 1 if quick else 3
    names = env.names(BENCH)
    topic = names.input_topic
    env.create_topics([topic], 1)
    records = ((f"key-{i % KEYS}".encode(), f"record-{i}".encode()) for i in range(RECORDS))
    progress(f"parallel_consumer: {RECORDS:,} records, 1 partition, {KEYS:,} keys, work 0-5 ms")
    env.produce(topic, records, partition=0)
    work = delays(SEED, RECORDS)
    figures: list[Figure] = []

    walls: list[float] = []
    joins: list[float] = []
    violations = 0
    config = RunnerConfig(topic=topic)
    for rep in range(reps):
        progress(f"parallel_consumer: the service's Runner, run {rep + 1}/{reps}")
        tally, join_s, config = asyncio.run(run_runner(env, topic, f"{names.group}-runner{rep}", work))
        walls.append(tally.wall_s)
        joins.append(join_s)
        violations += tally.violations
        progress(f"  Runner: {tally.wall_s:.2f}s ({RECORDS / tally.wall_s:,.0f}/s)")
    runner_wall = statistics.median(walls)
    runner_rate = RECORDS / runner_wall

    wide, _, _ = asyncio.run(run_runner(env, topic, f"{names.group}-wide", work, window=RECORDS))
    progress(f"  Runner, window {RECORDS:,}: {wide.wall_s:.2f}s ({RECORDS / wide.wall_s:,.0f}/s)")

    pyr_walls, pyr, pyr_why = _repeat("pyrallel-consumer", reps,
                                      lambda rep: run_pyrallel(env, topic, f"{names.group}-pyrallel{rep}", RECORDS))
    pyr_wall = statistics.median(pyr_walls) if pyr_walls else None
    pyr_rate = RECORDS / pyr_wall if pyr_wall else None

    pc_walls, pc, pc_why = _repeat("Confluent Parallel Consumer", reps, lambda rep: run_parallel_consumer(
        env, topic, f"{names.group}-pc{rep}", work, config.max_in_flight))
    pc_wall = statistics.median(pc_walls) if pc_walls else None

    seq_limit = 2_000 if quick else RECORDS
    progress(f"parallel_consumer: sequential consumer ({seq_limit:,} records)")
    seq_n, seq_wall, seq_join = run_sequential(env, topic, f"{names.group}-seq", work, seq_limit)
    seq_rate = seq_n / seq_wall
    progress(f"  sequential: {seq_n:,} in {seq_wall:.2f}s ({seq_rate:,.0f}/s)")

    progress("parallel_consumer: the whole service (agent-service run, ledger, fake model 0-5 ms)")
    svc_wall, svc_detail = run_service(env, names.run, quick)
    progress(f"  the service: {svc_wall:.2f}s ({RECORDS / svc_wall:,.0f}/s)")

    median = "median of " if reps > 1 else ""
    expected_work = sum(work) / RECORDS * 1000
    baseline = f"pyrallel {pyr_rate:,.0f}/s" if pyr_rate else "pyrallel n/a"
    figures.append(Figure(
        BENCH, "Runner wall time (the Runner alone)", runner_wall, "s", baseline=baseline, target=("<=", 2.0),
        detail=(f"{median}{_runs(walls)}; {RECORDS:,} records, {runner_rate:,.0f}/s, max_in_flight "
                f"{config.max_in_flight} (the service's default), {violations} key-order violations, "
                f"{statistics.median(joins):.2f}s group join before the first record; "
                f"mean work {expected_work:.2f} ms/record"),
    ))
    figures += service_figures(svc_wall, svc_detail, pyr_wall, pc_wall, pyr_why, pc_why)
    figures.append(Figure(
        BENCH, f"Runner, max_in_flight {RECORDS:,}", wide.wall_s, "s",
        detail=(f"the same Runner with a window that never fills (no pause/resume): {RECORDS / wide.wall_s:,.0f}/s, "
                f"{wide.violations} key-order violations"),
    ))
    if pyr is not None and pyr_wall is not None and pyr_rate is not None:
        figures.append(Figure(
            BENCH, "pyrallel-consumer wall time", pyr_wall, "s",
            detail=(f"{median}{_runs(pyr_walls)}; {pyr_rate:,.0f}/s, key_hash ordering, async engine, "
                    f"max_in_flight {pyr['max_in_flight']} (its default), {pyr['order_violations']} key-order "
                    f"violations, {float(pyr['join_s']):.2f}s to the first record ({pyr_why})"),  # type: ignore[arg-type]
        ))
        figures.append(Figure(BENCH, "Runner / pyrallel-consumer", runner_rate / pyr_rate, "x",
                              baseline=baseline, target=(">=", 1.5)))
    else:
        figures.append(Figure(BENCH, "Runner / pyrallel-consumer", None, "x", target=(">=", 1.5),
                              error="unavailable", unavailable=True, detail=pyr_why))
    if pc is not None and pc_wall is not None:
        figures.append(Figure(
            BENCH, "Confluent Parallel Consumer wall time", pc_wall, "s",
            detail=(f"{median}{_runs(pc_walls)}; {RECORDS / pc_wall:,.0f}/s, KEY ordering, maxConcurrency "
                    f"{pc['max_concurrency']} (the Runner's window), {pc['order_violations']} key-order violations, "
                    f"{float(pc['join_s']):.2f}s to the first record ({pc_why})"),  # type: ignore[arg-type]
        ))
        figures.append(Figure(BENCH, "Runner / Parallel Consumer", (RECORDS / runner_wall) / (RECORDS / pc_wall), "x",
                              baseline=f"Parallel Consumer {RECORDS / pc_wall:,.0f}/s"))
    else:
        figures.append(Figure(BENCH, "Runner / Parallel Consumer", None, "x", error="unavailable",
                              unavailable=True, detail=pc_why))
    figures.append(Figure(
        BENCH, "sequential consumer", seq_rate, "rec/s",
        detail=(f"{seq_n:,} records in {seq_wall:.2f}s, a synchronous commit after each "
                f"({seq_join:.2f}s group join); the Runner's {'median ' if reps > 1 else ''}rate is "
                f"{runner_rate / seq_rate:.1f}x this"),
    ))
    return figures
