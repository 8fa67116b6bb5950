"""Alembic's environment: runs on the connection (and inside the transaction) that
`server.db.Database.migrate()` opened and locked, so the configuration needs no ini file
and works from an installed package."""

from alembic import context

from server.db import Base

context.configure(connection=context.config.attributes["connection"], target_metadata=Base.metadata)
with context.begin_transaction():  # a no-op inside migrate()'s transaction, which commits everything at once
    context.run_migrations()
