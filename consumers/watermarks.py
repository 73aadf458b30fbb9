"""A partition's watermarks, read through a leader election.

A topic just created (or a partition whose leader just went away) answers
``NOT_LEADER_FOR_PARTITION`` to a watermark read for a moment, until its leader is elected; the
broker's metadata names the leader before the leader serves, so waiting on metadata does not
help. Every reader that asks for watermarks outside the consumer's own fetch loop (the
dead-letter peek, the SDK's results client) asks through :func:`watermarks`.
"""

from __future__ import annotations

import time

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

# a partition whose leader is still being elected (a topic just created, a broker just gone)
ELECTING = frozenset({KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                      KafkaError.UNKNOWN_TOPIC_OR_PART})


def watermarks(consumer: Consumer, tp: TopicPartition, timeout_s: float) -> tuple[int, int]:
    """The partition's low and high offsets from its leader, asked again while its leader is being
    elected, until ``timeout_s``; any other error, or the deadline, raises as confluent-kafka does."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            low, high = consumer.get_watermark_offsets(tp, timeout=max(0.1, deadline - time.monotonic()), cached=False)
            return int(low), int(high)
        except KafkaException as exc:
            if exc.args[0].code() not in ELECTING or time.monotonic() + 0.05 >= deadline:
                raise
            time.sleep(0.05)
