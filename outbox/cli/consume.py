"""``outbox consume MODULE:CLASS``: run a dedup consumer on Kafka or RabbitMQ until SIGTERM / SIGINT.

An :class:`~consumers.AsyncDedupConsumer` runs on the transport's asyncio runner (``asyncio.run``), on
an ``AsyncEngine`` built from ``--db`` (psycopg 3 as it is; SQLite through aiosqlite; MySQL/MariaDB
through asyncmy or aiomysql, whichever is installed).

On SIGTERM or SIGINT the runner finishes the batch in hand (database commit, then offset commit
or ack) and the command exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
from typing import Any

from .._logging import set_process_context
from .._redact import mask_secrets
from ..config import Setting
from ..errors import ConfigurationError
from ..transports import get as get_transport
from ..transports.codecs import get_codec
from ._common import make_async_engine, open_database, settle_daemon_heap, sync_database_url, tables_from_args
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
from .relay import describe

__all__ = ["CONSUMER_SETTINGS", "load_consumer", "register", "settings"]

log = logging.getLogger("outbox.cli.consume")

#: the settings of ``outbox consume`` besides the connection and the broker (TOML table [consume])
CONSUMER_SETTINGS: tuple[Setting, ...] = (
    Setting("topics", kind="list", help="topic to consume", env=("OUTBOX_CONSUMER_TOPICS",), toml="topics",
            flags=("--topic",), metavar="TOPIC"),
    Setting("group", help="Kafka consumer group", env=("OUTBOX_CONSUMER_GROUP",), toml="group", flags=("--group",)),
    Setting("queue", help="RabbitMQ queue", env=("OUTBOX_CONSUMER_QUEUE",), toml="queue", flags=("--queue",)),
    Setting("batch_size", kind="int", minimum=1, maximum=100_000,
            help="messages per transaction (default 500 on Kafka, 100 on RabbitMQ)",
            env=("OUTBOX_CONSUMER_BATCH_SIZE",), toml="batch_size", flags=("--batch-size",)),
    Setting("batch_timeout", kind="float", positive=True, help="seconds to wait to fill a batch (default 0.5)",
            env=("OUTBOX_CONSUMER_BATCH_TIMEOUT",), toml="batch_timeout", flags=("--batch-timeout",)),
    Setting("max_attempts", kind="int", minimum=1, maximum=1_000_000,
            help="tries before a message is dead-lettered (default: the class's max_attempts, 5)",
            env=("OUTBOX_CONSUMER_MAX_ATTEMPTS",),
            toml="max_attempts", flags=("--max-attempts",)),
    Setting("prefetch", kind="int", minimum=1, maximum=65535, help="RabbitMQ prefetch (default 2 x batch size)",
            env=("OUTBOX_CONSUMER_PREFETCH",), toml="prefetch", flags=("--prefetch",)),
    Setting("dead_letter_topic", help="Kafka topic that also receives dead letters",
            env=("OUTBOX_CONSUMER_DEAD_LETTER_TOPIC", "OUTBOX_DEAD_LETTER_TOPIC"), toml="dead_letter_topic",
            flags=("--dead-letter-topic",)),
    Setting("requeue_interval", kind="float", positive=True, default=30.0,
            help="seconds between checks for requeued dead letters", env=("OUTBOX_CONSUMER_REQUEUE_INTERVAL",),
            toml="requeue_interval", flags=("--requeue-interval",)),
    Setting("id_from", kind="list",
            help="where message ids come from, in order: header:NAME, message_id (AMQP property), cloudevents, "
            "hash (content hash), default (default: the consumer's id_from, else header:message-id, cloudevents, "
            "header:id, message_id)",
            env=("OUTBOX_CONSUMER_ID_FROM",), toml="id_from", flags=("--id-from",), metavar="SOURCE"),
    Setting("progress_interval", kind="float", minimum=0, default=10.0,
            help="seconds between progress lines while messages arrive (0: none)",
            env=("OUTBOX_CONSUMER_PROGRESS_INTERVAL",), toml="progress_interval", flags=("--progress-interval",)),
    Setting("codec", default="native", help="wire format to read: native, cloudevents, debezium (or a registered "
            "codec)", env=("OUTBOX_CONSUMER_CODEC",), toml="codec", flags=("--codec",)),
)


_NEEDS = {"topics": "--topic (at least one)", "group": "--group", "queue": "--queue"}


def settings() -> tuple[Setting, ...]:
    return (*CONNECTION_SETTINGS, *BROKER_SETTINGS, *CONSUMER_SETTINGS, *OBSERVABILITY_SETTINGS)


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "consume", help="run a dedup consumer (Kafka or RabbitMQ)",
        description="Run MODULE:CLASS (a consumers.DedupConsumer or AsyncDedupConsumer subclass) until SIGTERM/SIGINT. "
        "Use --kafka/--topic/--group or --rabbitmq/--queue. Settings come from the command line, then "
        "OUTBOX_* environment variables, then the [consume] table of the TOML file given with --config.",
    )
    p.add_argument("target", help="MODULE:CLASS of the consumer (the current directory is importable)")
    add_settings(p, settings())
    add_common_options(p, x_aliases=("--consumer-config",))
    p.set_defaults(func=run)


def load_consumer(target: str, **overrides: Any) -> Any:
    """Import ``MODULE:CLASS`` (or ``MODULE:instance``) and return a consumer instance: a
    :class:`~consumers.DedupConsumer` or an :class:`~consumers.AsyncDedupConsumer`."""
    from consumers.base import DedupCore as DedupConsumer

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
        if overrides.get("id_from") is not None:  # --id-from applies to an instance too
            from consumers.ids import parse_id_sources

            obj.id_sources = parse_id_sources(overrides["id_from"], "--id-from")
        return obj
    raise ConfigurationError(f"{target} is not a DedupConsumer or AsyncDedupConsumer subclass or instance")


def run(args: argparse.Namespace) -> int:
    file = load_config_file(args.config)
    label = args.config or "OUTBOX_CONFIG"
    v = resolve(settings(), args, table="consume", file=file, file_label=label)
    args.table_prefix, args.schema = v.get("table_prefix"), v.get("schema")
    get_codec(v.get("codec"))  # an unknown --codec fails here, naming the known ones
    id_from = None
    if v.get("id_from") is not None:  # checked before anything connects: the error names the flag/variable/key
        from consumers.ids import parse_id_sources

        id_from = parse_id_sources(v["id_from"], v.sources.get("id_from", "--id-from"))
    try:
        name, where = choose_broker(v)
    except ConfigurationError as exc:
        if "no broker given" in str(exc) or "choose one broker" in str(exc):
            raise ConfigurationError("give exactly one broker: --kafka SERVERS (with --topic and --group), "
                                     "--rabbitmq URL (with --queue) or --broker NAME --broker-url TARGET") from None
        raise
    if v.get("http"):
        from ..observability.serve import check_endpoint

        check_endpoint(v["http"])
    transport = get_transport(name)
    flag = {"kafka": "--kafka", "rabbitmq": "--rabbitmq"}.get(name, f"--broker {name}")
    needs = getattr(transport, "consume_requires", ())
    missing = [s for s in needs if not v.get(s)]
    if missing:
        raise ConfigurationError(f"{flag} needs " + " and ".join(_NEEDS.get(s, f"--{s}") for s in needs))
    takes = getattr(transport, "consume_takes_options", True)
    table = file.get(name, {}) if takes else {}  # ([rabbitmq] holds the relay's publisher options)
    options = {**{str(k): val for k, val in table.items()}, **parse_kv(args.broker_options)}
    if options and not takes:
        raise ConfigurationError(f"-X passes librdkafka settings to a Kafka consumer; with {flag} use the "
                                 "flags (--prefetch, --batch-size, ...)")
    args.broker_name, args.broker_url = name, where
    if not v.get("db"):
        raise ConfigurationError("no database given: pass --db URL, set OUTBOX_DB_URL or put db in [consume]")
    args.db = sync_database_url(v["db"])  # the schema check runs on a sync engine, an async consumer or not
    consumer = load_consumer(args.target, max_attempts=v.get("max_attempts"), tables=tables_from_args(args),
                             id_from=id_from)
    if is_async(consumer) and not hasattr(transport, "async_runner"):
        raise ConfigurationError(f"{type(consumer).__name__} is an AsyncDedupConsumer, and the {name} transport has "
                                 "no asyncio runner: use a DedupConsumer with it")
    engine = open_database(args, daemon=True)
    try:
        return _run(args, v, consumer, engine, options, file)
    finally:
        engine.dispose()


def is_async(consumer: Any) -> bool:
    """An :class:`~consumers.AsyncDedupConsumer` (its ``process_batch`` is a coroutine function)."""
    import inspect

    return inspect.iscoroutinefunction(getattr(consumer, "process_batch", None))


def _run(args: argparse.Namespace, v: dict[str, Any], consumer: Any, engine: Any, options: dict[str, str],
         file: dict[str, dict[str, Any]]) -> int:
    name, where = args.broker_name, args.broker_url
    transport = get_transport(name)
    batch = {k: v[k] for k in ("batch_size", "batch_timeout") if k in v}
    opts: dict[str, Any] = {"requeue_interval": v.get("requeue_interval", 30.0), **batch}
    for setting, param in (("topics", "topics"), ("group", "group_id"), ("queue", "queue"),
                           ("prefetch", "prefetch"), ("dead_letter_topic", "dead_letter_topic")):
        if v.get(setting) is not None:
            opts[param] = list(v[setting]) if setting == "topics" else v[setting]
    aengine = make_async_engine(engine, given=v["db"]) if is_async(consumer) else None
    make = transport.runner if aengine is None else transport.async_runner  # type: ignore[attr-defined]
    runner: Any = make(consumer, engine=engine if aengine is None else aengine, target=where, settings=options,
                       codec=get_codec(v.get("codec")), **opts)
    facts = [f"{k} {', '.join(opts[k]) if k == 'topics' else opts[k]}" for k in ("topics", "group_id", "queue")
             if k in opts]
    where = " ".join([describe(transport, where), *facts]).replace("group_id", "group")

    def _stop(signum: int, _frame: Any) -> None:
        log.info("signal %s: finishing the batch in hand, then stopping", signal.Signals(signum).name)
        runner.stop()

    if aengine is None:
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
    runner.progress_interval = float(v.get("progress_interval", 10.0))
    set_process_context(consumer=consumer.name)
    log.info("consumer %s on %s, database %s", consumer.name, mask_secrets(where), mask_secrets(engine.url))
    stop_http = _serve(runner, engine, args, v)
    # A daemon, as the relay (cli/relay.py): what start-up made is left out of every later collection,
    # whose full passes otherwise walk it all (5-7 us of collection a message instead of 14-21 us in
    # bench_async_consumer.py's batches of 500; docs/benchmarks.md), and the young generation waits
    # for 10,000 live objects
    settle_daemon_heap()
    try:
        if aengine is None:
            runner.run()
        else:
            asyncio.run(_run_async(runner, aengine))
    except Exception as exc:  # librdkafka checks its settings when the consumer is created
        err = exc.args[0] if exc.args else None
        if type(exc).__name__ == "KafkaException" and getattr(err, "code", lambda: None)() == -186:
            raise ConfigurationError(f"invalid Kafka consumer setting: {mask_secrets(err.str())}") from None
        raise
    finally:
        stop_http()
    return 0


async def _run_async(runner: Any, aengine: Any) -> None:
    """``await runner.run()`` with SIGTERM/SIGINT handled on the loop: finish the batch in hand, then stop."""
    loop = asyncio.get_running_loop()

    def _stop(signum: int) -> None:
        log.info("signal %s: finishing the batch in hand, then stopping", signal.Signals(signum).name)
        runner.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _stop, sig)
    try:
        await runner.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await aengine.dispose()


def _serve(runner: Any, engine: Any, args: argparse.Namespace, v: dict[str, Any]) -> Any:
    """``--http``: metrics and probes around the runner (a no-op stopper when off)."""
    if not v.get("http"):
        return lambda: None
    from ..observability.serve import serve_consumer

    return serve_consumer(runner, engine, v["http"], interval=v.get("metrics_interval", 5.0),
                          tables=tables_from_args(args))
