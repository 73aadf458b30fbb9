"""Which task a record's bytes name: a mark per record, so that a replay need not decode it.

A replay's screen asks the ledger whether each fetched record's task is finished; to ask, it must
know the task's key and fingerprint, and finding them means parsing the record, canonicalising its
input and hashing it: most of a replayed record's cost. But a record's bytes name the same task
every time they are read. So the claim that first decodes a record keeps a mark, keyed by a digest
of its value and headers (:func:`record_digest`), whose value is the task's fingerprint and hash
key: ``agent:seen:1:<digest>`` = ``<fingerprint> <task hash key>``. Read back, one script per
fetched batch answers for each record from the mark and the task's hash, with no decoding at all.

The mark is only ever a cache of what decoding the record yields, never a state of its own: the
script still reads the task's hash for its state, fingerprint and publisher, exactly as
:meth:`~dedup.ledger.Ledger.finished` does. A revived, expired or deleted task, or a task claimed
by another input, therefore answers "not finished" whatever the mark says, and a record with no mark
(its bytes never claimed, or claimed before marks existed, or the mark expired: it lives as long as
the claim's retention) is answered "unknown", and the screen keys it the slow way. The ``1`` in the
key is the version of the decoding the marks record; a change to how a record is keyed raises it
(``tests/unit/test_seen_marks.py`` pins what a mark caches). A record read through a Schema
Registry is marked from the task the registry's schema decoded; the slow path cannot decode such a
record and leaves it to the handler, whose claim finds the same finished task.

A mark is a string of about 200 bytes (its key, the fingerprint and the task hash's key), one per
record claimed, for the claim's retention; the ledger's Redis evicts nothing (the service refuses
to start otherwise), so marks never push task hashes out.

A single Redis server (or a Sentinel's master) only: the mark's key carries no task's hash tag (the
reader knows only the digest), so on a Redis Cluster it could not sit in the task's slot, where the
claim's script writes. There no marks are written and the screen keys every record.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from hashlib import blake2b as _blake2b
from typing import Protocol, TypeVar

from redis.asyncio.cluster import RedisCluster

from dedup.client import RedisClient
from dedup.keys import Keys
from dedup.lua import AMONG_SET, PUBLICATION

T = TypeVar("T")

__all__ = ["FINISHED", "NOT_FINISHED", "UNKNOWN", "Seen", "record_digest"]

VERSION = 1
DIGEST_HEX = 32  # a record digest's length in hexadecimal characters (16 bytes)
FINISHED, NOT_FINISHED, UNKNOWN = 1, 0, -1

# ARGV[1] the marks' prefix, ARGV[2] the records' digests (DIGEST_HEX characters each, one after the
# other: one argument packs and sends in a fraction of the time of one per record), ARGV[3] the
# coordinates of the records, joined by spaces ('' for none: any publisher will do), ARGV[4] the
# done states (those 'publish' starts from)
# -> per record 1 finished (as FINISHED answers it), 0 not finished, -1 no mark.
# Read-only. It reads keys it is not handed (the marks, and the task hashes they name): allowed on
# one server, and the reason marks exist on one server only.
SEEN_FINISHED = AMONG_SET + PUBLICATION + f"local DIGEST_HEX = {DIGEST_HEX}\n" + """
local coords = {}
for c in string.gmatch(ARGV[3], '%S+') do coords[#coords + 1] = c end
local done = among_set(ARGV[4])
local size = tonumber(DIGEST_HEX)
local keys = {}
for at = 1, #ARGV[2], size do keys[#keys + 1] = ARGV[1] .. string.sub(ARGV[2], at, at + size - 1) end
local out = {}
if #keys == 0 then return out end
local marks = redis.call('MGET', unpack(keys))
for i = 1, #keys do
  local mark = marks[i]
  if not mark then
    out[i] = -1
  else
    local sp = string.find(mark, ' ', 1, true)
    local h = redis.call('HMGET', string.sub(mark, sp + 1), 'state', 'fingerprint', 'published_by', 'published')
    local by = published(h[3], nil, h[4])
    if h[1] and done[h[1]] and h[2] == string.sub(mark, 1, sp - 1) and by ~= '' and by ~= coords[i] then
      out[i] = 1
    else
      out[i] = 0
    end
  end
end
return out
"""


def record_digest(value: bytes, headers: Sequence[tuple[str, bytes | None]] | None) -> str:
    """A digest of a record's value and headers (names, values and their order), in hexadecimal
    (:data:`DIGEST_HEX` characters): the bytes decoding reads. A record without headers hashes its
    value alone, one with headers each part length-prefixed, the two under different personalisations,
    so that no two records share an input."""
    if not headers:
        return _blake2b(value, digest_size=16, person=b"value").hexdigest()
    h = _blake2b(len(value).to_bytes(8, "big"), digest_size=16, person=b"headers")
    h.update(value)
    for name, data in headers:
        encoded = name.encode("utf-8", "surrogatepass")
        h.update(len(encoded).to_bytes(4, "big"))
        h.update(encoded)
        if data is None:
            h.update(b"\xff\xff\xff\xff")
        else:
            h.update(len(data).to_bytes(4, "big"))
            h.update(data)
    return h.hexdigest()


class Ledger(Protocol):
    """What the marks use of :class:`dedup.ledger.Ledger`."""

    client: RedisClient
    keys: Keys
    done_states: str

    async def redis_call(self, op: Callable[[], Awaitable[T]]) -> T: ...


class Seen:
    """The marks of one ledger: their keys (None on a cluster: no marks there) and their reads."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self.prefix = f"{ledger.keys.prefix}:seen:{VERSION}:"
        self.enabled = not isinstance(ledger.client, RedisCluster)
        self._finished = ledger.client.register_script(SEEN_FINISHED)

    def key(self, value: bytes | None, headers: Sequence[tuple[str, bytes | None]] | None) -> str | None:
        """The mark's key of a record with these bytes; None for no value, or on a cluster."""
        if value is None or not self.enabled:
            return None
        return self.prefix + record_digest(value, headers)

    async def finished(self, digests: Sequence[str], coordinates: Sequence[str] | None = None) -> list[int]:
        """Per record digest (:func:`record_digest`): :data:`FINISHED` (its mark names a task done with
        its fingerprint and published by a record other than the one at its ``coordinates``; None:
        any record), :data:`NOT_FINISHED`, or :data:`UNKNOWN` (no mark). One script for all of them."""
        if not digests:
            return []
        args = [self.prefix, "".join(digests), " ".join(coordinates) if coordinates else "", self._ledger.done_states]
        return list(await self._ledger.redis_call(lambda: self._finished(keys=[], args=args)))
