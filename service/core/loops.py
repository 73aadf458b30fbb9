"""The event loop the service runs on (``AGENT_EVENT_LOOP``): uvloop's (libuv) when it is installed,
else asyncio's own (``auto``, the default); or either by name.

uvloop schedules callbacks and timers and reads sockets in compiled code, where asyncio's loop runs
Python: a share of the per-task cost when the model answers at once (about a tenth of the service's
CPU per task on the naive benchmark's workload). ``python -m benchmarks --only naive`` measures the
service's CPU per task on both. uvloop is a dependency of the package; ``auto`` falls back to asyncio's
loop where it cannot be imported (a platform it has no wheel for, an install without it).
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")
EventLoop = Literal["auto", "asyncio", "uvloop"]


def resolve(loop: EventLoop) -> Literal["asyncio", "uvloop"]:
    """The loop ``loop`` names: ``auto`` is uvloop when it can be imported, else asyncio."""
    if loop != "auto":
        return loop
    return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"


def run_loop(main: Coroutine[Any, Any, T], loop: EventLoop) -> T:
    """Run ``main`` to its end on a new event loop of the kind named, as :func:`asyncio.run` does."""
    if resolve(loop) == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def loop_kind() -> str:
    """``uvloop`` or ``asyncio``: the kind of the running event loop (for the log line of the start)."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
