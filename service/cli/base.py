"""What every command of the CLI shares: its name and how it says a server did not answer."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator, Callable

from dedup.client import close
from dedup.keys import Keys
from dedup.ledger import Ledger
from service.core.settings import Settings

PROG = "agent-service"
Handler = Callable[[Settings, argparse.Namespace], int]


class Unreachable(Exception):
    """Redis or the broker did not answer: one line on stderr, exit code 2."""


@contextlib.asynccontextmanager
async def open_ledger(settings: Settings) -> AsyncIterator[Ledger]:
    """The ledger the settings name, for one command; closed with its connections (a pool left open
    warns once the loop has closed)."""
    from service.runtime.wiring import MIN_LEDGER_TTL_S, redis_client

    client = redis_client(settings)
    try:
        yield Ledger(client, keys=Keys(settings.redis.key_prefix), lease_ms=settings.ledger.lease_ms,
                     ttl_s=settings.ledger.result_ttl_s or MIN_LEDGER_TTL_S)
    finally:
        await close(client)
