"""keyed audit chain: audit_log.scheme ('hmac-sha256'; NULL for the unkeyed entries written before)

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.add_column(sa.Column('scheme', sa.String(length=20), nullable=True))


def downgrade() -> None:
    # Older code checks every entry as unkeyed SHA-256: after a downgrade, keyed entries read as edited.
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.drop_column('scheme')
