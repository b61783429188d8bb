"""OpenTelemetry, optional: the consumer's "process" span around ``handle()``, the relay's "send" span.

Nothing here imports ``opentelemetry`` until :func:`process_spans` is first called, and then once:
without ``opentelemetry-api`` installed it returns ``None`` for good and the caller runs ``handle()``
as before (one cached global read per batch).

The span follows OpenTelemetry's messaging semantic conventions (v1.26+, "process" operation):

- name ``process {destination}`` (``{messaging.operation.name} {destination}``), kind ``CONSUMER``
  (push-based: the runner, not the application, receives the message);
- attributes ``messaging.system`` (``kafka`` / ``rabbitmq``), ``messaging.operation.name`` /
  ``messaging.operation.type`` = ``process``, ``messaging.destination.name`` (topic or exchange),
  ``messaging.message.id`` (the dedup id), ``messaging.consumer.group.name`` (the Kafka group id),
  partition, offset, key, and ``outboxkit.consumer`` (the dedup consumer's name);
- the message's *creation context* (W3C ``traceparent`` / ``tracestate`` the writer stored at
  ``add()`` and the codec decoded into ``IncomingMessage.attributes``) is the span's parent AND
  is linked. The conventions require the link ("For each message it accounts for, the Process
  span SHOULD link to the message's creation context"); making it the parent as well is allowed
  for a span that processes one message, and it is what makes the writer's request and the
  handler one trace (a link alone would start a new trace per message).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ._redact import mask_secrets
from .incoming import IncomingMessage
from .message import OutboxRecord
from .transports.base import TRACEPARENT, TRACESTATE

__all__ = ["MAX_LINKS", "ProcessSpans", "note_results", "process_spans", "traced"]

_TRACER_NAME = "outboxkit"
_SYSTEMS = {"kafka": "kafka", "rabbitmq": "rabbitmq"}
#: links on one relay "send" span at most (the SDK's default span limit)
MAX_LINKS = 128

#: None = not looked for yet, False = OpenTelemetry not installed, else the ProcessSpans
_SPANS: Any = None


class ProcessSpans:
    """Opens "process" spans (one per handled message) with an OpenTelemetry tracer."""

    def __init__(self) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import Link, NoOpTracerProvider, ProxyTracerProvider, SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._trace = trace
        self._tracer = trace.get_tracer(_TRACER_NAME)  # a proxy until the application sets a provider
        self._propagator = TraceContextTextMapPropagator()
        self._link = Link
        self._kind = SpanKind.CONSUMER
        self._client = SpanKind.CLIENT
        self._status = Status
        self._code = StatusCode.ERROR
        self._no_provider = (ProxyTracerProvider, NoOpTracerProvider)

    def active(self) -> bool:
        """Whether the application has set a tracer provider: with the API alone every span would be a
        no-op costing ~15 us a message, so none is started (checked per batch: a provider set later counts)."""
        return not isinstance(self._trace.get_tracer_provider(), self._no_provider)

    def creation_context(self, message: IncomingMessage) -> Any:
        """The producer's span context carried by ``message`` (an OpenTelemetry ``Context``), or ``None``."""
        attrs = message.attributes
        return self._context(attrs.get(TRACEPARENT) or message.headers.get(TRACEPARENT),
                             attrs.get(TRACESTATE) or message.headers.get(TRACESTATE))

    def _context(self, parent: str | None, state: str | None) -> Any:
        """The ``Context`` of a W3C ``traceparent`` (and ``tracestate``); ``None`` if absent or invalid."""
        if not parent:
            return None
        carrier = {TRACEPARENT: parent}
        if state:
            carrier[TRACESTATE] = state
        ctx = self._propagator.extract(carrier)  # a malformed traceparent gives an empty context
        if not self._trace.get_current_span(ctx).get_span_context().is_valid:
            return None
        return ctx

    def _failed(self, span: Any, exc: BaseException, *, event: bool) -> None:
        """Mark ``span`` failed by ``exc``, masked (never a credential in a span); ``event``: an exception event too."""
        if not span.is_recording():
            return
        text = mask_secrets(f"{type(exc).__name__}: {exc}")[:500]
        if event:
            span.add_event("exception", {"exception.type": type(exc).__qualname__, "exception.message": text})
        span.set_attribute("error.type", type(exc).__qualname__)
        span.set_status(self._status(self._code, text))

    @contextlib.contextmanager
    def span(self, message: IncomingMessage, consumer_name: str) -> Iterator[Any]:
        """The "process" span of ``message``, current while the block runs; an exception marks it failed."""
        ctx = self.creation_context(message)
        links = [self._link(self._trace.get_current_span(ctx).get_span_context())] if ctx is not None else None
        attributes: dict[str, Any] = {
            "messaging.operation.name": "process",
            "messaging.operation.type": "process",
            "messaging.destination.name": message.topic,
            "outboxkit.consumer": consumer_name,
        }
        system = _SYSTEMS.get(message.broker or "")
        if system:
            attributes["messaging.system"] = system
        if message.id is not None:
            attributes["messaging.message.id"] = message.id
        if message.consumer_group:
            attributes["messaging.consumer.group.name"] = message.consumer_group
        if message.partition is not None:
            attributes["messaging.destination.partition.id"] = str(message.partition)
        if system == "kafka":
            if message.offset is not None:
                attributes["messaging.kafka.offset"] = message.offset
            if message.key is not None:
                attributes["messaging.kafka.message.key"] = message.key
        elif system == "rabbitmq" and message.key is not None:
            attributes["messaging.rabbitmq.destination.routing_key"] = message.key
        if message.attempt > 1:
            attributes["outboxkit.attempt"] = message.attempt
        with self._tracer.start_as_current_span(
            f"process {message.topic}", context=ctx, kind=self._kind, links=links, attributes=attributes,
            record_exception=False, set_status_on_exception=False,
        ) as span:
            try:
                yield span
            except BaseException as exc:
                self._failed(span, exc, event=True)
                raise


    @contextlib.contextmanager
    def send_span(self, records: Sequence[OutboxRecord], system: str | None) -> Iterator[Any]:
        """The relay's "send" span around one batch: kind CLIENT (the message's creation context is the
        writer's span, not this one, so it is not injected), linked to each record's creation context
        (at most :data:`MAX_LINKS`), current context as parent (none in a plain relay: a root span)."""
        topics = {r.topic for r in records}
        topic = next(iter(topics)) if len(topics) == 1 else None
        links = []
        for r in records:
            attrs = r.attributes
            ctx = self._context(attrs.get(TRACEPARENT), attrs.get(TRACESTATE)) if attrs else None
            if ctx is not None:
                links.append(self._link(self._trace.get_current_span(ctx).get_span_context()))
                if len(links) >= MAX_LINKS:
                    break
        attributes: dict[str, Any] = {"messaging.operation.name": "send", "messaging.operation.type": "send",
                                      "messaging.batch.message_count": len(records)}
        if system:
            attributes["messaging.system"] = system
        if topic is not None:
            attributes["messaging.destination.name"] = topic
        with self._tracer.start_as_current_span(
            f"send {topic}" if topic is not None else "send", kind=self._client, links=links, attributes=attributes,
            record_exception=False, set_status_on_exception=False,
        ) as span:
            try:
                yield span
            except BaseException as exc:
                self._failed(span, exc, event=False)
                raise


def _load() -> ProcessSpans | bool:
    try:
        return ProcessSpans()
    except ImportError:
        return False


def process_spans() -> ProcessSpans | None:
    """The span opener, or ``None`` when OpenTelemetry is not installed (looked for once per process) or
    no tracer provider is set (looked at on each call: call it once per batch)."""
    global _SPANS
    spans = _SPANS
    if spans is None:
        spans = _SPANS = _load()
    return spans if spans and spans.active() else None


def traced(spans: ProcessSpans | None, handle: Callable[[Any, IncomingMessage], Any], session: Any,
           message: IncomingMessage, consumer_name: str) -> Any:
    """``handle(session, message)``, in a "process" span when ``spans`` is not ``None``."""
    if spans is None:
        return handle(session, message)
    with spans.span(message, consumer_name):
        return handle(session, message)


def note_results(span: Any, results: Sequence[Any]) -> None:
    """Count a batch's outcomes on the relay's "send" span; any message not delivered marks it failed."""
    if not span.is_recording():
        return
    counts: dict[str, int] = {}
    for r in results:
        counts[r.outcome.value] = counts.get(r.outcome.value, 0) + 1
    for outcome, n in counts.items():
        span.set_attribute(f"outboxkit.{outcome}", n)
    if counts.get("failed") or counts.get("retry"):
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, f"{len(results) - counts.get('delivered', 0)} not delivered"))
