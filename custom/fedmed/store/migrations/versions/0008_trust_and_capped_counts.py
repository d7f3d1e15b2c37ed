"""site trust across jobs; capped sample counts

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29 18:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('client_updates') as batch:
        batch.add_column(sa.Column('weight_samples', sa.Float(), nullable=True))
    op.create_table(
        'site_trust',
        sa.Column('site_id', sa.Integer(), nullable=False),
        sa.Column('trust', sa.Float(), nullable=False),
        sa.Column('quarantined', sa.Boolean(), nullable=False),
        sa.Column('good_streak', sa.Integer(), nullable=False),
        sa.Column('run_id', sa.Integer(), nullable=False),
        sa.Column('round_num', sa.Integer(), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ['site_id'],
            ['sites.id'],
        ),
        sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('site_id'),
    )


def downgrade() -> None:
    op.drop_table('site_trust')
    with op.batch_alter_table('client_updates') as batch:
        batch.drop_column('weight_samples')
