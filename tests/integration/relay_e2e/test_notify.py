"""PostgreSQL LISTEN/NOTIFY: a commit wakes an idle relay at once; one NOTIFY per transaction."""

from __future__ import annotations

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from outbox import Outbox, OutgoingMessage

from .conftest import TABLES, relay_args, wait_until, write

POLL = 30.0


def test_notify_wakes_an_idle_relay_long_before_its_poll_interval(db, kafka_bootstrap, kafka_topic, kafka_reader,
                                                                  start_relay, tmp_path):
    d = db("postgresql")
    box = Outbox(notify=True)
    cfg = tmp_path / "relay.toml"
    # every idle wait is the full poll interval (no short first waits), and lease renewal does not wake it sooner
    # (poll_interval is in the file too: the file's settings are checked on their own before the command line's)
    cfg.write_text(f"[relay]\nmin_poll_interval = {POLL}\npoll_interval = {POLL}\nprogress_interval = 0\n")
    reader = kafka_reader(kafka_bootstrap, kafka_topic)
    args = relay_args(d.url, "--kafka", kafka_bootstrap, poll=POLL, lease_ttl=120,
                      extra=("--notify", "--config", str(cfg)))
    relay = start_relay(*args, name="notify")
    write(d.engine, kafka_topic, [0], box=box)
    reader.wait_seqs({0}, timeout=60)
    wait_until(lambda: d.rows() == 0, 30, "the first row to be deleted")  # the relay is now idle for POLL s

    # each commit wakes it: after a round that published a few rows the relay waits for the next
    # wake-up (no claim in between), and that wait must end at the next commit, every time
    for seq in (1, 2, 3):
        write(d.engine, kafka_topic, [seq], box=box)
        reader.wait_seqs({seq}, timeout=3)  # without the wake-up it would come up to 30 s later
    assert relay.alive
    assert relay.stop() == 0


def test_one_notify_per_transaction_whatever_the_message_count(db, kafka_topic):
    d = db("postgresql")
    engine = sa.create_engine(d.url)
    sent: list[str] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _count(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("NOTIFY"):
            sent.append(statement)

    channel = TABLES.names.outbox
    params = make_url(d.url).translate_connect_args(username="user", database="dbname")
    listener = psycopg.connect(autocommit=True, **params)
    try:
        listener.execute(f'LISTEN "{channel}"')
        box = Outbox(notify=True)
        with Session(engine) as s, s.begin():  # 100 messages through add_many, 3 more through add
            box.add_many(s, [OutgoingMessage(kafka_topic, {"seq": i}, key=f"k{i % 7}") for i in range(100)])
            for i in range(100, 103):
                box.add(s, kafka_topic, {"seq": i}, key="k")
        with Session(engine) as s:  # rolled back: no notification
            s.begin()
            box.add_many(s, [OutgoingMessage(kafka_topic, {"seq": i}) for i in range(200, 205)])
            s.flush()
            s.rollback()
        with Session(engine) as s, s.begin():
            box.add(s, kafka_topic, {"seq": 300}, key="k")
        assert len(sent) == 2, sent
        with psycopg.connect(autocommit=True, **params) as other:  # an end marker: everything before it arrived
            other.execute("SELECT pg_notify(%s, 'end')", (channel,))
        payloads = []
        for n in listener.notifies(timeout=10):
            payloads.append(n.payload)
            if n.payload == "end":
                break
        assert payloads == ["", "", "end"]
    finally:
        listener.close()
        engine.dispose()
