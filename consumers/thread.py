"""The consumer's thread: every call on the confluent-kafka consumer runs on one thread.

confluent-kafka's consumer is not safe to call from two threads at once, and a blocking call
(``consume``, a commit) must not stall the event loop. So every call goes through one
single-thread executor, and calls never overlap. Rebalance callbacks and transaction rounds run
on that thread (inside a call) and hop to the event loop with :meth:`ConsumerThread.on_loop` to
read or change the runner's state, which lives on the loop only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from confluent_kafka import Consumer

T = TypeVar("T")


class ConsumerThread:
    """Owns the executor, the event loop the runner's state lives on, and the consumer once made.

    ``loop`` is set when the runner starts (:meth:`bind`); ``consumer`` once it is created on this
    thread. Before that, :meth:`call` and :meth:`on_loop` must not be used.
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka-consumer")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.consumer: Consumer | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the runner runs on: where callbacks on this thread hop to."""
        self.loop = loop

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` on the consumer thread and wait for it from the loop."""
        assert self.loop is not None
        return await self.loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        """From the consumer thread: run ``coro`` on the loop and wait for its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def shutdown(self, wait: bool) -> None:
        self._executor.shutdown(wait=wait)
