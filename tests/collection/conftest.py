"""Catalogues for the collection tests: a SQLite file per test, and a database per test on one real
PostgreSQL server per package (started here on a free loopback port when the machine has PostgreSQL's
binaries and the ``psycopg`` driver; those tests are skipped, saying why, when it has not)."""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deepindex.net import free_port
from support import kill_session, wait_until


@pytest.fixture(autouse=True)
def _close_engines() -> Iterator[None]:
    """Every test's catalogue is its own: close its pooled connections when the test ends."""
    yield
    from deepindex.collection.catalogue import dispose_engines

    dispose_engines()


@pytest.fixture
def no_settings_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No DEEPINDEX_BLOBS_URL or DEEPINDEX_CATALOGUE_URL from the shell: each store is the one a test names."""
    monkeypatch.delenv("DEEPINDEX_BLOBS_URL", raising=False)
    monkeypatch.delenv("DEEPINDEX_CATALOGUE_URL", raising=False)


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    hits = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return hits[-1] if hits else None


@dataclass
class Postgres:
    base_url: str  # postgresql+psycopg://postgres@127.0.0.1:PORT
    port: int

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(sql)


@pytest.fixture(scope="package")
def postgres_server() -> Iterator[Postgres | str]:
    """A throwaway PostgreSQL cluster, or the reason there is none (a string)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        yield "the psycopg driver is not installed (pip install -e '.[postgres]')"
        return
    initdb, postgres = _pg_bin("initdb"), _pg_bin("postgres")
    if not (initdb and postgres):
        yield "PostgreSQL's initdb/postgres binaries are not on this machine"
        return
    data = Path(tempfile.mkdtemp(prefix="deepindex-pg-"))  # not under pytest's 0700 root: postgres must enter it
    run_as: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(data, ignore_errors=True)
            yield "running as root and there is no 'postgres' user to run the server as"
            return
        os.chown(data, pw.pw_uid, pw.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    db = data / "db"
    init = subprocess.run([*run_as, initdb, "-D", str(db), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"],
                          capture_output=True, text=True, timeout=120)
    if init.returncode != 0:
        shutil.rmtree(data, ignore_errors=True)
        yield f"initdb failed: {init.stderr.strip()[-300:]}"
        return
    port = free_port()
    log = open(data / "server.log", "ab")  # noqa: SIM115 (held open for the server's life)
    # fsync off: the test server's own durability is not under test (the catalogue's is, on SQLite).
    proc = subprocess.Popen([*run_as, postgres, "-D", str(db), "-p", str(port), "-h", "127.0.0.1", "-k", str(data),
                             "-F", "-c", "max_connections=200"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    server = Postgres(f"postgresql+psycopg://postgres@127.0.0.1:{port}", port)

    def ready() -> bool:
        try:
            server.admin("SELECT 1")
            return True
        except Exception:  # noqa: BLE001 (any connection error means "not yet")
            return False

    try:
        wait_until(ready, 60, every=0.2, alive=lambda: proc.poll() is None,
                   what=f"postgres on port {port} (see {data / 'server.log'})")
        yield server
    finally:
        with contextlib.suppress(Exception):
            kill_session(proc, signal.SIGINT)  # "fast shutdown"
        log.close()
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def pg_url(postgres_server: Postgres | str) -> Iterator[str]:
    """A fresh database on the package's PostgreSQL server."""
    if isinstance(postgres_server, str):
        pytest.skip(f"PostgreSQL: {postgres_server}")
    name = f"t_{uuid.uuid4().hex[:12]}"
    postgres_server.admin(f"CREATE DATABASE {name}")
    yield f"{postgres_server.base_url}/{name}"
    from deepindex.collection.catalogue import dispose_engines

    dispose_engines()
    postgres_server.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgres"])
def catalogue_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same tests on both catalogues the platform uses."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalogue.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url
