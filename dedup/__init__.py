"""Redis dedup ledger: claims with leases, fencing tokens, a step journal. Knows nothing of Kafka."""

from dedup.keys import Keys, is_valid_task_key
from dedup.ledger import (
    Attempt,
    AttemptsExhausted,
    Claim,
    Completion,
    Ledger,
    LedgerUnavailable,
    StaleFence,
    TaskRecord,
)

__all__ = [
    "Attempt", "AttemptsExhausted", "Claim", "Completion", "Keys", "Ledger", "LedgerUnavailable", "StaleFence", "TaskRecord",
    "is_valid_task_key",
]
