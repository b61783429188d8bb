"""``outbox relay``: the daemon that publishes committed outbox rows."""

from __future__ import annotations

import argparse
import logging
import signal
from typing import Any

from .._logging import set_process_context
from .._redact import mask_secrets
from ..config import RelayConfig, Setting, relay_settings
from ..errors import ConfigurationError
from ..transports import get as get_transport
from ..transports.codecs import get_codec
from ._common import make_engine, require_schema, settle_daemon_heap, tables_from_args
from ._settings import (
    BROKER_SETTINGS,
    CONNECTION_SETTINGS,
    OBSERVABILITY_SETTINGS,
    add_common_options,
    add_settings,
    choose_broker,
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


def kafka_target(servers: str) -> str:
    """The cluster a relay publishes to, as recorded in the relays table: sorted host:port list."""
    return get_transport("kafka").identity(servers)  # type: ignore[attr-defined, no-any-return]


def rabbitmq_target(url: str) -> str:
    """``host:port/vhost`` of an AMQP URL: never the user or password."""
    return get_transport("rabbitmq").identity(url)  # type: ignore[attr-defined, no-any-return]


def describe(transport: Any, target: str) -> str:
    """How the log names where a transport sends (secrets are masked by the caller)."""
    fn = getattr(transport, "describe", None)
    return str(fn(target)) if fn is not None else f"{transport.name} {target}"


def identity(transport: Any, target: str) -> str:
    """The broker as recorded in the relays table: never a user or password."""
    fn = getattr(transport, "identity", None)
    return str(fn(target))[:255] if fn is not None else mask_secrets(target)[:255]


def build(args: argparse.Namespace) -> tuple[Any, Any, RelayConfig]:
    """Engine, publisher and config from arguments, environment and file (in that precedence)."""
    file = load_config_file(args.config)
    label = args.config or "OUTBOX_CONFIG"
    values = resolve(settings(), args, table="relay", file=file, file_label=label)
    db = values.pop("db", None)
    args.table_prefix, args.schema = values.pop("table_prefix", None), values.pop("schema", None)
    args.http, args.metrics_interval = values.pop("http", None), values.pop("metrics_interval", 5.0)
    if args.http:
        from ..observability.serve import check_endpoint

        check_endpoint(args.http)
    if not db:
        raise ConfigurationError("no database given: pass --db URL, set OUTBOX_DB_URL or put db in [relay]")
    name, where = choose_broker(values)
    try:
        config = RelayConfig(**values)  # merged first, validated once
    except ConfigurationError as exc:
        raise values.explain(exc) from None

    transport = get_transport(name)
    table = file.get(name, {})
    options = {**{str(k): v for k, v in table.items()}, **parse_kv(args.broker_options)}
    relay_opts: dict[str, Any] = {}
    if args.declare_exchanges is not None:
        if transport.binding != "amqp":
            raise ConfigurationError("--declare-exchanges is a RabbitMQ option; it does not apply to --broker "
                                     f"{name}")
        relay_opts["declare_exchanges"] = args.declare_exchanges
    try:
        publisher: Any = transport.publisher(where, options, codec=get_codec(config.codec, source=config.ce_source),
                                             **relay_opts)
    except ConfigurationError as exc:
        if table and f"[{name}]" not in str(exc):
            raise ConfigurationError(f"{exc} (from -X or [{name}] in {label})") from None
        raise
    target = describe(transport, where)
    args.broker_identity = (name, identity(transport, where))
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
    set_process_context(relay_id=relay.relay_id, relay_group=config.group)

    def _stop(signum: int, _frame: object) -> None:
        log.info("received %s: finishing the batch in hand, then leaving", signal.Signals(signum).name)
        relay.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    stop_http = _serve(relay, args)
    settle_daemon_heap()  # start-up's objects frozen, the young generation collected less often
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
