"""Liveness and readiness: what ``/healthz`` and ``/readyz`` answer.

A :class:`Health` holds callables that each return ``None`` (fine) or a short reason (not fine).
They run on the HTTP server's thread and must only read values the main loop or the poller left
behind: a probe never waits on the database or the broker.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .._redact import mask_secrets

__all__ = ["Check", "Health"]

Check = Callable[[], "str | None"]


class Health:
    """``live()`` / ``ready()`` -> ``(ok, reasons)``; reasons are masked, never credentials."""

    def __init__(self, *, live_within: float, waiting: Check | None = None) -> None:
        """``waiting``: a reason while the process waits on purpose before its loop starts (a standby
        relay); meanwhile a loop that has not turned yet is no reason to restart it."""
        self.live_within = live_within
        self.waiting = waiting
        self.last_loop: float | None = None  # time.monotonic() of the main loop's last turn
        self.started = time.monotonic()
        self._ready: list[tuple[str, Check]] = []

    def loop_turned(self) -> None:
        self.last_loop = time.monotonic()

    def add_readiness(self, name: str, check: Check) -> None:
        self._ready.append((name, check))

    def live(self) -> tuple[bool, dict[str, str]]:
        now = time.monotonic()
        since = now - (self.last_loop if self.last_loop is not None else self.started)
        if since > self.live_within and self.last_loop is None and self.waiting is not None and self.waiting():
            return True, {}
        if since > self.live_within:
            what = "turned" if self.last_loop is not None else "started"
            return False, {"loop": f"the main loop has not {what} for {since:.0f} s (limit {self.live_within:.0f} s)"}
        return True, {}

    def ready(self) -> tuple[bool, dict[str, str]]:
        reasons: dict[str, str] = {}
        _ok, live = self.live()
        reasons.update(live)
        for name, check in self._ready:
            try:
                why = check()
            except Exception as exc:  # a check must not break the endpoint
                why = f"check failed: {type(exc).__name__}: {exc}"
            if why:
                reasons[name] = mask_secrets(why)
        return not reasons, reasons
