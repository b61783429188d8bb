"""Options of the Kafka transport: declared fields; every other ``-X key=value`` is a librdkafka setting."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["KafkaOptions"]


@dataclass(frozen=True)
class KafkaOptions:
    """``-X`` options of ``--broker kafka``. Any ``-X`` name not declared here is passed to librdkafka
    unchanged (``-X linger.ms=20``, ``-X security.protocol=SASL_SSL``...)."""

    dead_letter_topic: str | None = field(default=None, metadata={
        "help": "consume: also copy each dead letter to this topic"})
