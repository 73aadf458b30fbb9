"""The service's Kafka topics: the missing ones created, the input topic's retention read.

A start (and a test's or a benchmark's setup) calls :func:`ensure_topics`; the ledger keeps a
task's record at least as long as :func:`topic_retention_s` says the input topic keeps its record.
"""

from __future__ import annotations

import logging

from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from consumers.producers import KAFKA_DEFAULT_MAX_MESSAGE_BYTES, broker_message_max_bytes, topic_max_message_bytes
from service.core.settings import Settings

log = logging.getLogger(__name__)

FOREVER_S = 100 * 365 * 24 * 3600  # a topic kept for ever: the ledger keeps its records as long


def ensure_topics(settings: Settings, timeout_s: float = 15.0, *, create: bool | None = None) -> list[str]:
    """Create the missing topics; returns those still missing (none, unless ``create`` is False).

    ``create`` unset follows ``AGENT_KAFKA__CREATE_TOPICS``. The dead-letter topic takes records a
    little larger than the input topic's largest (``max.message.bytes`` of the input, or the
    broker's default, plus 64 KiB for the ``dlq.*`` headers), so that an input record dead-letters
    whole wherever the producer allows."""
    k = settings.kafka
    admin = AdminClient(k.common_config("admin"))
    metadata = admin.list_topics(timeout=timeout_s)
    existing = set(metadata.topics)
    wanted = [k.input_topic, k.results_topic, k.dlq_topic, k.audit_topic, k.approvals_topic, k.replies_topic]
    if not (k.create_topics if create is None else create):
        return [t for t in wanted if t not in existing]
    configs: dict[str, dict[str, str]] = {}
    if k.dlq_topic not in existing:
        input_limit = topic_max_message_bytes(admin, k.input_topic, timeout_s) if k.input_topic in existing else None
        if input_limit is None:
            input_limit = broker_message_max_bytes(admin, metadata, timeout_s)
        configs[k.dlq_topic] = {"max.message.bytes": str(max(input_limit, KAFKA_DEFAULT_MAX_MESSAGE_BYTES) + 65_536)}
    missing = [t for t in wanted if t not in existing]
    if not missing:
        return []

    def create_all(topics: list[str], with_config: bool) -> list[str]:
        """Create ``topics``; those whose topic config the broker refused, returned."""
        new = [NewTopic(t, num_partitions=k.topic_partitions, replication_factor=k.topic_replication_factor,
                        config=configs.get(t, {}) if with_config else {}) for t in topics]
        refused: list[str] = []
        for topic, future in admin.create_topics(new, operation_timeout=timeout_s).items():
            try:
                future.result(timeout_s)
                log.info("created topic %s %s", topic, configs.get(topic, {}) if with_config else "")
            except Exception as exc:  # noqa: BLE001 - "already exists" from a racing replica is fine
                text = str(exc).lower()
                if "exist" in text:
                    continue
                if with_config and configs.get(topic) and "config" in text:
                    refused.append(topic)
                    continue
                raise
        return refused

    refused = create_all(missing, with_config=True)
    if refused:
        log.warning("broker refused the topic config of %s: creating with its defaults", refused)
        create_all(refused, with_config=False)
    return []


def topic_retention_s(settings: Settings, timeout_s: float = 10.0) -> int | None:
    """The input topic's ``retention.ms`` in seconds (``FOREVER_S`` for -1), or None if unreadable."""
    from confluent_kafka.admin import ConfigResource  # type: ignore[attr-defined]

    admin = AdminClient(settings.kafka.common_config("admin"))
    resource = ConfigResource("topic", settings.kafka.input_topic)
    try:
        configs = admin.describe_configs([resource], request_timeout=timeout_s)[resource].result(timeout_s)
        entry = configs.get("retention.ms")
        value = int(entry.value) if entry is not None and entry.value is not None else None
    except Exception as exc:  # noqa: BLE001 - a broker that cannot describe configs: keep the floor
        log.warning("retention of %s not readable (%s); ledger retention stays at its floor",
                    settings.kafka.input_topic, exc)
        return None
    if value is None:
        return None
    return FOREVER_S if value < 0 else -(-value // 1000)
