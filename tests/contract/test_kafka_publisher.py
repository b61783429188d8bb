"""Kafka-only behaviour of KafkaPublisher (tansu, or KAFKA_BOOTSTRAP_SERVERS)."""

from __future__ import annotations

import logging
import time
import uuid

import pytest

from outbox.brokers import KafkaPublisher, Outcome
from outbox.errors import ConfigurationError

pytestmark = pytest.mark.kafka


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"bootstrap_servers": ""}, "bootstrap_servers"),
        ({"compression": "brotli"}, "compression"),
        ({"linger_ms": -1}, "linger_ms"),
        ({"message_timeout_ms": "soon"}, "message_timeout_ms"),
        ({"topic_metadata_timeout_ms": 1.5}, "topic_metadata_timeout_ms"),
        ({"auto_create_topics": "yes"}, "auto_create_topics"),
        ({"connect_timeout": 0}, "connect_timeout"),
        ({"config": {"acks": 1}}, "acks"),
        ({"config": {"enable.idempotence": "false"}}, "enable.idempotence"),
        ({"config": {"on_delivery": print}}, "on_delivery"),
        ({"config": {"delivery.report.only.error": False}}, "delivery.report.only.error"),
        ({"config": {"no.such.setting": 1}}, "no.such.setting"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, named):
    kwargs = {"bootstrap_servers": "127.0.0.1:9", **kwargs}
    with pytest.raises(ConfigurationError, match=named.replace(".", r"\.")):
        KafkaPublisher(**kwargs)


def test_secret_settings_stay_out_of_configuration_errors():
    with pytest.raises(ConfigurationError) as info:
        KafkaPublisher(bootstrap_servers="127.0.0.1:9",
                       config={"sasl.password": "hunter2-secret", "no.such.setting": 1})
    assert "hunter2-secret" not in str(info.value)


def test_auto_create_topics_lets_the_broker_create_the_topic(kafka_bootstrap, make_record):
    from confluent_kafka.admin import AdminClient

    topic = f"auto-{uuid.uuid4().hex[:8]}"
    pub = KafkaPublisher(bootstrap_servers=kafka_bootstrap, auto_create_topics=True)
    try:
        pub.start()
        result = pub.publish([make_record(topic, b"{}", key="k")], timeout=30)[0]
        assert result.outcome is Outcome.DELIVERED, result.error
    finally:
        pub.close()
        admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
        for fut in admin.delete_topics([topic]).values():
            try:
                fut.result(10)
            except Exception:
                pass


def test_librdkafka_spelling_of_auto_create_wins(kafka_bootstrap):
    pub = KafkaPublisher(bootstrap_servers=kafka_bootstrap, config={"allow.auto.create.topics": "true"})
    try:
        assert pub.auto_create_topics is True
    finally:
        pub.close()


def test_without_auto_create_the_missing_topic_is_not_created(kafka_bootstrap, make_record):
    from confluent_kafka.admin import AdminClient

    topic = f"typo-{uuid.uuid4().hex[:8]}"
    pub = KafkaPublisher(bootstrap_servers=kafka_bootstrap, topic_metadata_timeout_ms=500)
    try:
        result = pub.publish([make_record(topic, b"{}")], timeout=30)[0]
    finally:
        pub.close()
    assert result.outcome is Outcome.RETRY  # retried by the relay: a deploy may create it later
    assert "UNKNOWN_TOPIC" in (result.error or "")
    topics = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10).topics
    assert topic not in topics


def test_a_closed_publisher_reopens_on_publish(kafka_bootstrap, kafka_topic, make_record):
    pub = KafkaPublisher(bootstrap_servers=kafka_bootstrap)
    pub.start()
    pub.close()
    try:
        assert pub.publish([make_record(kafka_topic, b"{}")], timeout=30)[0].outcome is Outcome.DELIVERED
    finally:
        pub.close()


def test_broker_gone_then_back(tmp_path, make_record):
    """A broker that dies after start: BrokerUnavailable (no secret in it); once it is back, publishing resumes."""
    from outbox.devbroker import DevKafkaBroker
    from outbox.errors import BrokerUnavailable

    broker = DevKafkaBroker(log_path=str(tmp_path / "tansu.log")).start()
    pub = KafkaPublisher(bootstrap_servers=broker.bootstrap_servers, auto_create_topics=True,
                         message_timeout_ms=10_000, connect_timeout=2,
                         config={"reconnect.backoff.max.ms": 500, "log_level": 0})
    topic = f"bounce-{uuid.uuid4().hex[:8]}"
    try:
        assert pub.publish([make_record(topic, b"1", key="k")], timeout=30)[0].outcome is Outcome.DELIVERED
        broker.stop()
        with pytest.raises(BrokerUnavailable, match="not reachable"):
            pub.publish([make_record(topic, b"2", key="k")], timeout=2)
        broker = DevKafkaBroker(port=broker.port, log_path=str(tmp_path / "tansu2.log")).start()
        # The new broker does not know the idempotent producer's id: librdkafka raises a fatal
        # error, the batch comes back RETRY and the producer is recreated; the next try delivers.
        result = pub.publish([make_record(topic, b"3", key="k")], timeout=30)[0]
        if result.outcome is Outcome.RETRY:
            assert "fatal" in (result.error or "")
            result = pub.publish([make_record(topic, b"3", key="k")], timeout=30)[0]
        assert result.outcome is Outcome.DELIVERED, result.error
    finally:
        pub.close(timeout=2)
        broker.stop()


def test_a_topic_created_after_a_failed_publish_is_used(kafka_bootstrap, make_record, caplog):
    """Issue 9, item 8d: a missing topic is retriable, the log says what to do, and once created it works."""
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"late-{uuid.uuid4().hex[:8]}"
    pub = KafkaPublisher(bootstrap_servers=kafka_bootstrap, topic_metadata_timeout_ms=500)
    try:
        with caplog.at_level(logging.WARNING, logger="outbox.brokers.kafka"):
            first = pub.publish([make_record(topic, b"1", key="k")], timeout=30)[0]
            again = pub.publish([make_record(topic, b"2", key="k")], timeout=30)[0]
        assert (first.outcome, again.outcome) == (Outcome.RETRY, Outcome.RETRY)
        hints = [r.getMessage() for r in caplog.records if topic in r.getMessage()]
        assert len(hints) == 1, f"the missing topic should be reported once per interval, got {hints}"
        assert "create it" in hints[0] and "allow.auto.create.topics" in hints[0]

        admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
        for fut in admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)]).values():
            fut.result(30)
        deadline = time.monotonic() + 30
        while True:
            result = pub.publish([make_record(topic, b"3", key="k")], timeout=30)[0]
            if result.outcome is Outcome.DELIVERED or time.monotonic() > deadline:
                break
            time.sleep(0.5)  # the relay's backoff between attempts
        assert result.outcome is Outcome.DELIVERED, result.error
    finally:
        pub.close()


def test_message_max_bytes_leaves_room_for_headers_over_the_writers_limit(kafka_bootstrap, kafka_topic, make_record):
    """Issue 9, item 9: the writer takes 1,000,000 bytes (payload + key + headers); so does the producer."""
    from outbox.brokers.kafka import DEFAULT_MESSAGE_MAX_BYTES

    headers = {f"h{i}": "v" * 90 for i in range(10)}
    payload = b"p" * (1_000_000 - 1_000 - 3)  # with ~1,000 header bytes and the key: the writer's limit
    pub = KafkaPublisher(bootstrap_servers=kafka_bootstrap)
    try:
        fits, too_big = pub.publish([
            make_record(kafka_topic, payload, key="big", headers=headers, content_type="application/octet-stream"),
            make_record(kafka_topic, b"x" * (DEFAULT_MESSAGE_MAX_BYTES + 1), key="bigger"),
        ], timeout=30)
    finally:
        pub.close()
    assert fits.outcome is Outcome.DELIVERED, fits.error
    assert too_big.outcome is Outcome.FAILED and "MSG_SIZE_TOO_LARGE" in (too_big.error or "")


def test_a_message_max_bytes_setting_wins_over_the_default(kafka_bootstrap, kafka_topic, make_record):
    pub = KafkaPublisher(bootstrap_servers=kafka_bootstrap, config={"message.max.bytes": 10_000})
    try:
        (result,) = pub.publish([make_record(kafka_topic, b"x" * 20_000, key="k")], timeout=30)
    finally:
        pub.close()
    assert result.outcome is Outcome.FAILED and "MSG_SIZE_TOO_LARGE" in (result.error or "")


def test_a_small_batch_is_not_held_for_linger_ms(kafka_bootstrap, kafka_topic, make_record):
    """linger.ms batches the queue while a batch is produced; the batch's tail is sent at once.

    With a 5 s linger, waiting it out would make this publish take at least 5 s.
    """
    pub = KafkaPublisher(bootstrap_servers=kafka_bootstrap, linger_ms=5000)
    try:
        pub.start()
        for n in (1, 50):  # an idle relay's single message, and a small batch
            began = time.monotonic()
            results = pub.publish([make_record(kafka_topic, b"{}", key=f"k{i}") for i in range(n)], timeout=30)
            took = time.monotonic() - began
            assert [r.outcome for r in results] == [Outcome.DELIVERED] * n, results
            assert took < 2.5, f"{n} message(s) took {took:.2f} s: held for linger.ms"
    finally:
        pub.close()


def test_a_failure_report_lands_on_its_own_message_and_the_rest_of_the_batch_is_delivered(
        kafka_bootstrap, kafka_topic, make_record):
    """Only failed messages are reported (``delivery.report.only.error``): a batch that mixes a
    missing topic into an existing one gets RETRY for exactly those messages, DELIVERED for the rest."""
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    records = [make_record(missing if i % 7 == 3 else kafka_topic, b"{}", key=f"k{i}") for i in range(40)]
    pub = KafkaPublisher(bootstrap_servers=kafka_bootstrap, topic_metadata_timeout_ms=500)
    try:
        results = pub.publish(records, timeout=30)
    finally:
        pub.close()
    assert [r.id for r in results] == [r.id for r in records]
    expected = [Outcome.RETRY if rec.topic == missing else Outcome.DELIVERED for rec in records]
    assert [r.outcome for r in results] == expected, [(r.outcome, r.error) for r in results]
    assert all("UNKNOWN_TOPIC" in (r.error or "") or "UNKNOWN_PART" in (r.error or "")
               for r in results if r.outcome is Outcome.RETRY), results


def _java_murmur2(data: bytes) -> int:
    """Kafka's ``Utils.murmur2`` (the Java client's default partitioner), as an unsigned 32-bit value."""
    m, length = 0x5BD1E995, len(data)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail, rest = length & ~3, length % 4
    if rest == 3:
        h ^= data[tail + 2] << 16
    if rest >= 2:
        h ^= data[tail + 1] << 8
    if rest >= 1:
        h ^= data[tail]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    return h ^ (h >> 15)


def test_keys_land_on_the_java_clients_partition(kafka_bootstrap, kafka_topic, make_record):
    """A key goes to the partition the Java client's murmur2 partitioner picks (``toPositive(murmur2(key)) % n``),
    so a service producing the same keys from Java, or reading by partition, agrees with the relay."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    assert _java_murmur2(b"21") == -973932308 & 0xFFFFFFFF  # Kafka's own UtilsTest vectors
    assert _java_murmur2(b"foobar") == -790332482 & 0xFFFFFFFF
    keys = [f"customer-{i}" for i in range(60)]
    pub = KafkaPublisher(bootstrap_servers=kafka_bootstrap)
    try:
        results = pub.publish([make_record(kafka_topic, k.encode(), key=k) for k in keys], timeout=30)
    finally:
        pub.close()
    assert {r.outcome for r in results} == {Outcome.DELIVERED}
    reader = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"part-{uuid.uuid4().hex[:8]}",
                       "enable.auto.commit": False, "log_level": 0})
    try:
        reader.assign([TopicPartition(kafka_topic, p, OFFSET_BEGINNING) for p in range(3)])
        seen: dict[str, int] = {}
        deadline = time.monotonic() + 30
        while len(seen) < len(keys) - 3 and time.monotonic() < deadline:  # tansu may lose a partition's first record
            for m in reader.consume(num_messages=100, timeout=0.2):
                if m.error() is None:
                    seen[m.key().decode()] = m.partition()
    finally:
        reader.close()
    assert len(seen) >= len(keys) - 3, f"read back {len(seen)} of {len(keys)}"
    java = {k: (_java_murmur2(k.encode()) & 0x7FFFFFFF) % 3 for k in seen}  # toPositive(murmur2(key)) % 3
    wrong = {k: (p, java[k]) for k, p in seen.items() if p != java[k]}
    assert not wrong, f"key: (partition, Java's partition) {wrong}"
    assert len(set(seen.values())) == 3
