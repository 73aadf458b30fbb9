"""The ledger's exceptions, and what a failed Redis call means (:func:`translate`).

An outage (Redis did not answer, or answered that it cannot serve anyone now) is
:class:`LedgerUnavailable`: the caller retries. An error reply for this one call is
:class:`LedgerRefused`: a fault of the caller, not an outage.
"""

from __future__ import annotations

from redis.exceptions import (
    BusyLoadingError,
    ClusterError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)


class LedgerError(Exception):
    """Root of the ledger's exceptions."""


class LedgerUnavailable(LedgerError):
    """Redis did not answer; the outcome of the operation is unknown."""


class LedgerRefused(LedgerError):
    """Redis answered with an error for this call (a script error, a wrong type): not an outage."""


class StaleFence(LedgerError):
    """A newer claim holds the task: this worker's write was refused."""


class AttemptsExhausted(LedgerError):
    """The step has used every attempt it is allowed."""

    def __init__(self, total: int) -> None:
        super().__init__(f"no attempt left ({total} made for the task)")
        self.total = total


# Error replies that mean the server cannot serve anyone right now: retried as an outage.
OUTAGE_REPLIES = frozenset({"OOM", "BUSY", "LOADING", "READONLY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN",
                            "NOREPLICAS", "MISCONF", "NOSCRIPT", "MOVED", "ASK"})


# redis-py raises these for their codes, with the code cut from the message
OUTAGE_CLASSES = (ReadOnlyError, BusyLoadingError, OutOfMemoryError, NoScriptError)


def is_outage_reply(exc: ResponseError) -> bool:
    """An error reply that says the node cannot serve this now (it will, or another node will):
    ``READONLY`` from a master demoted by a failover, ``LOADING`` from one restarting, ..."""
    if isinstance(exc, OUTAGE_CLASSES):
        return True
    text = str(exc)
    code = getattr(exc, "status_code", None) or text.split(" ", 1)[0]
    # WAIT on a primary demoted by a failover, sent there on a slot map not yet reloaded
    return code in OUTAGE_REPLIES or "cannot be used with replica instances" in text


def _raised_inside_redis(exc: BaseException) -> bool:
    """True when the innermost frame of ``exc`` is code of the ``redis`` package."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(tb.tb_frame.f_globals.get("__name__", "")).startswith("redis.")


def translate(exc: Exception) -> None:
    """Raise what a failed ledger call means (:class:`LedgerUnavailable`, :class:`LedgerRefused`);
    return for an exception that is not Redis's, which the caller raises as it is."""
    if isinstance(exc, ClusterError | TryAgainError):  # a cluster failing over or resharding
        raise LedgerUnavailable(f"redis cluster: {type(exc).__name__}: {exc}") from exc
    if isinstance(exc, ResponseError):
        if is_outage_reply(exc):
            raise LedgerUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc
        # Redis answered and refused this one call: not an outage, a fault of the caller
        raise LedgerRefused(f"redis refused the call: {type(exc).__name__}: {str(exc)[:300]}") from exc
    if isinstance(exc, RedisError):
        raise LedgerUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc
    if _raised_inside_redis(exc):  # the client library failed (a node going away): an outage
        raise LedgerUnavailable(f"redis client: {type(exc).__name__}: {exc}") from exc
