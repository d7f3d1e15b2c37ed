"""cross-site evaluation results

One row per (run, model, site): the site's scores of the global model or of another hospital's lent local model on
its own validation data, or why there are none (fedmed.server.crosssite). A new table: no existing row changes, so the
keyed audit chain needs no migration entry; its rows are covered from their first write (fedmed.store.audit).

Revision ID: 0011
Revises: 0009
Create Date: 2026-11-30 00:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'cross_site_results',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('run_id', sa.Integer(), nullable=False),
        sa.Column('model', sa.String(length=200), nullable=False),
        sa.Column('model_sha256', sa.String(length=64), nullable=True),
        sa.Column('site_id', sa.Integer(), nullable=False),
        sa.Column('status', sa.String(length=30), nullable=False),
        sa.Column('reason', sa.Text(), nullable=True),
        sa.Column('score', sa.Float(), nullable=True),
        sa.Column('score_name', sa.String(length=64), nullable=True),
        sa.Column('num_samples', sa.Integer(), nullable=True),
        sa.Column('metrics_json', sa.Text(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['site_id'], ['sites.id']),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('run_id', 'model', 'site_id'),
    )


def downgrade() -> None:
    op.drop_table('cross_site_results')
