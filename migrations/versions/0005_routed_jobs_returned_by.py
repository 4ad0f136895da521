"""routed jobs remember the driver that last gave them back

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 14:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table('routed_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('returned_by', sa.String(length=255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('routed_jobs', schema=None) as batch_op:
        batch_op.drop_column('returned_by')
