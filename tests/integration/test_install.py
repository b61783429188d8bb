"""A NON-editable install (a built wheel) ships its migrations and can run `outbox db upgrade`.

The wheel is built from this checkout, installed with ``pip install --target`` into a folder of its
own, and run with ``PYTHONPATH`` pointing there, from a working directory outside the repository, so
the source tree's top-level ``alembic/`` folder cannot be what makes it work: the migrations must come
from the installed wheel (``outbox/_migrations``). The alembic *library* may live anywhere, including
a ``.venv`` inside the clone (the README's set-up).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import sqlalchemy as sa

from outbox.schema import TableNames

REPO = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 180) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-q",
          "-w", str(out), str(REPO)], cwd=out)
    (built,) = out.glob("outboxkit-*.whl")
    return built


@pytest.fixture(scope="module")
def target(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tgt = tmp_path_factory.mktemp("site")
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "--no-compile", "-q",
          "--target", str(tgt), str(wheel)], cwd=tgt)
    return tgt


def _env(target: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_") and k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    return env


def test_wheel_contents(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "outbox/_migrations/env.py",
        "outbox/_migrations/versions/0001_initial.py",
        "outbox/_migrations/script.py.mako",
        "outbox/migrations.py",
        "outbox/cli/db.py",
        "outbox/py.typed",
        "consumers/py.typed",
        "outbox/testing/__init__.py",  # the contract suites external transports run
        "outbox/testing/publisher.py",
        "outbox/testing/consumer.py",
    ):
        assert required in names, f"{required} missing from {wheel.name}"
    tops = {n.split("/", 1)[0] for n in names}
    assert "alembic" not in tops, "the wheel must not ship a top-level alembic/ (it would shadow the library)"
    assert tops <= {"outbox", "consumers", f"{wheel.name.split('-py3')[0]}.dist-info"}, tops
    assert not [n for n in names if n.endswith(".pyc") or "__pycache__" in n]
    entry_points = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py3')[0]}.dist-info/entry_points.txt").decode()
    assert "outbox = outbox.cli:main" in entry_points


def test_installed_wheel_runs_db_upgrade_from_outside_the_repo(target: Path, tmp_path: Path) -> None:
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = _env(target)

    # where everything is imported from, in exactly the environment the commands below run in
    origins = json.loads(_run([sys.executable, "-c", (
        "import json, alembic, outbox, outbox.migrations as m; "
        "print(json.dumps({'outbox': outbox.__file__, 'scripts': m.script_location(), 'alembic': alembic.__file__}))"
    )], cwd=work, env=env))
    assert Path(origins["outbox"]).resolve().is_relative_to(target.resolve()), origins
    assert Path(origins["scripts"]).resolve() == (target / "outbox" / "_migrations").resolve(), origins
    assert not Path(origins["outbox"]).resolve().is_relative_to(REPO), origins
    # `alembic` is the library (wherever the environment keeps it: a `.venv` inside the clone, as the
    # README sets it up, is fine), never the repository's migrations folder of the same name
    assert origins["alembic"] is not None, "alembic resolved to a namespace package (a bare alembic/ folder)"
    assert not Path(origins["alembic"]).resolve().is_relative_to(REPO / "alembic"), origins

    db = tmp_path / "installed.db"
    url = f"sqlite:///{db}"
    out = _run([sys.executable, "-m", "outbox", "db", "upgrade", "--db", url], cwd=work, env=env)
    head = sorted(p.stem for p in (REPO / "alembic" / "versions").glob("[0-9]*.py"))[-1]
    assert f"none -> {head}" in out, out

    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        names = set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert set(TableNames().all()) | {"outbox_alembic_version"} <= names
    assert "alembic_version" not in names

    # the console script that pip put into the target folder works too
    script = target / "bin" / "outbox"
    if script.exists():
        out = _run([str(script), "db", "current", "--json", "--db", url], cwd=work, env=env)
        assert json.loads(out)["is_head"] is True


def test_installed_wheel_prints_offline_sql(target: Path, tmp_path: Path) -> None:
    out = _run([sys.executable, "-m", "outbox", "db", "sql", "--dialect", "postgresql"], cwd=tmp_path, env=_env(target))
    assert "CREATE TABLE outbox_messages" in out
