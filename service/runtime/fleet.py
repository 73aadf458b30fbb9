"""``agent-service run --workers N``: N share-nothing consumer processes in one group, supervised.

Each worker is ``agent-service run`` in a process of its own: its own consumer in the group, its
own event loop, producers, Redis pool and model client, nothing shared but the servers; the group
spreads the partitions over them and the ledger makes a rebalance safe, exactly as between
replicas. The parent (the supervisor):

- serves the admin HTTP app on the one port, so it stays reachable while a worker restarts:
  ``/metrics`` adds up every worker (prometheus-client's multiprocess mode, in a fresh temporary
  ``PROMETHEUS_MULTIPROC_DIR`` per run, removed at the end), ``/readyz`` is ready when every worker
  runs with partitions assigned, none has stalled (``agent_stalled_seconds`` under
  ``AGENT_LIVENESS__STALL_S``) and Redis and the broker answer, and the task and dead-letter API
  answers from the parent's own clients; the port answers (unready) from the start, while the
  supervisor waits for Redis, the broker and the model before it starts any worker;
- stops (SIGTERM) a worker stalled for ``AGENT_LIVENESS__RESTART_S``, and, like any worker that
  exits, restarts it after a backoff that doubles while it keeps dying young (from
  :data:`BACKOFF_MIN_S` to :data:`BACKOFF_MAX_S`) so a crash loop does not spin; the dead worker's
  live gauges are dropped (``mark_process_dead``), its counters stay in the sums;
- on SIGTERM or SIGINT drains them all: SIGTERM to each worker, which stops taking records, finishes
  what it holds and commits (bounded by ``AGENT_DRAIN_TIMEOUT_S``), then leaves the group; a worker
  still running :data:`DRAIN_GRACE_S` after that is killed. A second signal kills them at once.

Workers run in sessions of their own (a terminal's Ctrl-C reaches the parent only, which forwards
one SIGTERM, never two) and ask the kernel for a SIGTERM when the parent dies, so an orphan drains
instead of running unsupervised.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from service.core.settings import Settings

log = logging.getLogger(__name__)

SUPERVISOR_ENV = "AGENT_SERVICE_SUPERVISOR_PID"  # set in a worker's environment: its supervisor's pid
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_S = 30.0  # a worker that ran this long before it died is restarted after the shortest backoff
DRAIN_GRACE_S = 15.0  # beyond the drain timeout: the final commit, leaving the group, closing
CHECK_S = 0.2
_PR_SET_PDEATHSIG = 1


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff_s: float = BACKOFF_MIN_S
    restart_at: float | None = None  # when a dead worker is started again
    restarts: int = 0
    stall_stopped: bool = False  # sent SIGTERM for a stall past AGENT_LIVENESS__RESTART_S

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def bind_to_supervisor() -> None:
    """In a worker: have the kernel send SIGTERM (a drain) when the supervisor dies; exit at once if
    it is already gone. No-op outside a fleet, and where ``prctl`` is not available."""
    expected = os.environ.get(SUPERVISOR_ENV)
    if not expected:
        return
    for bound in (False, True):  # before asking (nothing to ask for), and after (it may have died between)
        if os.getppid() != int(expected):
            raise SystemExit("agent-service: the supervisor of this worker is gone")
        if not bound:
            with contextlib.suppress(Exception):  # Linux only: elsewhere an orphan runs until signalled
                ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def worker_gauge(directory: str, pid: int, name: str, mode: str = "livesum") -> float | None:
    """Gauge ``name`` (multiprocess ``mode``) of worker ``pid``, read from its files; None before it wrote it."""
    for path in glob.glob(os.path.join(directory, f"gauge_{mode}_{pid}.db")):
        with contextlib.suppress(OSError, ValueError):
            for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(path):  # type: ignore[no-untyped-call]
                if json.loads(key)[1] == name:
                    return float(value)
    return None


def worker_partitions(directory: str, pid: int) -> float | None:
    """The partitions worker ``pid`` has assigned, read from its live gauges; None before it wrote any."""
    return worker_gauge(directory, pid, "agent_assigned_partitions")


def worker_stalled_s(directory: str, pid: int) -> float:
    """How long worker ``pid`` has finished no record with work pending (``agent_stalled_seconds``)."""
    return worker_gauge(directory, pid, "agent_stalled_seconds", "livemax") or 0.0


class Supervisor:
    """Starts, watches, restarts and drains the workers; see the module docstring."""

    def __init__(self, settings: Settings, workers: int, *, argv: list[str] | None = None) -> None:
        self.settings = settings
        self.workers = [Worker(i) for i in range(workers)]
        self.argv = argv or [sys.executable, "-m", "service.cli", "run"]
        self.directory = tempfile.mkdtemp(prefix="agent-metrics-")
        self.stopping = False
        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path=self.directory)  # type: ignore[no-untyped-call]
        self.restarts = Counter("agent_worker_restarts", "Workers restarted by the supervisor after they exited.",
                                registry=self.registry)
        self.live = Gauge("agent_workers", "Worker processes running.", registry=self.registry)
        self._base_txn_id = settings.kafka.transactional_id or (
            f"{settings.kafka.group_id}-{socket.gethostname()}-{os.getpid()}")

    # ------------------------------------------------------------------ one worker

    def _env(self, worker: Worker) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "PROMETHEUS_MULTIPROC_DIR": self.directory,
            SUPERVISOR_ENV: str(os.getpid()),
            "AGENT_HTTP__ENABLED": "false",  # the supervisor serves the one port
            # stable per worker slot: a restarted worker fences its predecessor's open transaction
            "AGENT_KAFKA__TRANSACTIONAL_ID": f"{self._base_txn_id}-w{worker.index}",
        })
        if self.settings.worker_id:
            env["AGENT_WORKER_ID"] = f"{self.settings.worker_id}-w{worker.index}"
        return env

    def _start(self, worker: Worker) -> None:
        worker.proc = subprocess.Popen(self.argv, env=self._env(worker), stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        worker.started = time.monotonic()
        worker.restart_at = None
        worker.stall_stopped = False
        log.info("worker %d started (pid %d)", worker.index, worker.proc.pid)

    def _reap(self, worker: Worker, now: float) -> None:
        """A worker that exited: forget its live gauges, and (unless draining) schedule its restart."""
        proc = worker.proc
        assert proc is not None
        mark_process_dead(proc.pid, self.directory)  # type: ignore[no-untyped-call]
        worker.proc = None
        if self.stopping:
            log.info("worker %d (pid %d) exited with %s", worker.index, proc.pid, proc.returncode)
            return
        ran_s = now - worker.started
        worker.backoff_s = BACKOFF_MIN_S if ran_s >= STABLE_S else min(worker.backoff_s * 2, BACKOFF_MAX_S)
        worker.restart_at = now + worker.backoff_s
        log.error("worker %d (pid %d) exited with %s after %.1fs; restarting it in %.1fs",
                  worker.index, proc.pid, proc.returncode, ran_s, worker.backoff_s)

    def check(self) -> None:
        """Reap the workers that exited and restart those whose backoff is over; stop (to restart it)
        a worker that has finished nothing with work pending for ``AGENT_LIVENESS__RESTART_S``, as the
        platform does with a replica whose ``/healthz`` fails."""
        now = time.monotonic()
        restart_s = self.settings.liveness.restart_s
        for worker in self.workers:
            if worker.proc is not None and worker.proc.poll() is not None:
                self._reap(worker, now)
            elif (restart_s and worker.proc is not None and not worker.stall_stopped and not self.stopping
                  and worker_stalled_s(self.directory, worker.proc.pid) >= restart_s):
                log.error("worker %d (pid %d) has finished no record for %.0f s with work pending: restarting it",
                          worker.index, worker.proc.pid, worker_stalled_s(self.directory, worker.proc.pid))
                worker.stall_stopped = True
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(signal.SIGTERM)
            if not self.stopping and worker.proc is None and worker.restart_at is not None and now >= worker.restart_at:
                worker.restarts += 1
                self.restarts.inc()
                self._start(worker)
        self.live.set(sum(w.alive for w in self.workers))

    # ------------------------------------------------------------------ the fleet

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers if w.proc is not None and w.alive]

    def ready(self) -> bool:
        """Every worker runs and has partitions assigned."""
        if self.stopping or not all(w.alive for w in self.workers):
            return False
        return all((worker_partitions(self.directory, pid) or 0) > 0 for pid in self.pids)

    def progressing(self) -> bool:
        """No worker has gone ``AGENT_LIVENESS__STALL_S`` without finishing a record while work is pending."""
        return all(worker_stalled_s(self.directory, pid) < self.settings.liveness.stall_s for pid in self.pids)

    def start(self) -> None:
        for worker in self.workers:
            self._start(worker)
        self.live.set(len(self.workers))

    def signal_all(self, signum: int) -> None:
        for worker in self.workers:
            if worker.proc is not None and worker.alive:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(signum)

    async def drain(self) -> None:
        """SIGTERM to every worker, wait for each to finish its drain, kill what is left."""
        self.stopping = True
        log.warning("draining %d workers", len(self.pids))
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.drain_timeout_s + DRAIN_GRACE_S
        while self.pids and time.monotonic() < deadline:
            await asyncio.sleep(CHECK_S)
        if self.pids:
            log.error("workers %s still running after the drain timeout: killed", self.pids)
            self.kill()
        self.check()

    def kill(self) -> None:
        self.stopping = True
        self.signal_all(signal.SIGKILL)
        for worker in self.workers:
            if worker.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.proc.wait(5)
        self.check()

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def serve_fleet(settings: Settings, workers: int, *, llm_base_url: str) -> None:
    """``agent-service run --workers N`` on configured servers: start and supervise the workers, serve
    the admin HTTP app for all of them, drain on SIGTERM/SIGINT."""
    from service.api.app import create_app
    from service.runtime.wiring import Front, build, load_registry, wait_for_dependencies

    agents = load_registry(settings)  # a broken agent refuses the start before any worker is spawned
    supervisor = Supervisor(settings, workers)

    async def main() -> None:
        # the port answers (unready) while Redis, the broker and the model are waited for; the
        # topics are created then, unless AGENT_KAFKA__CREATE_TOPICS=false
        started = await wait_for_dependencies(settings, llm_base_url, lambda startup: Front(settings, startup))
        if started is None:
            return
        startup, front = started
        # the parent's own clients answer the admin API; its consumer is never started
        service = build(settings, llm_base_url=llm_base_url, agents=agents)
        try:
            await service.preflight_when_reachable(startup)  # a refusal ends the start here, once
        except BaseException:
            await service.aclose()
            await front.stop()
            raise
        stop = asyncio.Event()
        _install_signal_handlers(supervisor, stop)
        front.app = create_app(service, registry=supervisor.registry,
                               consumer_checks=lambda: {"workers": supervisor.ready(),
                                                        "consuming": not supervisor.stopping,
                                                        "progress": supervisor.progressing()})
        startup.started()
        http_task = front.task
        supervisor.start()
        log.info("serving with %d workers: input=%s group=%s http=%s:%d llm=%s metrics=%s", workers,
                 settings.kafka.input_topic, settings.kafka.group_id, settings.http.host, settings.http.port,
                 llm_base_url, supervisor.directory)
        try:
            await _supervise(supervisor, stop, http_task)
        finally:
            await supervisor.drain()
            await front.stop()
            await service.aclose()

    try:
        asyncio.run(main())
    finally:
        supervisor.kill()
        supervisor.close()


def _install_signal_handlers(supervisor: Supervisor, stop: asyncio.Event) -> None:
    """First SIGTERM/SIGINT sets ``stop`` (the fleet drains); a second one kills every worker at once."""
    seen = {"n": 0}

    def handle(signum: int) -> None:
        seen["n"] += 1
        if seen["n"] == 1:
            log.warning("signal %s: draining every worker (send it again to kill them now)",
                        signal.Signals(signum).name)
            stop.set()
        else:
            log.error("second signal: killing every worker")
            supervisor.kill()
            supervisor.close()
            os._exit(130)

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, handle, signum)


async def _supervise(supervisor: Supervisor, stop: asyncio.Event, http_task: asyncio.Task[None] | None) -> None:
    """Restart what dies and stop what stalls until ``stop`` is set, or the port could not be served."""
    while not stop.is_set():
        supervisor.check()
        if http_task is not None and http_task.done():
            http_task.result()  # the port could not be served: stop the fleet
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), CHECK_S)
