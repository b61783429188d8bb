"""Kafka adapter: an idempotent confluent-kafka (librdkafka) producer.

Every record becomes one Kafka message: ``key`` = the UTF-8 key (``None`` stays ``None``),
``value`` = the payload, headers = the record's headers plus ``message-id`` (and ``content-type``
when set). The producer runs with ``enable.idempotence=true`` and ``acks=all``, so messages with
the same key land in their partition in the order they were produced, without duplicates from
internal retries.

Outcomes:

- ``DELIVERED``: the broker acknowledged the message (acks=all).
- ``FAILED`` (the row goes dead, the reason is the broker's): message too large, unknown topic
  (when ``auto_create_topics`` is off), invalid topic, topic / cluster authorization failed,
  invalid record, policy violation.
- ``RETRY``: everything else (timeouts, transport errors, leader not available, no delivery
  report within the ``publish`` timeout, a fatal idempotent-producer error; the producer is then
  recreated).

A message whose delivery report has not arrived when ``publish`` returns stays queued in
librdkafka and may still be delivered later (a duplicate once the relay retries it; consumers
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

from .._redact import mask_secrets
from ..errors import BrokerUnavailable, ConfigurationError
from ..message import OutboxRecord
from .base import MESSAGE_ID_HEADER, Outcome, PublishResult

__all__ = ["KafkaPublisher"]

logger = logging.getLogger(__name__)

CONTENT_TYPE_HEADER = "content-type"

_COMPRESSIONS = ("none", "gzip", "snappy", "lz4", "zstd")

# Settings the adapter owns: changing them would break the delivery guarantees or the callbacks.
_RESERVED = {"on_delivery", "dr_cb", "dr_msg_cb", "transactional.id"}


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
#: Unknown topic: permanent only when topics are not auto-created.
_UNKNOWN_TOPIC = _codes("UNKNOWN_TOPIC_OR_PART", "_UNKNOWN_TOPIC", "_UNKNOWN_PARTITION")


def _reason(err: KafkaError) -> str:
    prefix = "fatal producer error (the producer is recreated): " if err.fatal() else ""
    return mask_secrets(f"{prefix}{err.name()}: {err.str()}")


class KafkaPublisher:
    """Publish outbox records to Kafka with an idempotent producer.

    :param bootstrap_servers: ``host:port[,host:port...]``.
    :param config: any librdkafka setting (TLS, SASL, ``partitioner``, ...); applied last.
        ``enable.idempotence`` must stay true and ``acks`` must stay ``all``.
    :param linger_ms: how long librdkafka waits to fill a batch.
    :param compression: ``lz4`` (default), ``zstd``, ``snappy``, ``gzip`` or ``none``.
    :param message_timeout_ms: librdkafka's delivery deadline per message (``message.timeout.ms``).
    :param topic_metadata_timeout_ms: how long an unknown topic may take to appear before its
        messages fail (``topic.metadata.propagation.max.ms``).
    :param auto_create_topics: let the broker create a topic on first use
        (``allow.auto.create.topics``). Off by default: a typo in a topic name then fails the
        message with ``UNKNOWN_TOPIC_OR_PART`` instead of creating a stray topic.
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
    ) -> None:
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
            # the Java client's partitioner: a key lands on the same Kafka partition whichever
            # language produced it (librdkafka's default, CRC-32, would disagree with Java producers)
            "partitioner": "murmur2_random",
            "logger": logging.getLogger(f"{__name__}.librdkafka"),
            **user,
            "error_cb": self._on_error,
        }
        self._fatal: KafkaError | None = None
        self._last_error: KafkaError | None = None
        self._started = False
        self._producer: Producer | None = None
        # Build one producer now so a bad setting fails at construction, not in the relay loop.
        self._producer = self._new_producer()

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
            self._fatal = err
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
            if self._fatal is None:
                logger.error("Kafka %s", _reason(err))
            self._fatal = err
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
            if self._fatal is not None:
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

    def _recreate(self) -> None:
        old, self._producer = self._producer, None
        self._fatal = None
        if old is not None:
            try:
                old.purge()
                self._serve(old, 0)
            except KafkaException:
                pass
        self._producer = self._new_producer()

    # ------------------------------------------------------------------ publishing

    def _classify(self, err: KafkaError) -> Outcome:
        if err.fatal():
            return Outcome.RETRY
        code = err.code()
        if code in _PERMANENT:
            return Outcome.FAILED
        if code in _UNKNOWN_TOPIC:
            return Outcome.RETRY if self.auto_create_topics else Outcome.FAILED
        return Outcome.RETRY

    def _on_delivery(self, results: list[PublishResult | None], records: Sequence[OutboxRecord], index: int,
                     err: KafkaError | None, _msg: Message) -> None:
        if err is None:
            results[index] = PublishResult(records[index].id, Outcome.DELIVERED)
        else:
            results[index] = PublishResult(records[index].id, self._classify(err), _reason(err))

    @staticmethod
    def _headers(record: OutboxRecord) -> list[tuple[str, bytes]]:
        own = {MESSAGE_ID_HEADER, CONTENT_TYPE_HEADER}
        headers = [(k, str(v).encode("utf-8")) for k, v in (record.headers or {}).items() if k not in own]
        headers.append((MESSAGE_ID_HEADER, str(record.message_id).encode("ascii")))
        if record.content_type:
            headers.append((CONTENT_TYPE_HEADER, record.content_type.encode("utf-8")))
        return headers

    def publish(self, records: Sequence[OutboxRecord], *, timeout: float = 30.0) -> list[PublishResult]:
        """Produce ``records`` and wait up to ``timeout`` s for their delivery reports."""
        if not records:
            return []
        if not self._started:
            self.start()
        assert self._producer is not None
        producer = self._producer
        deadline = time.monotonic() + max(0.0, timeout)
        results: list[PublishResult | None] = [None] * len(records)
        # Keys whose earlier message of this batch was not queued: their later messages are held
        # back (RETRY, held=True) so per-key order survives a failure in the middle of a batch.
        held: dict[str, int] = {}

        for i, rec in enumerate(records):
            if self._fatal is not None:
                break  # the rest come back RETRY below; the producer is recreated
            if rec.key is not None and rec.key in held:
                why = f"held back: message {held[rec.key]} with the same key was not sent"
                results[i] = PublishResult(rec.id, Outcome.RETRY, why, held=True)
                continue
            callback = functools.partial(self._on_delivery, results, records, i)
            while True:
                try:
                    producer.produce(
                        rec.topic,
                        value=rec.payload,
                        key=None if rec.key is None else rec.key.encode("utf-8"),
                        headers=self._headers(rec),
                        on_delivery=callback,
                    )
                except BufferError:
                    # librdkafka's local queue is full: serve delivery reports to make room.
                    if time.monotonic() < deadline:
                        self._serve(producer, 0.05)
                        continue
                    reason = "local producer queue full (queue.buffering.max.messages/kbytes)"
                    results[i] = PublishResult(rec.id, Outcome.RETRY, reason)
                except KafkaException as exc:
                    err: KafkaError = exc.args[0]
                    if err.fatal():
                        self._note(exc)
                    results[i] = PublishResult(rec.id, self._classify(err), _reason(err))
                except (TypeError, ValueError) as exc:
                    results[i] = PublishResult(rec.id, Outcome.FAILED, f"rejected by the Kafka client: {exc}")
                break
            if results[i] is not None and rec.key is not None:
                held[rec.key] = rec.id
            if i % 128 == 127:
                self._serve(producer, 0)

        # Serve delivery reports until every record has its verdict or time is up.
        while True:
            self._serve(producer, 0)
            if all(r is not None for r in results):
                break
            left = deadline - time.monotonic()
            if left <= 0 or self._fatal is not None:
                break
            self._serve(producer, min(left, 0.1))

        fatal = self._fatal
        delivered = 0
        final: list[PublishResult] = []
        for rec, res in zip(records, results, strict=True):
            if res is None:
                why = (
                    _reason(fatal) if fatal is not None
                    else f"no delivery report within {timeout:g} s"
                )
                res = PublishResult(rec.id, Outcome.RETRY, why)
            elif res.outcome is Outcome.DELIVERED:
                delivered += 1
            elif res.outcome is Outcome.RETRY and fatal is not None and not res.held:
                res = PublishResult(rec.id, Outcome.RETRY, f"{_reason(fatal)} (delivery report: {res.error})")
            final.append(res)

        if fatal is not None:
            logger.warning("recreating the Kafka producer: %s", _reason(fatal))
            self._recreate()
            return final

        if delivered == 0 and all(r.outcome is Outcome.RETRY for r in final):
            why = self._unreachable(min(2.0, self.connect_timeout))
            if why is not None:
                # Nothing reached the broker: drop what is still queued (never sent, so no
                # duplicates) and let the relay back off.
                producer.purge(in_queue=True, in_flight=False, blocking=False)
                self._serve(producer, 0)
                raise BrokerUnavailable(
                    f"Kafka cluster {mask_secrets(self.bootstrap_servers)} is not reachable: {why}"
                )
        return final
