"""``python -m benchmarks.burst_trace``: where the time of one cold burst goes, as a compact timeline.

One pass of ``cold_burst`` (:mod:`benchmarks.burst`) on Apache Kafka, with a fake model that writes a
line per chat call (when it arrived and was answered, its status, its Idempotency-Key), and the
service's ``/metrics`` and the window's hash in Redis read every 50 ms. Printed, from the first record
consumed by the service's own clock (``t0``, as the benchmark measures):

- per 250 ms: records consumed and in flight, outcomes, calls the model started and answered (200,
  429), the calls open at the model (mean over the bucket), the fleet's window, and the records
  waiting for a window slot, after a refused call, or in a back-off;
- the slot-seconds the model's 200 calls went unused, per phase (before the first call, the ramp
  to a full model, the steady part, the tail), in seconds of the burst they cost;
- the last calls answered, with the 429s their tasks met before.

    python -m benchmarks.burst_trace                # memory on (3600 s), 4,000 warm-up, 2,000 burst
    python -m benchmarks.burst_trace --memory-s 0   # the window starts at AGENT_LLM__WINDOW_INITIAL
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import burst
from benchmarks.child import ChildService, cpu_seconds, read_counts
from benchmarks.env import REPO, Env, FakeModel, task_records
from dedup.keys import Keys
from service.devtools import local, processes
from service.llm.tags import endpoint_tag

BUCKET_S = 0.25
SCRAPE_S = 0.05
_GAUGES = {
    "agent_messages_consumed_total": "consumed",
    "agent_inflight_tasks": "inflight",
    'agent_tasks_total{outcome="succeeded"}': "done",
    'agent_waiting_records{why="window"}': "w_window",
    'agent_waiting_records{why="refused"}': "w_refused",
    'agent_waiting_records{why="backoff"}': "w_backoff",
}


@dataclass(frozen=True, slots=True)
class Call:
    start: float
    end: float
    status: int
    key: str


@dataclass
class Sample:
    at: float
    values: dict[str, float]
    window: float


@dataclass
class Trace:
    calls: list[Call]
    samples: list[Sample] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds over the burst: the service's, the model's


class TracedModel(FakeModel):
    """The fake model in a child process that logs every chat call to ``log``."""

    def __init__(self, log_dir: Path, latency_s: float, log: Path) -> None:
        port = local.free_port()
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self._root = f"http://127.0.0.1:{port}"
        self._log = open(log_dir / f"fakellm-{port}.log", "ab")  # noqa: SIM115 - closed in stop()
        self.calls_log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.burst_trace", "serve", "--port", str(port),
             "--latency-s", str(latency_s), "--log", str(log)],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            local.wait_for_port(port, 30, self.proc)
        except BaseException:
            processes.kill(self.proc)
            self._log.close()
            raise

    def calls(self, since: float) -> list[Call]:
        out = []
        for line in self.calls_log.read_text().splitlines():
            start, end, status, key = line.split(" ", 3)
            if float(start) >= since:
                out.append(Call(float(start), float(end), int(status), key))
        return sorted(out, key=lambda c: c.start)


def serve(port: int, latency_s: float, log: Path) -> int:
    """The fake model, each chat call written to ``log`` once answered (wall-clock seconds)."""
    from service.devtools.fakellm.http import header
    from service.devtools.fakellm.server import FakeLLM
    from service.devtools.fakellm.serving import serve_until_stopped

    out = open(log, "a", buffering=1)  # noqa: SIM115 - open while the server runs

    class Traced(FakeLLM):
        async def _chat(self, scope, receive, send):  # type: ignore[no-untyped-def]
            start, status = time.time(), [0]

            async def seen(message):  # type: ignore[no-untyped-def]
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            try:
                await super()._chat(scope, receive, seen)
            finally:
                out.write(f"{start:.4f} {time.time():.4f} {status[0]} {header(scope, b'idempotency-key')}\n")

    try:
        return serve_until_stopped(Traced("127.0.0.1", port, latency_s=latency_s), "fakellm")
    finally:
        out.close()


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    found = dict.fromkeys(_GAUGES.values(), 0.0)
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in _GAUGES:
            found[_GAUGES[name]] += float(value)
    clocked = read_counts(text)  # the service's own clock of its first record and its last outcome
    found["first_at"], found["last_at"] = clocked["first_at"], clocked["last_at"]
    return found


def run_pass(env: Env, memory_s: float, warm: int, n: int, scrape_s: float = SCRAPE_S) -> Trace:
    fake = TracedModel(env.dir, burst.LATENCY_S, env.dir / f"calls-{time.time():.0f}.log")
    try:
        fake.configure(max_concurrency=burst.ALLOWED)
        names, _ = burst.warm_up(env, fake, memory_s, warm, "burst_trace")
        redis = burst._redis(env)
        keys, tag = Keys(names.prefix), endpoint_tag(fake.base_url)
        since = time.time()
        env.produce(names.input_topic, task_records(f"{names.run}-burst", n), what="tasks")
        again = burst._settings(env, names, fake, memory_s)
        trace = Trace([])
        with ChildService(again, env.dir / f"trace-{names.run}.log") as svc:
            pids = {"service": svc.pid, "model": fake.proc.pid}
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                try:
                    values = scrape(svc.url)
                except OSError:
                    time.sleep(scrape_s)
                    continue
                cwnd = redis.hget(keys.endpoint(tag, "window"), "cwnd")
                trace.samples.append(Sample(time.time(), values, float(cwnd or 0)))
                if values["done"] >= n:
                    trace.cpu_s = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
                    break
                time.sleep(scrape_s)
        redis.close()
        trace.calls = fake.calls(since)
        return trace
    finally:
        env.release(fake)


def open_at(calls: list[Call], t: float) -> int:
    return sum(1 for c in calls if c.status == 200 and c.start <= t < c.end)


def report(trace: Trace, allowed: int) -> None:
    end = trace.samples[-1].values
    t0, t_done = end["first_at"], end["last_at"]  # the service's clock, as the benchmark measures
    calls = trace.calls
    ok = [c for c in calls if c.status == 200]
    print(f"t0 = the service's first record; its last outcome at +{t_done - t0:.3f}s "
          f"(ideal {len(ok) / (allowed / burst.LATENCY_S):.2f}s for {len(ok)} answers)")
    print(f"first call at the model +{calls[0].start - t0:.3f}s; last answer +{ok[-1].end - t0:.3f}s; "
          f"answer time at the model mean {sum(c.end - c.start for c in ok) / len(ok):.3f}s, "
          f"max {max(c.end - c.start for c in ok):.3f}s; 429s {sum(c.status == 429 for c in calls)}; CPU over the "
          f"burst: " + ", ".join(f"{name} {s:.2f}s" for name, s in trace.cpu_s.items()))
    print("   t(s) consumed inflight   done start  ok 429  open window  w:window refused backoff")
    t = t0
    while t < t_done:
        sampled = [s for s in trace.samples if s.at < t + BUCKET_S]  # the latest sample by the bucket's end
        started = [c for c in calls if t <= c.start < t + BUCKET_S]
        ended = [c for c in ok if t <= c.end < t + BUCKET_S]
        mean_open = sum(open_at(calls, t + i * BUCKET_S / 10) for i in range(10)) / 10
        if not sampled:  # scraped less often than a bucket: the model's columns only
            print(f"  {t - t0:5.2f} {'-':>8} {'-':>8} {'-':>6} {len(started):5d} {len(ended):3d} "
                  f"{sum(c.status == 429 for c in started):3d} {mean_open:5.0f}")
            t += BUCKET_S
            continue
        last = sampled[-1]
        v = last.values
        print(f"  {t - t0:5.2f} {v['consumed']:8.0f} {v['inflight']:8.0f} {v['done']:6.0f} {len(started):5d} "
              f"{len(ended):3d} {sum(c.status == 429 for c in started):3d} {mean_open:5.0f} {last.window:6.0f} "
              f"{v['w_window']:9.0f} {v['w_refused']:7.0f} {v['w_backoff']:7.0f}")
        t += BUCKET_S
    losses(trace, t0, t_done, allowed)
    tail(trace, t0)


def losses(trace: Trace, t0: float, t_done: float, allowed: int) -> None:
    """Unused model slot-seconds / allowed = seconds of the burst lost, by phase."""
    calls = trace.calls
    step = 0.005
    points = [t0 + i * step for i in range(int((t_done - t0) / step) + 1)]
    opens = [open_at(calls, p) for p in points]
    full = [i for i, o in enumerate(opens) if o >= allowed - 5]
    first_call = calls[0].start
    first_full = points[full[0]] if full else t_done
    last_full = points[full[-1]] if full else t_done
    phases = {"before the first call": (t0, first_call), "to a full model": (first_call, first_full),
              "steady": (first_full, last_full), "tail": (last_full, t_done)}
    print("lost (unused slots / allowed), by phase:")
    for name, (a, b) in phases.items():
        lost = sum((allowed - o) * step for p, o in zip(points, opens, strict=True) if a <= p < b) / allowed
        print(f"  {name:22s} {b - a:5.2f}s long, {lost:5.2f}s lost")


def tail(trace: Trace, t0: float) -> None:
    refused: dict[str, list[float]] = {}
    for c in trace.calls:
        if c.status == 429:
            refused.setdefault(c.key.rsplit(":", 1)[0], []).append(c.start - t0)
    ok = sorted((c for c in trace.calls if c.status == 200), key=lambda c: c.end)
    print("last answers (start, end, the 429s their task met):")
    for c in ok[-8:]:
        met = refused.get(c.key.rsplit(":", 1)[0], [])
        print(f"  {c.key[-34:]:34s} +{c.start - t0:.3f} -> +{c.end - t0:.3f}  429 at {[round(x, 3) for x in met]}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.burst_trace", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    fake = sub.add_parser("serve")
    fake.add_argument("--port", type=int, required=True)
    fake.add_argument("--latency-s", type=float, required=True)
    fake.add_argument("--log", type=Path, required=True)
    parser.add_argument("--memory-s", type=float, default=3600.0)
    parser.add_argument("--warm", type=int, default=4_000)
    parser.add_argument("--tasks", type=int, default=2_000)
    parser.add_argument("--scrape-s", type=float, default=SCRAPE_S,
                        help="between reads of /metrics and the window (each costs the service an exposition)")
    parser.add_argument("--dir", type=Path, default=None, help="keep the logs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args.port, args.latency_s, args.log)
    with Env("kafka", args.dir) as env:
        trace = run_pass(env, args.memory_s, args.warm, args.tasks, args.scrape_s)
    report(trace, burst.ALLOWED)
    return 0


if __name__ == "__main__":
    sys.exit(main())
