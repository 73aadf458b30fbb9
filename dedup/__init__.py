"""Redis dedup ledger: claims with leases, fencing tokens, a step journal. Knows nothing of Kafka."""

from dedup.keys import Keys, is_valid_task_key
from dedup.ledger import Claim, Completion, Ledger, LedgerUnavailable, StaleFence, TaskRecord

__all__ = [
    "Claim", "Completion", "Keys", "Ledger", "LedgerUnavailable", "StaleFence", "TaskRecord",
    "is_valid_task_key",
]
