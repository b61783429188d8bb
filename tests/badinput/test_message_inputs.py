"""Bad-input catalogue, messages: one bad message on a real broker never stalls, crashes or loses.

Each case sends good messages, the bad one(s), and more good messages, all in one ordered lane
(a one-partition Kafka topic, one RabbitMQ queue), runs the real runner and asserts the exact
outcome of the bad message (processed under which id / dead letter with which reason /
duplicate) and that every good message behind it was processed exactly once.

Ids: ``msg-kafka-*`` and ``msg-rabbitmq-*`` (``-mariadb`` when the database is MariaDB, else
PostgreSQL).
"""

from __future__ import annotations

import datetime as dt
import decimal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import sqlalchemy as sa

from consumers import DedupConsumer, KafkaRunner, RabbitMQRunner, declare_queue, list_dead_letters
from consumers.message import id_text
from tests._amqp import queue_depth
from tests.conftest import new_kafka_topic

KAFKA_CONFIG = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500, "topic.metadata.refresh.interval.ms": 1000}

biz = sa.MetaData()
EFFECTS = sa.Table(
    "test_msg_catalogue_effects",
    biz,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("message_id", sa.String(255), nullable=False),
    sa.Column("short", sa.String(10), nullable=True),
)


class Catalogue(DedupConsumer):
    """One effect row per message. ``{"fail": true}`` raises; ``{"short": "..."}`` stores a value
    that may be too long for its column (a data error the database raises inside the handler)."""

    name = "test.msg-catalogue"
    max_attempts = 2
    retry_initial = 0.01
    retry_max = 0.05
    retry_jitter = 0.01

    def handle(self, session, message):
        body = message.body
        if isinstance(body, dict) and body.get("fail"):
            raise RuntimeError("handler failed on purpose")
        short = body.get("short") if isinstance(body, dict) else None
        session.execute(EFFECTS.insert().values(message_id=message.id, short=short))


# ------------------------------------------------------------------ what a case sends and expects


@dataclass
class Msg:
    """One message as sent. Kafka: ``headers`` is a list of (name, bytes); RabbitMQ: ``props`` kwargs."""

    body: bytes = b'{"n": 1}'
    key: bytes | str | None = b"k"
    headers: Any = None
    props: dict[str, Any] = field(default_factory=dict)
    expect: tuple[Any, ...] | None = None
    """("processed", stored id) | ("dead", reason fragment, stored message id or None) | ("duplicate", stored id)"""


def kafka_msg(msg_id: bytes | None, *, expect: tuple[Any, ...], body: bytes = b'{"n": 1}', key: bytes | None = b"k",
              extra: list[tuple[str, bytes]] | None = None, content_type: bytes = b"application/json") -> Msg:
    headers = [("content-type", content_type), *(extra or [])]
    if msg_id is not None:
        headers.append(("message-id", msg_id))
    return Msg(body=body, key=key, headers=headers, expect=expect)


def rabbit_msg(*, expect: tuple[Any, ...], body: bytes = b'{"n": 1}', routing_key: str = "orders.created",
               **props: Any) -> Msg:
    return Msg(body=body, key=routing_key, props={"content_type": "application/json", **props}, expect=expect)


def good_kafka(n: int) -> list[Msg]:
    out = []
    for _ in range(n):
        mid = str(uuid.uuid4())
        out.append(kafka_msg(mid.encode(), expect=("processed", mid)))
    return out


def good_rabbit(n: int) -> list[Msg]:
    out = []
    for _ in range(n):
        mid = str(uuid.uuid4())
        out.append(rabbit_msg(message_id=mid, expect=("processed", mid)))
    return out


def case(area: str, cid: str, what: str, expected: str, bad: list[Msg], dialect: str = "postgresql") -> Any:
    return pytest.param(dialect, bad, id=cid, marks=pytest.mark.catalogue(area=area, input=what, expected=expected))


M300 = b"m" * 300
LONG_KEY = b"K" * 300
HUGE = [(f"h{i}", b"v" * 10_000) for i in range(40)]  # 400 kB of headers

KAFKA_CASES = [
    case("messages (Kafka)", "msg-kafka-long-id", "message-id header of 300 characters",
         "processed under '~h:' + prefix + SHA-256 (was: dead-letter INSERT failed, batch retried forever)",
         [kafka_msg(M300, expect=("processed", id_text(M300)))]),
    case("messages (Kafka)", "msg-kafka-long-id-mariadb", "message-id header of 300 characters (MariaDB)",
         "processed under '~h:' + prefix + SHA-256", [kafka_msg(M300, expect=("processed", id_text(M300)))],
         "mariadb"),
    case("messages (Kafka)", "msg-kafka-two-long-ids", "two 300-character ids sharing their first 299",
         "both processed, under distinct ids",
         [kafka_msg(M300, expect=("processed", id_text(M300))),
          kafka_msg(M300[:-1] + b"n", expect=("processed", id_text(M300[:-1] + b"n")))]),
    case("messages (Kafka)", "msg-kafka-nul-in-id", "NUL in the message-id header",
         "processed as '~x:a%00b' (was: PostgreSQL DataError, batch retried forever)",
         [kafka_msg(b"a\x00b", expect=("processed", "~x:a%00b"))]),
    case("messages (Kafka)", "msg-kafka-non-utf8-ids", "ids b'\\xff-x' and b'\\xfe-x'",
         "both processed, as '~x:%FF-x' and '~x:%FE-x' (was: second dropped as a duplicate)",
         [kafka_msg(b"\xff-x", expect=("processed", "~x:%FF-x")),
          kafka_msg(b"\xfe-x", expect=("processed", "~x:%FE-x"))]),
    case("messages (Kafka)", "msg-kafka-missing-id", "no message-id header",
         "dead letter 'no message id'", [kafka_msg(None, expect=("dead", "no message id", None))]),
    case("messages (Kafka)", "msg-kafka-empty-id", "empty message-id header",
         "dead letter 'no message id'", [kafka_msg(b"", expect=("dead", "no message id", None))]),
    case("messages (Kafka)", "msg-kafka-blank-id", "message-id of three spaces",
         "dead letter 'no message id'", [kafka_msg(b"   ", expect=("dead", "no message id", None))]),
    case("messages (Kafka)", "msg-kafka-long-key-dead", "300-byte key on a message without id",
         "dead letter 'no message id', key stored as '~h:' form (was: INSERT failed, stall)",
         [kafka_msg(None, key=LONG_KEY, expect=("dead", "no message id", None))]),
    case("messages (Kafka)", "msg-kafka-long-key-dead-mariadb", "300-byte key without id (MariaDB, 1406)",
         "dead letter 'no message id'", [kafka_msg(None, key=LONG_KEY, expect=("dead", "no message id", None))],
         "mariadb"),
    case("messages (Kafka)", "msg-kafka-long-key-processed", "300-byte key on a message with an id",
         "processed", [kafka_msg(b"long-key-ok", key=LONG_KEY, expect=("processed", "long-key-ok"))]),
    case("messages (Kafka)", "msg-kafka-non-utf8-key-dead", "key b'\\xff\\x00' without id",
         "dead letter 'no message id', key '~x:%FF%00'",
         [kafka_msg(None, key=b"\xff\x00", expect=("dead", "no message id", None))]),
    case("messages (Kafka)", "msg-kafka-non-json-body", "body '{oops' with content-type application/json",
         "dead letter 'DecodeError' at once",
         [kafka_msg(b"bad-json", body=b"{oops", expect=("dead", "DecodeError", "bad-json"))]),
    case("messages (Kafka)", "msg-kafka-empty-body", "empty body with content-type application/json",
         "dead letter 'DecodeError' at once",
         [kafka_msg(b"empty-json", body=b"", expect=("dead", "DecodeError", "empty-json"))]),
    case("messages (Kafka)", "msg-kafka-huge-headers", "40 headers of 10 kB",
         "processed", [kafka_msg(b"huge-h", extra=HUGE, expect=("processed", "huge-h"))]),
    case("messages (Kafka)", "msg-kafka-huge-headers-dead", "40 headers of 10 kB on a message without id",
         "dead letter 'no message id'", [kafka_msg(None, extra=HUGE, expect=("dead", "no message id", None))]),
    case("messages (Kafka)", "msg-kafka-nul-header-dead", "NUL and non-UTF-8 in header values, no id",
         "dead letter 'no message id', headers escaped (was: PostgreSQL rejects \\u0000 in JSON, stall)",
         [kafka_msg(None, extra=[("x-nul", b"a\x00b"), ("x-bin", b"\xff\xfe")],
                    expect=("dead", "no message id", None))]),
    case("messages (Kafka)", "msg-kafka-long-content-type-dead", "300-character content-type header, no id",
         "dead letter 'no message id' (was: content_type column of 127 overflowed, stall)",
         [kafka_msg(None, content_type=b"application/json;" + b"x" * 300, expect=("dead", "no message id", None))]),
    case("messages (Kafka)", "msg-kafka-long-content-type-dead-mariadb", "300-character content-type, no id (MariaDB)",
         "dead letter 'no message id'",
         [kafka_msg(None, content_type=b"application/json;" + b"x" * 300, expect=("dead", "no message id", None))],
         "mariadb"),
    case("messages (Kafka)", "msg-kafka-handler-raises", "a handler that raises every time",
         "dead letter 'handler failed on purpose' after max_attempts",
         [kafka_msg(b"raises", body=b'{"fail": true}', expect=("dead", "handler failed on purpose", "raises"))]),
    case("messages (Kafka)", "msg-kafka-handler-data-error", "handler writes a value too long for its column",
         "dead letter 'DataError' at once (a data error is permanent for the message)",
         [kafka_msg(b"too-long", body=b'{"short": "' + b"s" * 50 + b'"}', expect=("dead", "DataError", "too-long"))]),
    case("messages (Kafka)", "msg-kafka-handler-data-error-mariadb", "handler value too long (MariaDB 1406)",
         "dead letter 'Data too long' at once",
         [kafka_msg(b"too-long", body=b'{"short": "' + b"s" * 50 + b'"}',
                    expect=("dead", "Data too long", "too-long"))], "mariadb"),
    case("messages (Kafka)", "msg-kafka-duplicate-id", "the same id twice",
         "processed once, then skipped as a duplicate",
         [kafka_msg(b"dup-1", expect=("processed", "dup-1")), kafka_msg(b"dup-1", expect=("duplicate", "dup-1"))]),
    case("messages (Kafka)", "msg-kafka-escape-lookalike-id", "id '~x:%FF-x' next to id b'\\xff-x'",
         "both processed, as '~x:~x:%25FF-x' and '~x:%FF-x'",
         [kafka_msg(b"~x:%FF-x", expect=("processed", "~x:~x:%25FF-x")),
          kafka_msg(b"\xff-x", expect=("processed", "~x:%FF-x"))]),
]

RABBIT_CASES = [
    case("messages (RabbitMQ)", "msg-rabbitmq-long-id-header", "message-id header of 300 characters",
         "processed under '~h:' + prefix + SHA-256 (was: dead-letter INSERT failed, stall)",
         [rabbit_msg(headers={"message-id": "m" * 300}, expect=("processed", id_text("m" * 300)))]),
    case("messages (RabbitMQ)", "msg-rabbitmq-long-id-header-mariadb", "message-id header of 300 characters (MariaDB)",
         "processed under '~h:' form", [rabbit_msg(headers={"message-id": "m" * 300},
                                                   expect=("processed", id_text("m" * 300)))], "mariadb"),
    case("messages (RabbitMQ)", "msg-rabbitmq-nul-in-id", "NUL in properties.message_id",
         "processed as '~x:a%00b' (was: PostgreSQL DataError, stall)",
         [rabbit_msg(message_id="a\x00b", expect=("processed", "~x:a%00b"))]),
    case("messages (RabbitMQ)", "msg-rabbitmq-non-utf8-ids", "message_id b'\\xff-x' and b'\\xfe-x'",
         "both processed, as '~x:%FF-x' and '~x:%FE-x' (was: second dropped)",
         [rabbit_msg(message_id=b"\xff-x", expect=("processed", "~x:%FF-x")),
          rabbit_msg(message_id=b"\xfe-x", expect=("processed", "~x:%FE-x"))]),
    case("messages (RabbitMQ)", "msg-rabbitmq-missing-id", "no message_id, no header",
         "dead letter 'no message id'", [rabbit_msg(expect=("dead", "no message id", None))]),
    case("messages (RabbitMQ)", "msg-rabbitmq-empty-id", "message_id ''",
         "dead letter 'no message id'", [rabbit_msg(message_id="", expect=("dead", "no message id", None))]),
    case("messages (RabbitMQ)", "msg-rabbitmq-int-id-header", "message-id header that is an int (42)",
         "processed as '42'", [rabbit_msg(headers={"message-id": 42}, expect=("processed", "42"))]),
    case("messages (RabbitMQ)", "msg-rabbitmq-non-json-body", "body '{oops' with content_type application/json",
         "dead letter 'DecodeError' at once",
         [rabbit_msg(message_id="bad-json", body=b"{oops", expect=("dead", "DecodeError", "bad-json"))]),
    case("messages (RabbitMQ)", "msg-rabbitmq-odd-header-types",
         "headers of type int, long, bool, Decimal, datetime, table, array, None, bytes",
         "processed", [rabbit_msg(message_id="odd-h", expect=("processed", "odd-h"), headers={
             "i": 1, "big": 2**40, "b": True, "d": decimal.Decimal("1.25"), "t": dt.datetime(2026, 1, 1, 12, 0),
             "tbl": {"a": 1, "b": "x"}, "arr": [1, "x", None], "none": None, "bytes": b"\xff\x00"})]),
    case("messages (RabbitMQ)", "msg-rabbitmq-odd-header-types-dead", "odd header types on a message without id",
         "dead letter 'no message id', headers stored as text", [rabbit_msg(expect=("dead", "no message id", None),
                                                                         headers={
             "i": 1, "d": decimal.Decimal("1.25"), "t": dt.datetime(2026, 1, 1), "tbl": {"nul": "a\x00b"},
             "arr": [b"\xff"], "bytes": b"\x00"})]),
    case("messages (RabbitMQ)", "msg-rabbitmq-huge-headers-dead", "10 headers of 10 kB, no id",
         "dead letter 'no message id'",
         [rabbit_msg(expect=("dead", "no message id", None), headers={f"h{i}": "v" * 10_000 for i in range(10)})]),
    case("messages (RabbitMQ)", "msg-rabbitmq-long-content-type-dead", "content_type of 250 characters, no id",
         "dead letter 'no message id' (was: content_type column of 127 overflowed, stall)",
         [rabbit_msg(expect=("dead", "no message id", None), content_type="application/json;" + "x" * 230)]),
    case("messages (RabbitMQ)", "msg-rabbitmq-nul-routing-key-dead", "NUL in the routing key, no id",
         "dead letter 'no message id', key escaped",
         [rabbit_msg(expect=("dead", "no message id", None), routing_key="orders.\x00")]),
    case("messages (RabbitMQ)", "msg-rabbitmq-handler-raises", "a handler that raises every time",
         "dead letter 'handler failed on purpose' after max_attempts",
         [rabbit_msg(message_id="raises", body=b'{"fail": true}',
                     expect=("dead", "handler failed on purpose", "raises"))]),
    case("messages (RabbitMQ)", "msg-rabbitmq-handler-data-error", "handler writes a value too long for its column",
         "dead letter 'DataError' at once",
         [rabbit_msg(message_id="too-long", body=b'{"short": "' + b"s" * 50 + b'"}',
                     expect=("dead", "DataError", "too-long"))]),
    case("messages (RabbitMQ)", "msg-rabbitmq-duplicate-id", "the same message_id twice",
         "processed once, then skipped as a duplicate",
         [rabbit_msg(message_id="dup-1", expect=("processed", "dup-1")),
          rabbit_msg(message_id="dup-1", expect=("duplicate", "dup-1"))]),
]


# ------------------------------------------------------------------ fixtures and checks


@pytest.fixture
def effects(engine: sa.Engine) -> Iterator[sa.Table]:
    biz.create_all(engine)
    with engine.begin() as c:
        c.execute(EFFECTS.delete())
    yield EFFECTS
    with engine.begin() as c:
        c.execute(EFFECTS.delete())


def effect_ids(engine: sa.Engine) -> list[str]:
    with engine.connect() as c:
        return list(c.execute(sa.select(EFFECTS.c.message_id).order_by(EFFECTS.c.id)).scalars())


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def check(engine: sa.Engine, sent: list[Msg], stats: Any, *, primer: str) -> None:
    """Every expectation holds, nothing else was dead-lettered, nothing processed twice."""
    done = [i for i in effect_ids(engine) if i != primer]
    dead = list_dead_letters(engine)
    want_effects = [m.expect[1] for m in sent if m.expect and m.expect[0] == "processed"]
    assert sorted(done) == sorted(want_effects), (done, want_effects)
    want_dead = sorted(((m.expect[2] or ""), m.expect[1]) for m in sent if m.expect and m.expect[0] == "dead")
    got_dead = sorted(((d["message_id"] or ""), d["error"], d["attempts"]) for d in dead)
    assert len(got_dead) == len(want_dead), got_dead
    for (want_id, fragment), (got_id, error, attempts) in zip(want_dead, got_dead, strict=True):
        assert got_id == want_id and fragment in error, (got_id, error)
        # retried up to max_attempts only when another try could help (not for data or decode errors)
        assert attempts == (Catalogue.max_attempts if "on purpose" in fragment else 1), (got_id, error, attempts)
    for d in dead:
        assert len(d["topic"]) <= 249 and (d["key"] is None or len(d["key"]) <= 255)
    dups = sum(1 for m in sent if m.expect and m.expect[0] == "duplicate")
    assert stats.duplicates >= dups


def thread_run(runner: Any) -> Any:
    import threading

    errors: list[BaseException] = []

    def go() -> None:
        try:
            runner.run()
        except BaseException as exc:  # pragma: no cover - re-raised below
            errors.append(exc)

    t = threading.Thread(target=go, daemon=True)
    t.start()

    def stop() -> None:
        runner.stop()
        t.join(60)
        assert not t.is_alive(), "runner did not stop"
        if errors:
            raise errors[0]

    return stop


# ------------------------------------------------------------------ Kafka


@pytest.fixture
def one_partition_topic(kafka_bootstrap: str) -> Iterator[str]:
    with new_kafka_topic(kafka_bootstrap, "badmsg") as name:
        yield name


@pytest.mark.kafka
@pytest.mark.parametrize("dialect_name, bad", KAFKA_CASES, indirect=["dialect_name"])
def test_kafka_bad_message(dialect_name, bad, engine, effects, kafka_bootstrap, one_partition_topic):
    from confluent_kafka import Producer

    primer = str(uuid.uuid4())  # tansu can drop a partition's first record: nothing is asserted about this one
    sent = [*good_kafka(2), *bad, *good_kafka(3)]
    p = Producer({"bootstrap.servers": kafka_bootstrap, "message.max.bytes": 2_000_000})
    for m in [kafka_msg(primer.encode(), expect=("processed", primer)), *sent]:
        p.produce(one_partition_topic, value=m.body, key=m.key, headers=m.headers)
    assert p.flush(30) == 0
    runner = KafkaRunner(Catalogue(), engine=engine, bootstrap_servers=kafka_bootstrap, topics=[one_partition_topic],
                         group_id=f"g-{uuid.uuid4().hex[:8]}", config=KAFKA_CONFIG, batch_size=4,
                         batch_timeout=0.2, requeue_interval=None)
    last = sent[-1].expect[1]  # type: ignore[index]
    stop = thread_run(runner)
    try:
        wait_for(lambda: last in effect_ids(engine), 90, "the last good message behind the bad one")
    finally:
        stop()
    check(engine, sent, runner.stats, primer=primer)


# ------------------------------------------------------------------ RabbitMQ


@pytest.mark.rabbitmq
@pytest.mark.parametrize("dialect_name, bad", RABBIT_CASES, indirect=["dialect_name"])
def test_rabbitmq_bad_message(dialect_name, bad, engine, effects, rabbitmq_url, amqp_names):
    import pika

    declare_queue(rabbitmq_url, amqp_names["queue"], exchange=amqp_names["exchange"],
                  dead_letter_exchange=amqp_names["dlx"], dead_letter_queue=amqp_names["dlq"])
    sent = [*good_rabbit(2), *bad, *good_rabbit(3)]
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    ch = conn.channel()
    ch.confirm_delivery()
    for m in sent:
        props = dict(m.props)
        if m.headers is not None:
            props["headers"] = m.headers
        ch.basic_publish(amqp_names["exchange"], str(m.key), m.body, pika.BasicProperties(delivery_mode=2, **props))
    conn.close()
    runner = RabbitMQRunner(Catalogue(), engine=engine, url=rabbitmq_url, queue=amqp_names["queue"], batch_size=4,
                            batch_timeout=0.2, requeue_interval=None)
    last = sent[-1].expect[1]  # type: ignore[index]
    stop = thread_run(runner)
    try:
        wait_for(lambda: last in effect_ids(engine) and queue_depth(rabbitmq_url, amqp_names["queue"]) == 0, 90,
                 "the last good message behind the bad one, and an empty queue")
    finally:
        stop()
    check(engine, sent, runner.stats, primer="")
    n_dead = sum(1 for m in sent if m.expect and m.expect[0] == "dead")
    wait_for(lambda: queue_depth(rabbitmq_url, amqp_names["dlq"]) == n_dead, 30, "the dead messages in the DLQ")


def test_catalogue_case_ids_are_prefixed() -> None:
    for p in (*KAFKA_CASES, *RABBIT_CASES):
        assert p.id.startswith(("msg-kafka-", "msg-rabbitmq-")), p.id
    assert len({p.id for p in (*KAFKA_CASES, *RABBIT_CASES)}) == len(KAFKA_CASES) + len(RABBIT_CASES)
