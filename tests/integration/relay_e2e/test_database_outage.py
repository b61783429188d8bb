"""PostgreSQL unreachable at start and cut mid-run: the relay retries, says so, never shows the password."""

from __future__ import annotations

import datetime as dt
import itertools
import re

from sqlalchemy.engine import make_url

from .conftest import first_occurrences_in_order, relay_args, wait_until, write

SECRET = "sekret"  # trust auth ignores it; it must never be printed
_RETRY = re.compile(r"^(\S+ \S+) ERROR .*database unavailable.*retrying in ([0-9.]+) s$", re.M)


def _retries(log: str) -> list[tuple[dt.datetime, float]]:
    return [(dt.datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f"), float(s)) for t, s in _RETRY.findall(log)]


def test_database_down_at_start_and_cut_mid_run(db, kafka_bootstrap, kafka_topic, kafka_reader, start_relay,
                                                fault_proxy):
    d = db("postgresql")
    real = make_url(d.url)
    proxy = fault_proxy(real.host or "127.0.0.1", real.port or 5432, refusing=True)  # a closed port at first
    relay_url = real.set(password=SECRET, host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    reader = kafka_reader(kafka_bootstrap, kafka_topic)
    # DEBUG: every retry line is logged (at INFO repeats are folded into "repeated N times"), so the
    # retry rhythm can be read off the log
    relay = start_relay(*relay_args(relay_url, "--kafka", kafka_bootstrap, batch=200), name="proxied",
                        log_level="DEBUG")

    def errors() -> int:
        return relay.log().count("database unavailable")

    wait_until(lambda: errors() >= 3, 60, "three 'database unavailable' retries while the database is down")
    assert relay.alive, relay.log()[-2000:]
    retries = _retries(relay.log())[:3]
    for (t0, delay), (t1, _) in itertools.pairwise(retries):  # "retrying in X s" is kept, no hot loop
        assert (t1 - t0).total_seconds() >= 0.8 * delay, f"retried after {t1 - t0} although it announced {delay} s"
    write(d.engine, kafka_topic, range(100), keys=10)
    proxy.accept()
    reader.wait_seqs(set(range(100)), timeout=60)

    n = 20_100
    write(d.engine, kafka_topic, range(100, n), keys=10)
    reader.wait_count(1000, 60)
    before = errors()
    proxy.outage()  # drops the relay's connections in the middle of the backlog
    wait_until(lambda: errors() > before, 30, "the relay to notice the cut")
    assert d.pending() > 0, "the backlog was done before the cut"
    proxy.accept()

    got = reader.wait_seqs(set(range(n)), timeout=120)
    first_occurrences_in_order(got)
    wait_until(lambda: d.rows() == 0, 30, "every row to be deleted")
    assert relay.alive
    assert relay.stop() == 0
    log = relay.log()
    assert SECRET not in log
    assert f"127.0.0.1:{proxy.port}" in log, "the error lines do not say which database is unreachable"
