"""``python -m benchmarks.profile``: where the service's CPU goes on the e2e workload, by py-spy.

The e2e workload (small ``classify`` tasks produced first, zero-latency fake model, 6 partitions), run
by the service as a user runs it: ``agent-service run`` in a child process, sampled by ``py-spy
record`` (the thread holding the GIL, native frames off) from its start until every task succeeded.
py-spy reads the process without pausing it (``--nonblocking``): in one pair of runs with the process
paused for each sample, lines that make a system call took several times their share of the samples
(on CPython 3.11 every ``asyncio.get_running_loop()`` calls ``getpid()``): ``ScriptBatcher.run``, most
of whose own samples fell on its first line (``loop = asyncio.get_running_loop()``), had 4.5 % of the
samples as its own paused and 1.5 % not. The samples
are summed by function: self time (the function on top of the stack) and total time (anywhere on
it), printed as two top lists. ``--replay`` profiles a second pass over the same topic with a new
group instead: every task is then a duplicate.

    python -m benchmarks.profile --broker kafka --tasks 20000 --out docs/perf/profile-after.txt
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.child import AFTER_FIRST_S, BEFORE_FIRST_S, ChildService
from benchmarks.env import Env, progress, task_records
from service.devtools import local, processes

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^)]*?)(?::(?P<line>\d+))?\)$")


def summarize(raw: Path, top: int) -> str:
    """Top functions by self and total samples from py-spy's ``raw`` (collapsed stacks) output."""
    self_n: collections.Counter[str] = collections.Counter()
    total_n: collections.Counter[str] = collections.Counter()
    samples = 0
    idle = 0
    for line in raw.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_s)
        frames = []
        for frame in stack.split(";"):
            m = _FRAME.match(frame)
            func = f"{m['func']} ({_short(m['file'])})" if m else frame
            frames.append(func)
        samples += count
        if frames and any(w in frames[-1] for w in ("select (", "poll (", "epoll", "_run_once (", "wait (")):
            idle += count
        self_n[frames[-1]] += count
        for func in set(frames):
            total_n[func] += count
    lines = [f"samples {samples:,} (idle-looking leaf frames: {idle:,})", "",
             f"top {top} by self time (share of all samples)"]
    lines += [f"  {100 * n / samples:5.1f}%  {func}" for func, n in self_n.most_common(top)]
    lines += ["", f"top {top} by total time (share of all samples)"]
    lines += [f"  {100 * n / samples:5.1f}%  {func}" for func, n in total_n.most_common(top)]
    return "\n".join(lines) + "\n"


def thread_cpu(pid: int) -> str:
    """CPU seconds of each thread of a process so far (from /proc), largest first."""
    tick = os.sysconf("SC_CLK_TCK")
    rows: collections.defaultdict[str, float] = collections.defaultdict(float)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat.rpartition(")")[2].split()
        rows[re.sub(r"\d+$", "N", name)] += (int(fields[11]) + int(fields[12])) / tick
    total = sum(rows.values())
    lines = [f"CPU by thread (seconds, the process's whole life): total {total:.1f}"]
    lines += [f"  {secs:7.1f}  {name}" for name, secs in sorted(rows.items(), key=lambda kv: -kv[1])[:12]]
    return "\n".join(lines) + "\n"


def _short(path: str) -> str:
    for marker in ("site-packages/", "/perf2/", "/main/", "lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _cpu_only(env: Env, settings: Any, fake: Any, n: int, key: str) -> int:
    from benchmarks.child import cpu_seconds

    with ChildService(settings, env.dir / "service.log") as svc:
        start: list[float] = []
        watch = svc.wait(lambda c: c[key] + c["dead_lettered"] >= n, total=n, progress_key=key,
                         interval_s=BEFORE_FIRST_S, coarse_s=AFTER_FIRST_S,
                         on_first=lambda: start.extend([cpu_seconds(svc.pid), cpu_seconds(fake.proc.pid)]))
        used = cpu_seconds(svc.pid) - start[0], cpu_seconds(fake.proc.pid) - start[1]
    print(f"{n:,} tasks in {watch.processing_s:.2f}s from the first record ({n / watch.processing_s:,.0f}/s); "
          f"CPU ms per task: service {1000 * used[0] / n:.3f}, fake model {1000 * used[1] / n:.3f}; "
          f"load average {'/'.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", choices=("kafka", "noida", "tansu"), default="kafka")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--event-loop", choices=("asyncio", "uvloop"), default="asyncio", help="AGENT_EVENT_LOOP")
    parser.add_argument("--partitions", type=int, default=6, help="of the input topic (the naive benchmark's: 4)")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--replay", action="store_true", help="profile a replay of the processed topic")
    parser.add_argument("--out", type=Path, default=None, help="write the summary here too")
    parser.add_argument("--cpu-only", action="store_true",
                        help="no py-spy: only the service's CPU per task, from the first record to the last")
    parser.add_argument("--raw", type=Path, default=None, help="keep py-spy's collapsed stacks here")
    args = parser.parse_args()
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        print("py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 1
    n = args.tasks
    with Env(args.broker) as env:
        fake = env.fake_model(0.0)
        names = env.names("profile")
        settings = env.settings(names, fake.base_url, partitions=args.partitions,
                                http={"enabled": True, "host": "127.0.0.1", "port": local.free_port()},
                                event_loop=args.event_loop)
        from service.runtime.wiring import ensure_topics

        ensure_topics(settings)
        env.wait_for_topics([names.input_topic])
        env.produce(names.input_topic, task_records(names.run, n), what="tasks")
        if args.replay:
            with ChildService(settings, env.dir / "first.log") as svc:
                svc.wait(lambda c: c["succeeded"] + c["dead_lettered"] >= n, total=n, interval_s=0.05)
            fake.reset()
            settings = settings.model_copy(update={
                "kafka": settings.kafka.model_copy(update={"group_id": f"{names.group}-replay"}),
                "http": settings.http.model_copy(update={"port": local.free_port()}),
            })
        raw = env.dir / "profile.raw"
        key = "duplicate" if args.replay else "succeeded"
        if args.cpu_only:
            return _cpu_only(env, settings, fake, n, key)
        with ChildService(settings, env.dir / "service.log") as svc:
            spy = subprocess.Popen([pyspy, "record", "--pid", str(svc.pid), "--rate", str(args.rate),
                                    "--format", "raw", "--output", str(raw), "--gil", "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                t0 = time.monotonic()
                watch = svc.wait(lambda c: c[key] + c["dead_lettered"] >= n, total=n, progress_key=key,
                                 interval_s=BEFORE_FIRST_S, coarse_s=AFTER_FIRST_S)
                threads = thread_cpu(svc.pid)
                spy.send_signal(2)  # SIGINT: py-spy writes what it sampled and exits
                spy.wait(60)
            finally:
                processes.kill(spy)  # reaped on every path (nothing to do after a clean exit)
        stats = fake.stats()
        progress(f"{n:,} tasks in {watch.processing_s:.2f}s from the first record "
                 f"({n / watch.processing_s:,.0f}/s), {time.monotonic() - t0:.1f}s sampled, "
                 f"{stats['requests']:,} model calls")
        header = (f"py-spy record --rate {args.rate} --gil --nonblocking (the thread holding the GIL) on `agent-service run` ({args.broker} broker, "
                  f"{'replay of ' if args.replay else ''}{n:,} classify tasks, zero-latency fake model, "
                  f"{args.partitions} partitions, {args.event_loop} event loop); {n / watch.processing_s:,.0f} tasks/s from the first record; "
                  f"load average {'/'.join(f'{x:.1f}' for x in os.getloadavg())} (shared machine)\n\n")
        if args.raw is not None:
            shutil.copyfile(raw, args.raw)
        text = header + threads + "\n" + summarize(raw, args.top)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
