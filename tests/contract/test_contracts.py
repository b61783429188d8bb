"""The contract suites of outbox.testing, run by every in-repo transport: the publisher contract on
memory, Kafka via tansu and real RabbitMQ; the consumer-runner contract on Kafka and RabbitMQ
(memory has no runner: its class reports the suite as skipped, by its Features).

The harnesses are in tests/contract/conftest.py. An external transport does the same in its own
tests (see docs/transports.md, and tests/contract/thirdparty/ for one).
"""

from __future__ import annotations

import pytest

from outbox.testing import ConsumerRunnerContract, Features, PublisherContract
from outbox.transports.base import Outcome

#: what each in-repo transport claims (the consumer-runner suite reads the same flags)
MEMORY = Features(missing_topic=Outcome.FAILED, missing_topic_reason="UNKNOWN_TOPIC", consumer_runner=False)
KAFKA = Features(missing_topic=Outcome.RETRY, missing_topic_reason="UNKNOWN_TOPIC", broker_timestamps=True)
RABBITMQ = Features(missing_topic=Outcome.FAILED, missing_topic_reason="404", broker_timestamps=True,
                    message_properties=True, redelivery_flag=True)


class TestMemoryPublisher(PublisherContract):
    features = MEMORY

    @pytest.fixture
    def harness(self, memory_harness):
        return memory_harness


@pytest.mark.kafka
class TestKafkaPublisher(PublisherContract):
    features = KAFKA

    @pytest.fixture
    def harness(self, kafka_harness):
        return kafka_harness


@pytest.mark.rabbitmq
class TestRabbitMQPublisher(PublisherContract):
    features = RABBITMQ

    @pytest.fixture
    def harness(self, rabbitmq_harness):
        return rabbitmq_harness


class TestMemoryRunner(ConsumerRunnerContract):
    features = MEMORY


@pytest.mark.kafka
class TestKafkaRunner(ConsumerRunnerContract):
    features = KAFKA

    @pytest.fixture
    def harness(self, kafka_consumer_harness):
        return kafka_consumer_harness


@pytest.mark.rabbitmq
class TestRabbitMQRunner(ConsumerRunnerContract):
    features = RABBITMQ

    @pytest.fixture
    def harness(self, rabbitmq_consumer_harness):
        return rabbitmq_consumer_harness
