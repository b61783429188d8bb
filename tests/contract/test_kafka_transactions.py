"""Does the test broker support Kafka transactions, with zombie fencing? (issue 9, "frozen relays")

Broker-side fencing of a frozen relay would use one ``transactional.id`` per partition lease, as
Kafka Streams does: the relay that takes a lease over calls ``init_transactions()`` with the same
id, which fences the frozen one, whose later produce / commit then fails instead of publishing a
stale batch. These checks tell whether the broker the tests run against does that; they skip,
saying why, where it does not.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

pytestmark = pytest.mark.kafka

#: the errors a fenced (zombie) transactional producer may report
FENCED = {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH,
          KafkaError.INVALID_TXN_STATE}


def _transactional(bootstrap: str, txn_id: str) -> Producer:
    return Producer({"bootstrap.servers": bootstrap, "transactional.id": txn_id, "transaction.timeout.ms": 10_000,
                     "message.timeout.ms": 5_000, "log_level": 0})


@pytest.fixture
def transactions(kafka_bootstrap: str) -> Iterator[str]:
    """A transactional id the broker accepts; skip (saying why) when it has no transactions."""
    txn_id = f"contract-tx-{uuid.uuid4().hex[:8]}"
    probe = _transactional(kafka_bootstrap, f"{txn_id}-probe")
    try:
        probe.init_transactions(15)
    except KafkaException as exc:
        err = exc.args[0]
        pytest.skip(f"the test broker does not support Kafka transactions: init_transactions failed with "
                    f"{err.name()}: {err.str()}")
    finally:
        probe.flush(1)
    yield txn_id


def _read_committed(bootstrap: str, topic: str, n: int) -> list[bytes]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"tx-reader-{uuid.uuid4().hex[:8]}",
                         "isolation.level": "read_committed", "enable.auto.commit": False, "log_level": 0})
    try:
        parts = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        got: list[bytes] = []
        for _ in range(40):
            got += [m.value() or b"" for m in consumer.consume(100, 0.5) if not m.error()]
            if len(got) >= n:
                break
        return got
    finally:
        consumer.close()


def test_a_committed_transaction_is_delivered(kafka_bootstrap, kafka_topic, transactions):
    producer = _transactional(kafka_bootstrap, transactions)
    producer.init_transactions(15)
    producer.begin_transaction()
    producer.produce(kafka_topic, b"committed", key=b"k")
    producer.commit_transaction(15)
    assert _read_committed(kafka_bootstrap, kafka_topic, 1) == [b"committed"]


def test_an_aborted_transaction_is_hidden_from_read_committed_consumers(kafka_bootstrap, kafka_topic,
                                                                         transactions):
    producer = _transactional(kafka_bootstrap, transactions)
    producer.init_transactions(15)
    producer.begin_transaction()
    producer.produce(kafka_topic, b"aborted", key=b"k")
    producer.flush(10)
    producer.abort_transaction(15)
    producer.begin_transaction()
    producer.produce(kafka_topic, b"committed", key=b"k")
    producer.commit_transaction(15)
    got = _read_committed(kafka_bootstrap, kafka_topic, 1)
    assert b"committed" in got
    if b"aborted" in got:
        pytest.xfail("the test broker (tansu 0.6.0) shows aborted transactional records to read_committed "
                     "consumers: no isolation, so transactions cannot hide a zombie's writes here")


def _zombie_and_successor(bootstrap: str, topic: str, txn_id: str) -> tuple[Producer, list[KafkaError]]:
    """A producer with an open transaction (one record sent), then a second one with the same
    transactional.id (the relay that took the lease over); the first then tries to send and commit."""
    zombie = _transactional(bootstrap, txn_id)
    zombie.init_transactions(15)
    zombie.begin_transaction()
    zombie.produce(topic, b"before-takeover", key=b"k")
    zombie.flush(10)

    successor = _transactional(bootstrap, txn_id)
    successor.init_transactions(15)

    errors: list[KafkaError] = []

    def report(err: KafkaError | None, _msg: object) -> None:
        if err is not None:
            errors.append(err)

    try:
        zombie.produce(topic, b"stale", key=b"k", on_delivery=report)
        zombie.flush(10)
        zombie.commit_transaction(15)
    except KafkaException as exc:
        errors.append(exc.args[0])
    successor.begin_transaction()
    successor.produce(topic, b"after-takeover", key=b"k")
    successor.commit_transaction(15)
    return successor, errors


def test_a_second_producer_with_the_same_transactional_id_fences_the_first(kafka_bootstrap, kafka_topic,
                                                                          transactions):
    _successor, errors = _zombie_and_successor(kafka_bootstrap, kafka_topic, transactions)
    if not errors:
        pytest.skip("the test broker accepts transactions but does not fence a zombie: the first producer "
                    "committed after a second one called init_transactions with the same transactional.id")
    described = [f"{e.name()}: {e.str()}" for e in errors]
    assert {e.code() for e in errors} & FENCED or any(e.fatal() for e in errors), described
    got = _read_committed(kafka_bootstrap, kafka_topic, 2)
    assert b"after-takeover" in got
    assert b"stale" not in got, f"the fenced producer's later record was delivered ({described})"


def test_the_successor_aborts_the_zombies_open_transaction(kafka_bootstrap, kafka_topic, transactions):
    _successor, _errors = _zombie_and_successor(kafka_bootstrap, kafka_topic, transactions)
    got = _read_committed(kafka_bootstrap, kafka_topic, 2)
    assert b"after-takeover" in got
    if b"before-takeover" in got:
        pytest.xfail("the test broker (tansu 0.6.0) shows the zombie's records sent before the takeover to "
                     "read_committed consumers: its open transaction is not aborted (or not hidden)")
