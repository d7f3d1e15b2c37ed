"""update digests by BLAKE3: client_updates.update_blake3 (hex), beside update_sha256

The server now records each update's digest with BLAKE3 (fedmed.models.hashing.update_blake3): new rows fill
update_blake3 and leave update_sha256 NULL; rows written before keep their update_sha256 and have no update_blake3.
No existing row changes: the keyed audit chain hashes update_blake3 only where it is set (fedmed.store.audit.
LATE_COLUMNS), so the rows it covered before hash as they did and need no migration entry.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-08 01:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('client_updates', schema=None) as batch_op:
        batch_op.add_column(sa.Column('update_blake3', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('client_updates', schema=None) as batch_op:
        batch_op.drop_column('update_blake3')
