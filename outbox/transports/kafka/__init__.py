"""The Kafka transport (confluent-kafka): :class:`KafkaPublisher`, :class:`KafkaRunner`, :class:`AsyncKafkaRunner`,
options.

Importing this package imports no client library; the publisher and runner modules do.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..base import Codec
from .options import KafkaOptions

if TYPE_CHECKING:
    from .aiorunner import AsyncKafkaRunner
    from .publisher import KafkaPublisher
    from .runner import KafkaRunner

__all__ = ["TRANSPORT", "AsyncKafkaRunner", "KafkaOptions", "KafkaPublisher", "KafkaRunner", "KafkaTransport"]


class KafkaTransport:
    """``--broker kafka``: target = bootstrap servers (``host:port[,host:port]``)."""

    name = "kafka"
    binding = "kafka"
    consume_requires = ("topics", "group")
    """Settings ``outbox consume`` needs with this transport."""
    consume_takes_options = True
    options = KafkaOptions

    def publisher(self, target: str, settings: Mapping[str, str], *, codec: Codec, **relay_opts: Any) -> Any:
        from .publisher import KafkaPublisher

        return KafkaPublisher(bootstrap_servers=target, config=dict(settings), codec=codec, **relay_opts)

    def runner(self, consumer: Any, *, engine: Any, target: str, settings: Mapping[str, str], codec: Codec,
               **opts: Any) -> Any:
        from .runner import KafkaRunner

        return KafkaRunner(consumer, engine=engine, **self._runner_args(target, settings, codec, opts))

    def async_runner(self, consumer: Any, *, engine: Any, target: str, settings: Mapping[str, str], codec: Codec,
                     **opts: Any) -> Any:
        """:meth:`runner` for an async consumer on an ``AsyncEngine`` (``await runner.run()``)."""
        from .aiorunner import AsyncKafkaRunner

        return AsyncKafkaRunner(consumer, engine=engine, **self._runner_args(target, settings, codec, opts))

    @staticmethod
    def _runner_args(target: str, settings: Mapping[str, str], codec: Codec, opts: dict[str, Any]) -> dict[str, Any]:
        config = dict(settings)
        if "dead_letter_topic" in config and opts.get("dead_letter_topic") is None:
            opts["dead_letter_topic"] = config.pop("dead_letter_topic")
        config.pop("dead_letter_topic", None)
        opts.pop("queue", None)
        opts.pop("prefetch", None)
        return {"bootstrap_servers": target, "config": config, "codec": codec, **opts}

    def identity(self, target: str) -> str:
        """The cluster as recorded in the relays table: the sorted host:port list."""
        hosts = sorted({h.strip().rsplit("://", 1)[-1].rsplit("@", 1)[-1] for h in target.split(",") if h.strip()})
        return ",".join(hosts)[:255]

    def describe(self, target: str) -> str:
        return f"Kafka {target}"


TRANSPORT = KafkaTransport()

_LAZY = {"KafkaPublisher": ".publisher", "KafkaRunner": ".runner", "AsyncKafkaRunner": ".aiorunner"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
