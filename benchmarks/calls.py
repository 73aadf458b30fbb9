"""``python -m benchmarks.calls``: function calls per task, the naive consumer beside the service (a part figure).

CPU per task moves by 10 % and more from run to run on a shared machine; how many functions a
consumer calls per task moves much less, and says where its CPU goes by what runs, not by when a
sampler looked. Each consumer of the ``naive`` benchmark (:mod:`benchmarks.naive`: the naive
consumer, and ``agent-service run`` on uvloop) runs under cProfile (``python -m cProfile -o FILE -m
...``) twice, over ``--tasks`` and twice as many tasks produced before it starts; the difference of
the two runs' counts, over ``--tasks``, is the count per task without the start and the stop.

Counts are summed by where each function lives: a package (``aiohttp``, ``redis``), a standard
library module (``stdlib asyncio``), a package of this repository (``service/pipeline``, ``dedup``),
or, for a function written in C, its module (``C: builtins`` for ``isinstance``, ``len`` and the
methods of ``dict`` or ``str``; ``C: uvloop``, ``C: orjson``, ``C: _asyncio``). prometheus_client's
are split into the metrics' updates and the benchmark's reads of ``/metrics`` (every
:data:`benchmarks.child.AFTER_FIRST_S` after the first record, so more of them in the longer run:
a cost per second, like the service's timers, not per task).

cProfile sees the thread it started in, the main one: the naive consumer does all its work there;
the service's consumer thread (librdkafka's calls: fetch, commit, rebalance) and its producer's poll
thread are left out, a few per cent of its CPU. Under cProfile each call is several times slower,
which makes a consumer's batches a little larger than at full speed: the figures are calls per
task at that pace.

    python -m benchmarks.calls --broker kafka                 # 2,000 and 4,000 tasks
"""

from __future__ import annotations

import argparse
import functools
import pstats
import re
import sysconfig
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from benchmarks.env import REPO, Env, progress
from benchmarks.naive import naive_pass, service_pass

C_PREFIX = "C: "  # a function written in C, by its module: "C: builtins" (len, dict.get), "C: uvloop"
_STDLIB = Path(sysconfig.get_paths()["stdlib"])
_C_OWNER = re.compile(r"^<(?:built-in method (?P<module>[\w.]+?)\.\w+>|(?:built-in )?method .*? of '?(?P<owner>[\w.]+)'? "
                      r"(?:objects|object at .*)>)$")
# prometheus_client's reading side (the benchmark's reads of /metrics, every AFTER_FIRST_S: a cost per
# second, not per task, that the longer run has more of); every other function there is an update's
_METRIC_READ_FILES = frozenset({"exposition.py", "registry.py", "metrics_core.py", "samples.py", "validation.py"})
_METRIC_READS = frozenset({"collect", "describe", "_samples", "_multi_samples", "_child_samples", "get",
                           "_get_metric"})


def where(path: str, name: str = "") -> str:
    """Where the function ``name`` of cProfile's stats lives (see the module docstring)."""
    if path == "~":
        return C_PREFIX + _c_module(name)
    if path.startswith("<frozen "):
        return "stdlib " + path.removeprefix("<frozen ").removesuffix(">").split(".", 1)[0]
    if "/site-packages/" in path:
        place, _, rest = path.split("/site-packages/", 1)[1].partition("/")
        place = place.removesuffix(".py")
        if place == "prometheus_client":
            read = rest.rsplit("/", 1)[-1] in _METRIC_READ_FILES or rest.startswith("openmetrics/") or name in _METRIC_READS
            return f"{place} ({'reads of /metrics' if read else 'updates'})"
        return place
    file = Path(path)
    if file.is_relative_to(REPO):
        parts = file.relative_to(REPO).parts
        return "/".join(parts[:2]) if parts[0] == "service" and len(parts) > 2 else parts[0].removesuffix(".py")
    if file.is_relative_to(_STDLIB):
        return "stdlib " + file.relative_to(_STDLIB).parts[0].removesuffix(".py")
    return "other"


def _c_module(name: str) -> str:
    """The module of a C function as cProfile names it: ``<built-in method orjson.dumps>`` is orjson's,
    ``<method 'call_soon' of 'uvloop.loop.Loop' objects>`` uvloop's, ``<method 'get' of 'dict' objects>``
    and ``<built-in method __new__ of type object at 0x...>`` the builtins'."""
    m = _C_OWNER.match(name)
    if m is None:
        return "builtins"
    if m["module"]:
        return str(m["module"]).split(".", 1)[0]
    owner = str(m["owner"])
    return owner.split(".", 1)[0] if "." in owner else "builtins"  # a builtin type: dict, str, type


def by_place(stats: Mapping[tuple[str, int, str], tuple[int, int, float, float, object]]) -> Counter[str]:
    """Calls (each call, recursive ones too) summed by :func:`where` the function lives."""
    calls: Counter[str] = Counter()
    for (path, _line, name), (_primitive, total, *_rest) in stats.items():
        calls[where(path, name)] += total
    return calls


def per_task(small: Counter[str], large: Counter[str], extra_tasks: int) -> dict[str, float]:
    """Calls per task by place: the larger run's less the smaller one's, over the tasks it had more."""
    return {place: (large[place] - small[place]) / extra_tasks for place in large.keys() | small.keys()}


def table(naive: Mapping[str, float], service: Mapping[str, float], least: float = 1.0) -> str:
    """The places, most calls in the service first, with one row for the places under ``least`` calls
    per task (either way) in both, then the totals of all calls and of the calls of Python functions,
    with the service's over the naive consumer's. Places at 0.0 in both are left out."""
    places = sorted((p for p in naive.keys() | service.keys() if _r(naive.get(p, 0.0)) or _r(service.get(p, 0.0))),
                    key=lambda p: (-service.get(p, 0.0), p))
    shown = [p for p in places if max(abs(naive.get(p, 0.0)), abs(service.get(p, 0.0))) >= least]
    rest = [p for p in places if p not in shown]
    rows = [(p, naive.get(p, 0.0), service.get(p, 0.0)) for p in shown]
    if rest:
        rows.append((f"{len(rest)} other places", sum(naive.get(p, 0.0) for p in rest),
                     sum(service.get(p, 0.0) for p in rest)))
    lines = [f"{'where':38s} {'naive':>9s} {'service':>9s} {'service - naive':>16s} {'service / naive':>16s}"]
    lines += [f"{p:38s} {_r(a):9.1f} {_r(b):9.1f} {_r(b - a):16.1f}" for p, a, b in rows]
    for label, keep in (("all calls", lambda p: True),
                        ("calls of Python functions", lambda p: not p.startswith(C_PREFIX))):
        a, b = _total(naive, keep), _total(service, keep)
        ratio = f"{b / a:15.2f}x" if a > 0 else f"{'-':>16s}"
        lines.append(f"{label:38s} {_r(a):9.1f} {_r(b):9.1f} {_r(b - a):16.1f} {ratio}")
    return "\n".join(lines)


def _r(value: float) -> float:
    """``value`` to the tenth shown, never -0.0."""
    return round(value, 1) + 0.0


def _total(calls: Mapping[str, float], keep: Callable[[str], bool]) -> float:
    return sum(n for p, n in calls.items() if keep(p))


def _profiled(env: Env, label: str, n: int, run: Callable[..., object]) -> Counter[str]:
    """The calls by place of ``run(python_args=...)``, a pass of ``n`` tasks under cProfile."""
    out = env.dir / f"calls-{label}-{n}.prof"
    out.unlink(missing_ok=True)
    run(python_args=["-m", "cProfile", "-o", str(out)])
    if not out.exists():
        raise RuntimeError(f"{label}: cProfile wrote no stats to {out} (the process did not end cleanly)")
    return by_place(pstats.Stats(str(out)).stats)  # type: ignore[attr-defined]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.calls", description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", choices=("kafka", "noida", "tansu"), default="kafka")
    parser.add_argument("--tasks", type=int, default=2_000, help="the smaller run; the larger has twice as many")
    args = parser.parse_args(argv)
    if args.tasks < 1:
        parser.error("--tasks must be at least 1")
    n = args.tasks
    counts: dict[str, dict[int, Counter[str]]] = {"naive": {}, "service": {}}
    with Env(args.broker) as env:
        fake = env.fake_model(0.0)
        try:
            for size in (n, 2 * n):
                progress(f"calls: the naive consumer and the service under cProfile, {size:,} tasks")
                counts["naive"][size] = _profiled(env, "naive", size, functools.partial(
                    naive_pass, env, fake, size))
                counts["service"][size] = _profiled(env, "service", size, functools.partial(
                    service_pass, env, fake, size, "uvloop"))
        finally:
            env.release(fake)
    naive, service = (per_task(c[n], c[2 * n], n) for c in counts.values())
    print(f"Function calls per task under cProfile, by where the function lives ({2 * n:,} tasks' calls less "
          f"{n:,} tasks', over {n:,}; classify tasks, zero-latency fake model, {args.broker} broker; "
          "the service on uvloop)\n")
    print(table(naive, service))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
