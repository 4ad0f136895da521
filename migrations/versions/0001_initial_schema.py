"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-25 08:48:30.229939
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table('driver_registrations',
    sa.Column('node', sa.String(length=255), nullable=False),
    sa.Column('model', sa.String(length=255), nullable=False),
    sa.Column('is_public', sa.Boolean(), nullable=False),
    sa.Column('capacity', sa.Integer(), nullable=False),
    sa.Column('last_seen', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('node', 'model')
    )
    with op.batch_alter_table('driver_registrations', schema=None) as batch_op:
        batch_op.create_index('ix_driver_registrations_model', ['model'], unique=False)

    op.create_table('jobs',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('client', sa.String(length=255), nullable=False),
    sa.Column('model', sa.String(length=255), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('router_node', sa.String(length=255), nullable=True),
    sa.Column('driver_node', sa.String(length=255), nullable=True),
    sa.Column('next_seq', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('first_token_at', sa.Float(), nullable=True),
    sa.Column('finished_at', sa.Float(), nullable=True),
    sa.Column('deadline', sa.Float(), nullable=False),
    sa.Column('finish_reason', sa.String(length=64), nullable=True),
    sa.Column('usage', sa.JSON(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_status_deadline', ['status', 'deadline'], unique=False)

    op.create_table('node_config',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('is_router', sa.Boolean(), nullable=False),
    sa.Column('router_node', sa.String(length=255), nullable=True),
    sa.Column('driver_models', sa.JSON(), nullable=False),
    sa.Column('driver_is_public', sa.Boolean(), nullable=False),
    sa.Column('driver_capacity', sa.Integer(), nullable=False),
    sa.Column('llm_endpoint', sa.String(length=2048), nullable=True),
    sa.Column('llm_api_key', sa.String(length=2048), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('routed_jobs',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('client_node', sa.String(length=255), nullable=False),
    sa.Column('model', sa.String(length=255), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('driver_node', sa.String(length=255), nullable=True),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('dispatched_at', sa.Float(), nullable=True),
    sa.Column('finished_at', sa.Float(), nullable=True),
    sa.Column('deadline', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('routed_jobs', schema=None) as batch_op:
        batch_op.create_index('ix_routed_jobs_driver', ['driver_node', 'status'], unique=False)
        batch_op.create_index('ix_routed_jobs_queue', ['model', 'status', 'created_at'], unique=False)

    op.create_table('served_jobs',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('origin_node', sa.String(length=255), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('finished_at', sa.Float(), nullable=True),
    sa.Column('deadline', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('job_chunks',
    sa.Column('job_id', sa.String(length=64), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('delta', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id', 'seq')
    )


def downgrade() -> None:
    op.drop_table('job_chunks')
    op.drop_table('served_jobs')
    with op.batch_alter_table('routed_jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_routed_jobs_queue')
        batch_op.drop_index('ix_routed_jobs_driver')

    op.drop_table('routed_jobs')
    op.drop_table('node_config')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_status_deadline')

    op.drop_table('jobs')
    with op.batch_alter_table('driver_registrations', schema=None) as batch_op:
        batch_op.drop_index('ix_driver_registrations_model')

    op.drop_table('driver_registrations')
