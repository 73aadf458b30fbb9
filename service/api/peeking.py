"""One dead-letter peek at a time per process, for the API and the console alike.

The slot is taken before the peek's thread starts and given back only when that thread is done (or
never ran), so a client that hangs up cannot leave peeks running behind it.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from service.core.settings import KafkaSettings
from service.pipeline import dlq

DLQ_PEEK_TIMEOUT_S = 10.0  # the whole of one peek, every partition included

_peek_slot = threading.Lock()
_peek_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dlq-peek")


class PeekBusy(Exception):
    """Another peek is running in this process."""


async def peek(kafka: KafkaSettings, limit: int, partition: int | None = None,
               offset_from: int | None = None) -> list[dlq.DeadLetter]:
    """:func:`service.pipeline.dlq.peek` in its own thread, with its own throwaway consumer."""
    if not _peek_slot.acquire(blocking=False):
        raise PeekBusy
    try:
        future: Future[list[dlq.DeadLetter]] = _peek_pool.submit(
            dlq.peek, kafka, limit, partition, offset_from=offset_from, timeout_s=DLQ_PEEK_TIMEOUT_S
        )
    except BaseException:
        _peek_slot.release()
        raise
    future.add_done_callback(lambda _: _peek_slot.release())
    return await asyncio.wrap_future(future)
