"""usage per day, token budgets, trace context of jobs

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table('usage_days',
    sa.Column('day', sa.String(length=10), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('client', sa.String(length=255), nullable=False),
    sa.Column('key_label', sa.String(length=255), nullable=False),
    sa.Column('model', sa.String(length=255), nullable=False),
    sa.Column('jobs', sa.Integer(), nullable=False),
    sa.Column('prompt_tokens', sa.BigInteger(), nullable=False),
    sa.Column('completion_tokens', sa.BigInteger(), nullable=False),
    sa.Column('estimated_jobs', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('day', 'role', 'client', 'key_label', 'model')
    )
    op.create_table('budgets',
    sa.Column('client_node', sa.String(length=255), nullable=False),
    sa.Column('key_label', sa.String(length=255), nullable=False),
    sa.Column('daily_tokens', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('client_node', 'key_label')
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('traceparent', sa.String(length=55), nullable=True))
    with op.batch_alter_table('routed_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('api_key_label', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('traceparent', sa.String(length=55), nullable=True))
        batch_op.add_column(sa.Column('tokens_counted', sa.Boolean(), server_default=sa.false(), nullable=False))
    with op.batch_alter_table('served_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('traceparent', sa.String(length=55), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('served_jobs', schema=None) as batch_op:
        batch_op.drop_column('traceparent')
    with op.batch_alter_table('routed_jobs', schema=None) as batch_op:
        batch_op.drop_column('tokens_counted')
        batch_op.drop_column('traceparent')
        batch_op.drop_column('api_key_label')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('traceparent')
    op.drop_table('budgets')
    op.drop_table('usage_days')
