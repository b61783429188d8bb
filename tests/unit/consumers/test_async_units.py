"""Unit checks of the asyncio consumer's edges: building messages from client objects."""

from __future__ import annotations

import pytest

from consumers import ConfigurationError, message_from_amqp, message_from_kafka


def test_what_is_not_a_message_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="not a Kafka record"):
        message_from_kafka(object())
    with pytest.raises(ConfigurationError, match="not an AMQP delivery"):
        message_from_amqp({"body": b""})

    class Record:  # an aiokafka record read with a value_deserializer
        topic, partition, offset, key, value, headers = "t", 0, 1, None, {"n": 1}, []

    with pytest.raises(ConfigurationError, match="value_deserializer"):
        message_from_kafka(Record())

    class Batch:  # a FastStream batch message
        raw_message = (Record(), Record())

    with pytest.raises(ConfigurationError, match="one message per record"):
        message_from_kafka(Batch())
