"""The service's database: teams, API keys, corpora, stores, grants and the job queue.

SQLAlchemy 2 models that run unchanged on SQLite (one box; WAL mode) and PostgreSQL
(many workers). Timestamps are Unix seconds (floats) so that heartbeat arithmetic is
the same on every backend. The schema is made and upgraded by the Alembic revisions in
`server/migrations` (`Database.migrate()`); a change to a model needs a revision there.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    inspect,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE_STATES = ("queued", "running")

# A count of bytes or tokens: PostgreSQL's INTEGER is 4 bytes and overflows at 2^31 (the default
# upload limit); SQLite's INTEGER already holds 8 bytes, and declaring it so keeps SQLite's
# schema as `create_all` made it before migrations existed.
Count = BigInteger().with_variant(Integer(), "sqlite")

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
BASELINE_REVISION = "0001"  # the schema `create_all` made before migrations existed
# Any constant: the PostgreSQL advisory lock that lets one process at a time migrate.
_MIGRATION_LOCK_KEY = 0x6C6F676974  # "logit"


def now() -> float:
    return time.time()


def new_id() -> str:
    return uuid.uuid4().hex


def hash_key(key: str) -> str:
    """API keys are stored as their sha256: a leaked database does not leak usable keys."""
    return hashlib.sha256(key.encode()).hexdigest()


class Base(DeclarativeBase):
    pass


class Team(Base):
    __tablename__ = "teams"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class Corpus(Base):
    """An uploaded corpus file, read as its suffix says with `text_field` (JSONL field or Parquet
    column; "text" for .txt) and, for chat rows, `messages_field`. Its id is a sha256 over its
    bytes, suffix and fields (`server.routers.corpora.corpus_key`); rows from before revision
    0002 keep the sha256 of their bytes alone."""

    __tablename__ = "corpora"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    suffix: Mapped[str] = mapped_column(String(16))
    text_field: Mapped[str] = mapped_column(String(255), default="text", server_default="text")
    messages_field: Mapped[str] = mapped_column(String(255), default="messages", server_default="messages")
    size_bytes: Mapped[int] = mapped_column(Count)
    documents: Mapped[int] = mapped_column(Count)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class CorpusOwner(Base):
    """Which teams uploaded a corpus: knowing a content hash is not enough to capture it."""

    __tablename__ = "corpus_owners"
    corpus_id: Mapped[str] = mapped_column(ForeignKey("corpora.id", ondelete="CASCADE"), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True)
    filename: Mapped[str] = mapped_column(String(255))


class StoreRow(Base):
    """A store in the catalog; its files live under the storage root, in a directory named by its id."""

    __tablename__ = "stores"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class Grant(Base):
    """Read access to a store for a team other than its owner."""

    __tablename__ = "grants"
    store_id: Mapped[str] = mapped_column(ForeignKey("stores.id", ondelete="CASCADE"), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class Job(Base):
    """A capture job. `dedup_key` is unique: one job per (corpus, teacher fingerprint, settings)."""

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    corpus_id: Mapped[str] = mapped_column(ForeignKey("corpora.id"))
    store_id: Mapped[str] = mapped_column(ForeignKey("stores.id", ondelete="CASCADE"), unique=True)
    teacher: Mapped[str] = mapped_column(String(128))
    teacher_fingerprint: Mapped[str] = mapped_column(String(64))
    settings: Mapped[dict] = mapped_column(JSON)
    dedup_key: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    tokens_done: Mapped[int] = mapped_column(Count, default=0)
    tokens_total: Mapped[int | None] = mapped_column(Count, nullable=True)
    tokens_per_s: Mapped[float] = mapped_column(Float, default=0.0)
    eta_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    worker_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    devices: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)  # of the last attempt, one per rank
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


def make_engine(url: str) -> Engine:
    """An engine for `url`. SQLite: WAL (readers never block the writer), a busy timeout, and
    `BEGIN IMMEDIATE` so that a read-then-write transaction takes the write lock up front
    instead of failing with SQLITE_BUSY when another process commits in between."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None  # the driver's own BEGIN is replaced by ours below
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout=30000")
        _set_wal(cur)
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _set_wal(cur: sqlite3.Cursor, wait_s: float = 30.0) -> None:
    """Switch to WAL. That switch needs the database to itself, and SQLite answers "database is
    locked" at once instead of waiting when another connection holds it (processes starting
    together on a new database): retry until `wait_s` has passed, as the busy timeout would."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Database:
    """An engine, its session factory, and schema migrations."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_postgresql(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def migrate(self) -> None:
        """Create the schema or upgrade it to the newest revision, in one transaction.

        A database made by `create_all` before migrations existed has the tables but no
        `alembic_version`: it is stamped at the baseline first. The API processes and workers
        on other machines may start at once, so one migrates at a time: on PostgreSQL under an
        advisory lock held until the commit, on SQLite under the write lock that the
        transaction's `BEGIN IMMEDIATE` takes. The others wait, then find the schema current."""
        with self.engine.begin() as conn:
            if self.is_postgresql:
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_KEY})")
            config = alembic_config(conn)
            tables = set(inspect(conn).get_table_names())
            if "teams" in tables and "alembic_version" not in tables:
                command.stamp(config, BASELINE_REVISION)
            command.upgrade(config, "head")

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on any exception."""
        with self.sessions() as s, s.begin():
            yield s

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config(connection: Connection) -> Config:
    """Alembic's configuration without an ini file (so it works from an installed package):
    the revisions in `server/migrations`, run on `connection`."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config
