"""update signatures: client_updates.signature (hex ML-DSA-65 + Ed25519) and signed_digest (hex, what it signs)

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('client_updates', schema=None) as batch_op:
        batch_op.add_column(sa.Column('signature', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('signed_digest', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('client_updates', schema=None) as batch_op:
        batch_op.drop_column('signed_digest')
        batch_op.drop_column('signature')
