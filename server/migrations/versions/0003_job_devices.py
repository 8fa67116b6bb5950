"""Jobs record the devices their capture runs on (one entry per rank process).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("devices", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "devices")
