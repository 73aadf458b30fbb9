"""The calls of one ledger script issued in one turn of the event loop, on one Redis server: sent as
one grouped script, each call still answered on its own (its result, its nil, its error), and as
one command per call on a Redis Cluster. A replica's READONLY fails the whole grouped command, as it
fails an ungrouped call: a Sentinel-managed connection acts on it only at the top of a reply."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, ReadOnlyError, ResponseError

from dedup import batch
from dedup.batch import Packer, ScriptBatcher, grouped_source
from dedup.client import close, connect
from service.devtools import local

pytestmark = pytest.mark.integration

# KEYS[1] a counter; ARGV[1] 'nil', 'error' or a step -> the counter after INCRBY, nil or an error
SCRIPT = """
if ARGV[1] == 'nil' then return nil end
if ARGV[1] == 'error' then return redis.call('HGET', KEYS[1], 'no') end
return redis.call('INCRBY', KEYS[1], ARGV[1])
"""


def run_together(url: str, calls: list[tuple[str, str]], *, count: bool = False) -> tuple[list[Any], int, int]:
    """Run every call in one turn, twice (the first loads the scripts); -> each call's outcome the
    second time, the scripts Redis ran then (with ``count``), the batcher's round trips then."""
    async def main() -> tuple[list[Any], int, int]:
        client = connect(url)
        try:
            script = client.register_script(SCRIPT)
            batcher = ScriptBatcher(client)

            async def turn() -> list[Any]:
                return await asyncio.wait_for(asyncio.gather(
                    *(batcher.run(script, [key], [arg]) for key, arg in calls), return_exceptions=True), 10)

            await turn()
            before, sent = await _scripts_run(client) if count else 0, batcher.batches
            outcomes = await turn()
            assert batcher.calls == 2 * len(calls)
            return outcomes, (await _scripts_run(client) if count else 0) - before, batcher.batches - sent
        finally:
            await close(client)

    return asyncio.run(main())


async def _scripts_run(client: Any) -> int:
    stats = await client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))


def test_one_scripts_calls_in_one_turn_go_as_one_command_each_answered_on_its_own(redis_url: str) -> None:
    tag = uuid.uuid4().hex[:8]
    async def prepare() -> None:
        client = connect(redis_url)
        try:
            await client.set(f"{{g}}{tag}:string", "x")  # HGET on a string: WRONGTYPE
        finally:
            await close(client)

    asyncio.run(prepare())
    calls = [(f"{{g}}{tag}:a", "2"), (f"{{g}}{tag}:a", "3"), (f"{{g}}{tag}:b", "nil"),
             (f"{{g}}{tag}:string", "error"), (f"{{g}}{tag}:b", "5")]
    outcomes, commands, sent = run_together(redis_url, calls, count=True)
    assert outcomes[:3] == [7, 10, None] and outcomes[4] == 10, outcomes
    assert isinstance(outcomes[3], ResponseError) and "WRONGTYPE" in str(outcomes[3]), outcomes
    assert sent == 1, "one round trip"
    assert commands == 1, "one grouped script for five calls"


def test_a_cluster_keeps_one_command_per_call(redis_cluster: Any) -> None:
    outcomes, _commands, sent = run_together(redis_cluster.url, [("{g}c1", "1"), ("{h}c2", "1"), ("{i}c3", "nil")])
    assert outcomes[0] >= 2 and outcomes[1] >= 2 and outcomes[2] is None, outcomes
    assert sent == 1, "one pipeline of three commands"


def test_a_replicas_readonly_fails_the_whole_grouped_command_as_it_fails_one_call(redis_url: str,
                                                                                  tmp_path: Path) -> None:
    master = urlsplit(redis_url)
    replica = local.start_redis(tmp_path / "replica", None, "--replicaof", master.hostname or "127.0.0.1",
                                str(master.port))
    try:
        url = f"redis://{replica.address}/0"
        outcomes, _commands, _sent = run_together(url, [("{g}r1", "1"), ("{g}r2", "2"), ("{g}r3", "nil")])
        # the server's answer, not a call's: every call of the command fails with it, the one that
        # wrote nothing too, as every call of a pipeline on a replica's dropped connection would
        assert all(isinstance(o, ReadOnlyError) for o in outcomes), [type(o).__mro__ for o in outcomes]

        async def grouped_directly() -> Any:
            client = connect(url)
            try:
                wrapper = client.register_script(grouped_source(SCRIPT))
                packer = Packer(client.get_encoder())
                return await wrapper(keys=["{g}r1", "{g}r2"],
                                     args=[packer.group([packer.call(1, ["1"]), packer.call(1, ["2"])])])
            finally:
                await close(client)

        with pytest.raises(ReadOnlyError):  # at the top of the reply, not one error per call in a list
            asyncio.run(grouped_directly())
    finally:
        replica.stop()


# every key and argument back as the script received it
ECHO = "local out = {} for i = 1, #KEYS do out[#out + 1] = KEYS[i] end out[#out + 1] = '|' " \
       "for i = 1, #ARGV do out[#out + 1] = ARGV[i] end return out"

ODD_ARGS: list[list[Any]] = [
    ["é€😀", "", "\x00nul", "x" * 70_000],
    [b"\xff\xfe\x00 not UTF-8", b""],
    [0, -1, 2**63 - 1, 10**30, 0.1, 1e16, -2.5e-8],
    ["{braces}", "a b\r\n", "1"],
]


@pytest.mark.parametrize("options", ["", "?encoding=latin-1"])
def test_a_grouped_call_gets_its_keys_and_arguments_as_a_lone_call_does(redis_url: str, options: str) -> None:
    async def main() -> tuple[list[Any], list[Any], int]:
        client = connect(redis_url + options)
        try:
            script = client.register_script(ECHO)
            batcher = ScriptBatcher(client)
            keys = [[f"{{g}}k{i}:{j}:é" for j in range(i)] for i in range(len(ODD_ARGS))]  # 0 to 3 keys a call
            args = [[a for a in group if not (options and isinstance(a, str) and max(a, default="a") > "\xff")]
                    for group in ODD_ARGS]  # what the client's encoding can write
            alone = [await script(keys=k, args=a) for k, a in zip(keys, args, strict=True)]
            sent = batcher.batches
            grouped = await asyncio.gather(*(batcher.run(script, k, a) for k, a in zip(keys, args, strict=True)))
            return alone, list(grouped), batcher.batches - sent
        finally:
            await close(client)

    alone, grouped, sent = asyncio.run(main())
    assert sent == 1, "one grouped command"
    assert grouped == alone
    assert alone[1] == [b"{g}k1:0:" + "é".encode(options and "latin-1" or "utf-8"), b"|",
                        b"\xff\xfe\x00 not UTF-8", b""], alone
    assert alone[2][3:5] == [b"0", b"-1"], alone


def test_a_call_whose_arguments_cannot_be_sent_fails_alone(redis_url: str) -> None:
    async def main() -> list[Any]:
        client = connect(redis_url)
        try:
            script = client.register_script(ECHO)
            batcher = ScriptBatcher(client)
            return await asyncio.gather(
                batcher.run(script, ["{g}a"], ["fine"]),
                batcher.run(script, ["{g}b"], ["lone \udc80 surrogate"]),  # no UTF-8 for it: redis-py refuses it too
                batcher.run(script, ["{g}c"], [True]),  # nor does redis-py send a bool
                batcher.run(script, ["{g}d"], [7]),
                return_exceptions=True)
        finally:
            await close(client)

    outcomes = asyncio.run(main())
    assert outcomes[0] == [b"{g}a", b"|", b"fine"] and outcomes[3] == [b"{g}d", b"|", b"7"], outcomes
    # as redis-py fails them on their own: a library failure is a connection's, a bool the caller's
    assert isinstance(outcomes[1], RedisConnectionError) and isinstance(outcomes[2], DataError), outcomes


def test_a_group_larger_than_its_byte_cap_is_cut_and_each_call_still_answered(redis_url: str,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch, "GROUP_BYTES", 1000)
    args = [[f"{i}" * 400] for i in range(5)]  # two calls fit under the cap, not three

    async def main() -> tuple[list[Any], int, int]:
        client = connect(redis_url)
        try:
            script = client.register_script(ECHO)
            batcher = ScriptBatcher(client)
            await script(keys=["{g}warm"], args=["x"])
            answers = await asyncio.gather(*(batcher.run(script, [f"{{g}}cap{i}"], a) for i, a in enumerate(args)))
            return list(answers), batcher.commands, batcher.batches
        finally:
            await close(client)

    answers, commands, batches = asyncio.run(main())
    assert answers == [[f"{{g}}cap{i}".encode(), b"|", a[0].encode()] for i, a in enumerate(args)]
    assert (commands, batches) == (3, 1), "two groups of two and the last call alone, in one round trip"
