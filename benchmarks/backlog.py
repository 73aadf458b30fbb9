"""``backlog_rss``: the service's peak memory while it consumes a large backlog.

A backlog of small tasks is produced first (one fast idempotent producer: 20 ms linger, large
batches, lz4). The service then runs as ``agent-service run`` in a child process of its own with
a zero-latency fake model, and ``/proc/PID/status`` is sampled: ``VmHWM`` is the kernel's record
of the peak resident set. The run ends when the backlog is done or after a fixed time, whichever
comes first; memory grows while the consumer prefetches and holds records, long before the
backlog is through. The baseline is the same service idle on an empty topic.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.env import REPO, Env, LiveCount, progress, task_records
from benchmarks.report import Figure
from service.core.settings import Settings
from service.devtools import processes

BENCH = "backlog_rss"
PARTITIONS = 6


def status_mb(pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    name, value = line.split(":", 1)
                    out[name] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return out


def spawn(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    from benchmarks.env import child_env

    env = child_env(settings)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "service.cli", "run"], env=env, cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 45) -> None:
    """SIGTERM, SIGKILL after ``timeout_s``; reaped either way."""
    processes.stop(proc, grace_s=timeout_s, group=True)


def run(env: Env, quick: bool) -> list[Figure]:
    m = 100_000 if quick else 1_000_000
    window_s = 25.0 if quick else 120.0
    fake = env.fake_model(0.0)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # the service idle, for the baseline
        idle_names = env.names("idle")
        idle_settings = env.settings(idle_names, fake.base_url, partitions=PARTITIONS)
        progress("backlog_rss: the service idle on an empty topic")
        proc = spawn(idle_settings, env.dir / "backlog-idle.log")
        procs.append(proc)
        time.sleep(8)
        idle = status_mb(proc.pid)
        stop(proc)
        if proc.returncode not in (0, -signal.SIGTERM):
            raise RuntimeError(f"the idle service exited with {proc.returncode} (see {env.dir / 'backlog-idle.log'})")

        names = env.names(BENCH)
        settings = env.settings(names, fake.base_url, partitions=PARTITIONS)
        from service.runtime.wiring import ensure_topics

        ensure_topics(settings)
        env.wait_for_topics([names.input_topic])
        progress(f"backlog_rss: producing a backlog of {m:,} tasks")
        env.produce(names.input_topic, task_records(names.run, m), what="tasks")

        progress(f"backlog_rss: the service in a child process, for up to {window_s:.0f}s")
        log = env.dir / "backlog-service.log"
        proc = spawn(settings, log)
        procs.append(proc)
        results = LiveCount(env, names.results_topic)
        started = time.monotonic()
        peak_rss = 0.0
        while time.monotonic() - started < window_s:
            if proc.poll() is not None:
                raise RuntimeError(f"the service exited with {proc.returncode} (see {log})")
            peak_rss = max(peak_rss, status_mb(proc.pid).get("VmRSS", 0.0))
            if results.n >= m:
                break
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        final = status_mb(proc.pid)
        done = results.n
        stop(proc)
        results.close()
        hwm = max(final.get("VmHWM", 0.0), peak_rss)
        progress(f"  peak RSS {hwm:.0f} MB, {done:,}/{m:,} done in {elapsed:.0f}s")
        scope = "the whole backlog" if done >= m else f"{done:,} of {m:,} tasks ({100 * done / m:.1f}%)"
        return [Figure(
            BENCH, f"peak RSS, {m:,}-task backlog", hwm, "MB",
            baseline=f"idle {idle.get('VmHWM', 0.0):.0f} MB", target=("<=", 300.0),
            detail=(f"VmHWM of the service process; {scope} processed in {elapsed:.0f}s "
                    f"({done / elapsed:,.0f}/s); RSS at the end {final.get('VmRSS', 0.0):.0f} MB; "
                    f"idle RSS {idle.get('VmRSS', 0.0):.0f} MB"),
        )]
    finally:
        for proc in procs:
            stop(proc, 10)
        env.release(fake)
