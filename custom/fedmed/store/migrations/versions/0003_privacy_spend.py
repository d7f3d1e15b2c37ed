"""privacy spend

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 04:20:39.599365
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'privacy_spend',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('run_id', sa.Integer(), nullable=False),
        sa.Column('round_num', sa.Integer(), nullable=False),
        sa.Column('site_id', sa.Integer(), nullable=False),
        sa.Column('epsilon', sa.Float(), nullable=False),
        sa.Column('delta', sa.Float(), nullable=False),
        sa.Column('epsilon_budget', sa.Float(), nullable=True),
        sa.Column('noise_multiplier', sa.Float(), nullable=True),
        sa.Column('accountant', sa.String(length=30), nullable=True),
        sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(
            ['site_id'],
            ['sites.id'],
        ),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('run_id', 'round_num', 'site_id'),
    )


def downgrade() -> None:
    op.drop_table('privacy_spend')
