"""``outbox relay``: the daemon that publishes committed outbox rows."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import urllib.parse
from typing import Any

from .._redact import mask_secrets
from ..config import RelayConfig, load_toml
from ..errors import ConfigurationError
from ._common import add_db_args, make_engine, tables_from_args

log = logging.getLogger("outbox.relay")


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "relay",
        help="publish committed outbox rows to Kafka or RabbitMQ",
        description="Run the relay until SIGTERM/SIGINT. Settings come from the command line, then "
        "OUTBOX_* environment variables, then the TOML file given with --config.",
    )
    add_db_args(p)
    target = p.add_mutually_exclusive_group()
    target.add_argument("--kafka", metavar="SERVERS",
                        help="Kafka bootstrap servers (env OUTBOX_KAFKA_BOOTSTRAP_SERVERS)")
    target.add_argument("--rabbitmq", metavar="URL", help="RabbitMQ URL, amqp://... (env OUTBOX_RABBITMQ_URL)")
    p.add_argument("--config", metavar="FILE", help="TOML file with [relay], [kafka] and [rabbitmq] tables")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--ordering", choices=["strict", "none"])
    p.add_argument("--max-attempts", type=int)
    p.add_argument("--poll-interval", type=float, help="longest idle wait, seconds")
    p.add_argument("--lease-ttl", type=float, help="seconds before a silent relay's partitions are taken over")
    p.add_argument("--partitions", type=int, help="partition count the writers use (default 32)")
    p.add_argument("--notify", action="store_true", default=None, help="wake up on PostgreSQL NOTIFY")
    p.add_argument("--audit", action="store_true", default=None,
                   help="keep published rows (status 'published') instead of deleting them")
    p.add_argument("--relay-id", help="name shown in `outbox status`")
    p.add_argument("--group", help="relay group (default 'default'): its relays share the partitions and one broker")
    p.add_argument("--topics", metavar="PATTERN[,PATTERN...]",
                   help="topics this relay's group publishes: names, or prefixes ending in * (default: every topic)")
    p.add_argument("-X", "--broker-option", action="append", default=[], metavar="KEY=VALUE",
                   help="librdkafka setting (Kafka) or publisher option (RabbitMQ); repeatable")
    p.add_argument("--declare-exchanges", action="store_true", default=None,
                   help="RabbitMQ: declare missing exchanges instead of failing their messages")
    p.set_defaults(func=run)


def _kv(pairs: list[str]) -> dict[str, str]:
    out = {}
    for item in pairs:
        if "=" not in item:
            raise ConfigurationError(f"broker option {item!r} is not KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
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
    file_cfg: dict[str, Any] = load_toml(args.config) if args.config else {}
    relay_file = dict(file_cfg.get("relay", {}))
    db = args.db or os.environ.get("OUTBOX_DB_URL") or relay_file.pop("db", None)
    relay_file.pop("db", None)
    kafka = args.kafka or os.environ.get("OUTBOX_KAFKA_BOOTSTRAP_SERVERS")
    rabbit = args.rabbitmq or os.environ.get("OUTBOX_RABBITMQ_URL")
    file_kafka = relay_file.pop("kafka", None)
    file_rabbit = relay_file.pop("rabbitmq", None)
    if not kafka and not rabbit:
        kafka, rabbit = file_kafka, file_rabbit
    if not db:
        raise ConfigurationError("no database given: pass --db URL, set OUTBOX_DB_URL or put db in [relay]")
    if kafka and rabbit:
        raise ConfigurationError("choose one broker: --kafka or --rabbitmq, not both")
    if not kafka and not rabbit:
        raise ConfigurationError("no broker given: pass --kafka SERVERS or --rabbitmq URL")

    cli = {
        "batch_size": args.batch_size, "ordering": args.ordering, "max_attempts": args.max_attempts,
        "poll_interval": args.poll_interval, "lease_ttl": args.lease_ttl, "partitions": args.partitions,
        "notify": args.notify, "relay_id": args.relay_id, "group": args.group, "topics": args.topics,
        "delete_published": (not args.audit) if args.audit is not None else None,
    }
    # merge first, validate once: the file, then the environment, then the command line
    merged = {**relay_file, **RelayConfig.env_values(), **{k: v for k, v in cli.items() if v is not None}}
    config = RelayConfig.from_mapping(merged)

    options = _kv(args.broker_option)
    if kafka:
        from ..brokers.kafka import KafkaPublisher

        settings = {**{str(k): v for k, v in file_cfg.get("kafka", {}).items()}, **options}
        publisher: Any = KafkaPublisher(bootstrap_servers=str(kafka), config=settings)
        target = f"Kafka {kafka}"
        args.broker_identity = ("kafka", kafka_target(str(kafka)))
    else:
        from ..brokers.rabbitmq import RabbitMQPublisher

        rabbit_opts: dict[str, Any] = {**file_cfg.get("rabbitmq", {}), **options}
        if args.declare_exchanges is not None:
            rabbit_opts["declare_exchanges"] = args.declare_exchanges
        if "declare_exchanges" in rabbit_opts and isinstance(rabbit_opts["declare_exchanges"], str):
            rabbit_opts["declare_exchanges"] = rabbit_opts["declare_exchanges"].lower() in ("1", "true", "yes")
        publisher = RabbitMQPublisher(url=str(rabbit), **rabbit_opts)
        target = f"RabbitMQ {mask_secrets(rabbit)}"
        args.broker_identity = ("rabbitmq", rabbitmq_target(str(rabbit)))
    engine = make_engine(str(db))
    log.info("publishing to %s", target)
    return engine, publisher, config


def run(args: argparse.Namespace) -> int:
    from ..relay import Relay

    engine, publisher, config = build(args)
    kind, where = getattr(args, "broker_identity", (None, None))
    relay = Relay(engine, publisher, config=config, tables=tables_from_args(args), broker_kind=kind,
                  broker_target=where)

    def _stop(signum: int, _frame: object) -> None:
        log.info("received %s: finishing the batch in hand, then leaving", signal.Signals(signum).name)
        relay.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    relay.run()
    engine.dispose()
    return 0
