"""Wiring for the commands: one call puts metrics, probes and the endpoint around a relay or a runner."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .health import Health
from .http import MetricsServer, parse_address
from .metrics import ConsumerMetrics, MetricsPublisher, RelayMetrics, StatusPoller, require_prometheus

__all__ = ["check_endpoint", "serve_consumer", "serve_relay"]


def check_endpoint(address: str) -> tuple[str, int]:
    """Fail early (before any connection) when ``--http`` cannot work: the extra is missing, or a bad address."""
    require_prometheus()
    return parse_address(address)


def serve_relay(relay: Any, address: str, *, interval: float = 5.0) -> Callable[[], None]:
    """Measure ``relay`` (its publisher is wrapped in a :class:`MetricsPublisher`) and serve
    ``/metrics``, ``/healthz`` and ``/readyz`` on ``address``. Returns the function that stops it all."""
    require_prometheus()
    host, port = parse_address(address)
    cfg = relay.config
    health = Health(live_within=max(3 * cfg.poll_interval, 3 * cfg.renew_interval, 10.0),
                    waiting=lambda: None if relay.leases.joined else "waiting to join the relay group")
    metrics = RelayMetrics()
    metrics.attach(relay)
    publisher = MetricsPublisher(relay.publisher, metrics, health=health)
    relay.publisher = publisher
    poller = StatusPoller(relay.engine, metrics, tables=relay.tables, interval=interval)

    def leases() -> str | None:
        if relay.leases.held:
            return None
        free = poller.unowned_partitions
        if not relay.leases.joined:
            return "not joined the relay group yet (waiting for a slot or for the database)"
        if free:
            return f"holds no partition lease while {free} partition(s) have no live owner"
        return None  # every partition has a live owner: waiting for a fair share is ready

    health.add_readiness("database", poller.database_check)
    health.add_readiness("broker", publisher.broker_problem)
    health.add_readiness("leases", leases)
    server = MetricsServer(metrics.registry, health, host=host, port=port, component="relay", ident=relay.relay_id)
    server.start()
    poller.start()
    relay.metrics_server = server

    def stop() -> None:
        poller.stop()
        server.stop()

    return stop


def serve_consumer(runner: Any, engine: Any, address: str, *, interval: float = 5.0,
                   tables: Any = None) -> Callable[[], None]:
    """Observe ``runner`` (:class:`ConsumerMetrics`) and serve the endpoint on ``address``."""
    require_prometheus()
    host, port = parse_address(address)
    health = Health(live_within=max(3 * runner.batch_timeout, 10.0))
    metrics = ConsumerMetrics(runner.consumer.name, lag_interval=interval, health=health)
    metrics.install(runner)
    poller = StatusPoller(engine, None, tables=tables, interval=interval)
    health.add_readiness("database", poller.database_check)
    health.add_readiness("broker", metrics.broker_check)
    server = MetricsServer(metrics.registry, health, host=host, port=port, component="consumer",
                           ident=runner.consumer.name)
    server.start()
    poller.start()
    runner.metrics_server = server

    def stop() -> None:
        poller.stop()
        server.stop()

    return stop
