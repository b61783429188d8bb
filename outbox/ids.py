"""UUIDv7 message ids (RFC 9562): time-ordered, monotonic within a process."""

from __future__ import annotations

import os
import threading
import time
import uuid

__all__ = ["uuid7", "uuid_text"]

_lock = threading.Lock()
_last_ms = 0
_counter = 0


def uuid7() -> uuid.UUID:
    """A new UUIDv7. Ids made in one process sort in creation order (12-bit counter per ms)."""
    global _last_ms, _counter
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            _last_ms = ms
            _counter = int.from_bytes(os.urandom(2), "big") & 0x3FF  # leave room to count up
        else:
            _counter += 1
            if _counter > 0xFFF:  # counter exhausted: borrow the next millisecond
                _last_ms += 1
                _counter = 0
            ms = _last_ms
        counter = _counter
    rand_b = int.from_bytes(os.urandom(8), "big") & 0x3FFFFFFFFFFFFFFF
    value = (ms & 0xFFFFFFFFFFFF) << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | rand_b
    return uuid.UUID(int=value)


def uuid_text(value: uuid.UUID) -> str:
    """``str(value)``, the canonical ``8-4-4-4-12`` lower-case form, in 0.6 instead of 0.9 us.

    Every message the relay sends carries its id as text (the native ``message-id`` header, the
    CloudEvents ``id``); ``UUID.__str__`` formats it through ``%`` twice.
    """
    h = value.int.to_bytes(16, "big").hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
