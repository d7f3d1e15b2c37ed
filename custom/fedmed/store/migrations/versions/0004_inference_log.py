"""inference log

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 04:30:02.844646
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'inference_logs',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('study_pseudonym', sa.String(length=64), nullable=False),
        sa.Column('patient_pseudonym', sa.String(length=64), nullable=False),
        sa.Column('model_sha256', sa.String(length=64), nullable=False),
        sa.Column('model_version', sa.String(length=100), nullable=False),
        sa.Column('num_images', sa.Integer(), nullable=False),
        sa.Column('positive_findings', sa.Text(), nullable=False),
        sa.Column('status', sa.String(length=30), nullable=False),
        sa.Column('message', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    with op.batch_alter_table('inference_logs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_inference_logs_study_pseudonym'), ['study_pseudonym'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('inference_logs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_inference_logs_study_pseudonym'))

    op.drop_table('inference_logs')
