"""run resumptions: a run continued by a new NVFlare job after a server crash or a failure

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 00:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'run_resumptions',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('run_id', sa.Integer(), nullable=False),
        sa.Column('job_id', sa.String(length=200), nullable=False),
        sa.Column('from_round', sa.Integer(), nullable=False),
        sa.Column('model_sha256', sa.String(length=64), nullable=True),
        sa.Column('previous_status', sa.String(length=30), nullable=False),
        sa.Column('resumed_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('run_id', 'job_id', 'from_round'),
    )


def downgrade() -> None:
    op.drop_table('run_resumptions')
