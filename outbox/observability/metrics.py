"""Prometheus instruments of the relay and the consumers, in a private registry per process.

- :class:`MetricsPublisher` decorates any :class:`~outbox.transports.base.Publisher` (Watermill's
  ``components/metrics`` style): outcomes per topic, batch size and duration, commit-to-ack
  latency, and what it learns about the broker link (for ``/readyz``).
- :class:`StatusPoller` runs the queries behind the row gauges on a background thread, every
  ``interval`` seconds, on its own connection; a scrape only reads what it left.
- relay facts (leases held, takeovers, fenced rows) are read from the relay object at scrape time
  by a collector: no calls spread through the relay loop.
- :class:`ConsumerMetrics` observes a consumer runner (``runner.observer``).

``reason`` labels are short codes (:func:`error_code`), never the broker's text.
"""

from __future__ import annotations

import bisect
import contextlib
import datetime as dt
import inspect
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .._redact import mask_secrets
from ..errors import BrokerUnavailable
from ..incoming import text_form
from ..message import OutboxRecord
from ..transports.base import Outcome, Publisher, PublishResult
from .health import Health

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from ..schema import OutboxTables

__all__ = [
    "ConsumerMetrics",
    "MetricsPublisher",
    "RelayMetrics",
    "StatusPoller",
    "error_code",
    "new_registry",
    "require_prometheus",
]

log = logging.getLogger("outbox.metrics")

INSTALL_HINT = "metrics need prometheus-client: pip install 'outboxkit[metrics]'"

#: row states of ``outbox_relay_rows``
ROW_STATES = ("pending", "due", "delayed", "blocked", "dead")
#: at most this many blocking rows get their own ``outbox_relay_blocking_rows`` series (the largest
#: first): enough to see what is stuck at 3 a.m., bounded so that a poison flood cannot blow up the
#: scrape; ``outbox status`` lists them all
MAX_BLOCKER_SERIES = 20
#: a key label is cut to this many characters (a key can be up to 255 bytes of anything)
_KEY_LABEL = 64
#: seconds between broker link probes while the relay is idle (Publisher.healthy, when an adapter has it)
PROBE_INTERVAL = 5.0
#: seconds between checks that the database schema is at the head revision
SCHEMA_CHECK_INTERVAL = 60.0

_BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

# first match wins; the text is the broker's or database's error, already masked
_CODES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("too_large", re.compile(r"too.?large|MSG_SIZE|size.*exceed|exceed.*size|RECORD_LIST_TOO_LARGE", re.I)),
    ("unknown_topic", re.compile(r"unknown.?topic|UNKNOWN_TOPIC|no (?:such )?exchange|NOT_FOUND.*exchange", re.I)),
    ("unroutable", re.compile(r"unroutable|NO_ROUTE|returned", re.I)),
    ("not_authorized", re.compile(r"authori[sz]|ACCESS_REFUSED|AUTHENTICATION|SASL|forbidden|denied", re.I)),
    ("timeout", re.compile(r"time.?out|TIMED_OUT", re.I)),
    ("broker_unavailable", re.compile(
        r"unavailable|refused|TRANSPORT|ALL_BROKERS_DOWN|connection|not connected|closed|reset|unreachable", re.I)),
    ("database", re.compile(r"database|sql|OperationalError|IntegrityError|DataError|deadlock", re.I)),
)


def error_code(text: object) -> str:
    """A short, bounded code for an error text: one of the ``reason`` label values."""
    s = str(text or "")
    for code, pattern in _CODES:
        if pattern.search(s):
            return code
    return "other"


def require_prometheus() -> Any:
    """The ``prometheus_client`` module, or a :class:`~outbox.errors.ConfigurationError` saying what to install."""
    try:
        import prometheus_client
    except ImportError:
        from ..errors import ConfigurationError

        raise ConfigurationError(INSTALL_HINT) from None
    return prometheus_client


def new_registry() -> Any:
    return require_prometheus().CollectorRegistry(auto_describe=True)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("outboxkit")
    except Exception:
        return "unknown"


def _info(registry: Any, component: str) -> Any:
    pc = require_prometheus()
    g = pc.Gauge("outbox_info", "outboxkit version and component; always 1", ("version", "component"),
                 registry=registry)
    g.labels(version=_version(), component=component).set(1)
    return g


#: the relay facts read from the relay object at scrape time (see _RelayFacts): name, type, help
RELAY_FACTS = (
    ("outbox_relay_leases_held", "gauge", "partition leases this relay holds"),
    ("outbox_relay_lease_takeovers", "counter", "partitions taken over from a relay whose lease lapsed"),
    ("outbox_relay_fenced_rows", "counter", "published rows left unmarked because their partition's lease moved "
     "to another relay"),
)


# ---------------------------------------------------------------------------- relay


class RelayMetrics:
    """The relay's instruments, in ``registry`` (a new private one by default)."""

    def __init__(self, registry: Any = None) -> None:
        pc = require_prometheus()
        self.registry = registry if registry is not None else new_registry()
        r = self.registry
        self.info = _info(r, "relay")
        self.published = pc.Counter("outbox_relay_messages_published", "messages the broker acknowledged",
                                    ("topic",), registry=r)
        self.retried = pc.Counter("outbox_relay_messages_retried", "messages not delivered, to be retried",
                                  ("topic", "reason"), registry=r)
        self.dead = pc.Counter("outbox_relay_messages_dead", "messages the broker refused for good, or retried "
                               "max_attempts times (marked dead)", ("topic", "reason"), registry=r)
        self.batch_size = pc.Histogram("outbox_relay_batch_size", "messages per published batch",
                                       buckets=_BATCH_BUCKETS, registry=r)
        self.batch_duration = pc.Histogram("outbox_relay_batch_duration_seconds",
                                           "seconds from sending a batch to the broker's last verdict", registry=r)
        self.latency = pc.Histogram("outbox_relay_delivery_latency_seconds",
                                    "seconds from the row's commit (created_at) to the broker's ack",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.rows = pc.Gauge("outbox_relay_rows", "outbox rows by topic and state (pending = due + delayed + "
                             "blocked); refreshed every metrics interval", ("topic", "state"), registry=r)
        self.oldest_age = pc.Gauge("outbox_relay_oldest_pending_age_seconds",
                                   "age of the oldest pending row (0 when none)", registry=r)
        self.blocked_keys = pc.Gauge("outbox_relay_blocked_keys",
                                     "keys held back by strict ordering behind a dead or retrying row", ("topic",),
                                     registry=r)
        self.blocking = pc.Gauge("outbox_relay_blocking_rows",
                                 "rows held back behind one dead or retrying row (its row id in blocking_id, "
                                 f"for `outbox dead`), the {MAX_BLOCKER_SERIES} largest; refreshed every metrics "
                                 "interval", ("topic", "key", "blocking_id"), registry=r)
        self.last_loop = pc.Gauge("outbox_relay_last_loop_timestamp_seconds",
                                  "unix time of the relay loop's last turn", registry=r)
        self.max_attempts: int | None = None

    def attach(self, relay: Any) -> None:
        """Read leases held, takeovers and fenced rows from ``relay`` at scrape time."""
        self.max_attempts = relay.config.max_attempts
        self.registry.register(_RelayFacts(relay))


class _RelayFacts:
    """Scrape-time view of the relay object's own counters (no locks: plain reads of ints and dicts)."""

    def __init__(self, relay: Any) -> None:
        self.relay = relay
        self._taken: set[tuple[int, float]] = set()

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        leases = self.relay.leases
        held = acquired = None
        for _ in range(3):  # the relay thread may resize the dicts meanwhile
            with contextlib.suppress(RuntimeError):
                held, acquired = len(leases.held), set(leases.acquired_at.items())
                break
        if acquired is not None:
            self._taken |= acquired
        values = {"outbox_relay_leases_held": held or 0, "outbox_relay_lease_takeovers": len(self._taken),
                  "outbox_relay_fenced_rows": self.relay.stats.fenced}
        for name, kind, doc in RELAY_FACTS:
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            yield family(name, doc, value=values[name])


class MetricsPublisher:
    """A :class:`~outbox.transports.base.Publisher` that measures ``inner``: use it in its place.

    It also remembers what it learnt about the broker link: :meth:`broker_problem` is ``None``
    while the broker answers, else why not (for ``/readyz``).
    """

    def __init__(self, inner: Publisher, metrics: RelayMetrics, *, health: Health | None = None) -> None:
        self.inner = inner
        self.metrics = metrics
        self.health = health
        self._problem: str | None = "not connected yet"
        self._last_probe = 0.0
        self._wall_offset = time.time() - time.monotonic()

    def __getattr__(self, name: str) -> Any:  # anything else the adapter offers
        return getattr(self.inner, name)

    # -------------------------------------------------------------- link state
    def broker_problem(self) -> str | None:
        return self._problem

    def _turned(self) -> None:
        if self.health is not None:
            self.health.loop_turned()
        self.metrics.last_loop.set(time.time())

    def _lost(self, why: object) -> None:
        self._problem = f"broker unreachable: {' '.join(mask_secrets(why).split())[:300]}"

    # -------------------------------------------------------------- Publisher
    def start(self) -> None:
        self._turned()
        try:
            self.inner.start()
        except Exception as exc:
            self._lost(exc)
            raise
        self._problem = None

    def publish(self, records: Sequence[OutboxRecord], *, timeout: float = 30.0) -> list[PublishResult]:
        return self.begin_publish(records, timeout=timeout)()

    def begin_publish(self, records: Sequence[OutboxRecord], *,
                      timeout: float = 30.0) -> Callable[[], list[PublishResult]]:
        """The inner adapter's ``begin_publish`` (its ``publish`` if it has none), measured from send to verdict."""
        self._turned()
        t0 = time.perf_counter()
        try:
            if getattr(type(self.inner), "begin_publish", None) is not None:
                wait = self.inner.begin_publish(records, timeout=timeout)  # type: ignore[attr-defined]
            else:
                done = self.inner.publish(records, timeout=timeout)
                wait = lambda: done  # noqa: E731
        except BrokerUnavailable as exc:
            self._lost(exc)
            raise

        def verdicts() -> list[PublishResult]:
            try:
                results = wait()
            except BrokerUnavailable as exc:
                self._lost(exc)
                raise
            m = self.metrics
            m.batch_size.observe(len(records))
            m.batch_duration.observe(time.perf_counter() - t0)
            self._count(records, results)
            self._turned()
            return results

        return verdicts

    def _count(self, records: Sequence[OutboxRecord], results: list[PublishResult]) -> None:
        m = self.metrics
        now = time.time()
        # one result per record, in the order given (the Publisher protocol): no lookup by id
        paired = zip(records, results, strict=True) if len(records) == len(results) else _by_id(records, results)
        delivered: dict[str, int] = {}
        latencies: list[float] = []
        link_errors: list[str] = []
        for rec, res in paired:
            if res.outcome is Outcome.DELIVERED:
                topic = rec.topic
                delivered[topic] = delivered.get(topic, 0) + 1
                created = rec.created_at
                if created is not None:
                    latencies.append(max(0.0, now - created.timestamp()))
                continue
            if res.held:  # not sent: no attempt, nothing to count
                continue
            code = error_code(res.error)
            if code in ("broker_unavailable", "timeout"):
                link_errors.append(res.error or code)
            if res.outcome is Outcome.FAILED or (m.max_attempts is not None and rec.attempts + 1 >= m.max_attempts):
                m.dead.labels(topic=rec.topic, reason=code).inc()
            else:
                m.retried.labels(topic=rec.topic, reason=code).inc()
        if latencies:
            observe_many(m.latency, latencies)
        for topic, n in delivered.items():
            m.published.labels(topic=topic).inc(n)
        if delivered:
            self._problem = None
        elif link_errors and len(link_errors) == len(results):
            self._lost(link_errors[0])

    def flush(self, timeout: float = 30.0) -> None:
        self.inner.flush(timeout)

    def idle(self, timeout: float) -> None:
        self._turned()
        idle = getattr(self.inner, "idle", None)
        if idle is not None:
            idle(timeout)
        probe = getattr(self.inner, "healthy", None)
        now = time.monotonic()
        if probe is not None and now - self._last_probe >= PROBE_INTERVAL:
            self._last_probe = now
            try:
                why = probe()
            except Exception as exc:
                why = f"{type(exc).__name__}: {exc}"
            if why:
                self._lost(why)
            else:
                self._problem = None
        self._turned()

    def close(self, timeout: float = 10.0) -> None:
        self.inner.close(timeout)


# ---------------------------------------------------------------------------- the row gauges


class StatusPoller:
    """Every ``interval`` s, on a daemon thread and its own connection: row counts per topic and
    state, the oldest pending age, blocked keys, and whether the database answers at the schema head.
    """

    def __init__(self, engine: Engine, metrics: RelayMetrics | None, *, tables: OutboxTables | None = None,
                 interval: float = 5.0) -> None:
        from ..schema import default_tables

        self.engine = engine
        self.metrics = metrics
        self.tables = tables or default_tables()
        self.interval = interval
        self.db_problem: str | None = "not checked yet"
        self.schema_problem: str | None = None
        self.last_ok: float | None = None
        self.unowned_partitions: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._topics: set[str] = set()
        self._schema_due = 0.0

    def start(self) -> StatusPoller:
        self._thread = threading.Thread(target=self._run, name="outbox-metrics-poller", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self.interval)

    def poll_once(self) -> None:
        try:
            self._poll()
        except Exception as exc:
            self.db_problem = f"database unreachable: {' '.join(mask_secrets(exc).split())[:300]}"
            log.debug("metrics poll failed: %s", self.db_problem)
        else:
            self.db_problem = None
            self.last_ok = time.monotonic()

    def _poll(self) -> None:
        import sqlalchemy as sa

        from .. import migrations
        from ..admin import _aware as _readable_aware
        from ..admin import _blocked_select, _reader
        from ..schema import STATUS_DEAD, STATUS_PENDING

        o, le = self.tables.outbox, self.tables.leases
        now = dt.datetime.now(dt.timezone.utc)
        ts = _reader(self.engine)  # a hand-written created_at no datetime holds must not fail the poll
        counts: dict[str, dict[str, int]] = {}
        blocked_keys: dict[str, int] = {}
        with self.engine.connect() as conn:
            if self._schema_due <= time.monotonic() or self.schema_problem:
                self.schema_problem = _schema_problem(conn, self.tables, migrations)
                self._schema_due = time.monotonic() + SCHEMA_CHECK_INTERVAL
            if self.metrics is None:  # a consumer: the database check only
                return
            due_col = sa.case((o.c.available_at <= now, 1), else_=0)
            rows = conn.execute(
                sa.select(o.c.topic, o.c.status, sa.func.count(), sa.func.sum(due_col))
                .where(o.c.status.in_((STATUS_PENDING, STATUS_DEAD))).group_by(o.c.topic, o.c.status)
            ).all()
            oldest = _readable_aware(conn.execute(
                sa.select(ts(sa.func.min(o.c.created_at))).where(o.c.status == STATUS_PENDING)).scalar())
            for topic, status, n, due in rows:
                c = counts.setdefault(str(topic), dict.fromkeys(ROW_STATES, 0))
                if status == STATUS_DEAD:
                    c["dead"] += int(n)
                else:
                    c["pending"] += int(n)
                    c["due"] += int(due or 0)
                    c["delayed"] += int(n) - int(due or 0)
            blockers: list[tuple[int, str, str, str]] = []
            for topic, key, bid, n, due, _since in conn.execute(_blocked_select(self.tables, now, ts)):
                blockers.append((int(n), str(topic), "" if key is None else text_form(key)[:_KEY_LABEL], str(bid)))
                c = counts.setdefault(str(topic), dict.fromkeys(ROW_STATES, 0))
                c["blocked"] += int(n)
                c["due"] -= int(due or 0)
                c["delayed"] -= int(n) - int(due or 0)
                blocked_keys[str(topic)] = blocked_keys.get(str(topic), 0) + 1
            leases = conn.execute(sa.select(le.c.owner, le.c.expires_at)).all()
        self.unowned_partitions = sum(1 for owner, exp in leases
                                      if owner is None or exp is None or _aware(exp) <= now)
        m = self.metrics
        assert m is not None
        for topic in self._topics - set(counts):  # a topic that emptied reads 0, not its last value
            counts[topic] = dict.fromkeys(ROW_STATES, 0)
        for topic, c in counts.items():
            for state, n in c.items():
                m.rows.labels(topic=topic, state=state).set(max(0, n))
            m.blocked_keys.labels(topic=topic).set(blocked_keys.get(topic, 0))
        self._topics |= set(counts)
        m.blocking.clear()  # a blocker requeued or purged since the last poll goes away
        for n, topic, key, bid in sorted(blockers, reverse=True)[:MAX_BLOCKER_SERIES]:
            m.blocking.labels(topic=topic, key=key, blocking_id=bid).set(n)
        # ('-infinity' and such stay text: no age; the relay marks that row dead when it claims it)
        m.oldest_age.set(max(0.0, (now - oldest).total_seconds()) if isinstance(oldest, dt.datetime) else 0.0)

    def database_check(self) -> str | None:
        if self.db_problem:
            return self.db_problem
        if self.last_ok is not None and time.monotonic() - self.last_ok > max(3 * self.interval, 30.0):
            return f"no successful database poll for {time.monotonic() - self.last_ok:.0f} s"
        return self.schema_problem


def _schema_problem(conn: Any, tables: OutboxTables, migrations: Any) -> str | None:
    """The alembic version row against the shipped head (read directly: no alembic context, no logs)."""
    import sqlalchemy as sa

    version = sa.table(migrations.version_table_for(tables), sa.column("version_num"),
                       schema=tables.names.schema)
    try:
        revs = [r for (r,) in conn.execute(sa.select(version.c.version_num))]
    except sa.exc.DBAPIError:
        conn.rollback()
        revs = []
    heads = migrations.heads()
    if set(revs) & set(heads):
        return None
    return (f"database schema at {', '.join(revs) or 'nothing'}, not at head {', '.join(heads)}: "
            "run `outbox db upgrade`")


def _aware(ts: dt.datetime) -> dt.datetime:
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=dt.timezone.utc)


# ---------------------------------------------------------------------------- consumers


class ConsumerMetrics:
    """Observer of a consumer runner: set it with :meth:`install` (``runner.observer = self``)."""

    def __init__(self, consumer_name: str, registry: Any = None, *, lag_interval: float = 5.0,
                 health: Health | None = None) -> None:
        pc = require_prometheus()
        self.registry = registry if registry is not None else new_registry()
        r = self.registry
        self.name = consumer_name
        self.health = health
        self.lag_interval = lag_interval
        self._next_lag = 0.0
        self.broker_problem: str | None = "not connected yet"
        self.info = _info(r, "consumer")
        self.messages = pc.Counter("outbox_consumer_messages", "messages by outcome", ("consumer", "outcome"),
                                   registry=r)
        self.handler = pc.Histogram("outbox_consumer_handler_duration_seconds", "seconds in handle() per message",
                                    ("consumer",), registry=r)
        self.batch = pc.Histogram("outbox_consumer_batch_size", "messages per processed batch", ("consumer",),
                                  buckets=_BATCH_BUCKETS, registry=r)
        self.lag = pc.Gauge("outbox_consumer_lag_messages", "Kafka: high watermark minus committed offset",
                            ("consumer", "topic", "partition"), registry=r)
        self.depth = pc.Gauge("outbox_consumer_queue_depth_messages", "RabbitMQ: messages ready in the queue",
                              ("consumer", "queue"), registry=r)
        self.last_loop = pc.Gauge("outbox_consumer_last_loop_timestamp_seconds",
                                  "unix time of the runner loop's last turn", ("consumer",), registry=r)
        for outcome in ("processed", "duplicate", "retry", "dead"):
            self.messages.labels(consumer=self.name, outcome=outcome)
        self._lag_labels: set[tuple[str, str]] = set()

    def install(self, runner: Any) -> None:
        """Observe ``runner``; times ``handle`` by wrapping it on the consumer instance (sync handlers)."""
        import inspect

        runner.observer = self
        consumer = runner.consumer
        handle = consumer.handle
        if not inspect.iscoroutinefunction(handle):
            hist = self.handler.labels(consumer=self.name)

            def timed(session: Any, message: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return handle(session, message)
                finally:
                    hist.observe(time.perf_counter() - t0)

            consumer.handle = timed

    def batch_done(self, size: int, outcomes: Sequence[Any]) -> None:
        self.batch.labels(consumer=self.name).observe(size)
        counts: dict[str, int] = {}
        for o in outcomes:
            v = getattr(o.status, "value", str(o.status))
            counts[v] = counts.get(v, 0) + 1
        for outcome, n in counts.items():
            self.messages.labels(consumer=self.name, outcome=outcome).inc(n)
        self.broker_problem = None

    def loop_turned(self, runner: Any) -> None:
        if self.health is not None:
            self.health.loop_turned()
        self.last_loop.labels(consumer=self.name).set(time.time())
        if _reads_async(runner) or not self._lag_due():
            return  # an asyncio runner's reads are awaited in loop_turned_async
        try:
            self._read_lag(runner)
        except Exception as exc:
            self._unreachable(exc)

    async def loop_turned_async(self, runner: Any) -> None:
        """An asyncio runner's turn (after :meth:`loop_turned`): every ``lag_interval`` seconds, await
        its ``lag()`` / ``queue_depth()`` coroutines. They wait on the broker without blocking the loop
        (confluent-kafka's AIOConsumer runs its calls in worker threads; aio-pika is asyncio)."""
        if not _reads_async(runner) or not self._lag_due():
            return
        try:
            lag = getattr(runner, "lag", None)
            if lag is not None:
                self._set_lag(await lag())
            depth = getattr(runner, "queue_depth", None)
            if depth is not None:
                self._set_depth(runner, await depth())
        except Exception as exc:
            self._unreachable(exc)

    def _lag_due(self) -> bool:
        now = time.monotonic()
        if now < self._next_lag:
            return False
        self._next_lag = now + self.lag_interval
        return True

    def _unreachable(self, exc: Exception) -> None:
        self.broker_problem = f"broker unreachable: {' '.join(mask_secrets(exc).split())[:300]}"

    def _read_lag(self, runner: Any) -> None:
        lag = getattr(runner, "lag", None)
        if lag is not None:
            self._set_lag(lag())
        depth = getattr(runner, "queue_depth", None)
        if depth is not None:
            self._set_depth(runner, depth())

    def _set_lag(self, values: dict[tuple[str, int], int] | None) -> None:
        if values is None:
            self.broker_problem = "not connected to Kafka"
            return
        seen = set()
        for (topic, partition), n in values.items():
            key = (topic, str(partition))
            seen.add(key)
            self.lag.labels(consumer=self.name, topic=topic, partition=str(partition)).set(n)
        for topic, partition in self._lag_labels - seen:  # revoked partitions leave the series
            with contextlib.suppress(KeyError):
                self.lag.remove(self.name, topic, partition)
        self._lag_labels = seen
        self.broker_problem = None

    def _set_depth(self, runner: Any, n: int | None) -> None:
        if n is None:
            self.broker_problem = "not connected to RabbitMQ"
            return
        self.depth.labels(consumer=self.name, queue=runner.queue).set(n)
        self.broker_problem = None

    def broker_check(self) -> str | None:
        return self.broker_problem


def _reads_async(runner: Any) -> bool:
    """Whether ``runner``'s lag or queue-depth read is a coroutine function (an asyncio runner's)."""
    read = getattr(runner, "lag", None) or getattr(runner, "queue_depth", None)
    return read is not None and inspect.iscoroutinefunction(read)


def _catalogue() -> tuple[Any, ...]:
    """Every instrument the relay and the consumer export, built in a throwaway registry: the list
    docs and tests (the Grafana dashboard check) read. Empty without prometheus-client."""
    try:
        pc = require_prometheus()
    except Exception:
        return ()
    from prometheus_client.metrics import MetricWrapperBase

    out: list[Any] = []
    for owner in (RelayMetrics(), ConsumerMetrics("catalogue")):
        out += [v for v in vars(owner).values() if isinstance(v, MetricWrapperBase)]
    facts = pc.CollectorRegistry(auto_describe=True)
    for name, kind, doc in RELAY_FACTS:
        out.append((pc.Gauge if kind == "gauge" else pc.Counter)(name, doc, registry=facts))
    return tuple(out)


#: every exported instrument (see :func:`_catalogue`)
CATALOGUE: tuple[Any, ...] = _catalogue()


def _by_id(records: Sequence[OutboxRecord], results: Sequence[PublishResult]) -> Iterator[tuple[OutboxRecord,
                                                                                                 PublishResult]]:
    """(record, result) pairs matched by row id, for a publisher that broke the one-result-per-record rule."""
    by_id = {r.id: r for r in records}
    for res in results:
        rec = by_id.get(res.id)
        if rec is not None:
            yield rec, res


def observe_many(histogram: Any, values: Sequence[float]) -> None:
    """``histogram.observe(v)`` for every value, at a fraction of the cost (the relay's per-message path).

    A batch's values are counted into buckets here (one bisect each) and added to the histogram
    once per bucket, instead of one locked update per value. Falls back to ``observe`` where the
    installed prometheus_client keeps its buckets differently.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for v in values:
            histogram.observe(v)
        return
    counts = [0] * len(bounds)
    where = bisect.bisect_left
    for v in values:
        counts[where(bounds, v)] += 1  # the first bound >= v: Prometheus buckets are "le"
    for i, n in enumerate(counts):
        if n:
            buckets[i].inc(n)
    total.inc(math.fsum(values))
