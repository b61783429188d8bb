"""Operability: Prometheus metrics, health checks and the HTTP endpoint of ``outbox relay`` / ``outbox consume``.

Needs the optional extra ``metrics`` (``pip install 'outboxkit[metrics]'``) for the Prometheus
parts; importing this package without it works, and :func:`require_prometheus` says what to install.
"""

from __future__ import annotations

from .health import Health
from .metrics import (
    ConsumerMetrics,
    MetricsPublisher,
    RelayMetrics,
    StatusPoller,
    error_code,
    require_prometheus,
)

__all__ = [
    "ConsumerMetrics",
    "Health",
    "MetricsPublisher",
    "RelayMetrics",
    "StatusPoller",
    "error_code",
    "require_prometheus",
]
