"""How the relay reads ``created_at`` on PostgreSQL: as a timestamp, and never failing the claim.

psycopg fails a whole result on a ``timestamptz`` that a Python datetime cannot hold ('infinity',
year 10000, BC), or that it can hold in UTC but not in the session's time zone (the last hours of
year 9999 east of UTC). So the claim reads such values as text, for their row alone to be refused
(tests/badinput/test_row_inputs.py). Every other value is read as the timestamp itself: formatting
it as text on the server and parsing it back on the client cost about 17 % of the relay's own
per-row instructions (docs/benchmarks.md, twelfth session).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session

import outbox.relay
from outbox import Outbox, default_tables
from outbox._rows import _COLUMNS
from outbox.brokers.memory import MemoryPublisher
from outbox.config import RelayConfig
from outbox.relay import Relay
from tests.conftest import postgresql_only

T = default_tables().outbox
FAST = {"min_poll_interval": 0.01, "poll_interval": 0.05, "progress_interval": 0}
UTC = dt.timezone.utc
CREATED = _COLUMNS.index("created_at")

#: instants at the edges of what a datetime holds, each stored in created_at of one row
EDGES = [
    dt.datetime(1, 1, 1, tzinfo=UTC),
    dt.datetime(1, 1, 1, 12, tzinfo=UTC),
    dt.datetime(1, 1, 9, tzinfo=UTC),
    dt.datetime(9999, 12, 23, tzinfo=UTC),
    dt.datetime(9999, 12, 31, 12, tzinfo=UTC),
    dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    dt.datetime(2026, 12, 3, 17, 30, 0, 123456, tzinfo=UTC),
]


@pytest.fixture
def pg(dialect_name: str, engine: sa.Engine) -> sa.Engine:
    return postgresql_only(dialect_name, engine, "the claim's reading of timestamptz is PostgreSQL's")


@pytest.fixture
def claimed_rows(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The raw rows the relay's claims hand to ``decode_row``."""
    seen: list[Any] = []
    decode = outbox.relay.decode_row

    def recording(row: Any, **kw: Any) -> Any:
        seen.append(tuple(row))
        return decode(row, **kw)

    monkeypatch.setattr(outbox.relay, "decode_row", recording)
    return seen


def _drain(engine: sa.Engine, claims: list[str] | None = None, zones: list[str] | None = None) -> MemoryPublisher:
    """Drain ``engine``'s outbox; with ``claims``, a cursor listener watches the relay and notes its
    claims; ``zones`` gets the relay's session time zone."""
    pub = MemoryPublisher()
    relay = Relay(engine, pub, config=RelayConfig(**FAST))  # type: ignore[arg-type]
    if claims is not None:
        event.listen(relay.engine, "before_cursor_execute",
                     lambda _c, _cur, stmt, *_a: claims.append(stmt) if "SKIP LOCKED" in stmt else None)
    try:
        relay.drain(timeout=60)
        if zones is not None:
            with relay.engine.connect() as c:
                zones.append(c.exec_driver_sql("SHOW TimeZone").scalar())
    finally:
        relay.close()
    return pub


def _add(engine: sa.Engine, n: int) -> list[int]:
    with Session(engine) as s, s.begin():
        box = Outbox()
        mids = [box.add(s, "stamps", {"n": i}, key=f"k{i}") for i in range(n)]
    with engine.connect() as c:
        ids = dict(c.execute(sa.select(T.c.message_id, T.c.id)).all())
    return [ids[m] for m in mids]


def test_the_claim_reads_created_at_as_a_timestamp_not_as_text(pg: sa.Engine, claimed_rows: list[Any]) -> None:
    _add(pg, 3)
    pub = _drain(pg)
    assert len(pub.messages) == 3
    assert len(claimed_rows) == 3
    for row in claimed_rows:
        assert type(row[CREATED]) is dt.datetime, row[CREATED]
        # the relay's sessions are in UTC: psycopg then converts to the fixed zone, not a ZoneInfo
        # (Debian's server default is 'Etc/UTC'), 0.26 instead of 0.87 us a row
        assert row[CREATED].tzinfo is UTC, row[CREATED].tzinfo
    for m in pub.messages:
        assert m.record is not None and m.record.created_at is not None
        assert m.record.created_at.utcoffset() == dt.timedelta(0)


@pytest.fixture(params=["UTC", "Pacific/Kiritimati", "Etc/GMT+12", "<+100>-100"])
def zoned(request: pytest.FixtureRequest, pg: sa.Engine) -> Iterator[sa.Engine]:
    """The test database through sessions in a time zone far east or west of UTC (the last is POSIX
    notation for UTC+100 hours, which PostgreSQL accepts and Python has no zone for)."""
    e = sa.create_engine(pg.url, connect_args={"options": f"-c TimeZone={request.param}"})
    with e.connect() as c:
        assert c.exec_driver_sql("SHOW TimeZone").scalar() == request.param
    yield e
    e.dispose()


@pytest.mark.parametrize("watched", [False, True], ids=["driver-cursor", "watched"])
def test_edge_instants_keep_their_time_in_any_session_zone(pg: sa.Engine, zoned: sa.Engine, watched: bool) -> None:
    """Through psycopg's cursor with binary results, and through ``Connection.execute`` (text results)
    when a cursor listener watches the relay's engine."""
    claims: list[str] = []
    ids = _add(pg, len(EDGES))
    with pg.begin() as c:
        for rid, when in zip(ids, EDGES, strict=True):
            c.execute(sa.update(T).where(T.c.id == rid).values(created_at=when))
    relay_zones: list[str] = []
    pub = _drain(zoned, claims if watched else None, relay_zones)
    assert sorted(pub.published_ids) == sorted(ids), "every edge instant is a time a record holds"
    got = {m.id: m.record.created_at for m in pub.messages if m.record is not None}
    assert got == dict(zip(ids, EDGES, strict=True))
    assert all(when is not None and when.utcoffset() == dt.timedelta(0) for when in got.values())
    with pg.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(T)).scalar() == 0
    assert bool(claims) == watched
    assert relay_zones == ["UTC"], "the relay's own sessions are in UTC, whatever the application's are"


#: MariaDB's DATETIME(6) range and around 1970 (a negative count)
MYSQL_EDGES = [
    dt.datetime(1000, 1, 1, tzinfo=UTC),
    dt.datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    dt.datetime(1970, 1, 1, tzinfo=UTC),
    dt.datetime(2026, 12, 4, 19, 40, 1, 123456, tzinfo=UTC),
    dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
]


def test_mariadb_claim_reads_created_at_as_microseconds_and_keeps_every_instant(
        dialect_name: str, engine: sa.Engine, claimed_rows: list[Any]) -> None:
    """pymysql parses a DATETIME in Python (a tenth of a MariaDB drain); the claim reads the
    microseconds since 1970 as an integer instead, and each record carries the stored instant to
    the microsecond. (The zero date comes as text and its row alone is refused:
    tests/badinput/test_row_inputs.py.)"""
    if dialect_name != "mariadb":
        pytest.skip("the integer reading is MySQL/MariaDB's claim_timestamp")
    ids = _add(engine, len(MYSQL_EDGES))
    with engine.begin() as c:
        for rid, when in zip(ids, MYSQL_EDGES, strict=True):
            c.execute(sa.update(T).where(T.c.id == rid).values(created_at=when))
    pub = _drain(engine)
    assert claimed_rows and all(type(r[CREATED]) is int for r in claimed_rows), claimed_rows[:1]
    got = {m.id: m.record.created_at for m in pub.messages if m.record is not None}
    assert got == dict(zip(ids, MYSQL_EDGES, strict=True))
