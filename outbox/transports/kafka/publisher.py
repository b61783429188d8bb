"""Kafka adapter: an idempotent confluent-kafka (librdkafka) producer.

Every record becomes one Kafka message: ``key`` = the UTF-8 key (``None`` stays ``None``),
``value`` = the payload, headers = the record's headers plus ``message-id`` (and ``content-type``
when set). The producer runs with ``enable.idempotence=true`` and ``acks=all``, so messages with
the same key land in their partition in the order they were produced, without duplicates from
internal retries.

Outcomes:

- ``DELIVERED``: the broker acknowledged the message (acks=all).
- ``FAILED`` (the row goes dead, the reason is the broker's): message too large (over
  ``message.max.bytes``, by default 1,032,768 bytes: the writer's 1,000,000-byte limit plus room
  for headers and framing), invalid topic, topic / cluster authorization failed, invalid record,
  policy violation.
- ``RETRY``: everything else (timeouts, transport errors, leader not available, no delivery
  report within the ``publish`` timeout), and an unknown topic or partition: a deploy may create
  the topic later, so its messages are retried with the relay's backoff (dead after
  ``max_attempts``) and the log says, once a minute per topic, what to do.

Recovery: a fatal error or a fencing / sequence error of the idempotent producer
(``PRODUCER_FENCED``, ``INVALID_PRODUCER_EPOCH``, ``UNKNOWN_PRODUCER_ID``,
``OUT_OF_ORDER_SEQUENCE_NUMBER``, ..., typically after an outage longer than
``message.timeout.ms``) recreates the producer, and the batch's undelivered messages are sent
again on the new one; so does a run of batches that delivered nothing for longer than
``message.timeout.ms``. A batch of which nothing reached the broker because the cluster is
unreachable or the producer broke raises :class:`~outbox.errors.BrokerUnavailable`: the relay
backs off as a whole and counts no attempt against the rows.

Delivery reports: librdkafka reports only failed messages to Python (``delivery.report.only.error``,
which the adapter owns): a report per delivered message cost the relay's one thread about 3,000
instructions (callgrind). A message counts as DELIVERED only when the producer has settled (holds
nothing: no message queued or in flight, no report left to serve) with no failure reported for it,
since librdkafka releases a message only after the broker acknowledged it (acks=all) or after
reporting its failure.

A message whose verdict is not known when ``publish`` returns stays queued in librdkafka and may
still be delivered later (a duplicate once the relay retries it; consumers
deduplicate by message id). Keep ``message_timeout_ms`` below the relay's publish timeout so
librdkafka gives its verdict first.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from ..._redact import mask_secrets
from ...errors import BrokerUnavailable, ConfigurationError
from ...message import OutboxRecord
from ..base import Codec, Outcome, PublishResult, delivered
from ..codecs import get_codec

__all__ = ["KafkaPublisher"]

logger = logging.getLogger("outbox.brokers.kafka")  # the name users configure: kept across the move


_COMPRESSIONS = ("none", "gzip", "snappy", "lz4", "zstd")

# Settings the adapter owns: changing them would break the delivery guarantees or the callbacks.
_RESERVED = {"on_delivery", "dr_cb", "dr_msg_cb", "transactional.id", "delivery.report.only.error"}


def _codes(*names: str) -> frozenset[int]:
    return frozenset(getattr(KafkaError, n) for n in names if hasattr(KafkaError, n))


#: Errors after which sending the same message again cannot succeed.
_PERMANENT = _codes(
    "MSG_SIZE_TOO_LARGE",
    "_MSG_SIZE_TOO_LARGE",
    "RECORD_LIST_TOO_LARGE",
    "TOPIC_EXCEPTION",
    "TOPIC_AUTHORIZATION_FAILED",
    "CLUSTER_AUTHORIZATION_FAILED",
    "INVALID_RECORD",
    "INVALID_TIMESTAMP",
    "POLICY_VIOLATION",
    "UNSUPPORTED_FOR_MESSAGE_FORMAT",
    "_INVALID_ARG",
)
#: Unknown topic or partition: retried (a deploy may create the topic later); the log says what to do.
_UNKNOWN_TOPIC_NAMES = frozenset({"UNKNOWN_TOPIC_OR_PART", "_UNKNOWN_TOPIC", "_UNKNOWN_PARTITION"})
_UNKNOWN_TOPIC = _codes(*_UNKNOWN_TOPIC_NAMES)
#: The idempotent producer's state is broken (typically after an outage longer than
#: message.timeout.ms): this producer will never deliver again, a new one will.
_REINIT = _codes(
    "PRODUCER_FENCED",
    "INVALID_PRODUCER_EPOCH",
    "UNKNOWN_PRODUCER_ID",
    "OUT_OF_ORDER_SEQUENCE_NUMBER",
    "INVALID_PRODUCER_ID_MAPPING",
    "_FENCED",
    "_FATAL",
)
#: How many times one ``publish`` call sends again, on a new producer, what a broken one did not deliver.
_RESENDS = 1
#: ``RD_KAFKA_PARTITION_UA``: the partitioner chooses (by key).
_ANY_PARTITION = -1
#: Seconds between two warnings about the same missing topic.
_TOPIC_WARN_INTERVAL = 60.0
#: librdkafka's ``message.max.bytes`` unless set: the writer's default payload limit (1,000,000 bytes,
#: payload + key + headers) plus room for our message-id / content-type headers and the record
#: framing. It stays under the broker's default (message.max.bytes 1,048,588).
DEFAULT_MESSAGE_MAX_BYTES = 1_000_000 + 32_768


def _reason(err: KafkaError) -> str:
    if err.fatal():
        prefix = "fatal producer error (the producer is recreated): "
    elif err.code() in _REINIT:
        prefix = "producer fenced or out of sequence (the producer is recreated): "
    else:
        prefix = ""
    return mask_secrets(f"{prefix}{err.name()}: {err.str()}")


class KafkaPublisher:
    """Publish outbox records to Kafka with an idempotent producer.

    :param bootstrap_servers: ``host:port[,host:port...]``.
    :param config: any librdkafka setting (TLS, SASL, ``partitioner``, ``message.max.bytes``, ...);
        applied last. ``enable.idempotence`` must stay true and ``acks`` must stay ``all``.
    :param linger_ms: how long librdkafka waits to fill a produce request while a batch is being
        queued. It never delays a batch's tail: once the whole batch is queued, ``publish`` flushes,
        which sends what lingers at once. So an idle relay's single message goes out at once (as
        with 0) while a busy relay's large batches are still packed into few requests.
    :param compression: ``lz4`` (default), ``zstd``, ``snappy``, ``gzip`` or ``none``.
    :param message_timeout_ms: librdkafka's delivery deadline per message (``message.timeout.ms``).
    :param topic_metadata_timeout_ms: how long an unknown topic may take to appear before its
        messages fail (``topic.metadata.propagation.max.ms``).
    :param auto_create_topics: let the broker create a topic on first use
        (``allow.auto.create.topics``). Off by default: a typo in a topic name then does not
        create a stray topic; its messages are retried (``UNKNOWN_TOPIC_OR_PART``) and become
        dead after the relay's ``max_attempts``.
    :param connect_timeout: seconds ``start()`` waits for cluster metadata.
    """

    def __init__(
        self,
        *,
        bootstrap_servers: str,
        config: Mapping[str, Any] | None = None,
        linger_ms: int = 5,
        compression: str = "lz4",
        message_timeout_ms: int = 20_000,
        topic_metadata_timeout_ms: int = 3_000,
        auto_create_topics: bool = False,
        connect_timeout: float = 10.0,
        codec: Codec | str | None = None,
    ) -> None:
        self.codec = get_codec(codec)
        if not isinstance(bootstrap_servers, str) or not bootstrap_servers.strip():
            raise ConfigurationError("bootstrap_servers must be a non-empty 'host:port[,host:port]' string")
        if config is not None and not isinstance(config, Mapping):
            raise ConfigurationError(f"config must be a mapping of librdkafka settings, got {type(config).__name__}")
        for name, value, low in (
            ("linger_ms", linger_ms, 0),
            ("message_timeout_ms", message_timeout_ms, 1),
            ("topic_metadata_timeout_ms", topic_metadata_timeout_ms, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigurationError(f"{name} must be an integer >= {low}, got {value!r}")
        if compression not in _COMPRESSIONS:
            raise ConfigurationError(f"compression must be one of {', '.join(_COMPRESSIONS)}, got {compression!r}")
        if not isinstance(auto_create_topics, bool):
            raise ConfigurationError(f"auto_create_topics must be a bool, got {auto_create_topics!r}")
        if isinstance(connect_timeout, bool) or not isinstance(connect_timeout, (int, float)) or connect_timeout <= 0:
            raise ConfigurationError(f"connect_timeout must be a positive number of seconds, got {connect_timeout!r}")

        user = dict(config or {})
        reserved = sorted(_RESERVED & user.keys())
        if reserved:
            raise ConfigurationError(f"config[{reserved[0]!r}] is managed by KafkaPublisher and cannot be set")
        if str(user.get("enable.idempotence", True)).lower() not in ("true", "1"):
            raise ConfigurationError("config['enable.idempotence'] must stay true (per-key order depends on it)")
        if str(user.get("acks", "all")).lower() not in ("all", "-1"):
            raise ConfigurationError("config['acks'] must stay 'all' (delivered = every in-sync replica has it)")
        self._user_error_cb: Callable[[KafkaError], None] | None = user.pop("error_cb", None)
        if "allow.auto.create.topics" in user:  # the librdkafka spelling wins over the flag
            auto_create_topics = str(user["allow.auto.create.topics"]).lower() in ("true", "1")

        self.bootstrap_servers = bootstrap_servers
        self.auto_create_topics = auto_create_topics
        self.connect_timeout = float(connect_timeout)
        self._conf: dict[str, Any] = {
            "bootstrap.servers": bootstrap_servers,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": linger_ms,
            "compression.type": compression,
            "message.timeout.ms": message_timeout_ms,
            "topic.metadata.propagation.max.ms": topic_metadata_timeout_ms,
            "allow.auto.create.topics": auto_create_topics,
            "message.max.bytes": DEFAULT_MESSAGE_MAX_BYTES,
            # the Java client's partitioner: a key lands on the same Kafka partition whichever
            # language produced it (librdkafka's default, CRC-32, would disagree with Java producers)
            "partitioner": "murmur2_random",
            "logger": logging.getLogger("outbox.brokers.kafka.librdkafka"),
            **user,
            "error_cb": self._on_error,
            # A delivery report reaches Python only for a failed message (confluent-kafka skips the
            # callback, its Message object and its arguments for the others): a message queued on a
            # producer that has since settled (nothing left in it) without a report was delivered.
            "delivery.report.only.error": True,
        }
        self._broken: KafkaError | None = None
        """A fatal or fencing error: the producer must be recreated."""
        self._failing_since: float | None = None
        """When the current run of batches that delivered nothing began (monotonic)."""
        self._message_timeout_s = 0.0
        self._topic_warned: dict[str, float] = {}
        self._last_error: KafkaError | None = None
        self._started = False
        self._producer: Producer | None = None
        # Build one producer now so a bad setting fails at construction, not in the relay loop.
        self._producer = self._new_producer()
        self._message_timeout_s = int(self._conf["message.timeout.ms"]) / 1000.0

    # ------------------------------------------------------------------ lifecycle

    def _new_producer(self) -> Producer:
        try:
            return Producer(self._conf)
        except KafkaException as exc:
            raise ConfigurationError(f"invalid Kafka producer setting: {mask_secrets(exc.args[0].str())}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"invalid Kafka producer setting: {mask_secrets(exc)}") from None

    def _on_error(self, err: KafkaError) -> None:
        # Called from poll()/flush() on the relay thread.
        if err.fatal():
            logger.error("Kafka %s", _reason(err))
            self._broken = err
        else:
            logger.debug("Kafka client error: %s", _reason(err))
        self._last_error = err
        if self._user_error_cb is not None:
            try:
                self._user_error_cb(err)
            except Exception:  # never let a user callback break the producer
                logger.exception("error_cb raised")

    def _serve(self, producer: Producer, timeout: float) -> None:
        """``producer.poll``; a fatal error surfacing as an exception is recorded, not raised."""
        try:
            producer.poll(timeout)
        except KafkaException as exc:
            self._note(exc)

    def _drain(self, producer: Producer, timeout: float) -> int:
        """``producer.flush``; returns how many messages are still queued (fatal errors recorded)."""
        try:
            return int(producer.flush(timeout))
        except KafkaException as exc:
            self._note(exc)
            return len(producer)

    def _note(self, exc: KafkaException) -> None:
        err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        if err is not None and err.fatal():
            if self._broken is None:
                logger.error("Kafka %s", _reason(err))
            self._broken = err
        else:
            logger.warning("Kafka client error: %s", mask_secrets(exc))

    def _unreachable(self, timeout: float) -> str | None:
        """``None`` when cluster metadata can be fetched within ``timeout``, else why not."""
        assert self._producer is not None
        try:
            md = self._producer.list_topics(timeout=timeout)
        except KafkaException as exc:
            return _reason(exc.args[0])
        if not md.brokers:
            return "no brokers in cluster metadata"
        return None

    def start(self) -> None:
        """Create the producer if needed and check the cluster answers (idempotent)."""
        if self._producer is None:
            self._producer = self._new_producer()
        if self._started:
            return
        why = self._unreachable(self.connect_timeout)
        if why is not None:
            raise BrokerUnavailable(
                f"Kafka cluster {mask_secrets(self.bootstrap_servers)} is not reachable "
                f"within {self.connect_timeout:g} s: {why}"
            )
        self._started = True

    def flush(self, timeout: float = 30.0) -> None:
        if self._producer is not None:
            left = self._drain(self._producer, timeout)
            if left:
                logger.warning("%d Kafka message(s) still unconfirmed after %g s", left, timeout)
            if self._broken is not None:
                self._recreate()

    def close(self, timeout: float = 10.0) -> None:
        producer, self._producer = self._producer, None
        self._started = False
        if producer is None:
            return
        left = self._drain(producer, timeout)
        if left:
            logger.warning("closing the Kafka producer with %d unconfirmed message(s)", left)
            producer.purge()
            self._serve(producer, 0)

    def __enter__(self) -> KafkaPublisher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recreate(self) -> bool:
        """Replace the producer with a new one; whether the old one settled (see :meth:`_await`) once purged."""
        old, self._producer = self._producer, None
        settled = False
        if old is not None:
            try:
                old.purge()
                settled = self._drain(old, 0) == 0  # serves the purged messages' (error) reports
            except KafkaException:
                pass
        # Cleared only now: the old producer's last callbacks, served just above, may report it broken
        # again (its UNKNOWN_PRODUCER_ID delivery report arriving after the fatal error). That is about
        # the old producer; charged to the new one it made the resend round give up at once.
        self._broken = None
        self._producer = self._new_producer()
        return settled

    # ------------------------------------------------------------------ serving while idle

    def healthy(self) -> str | None:
        """``None`` when the cluster answers a metadata request within 1 s, else why not (for readiness)."""
        if self._producer is None:
            return "Kafka producer not started"
        return self._unreachable(1.0)

    def idle(self, timeout: float) -> None:
        """Serve the producer for up to ``timeout`` s: delivery reports, error callbacks, fatal errors."""
        producer = self._producer
        if producer is None:
            return
        self._serve(producer, max(0.0, timeout))
        if self._broken is not None:
            logger.warning("recreating the Kafka producer: %s", _reason(self._broken))
            self._recreate()

    # ------------------------------------------------------------------ publishing

    def _classify(self, err: KafkaError) -> Outcome:
        if err.fatal() or err.code() in _REINIT:
            return Outcome.RETRY
        if err.code() in _PERMANENT:
            return Outcome.FAILED
        return Outcome.RETRY  # unknown topics included: a deploy may create the topic a minute later

    def _on_delivery(self, results: list[PublishResult | None], records: Sequence[OutboxRecord], index: int,
                     err: KafkaError | None, _msg: Message) -> None:
        # Called for failed messages only (``delivery.report.only.error``, reserved): a delivered
        # message's verdict is :meth:`_settle`'s alone, once the producer holds nothing.
        if err is None:
            return
        self._note_error(err, records[index].topic)
        results[index] = PublishResult(records[index].id, self._classify(err), _reason(err))

    def _note_error(self, err: KafkaError, topic: str) -> None:
        """Remember what a failed message says about the producer (broken) or its topic (missing)."""
        if err.fatal() or err.code() in _REINIT:
            if self._broken is None:
                self._broken = err
        elif err.code() in _UNKNOWN_TOPIC:
            self._warn_unknown_topic(topic, err)

    def _warn_unknown_topic(self, topic: str, err: KafkaError) -> None:
        now = time.monotonic()
        if now - self._topic_warned.get(topic, -_TOPIC_WARN_INTERVAL) < _TOPIC_WARN_INTERVAL:
            return
        self._topic_warned[topic] = now
        how = (
            "the producer allows auto-creation, so enable auto.create.topics.enable on the broker"
            if self.auto_create_topics
            else "enable auto-creation with auto_create_topics=True / `-X allow.auto.create.topics=true` "
                 "(and the broker's auto.create.topics.enable)"
        )
        logger.warning("Kafka topic %r does not exist (%s): create it, or %s. Its messages are retried with "
                       "backoff and become dead after max_attempts.", topic, err.name(), how)

    def _produce_one(self, producer: Producer, rec: OutboxRecord, callback: Callable[..., None],
                     deadline: float) -> PublishResult | None:
        """Queue one message; ``None`` once queued (its delivery report fills the result), else its result."""
        try:
            env = self.codec.encode(rec, "kafka")
        except (TypeError, ValueError) as exc:
            return PublishResult(rec.id, Outcome.FAILED, f"rejected by codec {self.codec.name!r}: {exc}")
        stamp = env.timestamp
        millis = 0 if stamp is None else int(stamp.timestamp() * 1000)  # 0: the client stamps the send time
        while True:
            try:
                # Positional: (topic, value, key, partition, callback, on_delivery, timestamp, headers),
                # the order confluent-kafka has taken since 1.0. Matching five keywords cost
                # 1.2 us a message, a third of the call. Partition -1: librdkafka's partitioner picks it.
                producer.produce(env.topic, env.payload, env.key, _ANY_PARTITION, callback, None, millis, env.headers)
                return None
            except BufferError:
                # librdkafka's local queue is full: serve delivery reports to make room.
                if time.monotonic() < deadline and self._broken is None:
                    self._serve(producer, 0.05)
                    continue
                reason = "local producer queue full (queue.buffering.max.messages/kbytes)"
                return PublishResult(rec.id, Outcome.RETRY, reason)
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                if err.fatal():
                    self._note(exc)
                self._note_error(err, rec.topic)
                return PublishResult(rec.id, self._classify(err), _reason(err))
            except (TypeError, ValueError) as exc:
                return PublishResult(rec.id, Outcome.FAILED, f"rejected by the Kafka client: {exc}")

    def _queue(self, producer: Producer, records: Sequence[OutboxRecord], todo: list[int],
               results: list[PublishResult | None], held: dict[str, int], deadline: float) -> list[int]:
        """Queue the records ``todo`` (indexes, in order) on ``producer``; returns the indexes it queued.

        A record that could not be queued gets its result now; a queued one that fails gets it from
        its delivery report, and one delivered from :meth:`_settle`.

        ``held`` maps keys whose earlier message was not queued to that message's id: later messages
        with those keys come back RETRY with ``held=True``, so per-key order survives a failure in the
        middle of a batch.
        """
        queued: list[int] = []
        for n, i in enumerate(todo):
            if self._broken is not None:
                break  # the rest stay without a verdict: sent again on a new producer, or RETRY
            rec = records[i]
            if rec.key is not None and rec.key in held:
                why = f"held back: message {held[rec.key]} with the same key was not sent"
                results[i] = PublishResult(rec.id, Outcome.RETRY, why, held=True)
                continue
            res = self._produce_one(producer, rec, functools.partial(self._on_delivery, results, records, i),
                                    deadline)
            if res is None:
                queued.append(i)
            else:
                results[i] = res
                if rec.key is not None:
                    held[rec.key] = rec.id
            if n % 128 == 127:
                self._serve(producer, 0)
        return queued

    def _await(self, producer: Producer, deadline: float) -> bool:
        """Serve delivery reports until the producer has settled (True), breaks or ``deadline`` passes (False).

        Settled: nothing is left in it, neither queued, in flight nor a report to serve. Every message
        it was given has then either been acknowledged (acks=all) or had its failure reported, so one
        of this batch's queued messages without a report was delivered. (The batch is all it holds but
        for what an earlier batch's timeout left behind, which settles within ``message.timeout.ms``.)
        """
        timeout = 0.0
        while True:
            # flush, not poll: while librdkafka flushes it sends what is lingering at once. The
            # whole batch is queued by now, so linger.ms has done its work (batching the queue
            # while it filled) and waiting it out would only add latency to a small batch.
            left_in_producer = self._drain(producer, timeout)
            if self._broken is not None:
                return False
            if not left_in_producer:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            timeout = min(left, 0.1)

    @staticmethod
    def _settle(records: Sequence[OutboxRecord], results: list[PublishResult | None], queued: list[int]) -> None:
        """Once the producer that took ``queued`` has settled: those without a failure report were delivered."""
        for i in queued:
            if results[i] is None:
                results[i] = delivered(records[i].id)

    def publish(self, records: Sequence[OutboxRecord], *, timeout: float = 30.0) -> list[PublishResult]:
        """Produce ``records`` and wait up to ``timeout`` s for their delivery reports.

        When the producer breaks (a fatal error, or a fencing / sequence error after an outage:
        ``PRODUCER_FENCED``, ``UNKNOWN_PRODUCER_ID``, ...), it is recreated and the records without a
        verdict are sent again on the new one, in order, within the same ``timeout``.
        """
        return self.begin_publish(records, timeout=timeout)()

    def begin_publish(self, records: Sequence[OutboxRecord], *,
                      timeout: float = 30.0) -> Callable[[], list[PublishResult]]:
        """Queue ``records`` now; the function returned waits for their verdicts (what :meth:`publish` returns).

        In between the caller may do other work (the relay claims its next batch) while librdkafka
        sends and the broker acknowledges. Call the function exactly once, before queueing anything
        else on this publisher. ``timeout`` counts from this call.
        """
        if not records:
            return list
        if not self._started:
            self.start()
        deadline = time.monotonic() + max(0.0, timeout)
        results: list[PublishResult | None] = [None] * len(records)
        held: dict[str, int] = {}
        todo = list(range(len(records)))
        assert self._producer is not None
        queued = self._queue(self._producer, records, todo, results, held, deadline)
        return functools.partial(self._complete, records, results, held, todo, queued, deadline, timeout)

    def _complete(self, records: Sequence[OutboxRecord], results: list[PublishResult | None], held: dict[str, int],
                  todo: list[int], queued: list[int], deadline: float, timeout: float) -> list[PublishResult]:
        """Wait for the verdicts of a batch :meth:`begin_publish` queued; resend on a new producer if it broke."""
        broken: KafkaError | None = None
        for round_no in range(1 + _RESENDS):
            assert self._producer is not None
            if round_no:
                queued = self._queue(self._producer, records, todo, results, held, deadline)
            settled = self._await(self._producer, deadline)
            broken = self._broken
            if broken is None:
                if settled:
                    self._settle(records, results, queued)
                break
            logger.warning("recreating the Kafka producer: %s", _reason(broken))
            if self._recreate():  # purged: every message it still held has a failure report now
                self._settle(records, results, queued)
            if round_no == _RESENDS or time.monotonic() >= deadline:
                break
            todo = self._to_resend(records, results, todo, held)
            if not todo:
                break
            logger.info("sending %d message(s) again on the new Kafka producer", len(todo))
        final = self._finish(records, results, broken, timeout)
        self._check_progress(final, broken)
        return final

    @staticmethod
    def _to_resend(records: Sequence[OutboxRecord], results: list[PublishResult | None], todo: list[int],
                   held: dict[str, int]) -> list[int]:
        """The records of ``todo`` to send again on a new producer: all without a final verdict, in order.

        A key whose message failed for good keeps holding back its later messages.
        """
        held.clear()
        again: list[int] = []
        for i in todo:
            res = results[i]
            if res is not None and res.outcome is not Outcome.RETRY:
                if res.outcome is Outcome.FAILED and records[i].key is not None:
                    held.setdefault(str(records[i].key), records[i].id)
                continue
            results[i] = None
            again.append(i)
        return again

    def _finish(self, records: Sequence[OutboxRecord], results: list[PublishResult | None],
                broken: KafkaError | None, timeout: float) -> list[PublishResult]:
        """One result per record: no verdict becomes RETRY with the reason (the broken producer's, or the timeout)."""
        final: list[PublishResult] = []
        for rec, res in zip(records, results, strict=True):
            if res is None:
                why = _reason(broken) if broken is not None else f"no delivery report within {timeout:g} s"
                res = PublishResult(rec.id, Outcome.RETRY, why)
            final.append(res)
        return final

    def _check_progress(self, final: list[PublishResult], broken: KafkaError | None) -> None:
        """Recover from a batch that delivered nothing: recreate a producer failing for longer than its
        message timeout, and raise BrokerUnavailable when no message reached the broker because of the
        cluster or the producer (so the relay backs off as a whole, counting no attempt against the rows).
        """
        if any(r.outcome is Outcome.DELIVERED for r in final):
            self._failing_since = None
            return
        if not all(r.outcome is Outcome.RETRY for r in final):
            return
        now = time.monotonic()
        if broken is not None:
            self._failing_since = now  # a new producer: its own message timeout starts now
            raise BrokerUnavailable(f"the Kafka producer failed and was recreated: {_reason(broken)}")
        if all(r.held or _code_in(r.error, _UNKNOWN_TOPIC_NAMES) for r in final):
            return  # the cluster answered: these topics are missing (retried by the relay with backoff)
        if self._failing_since is None:
            self._failing_since = now
        elif now - self._failing_since >= self._message_timeout_s:
            logger.warning("no Kafka message delivered for %.0f s (longer than message.timeout.ms): "
                           "recreating the producer", now - self._failing_since)
            self._recreate()
            self._failing_since = now
        why = self._unreachable(min(2.0, self.connect_timeout))
        if why is not None:
            # Nothing reached the broker: drop what is still queued (never sent, so no duplicates)
            # and let the relay back off.
            assert self._producer is not None
            self._producer.purge(in_queue=True, in_flight=False, blocking=False)
            self._serve(self._producer, 0)
            raise BrokerUnavailable(f"Kafka cluster {mask_secrets(self.bootstrap_servers)} is not reachable: {why}")


def _code_in(error: str | None, names: frozenset[str]) -> bool:
    """Whether a result's reason (``NAME: text``, maybe prefixed) names one of the error ``names``."""
    return error is not None and any(f"{n}:" in error for n in names)
