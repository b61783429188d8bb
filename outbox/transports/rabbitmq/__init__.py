"""The RabbitMQ transport (pika): :class:`RabbitMQPublisher`, :class:`RabbitMQRunner`, options; and
:class:`AsyncRabbitMQRunner` (aio-pika, the ``rabbitmq-async`` extra).

Importing this package imports no client library; the publisher and runner modules do.
"""

from __future__ import annotations

import importlib
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ...errors import ConfigurationError
from ..base import Codec
from .options import RabbitMQOptions, parse_publisher_options

if TYPE_CHECKING:
    from .aiorunner import AsyncRabbitMQRunner
    from .publisher import RabbitMQPublisher
    from .runner import RabbitMQRunner, declare_queue

__all__ = ["TRANSPORT", "AsyncRabbitMQRunner", "RabbitMQOptions", "RabbitMQPublisher", "RabbitMQRunner",
           "RabbitMQTransport", "declare_queue"]


class RabbitMQTransport:
    """``--broker rabbitmq``: target = AMQP URL (``amqp://user:pass@host:5672/vhost``)."""

    name = "rabbitmq"
    binding = "amqp"
    consume_requires = ("queue",)
    """Settings ``outbox consume`` needs with this transport."""
    consume_takes_options = False
    options = RabbitMQOptions

    def publisher(self, target: str, settings: Mapping[str, str], *, codec: Codec, **relay_opts: Any) -> Any:
        from .publisher import RabbitMQPublisher

        opts = {**parse_publisher_options(settings, "-X"), **relay_opts}
        return RabbitMQPublisher(url=target, codec=codec, **opts)

    def runner(self, consumer: Any, *, engine: Any, target: str, settings: Mapping[str, str], codec: Codec,
               **opts: Any) -> Any:
        from .runner import RabbitMQRunner

        return RabbitMQRunner(consumer, engine=engine, **self._runner_args(target, settings, codec, opts))

    def async_runner(self, consumer: Any, *, engine: Any, target: str, settings: Mapping[str, str], codec: Codec,
                     **opts: Any) -> Any:
        """:meth:`runner` for an async consumer on an ``AsyncEngine`` (aio-pika; ``await runner.run()``)."""
        from .aiorunner import AsyncRabbitMQRunner

        return AsyncRabbitMQRunner(consumer, engine=engine, **self._runner_args(target, settings, codec, opts))

    @staticmethod
    def _runner_args(target: str, settings: Mapping[str, str], codec: Codec, opts: dict[str, Any]) -> dict[str, Any]:
        if settings:
            raise ConfigurationError(f"the RabbitMQ consumer takes no -X options (got {', '.join(sorted(settings))})")
        for name in ("topics", "group_id", "dead_letter_topic"):
            opts.pop(name, None)
        return {"url": target, "codec": codec, **opts}

    def identity(self, target: str) -> str:
        """``host:port/vhost`` of an AMQP URL: never the user or password."""
        parts = urllib.parse.urlsplit(target)
        try:
            port = parts.port
        except ValueError:
            port = None
        port = port or (5671 if parts.scheme == "amqps" else 5672)
        vhost = parts.path[1:] if parts.path.startswith("/") and len(parts.path) > 1 else "%2F"
        return f"{parts.hostname or 'localhost'}:{port}/{vhost}"[:255]

    def describe(self, target: str) -> str:
        return f"RabbitMQ {target}"


TRANSPORT = RabbitMQTransport()

_LAZY = {"RabbitMQPublisher": ".publisher", "RabbitMQRunner": ".runner", "declare_queue": ".runner",
         "AsyncRabbitMQRunner": ".aiorunner"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
