"""``outbox consume MODULE:CLASS``: run a dedup consumer on Kafka or RabbitMQ until SIGTERM / SIGINT.

On SIGTERM or SIGINT the runner finishes the batch in hand (database commit, then offset commit
or ack) and the command exits 0.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from typing import Any

from .._redact import mask_secrets
from ..errors import ConfigurationError
from ._common import add_db_args, make_engine, require_db, tables_from_args

__all__ = ["load_consumer", "register"]

log = logging.getLogger("outbox.cli.consume")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigurationError(f"environment variable {name} must be an integer, got {value!r}") from None


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "consume", help="run a dedup consumer (Kafka or RabbitMQ)",
        description="Run MODULE:CLASS (a consumers.DedupConsumer subclass) until SIGTERM/SIGINT. "
        "Use --kafka/--topic/--group or --rabbitmq/--queue.",
    )
    p.add_argument("target", help="MODULE:CLASS of the consumer (the current directory is importable)")
    add_db_args(p)
    p.add_argument("--kafka", default=os.environ.get("OUTBOX_KAFKA_SERVERS") or os.environ.get(
        "KAFKA_BOOTSTRAP_SERVERS"), help="Kafka bootstrap servers (env OUTBOX_KAFKA_SERVERS)")
    p.add_argument("--topic", action="append", dest="topics", help="topic to consume (repeatable; env "
                   "OUTBOX_CONSUMER_TOPICS, comma-separated)")
    p.add_argument("--group", default=os.environ.get("OUTBOX_CONSUMER_GROUP"),
                   help="Kafka consumer group (env OUTBOX_CONSUMER_GROUP)")
    p.add_argument("--rabbitmq", default=os.environ.get("OUTBOX_RABBITMQ_URL"),
                   help="RabbitMQ URL (env OUTBOX_RABBITMQ_URL)")
    p.add_argument("--queue", default=os.environ.get("OUTBOX_CONSUMER_QUEUE"),
                   help="RabbitMQ queue (env OUTBOX_CONSUMER_QUEUE)")
    p.add_argument("--batch-size", type=int, default=_env_int("OUTBOX_CONSUMER_BATCH_SIZE"),
                   help="messages per transaction (env OUTBOX_CONSUMER_BATCH_SIZE)")
    p.add_argument("--batch-timeout", type=float, default=None, help="seconds to wait to fill a batch")
    p.add_argument("--max-attempts", type=int, default=_env_int("OUTBOX_CONSUMER_MAX_ATTEMPTS"),
                   help="tries before a message is dead-lettered (env OUTBOX_CONSUMER_MAX_ATTEMPTS)")
    p.add_argument("--prefetch", type=int, default=None, help="RabbitMQ prefetch (default 2 x batch size)")
    p.add_argument("--dead-letter-topic", default=os.environ.get("OUTBOX_DEAD_LETTER_TOPIC"),
                   help="Kafka topic that also receives dead letters")
    p.add_argument("--requeue-interval", type=float, default=30.0,
                   help="seconds between checks for requeued dead letters (default 30)")
    p.add_argument("--consumer-config", action="append", default=[], metavar="KEY=VALUE",
                   help="Kafka consumer setting passed to confluent-kafka (repeatable)")
    p.set_defaults(func=run)


def load_consumer(target: str, **overrides: Any) -> Any:
    """Import ``MODULE:CLASS`` (or ``MODULE:instance``) and return a consumer instance."""
    from consumers import DedupConsumer

    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigurationError(f"consumer must be given as MODULE:CLASS, got {target!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigurationError(f"{module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, type) and issubclass(obj, DedupConsumer):
        return obj(**{k: v for k, v in overrides.items() if v is not None})
    if isinstance(obj, DedupConsumer):
        return obj
    raise ConfigurationError(f"{target} is not a DedupConsumer subclass or instance")


def _kafka_config(pairs: list[str]) -> dict[str, str]:
    config = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigurationError(f"--consumer-config takes KEY=VALUE, got {mask_secrets(pair)!r}")
        config[key.strip()] = value
    return config


def run(args: argparse.Namespace) -> int:
    topics = args.topics or [t for t in os.environ.get("OUTBOX_CONSUMER_TOPICS", "").split(",") if t.strip()]
    if bool(args.kafka) == bool(args.rabbitmq):
        raise ConfigurationError("give exactly one broker: --kafka SERVERS (with --topic and --group) or "
                                 "--rabbitmq URL (with --queue)")
    if args.kafka and (not topics or not args.group):
        raise ConfigurationError("--kafka needs --topic (at least one) and --group")
    if args.rabbitmq and not args.queue:
        raise ConfigurationError("--rabbitmq needs --queue")
    consumer = load_consumer(args.target, max_attempts=args.max_attempts, tables=tables_from_args(args))
    engine = make_engine(require_db(args))
    batch: dict[str, Any] = {}
    if args.batch_size is not None:
        batch["batch_size"] = args.batch_size
    if args.batch_timeout is not None:
        batch["batch_timeout"] = args.batch_timeout
    runner: Any
    if args.kafka:
        from consumers.kafka import KafkaRunner

        runner = KafkaRunner(consumer, engine=engine, bootstrap_servers=args.kafka, topics=topics, group_id=args.group,
                             config=_kafka_config(args.consumer_config), dead_letter_topic=args.dead_letter_topic,
                             requeue_interval=args.requeue_interval, **batch)
        where = f"Kafka {args.kafka} topics {', '.join(topics)} group {args.group}"
    else:
        from consumers.rabbitmq import RabbitMQRunner

        runner = RabbitMQRunner(consumer, engine=engine, url=args.rabbitmq, queue=args.queue, prefetch=args.prefetch,
                                requeue_interval=args.requeue_interval, **batch)
        where = f"RabbitMQ {args.rabbitmq} queue {args.queue}"

    def _stop(signum: int, _frame: Any) -> None:
        log.info("signal %s: finishing the batch in hand, then stopping", signal.Signals(signum).name)
        runner.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info("consumer %s on %s, database %s", consumer.name, mask_secrets(where), mask_secrets(engine.url))
    try:
        runner.run()
    finally:
        engine.dispose()
    return 0
