"""workers sharing a node's database, and the nonces they have seen

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table('workers',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('started_at', sa.Float(), nullable=False),
    sa.Column('last_seen', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('seen_nonces',
    sa.Column('nonce', sa.String(length=64), nullable=False),
    sa.Column('sent_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('nonce')
    )
    op.create_index(op.f('ix_seen_nonces_sent_at'), 'seen_nonces', ['sent_at'], unique=False)
    with op.batch_alter_table('served_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('worker', sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('served_jobs', schema=None) as batch_op:
        batch_op.drop_column('worker')
    op.drop_index(op.f('ix_seen_nonces_sent_at'), table_name='seen_nonces')
    op.drop_table('seen_nonces')
    op.drop_table('workers')
