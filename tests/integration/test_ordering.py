"""Strict ordering per (topic, key) (issue 9, item 5), on SQLite, PostgreSQL and MariaDB.

Rows of a (topic, key) are held back only behind an EARLIER row (lower id) of the same (topic,
key) that is dead or waiting out a retry backoff. Requeuing the earliest dead row sends it even
while later dead rows remain; another topic's rows with the same key are never held back; a
poison key is purged in one operation; ``outbox status`` reports blocked rows and what blocks them.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Outbox, OutgoingMessage, admin, default_tables
from outbox.brokers.base import Outcome
from outbox.brokers.memory import MemoryPublisher
from outbox.config import RelayConfig
from outbox.relay import Relay

T = default_tables().outbox
REPO = Path(__file__).resolve().parents[2]
FAST = {"min_poll_interval": 0.01, "poll_interval": 0.05, "backoff_initial": 0.05, "backoff_max": 0.2,
        "progress_interval": 0, "lease_ttl": 3.0}


def relay(engine: sa.Engine, pub: MemoryPublisher, **kw) -> Relay:
    return Relay(engine, pub, config=RelayConfig(**{**FAST, **kw}))


def add(engine: sa.Engine, rows: list[tuple[str, str, int]]) -> dict[int, int]:
    """Write ``(topic, key, seq)`` messages in this order, one transaction; return seq -> row id."""
    box = Outbox()
    with Session(engine) as s, s.begin():
        box.add_many(s, [OutgoingMessage(t, {"seq": q}, key=k) for t, k, q in rows])
    with engine.connect() as c:
        got = c.execute(sa.select(T.c.id, T.c.payload)).all()
    return {json.loads(bytes(p))["seq"]: i for i, p in got}


def set_rows(engine: sa.Engine, ids: list[int], **values) -> None:
    with engine.begin() as c:
        c.execute(T.update().where(T.c.id.in_(ids)).values(**values))


def sent(pub: MemoryPublisher, topic: str | None = None) -> list[int]:
    return [json.loads(m.payload)["seq"] for m in pub.snapshot() if topic is None or m.topic == topic]


def test_requeuing_the_earliest_dead_row_sends_it_while_later_dead_rows_remain(engine: sa.Engine) -> None:
    ids = add(engine, [("orders", "k", q) for q in range(5)])
    set_rows(engine, [ids[0], ids[2]], status="dead", attempts=1, last_error="poison")
    pub = MemoryPublisher()
    r = relay(engine, pub)
    r.drain()
    assert sent(pub) == []  # 1, 3, 4 wait behind dead 0
    assert admin.requeue_dead(engine, ids=[ids[0]]) == 1
    r.drain()
    assert sent(pub) == [0, 1]  # 0 goes out, then 1; 3 and 4 wait behind dead 2
    assert admin.requeue_dead(engine, ids=[ids[2]]) == 1
    r.drain()
    r.close()
    assert sent(pub) == [0, 1, 2, 3, 4]


def test_a_failing_row_holds_back_only_later_rows_of_its_topic_and_key(engine: sa.Engine) -> None:
    ids = add(engine, [("a", "k", 0), ("a", "k", 1), ("b", "k", 2), ("a", "k", 3), ("b", "k", 4), ("a", "j", 5)])
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    set_rows(engine, [ids[1]], attempts=3, last_error="broker said no", available_at=later)  # backing off
    pub = MemoryPublisher()
    r = relay(engine, pub)
    r.drain()
    r.close()
    assert sent(pub, "a") == [0, 5]  # the row before the backing-off one goes out; 3 waits behind 1
    assert sent(pub, "b") == [2, 4]  # same key, other topic: never held back
    st = admin.outbox_status(engine)
    assert st["blocked"] == 1 and st["due"] == 0
    (b,) = st["blocked_by"]
    assert (b["topic"], b["key"], b["blocking_id"], b["blocking_status"], b["blocked"]) == ("a", "k", ids[1],
                                                                                             "retrying", 1)
    assert b["reason"] == "broker said no" and b["attempts"] == 3 and b["retry_at"] is not None


def test_dead_rows_on_one_topic_never_block_another_topics_key(engine: sa.Engine) -> None:
    ids = add(engine, [("a", "k", 0), ("b", "k", 1), ("a", "k", 2), ("b", "k", 3)])
    set_rows(engine, [ids[0]], status="dead", attempts=1, last_error="poison")
    pub = MemoryPublisher()
    r = relay(engine, pub)
    r.drain()
    r.close()
    assert sent(pub) == [1, 3]


def test_a_poison_key_is_purged_in_one_operation(engine: sa.Engine) -> None:
    add(engine, [("orders", "poison", 0), ("orders", "poison", 1), ("orders", "poison", 2), ("orders", "ok", 3)])
    pub = MemoryPublisher()
    pub.fail(lambda rec: rec.key == "poison", Outcome.FAILED, "poison")
    r = relay(engine, pub)
    r.drain()
    assert sent(pub) == [3]
    assert admin.outbox_status(engine)["blocked"] == 2  # the first is dead, two wait behind it
    assert admin.pending_behind(engine, key="poison") == 2
    assert admin.purge_dead(engine, key="poison", with_blocked=True) == 3
    r.drain()
    r.close()
    with engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(T)).scalar_one() == 0
    assert admin.outbox_status(engine)["blocked"] == 0


def test_requeuing_a_keys_dead_rows_sends_them_all_in_order_in_one_go(engine: sa.Engine) -> None:
    ids = add(engine, [("orders", "k", q) for q in range(4)])
    set_rows(engine, [ids[0], ids[1], ids[2]], status="dead", attempts=12, last_error="gave up")
    pub = MemoryPublisher()
    r = relay(engine, pub)
    r.drain()
    assert sent(pub) == []
    assert admin.requeue_dead(engine, key="k") == 3
    r.drain()
    r.close()
    assert sent(pub) == [0, 1, 2, 3]


def test_status_shows_blocked_rows_and_what_blocks_them(engine: sa.Engine, db_url: str) -> None:
    ids = add(engine, [("orders", "k", q) for q in range(101)] + [("orders", "free", 101)])
    set_rows(engine, [ids[0]], status="dead", attempts=1, last_error="MSG_SIZE_TOO_LARGE: too big")
    st = admin.outbox_status(engine)
    assert (st["pending"], st["due"], st["blocked"], st["dead"]) == (101, 1, 100, 1)
    (b,) = st["blocked_by"]
    assert (b["key"], b["blocking_id"], b["blocking_status"], b["blocked"]) == ("k", ids[0], "dead", 100)
    assert b["reason"] == "MSG_SIZE_TOO_LARGE: too big" and b["waiting_since"] is not None

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "outbox", "status", "--db", db_url, *args], capture_output=True,
                              text=True, timeout=60, cwd=str(REPO))

    out = cli("--json")
    assert out.returncode == 0, out.stderr
    js = json.loads(out.stdout)
    assert (js["due"], js["blocked"]) == (1, 100)
    assert js["blocked_by"][0]["blocking_id"] == ids[0] and js["blocked_by"][0]["blocking_status"] == "dead"
    text = cli()
    assert text.returncode == 0, text.stderr
    assert "1 due now" in text.stdout and "100 blocked" in text.stdout
    assert f"behind row {ids[0]}, dead" in text.stdout and "MSG_SIZE_TOO_LARGE" in text.stdout


def test_cli_purge_says_what_it_releases_and_with_blocked_drops_the_poison_key(engine: sa.Engine, db_url: str,
                                                                             capsys) -> None:
    from outbox.cli import main

    def poison() -> None:
        add(engine, [("orders", "poison", q) for q in range(3)])
        pub = MemoryPublisher()
        pub.fail(lambda rec: rec.key == "poison", Outcome.FAILED, "poison")
        r = relay(engine, pub)
        r.drain()
        r.close()

    poison()
    assert main(["dead", "purge", "--db", db_url, "--key", "poison"]) == 0
    out, err = capsys.readouterr()
    assert "purged 1 message(s)" in out and "2 pending message(s)" in err and "--with-blocked" in err
    with engine.begin() as c:
        c.execute(T.delete())
    poison()
    assert main(["dead", "purge", "--db", db_url, "--key", "poison", "--with-blocked", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"purged": 3}
    with engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(T)).scalar_one() == 0


def test_keys_that_differ_only_in_case_space_or_accent_are_ordered_apart(engine: sa.Engine) -> None:
    """'A', 'a', 'a ' and 'á' are four keys: a dead row of 'A' holds back only 'A' (MariaDB's default
    collation would merge them all), and requeue / purge by key touch only that key's rows."""
    keys = ["A", "a", "A", "a", "a ", "\u00e1"]
    ids = add(engine, [("t", k, q) for q, k in enumerate(keys)])
    set_rows(engine, list(ids.values()), partition=0)  # one partition: only the key can tell them apart
    set_rows(engine, [ids[0]], status="dead", attempts=1, last_error="poison")
    pub = MemoryPublisher()
    r = relay(engine, pub)
    r.drain()
    assert sent(pub) == [1, 3, 4, 5]
    assert [m.key for m in pub.snapshot()] == ["a", "a", "a ", "\u00e1"]
    st = admin.outbox_status(engine)
    assert st["blocked"] == 1
    (b,) = st["blocked_by"]
    assert (b["key"], b["blocking_id"], b["blocked"]) == ("A", ids[0], 1)
    assert admin.requeue_dead(engine, key="a") == 0  # 'a' has no dead row
    assert admin.purge_dead(engine, key="A", with_blocked=True) == 2
    r.drain()
    r.close()
    assert sent(pub) == [1, 3, 4, 5]
    with engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(T)).scalar_one() == 0
