"""The records' marks (``dedup.seen``): a replayed record is answered from the mark its claim kept,
without decoding it, and every answer is the one the slow path (decode, then the ledger's
``finished``) gives: on one redis-server with marks, on a Redis Cluster without them."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from consumers.records import Record
from dedup.client import close, connect
from dedup.keys import Keys
from dedup.ledger import Ledger
from service.agents.tasks import decode_task
from service.core.errors import PoisonError
from service.core.metrics import Metrics
from service.pipeline.screen import DuplicateShare, ReplayScreen

LIMIT = 4096
N = 300


def body(i: int, text: str = "") -> bytes:
    return json.dumps({"task_id": f"r-{i}", "kind": "classify",
                       "input": {"text": text or f"text {i}", "labels": ["a", "b"]}}).encode()


def topic(moved: int = 0, *, another: bool = False) -> list[Record]:
    """The replayed topic: plain records, records with headers the event reads, with headers it does
    not, another input under a finished id (i % 10 == 7), records that do not decode (9) and a tombstone."""
    out = []
    for i in range(N):
        headers: list[tuple[str, bytes]] = []
        if i % 4 == 1:
            headers = [("tenant", b"acme")]
        elif i % 4 == 2:
            headers = [("traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01"), ("x-empty", b"")]
        raw: bytes | None = body(i, "another text" if another else "")
        if i % 10 == 7:
            raw = body(i, "another text")
        elif i % 10 == 9:
            raw = b"{broken" if i % 20 == 9 else None
        out.append(Record("tasks", i % 3, i + moved, None, raw, headers))
    return out


async def first_pass(ledger: Ledger) -> None:
    """Each task claimed once from its record, as the handler claims it (with the record's mark):
    most completed and published, some never published (i % 10 == 5), some never run (3), and a
    few ended dead, published (i % 10 == 8)."""
    for record in topic():
        i = record.offset
        if i % 10 == 3:
            continue
        raw = body(i) if i % 10 == 7 else record.value  # the first input of an id later sent with another
        try:
            task = decode_task(raw, record.headers, LIMIT)
        except PoisonError:
            continue
        claim = await ledger.claim(task.key, task.fingerprint, "w", "classify",
                                   seen=ledger.seen.key(raw, record.headers))
        if i % 10 == 8:
            await ledger.fail(task.key, claim.fence, "no", dead_reason="permanent")
            await ledger.mark_published(task.key, "dead", by=record.coordinates, how="acked")
            continue
        await ledger.complete(task.key, claim.fence, result="{}", digest="d", event=b"{}", model="m",
                              prompt_version="1")
        if i % 10 != 5:
            await ledger.mark_published(task.key, "succeeded", by=record.coordinates, how="acked")
        if raw != record.value:  # the record with another input came after: a conflict, its own mark kept
            other = decode_task(record.value, record.headers, LIMIT)
            conflict = await ledger.claim(other.key, other.fingerprint, "w", "classify",
                                          seen=ledger.seen.key(record.value, record.headers))
            assert conflict.decision == "conflict"


def expected() -> list[bool]:
    return [i % 10 in (0, 1, 2, 4, 6, 8) for i in range(N)]


class Counting:
    """The ledger's slow-path reads, counted by record."""

    def __init__(self, ledger: Ledger) -> None:
        self.asked = 0
        inner = ledger.finished

        async def finished(tasks: Any) -> list[bool]:
            self.asked += len(tasks)
            return await inner(tasks)

        ledger.finished = finished  # type: ignore[method-assign]


def run(url: str, check: Any) -> Any:
    async def main() -> Any:
        client = connect(url)
        ledger = Ledger(client, keys=Keys(f"m{uuid.uuid4().hex[:8]}"), ttl_s=600)
        try:
            return await check(ledger)
        finally:
            await close(client)

    return asyncio.run(main())


def screen(ledger: Ledger, transactional: bool = False) -> ReplayScreen:
    return ReplayScreen(ledger, Metrics(), DuplicateShare(), max_bytes=LIMIT, transactional=transactional, chunk=64)


def test_a_replay_is_answered_from_the_marks_with_the_slow_paths_answers(any_redis_url: str) -> None:
    """Marked records need no decoding and no slow read; their answers are the slow path's. Inside
    transactions the record that published its outcome itself is still not finished."""

    async def check(ledger: Ledger) -> tuple[bool, list[list[bool]], list[int]]:
        await first_pass(ledger)
        counting = Counting(ledger)
        flags, asked = [], []
        for transactional, moved in ((False, 0), (True, 0), (True, 3000)):
            counting.asked = 0
            flags.append(list(await screen(ledger, transactional)(topic(moved))))
            asked.append(counting.asked)
        return ledger.seen.enabled, flags, asked

    enabled, (plain, own, others), asked = run(any_redis_url, check)
    assert plain == expected()
    assert own == [False] * N  # each record published its own outcome
    assert others == plain
    if enabled:  # one server: only the never-claimed records (3) are asked about the slow way
        assert asked == [N // 10] * 3
    else:  # a cluster: no marks, every record that decodes is keyed the slow way
        assert asked == [N - N // 10] * 3


def test_a_mark_never_outlives_what_its_task_became(redis_url: str) -> None:
    """The mark only names the task: a revived task, a task gone from the ledger, or one whose record
    now carries other headers (another mark, none kept) is answered as the slow path answers it."""

    async def check(ledger: Ledger) -> tuple[list[bool], list[bool], list[bool]]:
        await first_pass(ledger)
        dead = [i for i in range(N) if i % 10 == 8]
        for i in dead:
            assert await ledger.revive(f"r-{i}")
        gone = [i for i in range(N) if i % 10 == 0]
        await ledger.client.delete(*(ledger.keys.task(f"r-{i}") for i in gone))
        after = list(await screen(ledger)(topic()))
        moved_headers = topic()
        for record in moved_headers:
            record.headers = [*record.headers, ("x-replayed", b"1")]
        counting = Counting(ledger)
        other = list(await screen(ledger)(moved_headers))
        assert counting.asked == N - N // 10  # none of these bytes was claimed: all that decode keyed again
        return after, other, [i not in dead and i not in gone and e for i, e in enumerate(expected())]

    after, other, want = run(redis_url, check)
    assert after == want
    assert other == want

