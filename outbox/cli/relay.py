"""``outbox relay``: the daemon that publishes committed outbox rows."""

from __future__ import annotations

import argparse
import inspect
import logging
import signal
import typing
import urllib.parse
from typing import Any

from .._redact import mask_secrets
from ..config import RelayConfig, Setting, relay_settings
from ..errors import ConfigurationError
from ._common import make_engine, require_schema, tables_from_args
from ._settings import (
    BROKER_SETTINGS,
    CONNECTION_SETTINGS,
    OBSERVABILITY_SETTINGS,
    add_common_options,
    add_settings,
    load_config_file,
    parse_kv,
    resolve,
)

log = logging.getLogger("outbox.relay")

#: settings of the relay command besides RelayConfig's fields
COMMAND_SETTINGS: tuple[Setting, ...] = (*CONNECTION_SETTINGS, *BROKER_SETTINGS, *OBSERVABILITY_SETTINGS)


def settings() -> tuple[Setting, ...]:
    """Every setting of ``outbox relay``: the connection, the broker, then each RelayConfig field."""
    return (*COMMAND_SETTINGS, *relay_settings())


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "relay",
        help="publish committed outbox rows to Kafka or RabbitMQ",
        description="Run the relay until SIGTERM/SIGINT. Settings come from the command line, then "
        "OUTBOX_* environment variables, then the [relay] table of the TOML file given with --config.",
    )
    add_settings(p, COMMAND_SETTINGS)
    add_common_options(p)
    p.add_argument("--declare-exchanges", action="store_true", default=None,
                   help="RabbitMQ: declare missing exchanges instead of failing their messages")
    add_settings(p, relay_settings())
    p.set_defaults(func=run)


def _rabbitmq_options(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """``-X`` / ``[rabbitmq]`` options, parsed by the types of RabbitMQPublisher's parameters."""
    from ..brokers.rabbitmq import RabbitMQPublisher
    from ..config import _kind_of

    hints = typing.get_type_hints(RabbitMQPublisher.__init__)
    params = [n for n in inspect.signature(RabbitMQPublisher.__init__).parameters if n not in ("self", "url")]
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in params:
            raise ConfigurationError(f"unknown RabbitMQ publisher option {key!r} ({source}); known: "
                                     f"{', '.join(sorted(params))}")
        out[name] = Setting(name, kind=_kind_of(hints.get(name, Any))).parse(value, f"{source} {name}")
    return out


def kafka_target(servers: str) -> str:
    """The cluster a relay publishes to, as recorded in the relays table: sorted host:port list."""
    hosts = sorted({h.strip().rsplit("://", 1)[-1].rsplit("@", 1)[-1] for h in servers.split(",") if h.strip()})
    return ",".join(hosts)[:255]


def rabbitmq_target(url: str) -> str:
    """``host:port/vhost`` of an AMQP URL: never the user or password."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    port = port or (5671 if parts.scheme == "amqps" else 5672)
    vhost = parts.path[1:] if parts.path.startswith("/") and len(parts.path) > 1 else "%2F"
    return f"{parts.hostname or 'localhost'}:{port}/{vhost}"[:255]


def build(args: argparse.Namespace) -> tuple[Any, Any, RelayConfig]:
    """Engine, publisher and config from arguments, environment and file (in that precedence)."""
    file = load_config_file(args.config)
    label = args.config or "OUTBOX_CONFIG"
    values = resolve(settings(), args, table="relay", file=file, file_label=label)
    db, kafka, rabbit = values.pop("db", None), values.pop("kafka", None), values.pop("rabbitmq", None)
    args.table_prefix, args.schema = values.pop("table_prefix", None), values.pop("schema", None)
    args.http, args.metrics_interval = values.pop("http", None), values.pop("metrics_interval", 5.0)
    if args.http:
        from ..observability.serve import check_endpoint

        check_endpoint(args.http)
    if not db:
        raise ConfigurationError("no database given: pass --db URL, set OUTBOX_DB_URL or put db in [relay]")
    if kafka and rabbit:
        raise ConfigurationError("choose one broker: --kafka or --rabbitmq, not both")
    if not kafka and not rabbit:
        raise ConfigurationError("no broker given: pass --kafka SERVERS or --rabbitmq URL")
    try:
        config = RelayConfig(**values)  # merged first, validated once
    except ConfigurationError as exc:
        raise values.explain(exc) from None

    options = parse_kv(args.broker_options)
    if kafka:
        from ..brokers.kafka import KafkaPublisher

        settings_ = {**{str(k): v for k, v in file.get("kafka", {}).items()}, **options}
        publisher: Any = KafkaPublisher(bootstrap_servers=str(kafka), config=settings_)
        target = f"Kafka {kafka}"
        args.broker_identity = ("kafka", kafka_target(str(kafka)))
    else:
        from ..brokers.rabbitmq import RabbitMQPublisher

        rabbit_opts = {**_rabbitmq_options(file.get("rabbitmq", {}), f"[rabbitmq] in {label}"),
                       **_rabbitmq_options(options, "-X")}
        if args.declare_exchanges is not None:
            rabbit_opts["declare_exchanges"] = args.declare_exchanges
        publisher = RabbitMQPublisher(url=str(rabbit), **rabbit_opts)
        target = f"RabbitMQ {rabbit}"
        args.broker_identity = ("rabbitmq", rabbitmq_target(str(rabbit)))
    engine = make_engine(str(db))
    log.info("publishing to %s", mask_secrets(target))
    return engine, publisher, config


def run(args: argparse.Namespace) -> int:
    from ..relay import Relay

    engine, publisher, config = build(args)
    require_schema(engine, tables_from_args(args), daemon=True)
    kind, where = getattr(args, "broker_identity", (None, None))
    relay = Relay(engine, publisher, config=config, tables=tables_from_args(args), broker_kind=kind,
                  broker_target=where)

    def _stop(signum: int, _frame: object) -> None:
        log.info("received %s: finishing the batch in hand, then leaving", signal.Signals(signum).name)
        relay.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    stop_http = _serve(relay, args)
    try:
        relay.run()
    finally:
        stop_http()
    engine.dispose()
    return 0


def _serve(relay: Any, args: argparse.Namespace) -> Any:
    """``--http``: metrics and probes around the relay (a no-op stopper when off)."""
    if not getattr(args, "http", None):
        return lambda: None
    from ..observability.serve import serve_relay

    return serve_relay(relay, args.http, interval=args.metrics_interval)
