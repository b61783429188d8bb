"""The HTTP endpoint: ``/metrics``, ``/healthz``, ``/readyz`` on a daemon thread.

A stdlib ``ThreadingHTTPServer``: each scrape has a thread of its own and only reads values the
loop and the poller left behind, so a slow or stuck client never holds up the relay or consumer.
Loopback unless a host is given.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .._redact import mask_secrets
from ..errors import ConfigurationError
from .health import Health
from .metrics import require_prometheus

__all__ = ["MetricsServer", "parse_address"]

log = logging.getLogger("outbox.http")


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``PORT`` -> (host, port); the host defaults to 127.0.0.1."""
    s = str(text).strip()
    host, sep, port_text = s.rpartition(":")
    if not sep:
        host, port_text = "", s
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigurationError(f"--http takes HOST:PORT (e.g. 127.0.0.1:9464), got {s!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigurationError(f"--http port must be 0..65535, got {port}")
    return host, port


class MetricsServer:
    """Serves ``registry`` and ``health``; :meth:`start` binds (port 0 picks a free one, see :attr:`port`)."""

    def __init__(self, registry: Any, health: Health, *, host: str = "127.0.0.1", port: int = 9464,
                 component: str = "relay", ident: str | None = None) -> None:
        self.registry = registry
        self.health = health
        self.host, self.port = host, port
        self.component, self.ident = component, ident
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> MetricsServer:
        pc = require_prometheus()
        server_self = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                try:
                    if path == "/metrics":
                        body = pc.generate_latest(server_self.registry)
                        self._send(200, body, pc.CONTENT_TYPE_LATEST)
                    elif path in ("/healthz", "/livez"):
                        self._json(*server_self.health.live())
                    elif path == "/readyz":
                        self._json(*server_self.health.ready())
                    else:
                        self._send(404, b'{"status": "not found", "paths": ["/metrics", "/healthz", "/readyz"]}\n',
                                   "application/json")
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _json(self, ok: bool, reasons: dict[str, str]) -> None:
                doc: dict[str, Any] = {"status": "ok" if ok else "unhealthy", "component": server_self.component}
                if server_self.ident:
                    doc["id"] = server_self.ident
                if reasons:
                    doc["reason"] = "; ".join(f"{k}: {v}" for k, v in reasons.items())
                    doc["checks"] = reasons
                body = mask_secrets(json.dumps(doc)).encode() + b"\n"
                self._send(200 if ok else 503, body, "application/json")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("http: " + format, *args)

        try:
            server = ThreadingHTTPServer((self.host, self.port), Handler)
        except OSError as exc:
            why = exc.strerror or exc
            raise ConfigurationError(f"cannot serve metrics on {self.host}:{self.port}: {why}") from None
        server.daemon_threads = True
        self._server = server
        self.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, name="outbox-http", daemon=True).start()
        log.info("serving /metrics, /healthz and /readyz on http://%s:%d", self.host, self.port)
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
