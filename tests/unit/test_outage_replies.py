"""The replies of a server that cannot serve now are outages the ledger waits out, as redis-py parses them.

redis-py raises its own class for some codes (``READONLY``, ``LOADING``, ``OOM``) and cuts the code
from the message: a master demoted by a failover answers ``READONLY``, which must be retried as an
outage, never reported as the caller's fault.
"""

from __future__ import annotations

import pytest
from redis._parsers.base import BaseParser
from redis.exceptions import ResponseError

from dedup.errors import LedgerRefused, LedgerUnavailable, translate


class _Parser(BaseParser):
    """redis-py's own parsing of an error reply (it strips a known code from the message)."""

    def on_connect(self, connection: object) -> None: ...

    def on_disconnect(self) -> None: ...


def _reply(text: str) -> ResponseError:
    exc: ResponseError = _Parser.parse_error(text)  # type: ignore[no-untyped-call]
    return exc


@pytest.mark.parametrize("reply", [
    "READONLY You can't write against a read only replica.",
    "LOADING Redis is loading the dataset in memory",
    "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
    "OOM command not allowed when used memory > 'maxmemory'.",
    "NOREPLICAS Not enough good replicas to write.",
])
def test_replies_of_a_server_that_cannot_serve_now_are_outages(reply: str) -> None:
    exc = _reply(reply)
    with pytest.raises(LedgerUnavailable):
        translate(exc)


def test_a_reply_refusing_the_call_stays_a_refusal() -> None:
    exc = _reply("WRONGTYPE Operation against a key holding the wrong kind of value")
    with pytest.raises(LedgerRefused):
        translate(exc)
