"""Options of the RabbitMQ transport: the publisher's keyword parameters, parsed from ``-X key=value``."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ...errors import ConfigurationError

__all__ = ["RabbitMQOptions", "parse_publisher_options"]


@dataclass(frozen=True)
class RabbitMQOptions:
    """``-X`` options of ``--broker rabbitmq`` for ``outbox relay`` (``-X exchange_type=direct``)."""

    exchange_type: str = field(default="topic", metadata={"help": "type of exchanges declared on demand"})
    declare_exchanges: bool = field(default=False, metadata={"help": "declare missing exchanges"})
    confirm_window: int = field(default=1000, metadata={"help": "unconfirmed messages in flight at most"})
    mandatory: bool = field(default=True, metadata={"help": "unroutable messages fail instead of vanishing"})
    heartbeat: int = field(default=60, metadata={"help": "AMQP heartbeat, seconds"})
    connection_attempts: int = field(default=3, metadata={"help": "connection attempts per connect"})
    connect_timeout: float = field(default=10.0, metadata={"help": "seconds per connection attempt"})
    max_message_bytes: int = field(default=128 * 1024 * 1024, metadata={"help": "larger messages fail"})
    max_unconfirmed_bytes: int = field(default=64 * 1024 * 1024, metadata={"help": "bytes in flight at most"})
    connection_name: str | None = field(default="outbox-relay", metadata={"help": "name shown in the broker UI"})
    allow_default_exchange: bool = field(default=False, metadata={"help": "allow publishing to the '' exchange"})


def parse_publisher_options(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``-X`` / ``[rabbitmq]`` options, parsed by the types of RabbitMQPublisher's parameters."""
    from ...config import Setting, _kind_of
    from .publisher import RabbitMQPublisher

    hints = typing.get_type_hints(RabbitMQPublisher.__init__)
    params = [n for n in inspect.signature(RabbitMQPublisher.__init__).parameters if n not in ("self", "url", "codec")]
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in params:
            raise ConfigurationError(f"unknown RabbitMQ publisher option {key!r} ({source}); known: "
                                     f"{', '.join(sorted(params))}")
        out[name] = Setting(name, kind=_kind_of(hints.get(name, Any))).parse(value, f"{source} {name}")
    return out
