"""The catalogue: the collections' items in a SQL database, through SQLAlchemy Core.

SQLite locally (one file under the state folder, WAL, ``synchronous=FULL``), PostgreSQL on
Kubernetes; the same statements run on both (SQLAlchemy types, no dialect-specific SQL; the one
dialect-specific thing, how a write transaction takes its lock, is in :func:`write_txn`).

Tables
- ``collections``: one row per collection; ``head`` is the collection's change counter.  Every write
  transaction locks this row first (``SELECT ... FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on
  SQLite), so a collection's sequence numbers are handed out and committed in order, with no gaps:
  a reader that saw ``head = n`` has seen every change ``<= n`` (a database-wide autoincrement would
  let change 6 commit before change 5, and a catch-up reading "after 5" would miss it for ever).
- ``collection_items``: one row per add, keyed ``(collection, seq)``; a delete sets ``deleted_seq``
  (a tombstone with its own sequence number).  At most one live row per id (a partial unique index).
- ``collection_item_tags``: (collection, seq, tag), so a collection's vocabulary is one query.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Connection,
    Double,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    create_engine,
    event,
    exc,
    select,
)
from sqlalchemy.engine import make_url

from deepindex.paths import state_dir

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 30.0  # SQLite: how long a writer waits for another process's write lock

metadata = MetaData()

collections = Table(
    "collections", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(100), nullable=False, unique=True),
    Column("created_at", Double, nullable=False),
    Column("head", BigInteger, nullable=False, default=0),  # seq of the last change
    Column("live_count", BigInteger, nullable=False, default=0),  # live items (count() without a scan)
    Column("blobs_url", String(1000), nullable=True),  # where the bytes went at creation (no secrets)
    Column("schema_version", Integer, nullable=False, default=SCHEMA_VERSION),
)

items = Table(
    "collection_items", metadata,
    Column("collection_id", Integer, ForeignKey("collections.id"), nullable=False),
    Column("seq", BigInteger, nullable=False),  # the change that added it
    Column("item_id", String(200), nullable=False),
    Column("content_hash", String(64), nullable=False),  # sha256 hex of the original bytes
    Column("size", BigInteger, nullable=False),
    Column("source", String(1000), nullable=True),
    Column("tags", JSON, nullable=False),
    Column("meta", JSON, nullable=False),
    Column("added_at", Double, nullable=False),
    Column("deleted_seq", BigInteger, nullable=True),  # the change that deleted it (a tombstone)
    PrimaryKeyConstraint("collection_id", "seq"),
)
# One live row per id: the database, not only the code, refuses a second (a backstop for races).
Index("uq_collection_items_live", items.c.collection_id, items.c.item_id, unique=True,
      sqlite_where=items.c.deleted_seq.is_(None), postgresql_where=items.c.deleted_seq.is_(None))
Index("ix_collection_items_history", items.c.collection_id, items.c.item_id, items.c.seq)
Index("ix_collection_items_deleted", items.c.collection_id, items.c.deleted_seq)

item_tags = Table(
    "collection_item_tags", metadata,
    Column("collection_id", Integer, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("tag", String(200), nullable=False),
    PrimaryKeyConstraint("collection_id", "seq", "tag"),
)
Index("ix_collection_item_tags_tag", item_tags.c.collection_id, item_tags.c.tag)


def default_catalogue_url() -> str:
    """``DEEPINDEX_CATALOGUE_URL``, else a SQLite file under the state folder."""
    env = os.environ.get("DEEPINDEX_CATALOGUE_URL")
    if env:
        return env
    return f"sqlite:///{state_dir() / 'collections' / 'catalogue.db'}"


def public_url(url: str) -> str:
    """The URL with its password hidden, for logs and ``info``."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except exc.ArgumentError:
        return "<unparseable catalogue URL>"


_engines: dict[tuple[int, str], Engine] = {}
_engines_lock = threading.Lock()


def engine_for(url: str) -> Engine:
    """One engine (and connection pool) per URL and process; the schema is created on first use."""
    key = (os.getpid(), url)  # a forked child must not share its parent's pooled connections
    with _engines_lock:
        eng = _engines.get(key)
        if eng is None:
            eng = _create_engine(url)
            try:
                create_schema(eng)  # the first connection: a server that does not answer fails here
            except exc.OperationalError as e:
                eng.dispose()
                raise ValueError(f"catalogue: cannot open {_where(url)}: {_reason(e, url)}") from e
            _engines[key] = eng
        return eng


def _where(url: str) -> str:
    """The catalogue a URL names, for an error: its scheme, host, port and database; never its user,
    password or query (which may hold a password too)."""
    try:
        u = make_url(url)
    except (exc.ArgumentError, ValueError):
        return "<unparseable catalogue URL>"
    host = f"{u.host or ''}{f':{u.port}' if u.port else ''}"
    return f"{u.drivername}://{host}" + (f"/{u.database}" if u.database else "")


def _reason(error: exc.DBAPIError, url: str) -> str:
    """The first line of what the database driver said, with the URL's password blanked should it be there."""
    lines = [ln.strip() for ln in str(error.orig or error).splitlines() if ln.strip()]
    text = lines[0][:300] if lines else type(error).__name__
    try:
        password = make_url(url).password
    except (exc.ArgumentError, ValueError):
        password = None
    return text.replace(str(password), "***") if password else text


def dispose_engines() -> None:
    """Close every pooled connection of this process (tests, and before a fork)."""
    with _engines_lock:
        for eng in _engines.values():
            eng.dispose()
        _engines.clear()


def _create_engine(url: str) -> Engine:
    try:
        u = make_url(url)
    except (exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
        # No credentials in the error: only the scheme of a URL that may hold some.
        shown = url if "@" not in url else (url.split("://", 1)[0] + "://..." if "://" in url else "...")
        raise ValueError(f"catalogue: not a database URL: {shown!r} (expected sqlite:///PATH or "
                         "postgresql://USER@HOST:PORT/DB)") from None
    try:
        if u.get_backend_name() != "sqlite":
            # pool_pre_ping: a server restarted under a long-lived service is reconnected, not an error.
            return create_engine(u, pool_pre_ping=True)
        if u.database and u.database != ":memory:":
            Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        eng = create_engine(u, connect_args={"timeout": BUSY_TIMEOUT_S})
    except exc.NoSuchModuleError:  # an ArgumentError: SQLAlchemy has no such dialect or driver
        raise ValueError(f"catalogue: {_where(url)}: SQLAlchemy knows no database {u.drivername!r} (expected "
                         "sqlite:///PATH or postgresql://USER@HOST:PORT/DB)") from None
    except exc.ArgumentError as e:
        raise ValueError(f"catalogue: {_where(url)}: {e}") from None
    except ImportError as e:  # the dialect is known, its driver module is not installed
        raise ValueError(f"catalogue: {_where(url)}: its database driver is not installed ({e})") from None

    @event.listens_for(eng, "connect")
    def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
        # SQLAlchemy, not the sqlite3 module, says when a transaction begins (see _sqlite_begin).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        # WAL: readers never wait for the writer; FULL: a commit is on disk when it returns.
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = FULL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(eng, "begin")
    def _sqlite_begin(conn: Connection) -> None:
        # A write transaction takes the write lock when it begins: a deferred one that read first
        # would fail with SQLITE_BUSY (not wait) when another process committed meanwhile.
        immediate = conn.get_execution_options().get("deepindex_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return eng


def create_schema(eng: Engine) -> None:
    """Create the tables that are missing (two processes may race here on a new catalogue)."""
    for attempt in range(3):
        try:
            with eng.connect() as conn, conn.execution_options(deepindex_write=True).begin():
                metadata.create_all(conn, checkfirst=True)
            return
        except (exc.OperationalError, exc.ProgrammingError, exc.IntegrityError) as e:
            # PostgreSQL: a concurrent CREATE TABLE of the same name fails on pg_type's unique index;
            # the second try finds the table there.
            if attempt == 2:
                raise
            log.debug("catalogue schema: retrying after %s", e)


@contextmanager
def write_txn(eng: Engine, collection_id: int) -> Iterator[tuple[Connection, int]]:
    """A write transaction holding the collection's lock; yields (connection, head).

    Writers of one collection run one at a time and see each other's commits, so a change's seq is
    ``head + 1`` and commits come in seq order.
    """
    with eng.connect() as conn, conn.execution_options(deepindex_write=True).begin():
        head = conn.execute(
            select(collections.c.head).where(collections.c.id == collection_id).with_for_update()
        ).scalar_one()
        yield conn, int(head)
