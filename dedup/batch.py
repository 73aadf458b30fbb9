"""Pipelining of ledger scripts: the calls many tasks make in one event-loop turn share a round trip.

Under load hundreds of tasks claim, count attempts and complete at about the same moment. Each
call on its own costs a pooled connection, a socket write and a read; here the calls issued during
one turn of the event loop go to Redis as one non-transactional pipeline of ``EVALSHA`` commands
(each script stays atomic on its own; no call waits for another's result). A lone call costs one
extra loop turn.

On one Redis server (or a Sentinel's master) the calls of one script in a turn go further, as one
``EVALSHA`` of a wrapper around it (:func:`grouped_source`): each call runs the script's own body with
its own ``KEYS`` and ``ARGV`` (checked and fenced as on its own) and gets its own answer; an error of
one call is that call's answer, except READONLY (the server follows another master now), which fails
the whole command so that a Sentinel-managed connection drops itself and finds the new master. Redis packs, sends, parses and answers one command instead of many. A
Redis Cluster keeps one command per call: one script may not touch keys of several hash slots there.

The grouped command declares every call's keys, in order, as its ``KEYS``, and carries the calls'
arguments as one argument: a MessagePack array of each call's count of keys and its arguments, which
the wrapper reads with the ``cmsgpack`` library Redis gives every script. They are packed in C on
both sides instead of redis-py encoding every argument of every call in Python (a dozen a call). Each
argument reaches the script as the string redis-py would have sent, by the client's own encoder (an
integer or a float as its ``repr``, a ``str`` in the client's encoding, bytes as they are; msgpack's
raw type for both, since Redis's ``cmsgpack`` reads no ``bin``). A call of a group whose arguments
cannot be encoded fails alone, with the error redis-py gives it (a ``DataError`` for a type it does
not send; a connection failure for a string it cannot encode, as for any failure inside the client
library); the others of its group go on.

A script Redis does not know (after a restart or ``SCRIPT FLUSH``) is loaded and the call sent
again on its own. An error of one call fails only that call; a lost connection fails the batch.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import (
    ClusterDownError,
    ConnectionError,
    NoScriptError,
    ResponseError,
    TimeoutError,
    TryAgainError,
)

from dedup.client import RedisClient, as_redis_error

log = logging.getLogger(__name__)

MAX_BATCH = 256
# a grouped script's one argument stays well under Redis's largest bulk string (proto-max-bulk-len,
# 512 MB by default): a larger group is cut in two, a larger call goes alone
GROUP_BYTES = 8 * 1024 * 1024
REFRESH_INTERVAL_S = 0.5

# KEYS every call's keys in order; ARGV[1] a MessagePack array of the calls, each an array: its count
# of keys, then its arguments -> each call's answer (an error as an error). READONLY is the server's
# answer, not a call's (it follows another master now): it fails the whole command at the top, where
# a Sentinel-managed connection drops itself and asks for the new master, as for an ungrouped call
_GROUPED = """
local function one(KEYS, ARGV)
%s
end
local calls = cmsgpack.unpack(ARGV[1])
local out = {}
local k = 1
for i = 1, #calls do
  local call = calls[i]
  local keys, args = {}, {}
  for j = 1, call[1] do keys[j] = KEYS[k]; k = k + 1 end
  for j = 2, #call do args[j - 1] = call[j] end
  local ok, r = pcall(one, keys, args)
  if not ok then
    if type(r) ~= 'table' then r = {err = tostring(r)} end
    if type(r.err) == 'string' and string.sub(r.err, 1, 9) == 'READONLY ' then return r end
  elseif r == nil then
    r = false
  end
  out[i] = r
end
return out
"""


def grouped_source(source: str) -> str:
    """The script that runs ``source`` once per call it carries (see the module docstring)."""
    return _GROUPED % source


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
        self._grouped: dict[str, AsyncScript] | None = None if isinstance(client, RedisCluster) else {}
        self._packer: Packer | None = None  # made at the first group, from the client's encoder
        self._queue: list[_Call] = []
        self._scheduled = False
        self._flushes: set[asyncio.Task[None]] = set()
        self._refreshed_at = float("-inf")
        self.batches = 0  # pipelines (or lone commands) sent, for tests and benchmarks
        self.calls = 0  # scripts run for callers, each call of a grouped script counted
        self.commands = 0  # EVALSHA commands sent, a grouped script's counted once

    async def run(self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        loop = asyncio.get_running_loop()
        call = _Call(script, keys, args, loop.create_future())
        self.calls += 1
        self._queue.append(call)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await call.future

    def _flush(self) -> None:
        self._scheduled = False
        queue, self._queue = self._queue, []
        if self._grouped is not None and len(queue) > 1:
            try:
                queue = self._group(queue)
            except Exception as exc:  # noqa: BLE001 - no grouped script made: every call goes on its own
                log.warning("ledger scripts not grouped: %r", exc)
                queue = [call for call in queue if not call.future.done()]  # but those failed already
        for start in range(0, len(queue), self._max_batch):
            task = asyncio.get_running_loop().create_task(self._send(queue[start:start + self._max_batch]))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    def _group(self, queue: list[_Call]) -> list[_Call]:
        """The calls of one script, at most ``max_batch`` and :data:`GROUP_BYTES` at once, as one call
        of its grouped script whose answer (every call's answer) is handed to each call."""
        by_script: dict[str, list[_Call]] = {}
        for call in queue:
            by_script.setdefault(call.script.sha, []).append(call)
        out: list[_Call] = []
        packer = self._packer = self._packer or Packer(self._client.get_encoder())
        for calls in by_script.values():
            if len(calls) == 1:
                out += calls
                continue
            chunk: list[tuple[_Call, bytes]] = []
            size = 0
            for call in calls:
                try:
                    packed = packer.call(len(call.keys), call.args)
                except Exception as exc:  # noqa: BLE001 - this call alone, as redis-py would have failed it
                    _settle(call.future, exc=as_redis_error(exc))
                    continue
                if chunk and (len(chunk) == self._max_batch or size + len(packed) > GROUP_BYTES):
                    out.append(self._together(chunk, packer))
                    chunk, size = [], 0
                chunk.append((call, packed))
                size += len(packed)
            if chunk:
                out.append(self._together(chunk, packer))
        return out

    def _together(self, chunk: list[tuple[_Call, bytes]], packer: Packer) -> _Call:
        """The calls of ``chunk`` (each with its :meth:`Packer.call`) as one call of their script's
        grouped script; a chunk of one goes as itself."""
        calls = [call for call, _ in chunk]
        if len(calls) == 1:
            return calls[0]
        script = calls[0].script
        grouped = self._grouped.get(script.sha) if self._grouped is not None else None
        if grouped is None:
            source = script.script
            grouped = AsyncScript(self._client, grouped_source(source if isinstance(source, str) else bytes(source).decode()))
            if self._grouped is not None:
                self._grouped[script.sha] = grouped
        keys = [key for call in calls for key in call.keys]
        argument = packer.group([packed for _, packed in chunk])
        together = _Call(grouped, keys, (argument,), asyncio.get_running_loop().create_future())
        together.future.add_done_callback(lambda done: _hand_out(done, calls))
        return together

    async def _send(self, calls: list[_Call]) -> None:
        self.batches += 1
        self.commands += len(calls)
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
        try:
            await self._refresh_on(*results)
            for call, result in zip(calls, results, strict=False):
                await self._answer(call, result)
        finally:  # cancelled while it reloaded a script, or answered short: no caller is left waiting
            for call in calls:
                _settle(call.future, exc=ConnectionError("the ledger's batch ended without this call's answer"))

    async def _answer(self, call: _Call, result: Any) -> None:
        if isinstance(result, NoScriptError):
            try:
                result = await call.script(keys=list(call.keys), args=list(call.args))  # loads it
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                _settle(call.future, exc=as_redis_error(exc))
                await self._refresh_on(exc)
                return
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


class Packer:
    """The arguments of grouped calls as the client's encoder would send them (the module docstring)."""

    def __init__(self, encoder: Any) -> None:
        self._encode: Callable[[Any], bytes] = encoder.encode
        utf8 = codecs.lookup(encoder.encoding).name == "utf-8" and encoder.encoding_errors == "strict"
        # the types msgpack writes as the encoder would; any other goes through the encoder first
        self._plain: tuple[type, ...] = (str, bytes) if utf8 else (bytes,)
        self._array = msgpack.Packer(use_bin_type=False)

    def call(self, keys: int, args: Sequence[Any]) -> bytes:
        """One call of a grouped script: its count of keys, then its arguments."""
        plain = self._plain
        packed: bytes = self._array.pack([keys, *[a if type(a) in plain else self._encode(a) for a in args]])
        return packed

    def group(self, packed: list[bytes]) -> bytes:
        """The one argument of a grouped script: the array of its calls, each from :meth:`call`."""
        header: bytes = self._array.pack_array_header(len(packed))
        return header + b"".join(packed)


async def _evalsha(client: RedisClient, call: _Call) -> Any:
    return await client.execute_command(*call.command())


def _hand_out(done: asyncio.Future[Any], calls: list[_Call]) -> None:
    """A grouped call's answer to the calls it carried: each its own, or the failure to them all."""
    if done.cancelled():
        for call in calls:
            call.future.cancel()
        return
    exc = done.exception()
    if exc is None and not (isinstance(answers := done.result(), list) and len(answers) == len(calls)):
        exc = ResponseError(f"a grouped script answered {answers!r} for {len(calls)} calls")
    if exc is not None:
        for call in calls:
            _settle(call.future, exc=exc)
        return
    for call, answer in zip(calls, answers, strict=True):
        if isinstance(answer, Exception):
            _settle(call.future, exc=answer)
        else:
            _settle(call.future, result=answer)


def _settle(future: asyncio.Future[Any], *, result: Any = None, exc: BaseException | None = None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
