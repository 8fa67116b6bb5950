"""The database schema's Alembic migrations; `server.db.Database.migrate()` runs them (docs/server.md)."""
