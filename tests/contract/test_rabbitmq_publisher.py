"""RabbitMQ-only behaviour of RabbitMQPublisher, against the real broker."""

from __future__ import annotations

import logging
import subprocess
import time
import uuid

import pytest

from outbox.brokers import MESSAGE_ID_HEADER, Outcome, RabbitMQPublisher
from outbox.errors import ConfigurationError
from outbox.transports.codecs import NativeCodec

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
def routed(amqp_names, rabbit_admin):
    """A topic exchange bound with '#' to a queue; returns (exchange, queue)."""
    rabbit_admin.exchange_declare(amqp_names["exchange"], "topic", durable=True)
    rabbit_admin.queue_declare(amqp_names["queue"])
    rabbit_admin.queue_bind(amqp_names["queue"], amqp_names["exchange"], "#")
    return amqp_names["exchange"], amqp_names["queue"]


@pytest.fixture
def publisher(rabbitmq_url):
    pubs = []

    def make(**kw):
        pub = RabbitMQPublisher(url=rabbitmq_url, **kw)
        pubs.append(pub)
        return pub

    yield make
    for p in pubs:
        p.close(timeout=5)


def _depth(admin, queue):
    return admin.queue_declare(queue, passive=True).method.message_count


def _drain(admin, queue):
    out = []
    while True:
        method, props, body = admin.basic_get(queue, auto_ack=True)
        if method is None:
            return out
        out.append((method, props, body))


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"url": ""}, "url"),
        ({"exchange_type": "x-delayed"}, "exchange_type"),
        ({"confirm_window": 0}, "confirm_window"),
        ({"confirm_window": "many"}, "confirm_window"),
        ({"heartbeat": -1}, "heartbeat"),
        ({"connection_attempts": 0}, "connection_attempts"),
        ({"declare_exchanges": "perhaps"}, "declare_exchanges"),
        ({"mandatory": None}, "mandatory"),
        ({"connect_timeout": "never"}, "connect_timeout"),
        ({"max_message_bytes": 0}, "max_message_bytes"),
        ({"connection_name": 5}, "connection_name"),
        ({"allow_default_exchange": "maybe"}, "allow_default_exchange"),
        ({"url": "amqp://u:topsecret@host:notaport/%2F"}, "url"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, named):
    kwargs = {"url": "amqp://guest:guest@127.0.0.1:5672/%2F", **kwargs}
    with pytest.raises(ConfigurationError, match=named) as info:
        RabbitMQPublisher(**kwargs)
    assert "topsecret" not in str(info.value)


def test_settings_given_as_text_are_accepted():
    pub = RabbitMQPublisher(url="amqp://guest:guest@127.0.0.1:5672/%2F", confirm_window="250",
                            declare_exchanges="true", connect_timeout="2.5")
    assert (pub.confirm_window, pub.declare_exchanges, pub.connect_timeout) == (250, True, 2.5)


def test_properties_on_the_wire(publisher, routed, rabbit_admin, make_record):
    exchange, queue = routed
    rec = make_record(exchange, b'{"a": 1}', key="orders.eu", headers={"trace": "t-1"},
                      content_type="application/json")
    assert publisher().publish([rec])[0].outcome is Outcome.DELIVERED
    ((method, props, body),) = _drain(rabbit_admin, queue)
    assert method.routing_key == "orders.eu"
    assert body == b'{"a": 1}'
    assert props.delivery_mode == 2
    assert props.message_id == str(rec.message_id)
    assert props.content_type == "application/json"
    assert props.headers["trace"] == "t-1"
    assert props.headers[MESSAGE_ID_HEADER] == str(rec.message_id)
    assert abs(props.timestamp - time.time()) < 300


def test_unroutable_message_fails_with_no_route_while_others_deliver(publisher, routed, rabbit_admin,
                                                                     amqp_names, make_record):
    exchange, queue = routed
    lonely = amqp_names["dlx"]  # an exchange with no bindings at all
    rabbit_admin.exchange_declare(lonely, "topic", durable=True)
    batch = [make_record(exchange, b"1", key="a"), make_record(lonely, b"x", key="nowhere"),
             make_record(exchange, b"2", key="b")]
    results = publisher().publish(batch)
    assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.FAILED, Outcome.DELIVERED]
    error = results[1].error
    assert error.startswith(f"unroutable: NO_ROUTE (exchange={lonely!r}, routing_key='nowhere'): "), error
    assert f"no queue is bound to exchange {lonely!r} with a binding that matches routing key 'nowhere'" in error
    assert "bind a queue to the exchange with a matching routing key" in error and "alternate exchange" in error
    assert sorted(body for _, _, body in _drain(rabbit_admin, queue)) == [b"1", b"2"]


def test_without_mandatory_unroutable_messages_vanish_as_delivered(publisher, amqp_names, rabbit_admin, make_record):
    lonely = amqp_names["dlx"]
    rabbit_admin.exchange_declare(lonely, "topic", durable=True)
    results = publisher(mandatory=False).publish([make_record(lonely, b"x", key="k")])
    assert results[0].outcome is Outcome.DELIVERED


def test_exchange_deleted_after_first_use(publisher, routed, rabbit_admin, amqp_names, make_record):
    exchange, queue = routed
    doomed = amqp_names["dlx"]
    rabbit_admin.exchange_declare(doomed, "topic", durable=True)
    rabbit_admin.queue_bind(queue, doomed, "#")
    pub = publisher()
    assert [r.outcome for r in pub.publish([make_record(doomed, b"0"), make_record(exchange, b"0")])] == [
        Outcome.DELIVERED, Outcome.DELIVERED]
    _drain(rabbit_admin, queue)
    rabbit_admin.exchange_delete(doomed)

    batch = [make_record(exchange, b"1", key="a"), make_record(doomed, b"x", key="b"),
             make_record(exchange, b"2", key="c"), make_record(exchange, b"3", key="b")]
    results = pub.publish(batch, timeout=30)
    assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.FAILED, Outcome.DELIVERED, Outcome.RETRY]
    assert "404" in results[1].error and doomed in results[1].error
    assert results[3].held
    bodies = [body for _, _, body in _drain(rabbit_admin, queue)]
    # the channel was reopened and unconfirmed messages sent again: duplicates allowed, order kept
    assert set(bodies) == {b"1", b"2"}
    assert bodies.index(b"1") < len(bodies) and bodies[-1] == b"2"
    # the publisher still works afterwards
    assert pub.publish([make_record(exchange, b"4")])[0].outcome is Outcome.DELIVERED


def test_declare_exchanges_creates_a_missing_exchange(publisher, amqp_names, rabbit_admin, make_record):
    name = amqp_names["exchange"]
    result = publisher(declare_exchanges=True, mandatory=False).publish([make_record(name, b"{}", key="k")])[0]
    assert result.outcome is Outcome.DELIVERED
    assert rabbit_admin.exchange_declare(name, passive=True)  # raises if it does not exist


def test_small_window_still_delivers_everything_in_order(publisher, routed, rabbit_admin, make_record):
    exchange, queue = routed
    records = [make_record(exchange, f"{i}".encode(), key="same") for i in range(500)]
    results = publisher(confirm_window=7).publish(records, timeout=60)
    assert all(r.outcome is Outcome.DELIVERED for r in results)
    assert [int(body) for _, _, body in _drain(rabbit_admin, queue)] == list(range(500))


def test_a_closed_publisher_reopens_on_publish(publisher, routed, make_record):
    exchange, _ = routed
    pub = publisher()
    pub.start()
    pub.close()
    assert pub.publish([make_record(exchange, b"{}")])[0].outcome is Outcome.DELIVERED


def _close_connections(name):
    listing = subprocess.run(["rabbitmqctl", "-q", "list_connections", "--no-table-headers", "pid",
                              "client_properties"], capture_output=True, text=True, timeout=60)
    pids = [line.split("\t")[0] for line in listing.stdout.splitlines() if f'"{name}"' in line]
    for pid in pids:
        subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "test: connection killed"],
                       capture_output=True, timeout=60, check=True)
    return len(pids)


def test_reconnects_after_the_broker_closes_the_connection(publisher, routed, rabbit_admin, make_record, caplog):
    try:
        subprocess.run(["rabbitmqctl", "-q", "status"], capture_output=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("rabbitmqctl is not usable here")
    exchange, queue = routed
    name = f"contract-{uuid.uuid4().hex[:8]}"
    pub = publisher(connection_name=name)
    assert pub.publish([make_record(exchange, b"before")])[0].outcome is Outcome.DELIVERED
    deadline = time.monotonic() + 30
    while not _close_connections(name):  # the connection may take a moment to be listed
        assert time.monotonic() < deadline, "the publisher's connection never showed up"
    records = [make_record(exchange, f"{i}".encode(), key="k") for i in range(50)]
    with caplog.at_level("WARNING", logger="outbox.brokers.rabbitmq"):
        results = pub.publish(records, timeout=30)
    assert all(r.outcome is Outcome.DELIVERED for r in results), {r.error for r in results}
    assert any("reconnecting" in r.getMessage() for r in caplog.records)
    assert all("guest:guest" not in r.getMessage() for r in caplog.records)
    bodies = [body for _, _, body in _drain(rabbit_admin, queue)]
    assert bodies[0] == b"before"
    assert [int(b) for b in bodies[1:]] == list(range(50))


def test_connection_lost_in_the_middle_of_a_batch(rabbitmq_url, routed, rabbit_admin, make_record, caplog):
    try:
        subprocess.run(["rabbitmqctl", "-q", "status"], capture_output=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("rabbitmqctl is not usable here")
    exchange, queue = routed
    name = f"contract-{uuid.uuid4().hex[:8]}"

    class KilledMidway(NativeCodec):
        """Has the broker drop the connection just before the 25th message goes out."""

        killed = False

        def encode(self, rec, binding):
            if rec.payload == b"25" and not self.killed:
                self.killed = True
                deadline = time.monotonic() + 30
                while not _close_connections(name):
                    assert time.monotonic() < deadline
            return super().encode(rec, binding)

    codec = KilledMidway()
    pub = RabbitMQPublisher(url=rabbitmq_url, connection_name=name, codec=codec)
    try:
        records = [make_record(exchange, f"{i}".encode(), key="k") for i in range(50)]
        with caplog.at_level("WARNING", logger="outbox.brokers.rabbitmq"):
            results = pub.publish(records, timeout=30)
    finally:
        pub.close()
    assert codec.killed
    assert any("connection lost" in r.getMessage() for r in caplog.records)
    assert [r.id for r in results] == [r.id for r in records]
    assert all(r.outcome is Outcome.DELIVERED for r in results), {r.error for r in results}
    bodies = [int(body) for _, _, body in _drain(rabbit_admin, queue)]
    # unconfirmed messages were sent again after the reconnect: duplicates allowed, but every
    # message is there and first occurrences keep the order
    first_seen = list(dict.fromkeys(bodies))
    assert first_seen == list(range(50))


def test_idle_serves_heartbeats_so_the_connection_survives(publisher, routed, rabbit_admin, make_record, caplog):
    """Issue 9, item 1b: heartbeats were serviced only inside publish(): an idle connection was dropped."""
    exchange, queue = routed
    pub = publisher(heartbeat=1)
    assert pub.publish([make_record(exchange, b"before")])[0].outcome is Outcome.DELIVERED
    with caplog.at_level(logging.DEBUG):
        idle_from = time.monotonic()
        while time.monotonic() - idle_from < 6:  # six heartbeat intervals: RabbitMQ drops a peer after two
            pub.idle(0.5)
        result = pub.publish([make_record(exchange, b"after")], timeout=30)[0]
    assert result.outcome is Outcome.DELIVERED, result.error
    lost = [r.getMessage() for r in caplog.records if "lost" in r.getMessage() or r.levelno >= logging.WARNING]
    assert lost == [], lost
    assert [body for _, _, body in _drain(rabbit_admin, queue)] == [b"before", b"after"]


def test_idle_without_a_connection_returns_at_once(publisher):
    pub = publisher()
    started = time.monotonic()
    pub.idle(5)  # never connected: nothing to serve
    assert time.monotonic() - started < 1


def test_a_connection_lost_while_idle_is_reopened_quietly(publisher, routed, rabbit_admin, make_record, caplog):
    try:
        subprocess.run(["rabbitmqctl", "-q", "status"], capture_output=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("rabbitmqctl is not usable here")
    exchange, queue = routed
    name = f"contract-{uuid.uuid4().hex[:8]}"
    pub = publisher(connection_name=name)
    assert pub.publish([make_record(exchange, b"before")])[0].outcome is Outcome.DELIVERED
    deadline = time.monotonic() + 30
    while not _close_connections(name):
        assert time.monotonic() < deadline, "the publisher's connection never showed up"
    with caplog.at_level(logging.INFO):
        deadline = time.monotonic() + 30
        while not any("lost while idle" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "idle() did not notice the closed connection"
            pub.idle(0.5)
        result = pub.publish([make_record(exchange, b"after")], timeout=30)[0]
        pub.close()
    assert result.outcome is Outcome.DELIVERED, result.error
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert [body for _, _, body in _drain(rabbit_admin, queue)] == [b"before", b"after"]


def test_empty_topic_fails_instead_of_using_the_default_exchange(publisher, routed, rabbit_admin, make_record):
    """Issue 9, item 8c: an empty topic went through the default exchange to the queue named by the key."""
    exchange, queue = routed
    pub = publisher()
    results = pub.publish([make_record("", b"detour", key=queue), make_record(exchange, b"ok", key="a"),
                           make_record("", b"behind", key=queue)], timeout=30)
    assert results[0].outcome is Outcome.FAILED
    assert (results[0].error or "").startswith("empty exchange name: ")
    assert results[1].outcome is Outcome.DELIVERED
    assert results[2].outcome is Outcome.RETRY and results[2].held  # same key: held behind the failed one
    assert [body for _, _, body in _drain(rabbit_admin, queue)] == [b"ok"]


def test_empty_topic_uses_the_default_exchange_when_allowed(publisher, routed, rabbit_admin, make_record):
    _exchange, queue = routed
    pub = publisher(allow_default_exchange="true")
    assert pub.publish([make_record("", b"direct", key=queue)], timeout=30)[0].outcome is Outcome.DELIVERED
    assert [body for _, _, body in _drain(rabbit_admin, queue)] == [b"direct"]


def test_close_after_the_broker_closed_the_connection_is_quiet(publisher, routed, make_record, caplog):
    try:
        subprocess.run(["rabbitmqctl", "-q", "status"], capture_output=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("rabbitmqctl is not usable here")
    exchange, _queue = routed
    name = f"contract-{uuid.uuid4().hex[:8]}"
    pub = publisher(connection_name=name, heartbeat=1)
    assert pub.publish([make_record(exchange, b"x")])[0].outcome is Outcome.DELIVERED
    deadline = time.monotonic() + 30
    while not _close_connections(name):
        assert time.monotonic() < deadline, "the publisher's connection never showed up"
    with caplog.at_level(logging.INFO):
        pub.close(timeout=5)
        pub.close(timeout=5)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], caplog.text


def test_buffered_frames_go_out_joined_into_few_socket_writes(publisher, routed, rabbit_admin):
    """pika sends each frame (three a message) with its own send(); the publisher joins what is
    buffered before each poll, bounded per chunk, without changing a byte or the order."""
    from outbox.transports.rabbitmq.publisher import _JOIN_BYTES, _coalesce_writes

    exchange, queue = routed
    pub = publisher()
    pub.start()
    transport = pub._conn._transport
    sizes = [10, 50, _JOIN_BYTES + 1000, 20, 30]
    for i, size in enumerate(sizes):
        pub._chan.basic_publish(exchange, "k", bytes([65 + i]) * size)
    frames = list(transport._tx_buffers)
    assert len(frames) >= 3 * len(sizes)
    buffered = transport._tx_buffered_byte_count
    _coalesce_writes(pub._conn)
    chunks = list(transport._tx_buffers)
    assert b"".join(chunks) == b"".join(frames)
    assert transport._tx_buffered_byte_count == buffered
    assert len(chunks) < len(frames) and len(chunks) <= 3
    assert all(len(c) <= _JOIN_BYTES for c in chunks if c not in frames)  # joined chunks stay bounded
    # these publishes are not tracked for confirms (flush() would not wait for them): drive the I/O
    # loop until pika has written them all, then until the broker has queued them
    deadline = time.monotonic() + 10
    assert pub._run_until(lambda: not transport._tx_buffers, deadline)
    while rabbit_admin.queue_declare(queue, passive=True).method.message_count < len(sizes):
        assert time.monotonic() < deadline, "the broker did not queue the five messages within 10 s"
        pub._poll(time.monotonic() + 0.05)
    bodies = [body for _, _, body in _drain(rabbit_admin, queue)]
    assert bodies == [bytes([65 + i]) * size for i, size in enumerate(sizes)]


def test_mixed_sizes_around_the_join_limit_arrive_intact_in_order(publisher, routed, rabbit_admin, make_record):
    from outbox.transports.rabbitmq.publisher import _JOIN_BYTES

    exchange, queue = routed
    sizes = [5, _JOIN_BYTES - 100, 7, _JOIN_BYTES * 2, 1, 3000] * 4
    records = [make_record(exchange, bytes([48 + i % 40]) * size, key="same") for i, size in enumerate(sizes)]
    results = publisher().publish(records, timeout=60)
    assert [r.outcome for r in results] == [Outcome.DELIVERED] * len(records)
    assert [body for _, _, body in _drain(rabbit_admin, queue)] == [r.payload for r in records]
