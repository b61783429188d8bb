"""The suite's fault proxy (tests/_proxy.py) itself: forwards, pauses (silence, then the held bytes), cuts,
refuses (closed port, RST or FIN), resets, outages."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

from tests._proxy import FaultProxy


@pytest.fixture
def echo_port() -> Iterator[int]:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)

    def serve(c: socket.socket) -> None:
        with c, contextlib.suppress(OSError):
            while data := c.recv(4096):
                c.sendall(data)

    def loop() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    yield srv.getsockname()[1]
    srv.close()


@pytest.fixture
def proxy(echo_port: int) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", echo_port) as p:
        yield p


def _client(p: FaultProxy, timeout: float = 5.0) -> socket.socket:
    c = socket.create_connection(("127.0.0.1", p.port), timeout=timeout)
    p.wait_for(lambda s: s.live >= 1, 5, "the connection")
    return c


def _recv_exactly(c: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = c.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def test_forwards_both_ways(proxy: FaultProxy) -> None:
    with _client(proxy) as c:
        c.sendall(b"hello")
        assert _recv_exactly(c, 5) == b"hello"
    s = proxy.stats()
    assert s.bytes_up == 5 and s.bytes_down == 5 and s.accepted == 1


def test_pause_is_silence_and_resume_delivers_what_was_held(proxy: FaultProxy) -> None:
    with _client(proxy) as c:
        proxy.pause()
        c.sendall(b"ping")
        c.settimeout(0.5)
        with pytest.raises(TimeoutError):  # the connection stays open, nothing comes back
            c.recv(10)
        proxy.resume()
        c.settimeout(5)
        assert _recv_exactly(c, 4) == b"ping"


def test_cut_after_n_bytes(proxy: FaultProxy) -> None:
    with _client(proxy) as c:
        proxy.cut_after(15)  # 10 bytes up, then 5 of the 10 echoed back, then FIN
        c.sendall(b"0123456789")
        got = _recv_exactly(c, 10)
        assert got == b"01234"
    assert proxy.stats().cuts == 1


def test_refuse_new_connections_then_accept_again(proxy: FaultProxy) -> None:
    with _client(proxy) as live:
        proxy.refuse()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        live.sendall(b"still")  # a live connection is untouched
        assert _recv_exactly(live, 5) == b"still"
        proxy.accept()
        with _client(proxy) as c2:
            c2.sendall(b"ok")
            assert _recv_exactly(c2, 2) == b"ok"


def test_refuse_with_reset_accepts_then_resets(proxy: FaultProxy) -> None:
    proxy.refuse(reset=True)
    with pytest.raises((ConnectionResetError, BrokenPipeError)):  # at connect, or at the first send/recv
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
            proxy.wait_for(lambda s: s.refused == 1, 5, "the refusal")
            c.sendall(b"x")
            if not c.recv(1):
                raise ConnectionResetError("closed")
    assert proxy.stats().refused == 1


def test_reset_aborts_live_connections_with_rst(proxy: FaultProxy) -> None:
    with _client(proxy) as c:
        c.sendall(b"a")
        assert _recv_exactly(c, 1) == b"a"
        assert proxy.reset() == 1
        with pytest.raises(ConnectionResetError):
            c.recv(10)


def test_refuse_with_hangup_accepts_then_closes_with_a_fin(proxy: FaultProxy) -> None:
    with _client(proxy) as live:
        proxy.refuse(hangup=True)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
            assert c.recv(1) == b""  # an orderly close, not a reset
        live.sendall(b"live")  # a live connection is untouched
        assert _recv_exactly(live, 4) == b"live"
    assert proxy.stats().refused == 1
    with pytest.raises(ValueError, match="not both"):
        proxy.refuse(reset=True, hangup=True)


def test_outage_closes_the_live_ones_and_refuses_new_ones_until_accept(proxy: FaultProxy) -> None:
    port = proxy.port
    with _client(proxy) as live:
        proxy.outage()
        assert live.recv(1) == b""  # FIN
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
    proxy.accept()
    assert proxy.port == port  # the same port again
    with _client(proxy) as c:
        c.sendall(b"back")
        assert _recv_exactly(c, 4) == b"back"
    assert proxy.stats().cuts == 1


def test_outage_with_hangup_counts_the_refused_connections(proxy: FaultProxy) -> None:
    proxy.outage(hangup=True)
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
            assert c.recv(1) == b""
    assert proxy.wait_for(lambda s: s.refused == 3, 5, "three refusals").accepted == 0


def test_starts_refusing_on_a_known_port_then_heal_listens(echo_port: int) -> None:
    with FaultProxy("127.0.0.1", echo_port, refusing=True) as p:
        assert p.port > 0
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", p.port), timeout=5)
        p.heal()
        with _client(p) as c:
            c.sendall(b"up")
            assert _recv_exactly(c, 2) == b"up"


def test_url_points_at_the_proxy_and_keeps_the_credentials(proxy: FaultProxy) -> None:
    assert proxy.url("amqp://guest:pw@10.0.0.1:5672/%2F?heartbeat=5") == (
        f"amqp://guest:pw@127.0.0.1:{proxy.port}/%2F?heartbeat=5")
    assert proxy.url("postgresql+psycopg://db.example/test") == f"postgresql+psycopg://127.0.0.1:{proxy.port}/test"


def test_fixture_makes_a_forwarding_proxy(fault_proxy, echo_port: int) -> None:
    p = fault_proxy("127.0.0.1", echo_port)
    with _client(p) as c:
        c.sendall(b"f")
        assert _recv_exactly(c, 1) == b"f"
