"""The service as a user runs it: ``agent-service run`` in a child process, watched from outside.

Progress comes from its own ``/metrics`` (scraped every ``interval_s`` until the first record and
every ``coarse_s`` after, see :data:`AFTER_FIRST_S`) until the expected number of outcomes is
reached. The time it took comes from that last scrape too, as exact as an in-process timer: the
service's own clock readings of its first fetched record (``agent_first_record_timestamp_seconds``,
the earliest over workers) and of its latest finished record
(``agent_last_finish_timestamp_seconds``), so the scrape interval neither adds to nor blurs it.
Memory comes from ``/proc/PID/status`` (``VmHWM``: the kernel's record of the peak resident set),
summed over the process and its children when it runs several workers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.env import REPO, child_env, progress
from service.core.settings import Settings
from service.devtools import processes

COUNTED = {
    "agent_messages_consumed_total": "consumed",
    'agent_tasks_total{outcome="succeeded"}': "succeeded",
    'agent_tasks_total{outcome="duplicate"}': "duplicate",
    'agent_tasks_total{outcome="dead_lettered"}': "dead_lettered",
}
# the scrapes once the first record is seen (``coarse_s``): a Prometheus scrapes every 15 s or more,
# and each scrape costs the service an exposition of every metric (2.5 ms of its CPU, 27 kB of text,
# after 2,000 tasks), which a consumer without metrics never pays; only the end is left to notice by then
AFTER_FIRST_S = 0.5
# the scrapes until the first record: the CPU meters of the benchmarks start at the one that sees it
BEFORE_FIRST_S = 0.02
# the service's clock readings (Unix time) of its first fetched record and its latest finished one:
# one series per worker for the first (the earliest counts), one for the latest
FIRST_AT = "agent_first_record_timestamp_seconds"
LAST_AT = "agent_last_finish_timestamp_seconds"


def scrape_interval(first_seen: bool, *, fine_s: float, coarse_s: float | None) -> float:
    """How long to wait before the next scrape: ``fine_s`` until the first record, ``coarse_s`` (when
    given) after it. Each scrape costs the service an exposition of every metric, and once the first
    record is seen only the end is left to notice: the service clocks it itself (``last_at``), so a
    late scrape ends the watch later without changing the time it reports."""
    return coarse_s if coarse_s is not None and first_seen else fine_s


def read_counts(text: str) -> dict[str, float]:
    """The counters of :data:`COUNTED` in an exposition, summed over its series, and ``first_at``
    and ``last_at`` (0 while the service has not said)."""
    found = dict.fromkeys(COUNTED.values(), 0.0)
    firsts: list[float] = []
    found["last_at"] = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        if name in COUNTED:
            found[COUNTED[name]] += float(value)
        elif name.partition("{")[0] == FIRST_AT and float(value) > 0:
            firsts.append(float(value))
        elif name == LAST_AT:
            found["last_at"] = float(value)
    found["first_at"] = min(firsts, default=0.0)
    return found


def status_kb(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    name, value = line.split(":", 1)
                    out[name] = int(value.split()[0])
    except OSError:
        pass
    return out


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and of its children that are still running."""
    from benchmarks.inproc import cpu_seconds as own

    return sum(own(p) for p in [pid, *children(pid)])


@dataclass
class Watch:
    started: float
    first: float | None = None
    done: float | None = None
    counts: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float = 0.0  # the largest VmHWM of one process (the parent or one worker)
    peak_total_rss_mb: float = 0.0  # the largest sum of VmRSS over the parent and its workers

    @property
    def processing_s(self) -> float:
        """From the first record fetched to the last outcome, by the service's own clock (see the
        module docstring); by the scrapes that first saw each for a service that does not say."""
        first_at, last_at = self.counts.get("first_at", 0.0), self.counts.get("last_at", 0.0)
        if 0 < first_at <= last_at:
            return last_at - first_at
        assert self.done is not None and self.first is not None
        return self.done - self.first


class ChildService:
    """``with ChildService(settings, log, "--workers", "2") as svc: watch = svc.wait(n)``.

    ``settings`` must enable the HTTP server on a port of its own (``/metrics`` is how it is watched);
    ``launcher`` goes before the command (``taskset -c 0``: it execs the service, whose pid stays ``pid``);
    ``python_args`` between the interpreter and ``-m service.cli`` (``-m cProfile -o FILE``).
    """

    def __init__(self, settings: Settings, log: Path, *args: str, launcher: Sequence[str] = (),
                 python_args: Sequence[str] = ()) -> None:
        assert settings.http.enabled and settings.http.port, "the child is watched through /metrics"
        self.settings = settings
        self.url = f"http://{settings.http.host}:{settings.http.port}/metrics"
        self.log = log
        self.args = args
        self.launcher = list(launcher)
        self.python_args = list(python_args)
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ChildService:
        env = child_env(self.settings)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([*self.launcher, sys.executable, *self.python_args, "-m", "service.cli", "run",
                                          *self.args], env=env, cwd=REPO,
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout_s: float = 60) -> None:
        """SIGTERM, SIGKILL (its process group) after ``timeout_s``; reaped either way."""
        if self.proc is not None:
            processes.stop(self.proc, grace_s=timeout_s, group=True)

    def counts(self) -> dict[str, float] | None:
        """The counters of :data:`COUNTED` from one scrape; None while /metrics does not answer."""
        try:
            with urllib.request.urlopen(self.url, timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        return read_counts(text)

    def wait(self, done: Callable[[dict[str, float]], bool], *, total: int, progress_key: str = "succeeded",
             interval_s: float = 0.1, stall_s: float = 90.0, timeout_s: float = 3600.0,
             sample: Callable[[], None] | None = None, on_first: Callable[[], None] | None = None,
             coarse_s: float | None = None) -> Watch:
        """Scrape until ``done(counts)``; raise when ``progress_key`` stops moving or the child exits.

        ``sample`` is called at every scrape, ``on_first`` once, when the first record was consumed.
        With ``coarse_s`` the scrapes after the first record are that far apart (:func:`scrape_interval`)."""
        assert self.proc is not None
        watch = Watch(started=time.monotonic())
        last_value, last_move = -1.0, time.monotonic()
        next_report = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited with {self.proc.returncode} (see {self.log})")
            c = self.counts()
            now = time.monotonic()
            self._sample_rss(watch)
            if sample is not None:
                sample()
            if c is not None:
                if watch.first is None and c["consumed"] > 0:
                    watch.first = now
                    if on_first is not None:
                        on_first()
                if done(c):
                    watch.done, watch.counts = now, c
                    return watch
                value = c[progress_key]
                if value != last_value:
                    last_value, last_move = value, now
                elif now - last_move > stall_s:
                    raise RuntimeError(f"no progress for {stall_s:.0f}s at {value:,.0f}/{total:,} ({c})")
                if now >= next_report:
                    rate = value / max(now - (watch.first or watch.started), 1e-9)
                    progress(f"  {value:,.0f}/{total:,} ({rate:,.0f}/s)")
                    next_report = now + 10
            if now - watch.started > timeout_s:
                raise RuntimeError(f"not done after {timeout_s:.0f}s ({c})")
            time.sleep(scrape_interval(watch.first is not None, fine_s=interval_s, coarse_s=coarse_s))

    def _sample_rss(self, watch: Watch) -> None:
        pids = [self.pid, *children(self.pid)]
        stats = [status_kb(p) for p in pids]
        watch.peak_rss_mb = max([watch.peak_rss_mb, *(s.get("VmHWM", 0) / 1024 for s in stats)])
        watch.peak_total_rss_mb = max(watch.peak_total_rss_mb, sum(s.get("VmRSS", 0) for s in stats) / 1024)
