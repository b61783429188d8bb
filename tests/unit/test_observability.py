"""Units of outbox.observability that need no service: probes, addresses, the missing-extra error."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from outbox.errors import ConfigurationError
from outbox.observability.health import Health
from outbox.observability.http import parse_address

REPO = Path(__file__).resolve().parents[2]


def test_parse_address_binds_loopback_unless_told() -> None:
    assert parse_address("9464") == ("127.0.0.1", 9464)
    assert parse_address(":9464") == ("127.0.0.1", 9464)
    assert parse_address("0.0.0.0:9464") == ("0.0.0.0", 9464)
    assert parse_address("[::1]:9464") == ("::1", 9464)
    with pytest.raises(ConfigurationError, match="HOST:PORT"):
        parse_address("localhost:http")
    with pytest.raises(ConfigurationError, match=r"0\.\.65535"):
        parse_address("127.0.0.1:70000")


def test_liveness_and_readiness_give_reasons() -> None:
    h = Health(live_within=0.2)
    h.loop_turned()
    assert h.live() == (True, {})
    problem: list[str | None] = ["broker unreachable: amqp://app:hunter2@mq:5672/ refused"]
    h.add_readiness("broker", lambda: problem[0])
    ok, why = h.ready()
    assert not ok and "hunter2" not in why["broker"] and "app:***@mq" in why["broker"]
    problem[0] = None
    assert h.ready() == (True, {})
    time.sleep(0.3)
    ok, why = h.live()
    assert not ok and "not turned" in why["loop"]
    assert not h.ready()[0]


def test_endpoint_answers_json_with_the_reason() -> None:
    pytest.importorskip("prometheus_client")
    from outbox.observability.http import MetricsServer
    from outbox.observability.metrics import RelayMetrics

    h = Health(live_within=60)
    h.loop_turned()
    h.add_readiness("database", lambda: "database unreachable: postgresql://u:s3cret@db/x timed out")
    server = MetricsServer(RelayMetrics().registry, h, port=0, ident="r1").start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as resp:
            assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/readyz", timeout=5)
        assert err.value.code == 503
        body = err.value.read().decode()
        doc = json.loads(body)
        assert doc["status"] == "unhealthy" and doc["id"] == "r1" and "database" in doc["checks"]
        assert "s3cret" not in body
    finally:
        server.stop()


def run_without_prometheus(code: str) -> subprocess.CompletedProcess[str]:
    prelude = "import sys; sys.modules['prometheus_client'] = None\n"  # import prometheus_client -> ImportError
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd=REPO,
                          timeout=60)


def test_outbox_imports_without_prometheus_and_http_says_what_to_install() -> None:
    r = run_without_prometheus("import outbox, outbox.observability, outbox.cli.relay; print('ok')")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    r = run_without_prometheus(
        "from outbox.cli import main; raise SystemExit(main(['relay', '--db', 'sqlite://', '--rabbitmq', "
        "'amqp://guest:pw@127.0.0.1:1/', '--http', '127.0.0.1:0']))")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "pip install 'outboxkit[metrics]'" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_relay_waiting_to_join_is_alive_but_not_a_stuck_one() -> None:
    joined = [False]
    h = Health(live_within=0.1, waiting=lambda: None if joined[0] else "standby")
    time.sleep(0.2)
    assert h.live() == (True, {})  # waiting on purpose (standby): alive
    joined[0] = True
    assert not h.live()[0]  # joined, and the loop never turned: stuck
    h.loop_turned()
    assert h.live()[0]


def test_the_catalogue_holds_exactly_the_agreed_metric_names() -> None:
    pytest.importorskip("prometheus_client")
    from outbox.observability.metrics import CATALOGUE

    found = {f.name: f.type for c in CATALOGUE for f in c.describe()}
    assert found == {
        "outbox_relay_messages_published": "counter", "outbox_relay_messages_retried": "counter",
        "outbox_relay_messages_dead": "counter", "outbox_relay_batch_size": "histogram",
        "outbox_relay_batch_duration_seconds": "histogram", "outbox_relay_delivery_latency_seconds": "histogram",
        "outbox_relay_rows": "gauge", "outbox_relay_oldest_pending_age_seconds": "gauge",
        "outbox_relay_leases_held": "gauge", "outbox_relay_lease_takeovers": "counter",
        "outbox_relay_fenced_rows": "counter", "outbox_relay_last_loop_timestamp_seconds": "gauge",
        "outbox_relay_blocked_keys": "gauge", "outbox_relay_blocking_rows": "gauge",
        "outbox_consumer_messages": "counter",
        "outbox_consumer_handler_duration_seconds": "histogram", "outbox_consumer_batch_size": "histogram",
        "outbox_consumer_lag_messages": "gauge", "outbox_consumer_queue_depth_messages": "gauge",
        "outbox_consumer_last_loop_timestamp_seconds": "gauge", "outbox_info": "gauge",
    }


def test_observe_many_counts_exactly_what_observe_would() -> None:
    """The relay counts a batch's latencies into the histogram at once: same buckets, count and sum
    as one observe() per value (values on a bucket bound included: buckets are "less or equal")."""
    import prometheus_client as pc

    from outbox.observability.metrics import observe_many

    values = [0.0, 0.004, 0.005, 0.0051, 0.3, 1.0, 2.5, 7.0, 99.0, 1e6] * 3
    one, many = pc.CollectorRegistry(), pc.CollectorRegistry()
    a = pc.Histogram("lat_seconds", "x", registry=one)
    b = pc.Histogram("lat_seconds", "x", registry=many)
    for v in values:
        a.observe(v)
    observe_many(b, values)

    def samples(reg):
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in reg.collect() for s in fam.samples if not s.name.endswith("_created")}

    assert samples(one) == pytest.approx(samples(many))
    assert samples(many)[("lat_seconds_count", ())] == len(values)
