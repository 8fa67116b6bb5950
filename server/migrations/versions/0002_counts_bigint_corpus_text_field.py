"""Byte and token counts as BIGINT; corpora remember the `text_field` they were read with.

On PostgreSQL an INTEGER is 4 bytes and overflows at 2^31, which is exactly the default
upload limit in bytes; SQLite's INTEGER already stores 8 bytes, so it is left as it is
(the models declare `Count`, BIGINT with an INTEGER variant for SQLite).

Corpora uploaded before this revision were validated with a `text_field` that was not
kept: a JSONL or Parquet corpus takes the one its most recent job was captured with (what
its captures used), else the default "text"; a .txt corpus has no fields and keeps "text".

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_COUNTS = (("corpora", "size_bytes"), ("corpora", "documents"), ("jobs", "tokens_done"), ("jobs", "tokens_total"))


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table, column in _COUNTS:
            op.alter_column(table, column, type_=sa.BigInteger(), existing_type=sa.Integer())
    op.add_column("corpora", sa.Column("text_field", sa.String(length=255), nullable=False, server_default="text"))
    _backfill_text_field()


def _backfill_text_field() -> None:
    corpora = sa.table("corpora", sa.column("id", sa.String), sa.column("suffix", sa.String),
                       sa.column("text_field", sa.String))
    jobs = sa.table("jobs", sa.column("corpus_id", sa.String), sa.column("settings", sa.JSON),
                    sa.column("created_at", sa.Float))
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(jobs.c.corpus_id, jobs.c.settings)
        .join(corpora, corpora.c.id == jobs.c.corpus_id)
        .where(corpora.c.suffix != ".txt")
        .order_by(jobs.c.created_at)
    )
    latest = {corpus_id: settings.get("text_field", "text") for corpus_id, settings in rows}  # the last job wins
    for corpus_id, text_field in latest.items():
        bind.execute(corpora.update().where(corpora.c.id == corpus_id).values(text_field=text_field))


def downgrade() -> None:
    op.drop_column("corpora", "text_field")
    if op.get_bind().dialect.name == "postgresql":
        for table, column in _COUNTS:
            op.alter_column(table, column, type_=sa.Integer(), existing_type=sa.BigInteger())
