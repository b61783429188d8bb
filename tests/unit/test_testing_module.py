"""outbox.testing: importable from an installed outboxkit, never imported by outbox itself, and a
clear error where pytest is missing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import outbox.testing

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, *extra_path: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*extra_path, str(ROOT)])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60,
                          env=env)


def test_the_public_names_resolve() -> None:
    for name in outbox.testing.__all__:
        assert getattr(outbox.testing, name) is not None
    assert outbox.testing.PublisherContract.features == outbox.testing.Features()


def test_outbox_and_its_transports_never_load_the_suites_or_pytest() -> None:
    out = _python("""
        import sys
        import outbox, outbox.transports, outbox.relay, outbox.cli, consumers
        from outbox.transports import get
        get("kafka"), get("rabbitmq"), get("memory")
        print(sorted(m for m in ("pytest", "outbox.testing") if m in sys.modules))
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_without_pytest_the_import_error_says_what_to_install(tmp_path: Path) -> None:
    (tmp_path / "pytest.py").write_text("raise ImportError('no pytest here')\n")  # shadows the real one
    out = _python("import outbox.testing", str(tmp_path))
    assert out.returncode != 0
    assert "install pytest" in out.stderr
