"""Corpora record the field their chat rows' messages are read from.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("corpora", sa.Column("messages_field", sa.String(255), nullable=False, server_default="messages"))


def downgrade() -> None:
    op.drop_column("corpora", "messages_field")
