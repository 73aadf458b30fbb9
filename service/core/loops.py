"""The event loop the service runs on (``AGENT_EVENT_LOOP``): asyncio's own, or uvloop's (libuv).

uvloop schedules callbacks and timers and reads sockets in compiled code, where asyncio's loop runs
Python: a share of the per-task cost when the model answers at once. ``python -m benchmarks --only
naive`` measures the service's CPU per task on both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")
EventLoop = Literal["asyncio", "uvloop"]


def run_loop(main: Coroutine[Any, Any, T], loop: EventLoop) -> T:
    """Run ``main`` to its end on a new event loop of the kind named, as :func:`asyncio.run` does."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def loop_kind() -> str:
    """``uvloop`` or ``asyncio``: the kind of the running event loop (for the log line of the start)."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
