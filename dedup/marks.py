"""The published marks of many tasks in one ledger script.

Under load every task that was just published marks it in the same few turns of the event loop:
one ``EVALSHA`` each, packed, sent and answered apiece. On one Redis server (or a Sentinel's
master) the marks asked for in one turn go as one :data:`MARK_MANY` script over all their task
keys instead, which marks each task exactly as :data:`~dedup.scripts.MARK` would (its own state
checked, its own record and how). A Redis Cluster keeps one script per task: one script may not
touch keys of several hash slots there.

Each caller still gets its own answer; a failure of the script (Redis unreachable) fails every
mark it carried, each then retried by its record as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.commands.core import AsyncScript

from dedup.lua import AMONG

# KEYS the tasks; ARGV[1] the states whose outcome is published, then for each task in KEYS' order
# its state, by and how (as MARK's ARGV[1..3]) -> for each task 1 marked, 0 not in that state
MARK_MANY = AMONG + """
local marked = {}
for i, key in ipairs(KEYS) do
  local j = 2 + (i - 1) * 3
  local state = redis.call('HGET', key, 'state')
  if state ~= ARGV[j] or not among(ARGV[1], state) then
    marked[i] = 0
  else
    redis.call('HSET', key, 'published_by', ARGV[j + 1], 'published', ARGV[j + 1])
    if ARGV[j + 2] == '' then
      redis.call('HDEL', key, 'published_how')
    else
      redis.call('HSET', key, 'published_how', ARGV[j + 2])
    end
    marked[i] = 1
  end
end
return marked
"""

Run = Callable[[AsyncScript, list[str], list[Any]], Awaitable[Any]]


class Marks:
    """The marks asked for in one turn of the event loop, sent together (see the module docstring).

    ``run`` runs a ledger script (errors translated as the ledger's); ``one`` is MARK, ``many``
    MARK_MANY; ``grouped`` False sends every mark on its own (a cluster)."""

    def __init__(self, run: Run, one: AsyncScript, many: AsyncScript, done: str, *, grouped: bool) -> None:
        self._run, self._one, self._many, self._done = run, one, many, done
        self._grouped = grouped
        self._pending: list[tuple[str, Sequence[str], asyncio.Future[bool]]] = []
        self._sends: set[asyncio.Task[None]] = set()

    async def mark(self, key: str, state: str, by: str, how: str) -> bool:
        """Mark the task at ``key`` published ``by`` a record, ``how``; False when it is not in ``state``."""
        if not self._grouped:
            return int(await self._run(self._one, [key], [state, by, how, self._done])) == 1
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((key, (state, by, how), future))
        return await future

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send(pending))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _send(self, pending: list[tuple[str, Sequence[str], asyncio.Future[bool]]]) -> None:
        try:
            if len(pending) == 1:
                key, args, _ = pending[0]
                marked = [await self._run(self._one, [key], [*args, self._done])]
            else:
                marked = await self._run(self._many, [key for key, _, _ in pending],
                                         [self._done, *(a for _, args, _ in pending for a in args)])
        except BaseException as exc:  # noqa: BLE001 - every mark carried gets the failure
            for _, _, future in pending:
                if not future.done():
                    if isinstance(exc, asyncio.CancelledError):
                        future.cancel()
                    else:
                        future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, _, future), one in zip(pending, marked, strict=True):
            if not future.done():
                future.set_result(int(one) == 1)
