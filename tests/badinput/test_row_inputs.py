"""Bad-input catalogue, area ``row``: outbox rows corrupted by hand (SQL) or by a bad migration.

Each case commits six good messages (one key each), corrupts one of them with raw SQL, runs the
relay and checks the exact outcome: the corrupted row is ``dead`` with a reason naming the row
and the problem (or, where the value is harmless, delivered), and every other row was delivered.
The relay never crashes on a row. Most cases run on SQLite, whose dynamic typing lets any value
into any column; some run on the database where that corruption is possible.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Outbox, OutgoingMessage, default_tables
from outbox.brokers.memory import MemoryPublisher
from outbox.config import RelayConfig
from outbox.relay import Relay
from tests.conftest import truncate_all

T = default_tables().outbox
FAST = {"min_poll_interval": 0.01, "poll_interval": 0.05, "backoff_initial": 0.05, "backoff_max": 0.2,
        "progress_interval": 0, "lease_ttl": 3.0}
BAD = 2  # index of the corrupted row among the six
DELIVERED = "delivered"
BAD_TIME = "created_at must be a date and time between the years 1 and 9999, got "


def case(cid: str, set_sql: str, expected: str, what: str, *, dialect: str = "sqlite",
         params: dict[str, object] | None = None) -> object:
    shown = f"dead: {expected}" if expected != DELIVERED else "delivered; the other rows delivered"
    return pytest.param(dialect, set_sql, params or {}, expected, id=f"row-{cid}",
                        marks=pytest.mark.catalogue(area="row", input=f"{what} ({dialect}: SET {set_sql})",
                                                    expected=shown))


CASES = [
    case("headers-json-string", "headers = '\"x\"'",
         "headers must be a JSON object of strings, got a JSON string", "headers a JSON string"),
    case("headers-json-array", "headers = '[\"a\", \"b\"]'",
         "headers must be a JSON object of strings, got a JSON array", "headers a JSON array"),
    case("headers-json-number", "headers = '42'",
         "headers must be a JSON object of strings, got a JSON number", "headers a JSON number"),
    case("headers-nested-object", "headers = '{\"a\": {\"b\": \"c\"}}'",
         "got a JSON object for header 'a'", "a header value that is an object"),
    case("headers-number-value", "headers = '{\"retries\": 3}'",
         "got a JSON number for header 'retries'", "a header value that is a number"),
    case("headers-invalid-json", "headers = 'not json {'",
         "headers must be a JSON object of strings, got invalid JSON", "headers text that is not JSON"),
    case("headers-json-null", "headers = 'null'", DELIVERED, "headers JSON null (means no headers)"),
    case("headers-sql-null", "headers = NULL", DELIVERED, "headers SQL NULL"),
    case("headers-unicode", "headers = '{\"\u00fcber\": \"\u2713\"}'", DELIVERED, "non-ASCII header name and value"),
    case("message-id-not-uuid", "message_id = 'not-a-uuid'", "message_id must be a UUID, got 'not-a-uuid'",
         "message_id that is not a UUID"),
    case("message-id-dashed", "message_id = :mid", DELIVERED, "message_id in dashed UUID form",
         params={"mid": str(uuid.uuid4())}),
    case("payload-text", "payload = 'plain text'", "payload must be binary data, got text", "payload stored as TEXT"),
    case("topic-empty", "topic = ''", "topic must be non-empty text, got an empty topic", "empty topic"),
    case("topic-blank", "topic = '   '", "topic must be non-empty text, got an empty topic", "blank topic"),
    case("key-blob", "key = X'00FF'", "key must be text or NULL, got binary data", "key stored as a BLOB"),
    case("content-type-blob", "content_type = X'00'", "content_type must be text or NULL, got binary data",
         "content_type stored as a BLOB"),
    case("key-empty", "key = ''", "key must be NULL or 1-255 UTF-8 bytes, got 0 bytes", "empty key"),
    case("key-too-long", "key = :k", "key must be NULL or 1-255 UTF-8 bytes, got 300 bytes",
         "300-byte key (SQLite ignores VARCHAR lengths)", params={"k": "k" * 300}),
    case("topic-too-long", "topic = :t", "topic must be at most 249 characters, got 300",
         "300-character topic", params={"t": "t" * 300}),
    case("key-sql-null", "key = NULL", DELIVERED, "key NULL (a keyless message)"),
    case("attempts-negative", "attempts = -1", "attempts must be an integer between 0 and 2147483646, got -1",
         "negative attempts"),
    case("attempts-overflow", "attempts = 2147483647",
         "attempts must be an integer between 0 and 2147483646, got 2147483647",
         "attempts at INT max (attempts + 1 would overflow)"),
    case("attempts-text", "attempts = 'many'", "attempts must be an integer between 0 and 2147483646, got text",
         "attempts stored as TEXT"),
    case("partition-negative", "partition = -1", "partition -1 is out of range 0..", "partition -1"),
    case("partition-over-smallint", "partition = 40000", "partition 40000 is out of range 0..",
         "partition over SMALLINT (no 40001 leases created)"),
    case("partition-and-status-bad", "partition = -5, status = 'sent'", "partition -5 is out of range 0..",
         "partition -5 and an unknown status"),
    case("status-unknown", "status = 'bogus'", "unknown status 'bogus'", "unknown status"),
    case("status-uppercase", "status = 'PENDING'", "unknown status 'PENDING'", "status in upper case"),
    case("pg-headers-json-string", "headers = '\"x\"'::jsonb",
         "headers must be a JSON object of strings, got a JSON string", "JSONB headers a string",
         dialect="postgresql"),
    case("pg-attempts-overflow", "attempts = 2147483647",
         "attempts must be an integer between 0 and 2147483646, got 2147483647", "attempts at INT max",
         dialect="postgresql"),
    case("pg-partition-negative", "partition = -1", "partition -1 is out of range 0..", "partition -1",
         dialect="postgresql"),
    case("mariadb-headers-null-value", "headers = '{\"a\": null}'",
         "got JSON null for header 'a'", "a header value that is JSON null", dialect="mariadb"),
    case("mariadb-headers-json-array", "headers = '[1]'",
         "headers must be a JSON object of strings, got a JSON array", "JSON headers an array", dialect="mariadb"),
    case("mariadb-status-unknown", "status = 'sent'", "unknown status 'sent'", "unknown status",
         dialect="mariadb"),
    case("pg-created-at-infinity", "created_at = 'infinity'", BAD_TIME + "'infinity'", "created_at 'infinity'",
         dialect="postgresql"),
    case("pg-created-at-minus-infinity", "created_at = '-infinity'", BAD_TIME + "'-infinity'", "created_at '-infinity'",
         dialect="postgresql"),
    case("pg-created-at-year-10000", "created_at = '10000-01-01 00:00:00+00'",
         BAD_TIME + "'10000-01-01 00:00:00+00'",
         "created_at in year 10000", dialect="postgresql"),
    case("pg-created-at-bc", "created_at = '0001-01-01 00:00:00+00'::timestamptz - interval '1 day'",
         BAD_TIME + "'0001-12-31 00:00:00+00 BC'",
         "created_at before year 1", dialect="postgresql"),
    case("pg-attributes-json-array", "attributes = '[1]'::jsonb",
         "attributes must be a JSON object of strings, got a JSON array", "JSONB attributes an array",
         dialect="postgresql"),
    case("pg-headers-number-value", "headers = '{\"n\": 1}'::jsonb",
         "got a JSON number for header 'n'", "JSONB header value a number", dialect="postgresql"),
    case("pg-available-at-infinity", "available_at = 'infinity'",
         "available_at 'infinity' is never reached", "available_at 'infinity' (never due)", dialect="postgresql"),
    case("pg-available-at-infinity-retrying", "available_at = 'infinity', attempts = 1",
         "available_at 'infinity' is never reached", "available_at 'infinity' on a retried row (blocks its key)",
         dialect="postgresql"),
    case("pg-available-at-minus-infinity", "available_at = '-infinity'", DELIVERED,
         "available_at '-infinity' (long due)", dialect="postgresql"),
    case("available-at-before-1970", "available_at = '1960-01-01 00:00:00.000000'", DELIVERED,
         "available_at before the due-now mark (1970)"),
    case("available-at-text", "available_at = 'infinity'", "available_at 'infinity' is never reached",
         "available_at text that is no time"),
    case("mariadb-available-at-1000", "available_at = '1000-01-01 00:00:00'", DELIVERED,
         "available_at in year 1000 (long due)", dialect="mariadb"),
    case("mariadb-created-at-zero", "created_at = '0000-00-00 00:00:00'", BAD_TIME + "'0000-00-00 00:00:00",
         "created_at zero date", dialect="mariadb"),
    case("mariadb-attributes-json-string", "attributes = '\"x\"'",
         "attributes must be a JSON object of strings, got a JSON string", "JSON attributes a string",
         dialect="mariadb"),
]


@pytest.fixture
def fresh(_migrated_engines: dict[str, sa.Engine]) -> Iterator[dict[str, sa.Engine]]:
    used: list[sa.Engine] = []

    class _Engines(dict):  # type: ignore[type-arg]
        def __missing__(self, dialect: str) -> sa.Engine:
            e = _migrated_engines[dialect]
            truncate_all(e)
            used.append(e)
            self[dialect] = e
            return e

    yield _Engines()
    for e in used:
        truncate_all(e)


def _quote_columns(dialect: str, sql: str) -> str:
    col = "`{}`" if dialect == "mariadb" else '"{}"'
    for name in ("partition", "key"):
        sql = sql.replace(f"{name} =", f"{col.format(name)} =")
    return sql


@pytest.mark.parametrize("dialect, set_sql, params, expected", CASES)
def test_corrupted_row(fresh: dict[str, sa.Engine], dialect: str, set_sql: str, params: dict[str, object],
                       expected: str) -> None:
    engine = fresh[dialect]
    with Session(engine) as s, s.begin():
        mids = Outbox().add_many(s, [OutgoingMessage("orders", {"seq": i}, key=f"key-{i}", headers={"h": "v"})
                                     for i in range(6)])
    with engine.connect() as c:
        ids = {m: i for i, m in c.execute(sa.select(T.c.id, T.c.message_id))}
    row_ids = [ids[m] for m in mids]
    bad = row_ids[BAD]
    with engine.begin() as c:
        c.execute(sa.text(f"UPDATE outbox_messages SET {_quote_columns(dialect, set_sql)} WHERE id = :rid"),
                  {"rid": bad, **params})
    pub = MemoryPublisher()
    relay = Relay(engine, pub, config=RelayConfig(**FAST))  # type: ignore[arg-type]
    try:
        relay.drain(timeout=60)
    finally:
        relay.close()
    others = [i for i in row_ids if i != bad]
    with engine.connect() as c:
        left = c.execute(sa.select(T.c.id, T.c.status, T.c.last_error)).all()
    if expected == DELIVERED:
        assert sorted(pub.published_ids) == sorted(row_ids)
        assert left == []
        return
    assert sorted(pub.published_ids) == sorted(others), "every other row is delivered"
    assert len(left) == 1 and left[0].id == bad, left
    assert left[0].status == "dead"
    assert left[0].last_error.startswith(f"row {bad}: "), left[0].last_error
    assert expected in left[0].last_error
