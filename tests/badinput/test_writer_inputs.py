"""Bad-input catalogue, writer: every bad value raises its own ``MessageError`` at ``add()``.

Each case runs on PostgreSQL (the strictest of the three databases about text): the error is of
the exact class and names the problem, nothing reached the session, and the business transaction
the bad call happened in still commits, with a valid message added after the error.
A few cases are errors at flush (a forgotten ``outbox db upgrade``, an id committed earlier); they
run on all three databases.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from outbox import (
    ConfigurationError,
    InvalidDeliveryTime,
    InvalidHeaders,
    InvalidKey,
    InvalidMessageId,
    InvalidTopic,
    MessageError,
    Outbox,
    OutgoingMessage,
    PayloadTooLarge,
    SchemaMissing,
    SerializationError,
    default_tables,
)

biz = sa.MetaData()
orders = sa.Table("badinput_orders", biz, sa.Column("id", sa.Integer, primary_key=True, autoincrement=False))
T = default_tables().outbox
MID = uuid.UUID("0190a5a4-0000-7000-8000-000000000001")
UTC = dt.timezone.utc


def _empty(engine: sa.Engine) -> None:
    with engine.begin() as c:
        c.execute(T.delete())
        c.execute(orders.delete())


@pytest.fixture
def pg(_migrated_engines: dict[str, sa.Engine]) -> Iterator[sa.Engine]:
    engine = _migrated_engines["postgresql"]
    biz.create_all(engine)
    _empty(engine)
    yield engine
    _empty(engine)


@pytest.fixture
def business(engine: sa.Engine) -> Iterator[sa.Engine]:
    biz.create_all(engine)
    _empty(engine)
    yield engine
    _empty(engine)


def counts(engine: sa.Engine) -> tuple[int, int]:
    with engine.connect() as c:
        return (c.execute(sa.select(sa.func.count()).select_from(orders)).scalar_one(),
                c.execute(sa.select(sa.func.count()).select_from(T)).scalar_one())


def case(cid: str, what: str, call: Callable[[Outbox, Session], Any], error: type[Exception], fragment: str,
         *, outbox: dict[str, Any] | None = None, setup: Callable[[Outbox, Session], Any] | None = None) -> Any:
    return pytest.param(outbox or {}, setup, call, error, fragment, id=cid,
                        marks=pytest.mark.catalogue(area="writer", input=what,
                                                    expected=f"{error.__name__}: {fragment!r}"))


def add(**kw: Any) -> Callable[[Outbox, Session], Any]:
    args = {"topic": "t", "payload": b"ok", **kw}
    return lambda box, s: box.add(s, args.pop("topic"), args.pop("payload"), **args)


def add_many(*msgs: Any) -> Callable[[Outbox, Session], Any]:
    return lambda box, s: box.add_many(s, list(msgs))


def first_with(mid: uuid.UUID) -> Callable[[Outbox, Session], Any]:
    return lambda box, s: box.add(s, "t", b"first", message_id=mid)


WHEN = dt.datetime(2030, 1, 1, tzinfo=UTC)

MESSAGE_CASES = [
    # NUL and lone surrogates: PostgreSQL rejects them at commit (DataError), and so the whole transaction
    case("writer-nul-in-key", "NUL in key", add(key="a\x00b"), InvalidKey, "NUL"),
    case("writer-surrogate-in-key", "lone surrogate in key", add(key="k\ud800"), InvalidKey, "lone surrogate"),
    case("writer-nul-in-header-name", "NUL in a header name", add(headers={"h\x00": "v"}), InvalidHeaders, "NUL"),
    case("writer-nul-in-header-value", "NUL in a header value", add(headers={"h": "v\x00"}), InvalidHeaders, "NUL"),
    case("writer-surrogate-in-header-value", "lone surrogate in a header value", add(headers={"h": "\udc80"}),
         InvalidHeaders, "lone surrogate"),
    case("writer-surrogate-in-header-name", "lone surrogate in a header name", add(headers={"\ud800h": "v"}),
         InvalidHeaders, "lone surrogate"),
    case("writer-nul-in-content-type", "NUL in content_type", add(content_type="text/plain\x00"),
         InvalidHeaders, "content_type contains NUL"),
    case("writer-surrogate-in-content-type", "lone surrogate in content_type", add(content_type="t/\ud800"),
         InvalidHeaders, "lone surrogate"),
    case("writer-surrogate-in-str-payload", "lone surrogate in a str payload", add(payload="x\ud800"),
         SerializationError, "lone surrogate"),
    case("writer-surrogate-in-json-payload", "lone surrogate inside JSON data", add(payload={"a": "\udcff"}),
         SerializationError, "lone surrogate"),
    case("writer-nul-in-topic-custom-pattern", "NUL in topic (custom topic_pattern '.+')", add(topic="a\x00b"),
         InvalidTopic, "NUL", outbox={"topic_pattern": ".+"}),
    # lengths of the String(N) columns and the brokers' limits
    case("writer-topic-too-long-custom-pattern", "300-character topic with a custom topic_pattern",
         add(topic="t" * 300), InvalidTopic, "over the limit of 249: the outbox table's topic column is VARCHAR(249)",
         outbox={"topic_pattern": r"\w+"}),
    case("writer-topic-too-long", "250-character topic", add(topic="x" * 250), InvalidTopic, "at most 249"),
    case("writer-topic-illegal-chars", "topic 'bad topic!'", add(topic="bad topic!"), InvalidTopic, "bad topic!"),
    case("writer-topic-empty", "empty topic", add(topic=""), InvalidTopic, "not a valid topic"),
    case("writer-topic-not-str", "topic of type bytes", add(topic=b"orders"), InvalidTopic, "must be a str"),
    case("writer-key-too-long", "300-character key", add(key="k" * 300), InvalidKey, "1-255 UTF-8 bytes"),
    case("writer-key-multibyte-too-long", "200 x 'é' key (400 bytes)", add(key="é" * 200), InvalidKey,
         "got 400 bytes"),
    case("writer-key-empty", "empty key", add(key=""), InvalidKey, "1-255"),
    case("writer-key-not-str", "int key", add(key=42), InvalidKey, "int"),
    case("writer-header-name-too-long", "256-byte header name", add(headers={"h" * 256: "v"}), InvalidHeaders,
         "over the limit of 255"),
    case("writer-headers-too-large", "70,000 bytes of headers", add(headers={"h": "v" * 70_000}), InvalidHeaders,
         "over the limit of 65,536"),
    case("writer-header-value-not-str", "int header value (not JSON-text)", add(headers={"a": 1}), InvalidHeaders,
         "'a' must have a str value"),
    case("writer-header-value-none", "None header value", add(headers={"a": None}), InvalidHeaders, "NoneType"),
    case("writer-header-name-not-str", "int header name", add(headers={1: "a"}), InvalidHeaders, "int"),
    case("writer-headers-not-mapping", "headers as a list", add(headers=["a"]), InvalidHeaders, "mapping"),
    case("writer-content-type-too-long", "128-character content_type", add(content_type="x" * 128), InvalidHeaders,
         "at most 127 characters"),
    case("writer-content-type-not-str", "content_type of type int", add(content_type=5), InvalidHeaders,
         "content_type must be a str"),
    # sizes: payload + key + headers against max_payload_bytes (default 1,000,000: librdkafka's message.max.bytes)
    case("writer-payload-over-default-limit", "1,000,001-byte payload", add(payload=b"x" * 1_000_001),
         PayloadTooLarge, "over the limit of 1,000,000 bytes"),
    case("writer-payload-plus-key-over-limit", "payload 999,990 bytes + 20-byte key",
         add(payload=b"x" * 999_990, key="k" * 20), PayloadTooLarge, "payload 999,990 + key 20 + headers 0"),
    case("writer-payload-plus-headers-over-limit", "payload 999,999 bytes + header 'h: v'",
         add(payload=b"x" * 999_999, headers={"h": "v"}), PayloadTooLarge, "Outbox(max_payload_bytes=N)"),
    case("writer-payload-over-custom-limit", "2,000-byte payload, max_payload_bytes=1000", add(payload=b"x" * 2000),
         PayloadTooLarge, "2,000 bytes", outbox={"max_payload_bytes": 1000}),
    case("writer-default-headers-count-toward-limit", "default_headers push a 999,995-byte payload over the limit",
         add(payload=b"x" * 999_995), PayloadTooLarge, "headers 12",
         outbox={"default_headers": {"trace": "abcdefg"}}),
    # payloads
    case("writer-payload-set", "a set payload", add(payload={1, 2}), SerializationError, "set"),
    case("writer-payload-object", "an object() payload", add(payload=object()), SerializationError, "object"),
    case("writer-payload-nan", "float NaN in JSON data", add(payload={"x": math.nan}), SerializationError,
         "Out of range float"),
    # message ids
    case("writer-message-id-not-uuid", "message_id 'nope'", add(message_id="nope"), InvalidMessageId, "nope"),
    case("writer-message-id-int", "message_id of type int", add(message_id=7), InvalidMessageId, "int"),
    case("writer-message-id-nul", "message_id with NUL", add(message_id=str(MID) + "\x00"), InvalidMessageId,
         "UUID"),
    case("writer-duplicate-id-in-transaction", "same message_id added twice in one transaction",
         add(message_id=MID), InvalidMessageId, f"message_id {MID} was already added", setup=first_with(MID)),
    case("writer-duplicate-id-in-add-many", "same message_id twice in one add_many",
         add_many({"topic": "t", "payload": 1, "message_id": MID},
                  {"topic": "t", "payload": 2, "message_id": str(MID)}),
         InvalidMessageId, "message #1: message_id"),
    case("writer-add-many-after-add-same-id", "add_many repeats an id add() already added",
         add_many(OutgoingMessage("t", 1), OutgoingMessage("t", 2, message_id=MID)), InvalidMessageId,
         "message #1: message_id", setup=first_with(MID)),
    case("writer-add-many-bad-entry", "add_many with an int entry", add_many(5), MessageError,
         "expected an OutgoingMessage or a mapping"),
    case("writer-add-many-unknown-field", "add_many mapping with a misspelt field", add_many({"topik": "t"}),
         MessageError, "topik"),
    # delivery times
    case("writer-delay-inf", "delay=inf", add(delay=math.inf), InvalidDeliveryTime, "finite"),
    case("writer-delay-nan", "delay=nan", add(delay=math.nan), InvalidDeliveryTime, "finite"),
    case("writer-delay-huge-int", "delay=10**400 (overflows float)", add(delay=10**400), InvalidDeliveryTime,
         "finite"),
    case("writer-delay-timedelta-max", "delay=timedelta.max", add(delay=dt.timedelta.max), InvalidDeliveryTime,
         "after 9999-12-31"),
    case("writer-delay-1e300", "delay=1e300 seconds", add(delay=1e300), InvalidDeliveryTime, "after 9999-12-31"),
    case("writer-delay-negative", "delay=-1", add(delay=-1), InvalidDeliveryTime, "negative"),
    case("writer-delay-negative-timedelta", "delay=timedelta(seconds=-1)", add(delay=dt.timedelta(seconds=-1)),
         InvalidDeliveryTime, "negative"),
    case("writer-delay-bool", "delay=True", add(delay=True), InvalidDeliveryTime, "bool"),
    case("writer-deliver-at-overflows-utc", "deliver_at 9999-12-31T23:00-05:00 (past year 9999 in UTC)",
         add(deliver_at=dt.datetime(9999, 12, 31, 23, tzinfo=dt.timezone(dt.timedelta(hours=-5)))),
         InvalidDeliveryTime, "cannot be expressed in UTC"),
    case("writer-deliver-at-naive", "naive deliver_at", add(deliver_at=dt.datetime(2030, 1, 1)), InvalidDeliveryTime,
         "naive"),
    case("writer-deliver-at-past", "deliver_at in 2001", add(deliver_at=dt.datetime(2001, 1, 1, tzinfo=UTC)),
         InvalidDeliveryTime, "in the past"),
    case("writer-deliver-at-not-datetime", "deliver_at as an ISO string", add(deliver_at="2030-01-01T00:00Z"),
         InvalidDeliveryTime, "must be a datetime"),
    case("writer-delay-and-deliver-at", "both delay and deliver_at", add(delay=1, deliver_at=WHEN),
         InvalidDeliveryTime, "not both"),
]


@pytest.mark.parametrize(("outbox_kwargs", "setup", "call", "error", "fragment"), MESSAGE_CASES)
def test_writer_rejects_at_add_and_the_transaction_commits(
    pg: sa.Engine, outbox_kwargs: dict[str, Any], setup: Any, call: Any, error: type[Exception], fragment: str
) -> None:
    box = Outbox(**outbox_kwargs)
    with Session(pg) as s, s.begin():
        s.execute(orders.insert().values(id=1))
        if setup is not None:
            setup(box, s)
        pending = set(s.new)
        with pytest.raises(MessageError) as info:
            call(box, s)
        assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
        assert fragment in str(info.value)
        assert set(s.new) == pending, "a rejected message must not reach the session"
        box.add(s, "t", b"fine", key="k", headers={"h": "v"})  # the session is still usable
        expected_rows = len(s.new)
    assert counts(pg) == (1, expected_rows)  # the business row and the valid messages committed


def config(cid: str, kwargs: dict[str, Any], fragment: str, *, what: str | None = None) -> Any:
    return pytest.param(kwargs, fragment, id=cid, marks=pytest.mark.catalogue(
        area="writer", input=what or f"Outbox({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"[:80],
        expected=f"ConfigurationError: {fragment!r}"))


@pytest.mark.parametrize(("kwargs", "fragment"), [
    config("writer-config-partitions-bool", {"partitions": True}, "partitions must be an int"),
    config("writer-config-partitions-zero", {"partitions": 0}, "between 1 and 32767"),
    config("writer-config-partitions-float", {"partitions": 8.0}, "partitions must be an int"),
    config("writer-config-max-payload-bool", {"max_payload_bytes": True}, "max_payload_bytes must be an int"),
    config("writer-config-max-payload-negative", {"max_payload_bytes": -1}, "max_payload_bytes"),
    config("writer-config-max-payload-over-librdkafka", {"max_payload_bytes": 2_000_000_000}, "1,000,000,000"),
    config("writer-config-tables-str", {"tables": "str"}, "tables must be an outbox.OutboxTables"),
    config("writer-config-topic-pattern-bad-regex", {"topic_pattern": "("}, "not a valid regex"),
    config("writer-config-topic-pattern-not-str", {"topic_pattern": 5}, "topic_pattern must be a regex str"),
    config("writer-config-naive-datetimes", {"naive_datetimes": "local"}, "'reject' or 'utc'"),
    config("writer-config-notify-str", {"notify": "yes"}, "notify must be True or False"),
    config("writer-config-allow-past-int", {"allow_past_deliver_at": 1}, "allow_past_deliver_at must be True or False"),
    config("writer-config-serializer-bad", {"serializer": object()}, "no serialize/deserialize",
           what="Outbox(serializer=object())"),  # not its repr: the address would change the doc every run
    config("writer-config-default-headers-nul", {"default_headers": {"h": "\x00"}}, "default_headers: header 'h'"),
])
def test_writer_configuration_rejected(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Outbox(**kwargs)
    assert type(info.value) is ConfigurationError, f"{type(info.value).__name__}: {info.value}"
    assert fragment in str(info.value)


def _flush_case(cid: str, values: Any, what: str, expected: str) -> Any:
    values = values if isinstance(values, tuple) else (values,)
    return pytest.param(*values, id=cid, marks=pytest.mark.catalogue(area="writer", input=what, expected=expected))


@pytest.mark.parametrize("dialect_name", [
    _flush_case(f"writer-duplicate-committed-id-{d}", d, f"message_id committed earlier, added again ({d})",
                "InvalidMessageId at flush: 'already in the outbox table'")
    for d in ("sqlite", "postgresql", "mariadb")
], indirect=True)
def test_duplicate_of_a_committed_id_is_explained_at_flush(business: sa.Engine, dialect_name: str) -> None:
    box = Outbox()
    with Session(business) as s, s.begin():
        box.add(s, "t", b"1", message_id=MID)
    with Session(business) as s:
        s.execute(orders.insert().values(id=2))
        box.add(s, "t", b"2", message_id=MID)  # not knowable at add(): the id is in the table, not the session
        with pytest.raises(InvalidMessageId, match="already in the outbox table 'outbox_messages'") as info:
            s.commit()
        assert isinstance(info.value.__cause__, Exception) and "message_id" in str(info.value.__cause__)
        assert MID.hex in str(info.value).replace("-", "")
        s.rollback()
        s.execute(orders.insert().values(id=3))  # the session is usable again
        box.add(s, "t", b"3")
        s.commit()
    assert counts(business) == (1, 2)


DIALECTS_ASYNC = [("sqlite", False), ("postgresql", False), ("mariadb", False), ("sqlite", True), ("postgresql", True)]


@pytest.mark.parametrize(("dialect_name", "use_async"), [
    _flush_case(f"writer-schema-missing-{'async-' if a else ''}{d}", (d, a), f"no `outbox db upgrade` ({d}, "
                f"{'AsyncSession' if a else 'Session'})", "SchemaMissing at flush: 'run `outbox db upgrade --db URL`'")
    for d, a in DIALECTS_ASYNC
], indirect=["dialect_name"])
def test_forgotten_db_upgrade_says_what_to_do(fresh_database: str, dialect_name: str, use_async: bool) -> None:
    url = fresh_database
    if dialect_name == "postgresql":  # a password, to see it masked
        url = url.replace("postgres@", "postgres:S3cretPW@", 1)
    box = Outbox()
    if use_async:
        aurl = url.replace("sqlite:", "sqlite+aiosqlite:", 1)

        async def run() -> BaseException:
            aeng = create_async_engine(aurl)
            try:
                async with AsyncSession(aeng) as s:
                    box.add(s, "orders.placed", {"n": 1})
                    try:
                        await s.commit()
                    except Exception as exc:
                        return exc
                    raise AssertionError("commit succeeded without tables")
            finally:
                await aeng.dispose()

        err = asyncio.run(run())
    else:
        eng = sa.create_engine(url, poolclass=sa.pool.NullPool)
        try:
            with Session(eng) as s:
                box.add(s, "orders.placed", {"n": 1})
                with pytest.raises(Exception) as info:
                    s.commit()
                err = info.value
        finally:
            eng.dispose()
    assert type(err) is SchemaMissing, f"{type(err).__name__}: {err}"
    text = str(err)
    assert "'outbox_messages' does not exist" in text and "run `outbox db upgrade --db URL`" in text
    assert "S3cretPW" not in text and "[SQL:" not in text
    assert err.__cause__ is not None  # chained to the driver's error


MYSQL_ADMIN = os.environ.get("OUTBOX_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")


@pytest.fixture(scope="module")
def latin1_mariadb() -> Iterator[sa.Engine]:
    """A MariaDB database whose default character set is latin1, as some servers are configured."""
    from outbox import migrations

    name = f"okw_latin1_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(MYSQL_ADMIN, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as c:
        c.execute(sa.text(f"CREATE DATABASE `{name}` CHARACTER SET latin1"))
    engine = sa.create_engine(sa.engine.make_url(MYSQL_ADMIN).set(database=name), poolclass=sa.pool.NullPool)
    try:
        migrations.upgrade(engine)
        biz.create_all(engine)
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as c:
            c.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()


@pytest.mark.parametrize(("field", "kwargs"), [
    pytest.param(f, kw, id=f"writer-mariadb-latin1-{f}", marks=pytest.mark.catalogue(
        area="writer", input=f"{f} outside latin1 on a MariaDB database that is not utf8mb4",
        expected="stored as given: topic and key columns are utf8mb4 (binary, NO PAD) on every database"))
    for f, kw in [("key", {"key": "日本"}), ("topic", {"topic": "tópico-😀"})]
])
def test_topic_and_key_are_utf8mb4_whatever_the_database_charset(
    latin1_mariadb: sa.Engine, field: str, kwargs: dict[str, Any]
) -> None:
    box = Outbox(topic_pattern=".+")
    args = {"topic": "t", **kwargs}
    with Session(latin1_mariadb) as s:
        s.execute(orders.insert().values(id=1))
        box.add(s, args.pop("topic"), b"x", **args)
        s.commit()
    with latin1_mariadb.connect() as c:
        assert c.execute(sa.select(T.c[field])).scalar_one() == kwargs[field]
    _empty(latin1_mariadb)


@pytest.mark.parametrize(("field", "kwargs", "error"), [
    pytest.param(f, kw, err, id=f"writer-mariadb-latin1-{f}", marks=pytest.mark.catalogue(
        area="writer", input=f"{f} outside latin1 on a MariaDB outbox table that is not utf8mb4",
        expected=f"{err.__name__} at flush: 'ALTER TABLE ... MODIFY {f} ... CHARACTER SET utf8mb4'"))
    for f, kw, err in [("content_type", {"content_type": "text/😀"}, InvalidHeaders)]
])
def test_text_the_table_charset_cannot_hold_is_explained_at_flush(
    latin1_mariadb: sa.Engine, field: str, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    box = Outbox(topic_pattern=".+")
    args = {"topic": "t", **kwargs}
    with Session(latin1_mariadb) as s:
        s.execute(orders.insert().values(id=1))
        box.add(s, args.pop("topic"), b"x", **args)  # valid Unicode: only the table's character set refuses it
        with pytest.raises(MessageError) as info:
            s.commit()
        assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
        assert f"outbox_messages.{field} is not utf8mb4" in str(info.value)
        assert "[SQL:" not in str(info.value)
        advice = str(info.value).split("Convert the column once (")[1].split(") and create databases")[0]
        assert advice.startswith(f"ALTER TABLE outbox_messages MODIFY {field} ") and "CHARACTER SET utf8mb4" in advice
        s.rollback()
        s.execute(orders.insert().values(id=1))
        box.add(s, "t", b"fine", key="plain")
        s.commit()
    assert counts(latin1_mariadb) == (1, 1)
    _empty(latin1_mariadb)


def test_the_advised_column_conversion_works_and_keeps_ids_exact(latin1_mariadb: sa.Engine) -> None:
    """The statement the error advises is run as given: the value then fits, and the id and key columns
    keep their binary NO PAD collation (CONVERT TO CHARACTER SET would reset it to a case-folding one)."""
    from outbox._sqlerrors import _utf8mb4_column

    def collations() -> dict[str, str]:
        with latin1_mariadb.connect() as c:
            return dict(c.execute(sa.text(
                "SELECT COLUMN_NAME, COLLATION_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = "
                "DATABASE() AND TABLE_NAME = 'outbox_messages' AND COLLATION_NAME IS NOT NULL")).all())

    before = collations()
    assert before["key"] == before["topic"] == "utf8mb4_nopad_bin" and before["content_type"].startswith("latin1")
    try:
        with latin1_mariadb.begin() as c:
            c.exec_driver_sql(_utf8mb4_column("outbox_messages", "content_type"))
        after = collations()
        assert after["content_type"].startswith("utf8mb4_") and after["key"] == after["topic"] == "utf8mb4_nopad_bin"
        box = Outbox(topic_pattern=".+")
        with Session(latin1_mariadb) as s:
            s.execute(orders.insert().values(id=1))
            box.add(s, "t", b"x", key="K", content_type="text/😀")
            box.add(s, "t", b"y", key="k")
            s.commit()
        with latin1_mariadb.connect() as c:
            assert c.execute(sa.select(T.c.key).where(T.c.key == "k")).scalars().all() == ["k"]
    finally:  # the module's database stays latin1 for the other tests
        _empty(latin1_mariadb)
        with latin1_mariadb.begin() as c:
            c.exec_driver_sql("ALTER TABLE outbox_messages MODIFY content_type VARCHAR(127) CHARACTER SET latin1")
