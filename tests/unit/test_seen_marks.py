"""The records' marks (``dedup.seen``) cache what decoding a record yields, for the ledger's
retention: the digest, the task key, the fingerprint and the task hash's key of fixed records are
pinned here. A change to any of them leaves marks written before it naming what decoding no longer
yields: raise ``dedup.seen.VERSION`` (so old marks are not read) and update the values below."""

from __future__ import annotations

import pytest

from dedup.keys import Keys
from dedup.seen import VERSION, record_digest
from service.agents.tasks import decode_task

PINNED = [
    # (value, headers, record digest, task key, fingerprint)
    (b'{"task_id":"pin-1","kind":"classify","input":{"text":"a parcel arrived broken","labels":["complaint","praise"]}}',
     [], "42d205f5d1a185187085959304034fbe", "pin-1",
     "sha256:ef5c2d975bff0b9d4b55722e88c3dee11a243bf9a246281de6eac1dc3fdad6ea"),
    (b'{"task_id":"pin-1","kind":"classify","input":{"text":"a parcel arrived broken","labels":["complaint","praise"]}}',
     [("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")],
     "e6cc7bfd88119abb82dbe777d86ef158", "pin-1",
     "sha256:ef5c2d975bff0b9d4b55722e88c3dee11a243bf9a246281de6eac1dc3fdad6ea"),
    (b'{"kind":"classify","input":{"labels":["complaint","praise"],"text":"a parcel arrived broken"}}',
     [], "577cbb077e87b7bcba47842fa6e90959", "auto-ef5c2d975bff0b9d4b55722e88c3dee11a243bf9",
     "sha256:ef5c2d975bff0b9d4b55722e88c3dee11a243bf9a246281de6eac1dc3fdad6ea"),
]


@pytest.mark.parametrize(("value", "headers", "digest", "key", "fp"), PINNED)
def test_what_a_mark_caches_is_pinned_for_its_version(value: bytes, headers: list[tuple[str, bytes]], digest: str,
                                                       key: str, fp: str) -> None:
    task = decode_task(value, headers, 100_000)
    found = (record_digest(value, headers), task.key, task.fingerprint, Keys("agent").task(task.key))
    assert found == (digest, key, fp, f"agent:{{{key}}}:task"), (
        f"marks of version {VERSION} cache another decoding: raise dedup.seen.VERSION and update PINNED")


def test_the_digest_tells_apart_every_part_of_a_record() -> None:
    base = record_digest(b"ab", [("k", b"v")])
    variants = [record_digest(b"a", [("bk", b"v")]), record_digest(b"ab", [("k", b"")]),
                record_digest(b"ab", [("kv", b"")]), record_digest(b"ab", []),
                record_digest(b"ab", [("k", b"v"), ("k", b"v")]), record_digest(b"ab", [("k", None)]),
                record_digest(b"abk", [("", b"v")]), record_digest(b"ab", [("\ud800", b"v")])]
    assert len({base, *variants}) == len(variants) + 1
    assert record_digest(b"ab", []) == record_digest(b"ab", None)  # no headers is no headers
