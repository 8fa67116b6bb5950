"""Schema migrations (server/migrations), on SQLite and PostgreSQL.

`Legacy*` below is the schema as `Base.metadata.create_all` made it before migrations
existed (server/db.py at that commit, models copied as they were): databases in use were
created from it, so the baseline revision must equal it, and they must upgrade in place.
"""

from __future__ import annotations

import threading

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    inspect,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from server.db import (
    BASELINE_REVISION,
    MIGRATIONS_DIR,
    Base,
    Corpus,
    Database,
    Job,
    StoreRow,
    Team,
    alembic_config,
    new_id,
    now,
)


class LegacyBase(DeclarativeBase):
    pass


class LegacyTeam(LegacyBase):
    __tablename__ = "teams"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class LegacyApiKey(LegacyBase):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class LegacyCorpus(LegacyBase):
    __tablename__ = "corpora"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    suffix: Mapped[str] = mapped_column(String(16))
    size_bytes: Mapped[int] = mapped_column(Integer)
    documents: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class LegacyCorpusOwner(LegacyBase):
    __tablename__ = "corpus_owners"
    corpus_id: Mapped[str] = mapped_column(ForeignKey("corpora.id", ondelete="CASCADE"), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True)
    filename: Mapped[str] = mapped_column(String(255))


class LegacyStoreRow(LegacyBase):
    __tablename__ = "stores"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class LegacyGrant(LegacyBase):
    __tablename__ = "grants"
    store_id: Mapped[str] = mapped_column(ForeignKey("stores.id", ondelete="CASCADE"), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class LegacyJob(LegacyBase):
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
    tokens_done: Mapped[int] = mapped_column(Integer, default=0)
    tokens_total: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tokens_per_s: Mapped[float] = mapped_column(Float, default=0.0)
    eta_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    worker_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


HEAD = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
BIG = 5 * 2**31 + 7  # past both int4 (2^31) and the default upload limit


@pytest.fixture
def db(db_url: str):
    database = Database(db_url)
    yield database
    database.dispose()


def _alembic(db: Database, run, *args) -> None:
    """An Alembic command on `db`, in one transaction (as `Database.migrate()` runs them)."""
    with db.engine.begin() as conn:
        run(alembic_config(conn), *args)


def _schema_diff(db: Database, metadata) -> list:
    """What autogenerate would change to make `db` match `metadata` (types included): `alembic check`."""
    with db.engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), metadata)


def _revision(db: Database) -> str | None:
    with db.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _legacy_rows(db: Database) -> dict[str, str]:
    """Today's rows in a database made by `create_all` of the legacy schema; their ids by name."""
    LegacyBase.metadata.create_all(db.engine)
    with db.session() as s:
        team = LegacyTeam(name="alpha")
        s.add(team)
        s.flush()
        s.add(LegacyApiKey(team_id=team.id, key_sha256="k" * 64))
        s.add_all([
            LegacyCorpus(id="a" * 64, suffix=".txt", size_bytes=1234, documents=40),
            LegacyCorpus(id="b" * 64, suffix=".jsonl", size_bytes=99, documents=2),
            LegacyCorpus(id="c" * 64, suffix=".parquet", size_bytes=512, documents=3),
        ])
        s.flush()
        s.add_all([LegacyCorpusOwner(corpus_id=c * 64, team_id=team.id, filename=f"{c}.x") for c in "abc"])
        stores = [LegacyStoreRow(team_id=team.id) for _ in range(3)]
        s.add_all(stores)
        s.flush()
        # The .jsonl corpus was captured by "text", then by "body": the later job names the field it is read by.
        for i, (corpus, field) in enumerate([("a", "body"), ("b", "text"), ("b", "body")]):
            s.add(LegacyJob(team_id=team.id, corpus_id=corpus * 64, store_id=stores[i].id, teacher="tiny",
                            teacher_fingerprint="f" * 64, dedup_key=str(i) * 64, state="succeeded",
                            settings={"k": 8, "temperatures": [1.0, 2.0], "text_field": field},
                            tokens_done=640, tokens_total=640, created_at=1000.0 + i))
        return {"team": team.id, "store": stores[0].id}


def test_baseline_revision_is_the_create_all_schema(db: Database) -> None:
    _alembic(db, command.upgrade, BASELINE_REVISION)
    assert _schema_diff(db, LegacyBase.metadata) == []
    # And back from the head: every revision's downgrade undoes its upgrade.
    _alembic(db, command.upgrade, "head")
    _alembic(db, command.downgrade, BASELINE_REVISION)
    assert _schema_diff(db, LegacyBase.metadata) == []
    _alembic(db, command.downgrade, "base")
    assert set(inspect(db.engine).get_table_names()) == {"alembic_version"}


def test_head_schema_equals_the_models(db: Database) -> None:
    db.migrate()
    assert _revision(db) == HEAD
    assert _schema_diff(db, Base.metadata) == []
    db.migrate()  # again: nothing to do
    assert _revision(db) == HEAD


def test_create_all_database_upgrades_in_place(db: Database) -> None:
    ids = _legacy_rows(db)
    assert "alembic_version" not in inspect(db.engine).get_table_names()
    db.migrate()
    assert _revision(db) == HEAD
    assert _schema_diff(db, Base.metadata) == []
    with db.session() as s:
        assert s.scalar(select(Team.name).where(Team.id == ids["team"])) == "alpha"
        corpora = {c.id[0]: c for c in s.scalars(select(Corpus))}
        assert {k: (c.suffix, c.size_bytes, c.documents) for k, c in corpora.items()} == {
            "a": (".txt", 1234, 40), "b": (".jsonl", 99, 2), "c": (".parquet", 512, 3)}
        # A .txt corpus has no fields; a JSONL one keeps its latest job's field; one without jobs the default.
        assert {k: c.text_field for k, c in corpora.items()} == {"a": "text", "b": "body", "c": "text"}
        job = s.scalar(select(Job).where(Job.store_id == ids["store"]))
        assert job.settings == {"k": 8, "temperatures": [1.0, 2.0], "text_field": "body"}
        assert (job.state, job.tokens_done, job.tokens_total) == ("succeeded", 640, 640)
        assert s.get(StoreRow, ids["store"]) is not None
        # The counts now hold more than 2^31.
        corpora["b"].size_bytes, job.tokens_done, job.tokens_total = BIG, BIG, BIG
    with db.session() as s:
        assert s.get(Corpus, "b" * 64).size_bytes == BIG
        assert s.scalar(select(Job.tokens_total).where(Job.store_id == ids["store"])) == BIG
    counts = {c["name"]: c["type"] for c in inspect(db.engine).get_columns("jobs")}
    assert isinstance(counts["tokens_done"], BigInteger if db.is_postgresql else Integer)


def test_counts_above_2_31_round_trip(db: Database) -> None:
    db.migrate()
    with db.session() as s:
        team = Team(name="alpha")
        s.add(team)
        s.flush()
        s.add(Corpus(id="x" * 64, suffix=".txt", size_bytes=BIG, documents=BIG))
        store = StoreRow(team_id=team.id)
        s.add(store)
        s.flush()
        s.add(Job(team_id=team.id, corpus_id="x" * 64, store_id=store.id, teacher="tiny", teacher_fingerprint="f",
                  settings={}, dedup_key="d", tokens_done=BIG, tokens_total=BIG + 1))
    with db.session() as s:
        corpus = s.get(Corpus, "x" * 64)
        assert (corpus.size_bytes, corpus.documents) == (BIG, BIG)
        assert s.execute(select(Job.tokens_done, Job.tokens_total)).one() == (BIG, BIG + 1)


@pytest.mark.parametrize("existing", [False, True], ids=["empty", "create_all"])
def test_concurrent_migrations(db: Database, db_url: str, existing: bool) -> None:
    """The API processes and workers migrate at startup, possibly all at once: one does, the rest find it done."""
    if existing:
        _legacy_rows(db)
    barrier, errors = threading.Barrier(4), []

    def migrate() -> None:
        other = Database(db_url)
        try:
            barrier.wait()
            other.migrate()
        except Exception as e:
            errors.append(e)
        finally:
            other.dispose()

    threads = [threading.Thread(target=migrate, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)  # unserialized, concurrent DDL on PostgreSQL can wait forever: fail instead
    assert not any(t.is_alive() for t in threads) and errors == []
    assert _revision(db) == HEAD
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM alembic_version").scalar() == 1
    assert _schema_diff(db, Base.metadata) == []
