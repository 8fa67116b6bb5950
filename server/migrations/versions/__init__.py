"""Alembic revisions, oldest first: `0001_baseline` is the schema that `create_all` made before migrations existed."""
