"""site anchors: each site's privacy ledger head and last audit receipt, per round

One row per (run, round, site): what the site vouched for in its signed update (fedmed.server.anchors): its privacy
ledger's entry count, newest line's sha256 and lifetime epsilon, and the audit receipt it last saw. A new table: no
existing row changes, so the keyed audit chain needs no migration entry; its rows are covered from their first write.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 13:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'site_anchors',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('run_id', sa.Integer(), nullable=False),
        sa.Column('round_num', sa.Integer(), nullable=False),
        sa.Column('site_id', sa.Integer(), nullable=False),
        sa.Column('ledger_entries', sa.Integer(), nullable=True),
        sa.Column('ledger_head', sa.String(length=64), nullable=True),
        sa.Column('lifetime_epsilon', sa.Float(), nullable=True),
        sa.Column('receipt_entry', sa.Integer(), nullable=True),
        sa.Column('receipt_mac', sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['site_id'], ['sites.id']),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('run_id', 'round_num', 'site_id'),
    )


def downgrade() -> None:
    op.drop_table('site_anchors')
