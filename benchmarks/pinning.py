"""CPUs for the service apart from the CPUs of what it talks to, with ``taskset`` (util-linux).

The pinned ``workers`` series gives ``agent-service run --workers N`` N CPUs of this process's
affinity set (``os.sched_getaffinity``) and the fake model, the broker, redis-server and the
benchmark's own process the others. The others get a third of the set (rounded up, at least one):
with a zero-latency model they spend about half the service's CPU per task (the fake model
0.3-0.4 ms, redis-server about 0.12 ms, one KRaft broker about 0.1 ms, against about 1 ms in a
worker: docs/SCALING.md), so a third of the CPUs keeps up with the workers on the other two
thirds. They keep the same CPUs in every pass, so the passes differ only in the service's CPUs.
The service takes the lowest CPUs of the set, the others the highest.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Split:
    service: tuple[int, ...]
    others: tuple[int, ...]


def reserved(available: Iterable[int]) -> int:
    """How many CPUs of the set the fake model, the broker and redis-server get: a third, at least one."""
    return max(1, -(-len(set(available)) // 3))


def measurable_workers(available: Iterable[int]) -> int:
    """The most workers that get a CPU each with the others' CPUs kept apart (0: none)."""
    cpus = set(available)
    return max(0, len(cpus) - reserved(cpus))


def split_cpus(available: Iterable[int], workers: int) -> Split | None:
    """The service's CPUs (the lowest) and the others' (the highest); None when the set is too small."""
    cpus = sorted(set(available))
    keep = reserved(cpus)
    if workers < 1 or workers > len(cpus) - keep:
        return None
    return Split(service=tuple(cpus[:workers]), others=tuple(cpus[-keep:]))


def worker_counts(available: Iterable[int]) -> list[int]:
    """1 and 2 workers, and as many as the set can hold apart from the others if that is more."""
    return sorted({1, 2, measurable_workers(available)} - {0})


def cpu_list(cpus: Iterable[int]) -> str:
    """``taskset``'s list form: ``0``, ``0,2``, ``4-5``."""
    runs: list[list[int]] = []
    for cpu in sorted(set(cpus)):
        if runs and runs[-1][-1] == cpu - 1:
            runs[-1].append(cpu)
        else:
            runs.append([cpu])
    return ",".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)


def describe(cpus: Iterable[int]) -> str:
    cpus = set(cpus)
    return f"CPU{'s' if len(cpus) > 1 else ''} {cpu_list(cpus)}"


def require_taskset(path: str | None = None) -> str:
    """The ``taskset`` executable; a RuntimeError that names it when it is not on ``path`` (default PATH)."""
    found = shutil.which("taskset", path=path)
    if found is None:
        raise RuntimeError("taskset not found: the pinned workers series needs it (util-linux: "
                           "apt-get install util-linux)")
    return found


def launcher(cpus: Iterable[int]) -> list[str]:
    """The command prefix that starts a program on ``cpus`` (its children inherit them)."""
    return [require_taskset(), "-c", cpu_list(cpus)]


def pin(pid: int, cpus: Iterable[int]) -> None:
    """Move every thread of a running process to ``cpus`` (``taskset -a -p``); RuntimeError if it fails."""
    cpus = set(cpus)
    try:
        subprocess.run([require_taskset(), "-a", "-p", "-c", cpu_list(cpus), str(pid)], check=True,
                       capture_output=True, text=True, timeout=30)
        # with -a, taskset pins the threads it finds and says nothing when there are none (the process is gone)
        if os.sched_getaffinity(pid) != cpus:
            raise RuntimeError(f"taskset left process {pid} on CPUs {cpu_list(os.sched_getaffinity(pid))}")
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"taskset could not pin process {pid}: {exc.stderr.strip()}") from exc
    except ProcessLookupError as exc:
        raise RuntimeError(f"taskset could not pin process {pid}: it has exited") from exc


@contextlib.contextmanager
def pinned(pids: Iterable[int], cpus: Iterable[int]) -> Iterator[None]:
    """Pin the processes to ``cpus`` for the block, then give each back the CPUs it had before."""
    pids, cpus = list(pids), set(cpus)
    before = {pid: os.sched_getaffinity(pid) for pid in pids}
    try:
        for pid in pids:
            pin(pid, cpus)
        yield
    finally:
        for pid, had in before.items():
            with contextlib.suppress(RuntimeError):  # a process that is gone has nothing to restore
                pin(pid, had)
