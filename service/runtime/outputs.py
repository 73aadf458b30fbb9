"""The outputs the pipeline writes outcomes through: the producer, the results topic's encoding
(plain JSON or through a Schema Registry) and, with transactions on, the transactional producer."""

from __future__ import annotations

import asyncio
from typing import Any

from confluent_kafka.admin import AdminClient

from consumers.producers import (
    DEFAULT_BATCH_BYTES,
    RECORD_OVERHEAD_BYTES,
    Outputs,
    Publisher,
    topic_max_message_bytes,
)
from consumers.transactions import TransactionalOutputs, TransactionalProducer
from service.core.result_events import result_writer
from service.core.settings import Settings


def outputs_of(settings: Settings, closers: list[Any]) -> tuple[Publisher, Outputs, TransactionalProducer | None]:
    """The producer of results and dead letters, the outputs written through it, and with
    ``AGENT_KAFKA__TRANSACTIONAL`` the transactional producer the runner commits with."""
    # A record batch must fit the output topics' max.message.bytes: the broker refuses an oversized
    # batch whole, which would condemn every record in it along with the one that is too large.
    admin = AdminClient(settings.kafka.common_config("admin"))
    dlq_limit = topic_max_message_bytes(admin, settings.kafka.dlq_topic)
    sizes = [n for n in (dlq_limit, topic_max_message_bytes(admin, settings.kafka.results_topic)) if n]
    batch = {"batch.size": min(sizes + [DEFAULT_BATCH_BYTES]) - RECORD_OVERHEAD_BYTES}
    publisher = Publisher({**settings.kafka.producer_config(), **batch})
    transactions: TransactionalProducer | None = None
    if settings.kafka.transactional:
        # outcomes are staged and written with their offsets in one transaction per commit
        transactions = txn = TransactionalProducer({**settings.kafka.transactional_producer_config(), **batch})
        closers.append(lambda: asyncio.to_thread(txn.close))
        outputs: Outputs = TransactionalOutputs(publisher, settings.kafka.results_topic, settings.kafka.dlq_topic)
    else:
        outputs = Outputs(publisher, settings.kafka.results_topic, settings.kafka.dlq_topic)
    outputs.set_dlq_limit(dlq_limit)  # dead letters are cut to the DLQ topic's limit too, when known
    outputs.encoder = writer = result_writer(settings.schema_registry, settings.kafka.results_topic)
    if writer is not None:
        closers.append(writer.aclose)
    return publisher, outputs, transactions
