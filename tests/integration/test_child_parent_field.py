"""A child task's ledger hash names its parent, on a real Redis (one server and a cluster): the first
claim of a task whose record names its parent keeps ``parent``, ``parent_step`` and ``parent_n``
(a later claim changes nothing, a cancelled child keeps them too), and the task's tree reads its parent
from there even when the parent lives in another deployment's ledger."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import pytest

from consumers.records import Record
from dedup.client import close, connect
from dedup.keys import Keys
from dedup.ledger import Ledger
from service.pipeline.claim import parent_of
from service.pipeline.tree import task_tree

pytestmark = pytest.mark.integration


def with_ledger(redis_url: str, body: Callable[[Ledger], Awaitable[None]]) -> None:
    async def main() -> None:
        client = connect(redis_url)
        try:
            await body(Ledger(client, keys=Keys(f"pf{uuid.uuid4().hex[:8]}"), ttl_s=600, lease_ms=50))
        finally:
            await close(client)

    asyncio.run(main())


def test_the_first_claim_keeps_the_parent_and_a_later_one_changes_nothing(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        child = "elsewhere-1/gather/2"
        first = await ledger.claim(child, "sha256:c", "w1", "research", parent=("elsewhere-1", "gather", 2))
        assert first.decision == "claimed"
        await asyncio.sleep(0.2)  # the lease runs out: the next claim takes it over
        again = await ledger.claim(child, "sha256:c", "w2", "research", parent=("other", "x", 0))
        assert again.decision == "claimed" and again.fence == first.fence + 1
        stored = await ledger.get(child)
        assert stored is not None
        assert (stored.fields["parent"], stored.fields["parent_step"], stored.fields["parent_n"]) == (
            "elsewhere-1", "gather", "2")
        # the parent lives in another ledger: the tree names it from the child's own hash
        tree = await task_tree(ledger, child, stored.fields)
        assert tree["parent"] == {"id": "elsewhere-1", "step": "gather", "n": 2}

    with_ledger(any_redis_url, body)


def test_a_root_keeps_no_parent_and_a_cancelled_child_keeps_its_own(any_redis_url: str) -> None:
    async def body(ledger: Ledger) -> None:
        root = await ledger.claim("root-1", "sha256:r", "w1", "plan")
        assert root.decision == "claimed"
        stored = await ledger.get("root-1")
        assert stored is not None and "parent" not in stored.fields
        assert (await task_tree(ledger, "root-1", stored.fields))["parent"] is None
        await ledger.children.cancel(["root-1/gather/0"], "the parent expired", 60)
        cancelled = await ledger.claim("root-1/gather/0", "sha256:c", "w1", "research",
                                       parent=("root-1", "gather", 0))
        assert cancelled.decision == "cancelled"
        stored = await ledger.get("root-1/gather/0")
        assert stored is not None
        assert (stored.fields["parent"], stored.fields["parent_step"], stored.fields["parent_n"]) == (
            "root-1", "gather", "0")

    with_ledger(any_redis_url, body)


def test_the_parent_is_read_from_a_childs_headers_and_hostile_ones_name_none() -> None:
    def record(headers: list[tuple[str, bytes]]) -> Record:
        return Record("tasks", 0, 1, b"k", b"{}", headers)

    named = [("agent.parent", b"p-1"), ("agent.parent_step", b"gather"), ("agent.child", b"3")]
    assert parent_of(record(named)) == ("p-1", "gather", 3)
    assert parent_of(record([])) is None
    for bad in ([named[0], named[1], ("agent.child", b"x")], [named[0], named[2]],
                [("agent.parent", b"not a key!"), *named[1:]], [("agent.parent", b"p" * 300), *named[1:]]):
        assert parent_of(record(bad)) is None
