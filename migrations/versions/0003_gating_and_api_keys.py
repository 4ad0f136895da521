"""gating and api keys

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 09:03:19.641014
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table('api_keys',
    sa.Column('label', sa.String(length=255), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('label'),
    sa.UniqueConstraint('key_hash')
    )
    with op.batch_alter_table('node_config', schema=None) as batch_op:
        batch_op.add_column(sa.Column('allow_clients', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('deny_clients', sa.JSON(), server_default=sa.text("'[]'"), nullable=False))
        batch_op.add_column(sa.Column('max_in_flight_per_client', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('max_queue', sa.Integer(), server_default=sa.text('1000'), nullable=False))
        batch_op.add_column(sa.Column('require_api_keys', sa.Boolean(), server_default=sa.false(), nullable=False))



def downgrade() -> None:
    with op.batch_alter_table('node_config', schema=None) as batch_op:
        batch_op.drop_column('require_api_keys')
        batch_op.drop_column('max_queue')
        batch_op.drop_column('max_in_flight_per_client')
        batch_op.drop_column('deny_clients')
        batch_op.drop_column('allow_clients')

    op.drop_table('api_keys')
