"""The suite's one TCP fault proxy, on 127.0.0.1, controlled from the test.

Every test that breaks a database or broker link does it here, never on the shared service. The
``fault_proxy`` fixture (tests/conftest.py) makes them and closes them at teardown.

``FaultProxy(target_host, target_port)`` listens on a free loopback port and forwards every
connection to the target, one thread per direction. The test can then, at any moment:

- ``pause()``: stop forwarding both ways; sockets stay open, so each peer sees silence (a frozen
  network, a full switch buffer, a VM pause on the far side). Bytes already read are held and
  delivered on ``resume()``; new connections are accepted but not forwarded either.
- ``resume()``: forward again, held bytes first.
- ``cut_after(n)``: close every live connection (FIN both ways) once ``n`` more bytes have gone
  through it (either direction, counted per connection); ``n=0`` cuts at once.
- ``refuse()`` / ``accept()``: refuse new connections or take them again; live ones are untouched.
  ``refuse()`` closes the listening socket, so a client gets ``ECONNREFUSED`` as from a stopped
  server (the port stays this proxy's: ``accept()`` listens on it again); ``refuse(reset=True)``
  accepts and resets at once, as a TCP load balancer with no healthy backend does;
  ``refuse(hangup=True)`` accepts and closes at once (a FIN), as a server that is shutting down.
  ``FaultProxy(..., refusing=True)`` starts refused (the port is known, nothing listens yet).
- ``outage()``: ``refuse()`` (same keywords) and ``cut_after(0)``: a link that goes away.
- ``reset()``: abort every live connection with a TCP RST (``SO_LINGER`` 0), as a crashed or
  restarted peer would.

``stats()`` gives bytes forwarded and connections seen, so a test can wait for traffic (for
example "the relay has connected") instead of sleeping.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

__all__ = ["FaultProxy", "ProxyStats"]


@dataclass
class ProxyStats:
    accepted: int = 0
    refused: int = 0
    live: int = 0
    bytes_up: int = 0
    """client -> target"""
    bytes_down: int = 0
    """target -> client"""
    cuts: int = 0
    resets: int = 0


@dataclass(eq=False)
class _Conn:
    client: socket.socket
    upstream: socket.socket
    budget: int | None = None
    """bytes this connection may still carry before it is cut (None: unlimited)"""
    closed: bool = False
    threads: list[threading.Thread] = field(default_factory=list)


def _abort(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN (SHUT_RD wakes a thread blocked in recv without a FIN)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        sock.close()


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    """Forward ``127.0.0.1:port`` to ``(target_host, target_port)``, with faults on demand."""

    def __init__(self, target_host: str, target_port: int, *, port: int = 0, refusing: bool = False) -> None:
        self.target = (target_host, target_port)
        self._lock = threading.Condition()
        self._conns: set[_Conn] = set()
        self._paused = False
        self._refusing = False
        self._cut_budget: int | None = None
        self._stats = ProxyStats()
        self._closed = False
        self._srv: socket.socket | None = None
        self._hangup = False
        self.port = port
        self._listen()
        if refusing:
            self.refuse()

    def _listen(self) -> None:
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(128)
        self.port = srv.getsockname()[1]
        self._srv = srv
        self._acceptor = threading.Thread(target=self._accept_loop, args=(srv,), daemon=True,
                                          name=f"fault-proxy:{self.port}")
        self._acceptor.start()

    # ------------------------------------------------------------------ control
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pause(self) -> None:
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            self._lock.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    def url(self, url: str) -> str:
        """``url`` (``scheme://user:pw@host:port/...``) with its host and port pointed at this proxy."""
        parts = urlsplit(url)
        auth = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        return urlunsplit(parts._replace(netloc=f"{auth}{self.address}"))

    def refuse(self, *, reset: bool = False, hangup: bool = False) -> None:
        """Refuse new connections: a closed port, or (``reset`` / ``hangup``) accept then RST / FIN."""
        if reset and hangup:
            raise ValueError("refuse(): reset=True or hangup=True, not both")
        with self._lock:
            self._refusing = True
            self._hangup = hangup
            srv = None if reset or hangup else self._srv
            if srv is not None:
                self._srv = None
        if srv is not None:
            with contextlib.suppress(OSError):
                srv.shutdown(socket.SHUT_RDWR)
            srv.close()
            self._acceptor.join(5)

    def accept(self) -> None:
        with self._lock:
            self._refusing = False
            if self._srv is not None or self._closed:
                return
        self._listen()

    def outage(self, *, reset: bool = False, hangup: bool = False) -> None:
        """The link goes away: new connections refused (as :meth:`refuse`), live ones closed (FIN)."""
        self.refuse(reset=reset, hangup=hangup)
        self.cut_after(0)

    def cut_after(self, nbytes: int) -> None:
        """Cut each live connection after ``nbytes`` more bytes; new connections are not affected."""
        with self._lock:
            for c in self._conns:
                c.budget = nbytes
            conns = [c for c in self._conns if nbytes <= 0]
        for c in conns:
            self._finish(c, cut=True)

    def cut_next_after(self, nbytes: int) -> None:
        """Like :meth:`cut_after`, and also for every connection opened from now on (until :meth:`heal`)."""
        with self._lock:
            self._cut_budget = nbytes
        self.cut_after(nbytes)

    def heal(self) -> None:
        """Forget pending cuts and refusals, resume forwarding."""
        with self._lock:
            self._cut_budget = None
            self._refusing = False
            for c in self._conns:
                c.budget = None
        self.accept()
        self.resume()

    def reset(self) -> int:
        """Abort every live connection with an RST; return how many there were."""
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
            self._stats.resets += len(conns)
            self._stats.live = 0
            self._lock.notify_all()
        for c in conns:
            c.closed = True
            _abort(c.client)
            _abort(c.upstream)
        return len(conns)

    def stats(self) -> ProxyStats:
        with self._lock:
            return ProxyStats(**self._stats.__dict__)

    def wait_for(self, cond: Callable[[ProxyStats], bool], timeout: float, what: str) -> ProxyStats:
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if cond(s):
                return s
            if time.monotonic() >= deadline:
                raise AssertionError(f"proxy {self.address}: timed out after {timeout:g} s waiting for {what} ({s})")
            time.sleep(0.02)

    def close(self) -> None:
        self._closed = True
        srv, self._srv = self._srv, None
        if srv is not None:
            with contextlib.suppress(OSError):
                srv.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                srv.close()
        self.resume()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            self._finish(c)
        self._acceptor.join(5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ forwarding
    def _accept_loop(self, srv: socket.socket) -> None:
        while not self._closed:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            if self._turn_away(client):
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _abort(client)
                continue
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(client, upstream)
            with self._lock:
                late = self._refusing  # refused while this one was connecting upstream
                if late:
                    self._stats.refused += 1
                    hangup = self._hangup
                else:
                    conn.budget = self._cut_budget
                    self._conns.add(conn)
                    self._stats.accepted += 1
                    self._stats.live = len(self._conns)
            if late:
                _close(upstream)
                (_close if hangup else _abort)(client)
                continue
            for src, dst, up in ((client, upstream, True), (upstream, client, False)):
                t = threading.Thread(target=self._pump, args=(conn, src, dst, up), daemon=True)
                conn.threads.append(t)
                t.start()

    def _turn_away(self, client: socket.socket) -> bool:
        """Refuse ``client`` if refusing (RST, or FIN for a hangup); say whether it was."""
        with self._lock:
            if not self._refusing:
                return False
            self._stats.refused += 1
            hangup = self._hangup
        (_close if hangup else _abort)(client)
        return True

    def _pump(self, conn: _Conn, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while not conn.closed:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:
                    while self._paused and not conn.closed and not self._closed:
                        self._lock.wait(0.5)
                    if conn.closed:
                        break
                    cut = False
                    if conn.budget is not None:
                        if len(data) >= conn.budget:
                            data, cut = data[: conn.budget], True
                        conn.budget -= len(data)
                    if up:
                        self._stats.bytes_up += len(data)
                    else:
                        self._stats.bytes_down += len(data)
                if data:
                    dst.sendall(data)
                if cut:
                    self._finish(conn, cut=True)
                    return
        except OSError:
            pass
        self._finish(conn)

    def _finish(self, conn: _Conn, *, cut: bool = False) -> None:
        with self._lock:
            if conn.closed:
                return
            conn.closed = True
            self._conns.discard(conn)
            self._stats.live = len(self._conns)
            if cut:
                self._stats.cuts += 1
            self._lock.notify_all()
        _close(conn.client)
        _close(conn.upstream)
