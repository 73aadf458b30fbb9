"""Pipelining of ledger scripts: the calls many tasks make in one event-loop turn share a round trip.

Under load hundreds of tasks claim, count attempts and complete at about the same moment. Each
call on its own costs a pooled connection, a socket write and a read; here the calls issued during
one turn of the event loop go to Redis as one non-transactional pipeline of ``EVALSHA`` commands
(each script stays atomic on its own; no call waits for another's result). A lone call costs one
extra loop turn.

A script Redis does not know (after a restart or ``SCRIPT FLUSH``) is loaded and the call sent
again on its own. An error of one call fails only that call; a lost connection fails the batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import (
    ClusterDownError,
    ConnectionError,
    NoScriptError,
    TimeoutError,
    TryAgainError,
)

from dedup.client import RedisClient, as_redis_error

log = logging.getLogger(__name__)

MAX_BATCH = 256
REFRESH_INTERVAL_S = 0.5


@dataclass(slots=True)
class _Call:
    script: AsyncScript
    keys: Sequence[str]
    args: Sequence[Any]
    future: asyncio.Future[Any]

    def command(self) -> tuple[Any, ...]:
        return ("EVALSHA", self.script.sha, len(self.keys), *self.keys, *self.args)


class ScriptBatcher:
    def __init__(self, client: RedisClient, max_batch: int = MAX_BATCH) -> None:
        self._client = client
        self._max_batch = max_batch
        self._queue: list[_Call] = []
        self._scheduled = False
        self._flushes: set[asyncio.Task[None]] = set()
        self._refreshed_at = float("-inf")
        self.batches = 0  # pipelines sent, for tests and benchmarks
        self.calls = 0

    async def run(self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        loop = asyncio.get_running_loop()
        call = _Call(script, keys, args, loop.create_future())
        self._queue.append(call)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await call.future

    def _flush(self) -> None:
        self._scheduled = False
        queue, self._queue = self._queue, []
        for start in range(0, len(queue), self._max_batch):
            task = asyncio.get_running_loop().create_task(self._send(queue[start:start + self._max_batch]))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _send(self, calls: list[_Call]) -> None:
        self.batches += 1
        self.calls += len(calls)
        try:
            if len(calls) == 1:
                results: list[Any] = [await _evalsha(self._client, calls[0])]
            else:
                async with self._client.pipeline(transaction=False) as pipe:
                    for call in calls:
                        pipe.execute_command(*call.command())
                    results = await pipe.execute(raise_on_error=False)
        except NoScriptError:
            results = [NoScriptError()]
        except BaseException as exc:  # noqa: BLE001 - every waiting caller gets the failure
            if not isinstance(exc, asyncio.CancelledError):
                exc = as_redis_error(exc)
            for call in calls:
                _settle(call.future, exc=exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            await self._refresh_on(exc)
            return
        await self._refresh_on(*results)
        for call, result in zip(calls, results, strict=False):
            if isinstance(result, NoScriptError):
                try:
                    result = await call.script(keys=list(call.keys), args=list(call.args))  # loads it
                except Exception as exc:  # noqa: BLE001 - handed to the caller
                    _settle(call.future, exc=as_redis_error(exc))
                    await self._refresh_on(exc)
                    continue
            if isinstance(result, Exception):
                _settle(call.future, exc=result)
            else:
                _settle(call.future, result=result)


    async def _refresh_on(self, *outcomes: Any) -> None:
        """A cluster client learns of a failover only by asking again: it does not when the pipeline
        hands errors back instead of raising them. A lost node or a cluster that is down makes it
        reload the slot map, at most every :data:`REFRESH_INTERVAL_S`."""
        if any(isinstance(o, ConnectionError | TimeoutError | ClusterDownError | TryAgainError) for o in outcomes):
            await self.refresh_slots()

    async def refresh_slots(self) -> None:
        """Reload a cluster's slot map (no-op on one server), at most every :data:`REFRESH_INTERVAL_S`."""
        client = self._client
        if not isinstance(client, RedisCluster):
            return
        now = asyncio.get_running_loop().time()
        if now - self._refreshed_at < REFRESH_INTERVAL_S:
            return
        self._refreshed_at = now
        try:
            await client.nodes_manager.initialize()
        except Exception as exc:  # noqa: BLE001 - no node answers yet: the next failure tries again
            log.debug("cluster slot map not reloaded: %s", exc)


async def _evalsha(client: RedisClient, call: _Call) -> Any:
    return await client.execute_command(*call.command())


def _settle(future: asyncio.Future[Any], *, result: Any = None, exc: BaseException | None = None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
