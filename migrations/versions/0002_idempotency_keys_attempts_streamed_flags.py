"""idempotency keys, dispatch attempts, streamed flags, driver cool-down, job timeout setting

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 08:56:48.383879
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table('node_config', schema=None) as batch_op:
        batch_op.add_column(sa.Column('job_timeout', sa.Float(), nullable=True))

    with op.batch_alter_table('driver_registrations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('failures', sa.Integer(), server_default=sa.text('0'), nullable=False))
        batch_op.add_column(sa.Column('cooldown_until', sa.Float(), server_default=sa.text('0'), nullable=False))

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('idempotency_key', sa.String(length=255), nullable=True))
        batch_op.create_index('ix_jobs_finished_at', ['finished_at'], unique=False)
        batch_op.create_index('ux_jobs_idempotency', ['client', 'idempotency_key'], unique=True)

    with op.batch_alter_table('routed_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('attempts', sa.Integer(), server_default=sa.text('0'), nullable=False))
        batch_op.add_column(sa.Column('streamed', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.create_index('ix_routed_jobs_status_deadline', ['status', 'deadline'], unique=False)

    with op.batch_alter_table('served_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('streamed', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.create_index('ix_served_jobs_status', ['status'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('node_config', schema=None) as batch_op:
        batch_op.drop_column('job_timeout')

    with op.batch_alter_table('served_jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_served_jobs_status')
        batch_op.drop_column('streamed')

    with op.batch_alter_table('routed_jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_routed_jobs_status_deadline')
        batch_op.drop_column('streamed')
        batch_op.drop_column('attempts')

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ux_jobs_idempotency')
        batch_op.drop_index('ix_jobs_finished_at')
        batch_op.drop_column('idempotency_key')

    with op.batch_alter_table('driver_registrations', schema=None) as batch_op:
        batch_op.drop_column('cooldown_until')
        batch_op.drop_column('failures')

