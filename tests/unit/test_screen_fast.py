"""The replay screen's fast path: a plain record's task key and fingerprint without building its
task, always what the full decode would find, and a batch screened in chunks on a real
redis-server, each record's flag the one the handler's claim would agree with."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.records import Record
from dedup.client import close, connect
from dedup.keys import Keys
from dedup.ledger import Ledger
from service.agents.tasks import decode_task, screen_key
from service.core.errors import PoisonError
from service.core.metrics import Metrics
from service.pipeline.screen import DuplicateShare, ReplayScreen

LIMIT = 262_144


def value(**body: object) -> bytes:
    return json.dumps(body).encode()


def full(raw: bytes | None, headers: list[tuple[str, bytes]], limit: int = LIMIT) -> tuple[str, str] | None:
    try:
        task = decode_task(raw, headers, limit)
    except PoisonError:
        return None
    return task.key, task.fingerprint


PLAIN = [
    value(task_id="t-1", kind="classify", input={"text": "x", "labels": ["a", "b"]}),
    value(kind="classify", input={"labels": ["a", "b"], "text": "x"}),  # no task_id: the auto key
    value(task_id="t-2", kind="summarize", input={"text": "é ✓ \u2028", "n": 3, "f": 0.5}, priority="interactive"),
    b'{"task_id":"t-3","kind":"classify","input":{"z":1,"a":[1,2,{"b":null}]},"deadline":null}',
    b'{"task_id": "t-5", "kind": "classify", "input": {"v": 12345678901234567890123, "w": 1e-7}}',
]

OTHER: list[tuple[bytes | None, list[tuple[str, bytes]]]] = [
    (value(task_id="t-4", kind="classify", input={"text": "x"}, tenant="acme"), []),
    (value(task_id="t-4", kind="classify", input={"text": "x"}), [("tenant", b"acme")]),
    (value(task_id="t-4", kind="classify", input={"text": "x"}), [("agent.session", b"s-1")]),
    (value(task_id="t-4", kind="classify", input={"text": "x"}, session="s-1"), []),
    (value(task_id="t-4", kind="classify", input={"text": "x"}), [("deadline", b"2099-01-01T00:00:00Z")]),
    (value(task_id="t-4", kind="classify", input={"text": "x"}, deadline="2099-01-01T00:00:00Z"), []),
    (value(task_id="t-4", kind="classify", input={"text": "x"}), [("deadline", b"not a date")]),
    (value(task_id="t-4", kind="classify", input={"text": "x"}), [("tenant", b"a b")]),
    (None, []),
    (b"{not json", []),
    (b"[1, 2]", []),
    (b'{"task_id": "t-5", "kind": "classify", "input": {"text": "\\ud800"}}', []),
    (b'{"task_id": "t-5", "kind": "classify", "input": {"v": NaN}}', []),
    (b'{"task_id": "t-5", "kind": "classify", "input": {"v": 1e400}}', []),
    (value(task_id="t 5", kind="classify", input={}), []),
    (value(task_id="t-5", kind="Classify", input={}), []),
    (value(task_id="t-5", kind="classify", input=[]), []),
    (value(task_id="t-5", kind="classify", input={}, extra=1), []),
    (value(task_id="t-5", kind="classify", input={}, priority="urgent"), []),
    (value(task_id="t-5", kind="classify", input={"text": "x" * 300}), []),  # over the limit below
]


@pytest.mark.parametrize("raw", PLAIN)
def test_a_plain_record_is_keyed_without_its_task_exactly_as_the_full_decode_keys_it(raw: bytes) -> None:
    found = screen_key(raw, [("traceparent", b"00-abc-def-01")], LIMIT)
    assert found is not None  # the fast path took it
    assert found == full(raw, [])


@pytest.mark.parametrize(("raw", "headers"), OTHER)
def test_anything_but_a_plain_record_is_left_to_the_full_decode(raw: bytes | None,
                                                                 headers: list[tuple[str, bytes]]) -> None:
    assert screen_key(raw, headers, 200) is None


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.dictionaries(st.sampled_from(["task_id", "kind", "input", "priority", "deadline", "tenant",
                                             "session", "other"]),
                            JSONISH | st.sampled_from(["t-1", "classify", "batch", "interactive", "acme"])
                            | st.dictionaries(st.text(max_size=4), JSONISH, max_size=3), max_size=6),
       headers=st.lists(st.tuples(st.sampled_from(["tenant", "agent.session", "deadline", "traceparent", "x"]),
                                  st.binary(max_size=8)), max_size=2))
def test_the_fast_path_never_keys_a_record_otherwise_than_the_full_decode(body: dict[str, Any],
                                                                         headers: list[tuple[str, bytes]]) -> None:
    raw = json.dumps(body).encode()
    found = screen_key(raw, headers, LIMIT)
    assert found is None or found == full(raw, headers)


def record(i: int, raw: bytes | None, moved: int = 0) -> Record:
    """The ``i``-th record of the topic ``tasks``, at an offset ``moved`` further on."""
    return Record("tasks", i % 3, i + moved, None, raw, [])


def test_a_batch_is_screened_in_chunks_and_each_flag_is_the_claims_answer(redis_url: str) -> None:
    """Finished with the same input and published: finished at once. Anything the handler must see
    stays with it: another input under a finished id (a conflict), a new task, a record that does
    not decode, a finished task never published, and (inside transactions) the record that
    published the outcome itself, read again because its transaction may not have committed."""

    def task(i: int, text: str = "") -> bytes:
        return value(task_id=f"r-{i}", kind="classify", input={"text": text or f"text {i}", "labels": ["a", "b"]})

    async def main() -> list[list[bool]]:
        client = connect(redis_url)
        ledger = Ledger(client, keys=Keys(f"s{uuid.uuid4().hex[:8]}"), ttl_s=600)
        try:
            for i in range(300):
                if i % 10 == 3:
                    continue  # never ran: new
                t = decode_task(task(i), [], LIMIT)
                claim = await ledger.claim(t.key, t.fingerprint, "w", "classify")
                await ledger.complete(t.key, claim.fence, result="{}", digest="d", event=b"{}", model="m",
                                      prompt_version="1")
                if i % 10 != 5:  # ran, never published
                    await ledger.mark_published(t.key, "succeeded", by=f"tasks[{i % 3}]@{i}", how="acked")
            def batch(moved: int) -> list[Record]:
                out = []
                for i in range(300):
                    raw = task(i, "another text") if i % 10 == 7 else b"{broken" if i % 10 == 9 else task(i)
                    out.append(record(i, raw, moved))
                return out

            flags = []
            for transactional, moved in ((False, 0), (True, 0), (True, 3000)):
                screen = ReplayScreen(ledger, Metrics(), DuplicateShare(), max_bytes=LIMIT,
                                      transactional=transactional, chunk=64)
                flags.append(list(await screen(batch(moved))))
            return flags
        finally:
            await close(client)

    plain, own, others = asyncio.run(main())
    assert plain == [i % 10 in (0, 1, 2, 4, 6, 8) for i in range(300)]
    assert own == [False] * 300  # each record is the one that published its own outcome
    assert others == plain  # records that did not publish them
