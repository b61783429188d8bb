"""Log output for the daemons: JSON lines, who is logging (relay id, consumer), and rate limiting.

Installed by ``outbox.cli.setup_logging``; usable by any application that runs a relay or a
runner itself::

    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    handler.addFilter(RateLimitFilter(window=30))

Every field of a JSON line is masked (:func:`outbox._redact.mask_secrets`), as text lines are.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from ._redact import mask_secrets

__all__ = [
    "LOG_FORMATS", "ContextFilter", "JsonFormatter", "MaskingFormatter", "RateLimitFilter", "log_context",
    "set_process_context",
]

LOG_FORMATS = ("text", "json")

#: fields a relay or a runner attaches to every record it logs (``relay_id``, ``consumer``)
CONTEXT_FIELDS = ("relay_id", "relay_group", "consumer")

_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("outbox_log_context", default=None)
#: the context of the whole process (one ``outbox relay`` or ``outbox consume``): seen by every thread
_process_context: dict[str, str] = {}


@contextlib.contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """Attach ``fields`` (e.g. ``relay_id=...``) to every record logged in this context (thread/task)."""
    merged = {**(_context.get() or {}), **{k: str(v) for k, v in fields.items() if v is not None}}
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


def set_process_context(**fields: str | None) -> None:
    """Fields for every record of this process, whatever thread logs it (the CLI daemons set them)."""
    _process_context.update({k: str(v) for k, v in fields.items() if v is not None})


class ContextFilter(logging.Filter):
    """Copies the relay id / consumer name of the current context onto each record (never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in {**_process_context, **(_context.get() or {})}.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class MaskingFormatter(logging.Formatter):
    """The text format, with passwords masked."""

    def format(self, record: logging.LogRecord) -> str:
        return mask_secrets(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (ISO 8601 UTC), ``level``, ``logger``, ``message``, the context
    fields (``relay_id``, ``relay_group``, ``consumer``) when known, ``exc`` (the traceback, a string)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = dt.datetime.fromtimestamp(record.created, dt.timezone.utc)
        out: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": mask_secrets(record.getMessage()),
        }
        for key in CONTEXT_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = mask_secrets(value)
        if record.exc_info:
            out["exc"] = mask_secrets(self.formatException(record.exc_info))
        elif record.exc_text:
            out["exc"] = mask_secrets(record.exc_text)
        if record.stack_info:
            out["stack"] = mask_secrets(self.formatStack(record.stack_info))
        return json.dumps(out, ensure_ascii=False, default=str)


_NUMBERS = re.compile(r"\d+(?:\.\d+)?")


class RateLimitFilter(logging.Filter):
    """Drops repeats of the same warning or error within ``window`` seconds, and says how many it dropped.

    Two records are "the same" when they come from the same logger at the same level and their
    messages differ only in numbers (librdkafka's ``after 12ms``, our ``retrying in 3.2 s``). The
    first passes; repeats within the window are counted, not shown; the first one after the window
    passes with ``(repeated N times in 30 s)`` appended. Records below ``min_level`` (progress lines
    at INFO) always pass. At most ``max_keys`` distinct messages are remembered.
    """

    def __init__(self, window: float = 30.0, *, min_level: int = logging.WARNING, max_keys: int = 1000,
                 clock: Any = time.monotonic) -> None:
        super().__init__()
        self.window = float(window)
        self.min_level = min_level
        self.max_keys = max_keys
        self._clock = clock
        # key -> [shown at, dropped since, last text dropped]
        self._seen: OrderedDict[tuple[str, int, str], list[Any]] = OrderedDict()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.min_level or self.window <= 0:
            return True
        try:
            text = record.getMessage()
        except Exception:
            return True
        key = (record.name, record.levelno, _NUMBERS.sub("#", text))
        now = self._clock()
        with self._lock:
            entry = self._seen.get(key)
            if entry is not None and now - entry[0] < self.window:
                entry[1] += 1
                entry[2] = text
                return False
            dropped = int(entry[1]) if entry is not None else 0
            since = now - entry[0] if entry is not None else 0.0
            self._seen[key] = [now, 0, text]
            self._seen.move_to_end(key)
            while len(self._seen) > self.max_keys:
                self._seen.popitem(last=False)
        if dropped:
            record.msg = f"{text} (repeated {dropped} times in {since:.0f} s)"
            record.args = None
        return True

    def pending(self) -> list[tuple[str, int, int, str]]:
        """(logger, level, dropped, last text) of the messages with repeats not reported yet."""
        with self._lock:
            return [(k[0], k[1], int(v[1]), str(v[2])) for k, v in self._seen.items() if v[1]]

    def flush(self, handler: logging.Handler) -> None:
        """Report the repeats not reported yet (at exit), one line per message, through ``handler``."""
        now = self._clock()
        with self._lock:
            items = [(k, list(v)) for k, v in self._seen.items() if v[1]]
            for k, _v in items:
                self._seen[k][1] = 0
        for (name, level, _), (shown, dropped, text) in items:
            rec = logging.LogRecord(name, level, __file__, 0, "%s (repeated %d times in %.0f s)",
                                    (text, dropped, now - shown), None)
            for f in handler.filters:  # the context, not this filter (the line is the count itself)
                if f is not self:
                    f.filter(rec) if isinstance(f, logging.Filter) else f(rec)
            handler.emit(rec)
