"""Contract suites every transport runs: the in-repo ones (kafka, rabbitmq, memory) and yours.

Importing this module imports pytest (it is for test code; ``outbox`` itself never imports it).
A transport's test module subclasses the suites and gives them a harness::

    import pytest
    from outbox.testing import ConsumerHarness, ConsumerRunnerContract, Features, PublisherContract, PublisherHarness

    FEATURES = Features(missing_topic=Outcome.FAILED, missing_topic_reason="no such stream")

    class TestNatsPublisher(PublisherContract):
        features = FEATURES

        @pytest.fixture
        def harness(self, nats_server):
            return PublisherHarness(topic=..., missing_topic=..., make=..., read=..., unreachable=...)

    class TestNatsRunner(ConsumerRunnerContract):
        features = FEATURES

        @pytest.fixture
        def harness(self, nats_server):
            return ConsumerHarness(topic=..., publisher=..., runner=..., backlog=...)

:class:`Features` declares which guarantees the transport claims; a test for a guarantee it does
not claim is reported as skipped with the flag's name. See docs/transports.md.
"""

from __future__ import annotations

try:
    import pytest  # noqa: F401 - the suites are pytest classes
except ImportError:  # pragma: no cover - exercised by tests/unit/test_testing_module.py
    raise ImportError("outbox.testing holds pytest contract suites: install pytest (pip install pytest) "
                      "in the environment that runs your transport's tests") from None

from ._features import Features
from ._records import record
from .consumer import ConsumerHarness, ConsumerRunnerContract, Runner, SimulatedCrash, wait_for
from .publisher import PublisherContract, PublisherHarness, Received

__all__ = [
    "ConsumerHarness",
    "ConsumerRunnerContract",
    "Features",
    "PublisherContract",
    "PublisherHarness",
    "Received",
    "Runner",
    "SimulatedCrash",
    "record",
    "wait_for",
]
